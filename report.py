"""Tables and plots from finished runs: reads every RUN/results.json under --out-dir.

    python report.py scales --out-dir runs                  # best_fid per method x scale, the protocol's layout
    python report.py scales --out-dir runs --metric kid     # ... or another final number (SCALE_METRICS)
    python report.py scales --out-dir runs --panel --write runs/panel.md   # fid and the CIFAR panel, a table each
    python report.py proxy --out-dir runs/proxy             # digits proxy: mean ± std over seeds, vs the best baseline
    python report.py proxy --out-dir runs/proxy --seeds 42 43 44 45 46   # only these seeds
    python report.py rank --out-dir runs/proxy --methods gn-film-branch concat-film+cross-attn cross-attn \\
        concat-film adanorm --published 18.67 18.75 19.17 19.39 20.01 --published-noise 0.35
                                                            # does each metric reproduce the published order?
    python report.py curves --out-dir runs/proxy --methods concat-film cross-attn   # metrics against the step
                                                            # (and against the guidance scale, where runs have it)
    python report.py guidance --out-dir runs/proxy --write-prefix runs/proxy/guidance   # classifier-free guidance:
                                                            # the metric per scale, each seed's best, its gain over 1
    python report.py rescore --out-dir runs/proxy --samples 3000   # score finished digits runs again
    python report.py proxy --out-dir runs/proxy --rescored 3000    # ... and compare those scores

Tables tell the truth about what they hold. A method whose runs were made by different code is split into
rows labelled METHOD@SHA (the first 8 hex digits of its code's sha256), and the `custom` method and file
methods always carry theirs; --current-code keeps only runs of today's code. In `scales`, runs that
deviate from the protocol or exceed the budget are marked (and left out of a cell that also has
conforming runs); in `proxy` and `rank`, runs of another recipe than the most common one are left out.
Every left-out run is counted below the table.

The proxy comparison tests each method against the best baseline with Welch's t-test (unequal variances)
and, where both ran the same seeds, the paired-by-seed t-test: a difference is "beyond noise" when its
interval excludes 0; with fewer than 2 seeds there is no interval, and the cell says so.

Runs evaluated at several guidance scales (custom_train.py --guidance W1,W2,...) report the best scale's
numbers; `proxy` and `scales` show that scale of each run ("best guidance", "(w 2, 2, 3)"; 1 for a run
without guidance), so a table never hides that its numbers were picked among scales. `guidance` compares
the methods' whole curves, as the run's final evaluation scored them.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter
from pathlib import Path

SCALE_ORDER = ("small", "medium", "large")
BASELINES = ("concat-film", "cross-attn", "adanorm")
# metric -> which direction is better; the proxy metrics from the samples, then the held-out metrics
# (a table or plot shows the metrics its runs have: runs made before the panel existed lack its four)
PROXY_METRICS = {"proxy_fd": "lower", "class_acc": "higher", "heldout_loss": "lower", "label_acc": "higher",
                 "proxy_kid": "lower", "proxy_intra_fd": "lower", "proxy_precision": "higher", "proxy_recall": "higher"}
# the final numbers `scales` tabulates -> which direction is better: FID, then the CIFAR panel beside it
# (runs made before the panel existed lack its keys; their cells are "-")
SCALE_METRICS = {"best_fid": "lower", "fid": "lower", "kid": "lower", "intra_fid": "lower", "precision": "higher",
                 "recall": "higher", "class_acc": "higher"}
PANEL = ("fid", "kid", "intra_fid", "precision", "recall", "class_acc")  # `scales --panel`: a table each
BETTER = {**PROXY_METRICS, **SCALE_METRICS}  # every metric's direction
CURVE_METRICS = ("fid", "kid", "intra_fid", "precision", "recall", "proxy_fd", "class_acc", "heldout_loss", "label_acc",
                 "proxy_kid", "proxy_intra_fd", "proxy_precision", "proxy_recall")  # `curves`: a panel each
# what a guidance curve's entries may hold (the held-out metrics are not sampled, so have no scale)
GUIDANCE_METRICS = tuple(m for m in CURVE_METRICS if m not in ("heldout_loss", "label_acc"))
DIGITS = {"proxy_fd": 3, "class_acc": 3, "heldout_loss": 5, "label_acc": 4, "proxy_kid": 1, "proxy_intra_fd": 2,
          "proxy_precision": 3, "proxy_recall": 3, "best_fid": 2, "fid": 2, "kid": 4, "intra_fid": 2, "precision": 3,
          "recall": 3}  # kid: clean-fid's raw kernel distance, ~0.001-0.05 on CIFAR


class ReportError(Exception):
    """Printed as one line, exit status 1."""


def collect(out_dir: Path) -> list[dict]:
    """The results.json of every finished run directly under out_dir, sorted by path."""
    runs = []
    for path in sorted(Path(out_dir).glob("*/results.json")):
        result = json.loads(path.read_text())
        result["run_dir"] = str(path.parent)
        runs.append(result)
    return runs


def current_sha256(method: str) -> str | None:
    """Today's code hash of a method (None if it no longer exists)."""
    import custom_train

    try:
        return custom_train.method_sha256(method)
    except custom_train.HarnessError:
        return None


def label_versions(runs: list[dict]) -> list[dict]:
    """Set each run's "label": its method, plus @SHA when the method's runs were made by more than one
    version of its code, and always for `custom` and file methods (whose name says nothing of the code)."""
    versions: dict[str, set] = {}
    for r in runs:
        versions.setdefault(r["method"], set()).add(r.get("method_sha256"))
    for r in runs:
        sha = r.get("method_sha256")
        versioned = len(versions[r["method"]]) > 1 or r["method"] == "custom" or r["method"].endswith(".py")
        r["label"] = f"{r['method']}@{sha[:8] if sha else 'unrecorded'}" if versioned else r["method"]
    return runs


def keep_current_code(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """Only the runs made by today's code of their method; notes on the others."""
    today = {m: current_sha256(m) for m in {r["method"] for r in runs}}
    kept = [r for r in runs if r.get("method_sha256") and r["method_sha256"] == today[r["method"]]]
    gone = Counter(r["method"] for r in runs if r not in kept)
    notes = [f"left out: {n} run(s) of {m} made by other code than today's" for m, n in sorted(gone.items())]
    return kept, notes


def deviates(r: dict) -> list[str]:
    out = list(r.get("protocol_deviations") or [])
    if r.get("within_budget") is False:
        out.append("over the parameter budget")
    return out


def recipe(r: dict) -> tuple:
    """What a run was made with, besides its method and seed: its deviations from the protocol."""
    return tuple(sorted(d for d in r.get("protocol_deviations") or [] if not d.startswith("seed=")))


def keep_main_recipe(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """The runs of the most common recipe; notes on the others (what differs)."""
    if not runs:
        return runs, []
    counts = Counter(recipe(r) for r in runs)
    main = max(counts, key=lambda k: (counts[k], k))
    notes = []
    for other, n in sorted(counts.items()):
        if other != main:
            differ = sorted(set(other) ^ set(main))
            notes.append(f"left out: {n} run(s) of another recipe ({'; '.join(differ)})")
    return [r for r in runs if recipe(r) == main], notes


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_cell(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n=1)"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f} (n={len(values)})"


def best_scale(r: dict, metric: str | None = None) -> float:
    """The guidance scale a run's headline numbers come from (for best_fid, that of the evaluation it came
    from): 1 for a run without guidance."""
    w = r.get(f"{metric}_guidance", r.get("best_guidance")) if metric in ("best_fid", "best_proxy_fd") else \
        r.get("best_guidance")
    return 1.0 if w is None else w


def scales_text(scales) -> str:
    return ", ".join(f"{w:g}" for w in scales)


def guidance_suffix(runs: list[dict], metric: str) -> str:
    """" (w 2, 2, 3)": the best guidance scale of each run behind a cell's number, in seed order; "" when
    none of them was guided (tables of unguided runs stay as they were)."""
    shown = sorted((r for r in runs if r.get(metric) is not None and math.isfinite(r[metric])),
                   key=lambda r: r.get("seed", 0))
    if not any(r.get("best_guidance", r.get(f"{metric}_guidance")) is not None for r in shown):
        return ""
    return f" (w {scales_text(best_scale(r, metric) for r in shown)})"


def row_labels(runs: list[dict], methods: list[str] | None = None) -> list[str]:
    """A table's rows: each method (in the order asked, else sorted) with its code versions (label_versions)."""
    order = methods or sorted({r["method"] for r in runs})
    return [lab for m in order for lab in sorted({r["label"] for r in runs if r["method"] == m})]


def scales_table(runs: list[dict], methods: list[str] | None = None, scales=SCALE_ORDER,
                 metric: str = "best_fid") -> str:
    """Markdown: one row per method (and code version), one column per scale; a cell is the mean ± std
    over seeds with n. A cell takes the runs that follow the protocol; only where none does, it shows
    the deviating ones, marked *, and the deviations are listed below. The heading says which direction
    is better, except for FID's, which stays as tables written before the panel have it. Where runs were
    guided, a cell names each run's best guidance scale: its number was picked among scales."""
    runs = label_versions(runs)
    rows = []
    for method in methods or sorted({r["method"] for r in runs}):
        labels = sorted({r["label"] for r in runs if r["method"] == method}) or [method]
        rows += labels
    marks, notes, digits = {}, [], DIGITS.get(metric, 2)
    caption = metric if metric in ("best_fid", "fid") or metric not in SCALE_METRICS else \
        f"{metric}, {SCALE_METRICS[metric]} is better"
    lines = [f"| method ({caption}) | " + " | ".join(scales) + " |", "|---" * (len(scales) + 1) + "|"]
    for label in rows:
        cells = []
        for scale in scales:
            here = [r for r in runs if r["label"] == label and r.get("scale") == scale]
            conforming = [r for r in here if not deviates(r)]
            if conforming or not here:
                if len(conforming) < len(here):
                    notes.append(f"left out of {label} at {scale}: {len(here) - len(conforming)} run(s) that deviate "
                                 f"from the protocol")
                cells.append(format_cell([r.get(metric) for r in conforming], digits)
                             + guidance_suffix(conforming, metric))
                continue
            cell = format_cell([r.get(metric) for r in here], digits)
            if cell != "-":  # a number from runs that deviate: marked, and the deviations listed below
                cell += guidance_suffix(here, metric)
                for r in here:
                    marks.setdefault("; ".join(deviates(r)), len(marks) + 1)
                cell += " " + " ".join(sorted({"*" * marks["; ".join(deviates(r))] for r in here}))
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    for deviation, n in marks.items():
        table += f"\n{'*' * n} deviates from the protocol: {deviation}"
    for note in notes:
        table += f"\n{note}"
    return table + ("\n" if marks or notes else "")


def panel_tables(runs: list[dict], methods: list[str] | None = None, scales=SCALE_ORDER, metrics=PANEL) -> str:
    """`scales --panel`: one table per metric, blank-line separated, for the metrics some run has (digits
    runs or runs made before the panel have none of it); "" when no run has any."""
    present = [m for m in metrics if any(r.get(m) is not None for r in runs)]
    return "\n".join(scales_table(runs, methods, scales, m) for m in present)


def welch_interval(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its Welch confidence interval (NaN bounds with fewer than 2 values a side)."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return statistics.fmean(a) - statistics.fmean(b), math.nan, math.nan
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
    return statistics.fmean(a) - statistics.fmean(b), float(ci.low), float(ci.high)


def paired_interval(a: dict[int, float], b: dict[int, float], confidence: float = 0.95):
    """mean over seeds of a[seed] - b[seed] and its paired-t confidence interval, or None unless both
    have the same seeds (at least 2). Runs of one seed share their data order, training noise and
    sampling noise across methods, so the per-seed difference cancels that shared luck."""
    from scipy import stats

    if sorted(a) != sorted(b) or len(a) < 2:
        return None
    seeds = sorted(a)
    diffs = [a[s] - b[s] for s in seeds]
    if max(diffs) - min(diffs) <= 1e-12 * max(1.0, abs(diffs[0])):  # the same difference at every seed
        return diffs[0], diffs[0], diffs[0]
    ci = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).confidence_interval(confidence)
    return statistics.fmean(diffs), float(ci.low), float(ci.high)


def noise_verdict(diff: float, low: float, high: float, better: str, words=("better", "worse")) -> str:
    """words: what a difference beyond noise in the better and the other direction is called (a number
    with no better side, such as a guidance scale, says "higher"/"lower")."""
    if math.isnan(low) or math.isnan(high):
        return "n=1: no interval"
    if not (low > 0 or high < 0):
        return "within noise"
    return f"{words[0]}, beyond noise" if (diff < 0) == (better == "lower") else f"{words[1]}, beyond noise"


def by_label(runs: list[dict], metric: str) -> dict[str, dict[int, float]]:
    """label -> {seed: value} for the runs that have the metric."""
    out: dict[str, dict[int, float]] = {}
    for r in runs:
        if r.get(metric) is not None and math.isfinite(r[metric]):
            out.setdefault(r["label"], {})[r["seed"]] = r[metric]
    return out


def proxy_comparison(runs: list[dict], methods: list[str] | None = None, confidence: float = 0.95,
                     metrics=PROXY_METRICS, references=BASELINES) -> list[dict]:
    """One row per method (and code version): n, mean and std of each metric, and for each metric the
    difference from the best reference (by default the three baselines; best by that metric's mean) with
    its Welch interval and verdict, and, where both ran the same seeds, the paired-by-seed interval and
    its verdict. Where some runs were guided, every row lists its runs' best guidance scales, in seed order."""
    runs = label_versions([r for r in runs if any(r.get(k) is not None for k in metrics)])
    values = {k: by_label(runs, k) for k in metrics}
    guided = any(r.get("best_guidance") is not None for r in runs)
    rows = []
    for label in row_labels(runs, methods):
        mine_runs = sorted((r for r in runs if r["label"] == label), key=lambda r: r["seed"])
        seeds = sorted({r["seed"] for r in mine_runs})
        row = dict(method=label, n=len(seeds), seeds=seeds)
        if guided:
            row["best_guidance"] = [best_scale(r) for r in mine_runs]
        for metric, better in metrics.items():
            mine = values[metric].get(label)
            if not mine:
                continue
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(list(mine.values()))
            row[f"{metric}_n"] = len(mine)
            present = [b for b in references if b in values[metric]]
            if not present:
                continue
            pick = min if better == "lower" else max
            best = pick(present, key=lambda b: statistics.fmean(values[metric][b].values()))
            row[f"{metric}_baseline"] = best
            if label == best:
                row[f"{metric}_verdict"] = "best reference" if set(references) != set(BASELINES) else "best baseline"
                continue
            theirs = values[metric][best]
            diff, low, high = welch_interval(list(mine.values()), list(theirs.values()), confidence)
            row[f"{metric}_diff"], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = diff, low, high
            row[f"{metric}_verdict"] = noise_verdict(diff, low, high, better)
            paired = paired_interval(mine, theirs, confidence)
            if paired:
                row[f"{metric}_paired_diff"] = paired[0]
                row[f"{metric}_paired_ci_low"], row[f"{metric}_paired_ci_high"] = paired[1], paired[2]
                row[f"{metric}_paired_verdict"] = noise_verdict(*paired, better)
        rows.append(row)
    return rows


def proxy_markdown(rows: list[dict], confidence: float = 0.95, metrics=PROXY_METRICS, reference="best baseline") -> str:
    level = f"{100 * confidence:g}%"
    shown = [m for m in metrics if any(f"{m}_mean" in r for r in rows)]
    guided = any("best_guidance" in r for r in rows)
    head = "| method | n | " + ("best guidance | " if guided else "") + " | ".join(
        f"{m} {'↓' if metrics[m] == 'lower' else '↑'} (mean ± std) | Δ vs {reference} [Welch {level} CI] | paired by seed"
        for m in shown) + " |"
    lines = [head, "|---" * (2 + guided + 3 * len(shown)) + "|"]
    for r in rows:
        cells = [r["method"], str(r["n"])] + ([scales_text(r.get("best_guidance", []))] if guided else [])
        for metric in shown:
            d = DIGITS.get(metric, 3)
            if f"{metric}_mean" not in r:
                cells += ["-", "-", "-"]
                continue
            n = r[f"{metric}_n"]
            cells.append(f"{r[f'{metric}_mean']:.{d}f} ± {r[f'{metric}_std']:.{d}f}" if n > 1 else
                         f"{r[f'{metric}_mean']:.{d}f} (n=1)")
            if f"{metric}_diff" in r and not math.isnan(r[f"{metric}_ci_low"]):
                cells.append(f"{r[f'{metric}_diff']:+.{d}f} [{r[f'{metric}_ci_low']:+.{d}f}, "
                             f"{r[f'{metric}_ci_high']:+.{d}f}] {r[f'{metric}_verdict']}")
            else:
                cells.append(r.get(f"{metric}_verdict", "-"))
            if f"{metric}_paired_verdict" in r:
                cells.append(f"[{r[f'{metric}_paired_ci_low']:+.{d}f}, {r[f'{metric}_paired_ci_high']:+.{d}f}] "
                             f"{r[f'{metric}_paired_verdict']}")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Δ: method minus the {reference} for that metric (by mean); {level} CI from Welch's t-test over seeds "
                 f"(unequal variances); paired by seed: the {level} paired-t interval of the per-seed differences (runs "
                 "of one seed share data order, noise and sampling labels across methods); \"beyond noise\" when "
                 "the interval excludes 0; n=1: one seed, no interval."
                 + (" best guidance: the guidance scale each seed's numbers come from (1: a run without guidance)."
                    if guided else ""))
    return "\n".join(lines) + "\n"


def proxy_csv(rows: list[dict], path: Path) -> None:
    import csv

    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "method", k != "n", k))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()})


def proxy_plot(rows: list[dict], runs: list[dict], path: Path, metrics=PROXY_METRICS) -> None:
    """Mean ± std per method (error bars) with every seed as a dot, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if any(f"{m}_mean" in r for r in rows)]
    fig, axes = plt.subplots(1, len(shown), figsize=(2 + (1 + 0.9 * len(rows)) * len(shown), 4), squeeze=False)
    for ax, metric in zip(axes[0], shown):
        for i, r in enumerate(rows):
            if f"{metric}_mean" not in r:
                continue
            seeds = [x[metric] for x in runs if x.get("label") == r["method"] and x.get(metric) is not None]
            ax.errorbar(i, r[f"{metric}_mean"], yerr=r[f"{metric}_std"], fmt="o", capsize=5, color="C0")
            ax.scatter([i + 0.15] * len(seeds), seeds, s=10, color="C1", alpha=0.7)
        ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, ha="right")
        ax.set_title(f"{metric} ({metrics[metric]} is better)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"digits proxy, mean ± std over seeds (n = {', '.join(sorted({str(r['n']) for r in rows}))})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seeds_needed(diff: float, sd: float, confidence: float = 0.95) -> int | None:
    """Paired seeds for a paired t interval of half-width |diff| (the smallest n with t * sd / sqrt(n) < |diff|)."""
    from scipy import stats

    if sd == 0:
        return 2
    if diff == 0:
        return None
    for n in range(2, 100_000):
        if stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n) < abs(diff):
            return n
    return None


def rank_analysis(runs: list[dict], order: list[str], published: list[float] | None = None,
                  published_noise: float = 0.0, metrics=PROXY_METRICS, confidence: float = 0.95) -> dict:
    """How well each metric reproduces a published ranking of methods (given best first, with their published
    FIDs if known). Per metric: Spearman's rank correlation between the metric's means and the published
    values (+1: the same order); every pair's paired-by-seed difference (the published better minus the
    worse) and interval, marked "resolved" when the published values differ by more than their own noise;
    the verdict: "validates" (rho > 0, at least one resolved pair agreeing beyond noise and none contradicted
    beyond noise; a metric that resolves nothing is silent, not in agreement), "contradicts" (some resolved
    pair reversed beyond noise) or "no evidence"; and the metric's noise: the paired sd between
    methods (mean over pairs), the sd between seeds of one method (mean over methods), and the paired
    seeds it would take to resolve a 3% difference."""
    from scipy import stats

    published = published or [float(i) for i in range(len(order))]  # ranks: lower is better, like FID
    runs = label_versions(runs)
    out = {}
    for metric, better in metrics.items():
        values = by_label(runs, metric)
        if not all(m in values for m in order):
            continue
        means = [statistics.fmean(values[m].values()) for m in order]
        signed = [v if better == "lower" else -v for v in means]  # lower is better, like FID
        rho = float(stats.spearmanr(signed, published).statistic)
        pairs, paired_sds = [], []
        for i, a in enumerate(order):
            for j in range(i + 1, len(order)):
                b = order[j]
                p = paired_interval(values[a], values[b], confidence)
                common = sorted(set(values[a]) & set(values[b]))
                diffs = [values[a][s] - values[b][s] for s in common]
                sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
                paired_sds.append(sd)
                pair = dict(better=a, worse=b, n=len(common), diff=p[0] if p else None,
                            ci=(p[1], p[2]) if p else None, paired_sd=sd,
                            resolved=abs(published[i] - published[j]) > published_noise, adjacent=j == i + 1)
                if p:  # agrees: the metric puts the published better one ahead beyond noise; contradicts: the reverse
                    agree = (p[0] < 0) == (better == "lower")
                    pair["verdict"] = "within noise" if not (p[1] > 0 or p[2] < 0) else (
                        "agrees, beyond noise" if agree else "contradicts, beyond noise")
                pairs.append(pair)
        contradicted = [p for p in pairs if p["resolved"] and p.get("verdict") == "contradicts, beyond noise"]
        agreeing = [p for p in pairs if p["resolved"] and p.get("verdict") == "agrees, beyond noise"]
        verdict = "contradicts" if contradicted else ("validates" if rho > 0 and agreeing else "no evidence")
        spread = [statistics.stdev(values[m].values()) for m in order if len(values[m]) > 1]
        seed_sd = statistics.fmean(spread) if spread else math.nan
        finite = [x for x in paired_sds if not math.isnan(x)]
        paired_sd = statistics.fmean(finite) if finite else math.nan
        level = statistics.fmean(abs(v) for v in means)
        out[metric] = dict(better=better, means=dict(zip(order, means)), spearman=rho, verdict=verdict, pairs=pairs,
                           paired_sd=paired_sd, seed_sd=seed_sd, mean_level=level,
                           seeds_for_3pct=seeds_needed(0.03 * level, paired_sd, confidence) if finite else None)
    return out


def rank_markdown(analysis: dict, order: list[str], published: list[float] | None = None) -> str:
    shown = " < ".join(f"{m} ({v:g})" for m, v in zip(order, published)) if published else " < ".join(order)
    lines = [f"Published order, best first: {shown}", "",
             "| metric | Spearman vs published | verdict | resolved pairs agreeing / within noise / contradicting | "
             "paired sd between methods | sd between seeds | paired seeds for a 3% difference |",
             "|---|---|---|---|---|---|---|"]
    for metric, a in analysis.items():
        d = DIGITS.get(metric, 3)
        resolved = [p for p in a["pairs"] if p["resolved"]]
        tally = [sum(p.get("verdict") == v for p in resolved) for v in
                 ("agrees, beyond noise", "within noise", "contradicts, beyond noise")]
        lines.append(f"| {metric} | {a['spearman']:+.2f} | {a['verdict']} | {' / '.join(map(str, tally))} of "
                     f"{len(resolved)} | {a['paired_sd']:.{d}f} | {a['seed_sd']:.{d}f} | {a['seeds_for_3pct'] or '-'} |")
    lines += ["", "| pair (published better vs worse) | resolved in the published table | "
              + " | ".join(analysis) + " |", "|---" * (2 + len(analysis)) + "|"]
    first = next(iter(analysis.values()))
    for k, pair in enumerate(first["pairs"]):
        cells = [f"{pair['better']} vs {pair['worse']}", "yes" if pair["resolved"] else "no"]
        for metric, a in analysis.items():
            p, d = a["pairs"][k], DIGITS.get(metric, 3)
            cells.append("-" if p["diff"] is None else
                         f"{p['diff']:+.{d}f} [{p['ci'][0]:+.{d}f}, {p['ci'][1]:+.{d}f}] {p['verdict']}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Each pair: the paired-by-seed difference, published better minus worse, with its 95% interval; "
              "\"agrees\" when the metric puts the published better one ahead beyond noise. A pair is resolved when "
              "the published values differ by more than their noise. Verdict: validates (Spearman > 0, at least one "
              "resolved pair agreeing beyond noise and none contradicted), contradicts (some resolved pair reversed beyond noise), or no "
              "evidence. 3%: of the metric's mean level over these methods; noise sds: paired over all pairs, between "
              "seeds within each method."]
    return "\n".join(lines) + "\n"


def smooth(values: list[float], window: int = 5) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def seeds_and_mean(ax, series: list[list[tuple]], colour: str, label: str, marker: str | None) -> None:
    """Each seed's (x, y) points a thin line, and their mean bold and labelled, at the x every seed has."""
    for points in series:
        xs, ys = zip(*points)
        ax.plot(xs, ys, color=colour, lw=0.6, alpha=0.5, marker=marker)
    curves = [dict(points) for points in series]
    common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    if common:
        ax.plot(common, [statistics.fmean(c[x] for c in curves) for x in common], color=colour, lw=2,
                marker=marker and "o", label=f"{label} (n={len(series)})")


def curves_plot(runs: list[dict], path: Path, metrics=CURVE_METRICS) -> list[str]:
    """The training loss (smoothed) and every evaluation metric against the step: one colour per method,
    each seed a thin line, their mean bold. Returns the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = label_versions(runs)
    for r in runs:
        lines = [json.loads(line) for line in (Path(r["run_dir"]) / "log.jsonl").read_text().splitlines()]
        r["_train"] = [(x["step"], x["loss"]) for x in lines if x.get("loss") is not None]
        # one point per step: evals lists the final evaluation last, so it stands only where no periodic one did
        by_step = {}
        for e in r.get("evals", []):
            by_step.setdefault(e["step"], e)
        r["_evals"] = [by_step[s] for s in sorted(by_step)]
    panels = ["loss"] + [m for m in metrics if any(e.get(m) is not None for r in runs for e in r["_evals"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    labels = sorted({r["label"] for r in runs})
    for ax, panel in zip(axes[0], panels):
        for i, label in enumerate(labels):
            series = []
            for r in (r for r in runs if r["label"] == label):
                points = r["_train"] if panel == "loss" else \
                    [(e["step"], e[panel]) for e in r["_evals"] if e.get(panel) is not None]
                if points:
                    steps, values = zip(*points)
                    series.append(list(zip(steps, smooth(list(values)) if panel == "loss" else values)))
            seeds_and_mean(ax, series, f"C{i}", label, None if panel == "loss" else ".")
        ax.set_title(panel + (" (smoothed)" if panel == "loss" else ""))
        ax.set_xlabel("step")
        if panel in ("loss", "heldout_loss"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    save_panels(fig, axes, path)
    return panels


def save_panels(fig, axes, path: Path) -> None:
    """The legend (the methods) once, on the first panel; the figure written and closed."""
    import matplotlib.pyplot as plt

    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def guidance_curve(r: dict, metric: str) -> dict[float, float]:
    """scale -> the metric there, in the order the scales were asked, as the run's final evaluation scored
    them (results' "guidance" is its curve); {} for a run without guidance or without that metric."""
    return {e["guidance"]: e[metric] for e in r.get("guidance") or []
            if e.get(metric) is not None and math.isfinite(e[metric])}


def guidance_plot(runs: list[dict], path: Path, metrics=GUIDANCE_METRICS) -> list[str]:
    """Each metric against the guidance scale, from the runs' final evaluations: one colour per method,
    each seed a thin line, their mean bold. Returns the panels drawn: the metrics some run's curve has
    (none: [] and no file)."""
    runs = label_versions([r for r in runs if r.get("guidance")])
    panels = [m for m in metrics if any(guidance_curve(r, m) for r in runs)]
    if not panels:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    labels = sorted({r["label"] for r in runs})
    for ax, panel in zip(axes[0], panels):
        for i, label in enumerate(labels):
            series = [sorted(guidance_curve(r, panel).items()) for r in runs if r["label"] == label]
            seeds_and_mean(ax, [s for s in series if s], f"C{i}", label, ".")
        ax.set_title(f"{panel} ({BETTER[panel]} is better)")
        ax.set_xlabel("guidance scale")
        ax.grid(alpha=0.3)
    save_panels(fig, axes, path)
    return panels


def paired_cell(a: dict, b: dict, better: str, digits: int, confidence: float, words=("better", "worse")) -> str:
    """a - b paired by the seeds both have: the mean difference, its paired interval, the verdict and n;
    "-" with fewer than 2 seeds in common."""
    common = sorted(set(a) & set(b))
    p = paired_interval({s: a[s] for s in common}, {s: b[s] for s in common}, confidence)
    if p is None:
        return "-"
    return (f"{p[0]:+.{digits}f} [{p[1]:+.{digits}f}, {p[2]:+.{digits}f}] {noise_verdict(*p, better, words)} "
            f"(n={len(common)})")


def guidance_table(runs: list[dict], metric: str, methods: list[str] | None = None, confidence: float = 0.95) -> str:
    """Markdown: per method, the metric of the final evaluation at each guidance scale (mean ± std over seeds,
    n), each seed's best scale (the run's best_guidance: the harness's pick by its primary metric, whatever
    metric is shown) and the metric's gain there over scale 1; then every pair of methods on the gain and on
    the best scale, paired by seed. Whether guidance helps a method more than another is a question about
    the curves."""
    runs = label_versions([r for r in runs if r.get("guidance")])
    better, digits = BETTER[metric], DIGITS.get(metric, 3)
    labels = row_labels(runs, methods)
    ordered = sorted(runs, key=lambda r: r["seed"])
    curves = {lab: {r["seed"]: guidance_curve(r, metric) for r in ordered
                    if r["label"] == lab and guidance_curve(r, metric)} for lab in labels}  # seed -> curve
    best = {lab: {r["seed"]: best_scale(r) for r in ordered if r["seed"] in curves[lab] and r["label"] == lab}
            for lab in labels}
    gain = {lab: {s: c[best[lab][s]] - c[1.0] for s, c in per.items() if 1.0 in c and best[lab][s] in c}
            for lab, per in curves.items()}  # (a metric undefined at a scale, e.g. intra-FD on few samples: no gain)
    scales = sorted({w for per in curves.values() for c in per.values() for w in c})
    samples = sorted({r["guidance_samples"] for r in runs if r.get("guidance_samples")})
    level = f"{100 * confidence:g}%"
    lines = [f"{metric} ({better} is better) of each run's final evaluation at each guidance scale w, mean ± std "
             f"over seeds (n)" + (f"; each scale scored on {scales_text(samples)} samples" if samples else ""), "",
             "| method | " + " | ".join(f"w={w:g}" for w in scales) + " | best w per seed | gain: best w − w=1 |",
             "|---" * (len(scales) + 3) + "|"]
    for lab in labels:
        cells = [format_cell([c.get(w) for c in curves[lab].values()], digits) for w in scales]
        cells += [scales_text(best[lab].values()) or "-", format_cell(list(gain[lab].values()), digits)]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    if len(labels) > 1:
        lines += ["", f"| pair (A vs B) | gain: A − B [{level} paired CI] | best w: A − B [{level} paired CI] |",
                  "|---|---|---|"]
        for i, a in enumerate(labels):
            for b in labels[i + 1:]:
                lines.append(f"| {a} vs {b} | {paired_cell(gain[a], gain[b], better, digits, confidence)} | "
                             f"{paired_cell(best[a], best[b], 'higher', 2, confidence, ('higher', 'lower'))} |")
    lines += ["", f"best w: each run's best_guidance (the scale with the best primary metric, fid or proxy_fd, in its "
              f"curve; ties: the scale asked first), seeds in increasing order. gain: {metric} at the best w "
              f"minus at w=1, over the seeds whose curve has both, both on the samples that chose the best w: on the "
              f"primary metric it is never worse than 0 by construction, however flat the curve (the headline numbers "
              f"come from new samples of the best w for that reason). Pairs: A minus B paired by seed over the seeds both "
              f"have, with the {level} paired-t interval; \"beyond noise\" when it excludes 0; on the gain, "
              f"\"better\": guidance helps A more; on the best w, \"higher\"/\"lower\": A's best scale is; -: fewer than 2 "
              f"seeds in common."]
    return "\n".join(lines) + "\n"


def rescore(run_dir: Path, num_samples: int, cache_dir: Path, batch_size: int = 500) -> dict:
    """Score a finished digits run again: its final weights, `num_samples` fresh class-balanced DDIM
    samples, the same proxy metrics, and the held-out metrics at the run's settings. Written to
    RUN/rescore-N.json (atomically; an existing one is returned, not redone). Refused when the method's
    code has changed since the run: today's code would rebuild another network around the weights.

    Why: the run's own final evaluation uses 500 samples, whose class_acc has a binomial sd of about
    0.011 per run, as large as the differences between methods. The samples' noise comes from
    (seed, tag "rescoreN", batch), so it is new noise, and the same across methods of one seed."""
    import numpy as np
    import torch

    import custom_train
    import proxy

    out = run_dir / f"rescore-{num_samples}.json"
    if out.exists():
        return json.loads(out.read_text())
    for needed in ("results.json", "config.json", "checkpoint.pt"):
        if not (run_dir / needed).exists():
            raise custom_train.HarnessError(f"{run_dir} is not a finished run with its checkpoint (no {needed}); "
                                            f"finish it with custom_train.py --resume first")
    config = json.loads((run_dir / "config.json").read_text())
    if any(w != 1 for w in config.get("guidance", [1.0])):
        raise custom_train.HarnessError(f"{run_dir} was evaluated with guidance; rescore samples without it: score it "
                                        f"with `python custom_train.py --evaluate {run_dir} --final-fid-samples N`")
    if config["dataset"] != "digits":
        raise custom_train.HarnessError(f"{run_dir} is a {config['dataset']} run; rescore scores digits runs only")
    today = current_sha256(config["method"])
    if config.get("method_sha256") is None or config["method_sha256"] != today:
        raise custom_train.HarnessError(
            f"{run_dir} was made by other code for method '{config['method']}' (sha256 "
            f"{(config.get('method_sha256') or 'unrecorded')[:8]}, today {(today or 'missing')[:8]}): its weights "
            f"belong to that code; restore it (config.json holds its method_source) to rescore")
    ckpt = custom_train.load_checkpoint(run_dir / "checkpoint.pt")
    net = custom_train.build_model(config["scale"], config["method"], config["image_size"],
                                   null_class=config.get("cfg_dropout", 0) > 0)
    weights = "ema" if ckpt["step"] >= config["ema_eval_start"] else "model"  # what its final evaluation sampled
    net.load_state_dict(ckpt[weights])
    labels = proxy.balanced_labels(num_samples)
    images = custom_train.sample(net, labels, seed=config["seed"], tag=f"rescore{num_samples}", batch_size=batch_size,
                                 ddim_steps=config["ddim_steps"], image_size=config["image_size"],
                                 amp_dtype=None, device=torch.device("cpu"), desc=f"{run_dir.name}: {num_samples}")
    scores = custom_train.DigitsProxy(cache_dir, "cpu")(images, labels)
    draws = config.get("heldout_draws") or custom_train.HELDOUT_DEFAULTS["digits"]["heldout_draws"]
    label_draws = config.get("label_draws") if config.get("heldout_draws") else \
        custom_train.HELDOUT_DEFAULTS["digits"]["label_draws"]
    held_images, held_labels, _ = proxy.load_digits("held-out")
    heldout = custom_train.HeldOutMetrics(np.asarray(held_images), np.asarray(held_labels), torch.device("cpu"),
                                          draws=draws, label_draws=label_draws,
                                          metric_seed=config.get("metric_seed", 0), batch_size=batch_size)(net)
    record = dict(method=config["method"], seed=config["seed"], scale=config["scale"], step=ckpt["step"],
                  weights=weights, method_sha256=config["method_sha256"], **scores, **heldout)
    custom_train.write_json(out, record)
    return record


def with_rescored(runs: list[dict], num_samples: int) -> list[dict]:
    """The runs that have RUN/rescore-N.json, their metrics replaced by the rescored ones."""
    rescored = []
    for r in runs:
        path = Path(r["run_dir"]) / f"rescore-{num_samples}.json"
        if path.exists():
            scores = json.loads(path.read_text())
            kept = {k: v for k, v in r.items() if k not in (*PROXY_METRICS, "proxy_samples", "per_class")}
            rescored.append(dict(kept, **{k: scores[k] for k in (*PROXY_METRICS, "proxy_samples", "per_class")
                                          if k in scores}))  # (only rescored numbers: no mix of sample counts)
    return rescored


def select(runs: list[dict], args) -> tuple[list[dict], list[str]]:
    """The --methods/--seeds/--current-code filters, then (proxy, rank) the most common recipe."""
    notes = []
    if getattr(args, "seeds", None):
        runs = [r for r in runs if r.get("seed") in args.seeds]
    if getattr(args, "methods", None):
        runs = [r for r in runs if r["method"] in args.methods]
    if getattr(args, "current_code", False):
        runs, notes = keep_current_code(runs)
    return runs, notes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(s, default_out, methods_help="rows, in this order (default: every method found)"):
        s.add_argument("--out-dir", default=default_out, help="folder whose subfolders are run directories")
        s.add_argument("--methods", nargs="*", default=None, help=methods_help)
        s.add_argument("--seeds", nargs="*", type=int, default=None, help="only runs of these seeds (default: all)")
        s.add_argument("--current-code", action="store_true",
                       help="only runs made by today's code of their method (the others are counted)")

    t = sub.add_parser("scales", help="best_fid (or --metric, or --panel) per method and scale, as a markdown table")
    common(t, "runs")
    t.add_argument("--scales", nargs="*", default=list(SCALE_ORDER), help="columns, in this order")
    what = t.add_mutually_exclusive_group()
    what.add_argument("--metric", default="best_fid", choices=list(SCALE_METRICS),
                      help="the final number in each cell (runs without it: -)")
    what.add_argument("--panel", action="store_true",
                      help=f"a table per metric of {', '.join(PANEL)} that some run has, instead of one")
    t.add_argument("--write", default=None, help="also write the table(s) to this file")
    c = sub.add_parser("proxy", help="digits proxy comparison over seeds: markdown, CSV and a plot")
    common(c, "runs/proxy")
    c.add_argument("--write-prefix", default=None,
                   help="write PREFIX.md, PREFIX.csv and PREFIX.png (default: OUT_DIR/comparison)")
    c.add_argument("--confidence", type=float, default=0.95,
                   help="level of the intervals, e.g. 0.975 for a Bonferroni correction over two looks")
    c.add_argument("--references", nargs="*", default=list(BASELINES),
                   help="the methods each one is compared with: the best of them per metric (default: the baselines)")
    c.add_argument("--rescored", type=int, default=None, metavar="N",
                   help="compare the scores of `rescore --samples N` (RUN/rescore-N.json) instead of the runs' own")
    k = sub.add_parser("rank", help="how well each metric reproduces an order of methods (e.g. the published one)")
    common(k, "runs/proxy", "the methods in the order to reproduce, best first")
    k.add_argument("--published", nargs="*", type=float, default=None,
                   help="the methods' published values (e.g. FIDs, lower is better), in --methods order")
    k.add_argument("--published-noise", type=float, default=0.0,
                   help="differences of published values up to this are unresolved (e.g. 0.35, FID's sampling noise)")
    k.add_argument("--write", default=None, help="also write the table (.md) and the numbers (.json) under this prefix")
    v = sub.add_parser("curves", help="training loss and every evaluation metric against the step, one PNG "
                                      "(and, where runs were guided, the metrics against the scale, a second)")
    common(v, "runs/proxy")
    v.add_argument("--write", default=None, help="the PNG (default: OUT_DIR/curves.png; the guidance one beside it, "
                                                 "named NAME-guidance.png)")
    g = sub.add_parser("guidance", help="classifier-free guidance: the metric per scale, each seed's best scale and "
                                        "its gain over scale 1, and the methods compared on both")
    common(g, "runs/proxy")
    g.add_argument("--metric", default=None,
                   help=f"one of the guidance curves' metrics ({', '.join(GUIDANCE_METRICS)}; default: proxy_fd for "
                        "digits runs, else fid)")
    g.add_argument("--write-prefix", default=None, help="also write PREFIX.md (the table) and PREFIX.png (the curves)")
    g.add_argument("--confidence", type=float, default=0.95, help="level of the paired intervals")
    r = sub.add_parser("rescore", help="score finished digits runs again on more samples (RUN/rescore-N.json)")
    common(r, "runs/proxy", "only runs of these methods (default: all)")
    r.add_argument("--samples", type=int, required=True, help="class-balanced samples per run (a multiple of 10)")
    r.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "class-cond-ddpm"),
                   help="where the digits proxy classifier is cached (as custom_train.py --cache-dir)")
    args = p.parse_args(argv)
    try:
        run_command(args)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def run_command(args) -> None:
    runs = collect(Path(args.out_dir))
    if not runs:
        raise ReportError(f"no finished runs (*/results.json) under {args.out_dir}")
    runs, notes = select(runs, args)
    if not 0 < getattr(args, "confidence", 0.95) < 1:
        raise ReportError(f"--confidence {args.confidence}: give a level between 0 and 1, e.g. 0.95")
    if args.command == "scales":
        table = panel_tables(runs, args.methods, args.scales) if args.panel else \
            scales_table(runs, args.methods, args.scales, args.metric)
        if not table:
            raise ReportError(f"no run under {args.out_dir} has any of {', '.join(PANEL)}")
        table += "".join(f"{n}\n" for n in notes)
        print(table, end="")
        if args.write:
            Path(args.write).write_text(table)
        return
    if args.command == "rescore":
        import custom_train
        import proxy

        if args.samples <= 0 or args.samples % 10:
            raise ReportError(f"--samples {args.samples}: give a positive multiple of 10 (class-balanced)")
        runs = [r for r in runs if r.get("dataset") == "digits"]
        if not runs:
            raise ReportError(f"no finished digits runs under {args.out_dir} match the --methods/--seeds given")
        for i, run in enumerate(runs):  # one after another: each sampling uses every core
            try:
                scores = rescore(Path(run["run_dir"]), args.samples, Path(args.cache_dir))
            except (custom_train.HarnessError, proxy.ProxyError) as e:
                raise ReportError(str(e)) from e
            print(f"[{i + 1}/{len(runs)}] {Path(run['run_dir']).name}: proxy_fd {scores['proxy_fd']:.3f}  "
                  f"class_acc {scores['class_acc']:.4f}  heldout_loss {scores['heldout_loss']:.5f}  "
                  f"label_acc {scores['label_acc']:.4f}  ({scores['proxy_samples']} samples)", flush=True)
        return
    if args.command == "curves":
        path = Path(args.write or Path(args.out_dir) / "curves.png")
        panels = curves_plot(runs, path)
        beside = path.with_name(f"{path.stem}-guidance{path.suffix}")
        # one recipe in the guidance figure, as in `guidance`: the scales asked, their sample count and the
        # label dropout all move the curves
        guided_runs, guided_notes = keep_main_recipe([r for r in runs if r.get("guidance")])
        guided = guidance_plot(guided_runs, beside)
        print(f"written: {path} ({', '.join(panels)})"
              + (f"\nwritten: {beside} ({', '.join(guided)})" if guided else "")
              + "".join(f"\n{n}" for n in notes + [f"guidance figure: {n}" for n in guided_notes]))
        return
    if args.command == "guidance":
        guided = [r for r in runs if r.get("guidance")]
        if not guided:
            raise ReportError(f"no run under {args.out_dir} has a guidance curve (custom_train.py --guidance W1,W2,...)"
                              + (f" for seeds {' '.join(map(str, args.seeds))}" if args.seeds else ""))
        if len(guided) < len(runs):
            notes.append(f"left out: {len(runs) - len(guided)} run(s) without a guidance curve (scale 1 only)")
        guided, recipe_notes = keep_main_recipe(guided)
        notes += recipe_notes
        metric = args.metric or ("proxy_fd" if all(r.get("dataset") == "digits" for r in guided) else "fid")
        present = [m for m in GUIDANCE_METRICS if any(guidance_curve(r, m) for r in guided)]
        if metric not in present:
            raise ReportError(f"--metric {metric}: the guidance curves under {args.out_dir} have "
                              f"{', '.join(present) or 'no metric'}")
        table = guidance_table(guided, metric, args.methods, args.confidence) + "".join(f"{n}\n" for n in notes)
        print(table, end="")
        if args.write_prefix:
            Path(f"{args.write_prefix}.md").write_text(table)
            guidance_plot(guided, Path(f"{args.write_prefix}.png"), [metric])
            print(f"written: {args.write_prefix}.md, {args.write_prefix}.png")
        return
    if getattr(args, "rescored", None):
        runs = with_rescored(runs, args.rescored)
    runs, recipe_notes = keep_main_recipe(runs)
    notes += recipe_notes
    if args.command == "rank":
        if not args.methods or len(args.methods) < 3:
            raise ReportError("rank needs --methods: at least 3 methods, in the order to reproduce, best first")
        if args.published is not None and len(args.published) != len(args.methods):
            raise ReportError(f"--published has {len(args.published)} values for {len(args.methods)} methods")
        analysis = rank_analysis(runs, args.methods, args.published, args.published_noise)
        if not analysis:
            raise ReportError(f"not every method of --methods has finished runs with these metrics under {args.out_dir}")
        table = rank_markdown(analysis, args.methods, args.published) + "".join(f"{n}\n" for n in notes)
        print(table, end="")
        if args.write:
            Path(args.write).with_suffix(".md").write_text(table)
            Path(args.write).with_suffix(".json").write_text(json.dumps(analysis, indent=2) + "\n")
        return
    confidence = args.confidence
    rows = proxy_comparison(runs, args.methods, confidence, references=args.references)
    if not rows:
        raise ReportError(f"no digits proxy results under {args.out_dir}"
                          + (f" for seeds {' '.join(map(str, args.seeds))}" if args.seeds else "")
                          + (f" rescored on {args.rescored} samples (run `report.py rescore --samples {args.rescored}` "
                             "first)" if args.rescored else ""))
    prefix = Path(args.write_prefix or Path(args.out_dir) / "comparison")
    reference = "best baseline" if set(args.references) == set(BASELINES) else "best reference"
    table = proxy_markdown(rows, confidence, reference=reference) + "".join(f"{n}\n" for n in notes)
    print(table, end="")
    prefix.with_suffix(".md").write_text(table)
    proxy_csv(rows, prefix.with_suffix(".csv"))
    proxy_plot(rows, runs, prefix.with_suffix(".png"))
    print(f"written: {prefix}.md, {prefix}.csv, {prefix}.png")


if __name__ == "__main__":
    main()
