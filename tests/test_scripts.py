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
        "| adanorm | 20.50 ± 0.71 (n=2) | 12.30 | - |",  # sample std of (20, 21) = 0.7071
        "| cross-attn | 19.17 | - | - |",
    ]


def test_report_cli_refuses_an_empty_folder(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "report.py"), "scales", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: no finished runs (*/results.json) under {tmp_path}"


def test_run_all_scales_runs_skips_and_tabulates(tmp_path, cifar_dir):
    env = dict(os.environ, SCALES="tiny", OUT_DIR=str(tmp_path / "runs"), PYTHON=sys.executable)
    cmd = ["bash", str(ROOT / "run_all_scales.sh"), "concat-film", "adanorm", "nope", "--", "--steps", "2", "--batch-size", "4",
           "--fid", "off", "--ddim-steps", "2", "--grid-per-class", "1", "--data-dir", str(cifar_dir)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1 and "failed runs: nope/tiny" in first.stderr  # the others still ran
    assert (tmp_path / "runs/tiny-concat-film-s42/results.json").exists()
    assert (tmp_path / "runs/tiny-adanorm-s42/results.json").exists()
    table = (tmp_path / "runs/results_table.md").read_text()
    assert table.splitlines()[2:] == ["| concat-film | - |", "| adanorm | - |", "| nope | - |"]  # --fid off: no FID
    stamp = (tmp_path / "runs/tiny-adanorm-s42/results.json").stat().st_mtime_ns
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "nothing to resume" in second.stderr
    assert (tmp_path / "runs/tiny-adanorm-s42/results.json").stat().st_mtime_ns == stamp


def test_run_all_scales_help():
    proc = subprocess.run(["bash", str(ROOT / "run_all_scales.sh"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "SCALES" in proc.stdout and "results table" in proc.stdout
