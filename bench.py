"""Training and evaluation speed, every variant measured side by side in one run.

    python bench.py                                        # CPU: tiny scale, a few minutes
    python bench.py --scales small medium large --out b.md # GPU: the protocol scales
    python bench.py --sync-check                           # GPU: does the default step wait for the device?

Per scale: ms/step and images/s of a plain training loop written as a careful user would (a DataLoader
with persistent workers over the images in pinned host memory, loss.item() for the progress bar every
step, a per-parameter EMA) against the harness's default step (data on the device, fused AdamW on CUDA
and foreach on the CPU, as --adam auto; no host sync; a foreach EMA) and each option on top of it, with
the ratio to the plain loop and the MFU from FLOPs counted by torch's FlopCounterMode; then DDIM sampling
images/s and the FID resize (clean-fid's per-image PIL against clean_resize_torch). Each scale's table is
printed, and appended to --out, as soon as it is measured, so a run stopped by a time limit keeps them.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import custom_train as ct

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


class Setup:
    """A model, its EMA, AdamW and the scaler, built as the harness builds them for these options."""

    def __init__(self, scale, method, options: dict, device, image_size=32):
        torch.manual_seed(0)
        self.model = ct.build_model(scale, method, image_size).to(device)
        if options.get("channels_last"):
            self.model.to(memory_format=torch.channels_last)
        self.ema = ct.EMA(self.model, 0.9995)
        self.params = list(self.model.parameters())
        precision = options.get("precision", "fp16" if device.type == "cuda" else "fp32")
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        adam = options.get("adam", default_adam(device))
        self.optimizer = torch.optim.AdamW(self.params, lr=2e-4, weight_decay=1e-4, **{adam: True})
        self.train_model = torch.compile(self.model) if options.get("compile") else self.model
        self.noise_scheduler = ct.ddpm_scheduler()

    def step(self, x_uint8, y, channels_last: bool):
        """One protocol training step from uint8 images: flips, timesteps, noise, the harness's train_step."""
        device = x_uint8.device
        x0 = x_uint8.float() / 127.5 - 1
        x0 = torch.where(torch.rand(len(x0), 1, 1, 1, device=device) < 0.5, x0.flip(3), x0)
        t = torch.randint(0, ct.TRAIN_TIMESTEPS, (len(x0),), device=device)
        noise = torch.randn_like(x0)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        if channels_last:
            xt = xt.contiguous(memory_format=torch.channels_last)
        return ct.train_step(self.train_model, xt, t, y, noise, self.optimizer, self.scaler, self.params,
                             amp_dtype=self.amp_dtype, grad_clip=1.0)


def time_training(scale, method, options: dict, *, batch_size, steps, warmup, device, image_size=32) -> float:
    """Seconds per optimizer step for one variant, after `warmup` untimed steps."""
    s = Setup(scale, method, options, device, image_size)
    n = 50_000 if device.type == "cuda" else 4 * batch_size  # CIFAR-10's size on a GPU
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    if options.get("loader"):
        workers = 4 if device.type == "cuda" else 0
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=batch_size,
                                             shuffle=True, drop_last=True, pin_memory=device.type == "cuda",
                                             num_workers=workers, persistent_workers=workers > 0)
        batches = iter(loader)
    else:
        images, labels = images.to(device), labels.to(device)

    def step():
        nonlocal batches
        if options.get("loader"):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        else:
            idx = torch.randint(0, n, (batch_size,), device=device)
            x, y = images[idx], labels[idx]
        loss, _ = s.step(x, y, options.get("channels_last", False))
        if options.get("loader"):  # the plain loop: per-parameter EMA and a host sync for the progress bar
            with torch.no_grad():
                for e, p in zip(s.ema.averaged, s.ema.source):
                    e.mul_(0.9995).add_(p, alpha=0.0005)
            loss.item()
        else:
            s.ema.update()

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def sync_check(scale, method, device, batch_size: int, steps: int = 5) -> str:
    """Runs the harness's default training step (fp16, fused AdamW, scaler, foreach EMA) under
    torch.cuda.set_sync_debug_mode("error"): any host sync in the step raises."""
    if device.type != "cuda":
        return "sync check: CUDA only (on the CPU see tests/test_gpu_paths.py, which counts them)"
    s = Setup(scale, method, {}, device)
    x = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    meter = ct.Meter(device, s.scaler.is_enabled())
    for _ in range(2):  # warm-up: first-call allocations and lazy initialisation may sync
        meter.add(*s.step(x, y, False))
        s.ema.update()
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            meter.add(*s.step(x, y, False))
            s.ema.update()
        found = "none"
    except RuntimeError as e:
        found = f"FOUND: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return (f"sync check ({scale}, batch {batch_size}, {steps} steps of the default fp16 step with fused AdamW, the "
            f"scaler, the EMA and the log meter, under torch.cuda.set_sync_debug_mode('error')): host syncs {found}")


def time_sampling(scale, method, *, batch_size, ddim_steps_timed, device, image_size=32) -> float:
    """Images per second of 50-step DDIM, from `ddim_steps_timed` timed denoiser calls."""
    torch.manual_seed(0)
    model = ct.build_model(scale, method, image_size).to(device).eval()
    amp_dtype = torch.float16 if device.type == "cuda" else None
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    t = torch.tensor(500, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        model(x, t, y)
        sync(device)
        start = time.perf_counter()
        for _ in range(ddim_steps_timed):
            model(x, t, y)
        sync(device)
    per_call = (time.perf_counter() - start) / ddim_steps_timed
    return batch_size / (per_call * 50)


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
    ct.clean_resize_torch(on_device[:2])
    sync(device)
    start = time.perf_counter()
    for i in range(0, n, 250):
        ct.clean_resize_torch(on_device[i:i + 250])
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
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 20 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 CUDA, 2 CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the scale's protocol batch (CPU: 32)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to build; at the first scale "
                                                          "only)")
    p.add_argument("--sync-check", action="store_true", help="only check the default step for host syncs (CUDA)")
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

    adam = default_adam(device)
    other_adam = "foreach" if adam == "fused" else "fused"
    variants = [("plain loop (DataLoader with persistent workers, item() every step, per-parameter EMA)", dict(loader=True)),
                (f"default (data on device, {adam} AdamW, no per-step sync, foreach EMA)", dict()),
                (f"{other_adam} AdamW instead" + (" (the scaler syncs every step)" if cuda else ""), dict(adam=other_adam)),
                ("+ channels_last", dict(channels_last=True))]
    if cuda:
        variants.append(("+ bf16 autocast (no scaler)", dict(precision="bf16")))
    out = [f"# Speed on {name} (torch {torch.__version__}, method {args.method}, {steps} timed steps after {warmup})\n"]
    emit(out[0], args.out)
    for i, scale in enumerate(scales):
        batch = args.batch_size or (ct.SCALES[scale].batch_size if cuda else 32)
        model = ct.build_model(scale, args.method).to(device)
        flops = flops_per_image(model, 32, device)
        del model
        rows, results = [], {}
        scale_variants = variants + ([("+ torch.compile", dict(compile=True))] if args.compile and i == 0 else [])
        for label, options in scale_variants:
            results[label] = time_training(scale, args.method, options, batch_size=batch, steps=steps,
                                           warmup=warmup, device=device)
        default = results[variants[1][0]]
        best = {k: v for label, o in scale_variants[2:] if results[label] < default for k, v in o.items()}
        best_label = "best combination: " + (", ".join(f"{k}={v}" for k, v in best.items()) or "default")
        results[best_label] = time_training(scale, args.method, best, batch_size=batch, steps=steps,
                                            warmup=warmup, device=device)
        plain = results[variants[0][0]]
        for label, seconds in results.items():
            images_per_s = batch / seconds
            mfu = f"{100 * flops * images_per_s / (peak * 1e12):.1f}%" if peak else "-"
            rows.append(f"| {label} | {1000 * seconds:.1f} | {images_per_s:,.0f} | {plain / seconds:.2f}x | {mfu} |")
        sample_batch = 500 if cuda else 50
        sampling = time_sampling(scale, args.method, batch_size=sample_batch, ddim_steps_timed=5 if cuda else 2,
                                 device=device)
        section = [f"\n## {scale} (batch {batch}, {flops / 1e9:.2f} GFLOP per image forward+backward)\n",
                   "| training variant | ms/step | images/s | vs plain loop | MFU |\n|---|---|---|---|---|", *rows,
                   f"\nDDIM sampling, 50 steps, batch {sample_batch}: {sampling:,.1f} images/s"]
        if cuda:  # a 35k-step run at the best combination, and the whole protocol evaluation, for scale
            section.append(f"35,000 steps at the best combination: {35_000 * results[best_label] / 60:.1f} min; "
                           f"50,000 samples: {50_000 / sampling / 60:.1f} min")
        out.append("\n".join(section))
        emit(out[-1], args.out)
    pil_ms, ours_ms = time_resize(1000 if cuda else 200, device)
    out.append(f"\n## FID resize 32 -> 299\n\n| resize | ms per 1,000 images |\n|---|---|\n"
               f"| clean-fid PIL, per image, CPU | {pil_ms:,.0f} |\n| clean_resize_torch on {device.type} | "
               f"{ours_ms:,.1f} |\n| ratio | {pil_ms / ours_ms:.1f}x |")
    emit(out[-1], args.out)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
