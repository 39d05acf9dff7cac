"""Speed, sdlite vs diffusers, same weights, same settings, same process run.

    python benchmarks/speed.py --device cpu  --size 256,512 --steps 3 [--reps 2]
    python benchmarks/speed.py --device cuda --size 512 --steps 50 [--reps 3] [--fast] [--diffusers-compile]

Measures, warm (after one untimed run) and repeated:
- per UNet call (CFG batch 2; sdlite's as its pipeline makes it, the latent once with both
  contexts: 2.5 % fewer FLOPs at 512x512, 4.5 % at 1024x1024) and its achieved TFLOP/s (each
  call's own FLOPs, counted with torch.utils.flop_counter),
- per denoising step (median interval between step callbacks),
- end to end (text encode + denoise + decode) per image,
and, in fresh child processes, the cold start: process start to first image from the
single-file checkpoint (the OS page cache is warm; both sides get the same).
Variants: sdlite exact (default options), on CUDA also without CUDA graphs, and --fast
(torch.compile); diffusers eager SDPA (its default) and, with --diffusers-compile,
torch.compile + channels_last. JSON to --json, markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
PROMPT = "a photograph of an astronaut riding a horse"
NEG = "blurry"


def psnr(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def unet_flops(unet, x, t, c) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        unet(x, t, c)
    return counter.get_total_flops()


def paired_call(unet):
    """sdlite's UNet called with a CFG batch (x, t, c of batch 2B) as its pipeline calls it for
    guidance: the latents once, with both contexts (the layers before the first cross-attention
    run once; unet.UNetModel). The same output as the batch-2B call."""
    return lambda x, t, c: unet(x[: x.shape[0] // 2], t[: t.shape[0] // 2], c)


def sd_unet_flops(size: int) -> dict[str, int]:
    """FLOPs of one SD v1 UNet call at size x size, counted on the meta device: "batch2", the CFG
    batch (diffusers' call), and "paired", one latent with both contexts (sdlite's call)."""
    import torch

    from sdlite.checkpoint import build_model
    from sdlite.config import SD_V1

    lat = size // 8
    with torch.device("meta"):
        meta_unet = build_model("unet", SD_V1)
    c = torch.zeros(2, 77, 768, device="meta")
    return {k: unet_flops(meta_unet, torch.zeros(n, 4, lat, lat, device="meta"), torch.zeros(n, device="meta"), c)
            for k, n in (("batch2", 2), ("paired", 1))}


# ---------------------------------------------------------------------------- implementations


class SdliteRunner:
    def __init__(self, path, device, dtype, channels_last=False, compile_scope=None, **options):
        """`compile_scope`: pipeline.FAST_COMPILE_SCOPE while the pipeline is built (it compiles the
        UNet as it loads it, so not with memory="low", which loads it later)."""
        from sdlite import pipeline

        scope = pipeline.FAST_COMPILE_SCOPE
        pipeline.FAST_COMPILE_SCOPE = compile_scope or scope  # read while the UNet loads
        try:
            self.sd = pipeline.StableDiffusion(path, device=device, dtype=dtype, **options)
        finally:
            pipeline.FAST_COMPILE_SCOPE = scope
        self.device = device
        if channels_last:  # an experiment: the UNet's convolution weights in NHWC, eager kernels
            import torch

            unet = self.sd.unet
            getattr(unet, "unet", unet).to(memory_format=torch.channels_last)

    def unet(self):
        return paired_call(self.sd.unet)

    def generate(self, size, steps, seed, callback=None):
        return self.sd.txt2img(PROMPT, NEG, width=size, height=size, steps=steps, sampler="ddim", seed=seed,
                               callback=callback).images[0]


class DiffusersRunner:
    def __init__(self, path, device, dtype, config, compile=False):
        import torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                        safety_checker=None, torch_dtype=dtype)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        if compile:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet, fullgraph=True)
        self.pipe, self.device = pipe, device

    def unet(self):
        u = self.pipe.unet
        return lambda x, t, c: u(x, t, c).sample

    def generate(self, size, steps, seed, callback=None):
        import torch

        cb = None if callback is None else (lambda p, i, t, kw: (callback(), kw)[1])
        return self.pipe(PROMPT, negative_prompt=NEG, height=size, width=size, num_inference_steps=steps,
                         guidance_scale=7.5, generator=torch.Generator().manual_seed(seed),
                         callback_on_step_end=cb).images[0]


def measure(runner, name, device, dtype, size, steps, reps, flops, images=None) -> dict:
    """One runner warm: its UNet call (2 per repetition), per-step and end-to-end times;
    `images[name, size]` gets the warm-up image (seed 1) when a dict is given."""
    return measure_interleaved([(name, runner)], device, dtype, size, steps, reps, flops, images)[0]


def measure_interleaved(runners, device, dtype, size, steps, reps, flops, images=None) -> list[dict]:
    """`measure` for several runners at once, in round-robin order (A B C A B C ...), so that a
    slow drift of this shared machine's speed falls on every variant alike."""
    import torch

    g = torch.Generator().manual_seed(0)
    lat = size // 8
    x = torch.randn(2, 4, lat, lat, generator=g).to(device, dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    c = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    stats = {name: {"calls": [], "e2e": [], "stamps": []} for name, _ in runners}
    with torch.inference_mode():
        for name, runner in runners:
            t0 = time.perf_counter()
            runner.unet()(x, t, c)
            sync(device)
            stats[name]["warmup"] = time.perf_counter() - t0
            image = runner.generate(size, steps, seed=1)
            if images is not None:
                images[name, size] = image
        for _ in range(reps):
            for name, runner in runners:
                unet, st = runner.unet(), stats[name]
                st["calls"] += timed(lambda: unet(x, t, c), device, 2)
                stamps: list[float] = []
                st["e2e"] += timed(lambda: runner.generate(size, steps, seed=1,
                                                           callback=lambda *a: stamps.append(time.perf_counter())),
                                   device, 1)
                st["stamps"] += [b - a for a, b in zip(stamps, stamps[1:]) if b - a > 0]
    rows = []
    for name, st in stats.items():
        per_call = statistics.median(st["calls"])
        rows.append({"name": name, "device": device, "size": size, "steps": steps, "unet_call_s": per_call,
                     "unet_call_first_s": st["warmup"],
                     "tflops": flops["paired" if name.startswith("sdlite") else "batch2"] / per_call / 1e12,
                     "step_s": statistics.median(st["stamps"]) if st["stamps"] else None,
                     "e2e_s": statistics.median(st["e2e"]), "e2e_all": st["e2e"], "calls_all": st["calls"],
                     "order": "interleaved" if len(runners) > 1 else "one variant at a time"})
    return rows


def cold_start(impl, path, device, dtype_name, size, steps, config) -> float:
    code = (
        "import time, sys; t0 = time.perf_counter(); sys.path.insert(0, %r);"
        "import torch, speed;"
        "dt = getattr(torch, %r);"
        "r = speed.SdliteRunner(%r, %r, dt) if %r == 'sdlite' else speed.DiffusersRunner(%r, %r, dt, %r);"
        "r.generate(%d, %d, 1); speed.sync(%r); print(time.perf_counter() - t0)"
    ) % (str(ROOT / "benchmarks"), dtype_name, str(path), device, impl, str(path), device, str(config),
         size, steps, device)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default=None, help="comma-separated image sizes")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--fast", action="store_true", help="also measure sdlite fast mode")
    ap.add_argument("--diffusers-compile", action="store_true")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-start children")
    ap.add_argument("--interleave", action="store_true",
                    help="load every variant at once and time them in round-robin order (needs the memory of all)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset of sdlite, sdlite-no-graphs, sdlite-channels-last (CUDA), "
                         "sdlite-fast, sdlite-fast-blocks (CUDA), diffusers, diffusers-compile")
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "bench"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import load_memory
    import torch

    workdir = Path(args.workdir)
    config = load_memory.prepare(workdir)
    cuda = args.device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    path = workdir / ("sd15-fp16.safetensors" if cuda else "sd15-fp32.safetensors")
    sizes = [int(s) for s in (args.size or ("512" if cuda else "256,512")).split(",")]
    steps = args.steps or (50 if cuda else 3)
    variants = [("sdlite", lambda: SdliteRunner(path, args.device, dtype))]
    if cuda:
        variants.append(("sdlite-no-graphs", lambda: SdliteRunner(path, args.device, dtype, cuda_graphs=False)))
        variants.append(("sdlite-channels-last", lambda: SdliteRunner(path, args.device, dtype, channels_last=True)))
    if args.fast:
        variants.append(("sdlite-fast", lambda: SdliteRunner(path, args.device, dtype, fast=True)))
        if cuda and args.variants and "sdlite-fast-blocks" in args.variants.split(","):
            # fast mode compiling block by block (pipeline.FAST_COMPILE_SCOPE); only when named, as one
            # more compile would crowd the other rows out of a device call's time
            variants.append(("sdlite-fast-blocks", lambda: SdliteRunner(path, args.device, dtype, fast=True,
                                                                        compile_scope="blocks")))
    variants.append(("diffusers", lambda: DiffusersRunner(path, args.device, dtype, config)))
    if args.diffusers_compile:
        variants.append(("diffusers-compile", lambda: DiffusersRunner(path, args.device, dtype, config, compile=True)))
    if args.variants:
        keep = args.variants.split(",")
        unknown = set(keep) - {name for name, _ in variants}
        if unknown:
            ap.error(f"unknown variants {sorted(unknown)} (with these options: {[n for n, _ in variants]})")
        variants = [v for v in variants if v[0] in keep]
    images = {}  # (variant, size) -> the image of seed 1, to compare sdlite variants with each other
    meta = {"torch": torch.__version__, "device_name": torch.cuda.get_device_name() if cuda else "cpu",
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    out = Path(args.json or ROOT / "benchmarks" / "results" / f"speed-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []

    def emit(row):  # the JSON is rewritten after each row: a run cut short keeps what it measured
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    flops = {}
    if args.interleave:
        runners = [(name, make()) for name, make in variants]
        for size in sizes:
            flops[size] = sd_unet_flops(size)
            for row in measure_interleaved(runners, args.device, dtype, size, steps, args.reps, flops[size]):
                emit(row)
        del runners
        variants = []
    for name, make in variants:
        t0 = time.perf_counter()
        runner = make()
        load_s = time.perf_counter() - t0
        for size in sizes:
            if size not in flops:
                flops[size] = sd_unet_flops(size)
            row = measure(runner, name, args.device, dtype, size, steps, args.reps, flops[size], images)
            row["load_s"] = load_s
            if name != "sdlite" and ("sdlite", size) in images:
                row["psnr_vs_sdlite"] = psnr(images[name, size], images["sdlite", size])
            emit(row)
        del runner
        if cuda:
            torch.cuda.empty_cache()
    if not args.no_cold:
        for impl in ("sdlite", "diffusers"):
            cs = cold_start(impl, path, args.device, "float16" if cuda else "float32", sizes[0], steps, config)
            emit({"name": f"{impl}-cold-start", "device": args.device, "size": sizes[0], "steps": steps,
                  "cold_start_s": cs})
    print(markdown(rows, meta))
    return 0


def markdown(rows, meta) -> str:
    lines = [f"{meta['date']}, {meta['device_name']}, torch {meta['torch']}",
             "", "| variant | size | steps | UNet call (s) | TFLOP/s | step (s) | end to end (s) | cold start (s) |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['name']} | {r['size']} | {r['steps']} | {f(r.get('unet_call_s'))} | "
                     f"{f(r.get('tflops'), 1)} | {f(r.get('step_s'))} | {f(r.get('e2e_s'))} | "
                     f"{f(r.get('cold_start_s'), 1)} |")
    lines += ["", "| ratio to diffusers (same run) | size | UNet call | step | end to end | cold start |", "|---|---|---|---|---|---|"]
    by = {(r["name"], r["size"]): r for r in rows}
    for (name, size), r in by.items():
        base = by.get(("diffusers-cold-start" if name.endswith("-cold-start") else "diffusers", size))
        if base is None or name.startswith("diffusers"):
            continue
        ratio = lambda k: "-" if r.get(k) is None or not base.get(k) else f"{r[k] / base[k]:.2f}x"  # noqa: E731
        lines.append(f"| {name} | {size} | {ratio('unet_call_s')} | {ratio('step_s')} | {ratio('e2e_s')} | "
                     f"{ratio('cold_start_s')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
