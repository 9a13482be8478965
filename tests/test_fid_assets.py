"""The device resize against clean-fid's own PIL resizer, and the offline FID assets (--fid-cache,
--prefetch) with stand-in files served from loopback."""
import functools
import http.server
import threading

import numpy as np
import pytest
import torch

import custom_train
import evaluation
from conftest import STAND_IN_RECIPE, write_tiny_cifar10
from custom_train import HarnessError


def test_torch_resize_matches_clean_fids_pil_resize():
    from cleanfid.resize import build_resizer

    pil_resize = build_resizer("clean")  # PIL bicubic on float32 'F' images, 32 -> 299, clip to [0, 255]
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images[0] = 0
    images[1] = 255
    images[2, :, ::2] = 255  # stripes: the largest overshoot, clipped
    ours = evaluation.clean_resize_torch(images)
    reference = np.stack([pil_resize(img.permute(1, 2, 0).numpy()).transpose(2, 0, 1) for img in images])
    assert ours.shape == (6, 3, 299, 299) and ours.dtype == torch.float32
    assert np.abs(ours.numpy() - reference).max() < 1e-3


def test_pil_weights_rows_sum_to_one_and_downsampling_widens_support():
    up = evaluation.pil_bicubic_weights(32, 299)
    down = evaluation.pil_bicubic_weights(299, 32)
    np.testing.assert_allclose(up.sum(1), 1)
    np.testing.assert_allclose(down.sum(1), 1)
    assert (up[150] != 0).sum() == 4 and (down[16] != 0).sum() > 30


def stand_in_inception(path):
    """A torchscript module with the interface clean-fid's InceptionV3W expects (a `layers` submodule
    mapping [B, 3, 299, 299] to 2048 features)."""
    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 2048)

        def forward(self, x):
            return self.proj(x.mean(dim=(2, 3)))

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x):
            return self.layers(x)

    torch.jit.save(torch.jit.script(Base()), str(path))


def test_fid_cache_is_used_without_network(tmp_path, monkeypatch):
    import cleanfid.features

    monkeypatch.setattr(cleanfid.features, "check_download_url", lambda **kw: pytest.fail("touched the network"))
    cache = tmp_path / "fid"
    cache.mkdir()
    stand_in_inception(cache / evaluation.INCEPTION_FILE)
    np.savez(cache / evaluation.FID_STATS_FILE, mu=np.zeros(2048), sigma=np.eye(2048))
    fid = evaluation.CleanFID(torch.device("cpu"), cache, resize="torch")
    images = torch.randint(0, 256, (20, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert fid.ref_mu.shape == (2048,) and fid.ref_sigma.shape == (2048, 2048)  # (a 2048-d FID is slow: not here)

    from cleanfid.fid import get_model_features  # the two resizes feed the cached Inception the same input
    by_pil = get_model_features(lambda z: images, fid.extractor, mode="clean", num_gen=20, batch_size=20,
                                device=torch.device("cpu"), z_dim=1, verbose=False)
    with torch.no_grad():
        by_torch = fid.extractor(evaluation.clean_resize_torch(images)).numpy()
    np.testing.assert_allclose(by_torch, by_pil, rtol=1e-4, atol=1e-4)


def test_missing_fid_assets_are_named_with_the_prefetch_command(tmp_path):
    cache = tmp_path / "fid"
    cache.mkdir()
    np.savez(cache / evaluation.FID_STATS_FILE, mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(evaluation.AssetError) as e:
        evaluation.CleanFID(torch.device("cpu"), cache)
    message = str(e.value)
    assert str(cache / evaluation.INCEPTION_FILE) in message and evaluation.FID_STATS_FILE + "," not in message
    assert f"python custom_train.py --prefetch --fid-cache {cache}" in message and "\n" not in message


@pytest.fixture
def asset_server(tmp_path):
    """Serves stand-ins for the three downloads (CIFAR-10 archive, Inception, statistics) on loopback."""
    import tarfile

    served = tmp_path / "served"
    served.mkdir()
    source = tmp_path / "source"
    write_tiny_cifar10(source)
    with tarfile.open(served / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(source / custom_train.CIFAR10_FOLDER, arcname=custom_train.CIFAR10_FOLDER)
    stand_in_inception(served / evaluation.INCEPTION_FILE)
    np.savez(served / evaluation.FID_STATS_FILE, mu=np.zeros(2048), sigma=np.eye(2048))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_prefetch_downloads_everything_once(tmp_path, monkeypatch, asset_server):
    """The three downloads, then the panel's assets made from them (the classifier by the stand-in
    recipe); a second --prefetch fetches and makes nothing (every file as it was)."""
    import hashlib

    import cleanfid.downloads_helper

    monkeypatch.setattr(evaluation, "CLASSIFIER_RECIPE", STAND_IN_RECIPE)
    monkeypatch.setattr(evaluation, "CLASSIFIER_FLOOR", 0.0)
    monkeypatch.setattr(custom_train, "CIFAR10_URL", f"{asset_server}/cifar-10-python.tar.gz")
    monkeypatch.setattr(custom_train, "CIFAR10_MD5", hashlib.md5(
        (tmp_path / "served/cifar-10-python.tar.gz").read_bytes()).hexdigest())
    monkeypatch.setattr(cleanfid.downloads_helper, "inception_url", f"{asset_server}/{evaluation.INCEPTION_FILE}")
    monkeypatch.setattr(evaluation, "FID_STATS_URL", f"{asset_server}/{evaluation.FID_STATS_FILE}")
    data, cache = tmp_path / "data", tmp_path / "fid"
    custom_train.main(["--prefetch", "--data-dir", str(data), "--fid-cache", str(cache)])
    assets = [evaluation.INCEPTION_FILE, evaluation.FID_STATS_FILE, evaluation.REFERENCE_FILE, evaluation.CLASSIFIER_FILE]
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == sorted(assets)  # (and locks)
    assert (data / custom_train.CIFAR10_FOLDER / "data_batch_5").is_file()
    made = {name: (cache / name).stat().st_mtime_ns for name in assets}
    evaluation.CleanFID(torch.device("cpu"), cache)  # the cache is complete and loadable
    monkeypatch.setattr(evaluation, "FID_STATS_URL", "http://127.0.0.1:9/gone.npz")  # present: nothing refetched
    custom_train.main(["--prefetch", "--data-dir", str(data), "--fid-cache", str(cache)])
    assert {name: (cache / name).stat().st_mtime_ns for name in assets} == made


def test_prefetch_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    write_tiny_cifar10(tmp_path / "data")
    import cleanfid.downloads_helper

    monkeypatch.setattr(cleanfid.downloads_helper, "inception_url", "http://127.0.0.1:9/inception.pt")
    with pytest.raises(HarnessError, match="could not download inception-2015-12-05.pt"):
        custom_train.main(["--prefetch", "--data-dir", str(tmp_path / "data"), "--fid-cache", str(tmp_path / "fid")])
    assert list((tmp_path / "fid").iterdir()) == []
