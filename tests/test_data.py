"""CIFAR-10 loading: the real pickle layout, the real download utility (served from loopback), and
the errors a user sees when the data is missing or broken."""
import concurrent.futures
import functools
import hashlib
import http.server
import pickle
import re
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
import torch

import custom_train
from conftest import ROOT, write_tiny_cifar10
from custom_train import HarnessError


def test_loads_the_pickle_layout(tmp_path):
    images, labels = write_tiny_cifar10(tmp_path)
    got_images, got_labels, names = custom_train.load_cifar10(tmp_path, "train")
    assert got_images.dtype == np.uint8 and got_images.shape == (100, 3, 32, 32)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert names[:2] == ["airplane", "automobile"] and len(names) == 10
    test_images, _, _ = custom_train.load_cifar10(tmp_path, "test")
    assert test_images.shape == (20, 3, 32, 32)


def test_channel_layout_is_rgb_planes(tmp_path):
    """CIFAR rows are 1024 red, then 1024 green, then 1024 blue values: pixel (c, y, x) is at c*1024 + y*32 + x."""
    write_tiny_cifar10(tmp_path)
    path = tmp_path / custom_train.CIFAR10_FOLDER / "data_batch_1"
    with open(path, "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    images, _, _ = custom_train.load_cifar10(tmp_path)
    assert images[0, 2, 5, 7] == raw[0, 2 * 1024 + 5 * 32 + 7]


@pytest.mark.parametrize("damage,message", [
    (lambda folder: (folder / "data_batch_3").unlink(), "is incomplete: data_batch_3 is missing"),
    (lambda folder: (folder / "data_batch_2").write_bytes(b"not a pickle"), "data_batch_2 is not a CIFAR-10 pickle batch (UnpicklingError: "),
    (lambda folder: (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8),
                                                                        b"labels": [0] * 4})),
     "data_batch_1: expected uint8 data of shape [N, 3072] and N labels, got uint8 [4, 100] and 4 labels"),
    (lambda folder: (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                                                        b"labels": [0, 10]})),
     "labels must lie in 0..9, found 0..10"),
    (lambda folder: (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32),
                                                                        b"labels": [0, 1]})),
     "data_batch_1: expected uint8 data of shape [N, 3072] and N labels, got float32 [2, 3072] and 2 labels"),
    (lambda folder: (folder / "data_batch_4").write_bytes(pickle.dumps([1, 2, 3])),
     "is not a CIFAR-10 batch: expected a dict with b'data' and b'labels'"),
    (lambda folder: (folder / "data_batch_4").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})),
     "is not a CIFAR-10 batch: expected a dict with b'data' and b'labels'"),
    (lambda folder: (folder / "data_batch_4").write_bytes(pickle.dumps({b"labels": [0, 1]})),
     "is not a CIFAR-10 batch: expected a dict with b'data' and b'labels'"),
    (lambda folder: (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]})),
     "batches.meta: expected 10 label_names, got 1"),
    (lambda folder: (folder / "batches.meta").write_bytes(pickle.dumps({b"num_vis": 3072})),
     "batches.meta: expected 10 label_names, got 0"),
])
def test_malformed_files_give_a_clear_error(tmp_path, damage, message):
    write_tiny_cifar10(tmp_path)
    damage(tmp_path / custom_train.CIFAR10_FOLDER)
    with pytest.raises(HarnessError, match=re.escape(message)):
        custom_train.load_cifar10(tmp_path)


@pytest.fixture
def archive_server(tmp_path):
    """The tiny CIFAR-10 packed as cifar-10-python.tar.gz and served over HTTP on loopback."""
    source = tmp_path / "source"
    write_tiny_cifar10(source)
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / custom_train.CIFAR10_FOLDER, arcname=custom_train.CIFAR10_FOLDER)
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.command)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(archive.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield (f"http://127.0.0.1:{server.server_address[1]}/{archive.name}", hashlib.md5(archive.read_bytes()).hexdigest(),
           requests)
    server.shutdown()


def test_download_only_when_missing(tmp_path, monkeypatch, archive_server):
    url, md5, _ = archive_server
    monkeypatch.setattr(custom_train, "CIFAR10_URL", url)
    monkeypatch.setattr(custom_train, "CIFAR10_MD5", md5)
    data_dir = tmp_path / "data"
    images, labels, _ = custom_train.load_cifar10(data_dir)  # torchvision downloads, checks md5, extracts
    assert images.shape == (100, 3, 32, 32)
    monkeypatch.setattr(custom_train, "CIFAR10_URL", "http://127.0.0.1:9/unreachable.tar.gz")
    again, _, _ = custom_train.load_cifar10(data_dir)  # present now: no network needed
    np.testing.assert_array_equal(images, again)


def test_bad_checksum_is_refused(tmp_path, monkeypatch, archive_server):
    url, _, _ = archive_server
    monkeypatch.setattr(custom_train, "CIFAR10_URL", url)
    monkeypatch.setattr(custom_train, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(HarnessError, match="could not be downloaded"):
        custom_train.load_cifar10(tmp_path / "data")
    assert not (tmp_path / "data" / custom_train.CIFAR10_FOLDER).exists()  # nothing half-made left behind


def test_parallel_first_runs_download_once(tmp_path, monkeypatch, archive_server):
    """Four runs starting together on an empty data dir (run_all_scales.sh --gpus, torchrun ranks):
    one download, and every run reads the complete data set."""
    url, md5, requests = archive_server
    monkeypatch.setattr(custom_train, "CIFAR10_URL", url)
    monkeypatch.setattr(custom_train, "CIFAR10_MD5", md5)
    custom_train.load_cifar10(tmp_path / "alone")
    one_download = len(requests)  # torchvision's redirect probe, then the archive
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: custom_train.load_cifar10(tmp_path / "data"), range(4)))
    assert len(requests) == 2 * one_download
    for images, labels, _ in loaded:
        assert images.shape == (100, 3, 32, 32)
        np.testing.assert_array_equal(images, loaded[0][0])
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith(".")] == []  # staging removed


def test_offline_and_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(custom_train, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens
    with pytest.raises(HarnessError) as e:
        custom_train.load_cifar10(tmp_path / "data")
    message = str(e.value)
    assert "\n" not in message
    assert f"CIFAR-10 is expected in {tmp_path / 'data' / 'cifar-10-batches-py'}" in message
    assert "run once with internet" in message


def test_cli_prints_one_error_line_and_exits_nonzero(tmp_path):
    """The real command line, with the real URL, on a machine without internet (or a broken folder)."""
    data_dir = tmp_path / "data"
    write_tiny_cifar10(data_dir)
    (data_dir / custom_train.CIFAR10_FOLDER / "data_batch_5").write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, str(ROOT / "custom_train.py"), "--scale", "tiny", "--method", "concat-film",
                           "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "runs"), "--fid", "off"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "data_batch_5 is not a CIFAR-10 pickle batch" in lines[0]
    assert not (tmp_path / "runs" / "tiny-concat-film-s42" / "checkpoint.pt").exists()


def test_the_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    """The data order depends on (seed, epoch) alone, never on the global RNG (resume restores none), and
    each epoch visits every image once."""
    torch.manual_seed(0)
    a = custom_train.epoch_order(42, 3, 100)
    torch.manual_seed(1)
    torch.rand(5)
    assert torch.equal(a, custom_train.epoch_order(42, 3, 100))
    assert sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, custom_train.epoch_order(42, 4, 100)) and not torch.equal(a, custom_train.epoch_order(43, 3, 100))
