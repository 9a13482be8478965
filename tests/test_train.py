"""Training and evaluation end to end at tiny scale: results files, exact resume, what a run directory
may be reused for (and what it may not), refusals, the non-finite guard, and the FID path through
clean-fid's own code with a stand-in Inception."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import custom_train
import evaluation
from conftest import crash_at_step
from custom_train import HarnessError

FAST = ["--scale", "tiny", "--batch-size", "4", "--ddim-steps", "2", "--grid-per-class", "1",
        "--sample-batch-size", "8", "--log-every", "2", "--heldout-draws", "0"]


def run(tmp_path, data_dir, *extra, method="cross-attn"):
    return custom_train.main(FAST + ["--method", method, "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "runs"),
                                     *map(str, extra)])


def strict_json_lines(path):
    """Every line of a log as strict JSON: NaN or Infinity would be an error, not a number."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_help_documents_every_option_and_says_each_default_once():
    parser = custom_train.build_parser(None)
    assert [a.option_strings for a in parser._actions if not a.help] == []
    text = " ".join(parser.format_help().split())
    assert re.search(r"\(default[^()]*\) \(default: ", text) is None  # not "(default: every step) (default: None)"
    assert "--guidance-interval LO,HI guide only at DDPM timesteps" in text and "(default: every step)" in text


def test_quantize_truncates_exactly_as_the_protocol():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0, -0.99])
    expected = [0, 0, 127, 254, 255, 255, 1]  # 127.5 -> 127, 254.87 -> 254, 1.275 -> 1: truncation, not rounding
    assert custom_train.quantize(x).tolist() == expected


def test_ddim_is_the_protocol_sampler():
    s = custom_train.ddim_scheduler(50)
    assert s.timesteps.tolist() == list(range(980, -1, -20))
    for n in (1, 2, 3, 7, 50, 999, 1000):  # the option checks' copy, made without diffusers
        assert custom_train.ddim_timesteps(n) == custom_train.ddim_scheduler(n).timesteps.tolist(), n
    assert s.config.clip_sample and not s.config.set_alpha_to_one
    assert s.config.beta_schedule == "linear" and s.config.beta_start == 1e-4 and s.config.beta_end == 2e-2


def test_end_to_end_run_writes_every_file(tmp_path, cifar_dir, stand_in_fid):
    images, _, _ = custom_train.load_cifar10(cifar_dir)
    stand_in_fid.write_stats(images)
    results = run(tmp_path, cifar_dir, "--steps", 4, "--eval-every", 2, "--fid-samples", 8,
                  "--final-fid-samples", 12, "--save-samples", "--heldout-draws", 2, "--label-draws", 1)
    run_dir = tmp_path / "runs" / "tiny-cross-attn-s42"
    assert stand_in_fid.requested and stand_in_fid.requested[0].endswith("/cifar10_clean_train_32.npz")

    saved = json.loads((run_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [e["step"] for e in saved["evals"]] == [2, 4, 4] and saved["evals"][-1]["eval"] == "final"
    assert saved["best_fid"] == min(e["fid"] for e in saved["evals"][:2]) and saved["best_fid"] > 0
    assert saved["best_fid_step"] in (2, 4) and np.isfinite(saved["fid"]) and saved["fid_samples"] == 12
    assert saved["params"] == 615_619 and saved["budget"] == 646_399 and saved["steps"] == 4
    assert {"torch", "diffusers", "clean_fid"} <= set(saved["versions"]) and saved["images_per_s"] > 0
    assert saved["cpu_threads"] == torch.get_num_threads() and saved["device"]  # the thread count moves CPU numbers
    assert "scale=tiny (protocol: small, medium or large)" in saved["protocol_deviations"]
    assert "steps=4 (protocol: 35000)" in saved["protocol_deviations"]
    assert all(np.isfinite(e["heldout_loss"]) and 0 <= e["label_acc"] <= 1 for e in saved["evals"])

    config = json.loads((run_dir / "config.json").read_text())
    assert config["lr"] == 2e-4 and config["ema_decay"] == 0.9995 and config["precision"] == "fp32"
    assert config["protocol_deviations"] == saved["protocol_deviations"] and saved["config"] == config
    assert "precision=fp32 (protocol: fp16)" in config["protocol_deviations"]
    # what made the run: every option, the method's code and its hash, the commit
    assert {name for name in custom_train.ALL_OPTIONS if name not in ("list_methods", "count_params", "dry_run",
                                                                     "resume", "overwrite", "prefetch", "evaluate")} <= set(config)
    assert "class CrossAttentionLayer(nn.Module)" in config["method_source"]
    assert "def time_only(" in config["method_source"] and "def zero_module(" in config["method_source"]
    assert config["method_sha256"] == saved["method_sha256"] == custom_train.method_sha256("cross-attn")
    assert len(config["git_commit"]) == 40 and isinstance(config["git_dirty"], bool)

    log = strict_json_lines(run_dir / "log.jsonl")
    train_lines = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4]
    assert all(np.isfinite(r["loss"]) and r["lr"] == 2e-4 and r["grad_norm"] > 0 and r["images_per_s"] > 0
               and r["skipped_steps"] == 0 and r["loss_scale"] is None for r in train_lines)

    samples = np.load(run_dir / "samples.npz")
    assert samples["images"].shape == (12, 32, 32, 3) and samples["images"].dtype == np.uint8
    assert samples["labels"].shape == (12,) and set(samples["labels"]) <= set(range(10))
    grid = Image.open(run_dir / "grid_final.png")
    assert grid.size == (80 + 32 * 2, 10 * 32 * 2)
    assert (run_dir / "grid_step000002.png").exists() and (run_dir / "checkpoint.pt").exists()
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 4 and {"model", "ema", "optimizer", "scaler", "config"} <= set(ckpt)


def test_fid_path_against_its_own_statistics(tmp_path, cifar_dir, stand_in_fid):
    """Scored through clean-fid (clean resize, hook extractor, Frechet distance): the training images
    against statistics of themselves give ~0; noise images give a clearly positive distance."""
    images, _, _ = custom_train.load_cifar10(cifar_dir)
    stand_in_fid.write_stats(images)
    fid = evaluation.CleanFID(torch.device("cpu"))
    labels = torch.zeros(100, dtype=torch.long)  # FID ignores labels
    same = fid(torch.from_numpy(images), labels, batch_size=32)  # 100 images, batches of 32: wrap-around too
    assert abs(same["fid"]) < 1e-4 and same["fid_samples"] == 100
    noise = torch.randint(0, 256, (100, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert fid(noise, labels, batch_size=32)["fid"] > 0.01


def assert_same_state(a, b, parts=("model", "ema")):
    for part in parts:
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key} differs"


def test_resume_after_a_crash_is_bit_identical(tmp_path, cifar_dir, monkeypatch):
    """8 steps straight vs. 8 steps with a crash in step 7 and --resume from the step-4 checkpoint
    (the step-6 log line of the crashed run must be dropped, not duplicated), with the learning rate
    decaying over the last 6 steps, across the checkpoint. The checkpoint is read onto the CPU."""
    args = ["--steps", 8, "--ckpt-every", 4, "--fid", "off", "--ema-decay", "0.9", "--lr-cooldown", 6, "--lr", "1e-3"]
    run(tmp_path / "straight", cifar_dir, *args)
    straight = torch.load(tmp_path / "straight/runs/tiny-cross-attn-s42/checkpoint.pt", weights_only=False)

    restore = crash_at_step(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crashed", cifar_dir, *args)
    run_dir = tmp_path / "crashed/runs/tiny-cross-attn-s42"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 4
    restore()
    loads, optimizers = [], []
    real_load, real_match = torch.load, custom_train.match_layouts
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("map_location")) or real_load(*a, **k))
    monkeypatch.setattr(custom_train, "match_layouts", lambda opt: optimizers.append(opt) or real_match(opt))
    run(tmp_path / "crashed", cifar_dir, *args, "--resume")
    assert loads == ["cpu"]  # never onto the training device: load_state_dict places every tensor
    steps = [s["step"] for s in optimizers[0].state.values()]  # foreach AdamW reads its step counts on the host
    assert steps and all(s.device.type == "cpu" and s.item() == 8 for s in steps)  # restored at 4, trained to 8
    monkeypatch.setattr(torch, "load", real_load)
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=False)

    assert resumed["step"] == straight["step"] == 8
    assert_same_state(straight, resumed)

    def log_without_timing(path):
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in strict_json_lines(path)]
    # the lines the crashed run wrote after its checkpoint are dropped, not duplicated
    assert log_without_timing(run_dir / "log.jsonl") == log_without_timing(
        tmp_path / "straight/runs/tiny-cross-attn-s42/log.jsonl")
    # the lr of the logged steps 2, 4, 6, 8: constant through step 2, then 6/6, ..., 1/6 of it at steps 3..8
    assert [r["lr"] for r in log_without_timing(run_dir / "log.jsonl") if "lr" in r] == pytest.approx([1e-3, 1e-3 * 5 / 6,
                                                                                          1e-3 * 3 / 6, 1e-3 / 6])
    assert "lr_cooldown=6 (protocol: 0)" in json.loads((run_dir / "config.json").read_text())["protocol_deviations"]
    with pytest.raises(HarnessError, match="with --lr-cooldown 6, which the steps place; it cannot be trained further"):
        run(tmp_path / "crashed", cifar_dir, "--steps", 10, *args[2:], "--resume")
    (run_dir / "results.json").unlink()  # unfinished again, its checkpoint in the cooldown: the decay is fixed
    with pytest.raises(HarnessError, match="with --lr-cooldown the steps place the decay"):
        run(tmp_path / "crashed", cifar_dir, "--steps", 10, *args[2:], "--resume")


def test_asking_for_more_steps_trains_a_finished_run_on(tmp_path, cifar_dir):
    """A finished 3-step run resumed with --steps 6 equals a 6-step run from the start (model, EMA and
    AdamW's state, bit for bit); its 3-step result stays beside it as history. Fewer steps are refused."""
    args = ["--fid", "off", "--ema-decay", "0.9", "--lr", "1e-3"]
    run(tmp_path / "straight", cifar_dir, "--steps", 6, *args)
    first = run(tmp_path / "grown", cifar_dir, "--steps", 3, *args)
    grown = run(tmp_path / "grown", cifar_dir, "--steps", 6, *args, "--resume")
    run_dir = tmp_path / "grown/runs/tiny-cross-attn-s42"
    a = torch.load(tmp_path / "straight/runs/tiny-cross-attn-s42/checkpoint.pt", weights_only=False)
    b = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 6 and grown["steps"] == 6 and first["steps"] == 3
    assert_same_state(a, b)
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert ka == kb and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((run_dir / "results-step000003.json").read_text())["steps"] == 3
    assert [e["step"] for e in grown["evals"]] == [3, 6, 6]  # its evaluations at step 3 are part of its history
    with pytest.raises(HarnessError, match=r"finished at 6 steps; --steps 4 asks for fewer"):
        run(tmp_path / "grown", cifar_dir, "--steps", 4, *args, "--resume")


def test_a_finished_run_is_reused_only_for_the_same_question(tmp_path, cifar_dir, capsys):
    args = ["--steps", 2, "--fid", "off", "--run-name", "a"]
    first = run(tmp_path, cifar_dir, *args)
    results = tmp_path / "runs/a/results.json"
    stamp = results.stat().st_mtime_ns
    with pytest.raises(HarnessError, match="holds a finished run .*pass --resume to reuse it"):
        run(tmp_path, cifar_dir, *args)
    assert run(tmp_path, cifar_dir, *args, "--resume") == json.loads(results.read_text()) == json.loads(json.dumps(first))
    assert "finished with these options and code; nothing to do" in capsys.readouterr().err
    assert results.stat().st_mtime_ns == stamp
    for other, message in ((["--lr", "1e-3"], r"was made with lr=0.0002 \(now 0.001\)"),
                           (["--ddim-steps", "3"], r"was made with ddim_steps=2 \(now 3\)"),
                           (["--eval-every", "1"], r"was made with eval_every=2 \(now 1\)")):
        with pytest.raises(HarnessError, match=message + ".*--overwrite to replace it"):
            run(tmp_path, cifar_dir, *args, *other, "--resume")
    assert results.stat().st_mtime_ns == stamp
    replaced = run(tmp_path, cifar_dir, *args, "--lr", "1e-3", "--overwrite")
    assert replaced["config"]["lr"] == 1e-3 and json.loads(results.read_text())["config"]["lr"] == 1e-3


def test_refuses_to_overwrite_and_checks_resume_options(tmp_path, cifar_dir):
    run(tmp_path, cifar_dir, "--steps", 2, "--fid", "off", "--ckpt-every", 1, "--run-name", "a")
    (tmp_path / "runs/a/results.json").unlink()  # an unfinished run: a checkpoint, no results
    before = (tmp_path / "runs/a/checkpoint.pt").read_bytes()
    with pytest.raises(HarnessError, match="already holds a run's checkpoint; pass --resume"):
        run(tmp_path, cifar_dir, "--steps", 2, "--fid", "off", "--run-name", "a")
    with pytest.raises(HarnessError, match=r"was made with seed=42 \(now 7\)"):
        run(tmp_path, cifar_dir, "--steps", 2, "--fid", "off", "--run-name", "a", "--resume", "--seed", 7)
    with pytest.raises(HarnessError, match="was made by other code for method 'adanorm'"):
        run(tmp_path, cifar_dir, "--steps", 2, "--fid", "off", "--run-name", "a", "--resume", method="adanorm")
    assert (tmp_path / "runs/a/checkpoint.pt").read_bytes() == before


def test_a_corrupt_checkpoint_is_one_line_and_left_in_place(tmp_path, cifar_dir):
    run(tmp_path, cifar_dir, "--steps", 2, "--fid", "off", "--run-name", "a")
    (tmp_path / "runs/a/results.json").unlink()
    (tmp_path / "runs/a/checkpoint.pt").write_bytes(b"\x80\x04 not a checkpoint")
    with pytest.raises(HarnessError) as e:
        run(tmp_path, cifar_dir, "--steps", 4, "--fid", "off", "--run-name", "a", "--resume")
    message = str(e.value)
    assert f"cannot read the checkpoint {tmp_path / 'runs/a/checkpoint.pt'}" in message and "\n" not in message
    assert "(UnpicklingError: invalid load key, ' '.)" in message  # what torch said, first line only
    assert "delete checkpoint.pt to restart this run from step 0, or pass --overwrite" in message
    assert (tmp_path / "runs/a/checkpoint.pt").read_bytes() == b"\x80\x04 not a checkpoint"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cifar_dir, monkeypatch):
    real_scheduler = custom_train.ddpm_scheduler
    calls = {"n": 0}

    def poisoned_scheduler():
        s = real_scheduler()
        add_noise = s.add_noise

        def add_noise_nan_from_step_3(x, noise, t):
            calls["n"] += 1
            return add_noise(x, noise, t) * (float("nan") if calls["n"] >= 3 else 1.0)
        s.add_noise = add_noise_nan_from_step_3
        return s

    monkeypatch.setattr(custom_train, "ddpm_scheduler", poisoned_scheduler)
    with pytest.raises(HarnessError, match=r"the loss became non-finite \(nan\) between steps 2 and 4; the last good "
                                           r"checkpoint is kept"):
        run(tmp_path, cifar_dir, "--steps", 6, "--ckpt-every", 2, "--fid", "off")
    run_dir = tmp_path / "runs/tiny-cross-attn-s42"
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (run_dir / "results.json").exists()
    assert [r["loss"] for r in strict_json_lines(run_dir / "log.jsonl")][-1] is None  # logged, as strict JSON


def test_sampling_is_deterministic_and_label_dependent():
    torch.manual_seed(0)
    model = custom_train.build_model("tiny", "concat-film")
    kw = dict(seed=1, tag="t", batch_size=4, ddim_steps=3, image_size=32, amp_dtype=None, device=torch.device("cpu"))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    a = custom_train.sample(model, labels, **kw)
    b = custom_train.sample(model, labels, **kw)
    assert a.dtype == torch.uint8 and a.shape == (6, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, custom_train.sample(model, (labels + 1) % 10, **kw))


@pytest.mark.parametrize("flag,message", [
    (["--steps", "0"], "--steps must be positive, got 0"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--eval-every", "0"], "--eval-every must be positive, got 0"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--lr", "nan"], "--lr must be positive, got nan"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
    (["--grad-clip", "0"], "--grad-clip must be positive, got 0.0"),
    (["--seed", "-3"], "--seed must be >= 0, got -3"),
    (["--final-fid-samples", "-1"], "--final-fid-samples must be >= 0, got -1"),
    (["--fid-samples", "1"], "FID needs at least 2 samples"),
    (["--ema-decay", "1.5"], "--ema-decay must be in [0, 1), got 1.5"),
    (["--steps", "10", "--lr-cooldown", "11"], "--lr-cooldown must lie in [0, --steps=10], got 11"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
])
def test_bad_options_are_refused(tmp_path, flag, message):
    with pytest.raises(HarnessError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        custom_train.main(["--scale", "tiny", "--out-dir", str(tmp_path)] + flag)
    assert not any(tmp_path.iterdir())  # nothing written


def test_unknown_choices_keep_argparses_convention(capsys):
    with pytest.raises(SystemExit) as e:
        custom_train.main(["--scale", "huge"])
    assert e.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err


def test_dry_run_prints_the_configuration_and_writes_nothing(tmp_path, capsys):
    out = custom_train.main(["--scale", "small", "--method", "cross-attn", "--out-dir", str(tmp_path), "--dry-run",
                             "--lr", "1e-3", "--fid-resize", "torch"])
    printed = capsys.readouterr().out
    assert out["config"]["lr"] == 1e-3 and out["config"]["params"] == 9_730_819 and out["action"] == "start a new run"
    assert "lr=0.001 (protocol: 0.0002)" in printed and "fid_resize=torch (protocol: pil)" in printed
    assert '"batch_size": 128' in printed and f"run directory: {tmp_path / 'small-cross-attn-s42'}" in printed
    assert not any(tmp_path.iterdir())


def test_a_stop_signal_checkpoints_at_the_next_log_point_and_the_resume_is_exact(tmp_path, cifar_dir, monkeypatch):
    """SIGUSR1 (SLURM's warning before a time limit) in step 3 and SIGTERM (preemption) in step 5: each run
    trains on to the next log point (4, 6), evaluates if that step evaluates, writes its checkpoint, stops
    with Preempted (exit status 3 from the command line) and restores the signal handlers; resumed, it ends
    bit-identical to an uninterrupted run, with the same log and evaluations."""
    import os
    import signal

    args = ["--steps", 8, "--ckpt-every", 8, "--eval-every", 4, "--fid", "off", "--lr", "1e-3"]
    run(tmp_path / "straight", cifar_dir, *args)
    run_dir = tmp_path / "stopped/runs/tiny-cross-attn-s42"
    real = custom_train.ddpm_scheduler
    for sig, at_call, stops_at in ((signal.SIGUSR1, 3, 4), (signal.SIGTERM, 1, 6)):  # steps 3 and 5 (resumed at 4)
        def signalling_scheduler():
            s, calls = real(), []
            add_noise = s.add_noise

            def add_noise_and_signal(*a):
                calls.append(1)
                if len(calls) == at_call:
                    os.kill(os.getpid(), sig)
                return add_noise(*a)
            s.add_noise = add_noise_and_signal
            return s
        monkeypatch.setattr(custom_train, "ddpm_scheduler", signalling_scheduler)
        with pytest.raises(custom_train.Preempted, match=f"preempted at step {stops_at}: checkpoint written to "
                                                         f"{run_dir / 'checkpoint.pt'}; continue with --resume"):
            run(tmp_path / "stopped", cifar_dir, *args, *(["--resume"] if stops_at > 4 else []))
        assert signal.getsignal(sig) is signal.SIG_DFL  # the handlers are the process's again
        assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == stops_at
    monkeypatch.setattr(custom_train, "ddpm_scheduler", real)
    run(tmp_path / "stopped", cifar_dir, *args, "--resume")
    straight = torch.load(tmp_path / "straight/runs/tiny-cross-attn-s42/checkpoint.pt", weights_only=False)
    assert_same_state(straight, torch.load(run_dir / "checkpoint.pt", weights_only=False))

    def without_timing(path):
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in strict_json_lines(path)]
    log = without_timing(run_dir / "log.jsonl")
    assert log == without_timing(tmp_path / "straight/runs/tiny-cross-attn-s42/log.jsonl")
    assert [r["step"] for r in log if "eval" in r] == [4, 8, 8]  # the step-4 evaluation happened before the stop
