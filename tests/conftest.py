"""Shared fixtures: a tiny CIFAR-10 in the real on-disk format, and a stand-in for clean-fid's Inception."""
import copy
import json
import os
import pickle
import struct
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest.ini runs two workers on two cores: one thread each, and for the runs they start (before torch starts)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import custom_train  # noqa: E402
import evaluation  # noqa: E402

class Py2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2 `str` (SHORT_BINSTRING/BINSTRING), as the real archive was written by
    Python 2's cPickle: Python 3 reads such a file right only with encoding="bytes" (the default ASCII
    turns the keys into str and fails on the pixel data), so the look-alike tests that too."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)
    dispatch[bytes] = save_py2_str


def py2_dump(obj, f) -> None:
    Py2Pickler(f, protocol=2).dump(obj)


CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_tiny_cifar10(data_dir: Path, per_batch: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """cifar-10-batches-py/ exactly as the real archive lays it out (dicts pickled by Python 2),
    with `per_batch` images per batch file. Images are class-dependent colour blobs plus noise, so a
    model can tell classes apart. Returns the train images [N, 3, 32, 32] and labels."""
    rng = np.random.default_rng(seed)
    folder = data_dir / custom_train.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    all_images, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch)
        base = np.stack([np.full((3, 32, 32), 25 * c, dtype=np.float64) for c in labels])
        images = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        with open(folder / name, "wb") as f:
            py2_dump({b"batch_label": name.encode(), b"labels": labels.tolist(),
                         b"data": images.reshape(per_batch, -1), b"filenames": [b"x.png"] * per_batch}, f)
        if name != "test_batch":
            all_images.append(images)
            all_labels.append(labels)
    with open(folder / "batches.meta", "wb") as f:
        py2_dump({b"label_names": [n.encode() for n in CLASS_NAMES], b"num_cases_per_batch": per_batch,
                     b"num_vis": 3072}, f)
    return np.concatenate(all_images), np.concatenate(all_labels)


def fake_run(out_dir: Path, name: str, evals=(), **fields) -> None:
    """A finished run as report.py reads it: results.json (with `evals`), and a log.jsonl of three training
    losses (for `curves`)."""
    d = out_dir / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(dict(fields, evals=list(evals))))
    (d / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))


@pytest.fixture
def drawn(monkeypatch):
    """Every line matplotlib draws from here on, as (axes, x, y, keyword arguments), still drawn for real."""
    import matplotlib.axes

    lines, real_plot = [], matplotlib.axes.Axes.plot

    def recording(ax, x, y, *args, **kwargs):
        lines.append((ax, list(x), list(y), kwargs))
        return real_plot(ax, x, y, *args, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    return lines


@pytest.fixture(scope="session")
def digits_metrics(tmp_path_factory):
    """The digits proxy's metrics with their classifier cached in one folder shared by this run's xdist
    workers (the classifier is trained under a lock: by the first worker that needs it, once)."""
    import proxy

    root = tmp_path_factory.getbasetemp()
    cache_dir = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "digits-classifier"
    metrics = proxy.ProxyMetrics(cache_dir)
    metrics.cache_dir = cache_dir
    return metrics


@pytest.fixture
def cached_proxy(monkeypatch, digits_metrics):
    """custom_train's digits proxy made from the shared classifier and references (nothing trained or read)."""
    monkeypatch.setattr(custom_train, "DigitsProxy", type("Cached", (custom_train.DigitsProxy,), {
        "__init__": lambda self, cache_dir, device: self.__dict__.update(digits_metrics.__dict__)}))
    return digits_metrics


@pytest.fixture
def cifar_dir(tmp_path):
    data_dir = tmp_path / "data"
    write_tiny_cifar10(data_dir)
    return data_dir


class StandInInception(torch.nn.Module):
    """A small fixed random network with clean-fid's feature-extractor interface: [B, 3, 299, 299]
    floats in [0, 255] -> [B, 8] features."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 7, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.05)
            self.conv.bias.zero_()

    @torch.no_grad()
    def forward(self, x):
        return torch.tanh(self.conv(x / 255.0 - 0.5)).mean(dim=(2, 3))


# the classifier recipe, narrow and short: the look-alike CIFAR-10 in seconds
STAND_IN_RECIPE = dict(evaluation.CLASSIFIER_RECIPE, widths=(8, 16, 16, 16), epochs=4, batch_size=20, lr=0.2,
                       warmup_epochs=1)


@pytest.fixture
def stand_in_fid(monkeypatch, tmp_path):
    """Route clean-fid's two downloads to local stand-ins: the Inception (through the feature-extractor
    hook) and the CIFAR-10 train statistics (a file computed with the stand-in on the tiny train set,
    returned in place of clean-fid's download). The panel's assets are made by the real code into a
    temporary folder, the classifier by a narrow, short version of its recipe (STAND_IN_RECIPE) with no
    accuracy floor. Yields the list of URLs clean-fid asked for."""
    import cleanfid.features
    from cleanfid.fid import get_model_features

    extractor = StandInInception()
    monkeypatch.setattr(evaluation, "load_fid_extractor", lambda device: extractor)
    monkeypatch.setattr(evaluation, "CLASSIFIER_RECIPE", STAND_IN_RECIPE)
    monkeypatch.setattr(evaluation, "CLASSIFIER_FLOOR", 0.0)
    real_panel_data = custom_train.panel_data
    monkeypatch.setattr(custom_train, "panel_data", lambda data_dir, folder: real_panel_data(data_dir, tmp_path / "panel"))
    requested = []
    stats_path = tmp_path / "stand_in_stats.npz"

    def fake_download(local_folder, url):
        requested.append(url)
        return str(stats_path)

    monkeypatch.setattr(cleanfid.features, "check_download_url", fake_download)

    def write_stats(images_nchw_uint8):
        feats = get_model_features(lambda z: torch.from_numpy(images_nchw_uint8), extractor, mode="clean",
                                   num_gen=len(images_nchw_uint8), batch_size=len(images_nchw_uint8),
                                   device=torch.device("cpu"), z_dim=1, verbose=False)
        np.savez(stats_path, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
        return feats

    return type("StandIn", (), dict(extractor=extractor, requested=requested, write_stats=staticmethod(write_stats)))


class Spy:
    """Wraps build_model and the DDPM scheduler: the initial weights, and for every training forward
    the weights it ran with, its inputs (x_t, t, y), and the clean images and noise of add_noise."""

    def __init__(self, monkeypatch):
        self.initial, self.weights, self.inputs, self.x0, self.noise = None, [], [], [], []
        real_build, real_scheduler = custom_train.build_model, custom_train.ddpm_scheduler

        def build_model(*args, **kwargs):
            model = real_build(*args, **kwargs)
            if next(model.parameters()).device.type == "meta":  # the parameter count's throw-away models
                return model
            self.initial = copy.deepcopy(model)

            def record(module, args, kwargs):
                if module.training and torch.is_grad_enabled():
                    self.weights.append({k: v.detach().clone() for k, v in module.state_dict().items()})
                    self.inputs.append(tuple(a.detach().clone() for a in args))
            model.register_forward_pre_hook(record, with_kwargs=True)
            return model

        def ddpm_scheduler():
            scheduler = real_scheduler()
            add_noise = scheduler.add_noise

            def recording_add_noise(x0, noise, t):
                self.x0.append(x0.detach().clone())
                self.noise.append(noise.detach().clone())
                return add_noise(x0, noise, t)
            scheduler.add_noise = recording_add_noise
            return scheduler

        monkeypatch.setattr(custom_train, "build_model", build_model)
        monkeypatch.setattr(custom_train, "ddpm_scheduler", ddpm_scheduler)


def crash_at_step(monkeypatch, n):
    """Make the n-th training batch of the next run raise KeyboardInterrupt (the power goes out)."""
    real = custom_train.ddpm_scheduler
    calls = {"n": 0}

    def crashing_scheduler():
        s = real()
        add_noise = s.add_noise

        def add_noise_then_crash(*a):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return add_noise(*a)
        s.add_noise = add_noise_then_crash
        return s
    monkeypatch.setattr(custom_train, "ddpm_scheduler", crashing_scheduler)
    return lambda: monkeypatch.setattr(custom_train, "ddpm_scheduler", real)
