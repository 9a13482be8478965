"""bench_device.sh, the one-call check for a lent GPU machine, and its preparation here (prepare_device.py).

The check runs against a stand-in python that records each call, so these tests take seconds and need no GPU."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

DEVICE_STUB = """#!/usr/bin/env bash
# Stands in for the device's python in bench_device.sh: records each call (with TORCH_LOGS when set);
# pretends that the packages in $MISSING are absent until pip installs them; bench.py and custom_train.py
# write what the real ones would.
echo "${TORCH_LOGS:+TORCH_LOGS=$TORCH_LOGS }$*" >> "$CALLS"
out_of() {  # the value of --out or --out-dir
  local next=0
  for a in "$@"; do [[ $next == 1 ]] && { echo "$a"; return; }; [[ $a == --out || $a == --out-dir ]] && next=1; done
}
case "$1" in
  -) script=$(cat)
     if grep -q PackageNotFoundError <<< "$script"; then [[ -f "$STATE/installed" ]] || echo "$MISSING"; exit 0; fi
     if grep -q "import cleanfid" <<< "$script"; then
       echo "python 3.12.3 | torch 2.11.0 stand-in | gpu Stand-in GPU"; exit 0
     fi
     exec "$REAL_PYTHON" - "${@:2}" <<< "$script" ;;
  -m) [[ "$2" == pip ]] || exit 1
      if [[ -f "$STATE/pip_fails" ]]; then
        echo "ERROR: Could not find a version that satisfies the requirement zipp>=3.20 (from importlib-metadata)"
        echo "ERROR: No matching distribution found for zipp>=3.20"; exit 1
      fi
      touch "$STATE/installed"; exit 0 ;;
  bench.py) [[ "$*" == *--sync-check* ]] && { echo "host syncs none" > "$(out_of "$@")"; exit 0; }
            [[ "$*" == *--variants* ]] || sleep "${BENCH_SLEEP:-0}"  # the eager bench only
            echo "## table of: ${*:2}" > "$(out_of "$@")"; exit 0 ;;
  custom_train.py)
      [[ -f "$STATE/fail_train" ]] && exit 1
      steps=$(sed 's/.*--steps \\([0-9]*\\).*/\\1/' <<< "$*")
      name=$(sed -n 's/.*--run-name \\([a-z]*\\).*/\\1/p' <<< "$*")
      run="$(out_of "$@")/${name:-small-cross-attn-s42}"; mkdir -p "$run"
      [[ "$*" == *"--compile max"* ]] && echo "Recompiling function forward in unet.py:1"  # counted in its part only
      printf '{"loss": 0.5, "step": 100}\\n{"loss": 0.1, "step": %s}\\n' "$steps" > "$run/log.jsonl"
      printf '{"steps": %s, "images_per_s": 1000.0, "peak_memory_gib": 1.5, "heldout_loss": 0.05, "label_acc": 0.3}' \\
        "$steps" > "$run/results.json"
      echo png > "$run/grid_final.png"; exit 0 ;;
esac
exit 0
"""
PARTS = ["env", "sync", "bench", "data", "train", "resume", "compile", "graphs"]
NEED = "diffusers==0.42.1 clean-fid==0.1.35"
OUT_FILES = ["summary.md", "parts.log", "env.txt", "bench.md", "train_results.json", "train_log.jsonl",
             "train_grid.png", "resume_results.json"]


def clean_env(**extra):
    """The environment without any LIMIT_* override of the caller's."""
    return dict({k: v for k, v in os.environ.items() if not k.startswith("LIMIT_")}, **extra)


def device_env(tmp_path, wheels=True, **extra):
    stub = tmp_path / "python3"
    stub.write_text(DEVICE_STUB)
    stub.chmod(0o755)
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "wheels").mkdir(exist_ok=True)
    if wheels:
        (tmp_path / "wheels/diffusers-0.42.1-py3-none-any.whl").write_text("")
    return clean_env(PYTHON=str(stub), REAL_PYTHON=sys.executable, OUT=str(tmp_path / "out"),
                     WHEELS=str(tmp_path / "wheels"), CALLS=str(tmp_path / "calls.txt"), STATE=str(tmp_path / "state"),
                     STEPS="300", **extra)


def check(env, *args):
    return subprocess.run(["bash", str(ROOT / "bench_device.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_parts_fit_in_seven_minutes_with_compilation_last():
    proc = check(clean_env(), "--list-parts")
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    limits = {name: int(seconds) for name, seconds in lines[:-1]}
    assert list(limits) == PARTS  # compile and the graph option in parts of their own, last; no torchrun
    assert lines[-1] == ["total", str(sum(limits.values()))] and sum(limits.values()) <= 420
    assert all(seconds > 0 for seconds in limits.values())


def test_the_preparation_dry_run_lists_the_wheels_the_machine_lacks():
    proc = check(clean_env(PYTHON=sys.executable), "--prepare", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    pins = proc.stdout.split()
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9][\w.+-]*", pin) for pin in pins), pins
    names = {pin.split("==")[0] for pin in pins}
    assert {"diffusers==0.42.1", "clean-fid==0.1.35"} <= set(pins) and {"importlib-metadata", "zipp"} <= names
    there = {"torch", "torchvision", "triton", "numpy", "scipy", "pillow"}  # on the machine, and too big to carry
    assert not any(n in there or n.startswith(("nvidia-", "cuda-")) for n in names), names
    assert "tomli" not in names  # huggingface-hub needs it only below Python 3.11: markers are read for 3.12


def test_the_check_refuses_in_one_line_without_the_wheels(tmp_path):
    env = device_env(tmp_path, wheels=False, MISSING=NEED)
    proc = check(env)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert NEED in line and "bash bench_device.sh --prepare" in line and ".device-wheels" in line
    assert (tmp_path / "calls.txt").read_text().splitlines() == [f"- {NEED}"]  # the check of what is there, alone
    assert "===" not in (tmp_path / "out/parts.log").read_text()


def test_the_check_refuses_in_one_line_when_the_wheels_lack_a_dependency(tmp_path):
    env = device_env(tmp_path, MISSING=NEED)
    (tmp_path / "state/pip_fails").touch()
    proc = check(env)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert "zipp>=3.20" in line and "bash bench_device.sh --prepare" in line
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls == [f"- {NEED}", f"-m pip install --no-index --find-links {tmp_path / 'wheels'} diffusers==0.42.1"]


@pytest.mark.parametrize("missing", [NEED, "clean-fid==0.1.35"])
def test_the_check_installs_only_what_is_missing_and_writes_each_part(tmp_path, missing):
    env = device_env(tmp_path, MISSING=missing)
    proc = check(env)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    # offline; diffusers with what it needs, clean-fid alone (pip would check torch's own pins through it)
    pip = f"-m pip install --no-index --find-links {tmp_path / 'wheels'}"
    installs = {NEED: [f"{pip} diffusers==0.42.1", f"{pip} --no-deps clean-fid==0.1.35"],
                "clean-fid==0.1.35": [f"{pip} --no-deps clean-fid==0.1.35"]}[missing]
    assert [c for c in calls if c.startswith("-m pip")] == installs
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUT_FILES)  # at most 8 files come back
    summary = (out / "summary.md").read_text()
    for part in PARTS:
        assert f"- {part}: exit 0, " in summary
    assert "torch 2.11.0 stand-in" in summary and "torch 2.11.0 stand-in" in (out / "env.txt").read_text()
    assert "host syncs none" in summary and "torchrun" not in summary
    assert ("  train: 300 steps, 1000 images/s, peak memory 1.50 GiB, loss 0.5000 -> 0.1000 (finite: True, "
            "falling: True), 0 skipped fp16 steps, heldout_loss 0.05000, label_acc 0.300\n") in summary
    assert '"steps": 500' in (out / "resume_results.json").read_text() and "  resume: 500 steps" in summary  # + 200
    # compilation last, recompilations counted per part; the bench tables of both appended to bench.md
    trains = [c for c in calls if "custom_train.py" in c]
    assert "--compile" not in " ".join(trains[:2])
    assert trains[2].startswith("TORCH_LOGS=recompiles ") and trains[2].endswith("--compile --run-name compiled")
    assert trains[3].startswith("TORCH_LOGS=recompiles,cudagraphs ") and "--compile max" in trains[3]
    assert re.search(r"  compiled: 200 steps, .*; recompilations logged: 0, fell back to eager: 0\n", summary)
    assert re.search(r"  graphs: 200 steps, .*; recompilations logged: 1, fell back to eager: 0, cudagraph skips",
                     summary)
    bench = (out / "bench.md").read_text()
    assert "--variants default compile --" in bench and "--variants default compile-max" in bench
    # nothing to install the second time: the check of what is there comes first
    (tmp_path / "calls.txt").unlink()
    assert check(env).returncode == 0
    assert not any(c.startswith("-m pip") for c in (tmp_path / "calls.txt").read_text().splitlines())


def test_the_check_keeps_finished_parts_when_one_times_out_and_reruns_clean(tmp_path):
    env = device_env(tmp_path, MISSING="", BENCH_SLEEP="5", LIMIT_BENCH="1")
    proc = check(env)
    summary = (tmp_path / "out/summary.md").read_text()
    assert "- bench: exit 124 (stopped at its time limit)" in summary and "- train: exit 0" in summary, proc.stderr
    assert "host syncs none" in summary  # the part before it kept its result
    (tmp_path / "state/fail_train").touch()  # a rerun whose training fails: no stale result from the last run
    check(dict(env, BENCH_SLEEP="0"))
    assert not (tmp_path / "out/train_results.json").exists() and not (tmp_path / "out/resume_results.json").exists()
    summary = (tmp_path / "out/summary.md").read_text()
    assert "- train: exit 1" in summary and "  compiled: no results; recompilations logged: 0" in summary
