"""Tables from finished runs: reads every RUN/results.json under --out-dir.

    python report.py scales --out-dir runs                 # best_fid per method x scale, as PROTOCOL.md lays it out
    python report.py scales --out-dir runs --write runs/results_table.md
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


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_cell(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("scales", help="best_fid (or --metric) per method and scale, as a markdown table")
    t.add_argument("--out-dir", default="runs", help="folder whose subfolders are run directories")
    t.add_argument("--methods", nargs="*", default=None, help="rows, in this order (default: every method found)")
    t.add_argument("--scales", nargs="*", default=list(SCALE_ORDER), help="columns, in this order")
    t.add_argument("--metric", default="best_fid", choices=["best_fid", "fid"], help="the number in each cell")
    t.add_argument("--write", default=None, help="also write the table to this file")
    args = p.parse_args(argv)

    runs = collect(Path(args.out_dir))
    if not runs:
        print(f"error: no finished runs (*/results.json) under {args.out_dir}", file=sys.stderr)
        sys.exit(1)
    table = scales_table(runs, args.methods, args.scales, args.metric)
    print(table, end="")
    if args.write:
        Path(args.write).write_text(table)


if __name__ == "__main__":
    main()
