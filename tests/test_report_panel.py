"""report.py and the CIFAR class-conditional panel: `scales --metric kid` (and the others), `scales --panel`,
and the panel's curves; runs made before the panel existed show "-" where they lack it."""
import pytest

import report
from conftest import fake_run

HEADS = ["small", "medium", "large"]


def heading(caption):
    return f"| method ({caption}) | " + " | ".join(HEADS) + " |"


@pytest.fixture
def cifar_runs(tmp_path):
    """adanorm: two seeds at small with the panel, one at medium; cross-attn: an older run without it."""
    base = dict(protocol_deviations=[], within_budget=True)
    fake_run(tmp_path, "small-adanorm-s1", method="adanorm", scale="small", seed=1, best_fid=20.0, fid=21.0, kid=0.0100,
         intra_fid=40.0, precision=0.60, recall=0.50, **base)
    fake_run(tmp_path, "small-adanorm-s2", method="adanorm", scale="small", seed=2, best_fid=22.0, fid=23.0, kid=0.0120,
         intra_fid=44.0, precision=0.64, recall=0.40, **base)
    fake_run(tmp_path, "medium-adanorm-s1", method="adanorm", scale="medium", seed=1, best_fid=12.0, fid=12.5,
         kid=0.0050, intra_fid=30.0, precision=0.70, recall=0.55, **base)
    fake_run(tmp_path, "small-cross-attn-s1", method="cross-attn", scale="small", seed=1, best_fid=19.0, fid=19.5, **base)
    return tmp_path


def test_scales_kid_cells_are_mean_std_over_seeds_and_dash_without_the_panel(cifar_runs, capsys):
    report.main(["scales", "--out-dir", str(cifar_runs), "--metric", "kid"])
    assert capsys.readouterr().out.splitlines() == [
        heading("kid, lower is better"),
        "|---|---|---|---|",
        "| adanorm | 0.0110 ± 0.0014 (n=2) | 0.0050 (n=1) | - |",  # sample std of (0.010, 0.012) = 0.001414
        "| cross-attn | - | - | - |",  # made before the panel: no kid
    ]
    table = report.scales_table(report.collect(cifar_runs), metric="precision").splitlines()
    assert table[0] == heading("precision, higher is better")
    assert table[2:] == ["| adanorm | 0.620 ± 0.028 (n=2) | 0.700 (n=1) | - |", "| cross-attn | - | - | - |"]
    # FID's tables are as before the panel: its heading names no direction
    best = report.scales_table(report.collect(cifar_runs)).splitlines()
    assert best[0] == heading("best_fid") and best[3] == "| cross-attn | 19.00 (n=1) | - | - |"


def test_scales_panel_writes_one_table_per_metric_some_run_has(cifar_runs, capsys):
    out = cifar_runs / "panel.md"
    report.main(["scales", "--out-dir", str(cifar_runs), "--panel", "--write", str(out)])
    text = out.read_text()
    assert capsys.readouterr().out == text
    tables = [t.splitlines() for t in text.split("\n\n")]
    # no run has class_acc: no table for it
    assert [t[0] for t in tables] == [heading("fid"), heading("kid, lower is better"),
                                      heading("intra_fid, lower is better"), heading("precision, higher is better"),
                                      heading("recall, higher is better")]
    assert tables[0][2:] == ["| adanorm | 22.00 ± 1.41 (n=2) | 12.50 (n=1) | - |", "| cross-attn | 19.50 (n=1) | - | - |"]
    assert tables[2][2:] == ["| adanorm | 42.00 ± 2.83 (n=2) | 30.00 (n=1) | - |", "| cross-attn | - | - | - |"]
    assert tables[4][2:] == ["| adanorm | 0.450 ± 0.071 (n=2) | 0.550 (n=1) | - |", "| cross-attn | - | - | - |"]


def test_scales_panel_refuses_runs_without_it_and_metric_with_panel(tmp_path, capsys):
    fake_run(tmp_path, "digits", method="adanorm", scale="small", seed=1, proxy_fd=3.0)
    with pytest.raises(SystemExit) as e:
        report.main(["scales", "--out-dir", str(tmp_path), "--panel"])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == (f"error: no run under {tmp_path} has any of fid, kid, intra_fid, "
                                               "precision, recall, class_acc")
    with pytest.raises(SystemExit) as e:
        report.main(["scales", "--out-dir", str(tmp_path), "--panel", "--metric", "kid"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_curves_draw_the_panel_where_evaluations_have_it(tmp_path, drawn):
    """Two seeds with the panel at steps 1 and 2 (the final evaluation repeats step 2 and is not drawn twice),
    and an older run with FID only: kid, intra_fid, precision, recall panels appear, with the seeds' mean bold."""
    def panel(step, seed):
        return dict(step=step, fid=30.0 / step, kid=0.01 * seed / step, intra_fid=50.0 / step + seed,
                    precision=0.1 * step + 0.01 * seed, recall=0.2 * step, class_acc=0.3 * step)
    for seed in (1, 2):
        fake_run(tmp_path, f"s{seed}", method="adanorm", seed=seed,
             evals=[panel(1, seed), panel(2, seed), dict(panel(2, seed), kid=99.0)])
    fake_run(tmp_path, "old", method="cross-attn", seed=1, evals=[dict(step=2, fid=25.0)])
    path = tmp_path / "curves.png"
    panels = report.curves_plot(report.collect(tmp_path), path)
    assert panels == ["loss", "fid", "kid", "intra_fid", "precision", "recall", "class_acc"]
    assert path.stat().st_size > 10_000
    means = {(ax.get_title(), kw["label"]): (x, y) for ax, x, y, kw in drawn if "label" in kw}
    assert means[("kid", "adanorm (n=2)")] == ([1, 2], pytest.approx([0.015, 0.0075]))  # not the final's 99
    assert means[("intra_fid", "adanorm (n=2)")] == ([1, 2], pytest.approx([51.5, 26.5]))
    assert means[("precision", "adanorm (n=2)")] == ([1, 2], pytest.approx([0.115, 0.215]))
    assert means[("recall", "adanorm (n=2)")] == ([1, 2], pytest.approx([0.2, 0.4]))
    assert means[("fid", "cross-attn (n=1)")] == ([2], [25.0])
    assert not any(title == "kid" and label.startswith("cross-attn") for title, label in means)  # it has no kid
    old_only = [r for r in report.collect(tmp_path) if r["method"] == "cross-attn"]
    assert report.curves_plot(old_only, tmp_path / "old.png") == ["loss", "fid"]
