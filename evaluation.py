"""The class-conditional metric panel: what FID cannot see, from the same features FID uses.

FID compares the whole sample set with the whole data set and never looks at labels, so a model that
ignores its class, or draws each class from a few modes, can score well. From one feature pass over the
samples (and their conditioning labels) the panel adds:

* KID (Binkowski et al. 2018): the unbiased MMD^2 between the feature sets with the cubic polynomial kernel,
  by clean-fid's own `kernel_distance`: the mean over 100 random subsets of min(n_a, n_b, 1000) features
  of each set, the subsets drawn from a fixed seed, so that a score is reproducible;
* intra-FD: the Frechet distance within each class, between the samples conditioned on that class and
  the reference images of that class, and its mean over the classes (the intra-FID of the conditional-GAN
  literature, when the features are Inception's);
* precision and recall (Kynkaanniemi et al. 2019, k = 3): the fraction of samples inside the reference
  manifold (the union of balls around each reference feature reaching its k-th nearest reference
  neighbour), and the fraction of references inside the samples' manifold; distances in chunks, so that
  n x n of them never sit in memory at once.

The digits proxy (proxy.py) reports them from its classifier's features. On CIFAR-10 (below) they come
from clean-fid's Inception features of the samples, the very features of the FID (whose number stays
exactly clean-fid's), against the CIFAR-10 training set's features and per-class statistics, computed
once through clean-fid's own pipeline and cached; a small ResNet trained once on CIFAR-10 gives the
class accuracy of samples.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import tempfile
import urllib.error
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
PR_NEIGHBOURS = 3


def feature_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets, by clean-fid's own function."""
    from cleanfid.fid import frechet_distance

    mu_a, sigma_a = feats_a.mean(0), np.cov(feats_a, rowvar=False)
    mu_b, sigma_b = feats_b.mean(0), np.cov(feats_b, rowvar=False)
    return float(frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


def kid(feats_a: np.ndarray, feats_b: np.ndarray, seed: int = 0, num_subsets: int = KID_SUBSETS,
        max_subset_size: int = KID_SUBSET_SIZE) -> float:
    """clean-fid's kernel_distance; it draws its subsets from numpy's global generator, which is seeded
    for the call and then put back as it was."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(kernel_distance(feats_a, feats_b, num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


def class_statistics(feats: np.ndarray, labels: np.ndarray, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the mean [C, D] and covariance [C, D, D] of the features (float64), as clean-fid fits
    them (np.mean, np.cov); NaN for a class with fewer than 2 features."""
    d = feats.shape[1]
    mu, sigma = np.full((num_classes, d), np.nan), np.full((num_classes, d, d), np.nan)
    for c in range(num_classes):
        mine = feats[labels == c]
        if len(mine) >= 2:
            mu[c], sigma[c] = np.mean(mine, axis=0), np.cov(mine, rowvar=False)
    return mu, sigma


def intra_fd(feats: np.ndarray, labels: np.ndarray, ref_feats: np.ndarray | None, ref_labels: np.ndarray | None,
             num_classes: int = 10, ref_stats: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, list[float]]:
    """(the mean over classes, each class's) Frechet distance between the samples conditioned on a class
    and the references of that class (their per-class statistics `ref_stats` if given, e.g. cached); None
    where a class has fewer than 2 of either (no covariance). With fewer features per class than
    dimensions the covariances are singular: scipy's warning about it is silenced, and the number is
    noisier (clean-fid's sqrtm copes)."""
    import warnings

    from cleanfid.fid import frechet_distance
    from scipy.linalg import LinAlgWarning

    ref_mu, ref_sigma = ref_stats if ref_stats is not None else class_statistics(ref_feats, ref_labels, num_classes)
    mu, sigma = class_statistics(feats, labels, num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinAlgWarning)
        per_class = [None if np.isnan(mu[c]).any() or np.isnan(ref_mu[c]).any()
                     else float(frechet_distance(mu[c], sigma[c], ref_mu[c], ref_sigma[c])) for c in range(num_classes)]
    return (None if None in per_class else float(np.mean(per_class))), per_class


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest neighbour in its own set (itself, at 0, not counted)."""
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)])


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """The fraction of points within the radius of at least one centre."""
    hits = [(torch.cdist(points[i:i + chunk], centres) <= radii[None]).any(1) for i in range(0, len(points), chunk)]
    return torch.cat(hits).double().mean().item()


def manifold(feats: np.ndarray, k: int = PR_NEIGHBOURS, chunk: int = 1000, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A feature set on the device (float64 on the CPU, float32 elsewhere) and each point's k-th neighbour
    radius: the balls whose union is its manifold. A fixed reference's is made once and passed to
    precision_recall (50,000 CIFAR-10 features: 50,000^2 distances, not worth redoing at every evaluation)."""
    x = torch.as_tensor(feats, dtype=torch.float64 if torch.device(device).type == "cpu" else torch.float32,
                        device=device)
    return x, _kth_neighbour_radii(x, k, chunk)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS, chunk: int = 1000,
                     device="cpu", real_manifold: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of `fake` against `real` features; None for
    both when either set has no k-th neighbour (k + 1 features or fewer). `real_manifold`: manifold(real)
    made beforehand with the same k, chunk and device."""
    if min(len(real), len(fake)) <= k:
        return None, None
    real_t, real_radii = real_manifold if real_manifold is not None else manifold(real, k, chunk, device)
    fake_t, fake_radii = manifold(fake, k, chunk, device)
    return _inside(fake_t, real_t, real_radii, chunk), _inside(real_t, fake_t, fake_radii, chunk)


def panel(feats: np.ndarray, labels: np.ndarray, ref_feats: np.ndarray, ref_labels: np.ndarray,
          predictions: np.ndarray | None = None, num_classes: int = 10, device="cpu",
          ref_stats: tuple[np.ndarray, np.ndarray] | None = None,
          ref_manifold: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Every metric of the panel, with the per-class numbers (intra-FD, and class accuracy when a
    classifier's `predictions` of the samples are given) under "per_class". `ref_stats` and `ref_manifold`:
    the reference's per-class statistics and manifold, when made beforehand."""
    mean_fd, per_class_fd = intra_fd(feats, labels, ref_feats, ref_labels, num_classes, ref_stats)
    precision, recall = precision_recall(ref_feats, feats, device=device, real_manifold=ref_manifold)
    out = dict(kid=kid(ref_feats, feats), intra_fd=mean_fd, precision=precision, recall=recall,
               per_class=dict(intra_fd=per_class_fd))
    if predictions is not None:
        out["per_class"]["class_acc"] = [float((predictions[labels == c] == c).mean()) if (labels == c).any() else None
                                         for c in range(num_classes)]
    return out


# --------------------------------------------------------------------------------------------
# CIFAR-10: clean-fid's FID, from one feature pass that also gives the panel.
# --------------------------------------------------------------------------------------------

class AssetError(Exception):
    """An evaluation asset is missing, cannot be fetched, or was made another way (one line for the user)."""


@contextlib.contextmanager
def machine_lock(what: str, folder: Path | None = None):
    """Hold an exclusive lock while fetching or making `what`: parallel runs (run_all_scales.sh --gpus)
    and torchrun ranks that all find an asset missing make it once; the others wait, then find it in
    place. The lock file lives in `folder` when given (the assets' own folder, which SLURM tasks on
    several nodes may share: Linux's flock then locks across NFS clients), else in this machine's /tmp."""
    where = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    where.mkdir(parents=True, exist_ok=True)
    with open(where / f".class-cond-ddpm-{what}-{os.getuid()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid's torchscript Inception
FID_STATS_FILE = "cifar10_clean_train_32.npz"  # clean-fid's CIFAR-10 train statistics, "clean" mode, 32x32
# exactly the URL clean-fid's get_reference_statistics requests (its base URL ends in "/" and it adds another)
FID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats//" + FID_STATS_FILE


def load_fid_extractor(device, fid_cache: Path | None = None):
    """clean-fid's Inception: from --fid-cache if given (never the network), else clean-fid's own
    download-on-first-use."""
    if fid_cache is None:
        from cleanfid.features import build_feature_extractor

        return build_feature_extractor("clean", device=device, use_dataparallel=False)
    from cleanfid.inception_torchscript import InceptionV3W

    return InceptionV3W(str(fid_cache), download=False).to(device).eval()


def missing_fid_assets(fid_cache: Path) -> list[Path]:
    return [Path(fid_cache) / name for name in (INCEPTION_FILE, FID_STATS_FILE) if not (Path(fid_cache) / name).is_file()]


def pil_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] interpolation matrix of PIL's bicubic resize (Resample.c: precompute_coeffs with the
    a = -0.5 cubic, support widened by the scale when downsampling, each row normalised to sum 1)."""
    def cubic(x, a=-0.5):
        x = abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0

    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    weights = np.zeros((out_size, in_size))
    for out in range(out_size):
        center = (out + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        row = np.array([cubic((i - center + 0.5) / filter_scale) for i in range(lo, hi)])
        weights[out, lo:hi] = row / row.sum() if row.sum() != 0 else row
    return weights


def clean_resize_torch(images: torch.Tensor, size: int = 299) -> torch.Tensor:
    """clean-fid's "clean" resize (PIL bicubic on float32 images, then clip to [0, 255]) as two matrix
    products on the images' device: uint8 [N, 3, h, w] -> float32 [N, 3, size, size].

    Like PIL: horizontal pass first, float64 accumulation, the intermediate image stored as float32."""
    n, c, h, w = images.shape
    wh = torch.from_numpy(pil_bicubic_weights(w, size)).to(images.device)
    wv = torch.from_numpy(pil_bicubic_weights(h, size)).to(images.device)
    x = images.double()
    x = torch.einsum("nchw,ow->ncho", x, wh).float().double()  # horizontal, stored as float32 like PIL's 'F'
    x = torch.einsum("ncho,ph->ncpo", x, wv).float()
    return x.clamp(0, 255)


@contextlib.contextmanager
def true_fp32():
    """fp32 matmuls and convolutions in IEEE fp32 on CUDA (no TF32), as clean-fid's reference statistics
    were computed, whatever --tf32 set for training."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def inception_features(images: torch.Tensor, extractor, device, resize: str = "pil", batch_size: int = 250,
                       desc: str = "FID features") -> np.ndarray:
    """clean-fid's features of uint8 images [N, 3, 32, 32], in true fp32: with resize "pil" through its own
    generator pipeline (per image: uint8 HWC -> its "clean" PIL resize -> Inception), the very arithmetic
    of its reference statistics (made from PNGs of the same uint8 pixels); "torch": clean_resize_torch on
    the device (within 1e-3 of PIL; a protocol deviation)."""
    from cleanfid.fid import get_model_features

    n = len(images)
    with true_fp32():
        if resize == "torch":
            with torch.no_grad():
                return np.concatenate([
                    extractor(clean_resize_torch(images[i:i + batch_size].to(device))).cpu().numpy()
                    for i in tqdm(range(0, n, batch_size), desc=desc, leave=False)])

        def serve(z):  # clean-fid's generator hook: its batch index -> our images
            i = serve.calls * batch_size
            serve.calls += 1
            return images[torch.arange(i, i + batch_size) % n]  # the last batch wraps; clean-fid drops the extra
        serve.calls = 0
        return get_model_features(serve, extractor, mode="clean", num_gen=n, batch_size=batch_size,
                                  device=device, z_dim=1, desc=desc)


def fingerprint(*parts) -> str:
    """sha256 over arrays (their dtype, shape and bytes), modules (their state dicts) and anything JSON can
    write: what an asset was made from, so that one made another way is refused, not silently used."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, nn.Module):
            for name, tensor in sorted(part.state_dict().items()):
                h.update(name.encode())
                part = tensor.detach().cpu().contiguous()
                h.update(str((part.dtype, tuple(part.shape))).encode())
                h.update(part.reshape(-1).view(torch.uint8).numpy().tobytes() if part.numel() else b"")
        elif isinstance(part, np.ndarray):
            part = np.ascontiguousarray(part)
            h.update(str((part.dtype.str, part.shape)).encode())
            h.update(part.tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


REFERENCE_FILE = "cifar10_train_reference.npz"  # the train set's Inception features and per-class statistics
CLASSIFIER_FILE = "cifar10_classifier.pt"


def check_made_by(path: Path, recorded: str, expected: str, remedy: str) -> None:
    if recorded != expected:
        raise AssetError(f"{path} was made another way (made_by {recorded[:12]}, these data, extractor and code give "
                         f"{expected[:12]}); delete it to remake it ({remedy})")


def make_reference(images: np.ndarray, labels: np.ndarray, extractor, device, batch_size: int = 250) -> dict:
    """The CIFAR-10 training set through clean-fid's pipeline (inception_features, resize "pil"): the
    features [N, 2048] (float32, as clean-fid returns them), the labels, and per class the mean and
    covariance (float64), as clean-fid fits its statistics."""
    feats = inception_features(torch.from_numpy(images), extractor, device, "pil", batch_size, desc="train features")
    mu, sigma = class_statistics(feats, labels)
    return dict(features=feats, labels=labels, mu=mu, sigma=sigma)


def extractor_module(extractor) -> nn.Module:
    """The network behind a feature extractor: itself, or the module a function wraps (clean-fid's online
    route returns such a function)."""
    if isinstance(extractor, nn.Module):
        return extractor
    for cell in getattr(extractor, "__closure__", None) or ():
        if isinstance(cell.cell_contents, nn.Module):
            return cell.cell_contents
    raise AssetError(f"cannot tell which network the feature extractor {extractor!r} runs")


def reference_made_by(images: np.ndarray, labels: np.ndarray, extractor) -> str:
    return fingerprint("cifar10 train reference", version("clean-fid"), images, labels, extractor_module(extractor),
                       inspect.getsource(inception_features), inspect.getsource(make_reference),
                       inspect.getsource(class_statistics))


def load_or_make_reference(folder: Path, images: np.ndarray, labels: np.ndarray, extractor, device) -> dict:
    """The cached reference in `folder`, made (once, atomically, under a lock) when missing; refused in
    one line when it was made from other data, another extractor or other code."""
    path, made_by = Path(folder) / REFERENCE_FILE, reference_made_by(images, labels, extractor)
    with machine_lock("panel-reference", folder):
        if not path.exists():
            ref = make_reference(images, labels, extractor, device)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, made_by=made_by, **ref)
            os.replace(tmp, path)
    try:
        with np.load(path) as saved:
            recorded, ref = str(saved["made_by"]), {k: saved[k] for k in ("features", "labels", "mu", "sigma")}
    except Exception as e:
        raise AssetError(f"cannot read {path} ({type(e).__name__}: {e}); delete it to remake it") from e
    check_made_by(path, recorded, made_by, "it is made on first use, or by --prefetch")
    return ref


# --------------------------------------------------------------------------------------------
# CIFAR-10: a classifier for the class accuracy of samples.
# --------------------------------------------------------------------------------------------

# The ResNet-9 of the fast CIFAR-10 training records (Page 2018, "How to train your ResNet": 94% test
# accuracy in 24 epochs): SGD with Nesterov momentum, a linear warm-up then linear decay, label
# smoothing, random crops with reflect padding, flips and 8x8 cutout; flip test-time augmentation.
CLASSIFIER_RECIPE = dict(widths=(64, 128, 256, 512), epochs=24, batch_size=512, lr=0.4, warmup_epochs=5,
                         momentum=0.9, weight_decay=5e-4, label_smoothing=0.2, crop_padding=4, cutout=8, seed=0)
CLASSIFIER_FLOOR = 0.85  # below this test accuracy, class accuracy of samples would not be trustworthy
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


class CifarClassifier(nn.Module):
    """ResNet-9: prep, (conv, pool, residual), (conv, pool), (conv, pool, residual), global max pool, a
    linear layer scaled by 1/8."""

    def __init__(self, widths=CLASSIFIER_RECIPE["widths"], num_classes: int = 10):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.net = nn.Sequential(
            conv_bn(3, w0), conv_bn(w0, w1), nn.MaxPool2d(2), Residual(w1), conv_bn(w1, w2), nn.MaxPool2d(2),
            conv_bn(w2, w3), nn.MaxPool2d(2), Residual(w3), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            nn.Linear(w3, num_classes, bias=False))

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(CIFAR_MEAN, device=images.device)[:, None, None]
        std = torch.tensor(CIFAR_STD, device=images.device)[:, None, None]
        return (images.float() / 255 - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """normalised images -> logits."""
        return self.net(x) * 0.125

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """uint8 [N, 3, 32, 32] -> predicted classes [N], from the logits of each image and its mirror."""
        device = next(self.parameters()).device
        out = []
        for i in range(0, len(images), batch_size):
            x = self.normalize(images[i:i + batch_size].to(device))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = self(x).float() + self(x.flip(3)).float()
            out.append(logits.argmax(1))
        return torch.cat(out).cpu()


def augment(x: torch.Tensor, g: torch.Generator, padding: int, cutout: int) -> torch.Tensor:
    """Random crops of the reflect-padded images, random flips and a random cutout square, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode="reflect")
    dy, dx = (torch.randint(0, 2 * padding + 1, (2, n), device=x.device, generator=g))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    x = padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(3, device=x.device)[None, :, None, None],
               rows, cols]
    flip = torch.rand(n, device=x.device, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    cy, cx = (torch.randint(0, h, (2, n), device=x.device, generator=g))
    r = torch.arange(h, device=x.device)
    hole = ((r[None, :, None] - cy[:, None, None]).abs() < cutout / 2) & \
           ((r[None, None, :] - cx[:, None, None]).abs() < cutout / 2)
    return x * ~hole[:, None]


def train_classifier(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], device,
                     recipe: dict) -> tuple[CifarClassifier, float]:
    """Train the recipe on `train` (uint8 images, labels) on the device (bf16 autocast on CUDA); return it
    and its accuracy on `test` (with flip test-time augmentation). Deterministic on the CPU."""
    device = torch.device(device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)  # (a run's --deterministic: max pooling's CUDA backward has no such kernel)
    try:
        return _train_classifier(train, test, device, recipe)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _train_classifier(train, test, device, recipe):
    g = torch.Generator(device=device).manual_seed(recipe["seed"])
    torch.manual_seed(recipe["seed"])
    model = CifarClassifier(recipe["widths"]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [p for p in model.parameters() if p.ndim > 1], [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([dict(params=decay, weight_decay=recipe["weight_decay"]), dict(params=no_decay, weight_decay=0)],
                          lr=recipe["lr"], momentum=recipe["momentum"], nesterov=True)
    x = CifarClassifier.normalize(torch.from_numpy(train[0]).to(device))
    y = torch.from_numpy(train[1]).to(device)
    per_epoch = len(x) // recipe["batch_size"]
    total, warmup = recipe["epochs"] * per_epoch, recipe["warmup_epochs"] * per_epoch
    step = 0
    for _ in tqdm(range(recipe["epochs"]), desc="CIFAR-10 classifier", leave=False):
        order = torch.randperm(len(x), device=device, generator=g)
        for b in range(per_epoch):
            step += 1
            lr = recipe["lr"] * (step / warmup if step <= warmup else (total - step) / max(total - warmup, 1))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[b * recipe["batch_size"]:(b + 1) * recipe["batch_size"]]
            xb = augment(x[idx], g, recipe["crop_padding"], recipe["cutout"])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(xb).float(), y[idx], label_smoothing=recipe["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    accuracy = float((model.predict(torch.from_numpy(test[0])).numpy() == test[1]).mean())
    return model, accuracy


def classifier_made_by(train, test, recipe: dict) -> str:
    return fingerprint("cifar10 classifier", recipe, train[0], train[1], test[0], test[1],
                       *(inspect.getsource(f) for f in (CifarClassifier, Residual, conv_bn, augment, _train_classifier)))


def load_or_train_classifier(folder: Path, train, test, device, recipe: dict | None = None) -> tuple[CifarClassifier, float]:
    """The cached classifier in `folder` with its recorded test accuracy, trained (once, atomically, under
    a lock) when missing; refused when made another way or when its accuracy is below CLASSIFIER_FLOOR.
    The recipe: CLASSIFIER_RECIPE unless given."""
    recipe = recipe or CLASSIFIER_RECIPE
    path, made_by = Path(folder) / CLASSIFIER_FILE, classifier_made_by(train, test, recipe)
    with machine_lock("panel-classifier", folder):
        if not path.exists():
            model, accuracy = train_classifier(train, test, device, recipe)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save(dict(state_dict=model.state_dict(), test_accuracy=accuracy, recipe=recipe, made_by=made_by,
                            clean_fid=version("clean-fid"), torch=str(torch.__version__)), tmp)
            os.replace(tmp, path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        recorded = saved["made_by"]
    except Exception as e:
        raise AssetError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         f"delete it to retrain it") from e
    check_made_by(path, recorded, made_by, "it is trained on first use, or by --prefetch")
    if saved["test_accuracy"] < CLASSIFIER_FLOOR:
        raise AssetError(f"the CIFAR-10 classifier {path} reaches only {saved['test_accuracy']:.3f} test accuracy (floor "
                         f"{CLASSIFIER_FLOOR}); class accuracy of samples would not be trustworthy (delete it to "
                         f"retrain it, or pass --no-panel)")
    model = CifarClassifier(recipe["widths"])
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval(), float(saved["test_accuracy"])


# --------------------------------------------------------------------------------------------
# CIFAR-10: the scorer, FID and the panel from one feature pass.
# --------------------------------------------------------------------------------------------

class CleanFID:
    """FID exactly as clean-fid computes it for a generator: its "clean" resize (PIL bicubic on float
    images), its Inception features (in true fp32), its Frechet distance, against its CIFAR-10 train
    statistics at 32. With `panel` (the folder of the panel's assets, and the CIFAR-10 train and test
    sets as (uint8 images, labels)), the same features also give KID, intra-FID, precision and recall
    against the train set's features and per-class statistics, and a classifier the class accuracy.

    resize="torch" replaces clean-fid's per-image PIL resize by clean_resize_torch (equal within 1e-3,
    tested) on the device: an option, listed as a protocol deviation (the references are made with
    clean-fid's PIL resize whatever it is). Built before training, so that a missing download fails in
    the first second, not after 35k steps."""

    primary = "fid"

    def __init__(self, device, fid_cache: Path | None = None, resize: str = "pil", panel: tuple | None = None):
        from cleanfid.features import get_reference_statistics

        self.device, self.resize, self.reference, self.classifier = device, resize, None, None
        self.reference_manifold = None  # made at the first evaluation, kept for the others
        if fid_cache is not None:
            missing = missing_fid_assets(fid_cache)
            if missing:
                raise AssetError(f"--fid-cache {fid_cache} lacks {', '.join(str(m) for m in missing)}; on a machine "
                                 f"with internet run `python custom_train.py --prefetch --fid-cache {fid_cache}` and "
                                 f"copy the folder here")
            stats = np.load(Path(fid_cache) / FID_STATS_FILE)
            self.ref_mu, self.ref_sigma = stats["mu"], stats["sigma"]
            self.extractor = load_fid_extractor(device, fid_cache)
        else:
            try:
                with machine_lock("clean-fid"):  # clean-fid writes its downloads in place: one process at a time
                    self.ref_mu, self.ref_sigma = get_reference_statistics("cifar10", 32, mode="clean", split="train")
                    self.extractor = load_fid_extractor(device)
            except (OSError, urllib.error.URLError) as e:
                raise AssetError(f"clean-fid could not fetch its Inception weights or the CIFAR-10 reference statistics "
                                 f"({type(e).__name__}: {e}); run `python custom_train.py --prefetch --fid-cache DIR` "
                                 f"on a machine with internet and pass --fid-cache DIR, or pass --fid off") from e
        if panel is not None:
            folder, train, test = panel
            self.reference = load_or_make_reference(folder, *train, self.extractor, device)
            self.classifier, self.classifier_accuracy = load_or_train_classifier(folder, train, test, device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> dict:
        """images: uint8 [N, 3, 32, 32]; labels: their conditioning classes (FID does not use them; the
        panel does)."""
        from cleanfid.fid import frechet_distance

        feats = inception_features(images, self.extractor, self.device, self.resize, batch_size)
        mu, sigma = np.mean(feats, axis=0), np.cov(feats, rowvar=False)
        out = dict(fid=float(frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)), fid_samples=len(images))
        if self.reference is not None:
            ref = self.reference
            predictions = self.classifier.predict(images).numpy()
            with true_fp32():  # (precision and recall's distances: no TF32 whatever --tf32 set)
                if self.reference_manifold is None:
                    self.reference_manifold = manifold(ref["features"], device=self.device)
                p = panel(feats, labels.numpy(), ref["features"], ref["labels"], predictions, device=self.device,
                          ref_stats=(ref["mu"], ref["sigma"]), ref_manifold=self.reference_manifold)
            out.update(kid=p["kid"], intra_fid=p["intra_fd"], precision=p["precision"], recall=p["recall"],
                       class_acc=float((predictions == labels.numpy()).mean()),
                       classifier_accuracy=self.classifier_accuracy,
                       per_class=dict(intra_fid=p["per_class"]["intra_fd"], class_acc=p["per_class"]["class_acc"]))
        return out


def write_per_class(per_class: dict, class_names: list[str], csv_path: Path, png_path: Path, title: str) -> None:
    """The panel's per-class numbers (e.g. intra_fid and class_acc) as a CSV, one row per class, and a bar
    plot, one panel per metric; both written atomically."""
    import csv
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(per_class)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["class", "name", *metrics])
    for c, name in enumerate(class_names):
        writer.writerow([c, name, *("" if per_class[m][c] is None else f"{per_class[m][c]:.6g}" for m in metrics)])
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    tmp.write_text(text.getvalue())
    os.replace(tmp, csv_path)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = [np.nan if v is None else v for v in per_class[metric]]
        ax.bar(range(len(class_names)), values, color="C0")
        ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = png_path.with_name(png_path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, png_path)
