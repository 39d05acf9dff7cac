"""An estimate, made on the CPU, of sdlite's CUDA peak allocated memory per stage (fp16).

    python benchmarks/cuda_memory_estimate.py [--size 512] [--steps 1] [--configs normal,high,high-plainvae]

For sessions without a GPU. It runs the full random-weight SD v1.5 pipeline on the CPU in
float32 with the CPU-only kernels off (kernels.py packs extra weight copies that CUDA never
makes), so the same layers make the same tensors as on CUDA, and counts op by op the bytes of
the tensors alive (`LivePeak`, tests/conftest.py) during each stage; the weights that stay
resident are added (float weights as fp16, int8 weights as they are). Every float32 activation
byte is an fp16 byte on the GPU, so activations count half; an int8 layer's dequantized weight
is float32 here and fp16 there, so it does too.
Configs: `normal` (memory="normal" as on CUDA: text encoder and VAE parked in host memory,
forced here with parking.SEPARATE_MEMORY), `high` (all resident), `-plainvae` = vae_tiling
"off" (the plain one-call VAE decode instead of the streamed one), `low-int8` (memory="low" on
the int8 file; each stage counts the model it loads) with the CFG halves as two calls, and
`low-int8-cfg2` with them as one batch-2 call.

What it cannot see: cuDNN/cuBLAS workspaces, the caching allocator's block rounding, and
kernels that allocate different temporaries on CUDA (CUDA graphs keep the same tensors alive
as eager). Calibrate against a measured row before trusting it: `high-plainvae` is the
configuration benchmarks/results/memory-cuda.json measured as "sdlite-cuda-fp16" on an H200.
(Measured vs estimated so far: workspaces and rounding add about 0.05-0.15 GiB per stage.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
GiB = 1024**3
PROMPT = "a photograph of an astronaut riding a horse"
CONFIGS = {"normal": dict(), "high": dict(memory="high"), "high-plainvae": dict(memory="high", vae_tiling="off"),
           "normal-plainvae": dict(vae_tiling="off"),
           # low + int8 file, the two CFG halves as two calls / as one batch-2 call ("-cfg2")
           "low-int8": dict(memory="low", file="int8", cfg_batch=False),
           "low-int8-cfg2": dict(memory="low", file="int8", cfg_batch=True)}


def device_bytes(model) -> int:
    """A model's bytes on a CUDA device in fp16: float weights 2 bytes, int8 weights 1, their
    float32 scales 4."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        size = 4 if name.endswith("weight_scale") else 2 if t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


def storages(*tensors) -> set[int]:
    """The storage addresses of tensors (weights), which LivePeak leaves out."""
    return {t.untyped_storage().data_ptr() for t in tensors}


def weights(model) -> list:
    return list(model.parameters()) + list(model.buffers())


def estimate(workdir: Path, name: str, size: int, steps: int) -> dict:
    import torch

    from conftest import LivePeak
    from sdlite import kernels, parking
    from sdlite.pipeline import StableDiffusion

    class Counter(LivePeak):
        paused = False  # while a low-mode stage loads its model (its weights are added as resident)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.paused:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    options = dict(CONFIGS[name])
    path = workdir / ("sd15-int8.safetensors" if options.pop("file", None) == "int8" else "sd15-fp32.safetensors")
    kernels.cpu_speed_up = lambda model, release=False: model  # CUDA has no packed CPU weights
    parking.SEPARATE_MEMORY = ("cpu",)
    sd = StableDiffusion(path, **options)
    models = [m for m in (sd.unet, sd.text_encoder, sd.vae) if m is not None]
    # Resident before counting starts: the UNet always; the text encoder and VAE unless parked
    # (a parked model's device copy is made, and counted, when its stage starts); in low mode
    # nothing, and each stage's model while the stage runs.
    resident = [sum(device_bytes(m) for c, m in (("unet", sd.unet), ("text", sd.text_encoder), ("vae", sd.vae))
                    if m is not None and c not in sd._parked)]
    existing = [t for m in models for t in weights(m)] + [t for p in sd._parked.values() for t in p.host.values()]
    counter, stages = Counter(exclude=storages(*existing)), {}

    load, loaded = sd.load_component, {}  # component -> storages of the weights it loaded

    def load_uncounted(component):
        counter.paused = True
        try:
            model = load(component)
        finally:
            counter.paused = False
        if sd.memory == "low":
            resident[0] = device_bytes(model)
        own = storages(*weights(model))
        loaded[component] = own - counter.exclude
        counter.exclude |= own
        return model
    sd.load_component = load_uncounted
    done_with = sd.done_with

    def done_and_forgotten(component):
        done_with(component)
        if sd.memory == "low":  # the model is freed: a later tensor may reuse its addresses
            counter.exclude -= loaded.pop(component, set())
    sd.done_with = done_and_forgotten
    stage_resident = {}

    def wrap(method: str, stage: str):
        fn = getattr(sd, method)

        def wrapped(*a, **k):
            counter.peak = counter.current
            try:
                return fn(*a, **k)
            finally:
                # float32 activations here are fp16 on the GPU: half the bytes
                stages[stage] = max(stages.get(stage, 0), resident[0] + counter.peak / 2)
                stage_resident[stage] = resident[0]
        setattr(sd, method, wrapped)

    for method, stage in (("encode_prompt", "text"), ("denoise", "denoise"), ("decode", "decode")):
        wrap(method, stage)
    t0 = time.perf_counter()
    with counter:
        sd.txt2img(PROMPT, width=size, height=size, steps=steps, sampler="ddim", seed=1)
    return {"config": name, "size": size, "steps": steps, "fp16_stage_bytes": stages, "fp16_peak": max(stages.values()),
            "stage_resident_bytes": stage_resident, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--configs", default="normal,high,high-plainvae")
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "bench"))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    import memory

    memory.prepare(workdir, {CONFIGS[name].get("file", "fp32") for name in args.configs.split(",")})
    rows = [estimate(workdir, name, args.size, args.steps) for name in args.configs.split(",")]
    print("| config | size | text | denoise | decode | peak (GiB, fp16 estimate) |\n|---|---|---|---|---|---|")
    for r in rows:
        s = r["fp16_stage_bytes"]
        print(f"| {r['config']} | {r['size']} | {s['text'] / GiB:.2f} | {s['denoise'] / GiB:.2f} | "
              f"{s['decode'] / GiB:.2f} | {r['fp16_peak'] / GiB:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
