#!/usr/bin/env bash
# Run every scale for each method, one run after another, then print and write the results table.
#
#   bash run_all_scales.sh                          # the three baselines at small, medium, large
#   bash run_all_scales.sh custom adanorm           # these methods
#   bash run_all_scales.sh --seeds 3 custom         # seeds 42, 43, 44; cells become mean ± std (n)
#   bash run_all_scales.sh custom -- --fid-samples 10000   # extra custom_train.py options after --
#   bash run_all_scales.sh --proxy --seeds 5        # CPU: every method on the digits proxy (--preset demo)
#
# Runs that finished (RUN/results.json) are skipped and interrupted ones resume from their
# checkpoint, so re-running this script after a crash picks up where it stopped. With --proxy the
# default methods are every registered one but custom, and the comparison (mean ± std, Welch 95%
# intervals against the best baseline) is written as OUT_DIR/comparison.{md,csv,png}.
# Environment: SCALES (default "small medium large"), OUT_DIR (default runs, runs/proxy with --proxy),
# PYTHON (default python).
set -uo pipefail
cd "$(dirname "$0")"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

PYTHON=${PYTHON:-python}
proxy=0
num_seeds=1
methods=()
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --) shift; extra=("$@"); break ;;
    --proxy) proxy=1; shift ;;
    --seeds)
      [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { echo "error: --seeds needs a positive integer, got '${2:-}'" >&2; exit 2; }
      num_seeds=$2; shift 2 ;;
    -*) echo "error: unknown option $1 (custom_train.py options go after --; see --help)" >&2; exit 2 ;;
    *) methods+=("$1"); shift ;;
  esac
done
seeds=($(seq 42 $((42 + num_seeds - 1))))

if [[ $proxy -eq 1 ]]; then
  OUT_DIR=${OUT_DIR:-runs/proxy}
  scales=(tiny)
  if [[ ${#methods[@]} -eq 0 ]]; then
    read -r -a methods <<< "$("$PYTHON" -c 'import conditioning; print(*[m for m in conditioning.METHODS if m != "custom"])')"
  fi
  preset=(--preset demo)
else
  OUT_DIR=${OUT_DIR:-runs}
  read -r -a scales <<< "${SCALES:-small medium large}"
  [[ ${#methods[@]} -eq 0 ]] && methods=(concat-film cross-attn adanorm)
  preset=()
fi

failed=()
for method in "${methods[@]}"; do
  for scale in "${scales[@]}"; do
    for seed in "${seeds[@]}"; do
      echo "=== $method at $scale, seed $seed ==="
      if ! "$PYTHON" custom_train.py "${preset[@]}" --scale "$scale" --method "$method" --seed "$seed" \
           --out-dir "$OUT_DIR" --resume "${extra[@]}"; then
        failed+=("$method/$scale/s$seed")
      fi
    done
  done
done

if [[ $proxy -eq 1 ]]; then
  "$PYTHON" report.py proxy --out-dir "$OUT_DIR" --methods "${methods[@]}"
else
  "$PYTHON" report.py scales --out-dir "$OUT_DIR" --methods "${methods[@]}" --scales "${scales[@]}" \
    --write "$OUT_DIR/results_table.md" && echo "table written to $OUT_DIR/results_table.md"
fi
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "failed runs: ${failed[*]}" >&2
  exit 1
fi
