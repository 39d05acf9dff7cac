#!/usr/bin/env bash
# One GPU session: install the carried wheels (.whl/: diffusers, ftfy, ...), then run the CUDA
# checks and benchmarks, writing JSON to $OUT as each row finishes. Usage on the device machine:
#   DEADLINE=570 bash benchmarks/device_run.sh [memory] [checks] [speed] [speed1024] [speedboth] [low] [sdpa] ...
# Parts run in the order given; each gets its own cap or what is left of DEADLINE seconds
# (counted from the start of this script), whichever is less. One run call allows 600 s.
# speedboth = speed.py at 512 and 1024 in one process (each variant loaded once); memory-sdlite,
# speed-exact and fast1024 are shorter subsets for a second call; low = low + int8 with the CFG
# halves batched (the new default on CUDA), split, and with an NHWC UNet, next to diffusers'
# model offload, two images each (image seconds); sdpa = one UNet call per SDPA kernel
# (sdpa_backends.py); exact2 = exact mode vs diffusers eager at 512 and 1024 in one process;
# e1024 = the same at 1024 only; mem1024 = sdlite fp16 at 1024, default (VAE tiles) and
# memory="high" (plain VAE decode); warmup1024 = fast mode compiled whole and by blocks, and
# diffusers + torch.compile, at 1024, each in its own process with an empty inductor cache;
# vaeattn = the VAE mid-block attention (16384 tokens, one 512-wide head) per SDPA kernel;
# compiletime = the UNet's first call alone at 1024, whole / by blocks / diffusers, each with an
# empty inductor cache and again on the cache the first filled, with dynamo's phase timers.
set -uo pipefail
start=$SECONDS
deadline=${DEADLINE:-570}
OUT=${OUT:-benchmarks/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for part in ${*:-memory checks speedboth}; do
  left=$((deadline - (SECONDS - start) - 5))
  case $part in checks) cap=170 ;; memory) cap=200 ;; speed) cap=270 ;; sdpa) cap=200 ;; vaeattn) cap=60 ;; low) cap=240 ;; exact2) cap=150 ;; mem1024|e1024) cap=120 ;; compiletime) cap=330 ;;  *) cap=420 ;; esac
  t=$((left < cap ? left : cap))
  if [ "$t" -lt 30 ]; then echo "== $part skipped: ${left}s left"; continue; fi
  echo "== $part (limit ${t}s, $((SECONDS - start))s in)"
  case $part in
    checks) timeout $t python3 benchmarks/cuda_checks.py --json "$OUT/cuda-checks.json" ;;
    memory) timeout $t python3 benchmarks/memory.py --device cuda --steps 10 --json "$OUT/memory-cuda.json" ;;
    speed) timeout $t python3 benchmarks/speed.py --device cuda --size 512 --steps 50 --reps 2 --fast \
             --diffusers-compile --json "$OUT/speed-cuda.json" ;;
    speed1024) timeout $t python3 benchmarks/speed.py --device cuda --size 1024 --steps 50 --reps 2 --fast \
             --diffusers-compile --no-cold --json "$OUT/speed-cuda-1024.json" ;;
    memory-sdlite) timeout $t python3 benchmarks/memory.py --device cuda --steps 10 \
             --configs sdlite-cuda-fp16,sdlite-cuda-fp16-1024 --json "$OUT/memory-cuda-sdlite.json" ;;
    low) timeout $t python3 benchmarks/memory.py --device cuda --steps 10 --images 2 \
             --configs sdlite-cuda-low-int8,sdlite-cuda-low-int8-nographs,sdlite-cuda-low-int8-cl,diffusers-cuda-fp16-offload \
             --json "$OUT/memory-cuda-low.json" ;;
    mem1024) timeout $t python3 benchmarks/memory.py --device cuda --steps 10 \
             --configs sdlite-cuda-fp16-1024,sdlite-cuda-fp16-1024-high --json "$OUT/memory-cuda-1024.json" ;;
    e1024) timeout $t python3 benchmarks/speed.py --device cuda --size 1024 --steps 50 --reps 2 --no-cold \
             --variants sdlite,diffusers --json "$OUT/speed-cuda-exact-1024.json" ;;
    exact2) timeout $t python3 benchmarks/speed.py --device cuda --size 512,1024 --steps 50 --reps 2 --no-cold \
             --variants sdlite,diffusers --json "$OUT/speed-cuda-exact2.json" ;;
    sdpa) timeout $t python3 benchmarks/sdpa_backends.py --sizes 512,1024 --json "$OUT/sdpa-backends.json" ;;
    vaeattn) timeout $t python3 benchmarks/sdpa_backends.py --vae --sizes 512,1024 --json "$OUT/vae-attention.json" ;;
    speed-exact) timeout $t python3 benchmarks/speed.py --device cuda --size 512 --steps 50 --reps 2 --no-cold \
             --variants sdlite,sdlite-no-graphs,sdlite-channels-last,diffusers --json "$OUT/speed-cuda-exact.json" ;;
    fast1024) timeout $t python3 benchmarks/speed.py --device cuda --size 1024 --steps 50 --reps 2 --no-cold --fast \
             --diffusers-compile --variants sdlite-fast,diffusers-compile --json "$OUT/speed-cuda-fast-1024.json" ;;
    warmup1024)  # a throwaway process first reads the CUDA libraries from disk, for none of the three to pay it
      python3 -c "import torch; x = torch.randn(2, 64, 64, 64, device='cuda', dtype=torch.half); \
torch.nn.functional.conv2d(x, x[:8, :, :3, :3]).sum().item(); (x.flatten(1) @ x.flatten(1).T).sum().item()"
      for v in sdlite-fast-blocks sdlite-fast diffusers-compile; do  # one process and empty caches each
        left=$((deadline - (SECONDS - start) - 5)); [ "$left" -lt 60 ] && { echo "== $v skipped"; break; }
        TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout $((left < 150 ? left : 150)) python3 benchmarks/speed.py \
          --device cuda --size 1024 --steps 50 --reps 2 --no-cold --fast --diffusers-compile --variants $v \
          --json "$OUT/warmup-1024-$v.json"
        echo "== $v rc=$?"
      done ;;
    compiletime) timeout $t python3 benchmarks/compile_time.py --device cuda --size 1024 \
             --json "$OUT/compile-time-cuda-1024.json" ;;
    compile1024) timeout $t python3 benchmarks/speed.py --device cuda --size 1024 --steps 50 --reps 2 --no-cold \
             --diffusers-compile --variants diffusers-compile --json "$OUT/speed-cuda-compile-1024.json" ;;
    speedboth) timeout $t python3 benchmarks/speed.py --device cuda --size 512,1024 --steps 50 --reps 2 --fast \
             --diffusers-compile --no-cold --json "$OUT/speed-cuda-both.json" ;;
  esac
  echo "== $part rc=$? at $((SECONDS - start))s"
done
