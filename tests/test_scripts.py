"""run_all_scales.sh and report.py: runs every (method, scale), skips finished runs, writes the table."""
import json
import os
import subprocess
import sys

import pytest

import report
from conftest import ROOT


def fake_result(out_dir, scale, method, seed, best_fid, fid=None):
    run_dir = out_dir / f"{scale}-{method}-s{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(dict(scale=scale, method=method, seed=seed,
                                                          best_fid=best_fid, fid=fid)))


def test_scales_table_layout_and_seed_aggregation(tmp_path):
    fake_result(tmp_path, "small", "adanorm", 1, 20.0)
    fake_result(tmp_path, "small", "adanorm", 2, 21.0)
    fake_result(tmp_path, "medium", "adanorm", 1, 12.3)
    fake_result(tmp_path, "small", "cross-attn", 1, 19.17)
    table = report.scales_table(report.collect(tmp_path), ["adanorm", "cross-attn"])
    assert table.splitlines() == [
        "| method (best_fid) | small | medium | large |",
        "|---|---|---|---|",
        "| adanorm | 20.50 ± 0.71 (n=2) | 12.30 (n=1) | - |",  # sample std of (20, 21) = 0.7071
        "| cross-attn | 19.17 (n=1) | - | - |",
    ]


def test_report_cli_refuses_an_empty_folder(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "report.py"), "scales", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: no finished runs (*/results.json) under {tmp_path}"


def test_run_all_scales_runs_skips_and_tabulates(tmp_path, cifar_dir):
    env = dict(os.environ, SCALES="tiny", OUT_DIR=str(tmp_path / "runs"), PYTHON=sys.executable)
    cmd = ["bash", str(ROOT / "run_all_scales.sh"), "concat-film", "adanorm", "nope", "--", "--steps", "2", "--batch-size", "4",
           "--fid", "off", "--ddim-steps", "2", "--grid-per-class", "1", "--heldout-draws", "0", "--data-dir", str(cifar_dir)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1 and "failed runs: nope/tiny" in first.stderr  # the others still ran
    assert (tmp_path / "runs/tiny-concat-film-s42/results.json").exists()
    assert (tmp_path / "runs/tiny-adanorm-s42/results.json").exists()
    table = (tmp_path / "runs/results_table.md").read_text()
    assert table.splitlines()[2:] == ["| concat-film | - |", "| adanorm | - |", "| nope | - |"]  # --fid off: no FID
    stamp = (tmp_path / "runs/tiny-adanorm-s42/results.json").stat().st_mtime_ns
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "finished with these options and code; nothing to do" in second.stderr
    assert (tmp_path / "runs/tiny-adanorm-s42/results.json").stat().st_mtime_ns == stamp


def test_run_all_scales_help():
    proc = subprocess.run(["bash", str(ROOT / "run_all_scales.sh"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "SCALES" in proc.stdout and "results table" in proc.stdout


STUB_PYTHON = """#!/usr/bin/env bash
# Stands in for python: records each training launch (its GPUs, arguments, start and end time) and
# writes a finished run's results.json; report.py runs for real.
if [[ "$1" == custom_train.py || "$1" == -m ]]; then
  start=$(date +%s.%N); sleep 0.4
  args="$*"; method=$(sed 's/.*--method \\([^ ]*\\).*/\\1/' <<< "$args"); seed=$(sed 's/.*--seed \\([^ ]*\\).*/\\1/' <<< "$args")
  scale=$(sed 's/.*--scale \\([^ ]*\\).*/\\1/' <<< "$args")
  echo "$start $(date +%s.%N) gpus=$CUDA_VISIBLE_DEVICES $args" >> "$LAUNCHES"
  echo "${OMP_NUM_THREADS:-unset}" >> "$LAUNCHES.threads"
  echo "training $method"
  [[ $method == bad ]] && exit 1
  mkdir -p "$OUT_DIR/$scale-$method-s$seed"
  sha=SHA_${method//-/_}
  echo "{\\"scale\\": \\"$scale\\", \\"method\\": \\"$method\\", \\"seed\\": $seed, \\"best_fid\\": $((seed - 30)), \\"method_sha256\\": \\"${!sha:-}\\"}" \\
    > "$OUT_DIR/$scale-$method-s$seed/results.json"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def stub_env(tmp_path):
    """The stand-in python's environment; its results carry today's code hash of each method, as real runs do."""
    import custom_train

    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    shas = {f"SHA_{m.replace('-', '_')}": custom_train.method_sha256(m) for m in ("adanorm", "cross-attn")}
    return dict(os.environ, PYTHON=str(stub), REAL_PYTHON=sys.executable, SCALES="small", OUT_DIR=str(tmp_path / "runs"),
                LAUNCHES=str(tmp_path / "launches.txt"), **shas)


def test_gpus_runs_one_job_per_gpu_at_a_time(tmp_path):
    env = stub_env(tmp_path)
    proc = subprocess.run(["bash", str(ROOT / "run_all_scales.sh"), "--gpus", "3,5", "--seeds", "3", "adanorm", "bad",
                           "cross-attn", "--", "--steps", "9"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("failed runs: bad/small/s42 bad/small/s43 bad/small/s44")
    launches = [line.split(" ", 3) for line in (tmp_path / "launches.txt").read_text().splitlines()]
    assert len(launches) == 9  # every (method, seed) once
    runs = sorted((args.split("--method ")[1].split()[0], args.split("--seed ")[1].split()[0]) for *_, args in launches)
    assert runs == sorted((m, str(s)) for m in ("adanorm", "bad", "cross-attn") for s in (42, 43, 44))
    for *_, args in launches:
        assert "--device cuda" in args and args.endswith("--steps 9") and "--resume" in args
    spans = [(float(start), float(end), gpus) for start, end, gpus, _ in launches]
    assert {gpus for *_, gpus in spans} == {"gpus=3", "gpus=5"}
    for start, _, _ in spans:  # at every moment a run starts: at most one run per GPU, so at most 2 runs
        running = [gpus for s, e, gpus in spans if s <= start < e]
        assert len(running) == len(set(running)) <= 2
    assert any(s2 < e1 and s1 < e2 for i, (s1, e1, _) in enumerate(spans) for (s2, e2, _) in spans[i + 1:])  # parallel
    assert (tmp_path / "runs/logs/adanorm-small-s43.log").read_text() == "training adanorm\n"
    table = (tmp_path / "runs/results_table.md").read_text().splitlines()
    assert table[2] == "| adanorm | 13.00 ± 1.00 (n=3) |"  # best_fid 12, 13, 14 from the stub


def test_gpus_with_torchrun_spreads_each_run_over_all_gpus(tmp_path):
    env = stub_env(tmp_path)
    proc = subprocess.run(["bash", str(ROOT / "run_all_scales.sh"), "--gpus", "0,1", "--torchrun", "--seeds", "2",
                           "--first-seed", "52", "adanorm"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    launches = [line.split(" ", 3) for line in (tmp_path / "launches.txt").read_text().splitlines()]
    assert [args.split("--seed ")[1].split()[0] for *_, args in launches] == ["52", "53"]
    assert [gpus for _, _, gpus, _ in launches] == ["gpus=0,1", "gpus=0,1"]
    assert all(args.startswith("-m torch.distributed.run --standalone --nproc_per_node 2 custom_train.py ")
               for *_, args in launches)
    assert float(launches[1][0]) >= float(launches[0][1])  # one after another


def test_jobs_runs_several_cpu_runs_at_once_with_the_cores_split(tmp_path):
    env = stub_env(tmp_path)
    proc = subprocess.run(["bash", str(ROOT / "run_all_scales.sh"), "--jobs", "2", "--seeds", "2", "adanorm",
                           "cross-attn"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    launches = [line.split(" ", 3) for line in (tmp_path / "launches.txt").read_text().splitlines()]
    spans = [(float(start), float(end)) for start, end, _, _ in launches]
    assert len(spans) == 4 and all(sum(s <= a < e for s, e in spans) <= 2 for a, _ in spans)
    assert any(s2 < e1 and s1 < e2 for i, (s1, e1) in enumerate(spans) for (s2, e2) in spans[i + 1:])  # parallel
    cores = os.cpu_count()
    assert set((tmp_path / "launches.txt.threads").read_text().split()) == {str(max(1, cores // 2))}
    assert (tmp_path / "runs/logs/cross-attn-small-s43.log").read_text() == "training cross-attn\n"
    assert "| adanorm | 12.50 ± 0.71 (n=2) |" in (tmp_path / "runs/results_table.md").read_text()


def test_a_method_file_is_a_method_and_its_log_name_has_no_slash(tmp_path):
    env = stub_env(tmp_path)
    proc = subprocess.run(["bash", str(ROOT / "run_all_scales.sh"), "--jobs", "2", "ideas/class_gain.py"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "--method ideas/class_gain.py" in (tmp_path / "launches.txt").read_text()
    assert (tmp_path / "runs/logs/ideas_class_gain.py-small-s42.log").exists(), proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--jobs", "0"], "error: --jobs needs a positive integer, got '0'"),
    (["--jobs", "2", "--gpus", "0,1"], "error: --jobs is for CPU runs; with --gpus each GPU takes one run at a time"),
    (["--torchrun"], "error: --torchrun needs --gpus LIST (the GPUs each run is spread over)"),
    (["--gpus", "0,x"], "error: --gpus needs a comma-separated list of GPU ids like 0,1,2,3, got '0,x'"),
    (["--seeds", "0"], "error: --seeds needs a positive integer, got '0'"),
    (["--first-seed", "x"], "error: --first-seed needs a non-negative integer, got 'x'"),
])
def test_run_all_scales_bad_options(tmp_path, args, message):
    proc = subprocess.run(["bash", str(ROOT / "run_all_scales.sh"), *args], env=stub_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == message
    assert not (tmp_path / "launches.txt").exists()
