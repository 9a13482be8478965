"""A result belongs to the code and options that made it: what a run records, methods kept in files, the
method's code hash, the edit-and-rerun loop through run_all_scales.sh (on a copy of the project), a
contract check and compile probe that leave no trace, EMA over buffers, and tables that say what they hold."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import custom_train
import report
from conftest import ROOT
from custom_train import HarnessError

FAST = ["--scale", "tiny", "--batch-size", "4", "--ddim-steps", "2", "--grid-per-class", "1", "--sample-batch-size", "8",
        "--log-every", "1", "--heldout-draws", "0", "--fid", "off"]

IDEA = '''"""A test idea: concat-film's time path and a zero-initialised class bias after every block."""
import torch
from torch import nn

from conditioning import zero_module

SCALE = 1.0


def helper(x):
    return x * SCALE


def unrelated():
    return 3


def prepare_conditioning(time_emb, class_emb):
    return time_emb + helper(class_emb)


class ClassConditioner(nn.Module):
    def __init__(self, channels, cond_dim):
        super().__init__()
        self.bias = zero_module(nn.Linear(cond_dim, channels))

    def forward(self, h, class_emb):
        return h + self.bias(class_emb)[:, :, None, None]
'''


def write_idea(path, text=IDEA):
    path.write_text(text)
    return str(path)


def test_the_recorded_code_is_what_the_method_runs():
    code = custom_train.method_code("cross-attn")
    for piece in ("def time_only(", "class CrossAttentionLayer(", "def zero_module(", "def num_groups("):
        assert piece in code
    assert "class AdaLNBlock(" not in code and "def add_class_to_time(" not in code
    tokens = custom_train.method_code("concat-film+class-tokens+gain")
    assert "class ClassTokenCrossAttention(CrossAttentionLayer)" in tokens and "class CrossAttentionLayer(" in tokens
    assert custom_train.method_sha256("cross-attn") != custom_train.method_sha256("adanorm")


def test_the_hash_changes_with_the_code_and_nothing_else(tmp_path):
    idea = tmp_path / "idea.py"
    sha = custom_train.method_sha256(write_idea(idea))
    assert "def helper(" in custom_train.method_code(str(idea)) and "SCALE = 1.0" in custom_train.method_code(str(idea))
    assert "def unrelated(" not in custom_train.method_code(str(idea))
    same = [IDEA.replace("return 3", "return 4"),                                      # code the method never calls
            IDEA.replace("A test idea", "A reworded idea"),                             # the module docstring
            IDEA.replace("    return time_emb + helper(class_emb)",
                         "    # the class, scaled\n    return time_emb + helper(class_emb)")]  # a comment
    for text in same:
        assert custom_train.method_sha256(write_idea(idea, text)) == sha
    other = [IDEA.replace("return x * SCALE", "return 2 * x * SCALE"),                # a helper it calls
             IDEA.replace("SCALE = 1.0", "SCALE = 2.0"),                                # a constant it reads
             IDEA.replace("h + self.bias", "h - self.bias")]                           # its conditioner
    for text in other:
        assert custom_train.method_sha256(write_idea(idea, text)) != sha


def test_a_method_file_runs_like_a_registered_method(tmp_path, cifar_dir):
    idea = write_idea(tmp_path / "idea.py")
    args = FAST + ["--method", idea, "--steps", "2", "--out-dir", str(tmp_path / "runs"), "--data-dir", str(cifar_dir)]
    results = custom_train.main(args)
    sha = custom_train.method_sha256(idea)
    run_dir = tmp_path / "runs" / f"tiny-idea-{sha[:8]}-s42"
    config = json.loads((run_dir / "config.json").read_text())
    assert results["method"] == idea and results["method_sha256"] == config["method_sha256"] == sha
    assert config["method_file"] == str((tmp_path / "idea.py").resolve()) and "def helper(x):" in config["method_source"]
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 2
    # edited, it runs into a directory of its own; the old result stays untouched
    write_idea(tmp_path / "idea.py", IDEA.replace("SCALE = 1.0", "SCALE = 2.0"))
    again = custom_train.main(args)
    assert again["method_sha256"] != sha and len(list((tmp_path / "runs").iterdir())) == 2


@pytest.mark.parametrize("text,message", [
    ("def prepare_conditioning(t, c):\n    return t + c\n", "must define prepare_conditioning and ClassConditioner; it "
                                                            "lacks ClassConditioner"),
    ("import nonexistent_package\n", "failed to import (ModuleNotFoundError: No module named 'nonexistent_package')"),
    (IDEA.replace("h + self.bias(class_emb)[:, :, None, None]", "h[:, :1]"), "must return its input's shape"),
])
def test_a_broken_method_file_is_one_line(tmp_path, text, message):
    idea = write_idea(tmp_path / "idea.py", text)
    with pytest.raises(HarnessError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        custom_train.main(FAST + ["--method", idea, "--steps", "2", "--out-dir", str(tmp_path / "runs")])
    with pytest.raises(HarnessError, match="no such file"):
        custom_train.main(FAST + ["--method", str(tmp_path / "missing.py"), "--out-dir", str(tmp_path / "runs")])


def test_an_interrupted_run_is_not_resumed_into_edited_code(tmp_path, cifar_dir):
    idea = write_idea(tmp_path / "idea.py")
    args = FAST + ["--method", idea, "--steps", "2", "--out-dir", str(tmp_path / "runs"), "--run-name", "fixed",
                   "--data-dir", str(cifar_dir)]
    custom_train.main(args)
    (tmp_path / "runs/fixed/results.json").unlink()  # interrupted after its checkpoint
    write_idea(tmp_path / "idea.py", IDEA.replace("h + self.bias", "h - self.bias"))
    with pytest.raises(HarnessError, match=r"runs/fixed was made by other code for method '.*idea.py' \(sha256 "
                                           r"[0-9a-f]{8}, now [0-9a-f]{8}\); choose another --run-name"):
        custom_train.main(args + ["--resume"])


class CountingConditioner(torch.nn.Module):
    """Counts its training forwards in a float buffer (as a method keeping normalisation statistics would
    update them) and adds a zero-initialised class bias."""

    def __init__(self, channels, cond_dim):
        super().__init__()
        self.register_buffer("forwards", torch.zeros(()))
        self.bias = torch.nn.Linear(cond_dim, channels)
        torch.nn.init.zeros_(self.bias.weight)

    def forward(self, h, class_emb):
        if self.training:
            self.forwards += 1
        return h + self.bias(class_emb)[:, :, None, None]


def test_setup_leaves_buffers_untouched_and_the_ema_averages_them(tmp_path, cifar_dir, monkeypatch):
    """The contract check and the compile probe run the conditioners, but on copies or with their buffers
    restored: after 3 steps each conditioner has counted exactly 3 forwards. The EMA averages the buffer
    like a parameter: ema = lerp(ema, count, 1 - decay) after each step, from 0."""
    import conditioning

    monkeypatch.setitem(conditioning.METHODS, "counting",
                        conditioning.Method(conditioning.add_class_to_time, CountingConditioner, "test"))
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # the probe runs; the graph is eager
    decay = 0.5
    custom_train.main(FAST + ["--method", "counting", "--steps", "3", "--ema-decay", str(decay), "--compile",
                              "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path)])
    ckpt = torch.load(tmp_path / "tiny-counting-s42/checkpoint.pt", weights_only=False)
    counts = {k: v.item() for k, v in ckpt["model"].items() if k.endswith("forwards")}
    assert len(counts) == 9 and set(counts.values()) == {3.0}
    ema = 0.0
    for count in (1.0, 2.0, 3.0):
        ema += (1 - decay) * (count - ema)
    assert {v.item() for k, v in ckpt["ema"].items() if k.endswith("forwards")} == {ema}


def copy_project(dest):
    dest.mkdir()
    for name in ("custom_train.py", "conditioning.py", "proxy.py", "evaluation.py", "report.py", "run_all_scales.sh",
                 "setup.cfg"):
        shutil.copy(ROOT / name, dest / name)  # (setup.cfg: mutation testing runs this test on mutated copies)
    return dest


def test_editing_custom_and_rerunning_the_sweep_never_shows_the_old_numbers(tmp_path, cifar_dir):
    """The tool's main loop, through run_all_scales.sh on a copy of the project: run `custom`, edit it in
    the copy's conditioning.py, run again. The second sweep trains the new code in a directory of its own
    and its table shows only the new code's run, counting the old one as left out."""
    project = copy_project(tmp_path / "project")
    env = dict(os.environ, SCALES="tiny", OUT_DIR=str(tmp_path / "runs"), PYTHON=sys.executable)
    cmd = ["bash", str(project / "run_all_scales.sh"), "custom", "--", *FAST[2:], "--steps", "2", "--data-dir", str(cifar_dir)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    (old_dir,) = (tmp_path / "runs").glob("tiny-custom-*-s42")
    conditioning = project / "conditioning.py"
    conditioning.write_text(conditioning.read_text().replace(
        '    """[B, D] time embedding and [B, D] class embedding -> the [B, D] ResBlock embedding."""\n'
        '    return time_emb + class_emb', '    return time_emb + 2 * class_emb', 1))
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    runs = sorted((tmp_path / "runs").glob("tiny-custom-*-s42"))
    assert len(runs) == 2 and old_dir in runs
    new_dir = next(r for r in runs if r != old_dir)
    new_sha = json.loads((new_dir / "results.json").read_text())["method_sha256"]
    table = (tmp_path / "runs/results_table.md").read_text()
    assert f"| custom@{new_sha[:8]} |" in table and f"custom@{old_dir.name.split('-')[2]}" not in table
    assert "left out: 1 run(s) of custom made by other code than today's" in table
    assert "finished with these options and code" not in second.stderr  # nothing old was reused


def fake(out_dir, name, **fields):
    d = out_dir / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(fields))


def test_tables_mark_deviating_runs_and_split_code_versions(tmp_path):
    base = dict(scale="small", seed=42, protocol_deviations=[], within_budget=True)
    fake(tmp_path, "a", method="adanorm", best_fid=20.0, method_sha256="a" * 64, **base)
    fake(tmp_path, "b", method="adanorm", best_fid=10.0, method_sha256="a" * 64,
         **dict(base, protocol_deviations=["steps=100 (protocol: 35000)"]))  # left out: a conforming run exists
    fake(tmp_path, "c", method="cross-attn", best_fid=19.0, method_sha256="b" * 64, **dict(base, scale="medium"))
    fake(tmp_path, "d", method="cross-attn", best_fid=18.0, method_sha256="c" * 64, **dict(base, scale="medium"))
    fake(tmp_path, "e", method="concat-film", best_fid=30.0, method_sha256="d" * 64,
         **dict(base, protocol_deviations=["lr=0.001 (protocol: 0.0002)"], within_budget=False))
    table = report.scales_table(report.collect(tmp_path))
    lines = table.splitlines()
    assert "| adanorm | 20.00 (n=1) | - | - |" in lines  # the deviating run is not averaged in
    assert "left out of adanorm at small: 1 run(s) that deviate from the protocol" in lines
    assert "| cross-attn@bbbbbbbb | - | 19.00 (n=1) | - |" in lines and "| cross-attn@cccccccc | - | 18.00 (n=1) | - |" in lines
    assert "| concat-film | 30.00 (n=1) * | - | - |" in lines
    assert "* deviates from the protocol: lr=0.001 (protocol: 0.0002); over the parameter budget" in lines


def test_proxy_tables_keep_one_recipe_and_say_when_there_is_no_interval(tmp_path):
    for seed, fd in ((1, 10.0), (2, 12.0)):
        fake(tmp_path, f"cf{seed}", method="concat-film", seed=seed, proxy_fd=fd, class_acc=0.9,
             protocol_deviations=["steps=2400 (protocol: 35000)"])
    fake(tmp_path, "x1", method="cross-attn", seed=1, proxy_fd=15.0, class_acc=0.8,
         protocol_deviations=["steps=2400 (protocol: 35000)"])
    fake(tmp_path, "x2", method="cross-attn", seed=2, proxy_fd=1.0, class_acc=0.99,
         protocol_deviations=["steps=1200 (protocol: 35000)"])  # another recipe: left out, counted
    report.main(["proxy", "--out-dir", str(tmp_path)])
    md = (tmp_path / "comparison.md").read_text()
    assert "| cross-attn | 1 | 15.000 (n=1) | n=1: no interval | - |" in md and "nan" not in md
    assert "left out: 1 run(s) of another recipe (steps=1200 (protocol: 35000); steps=2400 (protocol: 35000))" in md


def test_rank_reproduces_a_published_order_and_says_what_it_cannot_resolve(tmp_path):
    """Five methods, five seeds: metric A follows the published order with a steady gap (validates); metric B
    reverses a resolved pair beyond noise (contradicts); metric C follows the order in mean but resolves no
    pair (no evidence: silence is not agreement). Spearman, the pair verdicts and the noise numbers against
    a hand computation."""
    from scipy import stats

    order, published = ["m1", "m2", "m3", "m4", "m5"], [18.0, 18.05, 19.0, 19.5, 20.0]  # m1/m2 unresolved (0.05)
    luck = [0.3, -0.1, 0.2, -0.4, 0.0]  # shared by every method at a seed
    for i, method in enumerate(order):
        for s in range(5):
            a = 1.0 + 0.1 * i + 0.01 * luck[s] + 0.001 * ((i * 7 + s * 3) % 5)  # lower is better, follows the order
            b = 0.9 - 0.05 * abs(i - 2) + 0.001 * s                          # higher is better, peaks at m3
            c = 0.5 + 0.001 * i + 0.05 * ((i + s) % 5)                         # lower is better, in mean only
            fake(tmp_path, f"{method}-s{s}", method=method, seed=s, heldout_loss=a, label_acc=b, proxy_fd=c)
    runs = report.collect(tmp_path)
    out = report.rank_analysis(runs, order, published, published_noise=0.35,
                               metrics={"heldout_loss": "lower", "label_acc": "higher", "proxy_fd": "lower"})
    a, b, c = out["heldout_loss"], out["label_acc"], out["proxy_fd"]
    assert c["spearman"] > 0 and all(p["verdict"] == "within noise" for p in c["pairs"])
    assert c["verdict"] == "no evidence"
    assert a["spearman"] == pytest.approx(1.0) and a["verdict"] == "validates"
    assert all(p["verdict"] == "agrees, beyond noise" for p in a["pairs"])
    assert [p["resolved"] for p in a["pairs"]][:1] == [False] and sum(p["resolved"] for p in a["pairs"]) == 9
    means = [sum(0.9 - 0.05 * abs(i - 2) + 0.001 * s for s in range(5)) / 5 for i in range(5)]
    rho = stats.spearmanr([-m for m in means], published).statistic
    assert b["spearman"] == pytest.approx(rho) and b["verdict"] == "contradicts"
    m3_vs_m5 = next(p for p in b["pairs"] if (p["better"], p["worse"]) == ("m3", "m5"))
    assert m3_vs_m5["verdict"] == "agrees, beyond noise"
    m1_vs_m3 = next(p for p in b["pairs"] if (p["better"], p["worse"]) == ("m1", "m3"))
    assert m1_vs_m3["resolved"] and m1_vs_m3["verdict"] == "contradicts, beyond noise"
    diffs = [0.001 * ((0 * 7 + s * 3) % 5) - 0.001 * ((1 * 7 + s * 3) % 5) for s in range(5)]
    assert a["pairs"][0]["paired_sd"] == pytest.approx(stats.tstd(diffs))
    n = a["seeds_for_3pct"]
    assert stats.t.ppf(0.975, n - 1) * a["paired_sd"] / n ** 0.5 < 0.03 * a["mean_level"]
    assert n == 2 or stats.t.ppf(0.975, n - 2) * a["paired_sd"] / (n - 1) ** 0.5 >= 0.03 * a["mean_level"]
    report.main(["rank", "--out-dir", str(tmp_path), "--methods", *order, "--published", *map(str, published),
                 "--published-noise", "0.35", "--write", str(tmp_path / "rank")])
    md = (tmp_path / "rank.md").read_text()
    assert "| heldout_loss | +1.00 | validates | 9 / 0 / 0 of 9 |" in md
    assert json.loads((tmp_path / "rank.json").read_text())["label_acc"]["verdict"] == "contradicts"
