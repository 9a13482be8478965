"""bench.py: the FLOP count behind MFU, the side-by-side table (a tiny CPU run, not a timing test), and
tables that are written as they are measured, so a time limit keeps the finished ones."""
import pytest
import torch

import bench
import custom_train


def test_flop_count_matches_the_published_cost_of_small():
    """9.1 GFLOP per image forward+backward at small scale."""
    torch.manual_seed(0)
    model = custom_train.build_model("small", "concat-film")
    assert bench.flops_per_image(model, 32, torch.device("cpu")) / 1e9 == pytest.approx(9.1, rel=0.05)


def test_table_has_every_variant_side_by_side(tmp_path):
    table = bench.main(["--scales", "tiny", "--steps", "1", "--warmup", "1", "--batch-size", "8",
                        "--out", str(tmp_path / "bench.md")])
    assert (tmp_path / "bench.md").read_text().split() == table.split()
    training = table.split("## FID resize")[0]
    rows = [line for line in training.splitlines() if line.startswith("| ") and "x |" in line]
    labels = [r.split(" | ")[0][2:] for r in rows]
    assert labels[0].startswith("plain loop (DataLoader with persistent workers")
    assert labels[1] == "default (data on device, foreach AdamW, no per-step sync, foreach EMA)"  # --adam auto, CPU
    assert "fused AdamW instead" in labels and "+ channels_last" in labels and labels[-1].startswith("best combination")
    assert rows[0].split(" | ")[3] == "1.00x"  # ratios are against the plain loop
    assert "DDIM sampling, 50 steps" in table and "clean-fid PIL, per image, CPU" in table


def test_each_scale_is_written_as_soon_as_it_is_measured(tmp_path, monkeypatch):
    real, calls = bench.time_training, []

    def stopped_at_the_second_scale(scale, *a, **k):
        calls.append(scale)
        if len(calls) > 5:  # the first scale has 4 variants and its best combination
            raise KeyboardInterrupt  # the time limit
        return real(scale, *a, **k)
    monkeypatch.setattr(bench, "time_training", stopped_at_the_second_scale)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--scales", "tiny", "tiny", "--steps", "1", "--warmup", "1", "--batch-size", "4",
                    "--out", str(tmp_path / "bench.md")])
    written = (tmp_path / "bench.md").read_text()
    assert written.count("## tiny") == 1 and "best combination" in written and "DDIM sampling" in written


def test_sync_check_is_for_cuda():
    assert "CUDA only" in bench.main(["--sync-check", "--scales", "tiny", "--device", "cpu"])


def test_the_harness_rows_run_the_harness_itself(monkeypatch):
    """Every harness row is a run built by build_run (configure_backends included) and stepped by
    take_step, the function train() calls; only the plain loop is bench.py's own."""
    calls = {"configure_backends": 0, "take_step": 0, "build_run": []}
    for name in ("configure_backends", "take_step"):
        real = getattr(custom_train, name)
        monkeypatch.setattr(custom_train, name, lambda *a, _real=real, _name=name, **k:
                            calls.__setitem__(_name, calls[_name] + 1) or _real(*a, **k))
    real_build = custom_train.build_run
    monkeypatch.setattr(custom_train, "build_run", lambda args, *a, **k: calls["build_run"].append(
        (args.adam, args.channels_last)) or real_build(args, *a, **k))
    bench.main(["--scales", "tiny", "--steps", "2", "--warmup", "1", "--batch-size", "4", "--no-sampling",
                "--variants", "plain", "default", "adam-other", "channels-last"])
    assert calls["build_run"] == [("foreach", False), ("fused", False), ("foreach", True)]
    assert calls["configure_backends"] == 3 and calls["take_step"] == 3 * (2 + 1)
