#!/usr/bin/env bash
# The GPU check, as one call on a lent device (see the `device` tool): the speed table at the three
# protocol scales and a 2,000-step small-scale run, sized for under 8 minutes on one H200. Results
# go to $OUT (bench.md, the run's results.json, log and grid).
#
# The device machine has torch but not diffusers or clean-fid, and no network: carry their wheels.
# Here, once:   pip download --no-deps -d .device-wheels diffusers==0.42.1 clean-fid==0.1.35 importlib_metadata
# Then:         run(command="bash bench_device.sh", carry=[".device-wheels"], timeout_s=560)
#               (METHOD=name bash bench_device.sh times and trains that method; default cross-attn)
# No CIFAR-10 there either: the training run uses the bundled digits (16x16) with the proxy metrics.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-device_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
METHOD=${METHOD:-cross-attn}
"$PY" -m pip install --quiet --no-index --find-links .device-wheels diffusers clean-fid 2>&1 | tail -n 3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 300 "$PY" bench.py --scales small medium large --method "$METHOD" --steps 15 --warmup 5 --out "$OUT/bench.md" \
  || echo "bench.py stopped (exit $?); the tables printed so far are above"
timeout 180 "$PY" custom_train.py --scale small --method "$METHOD" --dataset digits --steps 2000 \
  --batch-size 128 --log-every 200 --final-fid-samples 1000 --fid-samples 0 --out-dir /tmp/device_runs \
  --cache-dir /tmp/device_cache --channels-last --fused-adam
run=/tmp/device_runs/digits-small-$METHOD-s42  # only small files come back from $OUT (not the checkpoint)
cp "$run/results.json" "$OUT/small_run_results.json"
cp "$run/log.jsonl" "$OUT/small_run_log.jsonl"
cp "$run/grid_final.png" "$OUT/small_run_grid.png"
