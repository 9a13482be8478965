"""The CUDA code paths, run on the CPU: fp16 autocast with the gradient scaler and fused AdamW (the default
on CUDA), bf16, forced overflows, an exact fp16 resume, the host syncs of a step, memory layouts with
channels_last, the compile probe's input, and the TF32, cuDNN and determinism settings.

torch 2.14 runs fp16/bf16 autocast and the gradient scaler on the CPU with the same scaler and optimizer
code as on CUDA. Where CPU autocast differs from CUDA's: it keeps fewer ops in fp32 (GroupNorm runs in
fp16 on the CPU, in fp32 on CUDA), so the numbers are not CUDA's, but every code path is."""
import json
import os

import pytest
import torch

import custom_train
import evaluation
from conftest import Spy, crash_at_step
from custom_train import HarnessError

FAST = ["--scale", "tiny", "--batch-size", "4", "--ddim-steps", "2", "--grid-per-class", "1",
        "--sample-batch-size", "8", "--heldout-draws", "0", "--fid", "off"]


def run(tmp_path, cifar_dir, *extra, method="concat-film"):
    return custom_train.main(FAST + ["--method", method, "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path / "runs"),
                                     *map(str, extra)])


def run_fp16(tmp_path, *extra):
    """fp16 on the CPU is slow at 32x32 (0.7 s a step here): these runs use the 16x16 digits."""
    return custom_train.main(FAST + ["--method", "concat-film", "--dataset", "digits", "--out-dir", str(tmp_path / "runs"),
                                     "--precision", "fp16", *map(str, extra)])


DIGITS = "digits-tiny-concat-film-s42"


def log_lines(tmp_path, name="tiny-concat-film-s42"):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return [json.loads(line, parse_constant=refuse) for line in (tmp_path / "runs" / name / "log.jsonl").read_text().splitlines()]


def ckpt(tmp_path, name="tiny-concat-film-s42"):
    return torch.load(tmp_path / "runs" / name / "checkpoint.pt", weights_only=False)


@pytest.fixture(autouse=True)
def restore_backend_flags():
    """The harness sets process-wide flags for its run; put them back for the tests that follow."""
    b = torch.backends
    saved = (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.benchmark, b.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.benchmark, b.cudnn.deterministic = saved[:4]
    torch.use_deterministic_algorithms(saved[4])
    if saved[5] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@pytest.mark.parametrize("precision,adam,scale", [("fp16", "fused", 2.0 ** 16), ("bf16", "foreach", None)])
def test_mixed_precision_trains_end_to_end(tmp_path, precision, adam, scale):
    results = run_fp16(tmp_path, "--steps", 4, "--log-every", 2, "--precision", precision, "--adam", adam, "--lr", 1e-3)
    log = [r for r in log_lines(tmp_path, DIGITS) if "loss" in r]
    assert [r["loss_scale"] for r in log] == [scale, scale] and [r["skipped_steps"] for r in log] == [0, 0]
    assert all(0 < r["loss"] < 10 and r["grad_norm"] > 0 for r in log)
    assert results["config"]["precision"] == precision and f"adam={adam}" in results["speed_options"]
    state = ckpt(tmp_path, DIGITS)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    if precision == "fp16":
        assert state["scaler"]["scale"] == 2.0 ** 16 and state["scaler"]["_growth_tracker"] == 4


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16, None])
def test_the_step_runs_the_forward_under_the_asked_autocast(amp_dtype):
    """The forward sees autocast on with exactly the asked dtype (off for fp32), the step unscales the
    gradients before clipping (the norm is the true one, not the scaled one) and leaves no gradients."""
    seen = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, t, y):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return self.lin(x)

    torch.manual_seed(0)
    net = Net()
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=amp_dtype == torch.float16)
    x, noise = torch.randn(8, 4), torch.randn(8, 4)
    reference = Net()
    reference.load_state_dict(net.state_dict())
    torch.nn.functional.mse_loss(reference(x, None, None), noise).backward()  # fp32, unscaled
    true_norm = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm()
    seen.clear()
    _, grad_norm = custom_train.train_step(net, x, None, None, noise, opt, scaler, params, amp_dtype=amp_dtype,
                                           grad_clip=1e9)
    assert seen == [(amp_dtype is not None, amp_dtype if amp_dtype is not None else seen[0][1])]
    assert grad_norm.item() == pytest.approx(true_norm.item(), rel=2e-2)  # fp16/bf16 forward: a percent
    assert all(p.grad is None for p in params)


def test_forced_overflow_skips_steps_counts_and_logs_them(tmp_path, monkeypatch):
    """A huge initial loss scale: the first steps overflow in fp16; each leaves the weights (and AdamW's
    step count) unchanged, halves the scale, and is counted in the log."""
    monkeypatch.setattr(custom_train, "GRAD_SCALER_INIT_SCALE", 2.0 ** 22)
    spy = Spy(monkeypatch)
    run_fp16(tmp_path, "--steps", 8, "--log-every", 8, "--adam", "fused")
    (line,) = [r for r in log_lines(tmp_path, DIGITS) if "loss" in r]
    skipped = line["skipped_steps"]
    assert 1 <= skipped < 8 and line["loss_scale"] == 2.0 ** (22 - skipped)
    initial = spy.initial.state_dict()
    after = spy.weights  # after[i]: the weights after step i (after[0] the initial ones)
    for i in range(skipped + 1):
        assert all(torch.equal(after[i][k], v) for k, v in initial.items()), f"skipped step {i} changed the weights"
    assert any(not torch.equal(after[skipped + 1][k], v) for k, v in initial.items())
    state = ckpt(tmp_path, DIGITS)
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {8 - skipped}  # AdamW counted only the applied steps


def test_a_collapsed_scaler_stops_the_run(tmp_path, monkeypatch):
    """Inputs that overflow whatever the scale (inf from step 3): every later step is skipped; once a whole
    log interval is skipped, SCALER_COLLAPSE_STEPS or more in a row (32; 4 here), the run stops with the
    last good checkpoint."""
    monkeypatch.setattr(custom_train, "SCALER_COLLAPSE_STEPS", 4)
    real = custom_train.ddpm_scheduler

    def poisoned():
        s = real()
        add_noise, calls = s.add_noise, []

        def inf_from_step_3(x, noise, t):
            calls.append(1)
            return add_noise(x, noise, t) * (float("inf") if len(calls) >= 3 else 1.0)
        s.add_noise = inf_from_step_3
        return s
    monkeypatch.setattr(custom_train, "ddpm_scheduler", poisoned)
    with pytest.raises(HarnessError, match=r"every step between 4 and 8 overflowed in fp16 \(6 in a row, loss scale "
                                           r"now [0-9.e-]+\): the gradient scaler has collapsed; the last good checkpoint"):
        run_fp16(tmp_path, "--steps", 12, "--log-every", 4, "--ckpt-every", 4, "--adam", "fused")
    lines = [r for r in log_lines(tmp_path, DIGITS) if "skipped_steps" in r]
    assert [(r["step"], r["skipped_steps"]) for r in lines] == [(4, 2), (8, 4)] and lines[1]["loss"] is None
    assert ckpt(tmp_path, DIGITS)["step"] == 4 and not (tmp_path / "runs" / DIGITS / "results.json").exists()


def test_fp16_resume_is_exact_and_keeps_the_scaler_state(tmp_path, monkeypatch):
    """The loss scale has moved before the checkpoint (overflows at a huge initial scale): a resume that
    forgot the scaler's state would skip steps again and end elsewhere."""
    monkeypatch.setattr(custom_train, "GRAD_SCALER_INIT_SCALE", 2.0 ** 22)
    args = ["--steps", 10, "--ckpt-every", 6, "--log-every", 2, "--adam", "fused", "--lr", 1e-3]
    run_fp16(tmp_path / "straight", *args)
    restore = crash_at_step(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        run_fp16(tmp_path / "crashed", *args)
    at_6 = ckpt(tmp_path / "crashed", DIGITS)
    assert at_6["step"] == 6 and at_6["scaler"]["scale"] < 2.0 ** 22  # the scale moved before the checkpoint
    restore()
    run_fp16(tmp_path / "crashed", *args, "--resume")
    a, b = ckpt(tmp_path / "straight", DIGITS), ckpt(tmp_path / "crashed", DIGITS)
    assert a["scaler"] == b["scaler"]
    for part in ("model", "ema"):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part
    assert [r.get("loss_scale") for r in log_lines(tmp_path / "straight", DIGITS)] == \
        [r.get("loss_scale") for r in log_lines(tmp_path / "crashed", DIGITS)]


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def count_host_syncs(monkeypatch, fn):
    """Calls of the Tensor methods that wait for the device (item, tolist, cpu, numpy, bool/float/int)."""
    calls = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, _name=name, **k):
            calls.append(_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counting)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return len(calls)


def test_the_default_cuda_step_has_no_host_sync(tmp_path, monkeypatch):
    """fp16 with the scaler and fused AdamW (what --adam auto picks on CUDA): 2 and 4 steps with one log
    point, one evaluation and one checkpoint each make exactly the same host syncs, so a step makes none.
    The foreach kernel, by contrast, makes the scaler read found_inf (a sync) at every step."""
    counts = {}
    for adam in ("fused", "foreach"):
        for steps in (2, 4):
            args = ["--steps", steps, "--log-every", steps, "--ckpt-every", steps, "--adam", adam]
            counts[adam, steps] = count_host_syncs(monkeypatch, lambda: run_fp16(tmp_path / f"{adam}{steps}", *args))
    assert counts["fused", 2] == counts["fused", 4] > 0
    assert counts["foreach", 4] - counts["foreach", 2] >= 2


def test_auto_adam_is_fused_on_cuda_and_foreach_on_the_cpu(monkeypatch):
    args = custom_train.parse_args(["--scale", "tiny", "--method", "concat-film"])
    custom_train.resolve_defaults(args)
    assert args.adam == "foreach" and args.precision == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = custom_train.parse_args(["--scale", "tiny", "--method", "concat-film"])
    custom_train.resolve_defaults(args)
    assert args.adam == "fused" and args.precision == "fp16"


def strides(state: dict) -> dict:
    return {k: v.stride() for k, v in state.items() if v.dim() == 4}


def adam_strides(state: dict, names: list) -> dict:
    return {names[i]: s["exp_avg"].stride() for i, s in state["optimizer"]["state"].items()
            if s["exp_avg"].dim() == 4} | {names[i] + ".sq": s["exp_avg_sq"].stride()
                                           for i, s in state["optimizer"]["state"].items() if s["exp_avg_sq"].dim() == 4}


def test_channels_last_gives_model_ema_and_adam_one_layout(tmp_path, cifar_dir):
    """After setup and after a resume from a checkpoint made without channels_last: the model, its EMA and
    AdamW's moments share the channels_last layout (fused AdamW on CUDA refuses mixed layouts)."""
    names = [n for n, _ in custom_train.build_model("tiny", "concat-film").named_parameters()]
    run(tmp_path / "a", cifar_dir, "--steps", 2, "--channels-last", "--adam", "fused")
    run(tmp_path / "b", cifar_dir, "--steps", 2)
    run(tmp_path / "b", cifar_dir, "--steps", 4, "--channels-last", "--adam", "fused", "--resume")
    plain = ckpt(tmp_path / "b")
    for state in (ckpt(tmp_path / "a"), plain):
        model, ema = strides(state["model"]), strides(state["ema"])
        assert model == ema and len(model) > 20
        conv = state["model"]["unet.conv_in.weight"]
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        moments = adam_strides(state, names)
        assert all(moments[n] == model[n] and moments[n + ".sq"] == model[n] for n in model)


def test_the_compile_probe_is_built_like_the_training_batch(tmp_path, cifar_dir, monkeypatch):
    """Shape, dtype and memory format of the probe equal the training input's, so step 1 reuses the probe's
    graph (a channels_last batch after an NCHW probe would recompile outside the eager fallback)."""
    seen = []

    def recording_compile(model, **kw):
        def call(x, t, y):
            seen.append((tuple(x.shape), x.dtype, x.stride(), t.dtype, tuple(t.shape), y.dtype))
            return model(x, t, y)
        return call
    monkeypatch.setattr(torch, "compile", recording_compile)
    run(tmp_path, cifar_dir, "--steps", 3, "--compile", "--channels-last")
    assert len(seen) == 4 and len(set(seen)) == 1  # the probe and three steps


def test_tf32_cudnn_and_determinism_settings(tmp_path, cifar_dir, monkeypatch, stand_in_fid):
    """Without --tf32 fp32 matmuls and convolutions are true fp32 (torch 2.14's default TF32 convolutions
    off); with it, TF32 for training, but the FID's Inception still runs in true fp32."""
    seen = {}
    flags = lambda: (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)  # noqa: E731
    real_build = custom_train.build_model

    def build(*a, **k):
        model = real_build(*a, **k)
        model.register_forward_pre_hook(lambda m, args: seen.setdefault("training", flags()) and None)
        return model
    monkeypatch.setattr(custom_train, "build_model", build)
    extractor = stand_in_fid.extractor

    def recording_extractor(x):
        seen.setdefault("fid", flags())
        return extractor(x)
    monkeypatch.setattr(evaluation, "load_fid_extractor", lambda device, fid_cache=None: recording_extractor)
    images, _, _ = custom_train.load_cifar10(cifar_dir)
    stand_in_fid.write_stats(images)
    with_fid = [a for a in FAST if a not in ("--fid", "off")]
    results = custom_train.main(with_fid + ["--method", "concat-film", "--data-dir", str(cifar_dir), "--out-dir",
                                            str(tmp_path), "--steps", "1", "--final-fid-samples", "4", "--fid-samples",
                                            "0", "--tf32"])
    assert seen == {"training": ("tf32", "tf32"), "fid": ("ieee", "ieee")} and "tf32" in results["speed_options"]
    assert flags() == ("tf32", "tf32")  # restored after the feature pass
    seen.clear()
    run(tmp_path / "plain", cifar_dir, "--steps", 1, "--deterministic")
    assert seen["training"] == ("ieee", "ieee") and torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark
    args = custom_train.parse_args(["--scale", "tiny"])
    for deterministic, benchmark in ((False, True), (True, False)):
        args.deterministic = deterministic
        custom_train.configure_backends(args, torch.device("cuda"))  # flags only: no GPU needed
        assert torch.backends.cudnn.benchmark is benchmark and torch.backends.cudnn.deterministic is deterministic


def test_each_log_point_waits_for_the_device_before_timing(tmp_path, cifar_dir, monkeypatch):
    events = []
    monkeypatch.setattr(custom_train, "sync", lambda device: events.append("sync"))
    real_read = custom_train.Meter.read
    monkeypatch.setattr(custom_train.Meter, "read", lambda self, *a: events.append("read") or real_read(self, *a))
    run(tmp_path, cifar_dir, "--steps", 4, "--log-every", 2)
    assert events == ["sync", "read"] * 2


def test_a_method_that_draws_random_numbers_resumes_exactly(tmp_path, cifar_dir, monkeypatch):
    """Dropout, numpy and python random numbers inside a method's forward: every global RNG is a function
    of (seed, step), so a crash and --resume still end bit-identical to the straight run."""
    import random

    import numpy as np

    import conditioning

    class Noisy(torch.nn.Module):
        def __init__(self, channels, cond_dim):
            super().__init__()
            self.proj = torch.nn.Linear(cond_dim, channels)

        def forward(self, h, class_emb):
            jitter = float(np.random.rand()) + random.random()
            return torch.nn.functional.dropout(h, 0.2, self.training) + self.proj(class_emb)[:, :, None, None] * jitter

    monkeypatch.setitem(conditioning.METHODS, "noisy", conditioning.Method(conditioning.time_only, Noisy, "test"))
    args = ["--steps", 6, "--ckpt-every", 3, "--log-every", 3, "--lr", 1e-3]
    run(tmp_path / "straight", cifar_dir, *args, method="noisy")
    restore = crash_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crashed", cifar_dir, *args, method="noisy")
    restore()
    torch.manual_seed(1234)  # whatever state the process is in
    run(tmp_path / "crashed", cifar_dir, *args, "--resume", method="noisy")
    a, b = ckpt(tmp_path / "straight", "tiny-noisy-s42"), ckpt(tmp_path / "crashed", "tiny-noisy-s42")
    for part in ("model", "ema"):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part


class CountingBackend:
    """A torch.compile backend that runs Dynamo's graphs as they are (cheap on a CPU) and counts them: a
    recompilation is one more graph. Stands in for inductor, whose C++ build takes minutes here."""

    def __init__(self):
        self.graphs, self.modes = 0, []

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward

    def install(self, monkeypatch):
        real = torch.compile

        def compile_(model, mode=None, **kw):
            self.modes.append(mode)
            return real(model, backend=self, **kw)
        monkeypatch.setattr(torch, "compile", compile_)
        return self


def forbid_recompiles_after_the_probe(monkeypatch, seen_inputs: list):
    real_probe = custom_train.compile_model

    def probe_then_forbid(train_model, model, args, inputs, amp_dtype):
        compiled = real_probe(train_model, model, args, inputs, amp_dtype)
        seen_inputs.extend(inputs)
        torch.compiler.set_stance("fail_on_recompile")
        return compiled
    monkeypatch.setattr(custom_train, "compile_model", probe_then_forbid)


DIGITS_FAST = ["--preset", "demo", "--batch-size", "4", "--ddim-steps", "2", "--grid-per-class", "1", "--fid", "off",
               "--heldout-draws", "0", "--method", "concat-film", "--steps", "4",
               "--eval-every", "2", "--log-every", "1", "--precision", "fp16", "--adam", "fused",
               "--ema-eval-start", "3"]  # the step-2 evaluation samples the raw (compiled) model: eval(), then train()


def test_compiled_training_never_recompiles_after_the_probe(tmp_path, monkeypatch):
    """--compile: Dynamo compiles once, on the probe, and the steps, with evaluations between them, reuse
    that graph (a recompile raises under the fail_on_recompile stance); the steps see the very tensors
    the probe saw, and the losses and the evaluations' sample grids equal an eager run's bit for bit (the
    counting backend runs Dynamo's graph as traced). --compile max asks for mode reduce-overhead (CUDA graphs),
    marks the step's input buffers static and begins a new CUDA-graph step before each step. In fp16
    from a huge loss scale, so that the scaler skips the first steps: skips, loss scale and the meter's
    numbers are the eager run's too."""
    name = "digits-tiny-concat-film-s42"
    monkeypatch.setattr(custom_train, "GRAD_SCALER_INIT_SCALE", 2.0 ** 19)
    custom_train.main(DIGITS_FAST + ["--out-dir", str(tmp_path / "eager/runs")])
    for mode in ("default", "max"):
        backend = CountingBackend().install(monkeypatch)
        probe_inputs, step_inputs, marks, static = [], [], [], []
        forbid_recompiles_after_the_probe(monkeypatch, probe_inputs)
        monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
        real_mark = torch._dynamo.mark_static_address
        monkeypatch.setattr(torch._dynamo, "mark_static_address", lambda t, **k: static.append(t) or real_mark(t, **k))
        real_step = custom_train.train_step
        monkeypatch.setattr(custom_train, "train_step", lambda m, xt, t, y, *a, **k: step_inputs.append((xt, t, y))
                            or real_step(m, xt, t, y, *a, **k))
        try:
            custom_train.main(DIGITS_FAST + ["--out-dir", str(tmp_path / f"{mode}/runs"), "--compile", mode])
        finally:
            torch.compiler.set_stance("default")
            monkeypatch.undo()
            monkeypatch.setattr(custom_train, "GRAD_SCALER_INIT_SCALE", 2.0 ** 19)
        assert backend.graphs >= 1 and backend.modes == [None if mode == "default" else "reduce-overhead"]
        assert len(step_inputs) == 4 and all(a is b for inputs in step_inputs for a, b in zip(inputs, probe_inputs))
        assert len(marks) == (4 if mode == "max" else 0)
        assert [id(t) for t in static] == ([id(t) for t in probe_inputs] if mode == "max" else [])
    for key in ("loss", "skipped_steps", "loss_scale", "grad_norm", "grid"):
        values = {d: [r[key] for r in log_lines(tmp_path / d, name) if key in r] for d in ("eager", "default", "max")}
        assert len(values["eager"]) == (2 if key == "grid" else 4)  # evaluations at step 2 and at the end
        assert values["default"] == values["eager"] and values["max"] == values["eager"], key
    for grid in values["eager"]:  # the evaluations sampled the same images
        pngs = {(tmp_path / d / "runs" / name / grid).read_bytes() for d in ("eager", "default", "max")}
        assert len(pngs) == 1
    skipped = [r["skipped_steps"] for r in log_lines(tmp_path / "max", name) if "skipped_steps" in r]
    assert 1 <= sum(skipped) < 4  # the scaler skipped steps, then trained


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.parametrize("before,after", [("foreach", "fused"), ("fused", "foreach")])
def test_a_checkpoint_resumes_with_the_other_adamw_kernel(tmp_path, monkeypatch, precision, before, after):
    """A checkpoint made with one AdamW kernel resumed with the other: no crash (a foreach state under the
    fp16 scaler's fused path asserted in torch), the kernel that runs is the one asked for now, AdamW's
    state carried on (its step counters continue), and the results record the kernel."""
    import torch.optim.adam as adam_module

    args = ["--steps", 2, "--log-every", 2, "--lr", 1e-3, "--precision", precision]
    run_fp16(tmp_path, *args, "--adam", before)
    ran = []
    for kernel in ("_fused_adam", "_multi_tensor_adam"):
        real = getattr(adam_module, kernel)
        monkeypatch.setattr(adam_module, kernel, lambda *a, _real=real, _name=kernel, **k: ran.append(_name) or _real(*a, **k))
    results = run_fp16(tmp_path, *args, "--steps", 4, "--adam", after, "--resume")
    assert ran == [{"fused": "_fused_adam", "foreach": "_multi_tensor_adam"}[after]] * 2
    state = ckpt(tmp_path, DIGITS)["optimizer"]
    assert all(bool(g["fused"]) is (after == "fused") and bool(g["foreach"]) is (after == "foreach")
               for g in state["param_groups"])
    assert {int(s["step"]) for s in state["state"].values()} == {4}
    assert f"adam={after}" in results["speed_options"] and results["steps"] == 4


SAMPLING = dict(seed=0, tag="t", image_size=16, amp_dtype=None, device=torch.device("cpu"))


def count_blocking_copies_and_syncs(monkeypatch, fn):
    """count_host_syncs, plus every blocking copy to a device that the harness makes (Tensor.to with a
    device and without non_blocking, called from custom_train.py): from pageable host memory, such a copy
    waits for the GPU to finish all queued work. (diffusers' own .to calls move its tables once and are
    no-ops after that on a GPU, so they are not counted.)"""
    import sys

    copies = []
    real_to = torch.Tensor.to

    def to(self, *a, **k):
        moves = any(isinstance(x, (torch.device, str)) for x in a) or "device" in k
        if moves and not k.get("non_blocking", False) and sys._getframe(1).f_code.co_filename == custom_train.__file__:
            copies.append(1)
        return real_to(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "to", to)
    return count_host_syncs(monkeypatch, fn) + len(copies)


def test_sampling_waits_for_the_device_once_whatever_its_steps_and_batches(monkeypatch):
    """DDIM: the timesteps and labels go to the device once and the images come back once, so the host
    waits for the device the same number of times for 2 or 5 DDIM steps and for 1 or 3 batches."""
    torch.manual_seed(0)
    model = custom_train.build_model("tiny", "concat-film", 16)
    counts = {}
    for steps, n in ((2, 4), (5, 4), (2, 12)):
        counts[steps, n] = count_blocking_copies_and_syncs(monkeypatch, lambda: custom_train.sample(
            model, torch.arange(n) % 10, batch_size=4, ddim_steps=steps, **SAMPLING))
    assert counts[2, 4] == counts[5, 4] == counts[2, 12] > 0


def test_the_heldout_metrics_wait_for_the_device_once_whatever_their_chunks(monkeypatch):
    """The held-out sums stay on the device and are read once: the same waits for 1 and 3 chunks."""
    from proxy import load_digits

    torch.manual_seed(0)
    model = custom_train.build_model("tiny", "concat-film", 16)
    images, labels, _ = load_digits("held-out")
    monkeypatch.setattr(custom_train.HeldOutMetrics, "CHUNK", 4)
    counts = []
    for n in (4, 12):
        metrics = custom_train.HeldOutMetrics(images[:n], labels[:n], torch.device("cpu"), draws=2, label_draws=1,
                                              metric_seed=0, batch_size=64)
        counts.append(count_blocking_copies_and_syncs(monkeypatch, lambda: metrics(model)))
        monkeypatch.setattr(custom_train.HeldOutMetrics, "CHUNK", 4)  # (count_host_syncs undoes every patch)
    assert counts[0] == counts[1] > 0
