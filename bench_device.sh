#!/usr/bin/env bash
# The GPU check, in one call, sized for about 8 minutes on one H200. Every part has its own time limit
# and writes its results under $OUT as soon as it ends, so a part that runs out of time loses nothing
# before it; a rerun starts from a clean work folder. The parts:
#   env       the GPU, python and torch; installs only the packages that are missing (from .device-wheels)
#   sync      bench.py --sync-check: the default fp16 step under torch.cuda.set_sync_debug_mode("error")
#   bench     bench.py at small, medium, large (torch.compile timed at small): bench.md
#   data      a look-alike CIFAR-10 (50,000 class-coloured images) in the real pickle layout
#   train     STEPS steps at small scale, --fid off: loss curve, images/s, peak memory, held-out metrics
#   resume    that finished run trained on 200 more steps: its checkpoint loaded onto the GPU
#   compile   --compile --channels-last, 200 steps, with TORCH_LOGS=recompiles (steady state must not recompile)
#   torchrun  2 processes on the one GPU (NCCL may refuse two ranks on one device: recorded either way)
# Files in $OUT (8 at most come back): summary.md, parts.log, env.txt, bench.md, train_results.json,
# train_log.jsonl, train_grid.png, resume_results.json.
#
# The device has torch but not diffusers or clean-fid, and no network: carry their wheels. Here, once:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .device-wheels \
#       diffusers==0.42.1 clean-fid==0.1.35 importlib_metadata zipp
# Then: run(command="bash bench_device.sh", carry=[".device-wheels"], timeout_s=560)
# Environment: PYTHON (default python3), OUT (default device_out), METHOD (default cross-attn), STEPS
# (default 1500), and LIMIT_<PART> in seconds for each part (defaults below).
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-device_out}
PY=${PYTHON:-python3}
METHOD=${METHOD:-cross-attn}
STEPS=${STEPS:-1500}
mkdir -p "$OUT"
rm -f "$OUT"/{summary.md,parts.log,env.txt,bench.md,train_results.json,train_log.jsonl,train_grid.png,resume_results.json}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1
summary="$OUT/summary.md"
echo "# Device check ($(date -u +%Y-%m-%dT%H:%M:%SZ), method $METHOD, $STEPS steps)" > "$summary"

# part NAME LIMIT COMMAND...: run with a time limit, output appended to parts.log, exit code in the summary
part() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s): $*" >> "$OUT/parts.log"
  timeout "$limit" "$@" >> "$OUT/parts.log" 2>&1
  local rc=$?
  local note=""
  [[ $rc -eq 124 ]] && note=" (stopped at its time limit)"
  echo "- $name: exit $rc$note, $((SECONDS - start)) s" >> "$summary"
  echo "$name: exit $rc$note"
  return $rc
}

missing_packages() {
  "$PY" - <<'EOF'
import importlib.util
need = {"diffusers": "diffusers", "cleanfid": "clean-fid", "importlib_metadata": "importlib_metadata",
        "numpy": "numpy", "scipy": "scipy", "tqdm": "tqdm", "PIL": "pillow"}
print(" ".join(pkg for module, pkg in need.items() if importlib.util.find_spec(module) is None))
EOF
}

# env: what the machine is, and only what is missing installed, with its dependencies
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi: not available"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' 2>&1
} > "$OUT/env.txt"
missing=$(missing_packages)
if [[ -n $missing ]]; then
  echo "missing: $missing; installing them from .device-wheels" >> "$OUT/env.txt"
  part install 120 "$PY" -m pip install --no-index --find-links .device-wheels $missing
  missing=$(missing_packages)
fi
if [[ -n $missing ]]; then
  echo "- env: still missing after the install: $missing (carry their wheels in .device-wheels); nothing else can run" >> "$summary"
  echo "error: missing $missing" >&2
  exit 1
fi
echo "- env: $(tail -n 1 "$OUT/env.txt")" >> "$summary"

part sync "${LIMIT_SYNC:-60}" "$PY" bench.py --sync-check --scales small --out "$work/sync.txt"
[[ -f $work/sync.txt ]] && sed 's/^/  /' "$work/sync.txt" >> "$summary"

part bench "${LIMIT_BENCH:-170}" "$PY" bench.py --scales small medium large --steps 15 --warmup 5 --compile \
  --method "$METHOD" --out "$OUT/bench.md"

part data "${LIMIT_DATA:-30}" "$PY" -c "
import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from conftest import write_tiny_cifar10
write_tiny_cifar10(Path('$work/data'), per_batch=10000)"

train=("$PY" custom_train.py --scale small --method "$METHOD" --fid off --data-dir "$work/data" --out-dir "$work/runs"
       --log-every 100 --ckpt-every 500 --heldout-draws 1 --label-draws 1)
run="$work/runs/small-$METHOD-s42"
part train "${LIMIT_TRAIN:-150}" "${train[@]}" --steps "$STEPS"
cp "$run/results.json" "$OUT/train_results.json" 2>/dev/null
cp "$run/log.jsonl" "$OUT/train_log.jsonl" 2>/dev/null
cp "$run/grid_final.png" "$OUT/train_grid.png" 2>/dev/null
"$PY" - "$OUT/train_results.json" "$OUT/train_log.jsonl" >> "$summary" 2>/dev/null <<'EOF'
import json, math, sys
r = json.load(open(sys.argv[1]))
losses = [x["loss"] for x in map(json.loads, open(sys.argv[2])) if x.get("loss") is not None]
print(f"  train: {r['steps']} steps, {r['images_per_s']:.0f} images/s, peak memory {r['peak_memory_gib']:.2f} GiB, "
      f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (finite: {all(map(math.isfinite, losses))}, falling: "
      f"{losses[-1] < losses[0]}), heldout_loss {r['heldout_loss']:.5f}, label_acc {r['label_acc']:.3f}")
EOF

part resume "${LIMIT_RESUME:-60}" "${train[@]}" --steps $((STEPS + 200)) --resume
cp "$run/results.json" "$OUT/resume_results.json" 2>/dev/null

part compile "${LIMIT_COMPILE:-120}" env TORCH_LOGS=recompiles "${train[@]}" --steps 200 --compile --channels-last \
  --run-name compiled
echo "  compile: $(grep -c 'Recompiling function' "$OUT/parts.log") recompilation(s) logged" >> "$summary"

part torchrun "${LIMIT_TORCHRUN:-60}" "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 custom_train.py \
  --scale small --method "$METHOD" --fid off --data-dir "$work/data" --out-dir "$work/runs" --steps 100 \
  --log-every 50 --heldout-draws 0 --run-name ddp
cat "$summary"
