"""Training and evaluation speed, every variant measured side by side in one run.

    python bench.py                                        # CPU: tiny scale, a few minutes
    python bench.py --scales small medium large --out b.md # GPU: the protocol scales
    python bench.py --scales small --variants default compile compile-max   # GPU: compiled and graphed steps
    python bench.py --sync-check                           # GPU: does the harness wait for the device?

Per scale: ms/step and images/s of a plain training loop written as a careful user would (a DataLoader
with persistent workers over the images in pinned host memory, loss.item() for the progress bar every
step, a per-parameter EMA) against the harness itself: a run built by custom_train.build_run and stepped
by custom_train.take_step, the very functions train() calls (configure_backends, TrainingBatches,
seed_global_rngs, train_step, the EMA, the Meter), with its defaults (fused AdamW on CUDA, foreach on the
CPU; no host sync) and each speed option on top of it; the ratio to the first row and the MFU from FLOPs
counted by torch's FlopCounterMode; then DDIM sampling images/s through custom_train.sample and the FID
resize (clean-fid's per-image PIL against clean_resize_torch). Each scale's table is printed, and
appended to --out, as soon as it is measured, so a run stopped by a time limit keeps them.
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import torch

import custom_train as ct
import evaluation

# Dense bf16/fp16 tensor-core peak by device name (datasheet values), for MFU; None elsewhere.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_image(model, image_size: int, device) -> float:
    """Forward + backward FLOPs for one image, counted on a batch of 2."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, image_size, image_size, device=device)
    t, y = torch.tensor([10, 500], device=device), torch.tensor([0, 1], device=device)
    with FlopCounterMode(display=False) as counter:
        model(x, t, y).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def default_adam(device) -> str:
    return "fused" if device.type == "cuda" else "foreach"


# The harness's variants: custom_train.py options on top of its defaults, timed through train()'s own step.
VARIANTS = {
    "default": [],
    "adam-other": None,  # the AdamW kernel that --adam auto does not pick on this device
    "channels-last": ["--channels-last"],
    "bf16": ["--precision", "bf16"],
    "compile": ["--compile"],
    "compile-max": ["--compile", "max"],
}
LABELS = {
    "plain": "plain loop (DataLoader with persistent workers, item() every step, per-parameter EMA)",
    "default": "default (data on device, {adam} AdamW, no per-step sync, foreach EMA)",
    "adam-other": "{other} AdamW instead",
    "channels-last": "+ channels_last",
    "bf16": "+ bf16 autocast (no scaler)",
    "compile": "+ torch.compile",
    "compile-max": "+ torch.compile, CUDA graphs (--compile max)",
}


def harness_options(variant: str, device) -> list[str]:
    if variant == "adam-other":
        return ["--adam", "foreach" if default_adam(device) == "fused" else "fused"]
    return VARIANTS[variant]


class Harness:
    """A run built by custom_train.build_run for these options (configure_backends, the model, its EMA,
    AdamW and the scaler, TrainingBatches over `images`), stepped by custom_train.take_step: the very
    functions train() calls (seed_global_rngs, train_step, the EMA, the Meter), not a copy of them."""

    def __init__(self, scale, method, options: list[str], device, batch_size, images, labels, run_dir: Path):
        args = ct.parse_args(["--scale", scale, "--method", method, "--device", str(device), "--batch-size",
                              str(batch_size), "--fid", "off", "--heldout-draws", "0", *options])
        ct.resolve_defaults(args)
        config = ct.run_config(args, 1)
        self.run, self.batches = ct.build_run(args, 0, 1, config, run_dir, data=(images, labels, []))
        self.train_model = ct.training_model(self.run, self.batches)
        self.meter = ct.Meter(self.run.device, self.run.scaler.is_enabled())

    def step(self):
        ct.take_step(self.run, self.batches, self.train_model, self.meter, self.run.step + 1)


def plain_loop(scale, method, device, batch_size, images, labels):
    """The protocol loop as a careful user writes it: a DataLoader from host memory (pinned, persistent
    workers on a GPU), flips, timesteps and noise drawn per batch, the harness's train_step, a
    per-parameter EMA and loss.item() for the progress bar every step."""
    torch.manual_seed(0)
    model = ct.build_model(scale, method).to(device)
    ema = ct.EMA(model, 0.9995)
    params = list(model.parameters())
    cuda = device.type == "cuda"
    amp_dtype = torch.float16 if cuda else None
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-4, **{default_adam(device): True})
    noise_scheduler = ct.ddpm_scheduler()
    workers = 4 if cuda else 0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(images), torch.from_numpy(labels)),
                                         batch_size=batch_size, shuffle=True, drop_last=True, pin_memory=cuda,
                                         num_workers=workers, persistent_workers=workers > 0)
    batches = iter(loader)

    def step():
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x0 = x.float() / 127.5 - 1
        x0 = torch.where(torch.rand(len(x0), 1, 1, 1, device=device) < 0.5, x0.flip(3), x0)
        t = torch.randint(0, ct.TRAIN_TIMESTEPS, (len(x0),), device=device)
        noise = torch.randn_like(x0)
        loss, _ = ct.train_step(model, noise_scheduler.add_noise(x0, noise, t), t, y, noise, optimizer, scaler, params,
                                amp_dtype=amp_dtype, grad_clip=1.0)
        with torch.no_grad():
            for e, p in zip(ema.averaged, ema.source):
                e.mul_(0.9995).add_(p, alpha=0.0005)
        loss.item()
    return step


def time_steps(step, steps: int, warmup: int, device) -> float:
    """Seconds per optimizer step, after `warmup` untimed steps (compilation and autotuning happen there)."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


@functools.lru_cache(maxsize=2)
def fake_data(device, image_size=32):
    """Random uint8 images and labels: CIFAR-10's size on a GPU, a few batches on the CPU (made once)."""
    n = 50_000 if device.type == "cuda" else 256
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g).numpy(),
            torch.randint(0, 10, (n,), generator=g).numpy())


def time_training(scale, method, variant: str, *, batch_size, steps, warmup, device, options=None) -> float:
    """Seconds per optimizer step for one variant ("plain", or the harness with `options`, by default the
    variant's own)."""
    images, labels = fake_data(device)
    if variant == "plain":
        return time_steps(plain_loop(scale, method, device, batch_size, images, labels), steps, warmup, device)
    with tempfile.TemporaryDirectory() as run_dir:
        harness = Harness(scale, method, harness_options(variant, device) if options is None else options, device,
                          batch_size, images, labels, Path(run_dir))
        return time_steps(harness.step, steps, warmup, device)


def sync_check(scale, method, device, batch_size: int, steps: int = 5) -> str:
    """The harness's default training step (fp16, fused AdamW, the scaler, the EMA, the meter), then DDIM
    sampling and the held-out metrics, under torch.cuda.set_sync_debug_mode("warn"): every host sync
    warns, and the warnings are counted. A step should make none; sampling and the held-out metrics one
    each, at the end."""
    if device.type != "cuda":
        return "sync check: CUDA only (on the CPU see tests/test_gpu_paths.py, which counts them)"
    import warnings

    images, labels = fake_data(device)
    with tempfile.TemporaryDirectory() as run_dir:
        h = Harness(scale, method, [], device, batch_size, images, labels, Path(run_dir))
        for _ in range(2):  # warm-up: first-call allocations and lazy initialisation may sync
            h.step()
        sync(device)
        heldout = ct.HeldOutMetrics(images[:250], labels[:250], device, draws=2, label_draws=1, metric_seed=0,
                                    batch_size=500)
        kw = dict(seed=0, tag="sync", batch_size=100, ddim_steps=10, image_size=32, amp_dtype=h.run.amp_dtype,
                  device=device)
        ct.sample(h.run.model, torch.arange(10), **kw)  # warm-up
        counts = {}
        for name, work in ((f"{steps} training steps", lambda: [h.step() for _ in range(steps)]),
                           ("sampling 200 images, 10 DDIM steps", lambda: ct.sample(h.run.model, torch.arange(200) % 10, **kw)),
                           ("held-out metrics, 250 images", lambda: heldout(h.run.model, h.run.amp_dtype))):
            sync(device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    work()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts[name] = sum("synchroniz" in str(w.message) for w in caught)
    found = "; ".join(f"{name}: {n}" for name, n in counts.items())
    return (f"sync check ({scale}, batch {batch_size}, fp16, fused AdamW, the scaler, the EMA and the meter; host syncs "
            f"counted under torch.cuda.set_sync_debug_mode('warn'); expected 0, 1, 1): {found}")


def time_sampling(scale, method, *, batch_size, ddim_steps_timed, device, image_size=32) -> float:
    """Images per second of 50-step DDIM through the harness's own sampler (custom_train.sample: its
    device timesteps, scheduler and copy back included), extrapolated from `ddim_steps_timed` steps."""
    torch.manual_seed(0)
    model = ct.build_model(scale, method, image_size).to(device)
    kw = dict(seed=0, tag="bench", batch_size=batch_size, ddim_steps=ddim_steps_timed, image_size=image_size,
              amp_dtype=torch.float16 if device.type == "cuda" else None, device=device)
    labels = torch.arange(batch_size) % ct.NUM_CLASSES
    ct.sample(model, labels, **kw)  # warm-up (cuDNN's autotuner, allocations)
    start = time.perf_counter()
    ct.sample(model, labels, **kw)  # ends with the copy to the host: no sync needed
    per_step = (time.perf_counter() - start) / ddim_steps_timed
    return batch_size / (per_step * 50)


def time_resize(n: int, device) -> tuple[float, float]:
    """ms per 1,000 images: clean-fid's PIL resizer (one image at a time on the CPU) and ours."""
    from cleanfid.resize import build_resizer

    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    pil = build_resizer("clean")
    start = time.perf_counter()
    for img in images.permute(0, 2, 3, 1).numpy():
        pil(img)
    pil_ms = (time.perf_counter() - start) * 1000 / n * 1000
    on_device = images.to(device)
    evaluation.clean_resize_torch(on_device[:2])
    sync(device)
    start = time.perf_counter()
    for i in range(0, n, 250):
        evaluation.clean_resize_torch(on_device[i:i + 250])
    sync(device)
    ours_ms = (time.perf_counter() - start) * 1000 / n * 1000
    return pil_ms, ours_ms


def emit(section: str, out: Path | None) -> None:
    """Print a finished section and append it to --out at once."""
    print(section, flush=True)
    if out is not None:
        with open(out, "a") as f:
            f.write(section + "\n")


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", nargs="*", default=None, help="default: tiny on CPU, small medium large on CUDA")
    p.add_argument("--method", default="cross-attn", help="the conditioning method of the timed model")
    p.add_argument("--variants", nargs="+", default=None, choices=["plain", *VARIANTS, "best"],
                   help="the rows to time, side by side (default: plain default adam-other channels-last, bf16 on "
                        "CUDA, best); best combines the options of the rows faster than default; compile and "
                        "compile-max compile in their warm-up steps (minutes on a GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 20 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 CUDA, 2 CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the scale's protocol batch (CPU: 32)")
    p.add_argument("--no-sampling", action="store_true", help="skip the DDIM sampling and FID resize measurements")
    p.add_argument("--sync-check", action="store_true", help="only count the host syncs of the default step, of "
                                                             "sampling and of the held-out metrics (CUDA)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) to this file, as they come")
    args = p.parse_args(argv)
    for name in ("steps", "warmup", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    scales = args.scales or (["small", "medium", "large"] if cuda else ["tiny"])
    steps, warmup = args.steps or (20 if cuda else 5), args.warmup or (10 if cuda else 2)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None) if cuda else None
    if args.out is not None:
        args.out.write_text("")
    if args.sync_check:
        line = sync_check(scales[0], args.method, device, args.batch_size or ct.SCALES[scales[0]].batch_size)
        emit(line, args.out)
        return line

    variants = args.variants or ["plain", "default", "adam-other", "channels-last", *(["bf16"] if cuda else []), "best"]
    adam = default_adam(device)
    labels = {v: LABELS[v].format(adam=adam, other="foreach" if adam == "fused" else "fused") for v in LABELS}
    out = [f"# Speed on {name} (torch {torch.__version__}, method {args.method}, {steps} timed steps after {warmup})\n"]
    emit(out[0], args.out)
    for scale in scales:
        batch = args.batch_size or (ct.SCALES[scale].batch_size if cuda else 32)
        model = ct.build_model(scale, args.method).to(device)
        flops = flops_per_image(model, 32, device)
        del model
        results = {}
        for variant in variants:
            timing = dict(batch_size=batch, steps=steps, warmup=warmup, device=device)
            if variant != "best":
                results[labels[variant]] = time_training(scale, args.method, variant, **timing)
                continue
            default = results.get(labels["default"]) or time_training(scale, args.method, "default", **timing)
            faster = [v for v in ("adam-other", "channels-last", "bf16") if results.get(labels[v], default) < default]
            options = [o for v in faster for o in harness_options(v, device)]
            results["best combination: " + (", ".join(faster) or "default")] = time_training(
                scale, args.method, "default", options=options, **timing)
        first = next(iter(results.values()))  # ratios against the first row (the plain loop, by default)
        rows = []
        for label, seconds in results.items():
            images_per_s = batch / seconds
            mfu = f"{100 * flops * images_per_s / (peak * 1e12):.1f}%" if peak else "-"
            rows.append(f"| {label} | {1000 * seconds:.1f} | {images_per_s:,.0f} | {first / seconds:.2f}x | {mfu} |")
        section = [f"\n## {scale} (batch {batch}, {flops / 1e9:.2f} GFLOP per image forward+backward)\n",
                   f"| training variant | ms/step | images/s | vs {variants[0]} | MFU |\n|---|---|---|---|---|", *rows]
        if not args.no_sampling:
            sample_batch = 500 if cuda else 50
            sampling = time_sampling(scale, args.method, batch_size=sample_batch, ddim_steps_timed=5 if cuda else 2,
                                     device=device)
            section.append(f"\nDDIM sampling, 50 steps, batch {sample_batch}: {sampling:,.1f} images/s")
            if cuda:  # a 35k-step run at the fastest row, and the whole protocol evaluation, for scale
                section.append(f"35,000 steps at the fastest row: {35_000 * min(results.values()) / 60:.1f} min; "
                               f"50,000 samples: {50_000 / sampling / 60:.1f} min")
        out.append("\n".join(section))
        emit(out[-1], args.out)
    if not args.no_sampling:
        pil_ms, ours_ms = time_resize(1000 if cuda else 200, device)
        out.append(f"\n## FID resize 32 -> 299\n\n| resize | ms per 1,000 images |\n|---|---|\n"
                   f"| clean-fid PIL, per image, CPU | {pil_ms:,.0f} |\n| clean_resize_torch on {device.type} | "
                   f"{ours_ms:,.1f} |\n| ratio | {pil_ms / ours_ms:.1f}x |")
        emit(out[-1], args.out)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
