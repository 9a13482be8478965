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
#   bash run_all_scales.sh --slurm --seeds 3 custom # SLURM: one array job per scale, one task (1 GPU) per run
#   bash run_all_scales.sh --slurm --slurm-args "-p gpu -A lab" --throttle 8 --wait custom   # ...and wait for the table
#   bash run_all_scales.sh --slurm --torchrun --nodes 2 --gpus-per-node 4 cross-attn   # each run on 2 nodes x 4 GPUs
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
# --slurm submits the runs instead (docs/slurm.md) and prints the job ids: per scale one `sbatch --array`
# (--throttle N: at most N of its tasks at once) with that scale's GPU, CPUs, memory and time (the tiny scale
# and --proxy: CPU only), then a job that writes the table when the arrays end (SWEEP/report.out, SWEEP being
# OUT_DIR/slurm/DATE-TIME-PID) naming each failed run with its log. --slurm-args "..." go to every sbatch after
# ours (partition, account, QoS, constraint, or a resource to override). --wait: block until the jobs end,
# then print the table and the failed runs as a local sweep does. --torchrun --gpus-per-node N [--nodes M]:
# each run is one torchrun per node with N processes (GPUs; CPU processes at the tiny scale). Before its time
# limit a task gets SIGUSR1, checkpoints, and requeues itself; the requeued task resumes.
# Environment: SCALES (default "small medium large"), OUT_DIR (default runs, runs/proxy with --proxy),
# PYTHON (default python), WAIT_POLL (seconds between squeue polls with --wait, default 10).
set -uo pipefail
cd "$(dirname "$0")"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

PYTHON=${PYTHON:-python}
proxy=0
num_seeds=1
first_seed=42
jobs=1
gpus=()
torchrun=0
slurm=0
slurm_args=()
wait_for_jobs=0
throttle=''
nodes=''
gpus_per_node=''
report_dir=''
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
    --slurm) slurm=1; shift ;;
    --slurm-args)
      [[ $# -ge 2 && -n "$2" ]] || { echo "error: --slurm-args needs sbatch options in one argument, like \"-p gpu -A lab\"" >&2; exit 2; }
      read -r -a slurm_args <<< "$2"; shift 2 ;;
    --wait) wait_for_jobs=1; shift ;;
    --throttle)
      [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { echo "error: --throttle needs a positive integer, got '${2:-}'" >&2; exit 2; }
      throttle=$2; shift 2 ;;
    --nodes)
      [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { echo "error: --nodes needs a positive integer, got '${2:-}'" >&2; exit 2; }
      nodes=$2; shift 2 ;;
    --gpus-per-node)
      [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { echo "error: --gpus-per-node needs a positive integer, got '${2:-}'" >&2; exit 2; }
      gpus_per_node=$2; shift 2 ;;
    --slurm-report)  # the table job of a --slurm sweep (slurm_task.sh --report)
      [[ -f "${2:-}/settings" ]] || { echo "error: --slurm-report needs a sweep folder made by --slurm, got '${2:-}'" >&2; exit 2; }
      report_dir=$2; shift 2 ;;
    -*) echo "error: unknown option $1 (custom_train.py options go after --; see --help)" >&2; exit 2 ;;
    *) methods+=("$1"); shift ;;
  esac
done
seeds=($(seq "$first_seed" $((first_seed + num_seeds - 1))))
if [[ $slurm -eq 0 ]]; then  # the SLURM options mean nothing to a local sweep
  for flag in "slurm-args:${#slurm_args[@]}" "wait:$wait_for_jobs" "throttle:${throttle:-0}" "nodes:${nodes:-0}" \
              "gpus-per-node:${gpus_per_node:-0}"; do
    [[ ${flag#*:} != 0 ]] && { echo "error: --${flag%%:*} is for SLURM sweeps (--slurm)" >&2; exit 2; }
  done
elif [[ ${#gpus[@]} -gt 0 ]]; then
  echo "error: --gpus is for local runs; with --slurm SLURM hands out the GPUs (--torchrun --gpus-per-node N for several per run)" >&2; exit 2
elif [[ $jobs -gt 1 ]]; then
  echo "error: --jobs is for local CPU runs; with --slurm every run is a task of its own (--throttle N: at most N at once)" >&2; exit 2
elif [[ $torchrun -eq 0 && -n $nodes$gpus_per_node ]]; then
  echo "error: --nodes and --gpus-per-node are for --torchrun runs (a run spread over several processes)" >&2; exit 2
elif [[ $torchrun -eq 1 && -z $gpus_per_node ]]; then
  echo "error: --slurm --torchrun needs --gpus-per-node N (processes per node, one per GPU)" >&2; exit 2
elif ! command -v sbatch > /dev/null; then
  echo "error: --slurm needs SLURM's sbatch on the PATH" >&2; exit 2
fi
if [[ $torchrun -eq 1 && $slurm -eq 0 && ${#gpus[@]} -eq 0 ]]; then
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

# The table of the sweep's runs (after a local sweep, with --wait, and in the table job of a --slurm sweep).
print_table() {
  if [[ $proxy -eq 1 ]]; then
    "$PYTHON" report.py proxy --out-dir "$OUT_DIR" --methods "${methods[@]}" --current-code
  else
    "$PYTHON" report.py scales --out-dir "$OUT_DIR" --methods "${methods[@]}" --scales "${scales[@]}" --current-code \
      --write "$OUT_DIR/results_table.md" && echo "table written to $OUT_DIR/results_table.md"
  fi
}

# The runs of a --slurm sweep that did not succeed, each with its log, on stderr; fails if there are any. Each
# task leaves SWEEP/SCALE.INDEX.exit with its training's exit status; no file: the task never got that far.
slurm_failures() {
  local sweep=$1 scale index line method seed log why failed=() lines=()
  for scale in "${scales[@]}"; do
    index=0
    while read -r method _ seed log; do
      line="$method/$scale/s$seed"
      if [[ ! -f "$sweep/$scale.$index.exit" ]]; then
        why="did not finish (cancelled, out of time or its node failed; SLURM's messages in $sweep/slurm-$(cat "$sweep/$scale.job")_$index.out)"
      elif [[ $(cat "$sweep/$scale.$index.exit") != 0 ]]; then
        why="exit $(cat "$sweep/$scale.$index.exit")"
        [[ $why == "exit 3" ]] && why+=" (stopped on a signal, checkpoint written, not requeued: submit the sweep again to resume)"
      else
        why=''
      fi
      [[ -n $why ]] && { failed+=("$line"); lines+=("  $line: $why; log $log"); }
      index=$((index + 1))
    done < "$sweep/$scale.tasks"
  done
  [[ ${#failed[@]} -eq 0 ]] && return 0
  echo "failed runs: ${failed[*]}" >&2
  printf '%s\n' "${lines[@]}" >&2
  return 1
}

# The table job of a --slurm sweep: the sweep's settings, then the table and the failed runs.
if [[ -n $report_dir ]]; then
  source "$report_dir/settings"
  print_table
  slurm_failures "$report_dir"
  exit $?
fi

# What one run asks SLURM for at each scale: GPUs, CPUs and memory (GB) per process, and a time limit. Starting
# points for a protocol run on one current GPU, to adjust with --slurm-args (sbatch takes the last of an option
# given twice). A run that outlives its time limit is not lost: warned (SIGUSR1, 5 minutes before), it writes
# its checkpoint and requeues itself. The tiny scale (and --proxy) is a CPU run: no GPU, one CPU per process.
slurm_resources() {
  case $1 in
    tiny) echo "0 1 4 2:00:00" ;;
    small) echo "1 8 32 12:00:00" ;;
    medium) echo "1 8 32 24:00:00" ;;
    large) echo "1 8 64 24:00:00" ;;
    *) return 1 ;;
  esac
}

# Until SLURM no longer lists these jobs (squeue shows pending, running and completing ones only).
slurm_wait() {
  local ids out
  ids=$(IFS=,; echo "$*")
  while :; do
    if out=$(squeue -h -j "$ids" -o %i 2> "$sweep/squeue.err"); then  # (stdout only: a site's warnings go aside)
      [[ -z $out ]] && return 0
    elif grep -q "Invalid job id" "$sweep/squeue.err"; then
      return 0  # long finished: SLURM has forgotten them
    else
      echo "squeue failed, asking again: $(head -n 1 "$sweep/squeue.err")" >&2  # a busy controller, say
    fi
    sleep "${WAIT_POLL:-10}"
  done
}

if [[ $slurm -eq 1 ]]; then
  for scale in "${scales[@]}"; do
    slurm_resources "$scale" > /dev/null || { echo "error: no SLURM resources for scale '$scale' (tiny, small, medium, large)" >&2; exit 2; }
  done
  # The sweep's folder: its settings and task lists (read by slurm_task.sh), the tasks' exit statuses, SLURM's
  # output files and the table job's output.
  sweep="$OUT_DIR/slurm/$(date +%Y%m%d-%H%M%S)-$$"
  mkdir -p "$sweep" "$OUT_DIR/logs"
  procs=0
  [[ $torchrun -eq 1 ]] && procs=$gpus_per_node
  declare -p PYTHON OUT_DIR proxy procs methods scales > "$sweep/settings"
  per_node=${gpus_per_node:-1}
  ids=()
  for scale in "${scales[@]}"; do
    tasks="$sweep/$scale.tasks"
    for method in "${methods[@]}"; do
      for seed in "${seeds[@]}"; do
        echo "$method $scale $seed $OUT_DIR/logs/${method//\//_}-$scale-s$seed.log"
      done
    done > "$tasks"
    n=$(wc -l < "$tasks")
    read -r gpu cpu mem time <<< "$(slurm_resources "$scale")"
    resources=(--nodes="${nodes:-1}" --ntasks-per-node=1 --cpus-per-task=$((cpu * per_node)) --mem=$((mem * per_node))G
               --time="$time")
    device=(--device cpu)  # a CPU run stays one on a GPU node (CUDA may be visible without a GPU asked for)
    if [[ $gpu -gt 0 ]]; then
      resources+=(--gres=gpu:$((gpu * per_node)))
      device=(--device cuda)  # a GPU that is not there is an error, not a CPU run
    fi
    # --requeue: the task may requeue itself; --open-mode=append: a requeued task's output adds to the file
    id=$(sbatch --parsable --job-name="sweep-$scale" --array="0-$((n - 1))${throttle:+%$throttle}" --chdir="$PWD" \
           --output="$sweep/slurm-%A_%a.out" --open-mode=append --requeue --signal=B:USR1@300 \
           "${resources[@]}" "${slurm_args[@]}" \
           slurm_task.sh "$sweep" "$tasks" "${preset[@]}" --out-dir "$OUT_DIR" --resume "${device[@]}" "${extra[@]}") \
      || { echo "error: sbatch refused the $scale array (its message above)${ids:+; submitted already: ${ids[*]}}" >&2; exit 1; }
    id=${id%%;*}  # "ID;CLUSTER" on a federation
    echo "$id" > "$sweep/$scale.job"
    ids+=("$id")
    echo "submitted array job $id: $n run(s) at scale $scale, ${resources[*]}"
  done
  # The table job: after every task of every array has ended, however it ended (afterany).
  report_id=$(sbatch --parsable --job-name=sweep-table --dependency="afterany:$(IFS=:; echo "${ids[*]}")" \
                --chdir="$PWD" --output="$sweep/report.out" "${slurm_args[@]}" \
                --nodes=1 --ntasks=1 --cpus-per-task=1 --mem=4G --time=1:00:00 --gres=none \
                slurm_task.sh --report "$sweep") \
    || { echo "error: sbatch refused the table job (its message above); the arrays ${ids[*]} run anyway" >&2; exit 1; }
  report_id=${report_id%%;*}
  echo "submitted table job $report_id: the table and the failed runs, when the arrays end, in $sweep/report.out"
  echo "logs: $OUT_DIR/logs/METHOD-SCALE-sSEED.log (SLURM's own messages: $sweep/slurm-JOB_TASK.out)"
  [[ $wait_for_jobs -eq 0 ]] && exit 0
  echo "waiting for jobs ${ids[*]} $report_id (squeue every ${WAIT_POLL:-10} s)"
  slurm_wait "${ids[@]}" "$report_id"
  print_table
  slurm_failures "$sweep"
  exit $?
fi

failed_list=$(mktemp)
trap 'rm -f "$failed_list"' EXIT
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)  # nproc would honour OMP_NUM_THREADS
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

print_table
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "failed runs: ${failed[*]}" >&2
  exit 1
fi
