"""Tables from finished runs: reads every RUN/results.json under --out-dir.

    python report.py scales --out-dir runs                 # best_fid per method x scale, as PROTOCOL.md lays it out
    python report.py scales --out-dir runs --write runs/results_table.md
    python report.py proxy --out-dir runs/proxy            # digits proxy: mean ± std over seeds, vs the best baseline
    python report.py proxy --out-dir runs/proxy --seeds 42 43 44 45 46   # only these seeds
    python report.py rescore --out-dir runs/proxy --samples 3000   # score finished runs again, on more samples
    python report.py proxy --out-dir runs/proxy --rescored 3000    # ... and compare those scores

The proxy comparison tests each method against the best baseline with Welch's t-test (unequal
variances): the 95% confidence interval of the difference of means; a difference "beyond noise" is
one whose interval excludes 0.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

SCALE_ORDER = ("small", "medium", "large")


def collect(out_dir: Path) -> list[dict]:
    """The results.json of every finished run directly under out_dir, sorted by path."""
    runs = []
    for path in sorted(Path(out_dir).glob("*/results.json")):
        result = json.loads(path.read_text())
        result["run_dir"] = str(path.parent)
        runs.append(result)
    return runs


def rescore(run_dir: Path, num_samples: int, cache_dir: Path, batch_size: int = 500) -> dict:
    """Score a finished digits run again: its final weights, `num_samples` fresh class-balanced DDIM
    samples, the same proxy metrics. Written to RUN/rescore-N.json (atomically; an existing one is
    returned, not redone).

    Why: the run's own final evaluation uses 500 samples, whose class_acc has a binomial sd of about
    0.011 per run, as large as the differences between methods. The samples' noise comes from
    (seed, tag "rescoreN", batch), so it is new noise, and the same across methods of one seed."""
    import torch

    import custom_train

    out = run_dir / f"rescore-{num_samples}.json"
    if out.exists():
        return json.loads(out.read_text())
    for needed in ("results.json", "config.json", "checkpoint.pt"):
        if not (run_dir / needed).exists():
            raise custom_train.HarnessError(f"{run_dir} is not a finished run with its checkpoint (no {needed}); "
                                            f"finish it with custom_train.py --resume first")
    config = json.loads((run_dir / "config.json").read_text())
    if config["dataset"] != "digits":
        raise custom_train.HarnessError(f"{run_dir} is a {config['dataset']} run; rescore scores digits runs only")
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    net = custom_train.build_model(config["scale"], config["method"], config["image_size"])
    # the weights the run's final evaluation sampled from
    weights = "ema" if ckpt["step"] >= config["ema_eval_start"] else "model"
    net.load_state_dict(ckpt[weights])
    labels = custom_train.DigitsProxy.labels(num_samples, batch_size, config["seed"], "rescore")
    images = custom_train.sample(net, labels, seed=config["seed"], tag=f"rescore{num_samples}", batch_size=batch_size,
                                 ddim_steps=config["ddim_steps"], image_size=config["image_size"],
                                 amp_dtype=None, device=torch.device("cpu"), desc=f"{run_dir.name}: {num_samples}")
    scores = custom_train.DigitsProxy(cache_dir, "cpu")(images, labels)
    record = dict(method=config["method"], seed=config["seed"], scale=config["scale"], step=ckpt["step"],
                  weights=weights, **scores)
    custom_train.write_json(out, record)
    return record


def with_rescored(runs: list[dict], num_samples: int) -> list[dict]:
    """The runs that have RUN/rescore-N.json, their proxy metrics replaced by the rescored ones."""
    rescored = []
    for r in runs:
        path = Path(r["run_dir"]) / f"rescore-{num_samples}.json"
        if path.exists():
            scores = json.loads(path.read_text())
            rescored.append(dict(r, **{k: scores[k] for k in ("proxy_fd", "class_acc", "proxy_samples")}))
    return rescored


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


def scales_table(runs: list[dict], methods: list[str] | None = None, scales=SCALE_ORDER,
                 metric: str = "best_fid") -> str:
    """Markdown: one row per method, one column per scale; a cell is the run's metric, or the
    mean ± std over seeds with n when several seeds finished."""
    methods = methods or sorted({r["method"] for r in runs})
    lines = [f"| method ({metric}) | " + " | ".join(scales) + " |", "|---" * (len(scales) + 1) + "|"]
    for method in methods:
        cells = [format_cell([r.get(metric) for r in runs if r["method"] == method and r["scale"] == scale])
                 for scale in scales]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


BASELINES = ("concat-film", "cross-attn", "adanorm")
PROXY_METRICS = {"proxy_fd": "lower", "class_acc": "higher"}  # metric -> which direction is better


def welch_interval(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its Welch confidence interval."""
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


def noise_verdict(diff: float, low: float, high: float, better: str) -> str:
    if not (low > 0 or high < 0):
        return "within noise"
    return "better, beyond noise" if (diff < 0) == (better == "lower") else "worse, beyond noise"


def proxy_comparison(runs: list[dict], methods: list[str] | None = None, confidence: float = 0.95) -> list[dict]:
    """One row per method: n, mean and std of each proxy metric, and for each metric the difference
    from the best baseline (best by that metric's mean) with its Welch interval and a verdict,
    and, where both ran the same seeds, the paired-by-seed interval and its verdict."""
    runs = [r for r in runs if r.get("proxy_fd") is not None]
    methods = methods or sorted({r["method"] for r in runs})
    values = {m: {k: [r[k] for r in runs if r["method"] == m] for k in PROXY_METRICS} for m in methods}
    values = {m: v for m, v in values.items() if v["proxy_fd"]}
    by_seed = {m: {k: {r["seed"]: r[k] for r in runs if r["method"] == m} for k in PROXY_METRICS} for m in values}
    rows = []
    for method, vals in values.items():
        row = dict(method=method, n=len(vals["proxy_fd"]), seeds=sorted(r["seed"] for r in runs if r["method"] == method))
        for metric, better in PROXY_METRICS.items():
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(vals[metric])
            present = [b for b in BASELINES if b in values]
            if not present:
                continue
            pick = min if better == "lower" else max
            best = pick(present, key=lambda b: statistics.fmean(values[b][metric]))
            row[f"{metric}_baseline"] = best
            if method == best:
                row[f"{metric}_verdict"] = "best baseline"
                continue
            diff, low, high = welch_interval(vals[metric], values[best][metric], confidence)
            row[f"{metric}_diff"], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = diff, low, high
            row[f"{metric}_verdict"] = noise_verdict(diff, low, high, better)
            paired = paired_interval(by_seed[method][metric], by_seed[best][metric], confidence)
            if paired:
                row[f"{metric}_paired_ci_low"], row[f"{metric}_paired_ci_high"] = paired[1], paired[2]
                row[f"{metric}_paired_verdict"] = noise_verdict(*paired, better)
        rows.append(row)
    return rows


def proxy_markdown(rows: list[dict], confidence: float = 0.95) -> str:
    level = f"{100 * confidence:g}%"
    head = (f"| method | n | proxy_fd ↓ (mean ± std) | Δ vs best baseline [Welch {level} CI] | paired by seed | "
            f"class_acc ↑ (mean ± std) | Δ vs best baseline [Welch {level} CI] | paired by seed |")
    lines = [head, "|---" * 8 + "|"]
    for r in rows:
        cells = [r["method"], str(r["n"])]
        for metric, digits in (("proxy_fd", 3), ("class_acc", 3)):
            cells.append(f"{r[f'{metric}_mean']:.{digits}f} ± {r[f'{metric}_std']:.{digits}f}")
            if f"{metric}_diff" in r:
                cells.append(f"{r[f'{metric}_diff']:+.{digits}f} [{r[f'{metric}_ci_low']:+.{digits}f}, "
                             f"{r[f'{metric}_ci_high']:+.{digits}f}] {r[f'{metric}_verdict']}")
            else:
                cells.append(r.get(f"{metric}_verdict", "-"))
            if f"{metric}_paired_verdict" in r:
                cells.append(f"[{r[f'{metric}_paired_ci_low']:+.{digits}f}, {r[f'{metric}_paired_ci_high']:+.{digits}f}] "
                             f"{r[f'{metric}_paired_verdict']}")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Δ: method minus the best baseline for that metric (by mean); {level} CI from Welch's t-test over seeds "
                 f"(unequal variances); paired by seed: the {level} paired-t interval of the per-seed differences (runs "
                 "of one seed share data order, noise and sampling labels across methods); \"beyond noise\" when "
                 "the interval excludes 0.")
    return "\n".join(lines) + "\n"


def proxy_csv(rows: list[dict], path: Path) -> None:
    import csv

    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "method", k != "n", k))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()})


def proxy_plot(rows: list[dict], runs: list[dict], path: Path) -> None:
    """Mean ± std per method (error bars) with every seed as a dot, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(rows), 4))
    for ax, (metric, better) in zip(axes, PROXY_METRICS.items()):
        for i, r in enumerate(rows):
            seeds = [x[metric] for x in runs if x["method"] == r["method"] and x.get(metric) is not None]
            ax.errorbar(i, r[f"{metric}_mean"], yerr=r[f"{metric}_std"], fmt="o", capsize=5, color="C0")
            ax.scatter([i + 0.15] * len(seeds), seeds, s=10, color="C1", alpha=0.7)
        ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, ha="right")
        ax.set_title(f"{metric} ({better} is better)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"digits proxy, mean ± std over seeds (n = {', '.join(sorted({str(r['n']) for r in rows}))})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("scales", help="best_fid (or --metric) per method and scale, as a markdown table")
    t.add_argument("--out-dir", default="runs", help="folder whose subfolders are run directories")
    t.add_argument("--methods", nargs="*", default=None, help="rows, in this order (default: every method found)")
    t.add_argument("--scales", nargs="*", default=list(SCALE_ORDER), help="columns, in this order")
    t.add_argument("--metric", default="best_fid", choices=["best_fid", "fid"], help="the number in each cell")
    t.add_argument("--write", default=None, help="also write the table to this file")
    c = sub.add_parser("proxy", help="digits proxy comparison over seeds: markdown, CSV and a plot")
    c.add_argument("--out-dir", default="runs/proxy", help="folder whose subfolders are digits run directories")
    c.add_argument("--methods", nargs="*", default=None, help="rows, in this order (default: every method found)")
    c.add_argument("--seeds", nargs="*", type=int, default=None,
                   help="only runs of these seeds, e.g. --seeds 42 43 44 45 46 (default: every seed found)")
    c.add_argument("--write-prefix", default=None,
                   help="write PREFIX.md, PREFIX.csv and PREFIX.png (default: OUT_DIR/comparison)")
    c.add_argument("--confidence", type=float, default=0.95,
                   help="level of the intervals, e.g. 0.975 for a Bonferroni correction over two looks")
    c.add_argument("--rescored", type=int, default=None, metavar="N",
                   help="compare the scores of `rescore --samples N` (RUN/rescore-N.json) instead of the runs' own")
    r = sub.add_parser("rescore", help="score finished digits runs again on more samples (RUN/rescore-N.json)")
    r.add_argument("--out-dir", default="runs/proxy", help="folder whose subfolders are digits run directories")
    r.add_argument("--samples", type=int, required=True, help="class-balanced samples per run (a multiple of 10)")
    r.add_argument("--methods", nargs="*", default=None, help="only runs of these methods (default: all)")
    r.add_argument("--seeds", nargs="*", type=int, default=None, help="only runs of these seeds (default: all)")
    r.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "class-cond-ddpm"),
                   help="where the digits proxy classifier is cached (as custom_train.py --cache-dir)")
    args = p.parse_args(argv)

    runs = collect(Path(args.out_dir))
    if not runs:
        print(f"error: no finished runs (*/results.json) under {args.out_dir}", file=sys.stderr)
        sys.exit(1)
    if args.command == "scales":
        table = scales_table(runs, args.methods, args.scales, args.metric)
        print(table, end="")
        if args.write:
            Path(args.write).write_text(table)
        return
    if args.seeds:
        runs = [r for r in runs if r.get("seed") in args.seeds]
    if args.command == "rescore":
        if args.samples <= 0 or args.samples % 10:
            print(f"error: --samples {args.samples}: give a positive multiple of 10 (class-balanced)", file=sys.stderr)
            sys.exit(1)
        runs = [r for r in runs if r.get("dataset") == "digits" and (not args.methods or r["method"] in args.methods)]
        if not runs:
            print(f"error: no finished digits runs under {args.out_dir} match the --methods/--seeds given",
                  file=sys.stderr)
            sys.exit(1)
        import custom_train
        import proxy

        for i, run in enumerate(runs):  # one after another: each sampling uses every core
            try:
                scores = rescore(Path(run["run_dir"]), args.samples, Path(args.cache_dir))
            except (custom_train.HarnessError, proxy.ProxyError) as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(1)
            print(f"[{i + 1}/{len(runs)}] {Path(run['run_dir']).name}: proxy_fd {scores['proxy_fd']:.3f}  "
                  f"class_acc {scores['class_acc']:.4f}  ({scores['proxy_samples']} samples)", flush=True)
        return
    if args.rescored:
        runs = with_rescored(runs, args.rescored)
    if not 0 < args.confidence < 1:
        print(f"error: --confidence {args.confidence}: give a level between 0 and 1, e.g. 0.95", file=sys.stderr)
        sys.exit(1)
    rows = proxy_comparison(runs, args.methods, args.confidence)
    if not rows:
        print(f"error: no digits proxy results (proxy_fd) under {args.out_dir}"
              + (f" for seeds {' '.join(map(str, args.seeds))}" if args.seeds else "")
              + (f" rescored on {args.rescored} samples (run `report.py rescore --samples {args.rescored}` first)"
                 if args.rescored else ""), file=sys.stderr)
        sys.exit(1)
    prefix = Path(args.write_prefix or Path(args.out_dir) / "comparison")
    table = proxy_markdown(rows, args.confidence)
    print(table, end="")
    prefix.with_suffix(".md").write_text(table)
    proxy_csv(rows, prefix.with_suffix(".csv"))
    proxy_plot(rows, [r for r in runs if r.get("proxy_fd") is not None], prefix.with_suffix(".png"))
    print(f"written: {prefix}.md, {prefix}.csv, {prefix}.png")


if __name__ == "__main__":
    main()
