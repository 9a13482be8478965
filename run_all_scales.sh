#!/usr/bin/env bash
# Run every scale for each method, then print and write the results table.
#
#   bash run_all_scales.sh                          # the three baselines at small, medium, large
#   bash run_all_scales.sh custom adanorm           # these methods (a method may also be a path: ideas/class_gain.py)
#   bash run_all_scales.sh --seeds 3 custom         # seeds 42, 43, 44; cells become mean ± std (n)
#   bash run_all_scales.sh --first-seed 52 --seeds 5 custom   # seeds 52..56 (fresh seeds for a confirmation)
#   bash run_all_scales.sh --gpus 0,1,2,3 --seeds 3 # 4 runs at a time, one per GPU
#   bash run_all_scales.sh --gpus 0,1 --torchrun    # one run at a time on both GPUs (DDP, torchrun)
#   bash run_all_scales.sh custom -- --fid-samples 10000   # extra custom_train.py options after --
#   bash run_all_scales.sh --proxy --seeds 5        # CPU: every method on the digits proxy (--preset demo)
#   bash run_all_scales.sh --proxy --jobs 2 --seeds 5   # CPU: 2 runs at a time, the cores split between them
#
# A run that finished with the same options and the same method code is reused; an interrupted one
# resumes from its checkpoint; a run whose directory holds other code's or other options' work fails
# with one line saying what differs (the others still run). So re-running after a crash picks up where
# it stopped, and re-running after editing `custom` trains the new code: its runs are named after its
# code's hash. Without --gpus or --jobs the runs go one after another on the default device. With --gpus
# each run sees only its GPU (CUDA_VISIBLE_DEVICES); with --torchrun every run uses all listed GPUs.
# With --jobs N, N runs go at once on the CPU with OMP_NUM_THREADS = cores / N each. Parallel runs write
# their console output to OUT_DIR/logs/METHOD-SCALE-sSEED.log. The table shows the runs of today's code
# only (with --proxy: mean ± std and 95% intervals against the best baseline, in OUT_DIR/comparison.*).
# Environment: SCALES (default "small medium large"), OUT_DIR (default runs, runs/proxy with --proxy),
# PYTHON (default python).
set -uo pipefail
cd "$(dirname "$0")"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

PYTHON=${PYTHON:-python}
proxy=0
num_seeds=1
first_seed=42
jobs=1
gpus=()
torchrun=0
methods=()
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --) shift; extra=("$@"); break ;;
    --proxy) proxy=1; shift ;;
    --torchrun) torchrun=1; shift ;;
    --gpus)
      [[ "${2:-}" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "error: --gpus needs a comma-separated list of GPU ids like 0,1,2,3, got '${2:-}'" >&2; exit 2; }
      IFS=, read -r -a gpus <<< "$2"; shift 2 ;;
    --seeds)
      [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { echo "error: --seeds needs a positive integer, got '${2:-}'" >&2; exit 2; }
      num_seeds=$2; shift 2 ;;
    --first-seed)
      [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "error: --first-seed needs a non-negative integer, got '${2:-}'" >&2; exit 2; }
      first_seed=$2; shift 2 ;;
    --jobs)
      [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { echo "error: --jobs needs a positive integer, got '${2:-}'" >&2; exit 2; }
      jobs=$2; shift 2 ;;
    -*) echo "error: unknown option $1 (custom_train.py options go after --; see --help)" >&2; exit 2 ;;
    *) methods+=("$1"); shift ;;
  esac
done
seeds=($(seq "$first_seed" $((first_seed + num_seeds - 1))))
if [[ $torchrun -eq 1 && ${#gpus[@]} -eq 0 ]]; then
  echo "error: --torchrun needs --gpus LIST (the GPUs each run is spread over)" >&2; exit 2
fi
if [[ $jobs -gt 1 && ${#gpus[@]} -gt 0 ]]; then
  echo "error: --jobs is for CPU runs; with --gpus each GPU takes one run at a time" >&2; exit 2
fi

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

failed_list=$(mktemp)
trap 'rm -f "$failed_list"' EXIT
cores=$(nproc 2>/dev/null || echo 1)
threads=$(( cores / jobs > 0 ? cores / jobs : 1 ))

# One run: METHOD SCALE SEED [GPU list]. A failure is noted and the other runs go on.
run_one() {
  local method=$1 scale=$2 seed=$3 devices=${4:-}
  local device=()
  [[ -n $devices ]] && device=(--device cuda)  # a GPU that is not there is an error, not a CPU run
  local train=(custom_train.py "${preset[@]}" --scale "$scale" --method "$method" --seed "$seed"
               --out-dir "$OUT_DIR" --resume "${device[@]}" "${extra[@]}")
  local log="$OUT_DIR/logs/${method//\//_}-$scale-s$seed.log"
  if [[ -n $devices && $torchrun -eq 1 ]]; then
    CUDA_VISIBLE_DEVICES=$devices "$PYTHON" -m torch.distributed.run --standalone \
      --nproc_per_node "${#gpus[@]}" "${train[@]}"
  elif [[ -n $devices ]]; then
    CUDA_VISIBLE_DEVICES=$devices "$PYTHON" "${train[@]}" > "$log" 2>&1
  elif [[ $jobs -gt 1 ]]; then
    OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads "$PYTHON" "${train[@]}" > "$log" 2>&1
  else
    "$PYTHON" "${train[@]}"
  fi || echo "$method/$scale/s$seed" >> "$failed_list"
}

jobs_list=()
for method in "${methods[@]}"; do
  for scale in "${scales[@]}"; do
    for seed in "${seeds[@]}"; do
      jobs_list+=("$method $scale $seed")
    done
  done
done

if [[ ${#gpus[@]} -gt 0 && $torchrun -eq 0 ]]; then
  slots=("${gpus[@]}")
elif [[ $jobs -gt 1 ]]; then
  slots=($(seq 1 "$jobs"))
else
  slots=()
fi
if [[ ${#slots[@]} -eq 0 ]]; then  # one run at a time
  for job in "${jobs_list[@]}"; do
    read -r method scale seed <<< "$job"
    echo "=== $method at $scale, seed $seed ==="
    run_one "$method" "$scale" "$seed" "$(IFS=,; echo "${gpus[*]}")"
  done
else  # one run per slot (a GPU, or a share of the CPU cores) at a time: a slot goes back to the pool when its run ends
  mkdir -p "$OUT_DIR/logs"
  pool=$(mktemp -u); mkfifo "$pool"; exec 3<>"$pool"; rm "$pool"
  for slot in "${slots[@]}"; do echo "$slot" >&3; done
  trap 'kill $(jobs -p) 2>/dev/null; rm -f "$failed_list"' EXIT
  for job in "${jobs_list[@]}"; do
    read -r slot <&3
    read -r method scale seed <<< "$job"
    if [[ ${#gpus[@]} -gt 0 ]]; then
      echo "=== $method at $scale, seed $seed: GPU $slot (log: $OUT_DIR/logs/${method//\//_}-$scale-s$seed.log) ==="
      { run_one "$method" "$scale" "$seed" "$slot"; echo "$slot" >&3; } &
    else
      echo "=== $method at $scale, seed $seed: CPU job $slot, $threads thread(s) (log: $OUT_DIR/logs/${method//\//_}-$scale-s$seed.log) ==="
      { run_one "$method" "$scale" "$seed"; echo "$slot" >&3; } &
    fi
  done
  wait
  trap 'rm -f "$failed_list"' EXIT
fi
mapfile -t failed < <(sort "$failed_list")  # parallel runs finish in any order

if [[ $proxy -eq 1 ]]; then
  "$PYTHON" report.py proxy --out-dir "$OUT_DIR" --methods "${methods[@]}" --current-code
else
  "$PYTHON" report.py scales --out-dir "$OUT_DIR" --methods "${methods[@]}" --scales "${scales[@]}" --current-code \
    --write "$OUT_DIR/results_table.md" && echo "table written to $OUT_DIR/results_table.md"
fi
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "failed runs: ${failed[*]}" >&2
  exit 1
fi
