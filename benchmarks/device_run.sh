#!/usr/bin/env bash
# One GPU session: install the carried wheels (.whl/: diffusers, ftfy, ...), then run the CUDA
# checks and benchmarks, writing JSON to $OUT as each part finishes. Usage on the device machine:
#   bash benchmarks/device_run.sh [checks] [speed] [speed1024] [memory]
# One run call allows 600 s and a session about 15 min of device time in all (start-up included):
# run `checks memory` (about 6 min) in one call and `speed1024` (or `speed`) in the next.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
parts=${*:-checks speed memory}
for part in $parts; do
  case $part in
    checks) timeout 170 python3 benchmarks/cuda_checks.py --json "$OUT/cuda-checks.json" ;;
    speed) timeout 270 python3 benchmarks/speed.py --device cuda --size 512 --steps 50 --reps 2 --fast \
             --diffusers-compile --json "$OUT/speed-cuda.json" ;;
    speed1024) timeout 400 python3 benchmarks/speed.py --device cuda --size 1024 --steps 50 --reps 2 --fast \
             --diffusers-compile --no-cold --json "$OUT/speed-cuda-1024.json" ;;
    memory) timeout 200 python3 benchmarks/memory.py --device cuda --steps 10 --json "$OUT/memory-cuda.json" ;;
  esac
  echo "== $part rc=$?"
done
