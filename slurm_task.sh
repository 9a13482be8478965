#!/usr/bin/env bash
# The batch script of a `run_all_scales.sh --slurm` sweep (run_all_scales.sh submits it; see docs/slurm.md):
#
#   slurm_task.sh SWEEP_DIR TASKS_FILE [custom_train.py options]   one array task: one (method, scale, seed) run
#   slurm_task.sh --report SWEEP_DIR                              the job that runs after the arrays: the table
#
# SWEEP_DIR/settings (written by run_all_scales.sh) gives PYTHON and `procs` (0: one process; N: torchrun with
# N processes per node); line SLURM_ARRAY_TASK_ID + 1 of TASKS_FILE is "METHOD SCALE SEED LOG". Paths are
# relative to the job's working directory, the repository root: sbatch runs a copy of this file.
#
# Time limits and preemption: SLURM sends SIGUSR1 to this shell before the time limit (sbatch --signal=B:USR1@S)
# and SIGTERM to every process on `scontrol requeue`, preemption or scancel. The shell passes them on to the
# training, which writes its checkpoint at the next log point and exits with status 3. After the warning (and
# only then) the task requeues itself; the requeued task continues from the checkpoint (custom_train.py --resume).
set -uo pipefail

if [[ ${1:-} == --report ]]; then
  exec bash run_all_scales.sh --slurm-report "$2"
fi

sweep=$1 tasks=$2
shift 2
source "$sweep/settings"
index=${SLURM_ARRAY_TASK_ID:-0}  # a plain (non-array) job runs the first line
read -r method scale seed log < <(sed -n "$((index + 1))p" "$tasks")
status="${tasks%.tasks}.$index.exit"
if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then self="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; else self=$SLURM_JOB_ID; fi

# Everything from here on goes to the run's log (appended: a requeued task adds to it). SLURM's own messages
# (a time limit, a cancellation) stay in the file of sbatch --output.
exec >> "$log" 2>&1
echo "=== $method at $scale, seed $seed: job $self on $(hostname -s), attempt $((${SLURM_RESTART_COUNT:-0} + 1)), $(date '+%F %T') ==="
rm -f "$status"  # an attempt that is killed outright leaves no status: the table job reports it as unfinished

train=(custom_train.py --method "$method" --scale "$scale" --seed "$seed" "$@")
cpus=${SLURM_CPUS_PER_TASK:-1}
if (( procs > 0 )); then
  # One torchrun per node (srun), procs workers each, meeting at a c10d rendezvous on the allocation's first
  # node; the port comes from the job id so that two tasks sharing a node do not collide. torchrun ignores
  # SIGUSR1 (its default action would kill it): srun passes the signal to every process of the step, and the
  # workers are the ones that must see it. srun is given --cpus-per-task again: from Slurm 22.05 it no longer
  # inherits sbatch's.
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  threads=$(( cpus / procs > 0 ? cpus / procs : 1 ))
  launch=(srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1
          --cpus-per-task="$cpus" --kill-on-bad-exit=1 bash -c 'trap "" USR1; exec "$@"' torchrun
          "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$procs"
          --rdzv_backend=c10d --rdzv_endpoint="$head:$(( 20000 + SLURM_JOB_ID % 20000 ))" --rdzv_id="$SLURM_JOB_ID"
          "${train[@]}")
else
  threads=$cpus
  launch=("$PYTHON" "${train[@]}")
fi
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads  # the run records its thread count; it changes the rounding

# The training runs under a watcher that writes its exit status to $status. bash can lose a child's exit status
# when a trapped signal comes just as the child ends (seen with bash 5.2.15), so the shell that traps the signals
# below does not wait for the training itself. The watcher ignores the signals (inherited from here); the
# training gets their default actions back.
pidfile="${status%.exit}.pid"
rm -f "$pidfile"
trap '' USR1 TERM
(
  ( trap - USR1 TERM; exec "${launch[@]}" ) &
  echo $! > "$pidfile"
  wait $!
  echo $? > "$status"
) &
watcher=$!

# Pass a signal on to the training (under torchrun to srun, which passes it on); one that comes before the
# training's pid is known is passed on as soon as it is.
warned='' terminated='' child=''
forward() {
  echo "slurm_task.sh: got SIG$1, passing it on to the training"
  if [[ $1 == USR1 ]]; then warned=1; else terminated=1; fi
  [[ -n $child ]] && kill -"$1" "$child" 2> /dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
until [[ -s $pidfile ]] || ! kill -0 "$watcher" 2> /dev/null; do sleep 0.05; done
child=$(cat "$pidfile")
[[ -n $warned ]] && kill -USR1 "$child" 2> /dev/null
[[ -n $terminated ]] && kill -TERM "$child" 2> /dev/null
while kill -0 "$watcher" 2> /dev/null; do wait "$watcher"; done  # a trapped signal ends `wait` early
if ! rc=$(cat "$status" 2> /dev/null); then
  echo "=== the watcher was killed: no exit status, $(date '+%F %T') ==="
  exit 1
fi
rm -f "$pidfile"
echo "=== exit $rc, $(date '+%F %T') ==="

# Requeue after the warning: the training stopped with its checkpoint written (status 3; under torchrun the
# status is torchrun's, 1 when its workers stop, so any failure after the warning counts: at worst a real
# failure runs once more from its last checkpoint and fails again). Not after SIGTERM: that is scancel (the user
# wants the task gone; SLURM would requeue a cancelled task), or `scontrol requeue` and preemption, after which
# SLURM requeues the task itself.
if [[ -n $warned && -z $terminated && $rc != 0 ]]; then
  echo "requeueing $self: the next attempt resumes from the checkpoint"
  scontrol requeue "$self"
fi
exit "$rc"
