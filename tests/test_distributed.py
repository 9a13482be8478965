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
          "--grid-per-class", "1", "--sample-batch-size", "4", "--fid", "off", "--log-every", "2", "--lr", "1e-3"]


def test_two_processes_match_one(tmp_path, cifar_dir):
    args = COMMON + ["--data-dir", str(cifar_dir)]
    custom_train.main(args + ["--out-dir", str(tmp_path / "one")])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "custom_train.py"), *args, "--out-dir", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = torch.load(tmp_path / "one/tiny-adanorm-s42/checkpoint.pt", weights_only=False)
    two = torch.load(tmp_path / "two/tiny-adanorm-s42/checkpoint.pt", weights_only=False)
    for key, value in one["ema"].items():
        torch.testing.assert_close(two["ema"][key], value, rtol=1e-4, atol=1e-5, msg=f"ema.{key}")
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
dist.destroy_process_group()
""")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["sharded"].shape == (10, 3, 32, 32) and torch.equal(out["sharded"], out["single"])


def test_speed_options_keep_the_loss_trajectory(tmp_path, cifar_dir):
    """channels_last and fused AdamW change the memory layout and the kernel, not the arithmetic."""
    args = COMMON + ["--data-dir", str(cifar_dir), "--steps", "6"]
    plain = custom_train.main(args + ["--out-dir", str(tmp_path / "plain")])
    fast = custom_train.main(args + ["--out-dir", str(tmp_path / "fast"), "--channels-last", "--fused-adam"])
    assert fast["speed_options"] == ["channels_last", "fused_adam"] and plain["speed_options"] == []

    def losses(d):
        return [r["loss"] for r in map(json.loads, (tmp_path / d / "tiny-adanorm-s42/log.jsonl").read_text().splitlines())
                if "loss" in r]
    assert losses("fast") == pytest.approx(losses("plain"), rel=1e-4)


def test_batch_must_divide_over_processes(tmp_path, cifar_dir):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "custom_train.py"), *COMMON, "--batch-size", "7", "--data-dir", str(cifar_dir),
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "the global --batch-size 7 is not divisible by 2 processes" in proc.stderr


def test_compile_failure_falls_back_to_eager(tmp_path, cifar_dir, monkeypatch, capsys):
    def broken_compile(model, **kw):
        def fail(*a, **k):
            raise RuntimeError("no compiler here")
        return fail
    monkeypatch.setattr(torch, "compile", broken_compile)
    results = custom_train.main(COMMON + ["--data-dir", str(cifar_dir), "--out-dir", str(tmp_path), "--compile"])
    assert "warning: torch.compile failed (RuntimeError: no compiler here); training eagerly" in capsys.readouterr().err
    assert results["steps"] == 4 and results["speed_options"] == ["compile"]


@pytest.mark.slow
def test_compiled_training_keeps_the_loss_trajectory(tmp_path, cifar_dir):
    args = COMMON + ["--data-dir", str(cifar_dir)]
    custom_train.main(args + ["--out-dir", str(tmp_path / "eager")])
    custom_train.main(args + ["--out-dir", str(tmp_path / "compiled"), "--compile"])
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / d / "tiny-adanorm-s42/log.jsonl").read_text().splitlines())
               if "loss" in r] for d in ("eager", "compiled")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
