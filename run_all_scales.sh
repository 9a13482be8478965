#!/usr/bin/env bash
# Run every scale for each method, one run after another, then print and write the results table.
#
#   bash run_all_scales.sh                          # the three baselines at small, medium, large
#   bash run_all_scales.sh custom adanorm           # these methods
#   bash run_all_scales.sh custom -- --fid-samples 10000   # extra custom_train.py options after --
#
# Runs that finished (RUN/results.json) are skipped and interrupted ones resume from their
# checkpoint, so re-running this script after a crash picks up where it stopped.
# Environment: SCALES (default "small medium large"), OUT_DIR (default runs), PYTHON (default python).
set -uo pipefail
cd "$(dirname "$0")"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

PYTHON=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-runs}
read -r -a scales <<< "${SCALES:-small medium large}"
methods=()
extra=()
while [[ $# -gt 0 ]]; do
  if [[ "$1" == "--" ]]; then shift; extra=("$@"); break; fi
  methods+=("$1"); shift
done
[[ ${#methods[@]} -eq 0 ]] && methods=(concat-film cross-attn adanorm)

failed=()
for method in "${methods[@]}"; do
  for scale in "${scales[@]}"; do
    echo "=== $method at $scale ==="
    if ! "$PYTHON" custom_train.py --scale "$scale" --method "$method" --out-dir "$OUT_DIR" --resume "${extra[@]}"; then
      failed+=("$method/$scale")
    fi
  done
done

"$PYTHON" report.py scales --out-dir "$OUT_DIR" --methods "${methods[@]}" --scales "${scales[@]}" \
  --write "$OUT_DIR/results_table.md" && echo "table written to $OUT_DIR/results_table.md"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "failed runs: ${failed[*]}" >&2
  exit 1
fi
