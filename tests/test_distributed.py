"""Several processes (torchrun, gloo on CPU) give the single-process run: the same final weights up to
reduction order, and exactly the same sampled images. Speed options keep the loss trajectory."""
import json
import subprocess
import sys

import pytest
import torch

import custom_train
from conftest import ROOT

COMMON = ["--scale", "tiny", "--method", "adanorm", "--batch-size", "8", "--steps", "4", "--ddim-steps", "2",
          "--grid-per-class", "1", "--sample-batch-size", "4", "--fid", "off", "--log-every", "2", "--lr", "1e-3",
          "--heldout-draws", "0"]


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def mean_diff(a: dict, b: dict) -> float:
    """Mean absolute difference over every weight: rounding moves a few weights (Adam amplifies tiny
    gradients' rounding), a dropped setting or a missing step moves them all."""
    return torch.cat([(a[k] - b[k]).flatten() for k in a]).abs().mean().item()


def test_two_processes_match_one(tmp_path, cifar_dir):
    """2 gloo processes against 1: the model and its EMA agree to float rounding (the reduction order), far
    below what one training step changes (AdamW moves a weight by up to lr = 1e-3 per step)."""
    args = COMMON + ["--data-dir", str(cifar_dir), "--ema-decay", "0.5"]
    custom_train.main(args + ["--out-dir", str(tmp_path / "one")])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "custom_train.py"), *args, "--out-dir", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = torch.load(tmp_path / "one/tiny-adanorm-s42/checkpoint.pt", weights_only=False)
    two = torch.load(tmp_path / "two/tiny-adanorm-s42/checkpoint.pt", weights_only=False)
    torch.manual_seed(42)
    initial = custom_train.build_model("tiny", "adanorm").state_dict()
    for part in ("model", "ema"):
        assert max_diff(one[part], two[part]) < 1e-4, part  # a tenth of one step's largest move
        assert mean_diff(one[part], two[part]) < 1e-6, part
        assert mean_diff(one[part], initial) > 100 * 1e-6, part  # trained: an untrained copy would fail
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / d / "tiny-adanorm-s42/log.jsonl").read_text().splitlines())
               if "loss" in r] for d in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    results = json.loads((tmp_path / "two/tiny-adanorm-s42/results.json").read_text())
    assert results["world_size"] == 2


def test_sharded_sampling_equals_single_process(tmp_path):
    """Rank r of 2 samples batches r, r+2, ...; gathered, the images equal one process's exactly."""
    script = tmp_path / "shard.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {str(ROOT)!r})
import custom_train
dist.init_process_group("gloo")
torch.manual_seed(0)
model = custom_train.build_model("tiny", "concat-film")
kw = dict(seed=3, tag="t", batch_size=3, ddim_steps=2, image_size=32, amp_dtype=None, device=torch.device("cpu"))
labels = torch.arange(10)
sharded = custom_train.sample(model, labels, rank=dist.get_rank(), world=2, **kw)
if dist.get_rank() == 0:
    torch.save(dict(sharded=sharded, single=custom_train.sample(model, labels, **kw)), {str(tmp_path / "out.pt")!r})
dist.barrier()  # rank 1 must not tear gloo down while rank 0 still samples
dist.destroy_process_group()
""")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["sharded"].shape == (10, 3, 32, 32) and torch.equal(out["sharded"], out["single"])


def test_speed_options_keep_the_arithmetic(tmp_path, cifar_dir):
    """channels_last and fused AdamW change the memory layout and the kernel, not the arithmetic: the weights
    agree to rounding, far closer than a run that drops one of the protocol's settings (weight decay)."""
    args = COMMON + ["--data-dir", str(cifar_dir), "--steps", "6", "--weight-decay", "0.1"]
    plain = custom_train.main(args + ["--out-dir", str(tmp_path / "plain")])
    fast = custom_train.main(args + ["--out-dir", str(tmp_path / "fast"), "--channels-last", "--adam", "fused"])
    custom_train.main(args + ["--out-dir", str(tmp_path / "no-decay"), "--weight-decay", "0"])
    assert fast["speed_options"] == ["channels_last", "adam=fused"] and plain["speed_options"] == ["adam=foreach"]
    weights = {d: torch.load(tmp_path / d / "tiny-adanorm-s42/checkpoint.pt", weights_only=False)["model"]
               for d in ("plain", "fast", "no-decay")}
    rounding = mean_diff(weights["plain"], weights["fast"])
    assert rounding < 1e-6 and max_diff(weights["plain"], weights["fast"]) < 1e-3  # below one step's move
    assert mean_diff(weights["plain"], weights["no-decay"]) > 20 * rounding


def test_batch_must_divide_over_processes(tmp_path, cifar_dir, monkeypatch):
    """Checked from torchrun's variables before any process group starts (so in one process here; the
    2-process tests above start real torchrun)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(custom_train.HarnessError, match="the global --batch-size 7 is not divisible by 2 processes"):
        custom_train.main(COMMON + ["--batch-size", "7", "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path)])
    assert not tmp_path.joinpath("tiny-adanorm-s42").exists()


def test_compile_failure_falls_back_to_eager(tmp_path, cifar_dir, monkeypatch, capsys):
    def broken_compile(model, **kw):
        def fail(*a, **k):
            raise RuntimeError("no compiler here")
        return fail
    monkeypatch.setattr(torch, "compile", broken_compile)
    results = custom_train.main(COMMON + ["--data-dir", str(cifar_dir), "--out-dir", str(tmp_path), "--compile"])
    assert "warning: torch.compile failed (RuntimeError: no compiler here); training eagerly" in capsys.readouterr().err
    assert results["steps"] == 4 and results["speed_options"] == ["compile=default", "adam=foreach"]


@pytest.mark.slow
def test_compiled_training_keeps_the_loss_trajectory_without_recompiling(tmp_path, cifar_dir, monkeypatch):
    """A real torch.compile with channels_last: after the probe, the steps never recompile (a recompile
    would raise here), and the losses follow the eager run's."""
    real_probe = custom_train.compile_model

    def probe_then_forbid_recompiles(*args, **kwargs):
        compiled = real_probe(*args, **kwargs)
        torch.compiler.set_stance("fail_on_recompile")
        return compiled
    monkeypatch.setattr(custom_train, "compile_model", probe_then_forbid_recompiles)
    args = COMMON + ["--data-dir", str(cifar_dir), "--channels-last"]
    try:
        custom_train.main(args + ["--out-dir", str(tmp_path / "compiled"), "--compile"])
    finally:
        torch.compiler.set_stance("default")
    custom_train.main(args + ["--out-dir", str(tmp_path / "eager")])
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / d / "tiny-adanorm-s42/log.jsonl").read_text().splitlines())
               if "loss" in r] for d in ("eager", "compiled")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


def test_evaluate_under_torchrun_equals_one_process(tmp_path, cifar_dir):
    """--evaluate spread over 2 gloo processes: rank 0 writes one dated file whose grid and held-out
    numbers equal a single process's."""
    custom_train.main(COMMON + ["--data-dir", str(cifar_dir), "--out-dir", str(tmp_path)])
    run_dir = tmp_path / "tiny-adanorm-s42"
    again = ["--evaluate", str(run_dir), "--data-dir", str(cifar_dir), "--heldout-draws", "1", "--label-draws", "1"]
    one = custom_train.main(again)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "custom_train.py"), *again], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = {r["world_size"]: r for r in (json.loads(p.read_text()) for p in run_dir.glob("evaluation-*[0-9].json"))}
    assert sorted(written) == [1, 2] and one["world_size"] == 1
    two = written[2]
    assert two["heldout_loss"] == pytest.approx(one["heldout_loss"], rel=1e-6) and two["label_acc"] == one["label_acc"]
    assert (run_dir / two["grid"]).read_bytes() == (run_dir / one["grid"]).read_bytes()
