"""Class-conditional DDPM on CIFAR-10: the published protocol, with the conditioning method swapped in.

    python custom_train.py --scale small --method cross-attn      # one protocol run
    python custom_train.py --list-methods                         # what --method accepts
    python custom_train.py --scale large --method adanorm --count-params

Everything fixed by ../shared/PROTOCOL.md is the default; every option that changes it is recorded in
config.json / results.json under "protocol_deviations". Read top to bottom: constants, model, data,
diffusion and evaluation, checkpoints, command line, and then the training loop in main().
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import hashlib
import json
import math
import os
import pickle
import platform
import random
import shutil
import sys
import tempfile
import time
import urllib.error
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import conditioning
import proxy

# --------------------------------------------------------------------------------------------
# The protocol (../shared/PROTOCOL.md): every default below is the published setting.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    block_out_channels: tuple[int, ...]
    norm_num_groups: int
    batch_size: int


SCALES = {
    # tiny is not a protocol scale: a narrow backbone for CPU tests and demos.
    "tiny": Scale((16, 32, 32, 32), 8, 64),
    "small": Scale((64, 128, 128, 128), 32, 128),
    "medium": Scale((128, 256, 256, 256), 32, 128),
    "large": Scale((256, 512, 512, 512), 32, 64),
}

PROTOCOL = dict(  # option name -> protocol value (batch_size and eval_every depend on the scale/steps)
    dataset="cifar10", steps=35_000, seed=42, lr=2e-4, lr_cooldown=0, weight_decay=1e-4, grad_clip=1.0,
    ema_decay=0.9995, ema_eval_start=20_000, precision="fp16", hflip=True, ddim_steps=50,
    fid="clean", fid_samples=50_000, final_fid_samples=50_000, ignore_budget=False,
)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
TRAIN_TIMESTEPS, BETA_START, BETA_END = 1000, 1e-4, 2e-2
NUM_CLASSES = 10
BUDGET_FACTOR = 1.05  # a method may have at most int(1.05 x cross-attn's parameters) at a scale

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"


class HarnessError(Exception):
    """A problem the user can fix; printed as one line, exit status 1."""


# --------------------------------------------------------------------------------------------
# Model: diffusers' UNet2DModel (DDPM CIFAR-10 architecture) + class embedding + conditioners.
# --------------------------------------------------------------------------------------------

def build_unet(scale: str, image_size: int = 32):
    from diffusers import UNet2DModel

    s = SCALES[scale]
    return UNet2DModel(
        sample_size=image_size, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=s.block_out_channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=s.norm_num_groups, norm_eps=1e-6, act_fn="silu",
        time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
    )


class ConditionedUNet(nn.Module):
    """The UNet with the class injected by a method: through the time path and after every block."""

    def __init__(self, unet, method: conditioning.Method, num_classes: int = NUM_CLASSES):
        super().__init__()
        channels = list(unet.config.block_out_channels)
        self.cond_dim = unet.time_embedding.linear_2.out_features  # D = 4 * C0
        self.unet = unet
        self.prepare_conditioning = method.prepare_conditioning
        self.class_embedding = nn.Embedding(num_classes, self.cond_dim)
        self.down_cond = nn.ModuleList(method.conditioner(c, self.cond_dim) for c in channels)
        self.mid_cond = method.conditioner(channels[-1], self.cond_dim)
        self.up_cond = nn.ModuleList(method.conditioner(c, self.cond_dim) for c in reversed(channels))

    def conditioner_sites(self):
        """(name, module, channels) for every post-block conditioner, in forward order."""
        channels = list(self.unet.config.block_out_channels)
        sites = [(f"down[{i}]", m, c) for i, (m, c) in enumerate(zip(self.down_cond, channels))]
        sites.append(("mid", self.mid_cond, channels[-1]))
        sites += [(f"up[{i}]", m, c) for i, (m, c) in enumerate(zip(self.up_cond, reversed(channels)))]
        return sites

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        u = self.unet
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        time_emb = u.time_embedding(u.time_proj(t).to(x.dtype))
        class_emb = self.class_embedding(y)
        emb = self.prepare_conditioning(time_emb, class_emb)

        h = u.conv_in(x)
        skips = (h,)
        for block, cond in zip(u.down_blocks, self.down_cond):
            h, block_skips = block(hidden_states=h, temb=emb)
            h = cond(h, class_emb)
            skips += block_skips[:-1] + (h,)  # the up path sees the conditioned output
        h = self.mid_cond(u.mid_block(h, emb), class_emb)
        for block, cond in zip(u.up_blocks, self.up_cond):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            h = cond(block(h, block_skips, emb), class_emb)
        return u.conv_out(u.conv_act(u.conv_norm_out(h)))


def get_method(name: str) -> conditioning.Method:
    if name not in conditioning.METHODS:
        raise HarnessError(f"unknown --method '{name}'; choose one of: {', '.join(conditioning.METHODS)} "
                           "(python custom_train.py --list-methods)")
    return conditioning.METHODS[name]


def build_model(scale: str, method_name: str, image_size: int = 32) -> ConditionedUNet:
    return ConditionedUNet(build_unet(scale, image_size), get_method(method_name))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def params_and_budget(scale: str, method_name: str) -> tuple[int, int]:
    """Parameters of the whole model (UNet + class embedding + conditioners) and the scale's budget.
    Built on the meta device: no memory, no initialisation cost."""
    with torch.device("meta"):
        params = count_params(build_model(scale, method_name))
        reference = count_params(build_model(scale, "cross-attn"))
    return params, int(BUDGET_FACTOR * reference)


def check_method_contract(model: ConditionedUNet, method_name: str, device) -> None:
    """Fail early, with one line naming the method, when it breaks the two-function contract."""
    batch, dim = 2, model.cond_dim
    prefix = f"method '{method_name}'"
    with torch.no_grad():
        time_emb, class_emb = torch.randn(batch, dim, device=device), torch.randn(batch, dim, device=device)
        try:
            emb = model.prepare_conditioning(time_emb, class_emb)
        except Exception as e:
            raise HarnessError(f"{prefix}: prepare_conditioning raised {type(e).__name__}: {e}") from e
        if not isinstance(emb, torch.Tensor) or tuple(emb.shape) != (batch, dim):
            got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise HarnessError(f"{prefix}: prepare_conditioning must return [B, D] = [{batch}, {dim}], got {got}")
        for site, module, channels in model.conditioner_sites():
            h = torch.randn(batch, channels, 8, 8, device=device)
            try:
                out = module(h, class_emb)
            except Exception as e:
                raise HarnessError(f"{prefix}: ClassConditioner({channels}, {dim}) at {site} raised "
                                   f"{type(e).__name__}: {e}") from e
            if not isinstance(out, torch.Tensor) or out.shape != h.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise HarnessError(f"{prefix}: ClassConditioner({channels}, {dim}) at {site} must return its "
                                   f"input's shape {tuple(h.shape)}, got {got}")


# --------------------------------------------------------------------------------------------
# Data: CIFAR-10 in its python-pickle layout, parsed with numpy, kept on the training device.
# --------------------------------------------------------------------------------------------

def download_cifar10(data_dir: Path) -> None:
    """torchvision's download (md5-checked), extracted aside and renamed into place, so that an
    interrupted extraction never leaves a half-filled cifar-10-batches-py/ behind."""
    from torchvision.datasets.utils import download_and_extract_archive

    folder = data_dir / CIFAR10_FOLDER
    print(f"CIFAR-10 not found in {folder}; downloading {CIFAR10_URL}", file=sys.stderr)
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=data_dir))
    try:
        download_and_extract_archive(CIFAR10_URL, download_root=str(data_dir), extract_root=str(staging), md5=CIFAR10_MD5)
        if not (staging / CIFAR10_FOLDER).is_dir():
            raise HarnessError(f"the CIFAR-10 archive did not contain {CIFAR10_FOLDER}/; delete {data_dir} and retry")
        os.replace(staging / CIFAR10_FOLDER, folder)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad checksum a RuntimeError
        raise HarnessError(
            f"CIFAR-10 is expected in {folder} and could not be downloaded ({type(e).__name__}: {e}); "
            f"run once with internet (or `python custom_train.py --prefetch --data-dir {data_dir} --fid-cache DIR` "
            f"on a machine that has it), or extract cifar-10-python.tar.gz from {CIFAR10_URL} into {data_dir}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def download_lock(what: str):
    """Hold an exclusive lock on this machine while fetching `what`: parallel runs
    (run_all_scales.sh --gpus) and torchrun ranks that all find an asset missing download it once;
    the others wait, then find it in place."""
    with open(Path(tempfile.gettempdir()) / f"class-cond-ddpm-{what}-{os.getuid()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def load_cifar10(data_dir: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 images [N, 3, 32, 32], int64 labels [N], class names. Downloads only if the folder is missing."""
    folder = Path(data_dir) / CIFAR10_FOLDER
    with download_lock("cifar10"):
        if not folder.is_dir():
            download_cifar10(Path(data_dir))

    def read(name):
        path = folder / name
        if not path.is_file():
            raise HarnessError(f"CIFAR-10 folder {folder} is incomplete: {name} is missing "
                               f"(delete the folder to download it again)")
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="bytes")
        except Exception as e:
            raise HarnessError(f"{path} is not a CIFAR-10 pickle batch ({type(e).__name__}: {e}); "
                               f"delete {folder} to download it again") from e

    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]:
        batch = read(name)
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise HarnessError(f"{folder / name} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels'")
        data, lab = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(lab) != len(data):
            raise HarnessError(f"{folder / name}: expected uint8 data of shape [N, 3072] and N labels, got "
                               f"{data.dtype} {list(data.shape)} and {len(lab)} labels")
        if lab.size and (lab.min() < 0 or lab.max() >= NUM_CLASSES):
            raise HarnessError(f"{folder / name}: labels must lie in 0..9, found {lab.min()}..{lab.max()}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    meta = read("batches.meta")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"label_names", [])]
    if len(names) != NUM_CLASSES:
        raise HarnessError(f"{folder / 'batches.meta'}: expected 10 label_names, got {len(names)}")
    return np.concatenate(images), np.concatenate(labels), names


def load_dataset(args) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The training split as uint8 images [N, 3, S, S], int64 labels and class names."""
    if args.dataset == "digits":  # scikit-learn's bundled digits at 16x16: see proxy.py
        return proxy.load_digits("train")
    return load_cifar10(Path(args.data_dir), "train")


IMAGE_SIZE = {"cifar10": 32, "digits": proxy.DIGITS_SIZE}


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of one epoch, a pure function of (seed, epoch): resume needs only the step."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of values, stable across runs, processes and machines."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def generator(device, *parts) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


# --------------------------------------------------------------------------------------------
# Diffusion: DDPM training noise, DDIM sampling, quantisation, FID, sample grids.
# --------------------------------------------------------------------------------------------

def ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                         beta_schedule="linear", prediction_type="epsilon")


def ddim_scheduler(num_steps: int):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                      beta_schedule="linear", clip_sample=True, set_alpha_to_one=False,
                      timestep_spacing="leading", prediction_type="epsilon")
    s.set_timesteps(num_steps)  # 50 steps: 980, 960, ..., 0
    return s


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 exactly as the protocol: scale to [0, 255], clamp, truncate."""
    return ((x.float() * 0.5 + 0.5) * 255).clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def sample(model, labels: torch.Tensor, *, seed: int, tag: str, batch_size: int, ddim_steps: int,
           image_size: int, amp_dtype, device, desc: str = "sampling", rank: int = 0, world: int = 1) -> torch.Tensor:
    """DDIM (eta 0) samples for the given labels, as uint8 [N, 3, H, W] on the CPU (on every rank).

    Batch b's initial noise comes from its own generator (seed, tag, b), so the images depend on
    neither the device's global RNG nor on how many batches came before. With several processes,
    rank r samples batches r, r + world, ... and the batches are gathered in order: the images are
    the same whatever the number of processes."""
    scheduler = ddim_scheduler(ddim_steps)
    was_training = model.training
    model.eval()
    out = {}
    batches = range(math.ceil(len(labels) / batch_size))[rank::world]
    for b in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=len(batches) < 2 or rank > 0):
        y = labels[b * batch_size:(b + 1) * batch_size].to(device)
        x = torch.randn((len(y), 3, image_size, image_size), device=device,
                        generator=generator(device, seed, tag, b))
        for t in scheduler.timesteps:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                eps = model(x, t.to(device), y)
            x = scheduler.step(eps.float(), t, x, eta=0.0).prev_sample
        out[b] = quantize(x).cpu()
    model.train(was_training)
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, out)
        out = {b: images for shard in shards for b, images in shard.items()}
    return torch.cat([out[b] for b in sorted(out)])


def random_labels(n: int, batch_size: int, seed: int, tag: str) -> torch.Tensor:
    """Uniform random labels, drawn per sampling batch (as the protocol samples them)."""
    return torch.cat([torch.randint(0, NUM_CLASSES, (min(batch_size, n - b),), generator=generator("cpu", seed, tag, "labels", b))
                      for b in range(0, n, batch_size)])


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


def prefetch(data_dir: Path, fid_cache: Path) -> None:
    """Download everything a run needs (CIFAR-10, the Inception weights, the reference statistics),
    for machines that have internet; runs elsewhere then use --data-dir and --fid-cache."""
    from cleanfid.downloads_helper import check_download_inception, check_download_url

    load_cifar10(data_dir)
    fid_cache.mkdir(parents=True, exist_ok=True)
    for name, fetch in ((INCEPTION_FILE, lambda d: check_download_inception(fpath=str(d))),
                        (FID_STATS_FILE, lambda d: check_download_url(local_folder=str(d), url=FID_STATS_URL))):
        if (fid_cache / name).is_file():
            continue
        partial = fid_cache / f".partial-{os.getpid()}"  # clean-fid writes in place: download aside, then rename
        partial.mkdir(exist_ok=True)
        try:
            fetch(partial)
            os.replace(partial / name, fid_cache / name)
        except OSError as e:
            raise HarnessError(f"could not download {name} into {fid_cache} ({type(e).__name__}: {e})") from e
        finally:
            for leftover in partial.iterdir():
                leftover.unlink()
            partial.rmdir()
    print(f"ready: {Path(data_dir) / CIFAR10_FOLDER}, {fid_cache / INCEPTION_FILE}, {fid_cache / FID_STATS_FILE}")


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


class CleanFID:
    """FID exactly as clean-fid computes it for a generator: its "clean" resize (PIL bicubic on float
    images), its Inception features, its Frechet distance, against its CIFAR-10 train statistics at 32.

    resize="torch" replaces clean-fid's per-image PIL resize by clean_resize_torch (equal within 1e-3,
    tested) on the device; everything else is unchanged. Built before training, so that a missing
    download fails in the first second, not after 35k steps."""

    def __init__(self, device, fid_cache: Path | None = None, resize: str = "pil"):
        from cleanfid.features import get_reference_statistics

        self.device, self.resize = device, resize
        if fid_cache is not None:
            missing = missing_fid_assets(fid_cache)
            if missing:
                raise HarnessError(f"--fid-cache {fid_cache} lacks {', '.join(str(m) for m in missing)}; on a machine "
                                   f"with internet run `python custom_train.py --prefetch --fid-cache {fid_cache}` and "
                                   f"copy the folder here")
            stats = np.load(Path(fid_cache) / FID_STATS_FILE)
            self.ref_mu, self.ref_sigma = stats["mu"], stats["sigma"]
            self.extractor = load_fid_extractor(device, fid_cache)
            return
        try:
            with download_lock("clean-fid"):  # clean-fid writes its downloads in place: one process at a time
                self.ref_mu, self.ref_sigma = get_reference_statistics("cifar10", 32, mode="clean", split="train")
                self.extractor = load_fid_extractor(device)
        except (OSError, urllib.error.URLError) as e:
            raise HarnessError(f"clean-fid could not fetch its Inception weights or the CIFAR-10 reference statistics "
                               f"({type(e).__name__}: {e}); run `python custom_train.py --prefetch --fid-cache DIR` "
                               f"on a machine with internet and pass --fid-cache DIR, or pass --fid off") from e

    primary = "fid"

    @staticmethod
    def labels(n: int, batch_size: int, seed: int, tag: str) -> torch.Tensor:
        return random_labels(n, batch_size, seed, tag)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> dict:
        """images: uint8 [N, 3, 32, 32] (labels are not used by FID)."""
        from cleanfid.fid import frechet_distance, get_model_features

        n = len(images)
        if self.resize == "torch":
            with torch.no_grad():
                feats = np.concatenate([
                    self.extractor(clean_resize_torch(images[i:i + batch_size].to(self.device))).cpu().numpy()
                    for i in tqdm(range(0, n, batch_size), desc="FID features", leave=False)])
        else:
            def serve(z):  # clean-fid's generator hook: its batch index -> our already sampled images
                i = serve.calls * batch_size
                serve.calls += 1
                return images[torch.arange(i, i + batch_size) % n]  # the last batch wraps; clean-fid drops the extra
            serve.calls = 0
            feats = get_model_features(serve, self.extractor, mode="clean", num_gen=n, batch_size=batch_size,
                                       device=self.device, z_dim=1, desc="FID features")
        mu, sigma = np.mean(feats, axis=0), np.cov(feats, rowvar=False)
        return dict(fid=float(frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)), fid_samples=n)


class DigitsProxy(proxy.ProxyMetrics):
    """proxy_fd and class_acc (proxy.py) on class-balanced samples."""

    primary = "proxy_fd"

    @staticmethod
    def labels(n: int, batch_size: int, seed: int, tag: str) -> torch.Tensor:
        return proxy.balanced_labels(n)


def save_grid(images: torch.Tensor, class_names: list[str], per_class: int, path: Path, zoom: int = 2) -> None:
    """One row per class (label on the left), `per_class` samples per row, pixels zoomed by nearest."""
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    rows = images.reshape(NUM_CLASSES, per_class, 3, h, w).permute(0, 3, 1, 4, 2)  # class, y, k, x, rgb
    tiles = rows.reshape(NUM_CLASSES * h, per_class * w, 3).numpy()
    pic = Image.fromarray(tiles).resize((per_class * w * zoom, NUM_CLASSES * h * zoom), Image.NEAREST)
    margin = 80
    canvas = Image.new("RGB", (pic.width + margin, pic.height), "white")
    canvas.paste(pic, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(class_names):
        draw.text((4, c * h * zoom + h * zoom // 2 - 5), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Files: atomic writes, so a crash never leaves a half-written checkpoint or result.
# --------------------------------------------------------------------------------------------

def atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------

# Named presets (EDM2-style): each sets defaults; flags given on the command line still win.
PRESETS = {
    # The first command to run: tiny scale on the bundled digits, a few minutes on a laptop CPU.
    # Sized on a 2-core CPU (~0.2 s/step): about 4.5 minutes, class_acc > 0.8 for concat-film. The
    # higher lr and faster EMA make 1,200 steps enough; the EMA is sampled from the start.
    "demo": dict(scale="tiny", dataset="digits", steps=1200, batch_size=32, lr=3e-3, ema_decay=0.995,
                 ema_eval_start=0, fid_samples=0, final_fid_samples=500, ckpt_every=400, log_every=100),
}

# Options that must match for --resume to continue a run.
RESUME_KEYS = ("dataset", "scale", "method", "seed", "batch_size", "lr", "lr_cooldown", "weight_decay", "grad_clip",
               "ema_decay", "precision", "hflip", "image_size")
RESUME_DEFAULTS = dict(lr_cooldown=0)  # options added later: what checkpoints made before them used


def parse_args(argv=None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=list(PRESETS), default=None)
    preset = pre.parse_known_args(argv)[0].preset
    p = argparse.ArgumentParser(
        description="Train and evaluate a class-conditional DDPM (diffusers UNet2DModel) on CIFAR-10 with a "
                    "chosen class-conditioning method. Defaults reproduce ../shared/PROTOCOL.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="named defaults; explicit flags override them. " + "; ".join(
                       f"{name}: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items())
                       for name, d in PRESETS.items()))
    g.add_argument("--scale", choices=list(SCALES), default="small",
                   help="backbone width: tiny (16,32,32,32; CPU tests/demos), small (64,128,128,128), "
                        "medium (128,256,256,256), large (256,512,512,512)")
    g.add_argument("--method", default="custom", help="conditioning method from conditioning.METHODS")
    g.add_argument("--list-methods", action="store_true", help="print the methods with one line each and exit")
    g.add_argument("--count-params", action="store_true",
                   help="print {scale, method, params, budget, within_budget} as JSON and exit (no data needed)")
    g.add_argument("--ignore-budget", action="store_true",
                   help="train a method over the parameter budget anyway (marked in the results)")
    g = p.add_argument_group("data and output")
    g.add_argument("--dataset", choices=["cifar10", "digits"], default="cifar10",
                   help="cifar10 (the protocol) or digits (scikit-learn's 8x8 digits at 16x16, no download, "
                        "no flips, scored by the proxy metrics: the CPU setting)")
    g.add_argument("--data-dir", default="data", help="where cifar-10-batches-py/ is (downloaded if missing)")
    g.add_argument("--out-dir", default="runs", help="parent folder of run directories")
    g.add_argument("--run-name", default=None,
                   help="run directory name (default: SCALE-METHOD-sSEED, prefixed by DATASET- if not cifar10)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in the run directory from its checkpoint (starts fresh if it has none)")
    g.add_argument("--ckpt-every", type=int, default=5000, help="steps between checkpoints (and at the end)")
    g.add_argument("--log-every", type=int, default=100, help="steps between log lines (the only host syncs)")
    g.add_argument("--save-samples", action=argparse.BooleanOptionalAction, default=None,
                   help="save the final evaluation's uint8 images and labels as samples.npz "
                        "(default: on for digits, off for cifar10)")
    g.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "class-cond-ddpm"),
                   help="where the digits proxy classifier is cached (keyed by a hash of its recipe)")
    g = p.add_argument_group("training (protocol values by default)")
    g.add_argument("--steps", type=int, default=PROTOCOL["steps"], help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=None,
                   help="global batch (default: the scale's: tiny 64, small 128, medium 128, large 64)")
    g.add_argument("--seed", type=int, default=PROTOCOL["seed"], help="seed of init, data order, noise, sampling")
    g.add_argument("--lr", type=float, default=PROTOCOL["lr"], help="AdamW learning rate (no warm-up)")
    g.add_argument("--lr-cooldown", type=int, default=PROTOCOL["lr_cooldown"],
                   help="decay the learning rate linearly to 0 over the last N steps (0: constant, the protocol); "
                        "the decay is placed by --steps, so a run resumed in its cooldown keeps its --steps")
    g.add_argument("--weight-decay", type=float, default=PROTOCOL["weight_decay"], help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=PROTOCOL["grad_clip"], help="gradient-norm clipping")
    g.add_argument("--ema-decay", type=float, default=PROTOCOL["ema_decay"], help="EMA rate, updated every step")
    g.add_argument("--ema-eval-start", type=int, default=PROTOCOL["ema_eval_start"],
                   help="evaluations at steps before this sample the raw network, after it the EMA")
    g.add_argument("--no-hflip", dest="hflip", action="store_false", help="disable random horizontal flips")
    g.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default=None,
                   help="autocast dtype (fp16 uses a gradient scaler); default fp16 on CUDA, fp32 on CPU")
    g.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu; under torchrun each rank takes "
                        "cuda:LOCAL_RANK, or gloo on CPU)")
    g = p.add_argument_group("speed (same arithmetic up to rounding; recorded as speed_options)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model for training (falls back to eager with a message if it fails)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format for the UNet")
    g.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls and convolutions on CUDA")
    g.add_argument("--fused-adam", action="store_true", help="fused AdamW kernel instead of the foreach one")
    g = p.add_argument_group("evaluation (protocol values by default)")
    g.add_argument("--fid", choices=["clean", "proxy", "off"], default=None,
                   help="clean: clean-fid vs CIFAR-10 train statistics at 32; proxy: proxy_fd and class_acc from "
                        "the digits classifier (proxy.py); off: sample grids only (default: clean for cifar10, "
                        "proxy for digits)")
    g.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations (default: one evaluation, at the last step)")
    g.add_argument("--fid-samples", type=int, default=PROTOCOL["fid_samples"],
                   help="samples per evaluation during training (gives best_fid)")
    g.add_argument("--final-fid-samples", type=int, default=PROTOCOL["final_fid_samples"],
                   help="samples of the independent final evaluation (gives fid); 0 skips it")
    g.add_argument("--fid-cache", type=Path, default=None,
                   help="folder holding clean-fid's Inception weights and CIFAR-10 statistics (see --prefetch); "
                        "runs given it never touch the network (default: clean-fid downloads on first use)")
    g.add_argument("--fid-resize", choices=["auto", "pil", "torch"], default="auto",
                   help="pil: clean-fid's per-image PIL resize; torch: the same bicubic as matrix products on the "
                        "device, in batches (within 1e-3 of PIL); auto: torch on CUDA, pil elsewhere")
    g.add_argument("--prefetch", action="store_true",
                   help="download CIFAR-10 into --data-dir and the FID assets into --fid-cache, then exit")
    g.add_argument("--ddim-steps", type=int, default=PROTOCOL["ddim_steps"], help="DDIM sampling steps")
    g.add_argument("--sample-batch-size", type=int, default=500, help="images per sampling batch")
    g.add_argument("--grid-per-class", type=int, default=10, help="samples per class row in the grid PNGs")
    if preset:
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    args.image_size = IMAGE_SIZE[args.dataset]
    return args


def resolve_defaults(args) -> None:
    """Fill the defaults that depend on other options, then validate (one clear line per problem)."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise HarnessError(f"--device {args.device!r} is not a torch device ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"--device {args.device} asked for CUDA, but torch sees no GPU; use --device cpu")
    args.batch_size = args.batch_size or SCALES[args.scale].batch_size
    args.precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    args.eval_every = args.eval_every or args.steps
    digits = args.dataset == "digits"
    args.fid = args.fid or ("proxy" if digits else "clean")
    args.save_samples = digits if args.save_samples is None else args.save_samples
    if args.fid_resize == "auto":
        args.fid_resize = "torch" if device.type == "cuda" else "pil"
    if digits and args.hflip:
        args.hflip = False  # a mirrored digit is not a digit (and no protocol applies to this dataset)
    if args.fid == "proxy" and not digits:
        raise HarnessError("--fid proxy scores digits only; use --dataset digits, or --fid clean for cifar10")
    if args.fid == "clean" and digits:
        raise HarnessError("--fid clean compares with CIFAR-10 statistics; digits runs use --fid proxy (or off)")
    prefix = "" if args.dataset == "cifar10" else f"{args.dataset}-"
    args.run_name = args.run_name or f"{prefix}{args.scale}-{args.method}-s{args.seed}"
    for name in ("steps", "batch_size", "ckpt_every", "log_every", "eval_every", "ddim_steps",
                 "sample_batch_size", "grid_per_class"):
        if getattr(args, name) <= 0:
            raise HarnessError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("fid_samples", "final_fid_samples"):
        if getattr(args, name) < 0:
            raise HarnessError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.fid != "off" and 0 < min(args.fid_samples or 2, args.final_fid_samples or 2) < 2:
        raise HarnessError("FID needs at least 2 samples (a covariance); raise --fid-samples/--final-fid-samples")
    if not 0 <= args.lr_cooldown <= args.steps:
        raise HarnessError(f"--lr-cooldown must lie in [0, --steps={args.steps}], got {args.lr_cooldown}")
    if not 0 <= args.ema_decay < 1:
        raise HarnessError(f"--ema-decay must lie in [0, 1), got {args.ema_decay}")


def protocol_deviations(args) -> list[str]:
    """Every option whose value differs from the published protocol, as 'name=value (protocol: x)'."""
    protocol = dict(PROTOCOL, batch_size=SCALES[args.scale].batch_size, eval_every=args.steps)
    deviations = ["scale=tiny (protocol: small, medium or large)"] if args.scale == "tiny" else []
    deviations += [f"{name}={getattr(args, name)} (protocol: {value})"
                   for name, value in protocol.items() if getattr(args, name) != value]
    return deviations


def learning_rate(step: int, args) -> float:
    """The lr of optimizer step ``step`` (1-based): constant, then with --lr-cooldown N a linear decay over
    the last N steps (lr at the first of them, lr / N at the last)."""
    return args.lr * min(1.0, (args.steps - step + 1) / args.lr_cooldown) if args.lr_cooldown else args.lr


def train_step(train_model, xt, t, y, noise, optimizer, scaler, params, *, amp_dtype, grad_clip):
    """Forward under autocast, epsilon MSE, backward, unscale, clip, step (the fp16 scaler skips the
    step when the gradients overflowed). Returns the loss and the gradient norm, without a host sync."""
    with torch.autocast(xt.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        pred = train_model(xt, t, y)
    loss = F.mse_loss(pred.float(), noise)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


def init_distributed(args) -> tuple[int, int]:
    """(rank, world size). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; a plain launch is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if args.batch_size % world:
        raise HarnessError(f"the global --batch-size {args.batch_size} is not divisible by {world} processes")
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def speed_options(args) -> list[str]:
    """The options that change speed but not the protocol's arithmetic (beyond rounding)."""
    return [name for name in ("compile", "channels_last", "tf32", "fused_adam") if getattr(args, name)]


# --------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------

def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.list_methods:
        width = max(map(len, conditioning.METHODS))
        for name, m in conditioning.METHODS.items():
            print(f"{name:<{width}}  {m.summary}")
        return None
    get_method(args.method)
    if args.count_params:
        params, budget = params_and_budget(args.scale, args.method)
        result = dict(scale=args.scale, method=args.method, params=params, budget=budget,
                      within_budget=params <= budget)
        print(json.dumps(result))
        return result

    if args.prefetch:
        if args.fid_cache is None:
            raise HarnessError("--prefetch needs --fid-cache DIR: the folder that runs will be given")
        prefetch(Path(args.data_dir), args.fid_cache)
        return None
    resolve_defaults(args)
    rank, world = init_distributed(args)
    try:
        return train(args, rank, world)
    finally:
        if world > 1:
            dist.destroy_process_group()


def train(args, rank: int, world: int) -> dict:
    """One run: rank 0 writes every file; with several processes each takes a slice of every global
    batch (the batch, its noise and its flips are drawn whole, so the run does not depend on world)."""
    is_main = rank == 0
    device = torch.device(args.device)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run_dir = Path(args.out_dir) / args.run_name
    ckpt_path, results_path = run_dir / "checkpoint.pt", run_dir / "results.json"
    if results_path.exists():
        if args.resume:  # --resume brings a run to completion; a finished one has nothing left to do
            print(f"{run_dir} is finished ({results_path.name}); nothing to resume", file=sys.stderr)
            return json.loads(results_path.read_text())
        raise HarnessError(f"{run_dir} holds a finished run ({results_path.name}); choose another --run-name "
                           f"or --out-dir")
    resuming = args.resume and ckpt_path.exists()
    if ckpt_path.exists() and not args.resume:
        raise HarnessError(f"{run_dir} already holds a run's checkpoint; pass --resume to continue it, or choose "
                           f"another --run-name")

    # Model, the method's contract, and its budget: all checked before any data is touched.
    torch.manual_seed(args.seed)
    model = build_model(args.scale, args.method, args.image_size).to(device)
    check_method_contract(model, args.method, device)
    params, budget = params_and_budget(args.scale, args.method)
    if params > budget and not args.ignore_budget:
        raise HarnessError(f"method '{args.method}' has {params:,} parameters at scale {args.scale}, over the "
                           f"budget of {budget:,} (1.05 x cross-attn); shrink it or pass --ignore-budget")
    ema = copy.deepcopy(model).requires_grad_(False)
    model_params, ema_params = list(model.parameters()), list(ema.parameters())

    images, labels, class_names = load_dataset(args)
    images, labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    if len(images) < args.batch_size:
        raise HarnessError(f"--batch-size {args.batch_size} is larger than the dataset ({len(images)} images)")
    batches_per_epoch = len(images) // args.batch_size  # the incomplete last batch of an epoch is dropped
    per_rank = args.batch_size // world
    scorer = None
    if is_main and args.fid != "off":  # rank 0 scores the gathered samples
        try:
            scorer = CleanFID(device, args.fid_cache, args.fid_resize) if args.fid == "clean" else \
                DigitsProxy(args.cache_dir, device)
        except proxy.ProxyError as e:
            raise HarnessError(str(e)) from e

    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                                  weight_decay=args.weight_decay,  # foreach: CUDA's default, on CPU too
                                  **(dict(fused=True) if args.fused_adam else dict(foreach=True)))
    noise_scheduler = ddpm_scheduler()

    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
              if k not in ("list_methods", "count_params", "resume", "prefetch")}
    step, train_time, evals = 0, 0.0, []
    if resuming:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        for key in RESUME_KEYS:
            made_with = ckpt["config"].get(key, RESUME_DEFAULTS.get(key))
            if made_with != config[key]:
                raise HarnessError(f"--resume: the checkpoint in {run_dir} was made with {key}="
                                   f"{made_with}, not {config[key]}; pass the same options")
        if args.lr_cooldown and ckpt["config"]["steps"] != args.steps:
            raise HarnessError(f"--resume: the checkpoint was made with steps={ckpt['config']['steps']}, not "
                               f"{args.steps}; with --lr-cooldown the steps place the decay, so pass the same --steps")
        if ckpt["step"] > args.steps:
            raise HarnessError(f"--resume: the checkpoint is at step {ckpt['step']}, past --steps {args.steps}")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_states(ckpt["rng"])
        step, train_time, evals = ckpt["step"], ckpt["train_time"], ckpt["evals"]
        if is_main:
            print(f"resumed {run_dir} at step {step}", file=sys.stderr)
    config.update(params=params, budget=budget, protocol_deviations=protocol_deviations(args),
                  speed_options=speed_options(args), world_size=world)
    log_path = run_dir / "log.jsonl"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", config)
        if resuming and log_path.exists():  # drop log lines written after the checkpoint we resume from
            kept = [l for l in log_path.read_text().splitlines() if json.loads(l)["step"] <= step]
            atomic_write(log_path, lambda f: f.write("".join(l + "\n" for l in kept).encode()))
    log_file = open(log_path, "a") if is_main else None

    def log(record):
        if is_main:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def save_checkpoint():
        if is_main:
            state = dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                         scaler=scaler.state_dict(), step=step, rng=rng_states(), config=config,
                         train_time=train_time, evals=evals)
            atomic_write(ckpt_path, lambda f: torch.save(state, f))
        if world > 1:
            dist.barrier()

    # What the training step calls: the model, in channels_last, wrapped for DDP, compiled, as asked.
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    train_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if args.compile:
        try:
            compiled = torch.compile(train_model)
            probe = torch.zeros(per_rank, 3, args.image_size, args.image_size, device=device)
            zeros = torch.zeros(per_rank, dtype=torch.long, device=device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = compiled(probe, zeros, zeros)
            out.float().sum().mul(0).backward()  # compile forward and backward now, not mid-run (and let DDP
            model.zero_grad(set_to_none=True)    # finish its reduction); the zero gradients are dropped
            train_model = compiled
        except Exception as e:
            print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                  f"training eagerly", file=sys.stderr)

    def evaluate(tag: str, num_samples: int) -> dict:
        """Grid (always) and FID (if on) from the EMA weights, or the raw ones before --ema-eval-start."""
        net = ema if step >= args.ema_eval_start else model
        kw = dict(seed=args.seed, batch_size=args.sample_batch_size, ddim_steps=args.ddim_steps,
                  image_size=args.image_size, amp_dtype=amp_dtype, device=device, rank=rank, world=world)
        grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(args.grid_per_class)
        grid = sample(net, grid_labels, tag="grid", desc="grid", **kw)  # the same noise at every evaluation
        grid_name = f"grid_{tag}.png"
        if is_main:
            save_grid(grid, class_names, args.grid_per_class, run_dir / grid_name)
        record = dict(step=step, eval=tag, weights="ema" if net is ema else "raw", grid=grid_name)
        if args.fid != "off" and num_samples > 0:
            labeller = CleanFID if args.fid == "clean" else DigitsProxy
            sample_labels = labeller.labels(num_samples, args.sample_batch_size, args.seed, tag)
            images_out = sample(net, sample_labels, tag=tag, desc=f"sampling {num_samples}", **kw)
            if is_main:
                record.update(scorer(images_out, sample_labels))
            if is_main and args.save_samples and tag == "final":
                atomic_write(run_dir / "samples.npz", lambda f: np.savez_compressed(
                    f, images=images_out.permute(0, 2, 3, 1).numpy(), labels=sample_labels.numpy()))
        log(record)
        return record

    # The training loop.
    model.train()
    pbar = tqdm(total=args.steps, initial=step, desc=run_dir.name, dynamic_ncols=True, unit="step", disable=not is_main)
    loss_sum = torch.zeros((), device=device)
    grad_norm_sum = torch.zeros((), device=device)
    interval_steps, interval_start = 0, time.perf_counter()
    order, order_epoch = None, -1
    while step < args.steps:
        if order_epoch != step // batches_per_epoch:
            order_epoch = step // batches_per_epoch
            order = epoch_order(args.seed, order_epoch, len(images)).to(device)
        idx = order[(step % batches_per_epoch) * args.batch_size:][:args.batch_size]
        step += 1
        # The global batch's flips, timesteps and noise, drawn whole, then this rank's slice of them.
        rng = generator(device, args.seed, "train", step)
        shape = (args.batch_size, 3, args.image_size, args.image_size)
        flip = torch.rand(args.batch_size, device=device, generator=rng) < 0.5 if args.hflip else None
        t = torch.randint(0, TRAIN_TIMESTEPS, (args.batch_size,), device=device, generator=rng)
        noise = torch.randn(shape, device=device, generator=rng)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        idx, t, noise = idx[mine], t[mine], noise[mine]
        x0 = images[idx].float() / 127.5 - 1
        if flip is not None:
            x0 = torch.where(flip[mine, None, None, None], x0.flip(3), x0)
        xt = noise_scheduler.add_noise(x0, noise, t)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        if args.channels_last:
            xt = xt.contiguous(memory_format=torch.channels_last)
        loss, grad_norm = train_step(train_model, xt, t, labels[idx], noise, optimizer, scaler, model_params,
                                     amp_dtype=amp_dtype, grad_clip=args.grad_clip)
        torch._foreach_lerp_(ema_params, model_params, 1 - args.ema_decay)
        loss_sum += loss
        grad_norm_sum += grad_norm
        interval_steps += 1
        pbar.update(1)

        is_last = step == args.steps
        # a last-step evaluation without samples would only repeat the final evaluation's grid
        evaluating = (step % args.eval_every == 0 or is_last) and not (is_last and args.fid_samples == 0)
        checkpointing = step % args.ckpt_every == 0 or is_last
        if step % args.log_every == 0 or evaluating or checkpointing:
            elapsed = time.perf_counter() - interval_start
            train_time += elapsed
            if world > 1:  # every rank sees the same mean loss, so all stop together on a non-finite one
                dist.all_reduce(loss_sum)
                loss_sum /= world
            mean_loss = (loss_sum / interval_steps).item()
            if not math.isfinite(mean_loss) and not scaler.is_enabled():
                pbar.close()
                raise HarnessError(f"the loss became non-finite ({mean_loss}) between steps {step - interval_steps} "
                                   f"and {step}; the last good checkpoint is kept in {ckpt_path} (try a lower --lr "
                                   f"or --precision fp16)")
            log(dict(step=step, loss=mean_loss, lr=optimizer.param_groups[0]["lr"],
                     grad_norm=(grad_norm_sum / interval_steps).item(),
                     images_per_s=interval_steps * args.batch_size / elapsed))
            pbar.set_postfix(loss=f"{mean_loss:.4f}")
            loss_sum.zero_(), grad_norm_sum.zero_()
            interval_steps = 0
            if evaluating:
                evals.append(evaluate(f"step{step:06d}", args.fid_samples))
            if checkpointing:
                save_checkpoint()
            interval_start = time.perf_counter()
    pbar.close()

    # The final, independent evaluation, then the results (written last, atomically).
    final = evaluate("final", args.final_fid_samples)
    if not is_main:
        return None
    primary = scorer.primary if scorer is not None else "fid"
    scored = [e for e in evals if primary in e]
    best = min(scored, key=lambda e: e[primary]) if scored else {}
    results = dict(scale=args.scale, method=args.method, dataset=args.dataset, seed=args.seed,
                   best_fid=None, best_fid_step=None, fid=None, fid_samples=None)
    results.update({f"best_{primary}": best.get(primary), f"best_{primary}_step": best.get("step")})
    results.update({k: v for k, v in final.items() if k not in ("step", "eval", "weights", "grid")})
    results.update(
        fid_resize=args.fid_resize if args.fid == "clean" else None, speed_options=config["speed_options"],
        world_size=world,
        evals=evals + [final], grid=final["grid"], params=params, budget=budget, within_budget=params <= budget,
        steps=step, train_time_s=train_time, images_per_s=step * args.batch_size / max(train_time, 1e-9),
        protocol_deviations=config["protocol_deviations"],
        versions=dict(torch=torch.__version__, diffusers=version("diffusers"), clean_fid=version("clean-fid"),
                      python=platform.python_version()),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    )
    write_json(results_path, results)
    log_file.close()
    shown = ["best_fid", "best_fid_step", "fid", "proxy_fd", "class_acc", "params", "steps", "images_per_s"]
    print(f"\n{run_dir}")
    for key in shown:
        if results.get(key) is not None:
            value = results[key]
            print(f"  {key:<14} {value:,.4f}" if isinstance(value, float) else f"  {key:<14} {value:,}")
    print(f"  {'grid':<14} {run_dir / final['grid']}")
    return results


if __name__ == "__main__":
    try:
        main()
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
