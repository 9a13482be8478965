"""Training and evaluation speed, every variant measured side by side in one run.

    python bench.py                                        # CPU: tiny scale, a few minutes
    python bench.py --scales small medium large --out b.md # GPU: the protocol scales

Per scale: training ms/step and images/s of the plain protocol loop (DataLoader from host memory,
a loss.item() every step, a per-parameter EMA loop) against the harness's default path (data on the
device, no per-step sync, foreach EMA) and each speed option on top of it, with the ratio to the
protocol loop and the MFU from FLOPs counted by torch's FlopCounterMode; then DDIM sampling images/s
and the FID resize, clean-fid's per-image PIL against clean_resize_torch, in ms per 1,000 images.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

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


def time_training(scale, method, options: dict, *, batch_size, steps, warmup, device, image_size=32) -> float:
    """Seconds per optimizer step for one variant, after `warmup` untimed steps."""
    torch.manual_seed(0)
    model = ct.build_model(scale, method, image_size).to(device)
    if options.get("channels_last"):
        model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    precision = options.get("precision", "fp16" if device.type == "cuda" else "fp32")
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-4,
                                  **(dict(fused=True) if options.get("fused_adam") else dict(foreach=True)))
    train_model = torch.compile(model) if options.get("compile") else model
    noise_scheduler = ct.ddpm_scheduler()
    n = max(4 * batch_size, 1024)
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    if options.get("loader"):
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=batch_size,
                                             shuffle=True, drop_last=True, pin_memory=device.type == "cuda",
                                             num_workers=2 if device.type == "cuda" else 0)
        batches = iter(())
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
        x0 = x.float() / 127.5 - 1
        x0 = torch.where(torch.rand(batch_size, 1, 1, 1, device=device) < 0.5, x0.flip(3), x0)
        t = torch.randint(0, ct.TRAIN_TIMESTEPS, (batch_size,), device=device)
        noise = torch.randn_like(x0)
        xt = noise_scheduler.add_noise(x0, noise, t)
        if options.get("channels_last"):
            xt = xt.contiguous(memory_format=torch.channels_last)
        loss, _ = ct.train_step(train_model, xt, t, y, noise, optimizer, scaler, params, amp_dtype=amp_dtype,
                                grad_clip=1.0)
        if options.get("loader"):  # the plain loop: per-parameter EMA and a host sync for the progress bar
            with torch.no_grad():
                for e, p in zip(ema_params, params):
                    e.mul_(0.9995).add_(p, alpha=0.0005)
            loss.item()
        else:
            torch._foreach_lerp_(ema_params, params, 0.0005)

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


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


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", nargs="*", default=None, help="default: tiny on CPU, small medium large on CUDA")
    p.add_argument("--method", default="cross-attn", help="the conditioning method of the timed model")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 20 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 CUDA, 2 CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the scale's protocol batch (CPU: 32)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to build on a CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="also write the tables (markdown) to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    scales = args.scales or (["small", "medium", "large"] if cuda else ["tiny"])
    steps, warmup = args.steps or (20 if cuda else 5), args.warmup or (10 if cuda else 2)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None) if cuda else None

    variants = [("protocol loop (DataLoader, item() per step, per-parameter EMA)", dict(loader=True)),
                ("default (data on device, no per-step sync, foreach EMA)", dict()),
                ("+ fused AdamW", dict(fused_adam=True)),
                ("+ channels_last", dict(channels_last=True))]
    if cuda:
        variants.append(("+ bf16 autocast (no scaler)", dict(precision="bf16")))
    if cuda or args.compile:
        variants.append(("+ torch.compile", dict(compile=True)))
    out = [f"# Speed on {name} (torch {torch.__version__}, method {args.method}, {steps} timed steps after "
           f"{warmup})\n"]
    for scale in scales:
        batch = args.batch_size or (ct.SCALES[scale].batch_size if cuda else 32)
        model = ct.build_model(scale, args.method).to(device)
        flops = flops_per_image(model, 32, device)
        del model
        rows, results = [], {}
        for label, options in variants:
            results[label] = time_training(scale, args.method, options, batch_size=batch, steps=steps,
                                           warmup=warmup, device=device)
        default = results[variants[1][0]]
        best = {k: v for label, o in variants[2:] if results[label] < default for k, v in o.items()}
        best_label = "best combination: " + (", ".join(f"{k}={v}" for k, v in best.items()) or "default")
        results[best_label] = time_training(scale, args.method, best, batch_size=batch, steps=steps,
                                            warmup=warmup, device=device)
        protocol = results[variants[0][0]]
        for label, seconds in results.items():
            images_per_s = batch / seconds
            mfu = f"{100 * flops * images_per_s / (peak * 1e12):.1f}%" if peak else "-"
            rows.append(f"| {label} | {1000 * seconds:.1f} | {images_per_s:,.0f} | {protocol / seconds:.2f}x | {mfu} |")
        sample_batch = 500 if cuda else 50
        sampling = time_sampling(scale, args.method, batch_size=sample_batch, ddim_steps_timed=5 if cuda else 2,
                                 device=device)
        out.append(f"\n## {scale} (batch {batch}, {flops / 1e9:.2f} GFLOP per image forward+backward)\n")
        out.append("| training variant | ms/step | images/s | vs protocol loop | MFU |\n|---|---|---|---|---|")
        out += rows
        out.append(f"\nDDIM sampling, 50 steps, batch {sample_batch}: {sampling:,.1f} images/s")
        if cuda:  # a 35k-step run at the best combination, and the whole protocol evaluation, for scale
            out.append(f"35,000 steps at the best combination: {35_000 * results[best_label] / 60:.1f} min; "
                       f"50,000 samples: {50_000 / sampling / 60:.1f} min")
    pil_ms, ours_ms = time_resize(1000 if cuda else 200, device)
    out.append(f"\n## FID resize 32 -> 299\n\n| resize | ms per 1,000 images |\n|---|---|\n"
               f"| clean-fid PIL, per image, CPU | {pil_ms:,.0f} |\n| clean_resize_torch on {device.type} | "
               f"{ours_ms:,.1f} |\n| ratio | {pil_ms / ours_ms:.1f}x |")
    table = "\n".join(out) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return table


if __name__ == "__main__":
    main()
