"""Class-conditional DDPM on CIFAR-10: the published protocol, with the conditioning method swapped in.

    python custom_train.py --preset demo                          # a few minutes on any CPU, no download
    python custom_train.py --scale small --method cross-attn      # one protocol run (a GPU)
    python custom_train.py --scale small --method ideas/class_gain.py   # a method kept in a file of its own
    python custom_train.py --scale small --method custom --dry-run   # check a configuration, then exit
    python custom_train.py --list-methods

Every default is the published protocol (docs/protocol.md); every option that changes it is recorded in
config.json and results.json under "protocol_deviations". Read top to bottom: the options and the
protocol's constants, the model and the methods, data, diffusion and sampling, evaluation, run
directories and checkpoints, the command line, then train() as a short sequence of labelled steps.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import datetime
import hashlib
import importlib.util
import inspect
import json
import math
import os
import pickle
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import conditioning
import evaluation
import proxy

ROOT = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# The protocol's constants, and every option in one table: its default, its help, whether the
# default is the published setting, and whether it shapes the training or the evaluation's numbers.
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
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
TRAIN_TIMESTEPS, BETA_START, BETA_END = 1000, 1e-4, 2e-2
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the label of "no class" (classifier-free guidance): the class embedding's extra row
BUDGET_FACTOR = 1.05  # a method may have at most int(1.05 x cross-attn's parameters) at a scale
GRAD_SCALER_INIT_SCALE = 2.0 ** 16  # torch's default; a name so that tests can force fp16 overflows
# The fp16 scaler has collapsed when a whole log interval was skipped, at least this many steps in a row:
# the loss scale then fell by 2^32, far beyond any warm-up, and the overflow is the network's own.
SCALER_COLLAPSE_STEPS = 32

SAME = object()       # Option.protocol: the default is the published setting
BY_SCALE = object()   # ... the published setting is the scale's (batch size)
BY_STEPS = object()   # ... the published setting is --steps (one evaluation, at the end)
NO_LEGACY = object()


@dataclass(frozen=True)
class Option:
    default: object
    help: str
    role: str = "run"         # "train": shapes the training (must match to resume); "eval": shapes the
                              # evaluation's numbers (must match to reuse results); "run": neither
    protocol: object = None   # the published value (SAME: the default), or None where the protocol is silent
    legacy: object = NO_LEGACY  # the value that runs made before the option existed used
    kw: dict = field(default_factory=dict)  # argparse: type, choices, action, flags, metavar


def flag(**kw):
    return kw


def guidance_scales(text: str) -> list[float]:
    """'1,1.5,3' -> [1.0, 1.5, 3.0]: distinct finite scales >= 0 (argparse reports a bad one)."""
    try:
        scales = [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,1.5,3, got {text!r}") from None
    if not all(math.isfinite(w) and w >= 0 for w in scales) or len(set(scales)) < len(scales):
        raise argparse.ArgumentTypeError(f"guidance scales must be distinct finite numbers >= 0, got {text!r}")
    return scales


def timestep_interval(text: str) -> list[int]:
    """'100,800' -> [100, 800]: timesteps LO <= HI within [0, 999]."""
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI such as 100,800, got {text!r}") from None
    if not 0 <= lo <= hi < TRAIN_TIMESTEPS:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI <= {TRAIN_TIMESTEPS - 1}, got {text!r}")
    return [lo, hi]


OPTIONS: dict[str, dict[str, Option]] = {
    "what to run": {
        "scale": Option("small", "backbone width: tiny (16,32,32,32; CPU tests and demos), small (64,128,128,128), "
                        "medium (128,256,256,256), large (256,512,512,512)", "train", kw=flag(choices=list(SCALES))),
        "method": Option("custom", "conditioning method: a name from --list-methods, or a path to a .py file that "
                         "defines prepare_conditioning and ClassConditioner", "train"),
        "list_methods": Option(False, "print the methods with one line each and exit", kw=flag(action="store_true")),
        "count_params": Option(False, "print {scale, method, params, budget, within_budget} as JSON and exit",
                               kw=flag(action="store_true")),
        "dry_run": Option(False, "print the resolved options, the protocol deviations, the parameter count and what "
                          "would happen to the run directory, then exit", kw=flag(action="store_true")),
        "evaluate": Option(None, "score a finished run again without training: sample RUN_DIR's checkpoint (EMA or "
                           "raw, as the protocol names for its step) with the run's own options, overridden by the "
                           "evaluation options given (e.g. --final-fid-samples), and write RUN_DIR/evaluation-DATE.json "
                           "(never overwriting; with the same samples and seeds, the run's own final numbers); "
                           "torchrun spreads the sampling", kw=flag(type=Path, metavar="RUN_DIR")),
        "ignore_budget": Option(False, "train a method over the parameter budget anyway (marked in the results)",
                                protocol=SAME, kw=flag(action="store_true")),
    },
    "data and output": {
        "dataset": Option("cifar10", "cifar10 (the protocol) or digits (scikit-learn's 8x8 digits at 16x16, no "
                          "download, no flips, scored by the proxy metrics: the CPU setting)", "train", SAME,
                          kw=flag(choices=["cifar10", "digits"])),
        "data_dir": Option("data", "where cifar-10-batches-py/ is (downloaded if missing)"),
        "out_dir": Option("runs", "parent folder of run directories"),
        "run_name": Option(None, "run directory name (default: SCALE-METHOD-sSEED, prefixed by DATASET- if not "
                           "cifar10; a custom or file method adds the first 8 hex digits of its code's sha256)"),
        "resume": Option(False, "continue the run in the run directory: resume its checkpoint, train a finished run "
                         "on to a larger --steps, or, if it finished with these very options and code, reuse it",
                         kw=flag(action="store_true")),
        "overwrite": Option(False, "delete whatever the run directory holds and start afresh",
                            kw=flag(action="store_true")),
        "ckpt_every": Option(5000, "steps between checkpoints (and at the end)", kw=flag(type=int)),
        "log_every": Option(100, "steps between log lines; with the default CUDA settings, the only host syncs of "
                            "the training loop", kw=flag(type=int)),
        "save_samples": Option(None, "save the final evaluation's uint8 images and labels as samples.npz (default: "
                               "on for digits, off for cifar10)", kw=flag(action=argparse.BooleanOptionalAction)),
        "cache_dir": Option(str(Path.home() / ".cache" / "class-cond-ddpm"),
                            "where the digits proxy classifier is cached (keyed by a hash of its recipe), and the CIFAR-10 "
                           "panel's assets when no --fid-cache is given"),
    },
    "training (protocol values by default)": {
        "steps": Option(35_000, "optimizer steps", "train", SAME, kw=flag(type=int)),
        "batch_size": Option(None, "global batch (default: the scale's: tiny 64, small 128, medium 128, large 64)",
                             "train", BY_SCALE, kw=flag(type=int)),
        "seed": Option(42, "seed of init, data order, noise and sampling", "train", SAME, kw=flag(type=int)),
        "lr": Option(2e-4, "AdamW learning rate (no warm-up)", "train", SAME, kw=flag(type=float)),
        "lr_cooldown": Option(0, "decay the learning rate linearly to 0 over the last N steps (0: constant, the "
                              "protocol); the decay is placed by --steps, so such a run keeps its --steps",
                              "train", SAME, legacy=0, kw=flag(type=int)),
        "cfg_dropout": Option(0.0, "classifier-free guidance training: each label is replaced by a null class with "
                              "this probability, drawn from the step's generator over the global batch (exact resume, "
                              "any number of processes); the null class is one more row of the class embedding "
                              "(counted in the parameters) when > 0; 0: the protocol", "train", SAME, legacy=0.0,
                              kw=flag(type=float)),
        "weight_decay": Option(1e-4, "AdamW weight decay (decoupled, on every parameter)", "train", SAME,
                               kw=flag(type=float)),
        "grad_clip": Option(1.0, "gradient-norm clipping, after unscaling", "train", SAME, kw=flag(type=float)),
        "ema_decay": Option(0.9995, "EMA rate, updated every step from step 1", "train", SAME, kw=flag(type=float)),
        "ema_eval_start": Option(20_000, "evaluations at steps before this sample the raw network, from it on the EMA",
                                 "eval", SAME, kw=flag(type=int)),
        "hflip": Option(True, "disable random horizontal flips", "train", SAME,
                        kw=flag(flags=("--no-hflip",), action="store_false")),
        "precision": Option(None, "autocast dtype; fp16 uses a gradient scaler (default: fp16 on CUDA, fp32 on CPU; "
                            "fp16 and bf16 also run on the CPU, with the CPU's autocast rules)", "train", "fp16",
                            kw=flag(choices=["fp16", "bf16", "fp32"])),
        "device": Option(None, "torch device (default: cuda if available, else cpu; under torchrun each rank takes "
                         "cuda:LOCAL_RANK, or gloo on CPU)"),
    },
    "speed and determinism (recorded; the arithmetic is the protocol's up to rounding)": {
        "compile": Option("off", "torch.compile the model for training: --compile (= default) compiles forward and "
                          "backward; --compile max also launches them as CUDA graphs (mode reduce-overhead, not "
                          "max-autotune), for small scales where an eager step is host-bound; compiled once, before "
                          "step 1, on the training input buffers themselves; falls back to eager with a message if "
                          "compilation fails", kw=flag(nargs="?", const="default", choices=["off", "default", "max"])),
        "channels_last": Option(False, "channels_last memory format for the model, its EMA and AdamW's state",
                                kw=flag(action="store_true")),
        "tf32": Option(False, "allow TF32 in fp32 matmuls and convolutions on CUDA (without it they run in true "
                       "fp32; torch 2.14 would otherwise use TF32 for convolutions); with fp16 or bf16 autocast it "
                       "affects only the ops autocast keeps in fp32; never the FID's Inception",
                       kw=flag(action="store_true")),
        "adam": Option("auto", "AdamW kernel: fused (no host sync with the fp16 scaler), foreach, or auto: fused on "
                       "CUDA, foreach elsewhere", kw=flag(choices=["auto", "fused", "foreach"])),
        "deterministic": Option(False, "deterministic GPU kernels (torch.use_deterministic_algorithms, "
                                "CUBLAS_WORKSPACE_CONFIG, no cuDNN benchmark): resume and reruns bit-exact on the "
                                "same GPU and software, at some speed", kw=flag(action="store_true")),
    },
    "evaluation (protocol values by default)": {
        "fid": Option(None, "clean: clean-fid vs CIFAR-10 train statistics at 32; proxy: proxy_fd and class_acc from "
                      "the digits classifier (proxy.py); off: sample grids and held-out metrics only (default: clean "
                      "for cifar10, proxy for digits)", "eval", "clean", kw=flag(choices=["clean", "proxy", "off"])),
        "eval_every": Option(None, "steps between evaluations (default: one evaluation, at the last step)",
                             protocol=BY_STEPS, kw=flag(type=int)),
        "fid_samples": Option(50_000, "samples per evaluation during training (gives best_fid)", "eval", SAME,
                              kw=flag(type=int)),
        "final_fid_samples": Option(50_000, "samples of the independent final evaluation (gives fid); 0 skips it",
                                    "eval", SAME, kw=flag(type=int)),
        "fid_cache": Option(None, "folder holding clean-fid's Inception weights and CIFAR-10 statistics, and the panel's "
                            "train features, per-class statistics and classifier (see --prefetch); runs given it never "
                            "touch the network", kw=flag(type=Path)),
        "fid_resize": Option("pil", "pil: clean-fid's own per-image PIL resize (the protocol); torch: the same bicubic "
                             "as matrix products on the device, in batches (within 1e-3 of PIL, much faster on a "
                             "GPU; a protocol deviation)", "eval", SAME, kw=flag(choices=["pil", "torch"])),
        "panel": Option(True, "on CIFAR-10, the class-conditional panel from the FID's own features: KID, intra-FID, "
                        "precision and recall (k = 3) against the train set, class accuracy of samples by a ResNet-9 "
                        "trained once; its assets are made once into --fid-cache (else --cache-dir), by --prefetch "
                        "too; --no-panel: FID alone (recorded as off unless --fid clean: digits runs always have "
                        "their proxy's panel)", "eval",
                        legacy=False, kw=flag(action=argparse.BooleanOptionalAction)),
        "prefetch": Option(False, "download CIFAR-10 into --data-dir and the FID assets into --fid-cache, make the "
                           "panel's assets there (on --device; minutes on a GPU, unless --no-panel), then exit",
                           kw=flag(action="store_true")),
        "ddim_steps": Option(50, "DDIM sampling steps", "eval", SAME, kw=flag(type=int)),
        "guidance": Option([1.0], "classifier-free guidance scales W1,W2,...: each evaluation samples at every scale "
                           "with the same noise and labels, eps = eps_null + w (eps_cond - eps_null) from one batched "
                           "forward; results hold every scale (the curve), and the best (by fid or proxy_fd), sampled "
                           "again from noise of its own, gives the headline numbers (a single scale: its own "
                           "samples); 1: no guidance (the protocol); "
                           "other scales need --cfg-dropout > 0",
                           "eval", SAME, legacy=[1.0], kw=flag(type=guidance_scales, metavar="W1,W2,...")),
        "guidance_interval": Option(None, "guide only at DDPM timesteps t with LO <= t <= HI (Kynkaanniemi et al. "
                                    "2024); the conditional prediction alone elsewhere (default: every step)", "eval",
                                    SAME, legacy=None, kw=flag(type=timestep_interval, metavar="LO,HI")),
        "guidance_samples": Option(None, "with several --guidance scales: score each on N samples, then the best "
                                   "again on the evaluation's full count (default: every scale on the full count)",
                                   "eval", legacy=None, kw=flag(type=int)),
        "sample_batch_size": Option(500, "images per sampling batch (each batch has its own noise seed)", "eval",
                                    kw=flag(type=int)),
        "grid_per_class": Option(10, "samples per class row in the grid PNGs", kw=flag(type=int)),
        "heldout_draws": Option(None, "(t, noise) draws per held-out image for heldout_loss; 0 turns the held-out "
                                "metrics off (default: 16 for digits, 2 for cifar10)", "eval", legacy=0,
                                kw=flag(type=int)),
        "label_draws": Option(None, "(t, noise) draws per held-out image for label_acc; 0 skips it (default: 8 for "
                              "digits, 1 for cifar10)", "eval", legacy=0, kw=flag(type=int)),
        "metric_seed": Option(0, "seed of the held-out metrics' draws (the same for every method and training seed)",
                              "eval", legacy=0, kw=flag(type=int)),
    },
}
ALL_OPTIONS = {name: opt for group in OPTIONS.values() for name, opt in group.items()}
# What must match for a checkpoint to be continued, and what else for a finished result to be reused.
TRAIN_KEYS = tuple(n for n, o in ALL_OPTIONS.items() if o.role == "train" and n != "steps") + ("image_size",
                                                                                                "method_sha256")
EVAL_KEYS = tuple(n for n, o in ALL_OPTIONS.items() if o.role == "eval")
HELDOUT_DEFAULTS = {"digits": dict(heldout_draws=16, label_draws=8), "cifar10": dict(heldout_draws=2, label_draws=1)}

# Named presets (EDM2-style): each sets defaults; flags given on the command line still win.
PRESETS = {
    # The first command to run: tiny scale on the bundled digits, a few minutes on a laptop CPU. The
    # higher lr and faster EMA make 1,200 steps enough; the EMA is sampled from the start.
    "demo": dict(scale="tiny", dataset="digits", steps=1200, batch_size=32, lr=3e-3, ema_decay=0.995,
                 ema_eval_start=0, fid_samples=0, final_fid_samples=500, ckpt_every=400, log_every=100),
}

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"


class HarnessError(Exception):
    """A problem the user can fix; printed as one line, exit status 1."""


PREEMPTED_EXIT = 3  # the exit status of a run stopped by a signal after writing its checkpoint (SLURM requeues it)


class Preempted(Exception):
    """SIGUSR1 or SIGTERM arrived; the checkpoint of the step named in the message is written."""


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

    def __init__(self, unet, method: conditioning.Method, num_classes: int = NUM_CLASSES, null_class: bool = False):
        super().__init__()
        channels = list(unet.config.block_out_channels)
        self.cond_dim = unet.time_embedding.linear_2.out_features  # D = 4 * C0
        self.unet = unet
        self.prepare_conditioning = method.prepare_conditioning
        # with classifier-free guidance, one more row: the null class (label num_classes), "no class"
        self.class_embedding = nn.Embedding(num_classes + null_class, self.cond_dim)
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


def is_method_file(name: str) -> bool:
    return name.endswith(".py")


_FILE_METHODS: dict[tuple[str, str], conditioning.Method] = {}


def load_method_file(path: str) -> conditioning.Method:
    """A method kept in its own file: the file defines prepare_conditioning and ClassConditioner (it may
    import anything from conditioning.py). Loaded once per content, so an edited file is loaded anew."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise HarnessError(f"--method {path}: no such file (a method is a name from --list-methods or a .py file)")
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    if (str(file), digest) not in _FILE_METHODS:
        # a stable module name: the method's recorded code must not depend on anything but the code
        spec = importlib.util.spec_from_file_location(f"method_file_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # inspect.getsource and pickling look modules up here
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise HarnessError(f"--method {path} failed to import ({type(e).__name__}: {e})") from e
        missing = [n for n in ("prepare_conditioning", "ClassConditioner") if not hasattr(module, n)]
        if missing:
            raise HarnessError(f"--method {path} must define prepare_conditioning and ClassConditioner; it lacks "
                               f"{' and '.join(missing)}")
        summary = (module.__doc__ or "").strip().splitlines()
        _FILE_METHODS[str(file), digest] = conditioning.Method(module.prepare_conditioning, module.ClassConditioner,
                                                               f"file {path}: " + (summary[0] if summary else ""))
    return _FILE_METHODS[str(file), digest]


def get_method(name: str) -> conditioning.Method:
    if is_method_file(name):
        return load_method_file(name)
    if name not in conditioning.METHODS:
        raise HarnessError(f"unknown --method '{name}'; choose one of: {', '.join(conditioning.METHODS)} "
                           "(python custom_train.py --list-methods), or give a path to a .py file")
    return conditioning.METHODS[name]


def method_code(name: str) -> str:
    """The source that a method runs: its prepare_conditioning and conditioner class and, recursively,
    every function, class and constant of conditioning.py or of the method's own file that they name.
    Editing anything else (another method, a comment outside these) leaves it unchanged."""
    method = get_method(name)
    local = {"conditioning", method.prepare_conditioning.__module__, method.conditioner.__module__}
    parts, stack = {}, [method.prepare_conditioning, method.conditioner]
    while stack:
        obj = stack.pop()
        key = f"{obj.__module__}.{obj.__qualname__}"
        if key in parts:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(obj))
        except (OSError, TypeError):
            parts[key] = f"# {key}: no source available\n"
            continue
        parts[key] = source
        namespace = vars(sys.modules[obj.__module__])
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Name) and node.id in namespace:
                found, label = namespace[node.id], f"{obj.__module__}.{node.id}"
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and inspect.ismodule(
                    namespace.get(node.value.id)) and namespace[node.value.id].__name__ in local:
                found = getattr(namespace[node.value.id], node.attr, None)
                label = f"{namespace[node.value.id].__name__}.{node.attr}"
            else:
                continue
            if (inspect.isfunction(found) or inspect.isclass(found)) and found.__module__ in local:
                stack.append(found)
            elif isinstance(found, (bool, int, float, str, tuple, frozenset)):
                parts.setdefault(label, f"{label} = {found!r}\n")
    return "".join(f"# --- {key}\n{parts[key]}\n" for key in sorted(parts))


def method_sha256(name: str) -> str:
    """sha256 of the method's code as Python sees it: method_code with comments, docstrings and layout
    normalised away (ast), so that rewording a docstring does not make a new method."""
    def strip(tree):
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        return tree
    return hashlib.sha256(ast.unparse(strip(ast.parse(method_code(name)))).encode()).hexdigest()


def build_model(scale: str, method_name: str, image_size: int = 32, null_class: bool = False) -> ConditionedUNet:
    method = get_method(method_name)
    unet = build_unet(scale, image_size)
    try:
        return ConditionedUNet(unet, method, null_class=null_class)
    except Exception as e:
        raise HarnessError(f"method '{method_name}': building its modules raised {type(e).__name__}: {e}") from e


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def params_and_budget(scale: str, method_name: str, null_class: bool = False) -> tuple[int, int]:
    """Parameters of the whole model (UNet + class embedding, with its null row if any + conditioners) and
    the scale's budget (the protocol's cross-attn, without one). Built on the meta device: no memory, no
    initialisation cost."""
    with torch.device("meta"):
        params = count_params(build_model(scale, method_name, null_class=null_class))
        reference = count_params(build_model(scale, "cross-attn"))
    return params, int(BUDGET_FACTOR * reference)


def check_method_contract(model: ConditionedUNet, method_name: str, device) -> None:
    """Fail early, with one line naming the method, when it breaks the two-function contract. Runs on
    copies of the conditioners and with its own random numbers: the model's buffers and every global
    RNG are left as they were."""
    batch, dim = 2, model.cond_dim
    prefix = f"method '{method_name}'"
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        time_emb = torch.randn(batch, dim, device=device, generator=g)
        class_emb = torch.randn(batch, dim, device=device, generator=g)
        try:
            emb = model.prepare_conditioning(time_emb, class_emb)
        except Exception as e:
            raise HarnessError(f"{prefix}: prepare_conditioning raised {type(e).__name__}: {e}") from e
        if not isinstance(emb, torch.Tensor) or tuple(emb.shape) != (batch, dim):
            got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise HarnessError(f"{prefix}: prepare_conditioning must return [B, D] = [{batch}, {dim}], got {got}")
        for site, module, channels in model.conditioner_sites():
            h = torch.randn(batch, channels, 8, 8, device=device, generator=g)
            try:
                out = copy.deepcopy(module)(h, class_emb)
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


def load_cifar10(data_dir: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 images [N, 3, 32, 32], int64 labels [N], class names, for split 'train' (data_batch_1..5) or
    'test' (test_batch). Downloads only if the folder is missing."""
    folder = Path(data_dir) / CIFAR10_FOLDER
    with evaluation.machine_lock("cifar10"):
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


def load_dataset(args, split: str = "train") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 images [N, 3, S, S], int64 labels and class names: the training split, or the held-out one
    (the digits' held-out 20%, CIFAR-10's test batch)."""
    if args.dataset == "digits":  # scikit-learn's bundled digits at 16x16: see proxy.py
        return proxy.load_digits("train" if split == "train" else "held-out")
    return load_cifar10(Path(args.data_dir), "train" if split == "train" else "test")


IMAGE_SIZE = {"cifar10": 32, "digits": proxy.DIGITS_SIZE}


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor onto the device without making the host wait: pinned, then an asynchronous copy (a
    plain copy from pageable memory waits until the GPU has finished everything queued before it)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of values, stable across runs, processes and machines."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def generator(device, *parts) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of one epoch, a pure function of (seed, epoch): resume needs only the step."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))


class TrainingBatches:
    """Step s's batch as a pure function of (seed, s): the images at the epoch's permutation (the
    incomplete last batch of an epoch is dropped), and the global batch's flips, timesteps, noise and
    (with --cfg-dropout) the labels replaced by the null class, drawn whole from a generator of
    (seed, "train", s); then this rank's slice. So resume needs only
    the step, and the run does not depend on the number of processes.

    Every call fills the same four input buffers in place and returns them: a compiled step then sees
    identical inputs (the compile probe is these very tensors, so nothing recompiles), and a CUDA graph
    reads them where it was recorded, without copying them first."""

    def __init__(self, images, labels, args, rank: int, world: int, noise_scheduler):
        self.images, self.labels, self.args, self.noise_scheduler = images, labels, args, noise_scheduler
        self.per_epoch = len(images) // args.batch_size
        per_rank = args.batch_size // world
        self.mine = slice(rank * per_rank, (rank + 1) * per_rank)
        self.order, self.epoch = None, -1
        device, shape = images.device, (per_rank, 3, args.image_size, args.image_size)
        layout = torch.channels_last if args.channels_last else torch.contiguous_format
        self.buffers = (torch.zeros(shape, device=device).contiguous(memory_format=layout),  # x_t
                        torch.zeros(per_rank, dtype=torch.long, device=device),               # t
                        torch.zeros(per_rank, dtype=labels.dtype, device=device),             # y
                        torch.zeros(shape, device=device))                                    # the noise

    def __call__(self, step: int):
        a, device = self.args, self.images.device
        if self.epoch != (step - 1) // self.per_epoch:
            self.epoch = (step - 1) // self.per_epoch
            self.order = to_device(epoch_order(a.seed, self.epoch, len(self.images)), device)  # (no host sync)
        idx = self.order[((step - 1) % self.per_epoch) * a.batch_size:][:a.batch_size]
        rng = generator(device, a.seed, "train", step)
        flip = torch.rand(a.batch_size, device=device, generator=rng) < 0.5 if a.hflip else None
        t = torch.randint(0, TRAIN_TIMESTEPS, (a.batch_size,), device=device, generator=rng)
        noise = torch.randn((a.batch_size, 3, a.image_size, a.image_size), device=device, generator=rng)
        y = self.labels[idx]
        if a.cfg_dropout > 0:  # drawn last: the other draws are those of a run without dropout
            y = torch.where(torch.rand(a.batch_size, device=device, generator=rng) < a.cfg_dropout, NULL_CLASS, y)
        idx, t, noise, y = idx[self.mine], t[self.mine], noise[self.mine], y[self.mine]
        x0 = self.images[idx].float() / 127.5 - 1
        if flip is not None:
            x0 = torch.where(flip[self.mine, None, None, None], x0.flip(3), x0)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        for buffer, value in zip(self.buffers, (xt, t, y, noise)):
            buffer.copy_(value)
        return self.buffers


def seed_global_rngs(seed: int, step: int, rank: int) -> None:
    """The global torch, numpy and python RNGs as a function of (seed, step, rank): the harness draws
    from explicit generators, but a method may use dropout or torch.rand in its forward, and this keeps
    such a method's training exact across resume, with distinct streams on each rank."""
    s = derive_seed(seed, "global", step, rank)
    torch.manual_seed(s)
    np.random.seed(s % 2 ** 32)
    random.seed(s)


# --------------------------------------------------------------------------------------------
# Diffusion: DDPM training noise, DDIM sampling, quantisation.
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


def ddim_timesteps(num_steps: int) -> list[int]:
    """The timesteps ddim_scheduler(num_steps) takes ("leading" spacing), without importing diffusers (the
    option checks run before it)."""
    ratio = TRAIN_TIMESTEPS // num_steps
    return [k * ratio for k in reversed(range(num_steps))]


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 exactly as the protocol: scale to [0, 255], clamp, truncate."""
    return ((x.float() * 0.5 + 0.5) * 255).clamp(0, 255).to(torch.uint8)


def guided_eps(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guidance: float, amp_dtype) -> torch.Tensor:
    """Classifier-free guidance: the conditional and the null-class predictions from one forward of the
    doubled batch, eps_null + w (eps_cond - eps_null), in fp32."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        eps = model(torch.cat([x, x]), t, torch.cat([y, torch.full_like(y, NULL_CLASS)]))
    eps_cond, eps_null = eps.float().chunk(2)
    return eps_null + guidance * (eps_cond - eps_null)


def sample(model, labels: torch.Tensor, *, seed: int, tag: str, batch_size: int, ddim_steps: int,
           image_size: int, amp_dtype, device, desc: str = "sampling", rank: int = 0, world: int = 1,
           guidance: float = 1.0, interval: list[int] | None = None):
    """DDIM (eta 0) samples for the given labels, as uint8 [N, 3, H, W] on the CPU of rank 0 (None on the
    other ranks).

    Batch b's initial noise comes from its own generator (seed, tag, b), so the images depend on
    neither the device's global RNG nor on how many batches came before. With several processes,
    rank r samples batches r, r + world, ... and rank 0 gathers them in order: the images are the same
    whatever the number of processes. The host never waits for the device until the images are complete
    (one copy back at the end): labels and timesteps go to the device once, the scheduler reads its
    timesteps as Python ints, and the images stay on the device.

    With guidance w != 1 (classifier-free; the model has the null class), the steps whose timestep lies
    in `interval` (all when None) take guided_eps, the others the conditional prediction alone; the
    initial noise is the same at every w, so the scales of a curve differ by guidance, not by noise."""
    with torch.no_grad():
        scheduler = ddim_scheduler(ddim_steps)
        steps = list(zip(scheduler.timesteps.tolist(), to_device(scheduler.timesteps, device)))
        guided = [guidance != 1 and (interval is None or interval[0] <= t_host <= interval[1]) for t_host, _ in steps]
        labels = to_device(labels, device)
        was_training = model.training
        model.eval()
        out = {}
        batches = range(math.ceil(len(labels) / batch_size))[rank::world]
        for b in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=len(batches) < 2 or rank > 0):
            y = labels[b * batch_size:(b + 1) * batch_size]
            x = torch.randn((len(y), 3, image_size, image_size), device=device,
                            generator=generator(device, seed, tag, b))
            for (t_host, t), guide in zip(steps, guided):
                if guide:
                    eps = guided_eps(model, x, t, y, guidance, amp_dtype)
                else:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        eps = model(x, t, y)
                x = scheduler.step(eps.float(), t_host, x, eta=0.0).prev_sample
            out[b] = quantize(x)
        if out:  # the one copy back to the host
            out = dict(zip(out, torch.cat(list(out.values())).cpu().split([len(v) for v in out.values()])))
        model.train(was_training)
        if world > 1:
            shards = [None] * world if rank == 0 else None
            dist.gather_object(out, shards, dst=0)
            if rank > 0:
                return None
            out = {b: images for shard in shards for b, images in shard.items()}
        return torch.cat([out[b] for b in sorted(out)])


def random_labels(n: int, batch_size: int, seed: int, tag: str) -> torch.Tensor:
    """Uniform random labels, drawn per sampling batch (as the protocol samples them)."""
    return torch.cat([torch.randint(0, NUM_CLASSES, (min(batch_size, n - b),), generator=generator("cpu", seed, tag, "labels", b))
                      for b in range(0, n, batch_size)])


# --------------------------------------------------------------------------------------------
# Evaluation: clean-fid's FID, the digits proxy, the held-out metrics, sample grids.
# --------------------------------------------------------------------------------------------

# clean-fid's FID and the CIFAR-10 panel live in evaluation.py; --prefetch gathers their assets.

def prefetch(data_dir: Path, fid_cache: Path, device, panel: bool = True) -> None:
    """Download everything a run needs (CIFAR-10, the Inception weights, the reference statistics),
    for machines that have internet; runs elsewhere then use --data-dir and --fid-cache. Then, unless
    panel is False, make the panel's assets into the same folder on `device` (the train set's features
    and per-class statistics, the classifier: minutes on a GPU, made once)."""
    from cleanfid.downloads_helper import check_download_inception, check_download_url

    load_cifar10(data_dir)
    fid_cache.mkdir(parents=True, exist_ok=True)
    for name, fetch in ((evaluation.INCEPTION_FILE, lambda d: check_download_inception(fpath=str(d))),
                        (evaluation.FID_STATS_FILE, lambda d: check_download_url(local_folder=str(d),
                                                                                 url=evaluation.FID_STATS_URL))):
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
    ready = [Path(data_dir) / CIFAR10_FOLDER, fid_cache / evaluation.INCEPTION_FILE, fid_cache / evaluation.FID_STATS_FILE]
    if panel:
        scorer = evaluation.CleanFID(torch.device(device), fid_cache, panel=panel_data(data_dir, fid_cache))
        ready += [fid_cache / evaluation.REFERENCE_FILE, f"{fid_cache / evaluation.CLASSIFIER_FILE} (test accuracy "
                                                         f"{scorer.classifier_accuracy:.4f})"]
    print("ready: " + ", ".join(map(str, ready)))


def panel_data(data_dir: Path, folder: Path) -> tuple:
    """What the CIFAR-10 panel is made from: its assets' folder, the train and the test set."""
    return Path(folder), load_cifar10(Path(data_dir), "train")[:2], load_cifar10(Path(data_dir), "test")[:2]


class DigitsProxy(proxy.ProxyMetrics):
    """proxy_fd, class_acc and the panel (proxy.py) on class-balanced samples."""

    primary = "proxy_fd"


def sample_labels(args, n: int, tag: str) -> torch.Tensor:
    """The conditioning labels of an evaluation's samples: uniform random on CIFAR-10 (the protocol),
    class-balanced on the digits."""
    return proxy.balanced_labels(n) if args.dataset == "digits" else random_labels(n, args.sample_batch_size, args.seed, tag)


class HeldOutMetrics:
    """The model scored on held-out images with its own objective, from draws that depend only on
    --metric-seed (never on the method or the training seed), so that every method of a comparison
    meets the same (image, t, noise) triples and their differences are free of sampling noise.

    * heldout_loss: the training objective (epsilon MSE) averaged over `draws` (t, noise) pairs per
      image, with t stratified per image (draw k lies in [1000 k / draws, 1000 (k + 1) / draws)).
    * label_acc: the model as its own classifier. For each of `label_draws` stratified (t, noise) pairs
      per image, the epsilon MSE under each of the 10 labels; the draw is right when the true label gives
      the lowest. The fraction of right (image, draw) pairs: each draw is one trial, so more draws lower
      the metric's noise without moving it towards the ceiling that summing losses over draws reaches.

    Draws are made on the CPU in chunks of CHUNK images (the same on any device and for any batch size)."""

    CHUNK = 100

    def __init__(self, images: np.ndarray, labels: np.ndarray, device, *, draws: int, label_draws: int,
                 metric_seed: int, batch_size: int):
        self.images, self.labels = to_device(torch.from_numpy(images), device), to_device(torch.from_numpy(labels), device)
        self.device, self.draws, self.label_draws = device, draws, label_draws
        self.seed, self.batch_size = metric_seed, batch_size
        self.scheduler = ddpm_scheduler()
        # (diffusers would copy its table to the device at the first add_noise, a blocking copy)
        self.scheduler.alphas_cumprod = to_device(self.scheduler.alphas_cumprod, device)

    def chunk_draws(self, kind: str, chunk: int, n: int, k: int):
        """(t [n, k], noise [n, k, C, H, W]) drawn on the CPU (the same on every device), then sent over."""
        g = generator("cpu", self.seed, "heldout", kind, chunk)
        u = torch.rand(n, k, generator=g)
        t = ((torch.arange(k) + u) * (TRAIN_TIMESTEPS / k)).long().clamp(0, TRAIN_TIMESTEPS - 1)
        noise = torch.randn((n, k) + tuple(self.images.shape[1:]), generator=g)
        return to_device(t, self.device), to_device(noise, self.device)

    def losses(self, model, x0, t, noise, labels, amp_dtype) -> torch.Tensor:
        """Per-draw epsilon MSE, [n, k], of images x0 [n, ...] at draws t, noise [n, k, ...] under labels [n]."""
        with torch.no_grad():
            n, k = t.shape
            xt = self.scheduler.add_noise(x0[:, None].expand_as(noise).reshape((-1,) + x0.shape[1:]),
                                          noise.reshape((-1,) + x0.shape[1:]), t.reshape(-1))
            t, y, noise = t.reshape(-1), labels[:, None].expand(n, k).reshape(-1), noise.reshape(xt.shape)
            out = []
            for i in range(0, len(xt), self.batch_size):
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    pred = model(xt[i:i + self.batch_size], t[i:i + self.batch_size], y[i:i + self.batch_size])
                out.append((pred.float() - noise[i:i + self.batch_size]).square().flatten(1).mean(1))
            return torch.cat(out).reshape(n, k)

    def __call__(self, model, amp_dtype=None) -> dict:
        """The sums stay on the device; the host reads them once, at the end."""
        with torch.no_grad():
            was_training = model.training
            model.eval()
            sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # the losses, the right draws
            trials = 0
            for c, start in enumerate(range(0, len(self.images), self.CHUNK)):
                x0 = self.images[start:start + self.CHUNK].float() / 127.5 - 1
                y = self.labels[start:start + self.CHUNK]
                t, noise = self.chunk_draws("loss", c, len(x0), self.draws)
                sums[0] += self.losses(model, x0, t, noise, y, amp_dtype).double().sum()
                if self.label_draws:
                    t, noise = self.chunk_draws("label", c, len(x0), self.label_draws)
                    per_label = torch.stack([self.losses(model, x0, t, noise, torch.full_like(y, label), amp_dtype)
                                             for label in range(NUM_CLASSES)], dim=-1)  # [n, k, 10]
                    sums[1] += (per_label.argmin(-1) == y[:, None]).sum()
                    trials += per_label.shape[0] * per_label.shape[1]
            model.train(was_training)
            loss_sum, right = sums.tolist()
            return dict(heldout_loss=loss_sum / (len(self.images) * self.draws),
                        label_acc=round(right) / trials if trials else None)


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
# Files: atomic writes, provenance, checkpoints, and what a run directory may be reused for.
# --------------------------------------------------------------------------------------------

def atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finite_or_none(value):
    """Strict JSON has no NaN or infinity: a non-finite number (at any depth) is written as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(finite_or_none(obj), indent=2, allow_nan=False) + "\n").encode()))


def cpu_name() -> str:
    """The CPU model (figures are quoted with the machine they came from), e.g. "AMD EPYC"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_state() -> dict:
    """The commit of the code and whether the work tree differed from it (None outside a git checkout)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return dict(git_commit=None, git_dirty=None)
    if commit.returncode != 0:
        return dict(git_commit=None, git_dirty=None)
    return dict(git_commit=commit.stdout.strip(), git_dirty=bool(status.stdout.strip()))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint, every tensor on the CPU: load_state_dict then places each on its parameter's device
    (the CPU RNG state, AdamW's step counters and a GPU that is not there stay out of the way)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise HarnessError(f"cannot read the checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           f"the run directory is left as it is: delete {path.name} to restart this run from step 0, "
                           f"or pass --overwrite") from e


def differences(recorded: dict, config: dict, keys) -> list[str]:
    """'key=recorded (now current)' for every key whose recorded value differs from today's."""
    out = []
    for key in keys:
        made = recorded.get(key, ALL_OPTIONS[key].legacy if key in ALL_OPTIONS else None)
        if made is NO_LEGACY:
            made = None
        if made != config[key]:
            out.append(f"{key}={made} (now {config[key]})")
    return out


def check_reusable(recorded: dict, config: dict, run_dir: Path, keys) -> None:
    """Refuse, in one line, to continue or reuse a run made by other method code or other options."""
    if recorded.get("method_sha256") != config["method_sha256"]:
        made = (recorded.get("method_sha256") or "unrecorded")[:8]
        raise HarnessError(f"{run_dir} was made by other code for method '{config['method']}' (sha256 {made}, now "
                           f"{config['method_sha256'][:8]}); choose another --run-name to keep both, or pass "
                           f"--overwrite to replace it")
    diff = differences(recorded, config, [k for k in keys if k != "method_sha256"])
    if diff:
        raise HarnessError(f"{run_dir} was made with {', '.join(diff)}; pass the same options, choose another "
                           f"--run-name to keep both, or pass --overwrite to replace it")


def plan_run(args, config: dict, run_dir: Path) -> tuple[str, dict | None]:
    """What to do with the run directory, and the checkpoint or results it holds:
    "new" (nothing there, or --overwrite), "resume" (a checkpoint to continue), "extend" (a finished run
    asked for more steps), or "done" (finished with these very options and code: its results)."""
    ckpt_path, results_path = run_dir / "checkpoint.pt", run_dir / "results.json"
    if args.overwrite or not (ckpt_path.exists() or results_path.exists()):
        return "new", None
    if results_path.exists():
        results = json.loads(results_path.read_text())
        recorded = results.get("config", results)
        if not args.resume:
            raise HarnessError(f"{run_dir} holds a finished run ({results_path.name}); pass --resume to reuse it or "
                               f"train it further, choose another --run-name or --out-dir, or pass --overwrite")
        check_reusable(recorded, config, run_dir, TRAIN_KEYS + EVAL_KEYS)
        if args.steps == results["steps"]:
            check_reusable(recorded, config, run_dir, ("eval_every",))
            return "done", results
        if args.steps < results["steps"]:
            raise HarnessError(f"{run_dir} finished at {results['steps']} steps; --steps {args.steps} asks for fewer "
                               f"(choose another --run-name for a shorter run)")
        if args.lr_cooldown:
            raise HarnessError(f"{run_dir} finished at {results['steps']} steps with --lr-cooldown {args.lr_cooldown}, "
                               f"which the steps place; it cannot be trained further (choose another --run-name)")
        if not ckpt_path.exists():
            raise HarnessError(f"{run_dir} finished without its {ckpt_path.name}, so it cannot be trained further; "
                               f"choose another --run-name")
        return "extend", load_checkpoint(ckpt_path)
    if not args.resume:
        raise HarnessError(f"{run_dir} already holds a run's checkpoint; pass --resume to continue it, choose another "
                           f"--run-name, or pass --overwrite")
    ckpt = load_checkpoint(ckpt_path)
    check_reusable(ckpt["config"], config, run_dir, TRAIN_KEYS + EVAL_KEYS)
    if ckpt["config"].get("lr_cooldown") and ckpt["config"]["steps"] != args.steps:
        raise HarnessError(f"--resume: the checkpoint was made with steps={ckpt['config']['steps']}, not {args.steps}; "
                           f"with --lr-cooldown the steps place the decay, so pass the same --steps")
    if ckpt["step"] > args.steps:
        raise HarnessError(f"--resume: the checkpoint is at step {ckpt['step']}, past --steps {args.steps}")
    return "resume", ckpt


# --------------------------------------------------------------------------------------------
# Command line: built from OPTIONS; defaults that depend on other options are filled, then checked.
# --------------------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default at the end of its help, unless the help already says it (in words that a
    bare "None" would only blur) or the option is a switch (off unless given)."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def build_parser(preset: str | None, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The command line from OPTIONS (and a preset's defaults); with suppress_defaults, a parse yields only
    the options given on the command line."""
    p = argparse.ArgumentParser(
        description="Train and evaluate a class-conditional DDPM (diffusers UNet2DModel) on CIFAR-10 with a chosen "
                    "class-conditioning method. The defaults are the published protocol (docs/protocol.md).",
        formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="named defaults; explicit flags override them. " + "; ".join(
                       f"{name}: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items())
                       for name, d in PRESETS.items()))
    for title, options in OPTIONS.items():
        group = p.add_argument_group(title)
        for name, o in options.items():
            kw = dict(o.kw)
            flags = kw.pop("flags", (f"--{name.replace('_', '-')}",))
            group.add_argument(*flags, dest=name, default=argparse.SUPPRESS if suppress_defaults else o.default,
                               help=o.help, **kw)
    if preset and not suppress_defaults:
        p.set_defaults(**PRESETS[preset])
    return p


def parse_args(argv=None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=list(PRESETS), default=None)
    preset = pre.parse_known_args(argv)[0].preset
    args = build_parser(preset).parse_args(argv)
    args.given = set(vars(build_parser(None, suppress_defaults=True).parse_args(argv))) - {"preset"}
    args.image_size = IMAGE_SIZE[args.dataset]
    return args


# (option, test, what it must be) for every number: one line and exit 1 when broken, never a default instead
NUMERIC_CHECKS = [
    *[(name, lambda v: v > 0, "positive") for name in (
        "steps", "batch_size", "ckpt_every", "log_every", "eval_every", "ddim_steps", "sample_batch_size",
        "grid_per_class", "lr", "grad_clip")],
    *[(name, lambda v: v >= 0, ">= 0") for name in (
        "seed", "fid_samples", "final_fid_samples", "weight_decay", "ema_eval_start", "heldout_draws", "label_draws",
        "metric_seed")],
    ("ema_decay", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("cfg_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
]


def resolve_defaults(args) -> None:
    """Fill the defaults that depend on other options, then validate (one clear line per problem)."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise HarnessError(f"--device {args.device!r} is not a torch device ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"--device {args.device} asked for CUDA, but torch sees no GPU; use --device cpu")
    digits = args.dataset == "digits"
    if args.batch_size is None:
        args.batch_size = SCALES[args.scale].batch_size
    if args.eval_every is None:
        args.eval_every = args.steps
    args.precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    args.fid = args.fid or ("proxy" if digits else "clean")
    args.save_samples = digits if args.save_samples is None else args.save_samples
    args.panel = args.panel and args.fid == "clean"  # (the digits proxy always has its own panel)
    for name, value in HELDOUT_DEFAULTS[args.dataset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.heldout_draws == 0:
        args.label_draws = 0
    if args.adam == "auto":  # fused: with the fp16 scaler it skips overflowed steps on the GPU, without a host sync
        args.adam = "fused" if device.type == "cuda" else "foreach"
    if digits and args.hflip:
        args.hflip = False  # a mirrored digit is not a digit (and no protocol applies to this dataset)
    for name, ok, what in NUMERIC_CHECKS:
        value = getattr(args, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
            raise HarnessError(f"--{name.replace('_', '-')} must be {what}, got {value}")
    if args.fid == "proxy" and not digits:
        raise HarnessError("--fid proxy scores digits only; use --dataset digits, or --fid clean for cifar10")
    if args.fid == "clean" and digits:
        raise HarnessError("--fid clean compares with CIFAR-10 statistics; digits runs use --fid proxy (or off)")
    if args.fid != "off" and 0 < min(args.fid_samples or 2, args.final_fid_samples or 2) < 2:
        raise HarnessError("FID needs at least 2 samples (a covariance); raise --fid-samples/--final-fid-samples")
    unguided = [f"--{name.replace('_', '-')}" for name in ("guidance_interval", "guidance_samples")
                if getattr(args, name) is not None and args.guidance == [1.0]]
    if unguided:
        raise HarnessError(f"{' and '.join(unguided)} only act with guidance: add --guidance with a scale other than 1, "
                           f"or leave {' and '.join(unguided)} out")
    if args.guidance_interval is not None:
        (lo, hi), timesteps = args.guidance_interval, ddim_timesteps(args.ddim_steps)
        if not any(lo <= t <= hi for t in timesteps):
            raise HarnessError(f"--guidance-interval {lo},{hi} holds none of the {args.ddim_steps} DDIM timesteps "
                               f"({', '.join(map(str, timesteps[:3]))}, ..., 0): no step would be guided; widen it")
    if args.guidance_samples is not None and args.guidance_samples < 2:
        raise HarnessError(f"--guidance-samples must be at least 2 (a covariance), got {args.guidance_samples}")
    if any(w != 1 for w in args.guidance) and args.cfg_dropout == 0:
        raise HarnessError(f"--guidance {','.join(f'{w:g}' for w in args.guidance)} needs the null class of a model trained "
                           f"with --cfg-dropout > 0 (e.g. 0.1); this one is trained without it, so only --guidance 1")
    if not 0 <= args.lr_cooldown <= args.steps:
        raise HarnessError(f"--lr-cooldown must lie in [0, --steps={args.steps}], got {args.lr_cooldown}")
    args.method_sha256 = method_sha256(args.method)
    if args.run_name is None:
        prefix = "" if args.dataset == "cifar10" else f"{args.dataset}-"
        name = args.method
        if args.method == "custom" or is_method_file(args.method):  # two versions of an idea never share a folder
            name = f"{Path(args.method).stem}-{args.method_sha256[:8]}"
        args.run_name = f"{prefix}{args.scale}-{name}-s{args.seed}"


def protocol_value(name: str, args):
    o = ALL_OPTIONS[name]
    return {id(SAME): o.default, id(BY_SCALE): SCALES[args.scale].batch_size,
            id(BY_STEPS): args.steps}.get(id(o.protocol), o.protocol)


def protocol_deviations(args) -> list[str]:
    """Every option whose value differs from the published protocol, as 'name=value (protocol: x)'."""
    deviations = ["scale=tiny (protocol: small, medium or large)"] if args.scale == "tiny" else []
    for name, o in ALL_OPTIONS.items():
        if o.protocol is not None and getattr(args, name) != protocol_value(name, args):
            deviations.append(f"{name}={getattr(args, name)} (protocol: {protocol_value(name, args)})")
    return deviations


def speed_options(args) -> list[str]:
    """The options that change speed (and rounding) but not the protocol's arithmetic."""
    used = [name for name in ("channels_last", "tf32", "deterministic") if getattr(args, name)]
    return ([f"compile={args.compile}"] if args.compile != "off" else []) + used + [f"adam={args.adam}"]


def run_config(args, world: int, count_parameters: bool = True) -> dict:
    """Every option as resolved, the method's code, and what the run was made with: config.json. The
    parameter count builds the model (on the meta device, but importing diffusers takes seconds), so a
    finished run that is only looked up can go without it."""
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
              if k not in ("list_methods", "count_params", "dry_run", "resume", "overwrite", "prefetch", "evaluate", "given")}
    config.update(method_source=method_code(args.method), method_file=str(Path(args.method).resolve())
                  if is_method_file(args.method) else None, protocol_deviations=protocol_deviations(args),
                  speed_options=speed_options(args), world_size=world, **git_state())
    if count_parameters:
        config.update(parameter_count(args))
    return config


def parameter_count(args) -> dict:
    params, budget = params_and_budget(args.scale, args.method, null_class=args.cfg_dropout > 0)
    return dict(params=params, budget=budget, within_budget=params <= budget)


# --------------------------------------------------------------------------------------------
# Training: the optimizer, one step, the EMA, the log meter, compilation, evaluation, results.
# --------------------------------------------------------------------------------------------

def learning_rate(step: int, args) -> float:
    """The lr of optimizer step ``step`` (1-based): constant, then with --lr-cooldown N a linear decay over
    the last N steps (lr at the first of them, lr / N at the last)."""
    return args.lr * min(1.0, (args.steps - step + 1) / args.lr_cooldown) if args.lr_cooldown else args.lr


def make_optimizer(params, args) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=args.weight_decay,
                             **{args.adam: True})


def train_step(train_model, xt, t, y, noise, optimizer, scaler, params, *, amp_dtype, grad_clip):
    """Forward under autocast, epsilon MSE, backward, unscale, clip, step (the fp16 scaler skips the
    step when the gradients overflowed). Returns the loss and the gradient norm before clipping (not
    finite exactly when the step was skipped), without a host sync."""
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


class EMA:
    """The protocol's EMA: ema <- ema + (1 - decay) (model - ema) after every step, from an initial copy
    of the model (with its memory layout). Floating-point buffers (e.g. normalisation statistics a
    method may keep) are averaged the same way; other buffers are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        pairs = list(zip(self.module.parameters(), model.parameters()))
        pairs += [(e, m) for e, m in zip(self.module.buffers(), model.buffers()) if m.is_floating_point()]
        self.averaged, self.source = [e for e, _ in pairs], [m for _, m in pairs]
        self.copied = [(e, m) for e, m in zip(self.module.buffers(), model.buffers()) if not m.is_floating_point()]

    def update(self) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(self.averaged, self.source, 1 - self.decay)
            for e, m in self.copied:
                e.copy_(m)


class Meter:
    """Sums on the device between log points (no host sync); `read` is the one sync of an interval. With
    the fp16 scaler, a step it skipped (non-finite gradient norm) leaves loss and grad norm out and is
    counted, and so are the skips in a row; without it every step counts, so a non-finite one shows in
    the mean and stops the run."""

    def __init__(self, device, scaler_skips: bool):
        # loss, grad norm, applied steps, skips in a row, and (set at read) whether a stop signal arrived
        self.sums = torch.zeros(5, device=device, dtype=torch.float64)
        self.steps, self.start, self.scaler_skips = 0, time.perf_counter(), scaler_skips

    def add(self, loss, grad_norm) -> None:
        applied = torch.isfinite(grad_norm) if self.scaler_skips else torch.ones((), dtype=torch.bool, device=loss.device)
        self.sums[:3] += torch.stack([torch.where(applied, loss, 0.0).double(),
                                      torch.where(applied, grad_norm, 0.0).double(), applied.double()])
        self.sums[3] = torch.where(applied, 0.0, self.sums[3] + 1)
        self.steps += 1

    def read(self, world: int, stop: bool = False) -> dict:
        self.sums[4] = float(stop)
        if world > 1:  # every rank then sees the same numbers (a signal to any rank included), so all stop together
            dist.all_reduce(self.sums)
            self.sums /= world
        loss_sum, grad_sum, applied, in_a_row, stop = self.sums.tolist()
        applied = round(applied)
        out = dict(loss=loss_sum / applied if applied else None, grad_norm=grad_sum / applied if applied else None,
                   skipped_steps=self.steps - applied, skipped_in_a_row=round(in_a_row), steps=self.steps,
                   seconds=time.perf_counter() - self.start, stop=stop > 0)
        self.sums[:3].zero_()
        self.steps, self.start = 0, time.perf_counter()
        return out


def configure_backends(args, device) -> None:
    """TF32 off unless asked (torch 2.14 would use it for fp32 convolutions), the cuDNN autotuner on for
    the fixed training shapes, and the deterministic mode when asked; every setting made both ways, so a
    process that runs several trainings (the tests) starts each from its own options."""
    precision = "tf32" if args.tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = precision
    # the same through the legacy API too: inductor (and a method) may read it, and reading a legacy flag
    # set only through the new API raises
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    torch.backends.cudnn.benchmark = device.type == "cuda" and not args.deterministic
    torch.backends.cudnn.deterministic = args.deterministic
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it at its first use
    torch.use_deterministic_algorithms(args.deterministic)


def compile_model(train_model, model, args, inputs, amp_dtype):
    """torch.compile (with --compile max in mode reduce-overhead: the compiled forward and backward are
    launched as CUDA graphs), then one forward and backward on the training input buffers themselves
    (TrainingBatches fills them in place every step), so that compilation happens here, inside the eager
    fallback, and no step recompiles: Dynamo guards on every property of its inputs, even on which of
    them are the same tensor. The probe's gradients are dropped and the model's buffers restored."""
    buffers = [b.clone() for b in model.buffers()]
    try:
        if args.compile == "max":
            for tensor in inputs:  # the graphs read these in place instead of copying them into graph memory
                torch._dynamo.mark_static_address(tensor)
        compiled = torch.compile(train_model, mode="reduce-overhead" if args.compile == "max" else None)
        xt, t, y, _ = inputs
        with torch.autocast(xt.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = compiled(xt, t, y)
        out.float().sum().mul(0).backward()  # (and lets DDP finish its first reduction)
        return compiled
    except Exception as e:
        print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              f"training eagerly", file=sys.stderr)
        return train_model
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)


def match_layouts(optimizer) -> None:
    """AdamW's state in each parameter's memory layout (a checkpoint made without --channels-last resumed
    with it, or the other way): fused AdamW refuses mixed layouts and foreach kernels slow down."""
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Run:
    """What the loop, the evaluations and the results need, made once by train()."""
    args: argparse.Namespace
    device: torch.device
    rank: int
    world: int
    run_dir: Path
    config: dict
    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: object
    class_names: list
    scorer: object = None
    heldout: object = None
    params: list = field(default_factory=list)
    step: int = 0
    train_time: float = 0.0
    evals: list = field(default_factory=list)
    log_file: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, record: dict) -> None:
        if self.is_main and self.log_file is not None:
            self.log_file.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")
            self.log_file.flush()

    def save_checkpoint(self) -> None:
        if self.is_main:
            state = dict(model=self.model.state_dict(), ema=self.ema.module.state_dict(),
                         optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), step=self.step,
                         config=self.config, train_time=self.train_time, evals=self.evals)
            atomic_write(self.run_dir / "checkpoint.pt", lambda f: torch.save(state, f))
        if self.world > 1:
            dist.barrier()


def evaluate(run: Run, tag: str, num_samples: int, files: str | None = None) -> dict:
    """Sample and score the weights the protocol names for this step: the raw network before
    --ema-eval-start, the EMA from it on. Always a grid; FID (or the proxy) with the panel when on; the
    held-out metrics when on. Logged (when the run has a log), and returned. The samples' noise and
    labels come from (seed, tag): an evaluation tagged "final" again sees the same samples. `files`:
    the name prefix of its grid and samples (rescoring), instead of grid_TAG.png and samples.npz.

    With guidance (--guidance other than 1) every scale is sampled from the same noise and labels and
    scored (on --guidance-samples each when given): "guidance" holds this curve. The best scale by the
    primary metric is then sampled again on the full count from noise and labels of its own (tag
    TAG-best), which give the headline numbers: a minimum over scales, reported on the samples that
    chose it, would flatter it. A single scale scored on the full count chose nothing: its samples are
    the headline (one sampling, not two). The grids show the best scale and 1."""
    args, scales = run.args, list(run.args.guidance)
    grid_file, samples_file = (f"grid_{tag}.png", "samples.npz") if files is None else \
        (f"{files}-grid.png", f"{files}-samples.npz")
    net = run.ema.module if run.step >= args.ema_eval_start else run.model
    kw = dict(seed=args.seed, batch_size=args.sample_batch_size, ddim_steps=args.ddim_steps, image_size=args.image_size,
              amp_dtype=run.amp_dtype, device=run.device, rank=run.rank, world=run.world,
              interval=args.guidance_interval)
    record = dict(step=run.step, eval=tag, weights="ema" if net is run.ema.module else "raw", grid=grid_file)
    best = None
    if args.fid != "off" and num_samples > 0:
        def draw(w, n, tag):  # n samples at scale w: the same initial noise and labels at every scale of a tag
            labels = sample_labels(args, n, tag)
            return labels, sample(net, labels, tag=tag, guidance=w, desc=f"sampling {n}" + (
                f" at guidance {w:g}" if scales != [1.0] else ""), **kw)
        if scales == [1.0]:
            labels, images = draw(1.0, num_samples, tag)
            if run.is_main:
                record.update(run.scorer(images, labels))
        else:
            screened = min(args.guidance_samples or num_samples, num_samples)
            single = len(scales) == 1 and screened == num_samples  # nothing to choose: its samples are the headline
            curve = []
            for w in scales:
                labels, images = draw(w, screened, tag)
                if run.is_main:
                    curve.append(dict(guidance=w, **run.scorer(images, labels)))
            if single:
                best = scales[0]
            else:
                if run.is_main:
                    best = min(curve, key=lambda e: primary_value(e, run.scorer.primary))["guidance"]  # ties: first
                if run.world > 1:  # rank 0 scored: every rank samples the best scale again
                    box = [best]
                    dist.broadcast_object_list(box, src=0)
                    best = box[0]
                labels, images = draw(best, num_samples, f"{tag}-best")
            if run.is_main:
                headline = {k: v for k, v in curve[0].items() if k != "guidance"} if single else run.scorer(images, labels)
                record.update(headline, best_guidance=best, guidance_samples=screened, guidance=curve)
        if run.is_main and args.save_samples and tag == "final":
            atomic_write(run.run_dir / samples_file, lambda f: np.savez_compressed(
                f, images=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy()))
    # the grid: the best scale's (or every asked scale's when nothing was scored) and guidance 1's
    shown = [1.0] if scales == [1.0] else ([best] if best is not None else list(scales)) + [1.0]
    grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(args.grid_per_class)
    for i, w in enumerate(dict.fromkeys(shown)):
        name = grid_file if i == 0 else grid_file.replace(".png", f"-guidance{w:g}.png")
        grid = sample(net, grid_labels, tag="grid", desc="grid", guidance=w, **kw)
        if run.is_main:
            save_grid(grid, run.class_names, args.grid_per_class, run.run_dir / name)
        if scales != [1.0]:
            record.setdefault("grids", {})[f"{w:g}"] = name
    if run.heldout is not None and run.is_main:  # (the conditional model's own objective: no guidance)
        record.update(run.heldout(net, run.amp_dtype))
    if run.world > 1:
        dist.barrier()
    run.log(record)
    return record


def primary_value(scores: dict, primary: str) -> float:
    """The primary metric (lower is better) for choosing among guidance scales; undefined ones last."""
    value = scores.get(primary)
    return value if value is not None and math.isfinite(value) else math.inf


def assemble_results(run: Run, final: dict) -> dict:
    """results.json: the final and best metrics, every evaluation, and everything that made the run."""
    args, primary = run.args, run.scorer.primary if run.scorer is not None else "fid"
    scored = [e for e in run.evals if e.get(primary) is not None]
    best = min(scored, key=lambda e: e[primary]) if scored else {}
    results = dict(scale=args.scale, method=args.method, dataset=args.dataset, seed=args.seed,
                   best_fid=None, best_fid_step=None, fid=None, fid_samples=None)
    results.update({f"best_{primary}": best.get(primary), f"best_{primary}_step": best.get("step")})
    if best.get("best_guidance") is not None:  # the scale of that evaluation (the final one may pick another)
        results[f"best_{primary}_guidance"] = best["best_guidance"]
    results.update({k: v for k, v in final.items() if k not in ("step", "eval", "weights", "grid")})
    c = run.config
    results.update(
        method_sha256=c["method_sha256"], fid_resize=args.fid_resize if args.fid == "clean" else None,
        speed_options=c["speed_options"], world_size=run.world, evals=run.evals + [final], grid=final["grid"],
        params=c["params"], budget=c["budget"], within_budget=c["within_budget"], steps=run.step,
        train_time_s=run.train_time, images_per_s=run.step * args.batch_size / max(run.train_time, 1e-9),
        protocol_deviations=c["protocol_deviations"], git_commit=c["git_commit"], git_dirty=c["git_dirty"],
        peak_memory_gib=torch.cuda.max_memory_allocated(run.device) / 2 ** 30 if run.device.type == "cuda" else None,
        **made_on(run.device), config=c,
    )
    return results


def made_on(device: torch.device) -> dict:
    """What a number was made on: the device, the CPU threads (they change CPU floating point: README,
    Reproducibility) and the library versions."""
    return dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
                cpu_threads=torch.get_num_threads(),
                versions=dict(torch=torch.__version__, diffusers=version("diffusers"), clean_fid=version("clean-fid"),
                              python=platform.python_version()))


def print_results(results: dict, run_dir: Path) -> None:
    print(f"\n{run_dir}")
    for key in ("best_fid", "best_fid_step", "best_fid_guidance", "fid", "best_guidance", "kid", "intra_fid",
                "precision", "recall", "proxy_fd", "class_acc",
                "proxy_kid", "proxy_intra_fd", "proxy_precision", "proxy_recall", "heldout_loss", "label_acc", "params",
                "steps", "images_per_s"):
        value = results.get(key)
        if value is not None:
            print(f"  {key:<15} {value:,.4f}" if isinstance(value, float) else f"  {key:<15} {value:,}")
    for entry in results.get("guidance") or []:  # the curve, on guidance_samples each
        shown = "  ".join(f"{k} {v:.4f}" for k, v in entry.items() if k in ("fid", "proxy_fd", "class_acc", "kid")
                          and v is not None)
        print(f"  {'guidance ' + format(entry['guidance'], 'g'):<15} {shown}")
    print(f"  {'grid':<15} {run_dir / results['grid']}")


def log_point(run: Run, meter: Meter, pbar, stop_requested: bool = False) -> bool:
    """The interval's one host sync (after the GPU finished the interval's work, so images/s is true),
    its log line, and the stops: a non-finite loss, or an fp16 scaler that skipped every step (raised
    here); a stop signal on any rank (returned, so that every rank checkpoints and stops together)."""
    sync(run.device)
    m = meter.read(run.world, stop_requested)
    run.train_time += m["seconds"]
    first, step, ckpt = run.step - m["steps"], run.step, run.run_dir / "checkpoint.pt"
    record = dict(step=step, loss=m["loss"], lr=run.optimizer.param_groups[0]["lr"], grad_norm=m["grad_norm"],
                  loss_scale=run.scaler.get_scale() if run.scaler.is_enabled() else None,
                  skipped_steps=m["skipped_steps"], images_per_s=m["steps"] * run.args.batch_size / m["seconds"])
    run.log(record)
    if m["loss"] is None and m["skipped_in_a_row"] >= SCALER_COLLAPSE_STEPS:
        pbar.close()
        raise HarnessError(f"every step between {first} and {step} overflowed in fp16 ({m['skipped_in_a_row']} in a "
                           f"row, loss scale now {record['loss_scale']:g}): the gradient scaler has collapsed; the last "
                           f"good checkpoint is kept in {ckpt} (try --precision bf16 or a lower --lr)")
    if m["loss"] is not None and not math.isfinite(m["loss"]):
        pbar.close()
        raise HarnessError(f"the loss became non-finite ({m['loss']}) between steps {first} and {step}; the last good "
                           f"checkpoint is kept in {ckpt} (try a lower --lr or --precision fp16)")
    if m["loss"] is not None:  # (None: the scaler's warm-up at a short --log-every, nothing to show yet)
        pbar.set_postfix(loss=f"{m['loss']:.4f}")
    return m["stop"]


def dry_run(args, config: dict, run_dir: Path) -> dict:
    """What the run would be: the resolved options, the deviations and what happens to the run directory."""
    try:
        action, _ = ("evaluate", None) if args.evaluate is not None else plan_run(args, config, run_dir)
        action = {"new": "start a new run" + (" (deleting what is there: --overwrite)" if args.overwrite and run_dir.exists()
                                              else ""),
                  "resume": "resume its checkpoint", "extend": f"train the finished run on to {args.steps} steps",
                  "done": "nothing: it finished with these options and code",
                  "evaluate": "score its checkpoint again into a new evaluation-DATE.json"}[action]
    except HarnessError as e:
        action = f"refuse: {e}"
    shown = {k: v for k, v in config.items() if k != "method_source"}
    print(json.dumps(shown, indent=2))
    print(f"\nrun directory: {run_dir}\nwould: {action}\nprotocol deviations: "
          + ("; ".join(config["protocol_deviations"]) or "none"))
    return dict(config=shown, action=action)


def build_run(args, rank: int, world: int, config: dict, run_dir: Path, data=None) -> tuple[Run, TrainingBatches]:
    """The model (its method's contract and budget checked first), its EMA and AdamW in one memory layout,
    the scaler, the training data on the device (`data`: (images, labels, class names) instead of the
    data set's, for bench.py), and rank 0's scorers."""
    device = torch.device(args.device)
    configure_backends(args, device)
    if config["params"] > config["budget"] and not args.ignore_budget:
        raise HarnessError(f"method '{args.method}' has {config['params']:,} parameters at scale {args.scale}, over "
                           f"the budget of {config['budget']:,} (1.05 x cross-attn); shrink it or pass --ignore-budget")
    torch.manual_seed(args.seed)
    model = build_model(args.scale, args.method, args.image_size, null_class=args.cfg_dropout > 0).to(device)
    check_method_contract(model, args.method, device)
    if args.channels_last:  # before the EMA copy and the optimizer: all three share one layout
        model.to(memory_format=torch.channels_last)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[args.precision]
    scaler = torch.amp.GradScaler(device.type, init_scale=GRAD_SCALER_INIT_SCALE, enabled=args.precision == "fp16")
    run = Run(args, device, rank, world, run_dir, config, model, EMA(model, args.ema_decay),
              make_optimizer(model.parameters(), args), scaler, amp_dtype, class_names=[])
    run.params = list(model.parameters())
    images, labels, run.class_names = data if data is not None else load_dataset(args, "train")
    if len(images) < args.batch_size:
        raise HarnessError(f"--batch-size {args.batch_size} is larger than the dataset ({len(images)} images)")
    batches = TrainingBatches(torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device), args, rank,
                              world, ddpm_scheduler())
    if run.is_main and args.fid != "off":  # rank 0 scores the gathered samples
        try:
            if args.fid == "clean":  # the panel's assets live beside the FID's (--fid-cache), else in --cache-dir
                panel = panel_data(args.data_dir, args.fid_cache or args.cache_dir) if args.panel else None
                run.scorer = evaluation.CleanFID(device, args.fid_cache, args.fid_resize, panel)
            else:
                run.scorer = DigitsProxy(args.cache_dir, device)
        except (proxy.ProxyError, evaluation.AssetError) as e:
            raise HarnessError(str(e)) from e
    if run.is_main and args.heldout_draws:
        held_images, held_labels, _ = load_dataset(args, "held-out")
        run.heldout = HeldOutMetrics(held_images, held_labels, device, draws=args.heldout_draws,
                                     label_draws=args.label_draws, metric_seed=args.metric_seed,
                                     batch_size=args.sample_batch_size)
    return run, batches


ADAM_KERNEL_FLAGS = ("foreach", "fused", "capturable")


def load_optimizer_state(optimizer, saved: dict) -> None:
    """AdamW's saved state, run by the kernel that today's options chose. A checkpoint records the kernel
    flags of the optimizer that wrote it and load_state_dict would restore them: a foreach checkpoint
    resumed with fused would keep foreach (a host sync every step, and a crash under the fp16 scaler,
    which hands fused kernels its scale) and the other way round. The flags are today's; load_state_dict
    then places the step counters where that kernel keeps them (on the device for fused)."""
    groups = [dict(g, **{k: now[k] for k in ADAM_KERNEL_FLAGS if k in now})
              for g, now in zip(saved["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict(dict(saved, param_groups=groups))


def restore(run: Run, saved: dict) -> None:
    """The checkpoint's state into the run: weights, EMA, AdamW (today's kernel, re-laid out as the model),
    scaler, step."""
    run.model.load_state_dict(saved["model"])
    run.ema.module.load_state_dict(saved["ema"])
    load_optimizer_state(run.optimizer, saved["optimizer"])
    match_layouts(run.optimizer)
    run.scaler.load_state_dict(saved["scaler"])
    run.step, run.train_time, run.evals = saved["step"], saved["train_time"], saved["evals"]


def open_run_dir(run: Run, action: str) -> None:
    """Rank 0 prepares the directory: cleared for --overwrite, a finished result moved aside as history
    when the run is trained further, config.json, and the log cut back to the checkpoint's step."""
    if run.is_main:
        log_path = run.run_dir / "log.jsonl"
        if action == "new" and run.run_dir.exists():
            shutil.rmtree(run.run_dir)  # --overwrite, asked for explicitly
        run.run_dir.mkdir(parents=True, exist_ok=True)
        if action == "extend":  # the old result stays as history; the run is unfinished until the new one is written
            os.replace(run.run_dir / "results.json", run.run_dir / f"results-step{run.step:06d}.json")
            for name in ("per_class.csv", "per_class.png"):
                if (run.run_dir / name).exists():
                    os.replace(run.run_dir / name, run.run_dir / name.replace(".", f"-step{run.step:06d}."))
        write_json(run.run_dir / "config.json", run.config)
        if action != "new" and log_path.exists():  # drop log lines written after the checkpoint we resume from
            kept = [l for l in log_path.read_text().splitlines() if json.loads(l)["step"] <= run.step]
            atomic_write(log_path, lambda f: f.write("".join(l + "\n" for l in kept).encode()))
        run.log_file = open(log_path, "a")
    if run.world > 1:
        dist.barrier()


def training_model(run: Run, batches: TrainingBatches) -> nn.Module:
    """What the steps call: the model, wrapped in DDP over several processes, compiled when asked."""
    model = nn.parallel.DistributedDataParallel(run.model) if run.world > 1 else run.model
    if run.args.compile != "off":
        model = compile_model(model, run.model, run.args, batches.buffers, run.amp_dtype)
    return model


def take_step(run: Run, batches: TrainingBatches, train_model, meter: Meter, step: int) -> None:
    """Optimizer step `step` exactly as the loop takes it (bench.py times this very function): the step's
    batch into the input buffers, its lr, the global RNGs, forward, backward, AdamW, the EMA, the meter."""
    xt, t, y, noise = batches(step)
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(step, run.args)
    seed_global_rngs(run.args.seed, step, run.rank)
    if run.args.compile == "max":
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the graphs may reuse the last step's memory
    loss, grad_norm = train_step(train_model, xt, t, y, noise, run.optimizer, run.scaler, run.params,
                                 amp_dtype=run.amp_dtype, grad_clip=run.args.grad_clip)
    run.ema.update()
    meter.add(loss, grad_norm)
    run.step = step


@contextlib.contextmanager
def stop_signals():
    """SIGUSR1 (SLURM's warning before a time limit) and SIGTERM (preemption, `scontrol requeue`) ask the
    loop to stop at its next log point with a checkpoint, rather than dying mid-interval. Yields the
    list of signals received; the previous handlers come back afterwards."""
    received, previous = [], {}
    try:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main thread (signals can only be caught there): the signals keep their defaults
        pass
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(args, rank: int, world: int) -> dict | None:
    """One run. Rank 0 writes every file; with several processes each takes a slice of every global
    batch (drawn whole, so the run does not depend on their number)."""
    # 1. Setup: what the run directory holds decides what happens; then the model, EMA, AdamW, data, scorers.
    run_dir = Path(args.out_dir) / args.run_name
    config = run_config(args, world, count_parameters=False)
    action, saved = plan_run(args, config, run_dir)
    if action == "done":
        if rank == 0:
            print(f"{run_dir} finished with these options and code; nothing to do", file=sys.stderr)
        return saved
    config.update(parameter_count(args))
    run, batches = build_run(args, rank, world, config, run_dir)

    # 2. Resume: a checkpoint (interrupted, or a finished run asked for more steps) continues exactly.
    if saved is not None:
        restore(run, saved)
        if rank == 0:
            print(f"{'resumed' if action == 'resume' else 'training on'} {run_dir} at step {run.step}", file=sys.stderr)
    open_run_dir(run, action)
    train_model = training_model(run, batches)

    # 3. The loop: a step (with the EMA), and at log points the one host sync, evaluations, checkpoints, and
    # the stop a signal asked for (after the step's evaluation, so that the resumed run misses nothing).
    run.model.train()
    pbar = tqdm(total=args.steps, initial=run.step, desc=run_dir.name, dynamic_ncols=True, unit="step", disable=rank > 0)
    meter = Meter(run.device, run.scaler.is_enabled())
    with stop_signals() as received:
        while run.step < args.steps:
            step = run.step + 1
            take_step(run, batches, train_model, meter, step)
            pbar.update(1)
            last = step == args.steps
            evaluating = (step % args.eval_every == 0 or last) and not (last and args.fid_samples == 0)
            checkpointing = step % args.ckpt_every == 0 or last
            if step % args.log_every == 0 or evaluating or checkpointing:
                stop = log_point(run, meter, pbar, stop_requested=bool(received))
                if evaluating:
                    run.evals.append(evaluate(run, f"step{step:06d}", args.fid_samples))
                if checkpointing or stop:
                    run.save_checkpoint()
                if stop:
                    pbar.close()
                    raise Preempted(f"preempted at step {step}: checkpoint written to {run_dir / 'checkpoint.pt'}; "
                                    f"continue with --resume")
                meter.start = time.perf_counter()
    pbar.close()

    # 4. The final, independent evaluation; 5. the results, written last and atomically.
    final = evaluate(run, "final", args.final_fid_samples)
    if not run.is_main:
        return None
    results = assemble_results(run, final)
    if results.get("per_class"):
        evaluation.write_per_class(results["per_class"], run.class_names, run_dir / "per_class.csv",
                                   run_dir / "per_class.png", f"{run_dir.name}, step {run.step}")
    write_json(run_dir / "results.json", results)
    run.log_file.close()
    print_results(results, run_dir)
    return results


# --------------------------------------------------------------------------------------------
# Scoring a finished run again (--evaluate): its checkpoint, its options, a new dated file.
# --------------------------------------------------------------------------------------------

# what --evaluate may change; every other option is the run's own (config.json)
EVALUATE_OPTIONS = ("final_fid_samples", "sample_batch_size", "ddim_steps", "fid", "fid_resize", "fid_cache", "panel",
                    "guidance", "guidance_interval", "guidance_samples", "data_dir", "cache_dir", "device", "precision",
                    "tf32", "deterministic", "heldout_draws", "label_draws", "metric_seed", "grid_per_class",
                    "save_samples")


def evaluation_args(args) -> tuple[argparse.Namespace, dict]:
    """The options of an --evaluate: the run's recorded ones (an option newer than the run: the value runs
    made before it used), then the evaluation options given on the command line; with --guidance, a new sweep,
    --guidance-interval and --guidance-samples are only those given with it. Refused in one line when RUN_DIR
    holds no checkpoint, or when a training option is given."""
    run_dir = Path(args.evaluate)
    missing = [name for name in ("config.json", "checkpoint.pt", "results.json") if not (run_dir / name).is_file()]
    if missing:
        raise HarnessError(f"--evaluate {run_dir}: not a finished run directory with its checkpoint (no "
                           f"{' or '.join(missing)}; finish it with --resume first)")
    refused = sorted(args.given - set(EVALUATE_OPTIONS) - {"evaluate", "dry_run"})
    if refused:
        raise HarnessError(f"--evaluate uses the run's own training options (from {run_dir / 'config.json'}); "
                           f"{', '.join('--' + n.replace('_', '-') for n in refused)} cannot be changed (it may change: "
                           f"{', '.join('--' + n.replace('_', '-') for n in EVALUATE_OPTIONS)})")
    recorded = json.loads((run_dir / "config.json").read_text())
    for name, o in ALL_OPTIONS.items():
        if name in args.given or name in ("evaluate", "dry_run"):
            continue
        if name in ("guidance_interval", "guidance_samples") and "guidance" in args.given:
            continue  # a new sweep: its interval and sample count are those given with it, not the recorded ones
        value = recorded.get(name, o.default if o.legacy is NO_LEGACY else o.legacy)
        setattr(args, name, Path(value) if o.kw.get("type") is Path and value is not None else value)
    if "device" not in args.given:
        args.device = None  # this machine's default, not the recorded one
    args.compile, args.adam = "off", "auto"  # nothing is trained
    args.image_size = recorded.get("image_size", IMAGE_SIZE[args.dataset])
    return args, recorded


def rescore(args, recorded: dict, rank: int, world: int) -> dict | None:
    """Sample and score RUN_DIR's checkpoint as its final evaluation would ("final" noise and labels), into
    RUN_DIR/evaluation-DATE.json (+ -grid.png, and the per-class CSV and plot where the panel is on)."""
    run_dir = Path(args.evaluate)
    if recorded.get("method_sha256") != args.method_sha256:
        raise HarnessError(f"{run_dir} was made by other code for method '{args.method}' (sha256 "
                           f"{(recorded.get('method_sha256') or 'unrecorded')[:8]}, now {args.method_sha256[:8]}): its "
                           f"weights belong to that code; restore it (config.json holds its method_source) to score it")
    config = run_config(args, world)
    run, _ = build_run(args, rank, world, config, run_dir)
    saved = load_checkpoint(run_dir / "checkpoint.pt")
    finished = json.loads((run_dir / "results.json").read_text())["steps"]
    if saved["step"] != finished:
        raise HarnessError(f"--evaluate {run_dir}: its checkpoint is at step {saved['step']}, its results.json at step "
                           f"{finished} (an extension was interrupted?); finish it with --resume first")
    try:
        run.model.load_state_dict(saved["model"])
        run.ema.module.load_state_dict(saved["ema"])
    except RuntimeError as e:
        raise HarnessError(f"--evaluate {run_dir}: its checkpoint does not fit the model its options build "
                           f"({str(e).splitlines()[0]})") from e
    run.step = saved["step"]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = next(f"evaluation-{stamp}" + (f"-{i}" if i else "") for i in range(1000)
                if not (run_dir / f"evaluation-{stamp}{f'-{i}' if i else ''}.json").exists())
    record = evaluate(run, "final", args.final_fid_samples, files=name)
    if not run.is_main:
        return None
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in EVALUATE_OPTIONS}
    result = dict(run_dir=str(run_dir), method=args.method, scale=args.scale, dataset=args.dataset, seed=args.seed,
                  **{k: v for k, v in record.items() if k != "eval"}, made_at=stamp, options=options,
                  world_size=world, git_commit=config["git_commit"], git_dirty=config["git_dirty"], **made_on(run.device))
    if result.get("per_class"):
        evaluation.write_per_class(result["per_class"], run.class_names, run_dir / f"{name}-per_class.csv",
                                   run_dir / f"{name}-per_class.png", f"{run_dir.name}, step {run.step}")
    write_json(run_dir / f"{name}.json", result)
    print_results(result, run_dir)
    print(f"  {'written':<15} {run_dir / (name + '.json')}")
    return result


# --------------------------------------------------------------------------------------------
# main: the exits that need no training, then one run.
# --------------------------------------------------------------------------------------------

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
    # rank 0 alone scores each evaluation (50,000 images through the Inception) while the others wait at a
    # barrier: a longer timeout than NCCL's default ten minutes, so a slow host does not kill the run
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), world


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.list_methods:
        width = max(map(len, conditioning.METHODS))
        for name, m in conditioning.METHODS.items():
            print(f"{name:<{width}}  {m.summary}")
        return None
    get_method(args.method)
    if args.count_params:
        result = dict(scale=args.scale, method=args.method, **parameter_count(args))
        print(json.dumps(result))
        return result
    if args.prefetch:
        if args.fid_cache is None:
            raise HarnessError("--prefetch needs --fid-cache DIR: the folder that runs will be given")
        try:
            prefetch(Path(args.data_dir), args.fid_cache, args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                     args.panel)
        except evaluation.AssetError as e:
            raise HarnessError(str(e)) from e
        return None
    recorded = None
    if args.evaluate is not None:
        args, recorded = evaluation_args(args)
    resolve_defaults(args)
    if args.dry_run:
        return dry_run(args, run_config(args, int(os.environ.get("WORLD_SIZE", "1"))),
                       Path(args.evaluate or Path(args.out_dir) / args.run_name))
    rank, world = init_distributed(args)
    try:
        result = train(args, rank, world) if recorded is None else rescore(args, recorded, rank, world)
    except Preempted:
        if world > 1:  # every rank stopped at the same log point, with the checkpoint written: leave together
            dist.barrier()
            dist.destroy_process_group()
        raise
    if world > 1:
        # Leave together, and only on success: a rank that tears gloo down while a peer still works can abort
        # (SIGABRT), and tearing down after an error can hang on a peer's collective; torchrun stops the rest.
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    try:
        main()
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Preempted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(e, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
