#!/usr/bin/env bash
# The GPU check, in one call of at most 7 minutes on a lent H100 or H200 (one GPU, Python 3.12, its own
# torch 2.11, no network). Every part has its own time limit (together 420 s at most; --list-parts shows
# them) and writes its results under $OUT as soon as it ends, so a part that runs out of time loses nothing
# before it; a rerun starts clean. The parts, in order:
#   env      installs only what is missing, from the carried wheels; the GPU, python, torch and package versions
#   sync     bench.py --sync-check: the host syncs of the default step, of sampling and of the held-out metrics
#   bench    bench.py's eager variants at small, medium and large scale: bench.md
#   data     a look-alike CIFAR-10 (50,000 class-coloured images) in the real pickle layout
#   train    STEPS steps at small scale, --fid off: loss curve, images/s, peak memory, held-out metrics
#   resume   that finished run trained on by 200 steps with --resume: its checkpoint loaded onto the GPU
#   compile  --compile: 200 steps with TORCH_LOGS=recompiles (nothing may recompile after the probe; the
#            summary counts them), then bench.py's default and compile variants at small scale (into bench.md)
#   graphs   --compile max (CUDA graphs): the same, the cudagraph skips counted too, and bench.py compile-max
# Compilation comes last: it is the slowest and least certain part. No 2-process part: torchrun on one GPU
# cannot work, and the collective logic is tested on the CPU with gloo.
# Files in $OUT (8 at most come back): summary.md, parts.log, env.txt, bench.md, train_results.json,
# train_log.jsonl, train_grid.png, resume_results.json.
#
# The machine lacks diffusers, clean-fid and some of their dependencies, and cannot download them. Here,
# where pip reaches PyPI, once (about 15 MiB of wheels; --prepare --dry-run lists them):
#   bash bench_device.sh --prepare
# then: run(command="bash bench_device.sh", carry=[".device-wheels"], timeout_s=480)
# Without the wheels it needs, the check says so in one line and runs nothing.
# Environment: PYTHON (default python3; for --prepare .venv/bin/python), OUT (default device_out), WHEELS
# (default .device-wheels), METHOD (default cross-attn), STEPS (default 1000), LIMIT_<PART> in seconds for
# one part; for a rehearsal on a CPU: SCALE (default small), BENCH_SCALES (default "small medium large"),
# MORE_STEPS (the resume's and the compiled runs' steps, default 200), DATA_PER_BATCH (images per
# CIFAR-10 batch file, default 10000).
set -uo pipefail
cd "$(dirname "$0")" || exit 2

# The parts in order, and their time limits in seconds (LIMIT_<PART> overrides one): summed, at most the
# check's 7 minutes (a test holds them to 420 s). The sizes are estimates until a GPU has run them.
PARTS=(env sync bench data train resume compile graphs)
declare -A DEFAULT_LIMIT=([env]=35 [sync]=20 [bench]=90 [data]=15 [train]=60 [resume]=30 [compile]=95 [graphs]=70)
limit() { local var="LIMIT_${1^^}"; echo "${!var:-${DEFAULT_LIMIT[$1]}}"; }
NEED=(diffusers==0.42.1 clean-fid==0.1.35)  # as pinned in requirements.txt (prepare_device.py too)

case "${1:-}" in
  --prepare)  # here, not on the lent machine: the wheels it lacks, into .device-wheels
    shift
    local_py=python3; [[ -x .venv/bin/python ]] && local_py=.venv/bin/python
    exec "${PYTHON:-$local_py}" prepare_device.py "$@" ;;
  --list-parts)
    total=0
    for p in "${PARTS[@]}"; do echo "$p $(limit "$p")"; total=$((total + $(limit "$p"))); done
    echo "total $total"
    exit 0 ;;
  "") ;;
  *) echo "usage: bash bench_device.sh [--prepare [--dry-run] | --list-parts] (got: $*)" >&2; exit 2 ;;
esac

OUT=${OUT:-device_out}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.device-wheels}
METHOD=${METHOD:-cross-attn}
STEPS=${STEPS:-1000}
MORE_STEPS=${MORE_STEPS:-200}
SCALE=${SCALE:-small}
BENCH_SCALES=${BENCH_SCALES:-small medium large}
mkdir -p "$OUT"
rm -f "$OUT"/{summary.md,parts.log,env.txt,bench.md,train_results.json,train_log.jsonl,train_grid.png} \
  "$OUT/resume_results.json"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1
summary="$OUT/summary.md"
echo "# Device check ($(date -u +%Y-%m-%dT%H:%M:%SZ), method $METHOD, $STEPS steps at $SCALE scale)" > "$summary"
touch "$OUT/parts.log"

# refuse WHAT WHY: the one line that says what is missing and how to bring it; nothing else runs
refuse() {
  echo "bench_device.sh: missing $1 ($2); run 'bash bench_device.sh --prepare' where pip reaches PyPI and carry" \
       "its folder: run(command=\"bash bench_device.sh\", carry=[\".device-wheels\"])" | tee -a "$summary" >&2
  exit 2
}

missing_packages() {  # those of NEED that are absent or at another version
  "$PY" - "${NEED[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

def installed(pin):
    name, wanted = pin.split("==")
    try:
        return version(name) == wanted
    except PackageNotFoundError:
        return False

print(" ".join(pin for pin in sys.argv[1:] if not installed(pin)))
EOF
}

# begin NAME: a part starts; its steps share its time limit. end_part: its line in the summary.
begin() {
  part=$1 part_rc=0 part_start=$SECONDS deadline=$((SECONDS + $(limit "$1")))
  part_line=$(wc -l < "$OUT/parts.log")  # where its output starts, to count what it logged
  echo "=== $part (limit $(limit "$part") s)" >> "$OUT/parts.log"
}
step() {  # one command, within what is left of the part's limit; the part keeps the first failure
  local left=$((deadline - SECONDS)) rc
  echo "--- $*" >> "$OUT/parts.log"
  if (( left <= 0 )); then rc=124; else
    timeout --kill-after=5 "$left" "$@" >> "$OUT/parts.log" 2>&1
    rc=$?
  fi
  (( part_rc == 0 )) && part_rc=$rc
  return $rc
}
end_part() {
  local note=""
  (( part_rc == 124 || part_rc == 137 )) && note=" (stopped at its time limit)"
  echo "- $part: exit $part_rc$note, $((SECONDS - part_start)) s of $(limit "$part")" | tee -a "$summary"
}
logged() { tail -n +"$((part_line + 1))" "$OUT/parts.log" | grep -c "$1"; }  # lines of this part's output

# run_line NAME RUN_DIR [NOTE]: the summary line of a finished run (speed, memory, loss curve, held-out metrics)
run_line() {
  if ! "$PY" - "$@" >> "$summary" 2>> "$OUT/parts.log" <<'EOF'
import json, math, sys
from pathlib import Path
name, run, note = sys.argv[1], Path(sys.argv[2]), "".join(sys.argv[3:])
r = json.loads((run / "results.json").read_text())
log = [json.loads(line) for line in (run / "log.jsonl").open()]
losses = [x["loss"] for x in log if x.get("loss") is not None]
skipped = sum(x.get("skipped_steps") or 0 for x in log)  # fp16 steps the scaler skipped
memory = "" if r.get("peak_memory_gib") is None else f", peak memory {r['peak_memory_gib']:.2f} GiB"  # CUDA only
curve = "" if not losses else (f", loss {losses[0]:.4f} -> {losses[-1]:.4f} (finite: "
                               f"{all(map(math.isfinite, losses))}, falling: {losses[-1] < losses[0]})")
label = "" if r.get("label_acc") is None else f", label_acc {r['label_acc']:.3f}"
print(f"  {name}: {r['steps']} steps, {r['images_per_s']:.0f} images/s{memory}{curve}, {skipped} skipped fp16 steps, "
      f"heldout_loss {r['heldout_loss']:.5f}{label}{note}")
EOF
  then echo "  $1: no results${3:-}" >> "$summary"; fi
}

# Before anything else: what is missing must be installable from the carried wheels
missing=$(missing_packages)
if [[ -n $missing ]] && ! compgen -G "$WHEELS/*.whl" > /dev/null; then
  refuse "$missing" "no wheels in $WHEELS"
fi

begin env
if [[ -n $missing ]]; then
  # Only what is missing, offline. diffusers with the dependencies the machine lacks; clean-fid without: it
  # needs torch, torchvision, numpy, scipy, pillow, tqdm and requests (there, or brought by diffusers), and
  # resolving torch would hold the machine's own torch to its pins (setuptools<82, triton, nvidia-*).
  for pin in $missing; do
    deps=(); [[ $pin == clean-fid* ]] && deps=(--no-deps)
    step "$PY" -m pip install --no-index --find-links "$WHEELS" "${deps[@]}" "$pin" \
      || refuse "$missing" "$(grep -h 'ERROR' "$OUT/parts.log" | tail -n 1 | cut -c1-200)"
  done
  installed=$missing
  missing=$(missing_packages)
  [[ -z $missing ]] || refuse "$missing" "still absent after installing from $WHEELS"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.txt" 2>&1 \
  || echo "nvidia-smi: not available" > "$OUT/env.txt"
echo "installed from $WHEELS: ${installed:-nothing (all there)}" >> "$OUT/env.txt"
step "$PY" - <<'EOF'
import importlib.metadata as md
import sys

import torch
import cleanfid.fid  # every later part needs these with this torch: clean-fid's own imports, the harness's model
import custom_train
from diffusers import DDIMScheduler, UNet2DModel

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(f"python {sys.version.split()[0]} | torch {torch.__version__} | cuda {torch.version.cuda} | gpu {gpu} | "
      f"diffusers {md.version('diffusers')} | clean-fid {md.version('clean-fid')}")
EOF
end_part
tail -n 1 "$OUT/parts.log" | tee -a "$OUT/env.txt" | sed 's/^/  /' >> "$summary"
if (( part_rc != 0 )); then
  echo "bench_device.sh: torch, diffusers or clean-fid does not import here (see $OUT/parts.log); nothing else runs" >&2
  exit 1
fi

begin sync
step "$PY" bench.py --sync-check --scales "$SCALE" --out "$work/sync.txt"
end_part
[[ -f $work/sync.txt ]] && sed 's/^/  /' "$work/sync.txt" >> "$summary"

begin bench
# shellcheck disable=SC2086  # the scales are words
step "$PY" bench.py --scales $BENCH_SCALES --steps 15 --warmup 5 --method "$METHOD" --out "$OUT/bench.md"
end_part

begin data
step "$PY" -c "
import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from conftest import write_tiny_cifar10
write_tiny_cifar10(Path('$work/data'), per_batch=${DATA_PER_BATCH:-10000})"
end_part

# --fid-samples 0: one evaluation, the final one; held-out loss only (label_acc would cost 10 more passes)
train=("$PY" custom_train.py --scale "$SCALE" --method "$METHOD" --fid off --fid-samples 0 --data-dir "$work/data"
       --out-dir "$work/runs" --log-every 100 --ckpt-every 500 --heldout-draws 1 --label-draws 0)
run="$work/runs/$SCALE-$METHOD-s42"
begin train
step "${train[@]}" --steps "$STEPS"
end_part
cp "$run/results.json" "$OUT/train_results.json" 2>/dev/null
cp "$run/log.jsonl" "$OUT/train_log.jsonl" 2>/dev/null
cp "$run/grid_final.png" "$OUT/train_grid.png" 2>/dev/null
run_line train "$run"

begin resume
step "${train[@]}" --steps $((STEPS + MORE_STEPS)) --resume
end_part
cp "$run/results.json" "$OUT/resume_results.json" 2>/dev/null
run_line resume "$run"

# compiled NAME: the compiled run's line, with what this part's output shows of its compilation
compiled() {
  local found
  found="recompilations logged: $(logged 'Recompiling function'), fell back to eager: $(logged 'torch.compile failed')"
  [[ $1 == graphs ]] && found+=", cudagraph skips logged: $(logged 'skipping cudagraphs')"
  run_line "$1" "$work/runs/$1" "; $found"
}

begin compile
step env TORCH_LOGS=recompiles "${train[@]}" --steps "$MORE_STEPS" --compile --run-name compiled
step "$PY" bench.py --scales "$SCALE" --variants default compile --steps 15 --warmup 5 --method "$METHOD" \
  --no-sampling --out "$work/bench_compile.md"
end_part
compiled compiled
cat "$work/bench_compile.md" >> "$OUT/bench.md" 2>/dev/null

begin graphs
step env TORCH_LOGS=recompiles,cudagraphs "${train[@]}" --steps "$MORE_STEPS" --compile max --run-name graphs
step "$PY" bench.py --scales "$SCALE" --variants default compile-max --steps 15 --warmup 5 --method "$METHOD" \
  --no-sampling --out "$work/bench_graphs.md"
end_part
compiled graphs
cat "$work/bench_graphs.md" >> "$OUT/bench.md" 2>/dev/null

cat "$summary"
