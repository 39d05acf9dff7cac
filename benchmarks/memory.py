"""Peak memory of one image, per stage, sdlite vs diffusers, on the full SD v1.5 architecture.

    python benchmarks/memory.py [--device cpu|cuda] [--configs a,b,...] [--steps N] [--json OUT]

Each configuration runs in a fresh child process on the same random-weight checkpoint files
(made once by benchmarks/load_memory.py's helpers, cached in ./.cache/bench). A child reports:
- CPU: peak RSS of the whole process (VmHWM) and, per stage (text encode, VAE encode for the
  img2img configs, denoise, decode), the peak RSS sampled every 5 ms by a thread while that
  stage runs;
- CUDA: torch.cuda.max_memory_allocated overall and per stage (peak stats reset at each stage);
- seconds per denoising step (median of the steps after the first) and per stage, both of the
  last image; each image's seconds (the whole generation call; --images N makes N one after the
  other in the child, after the pipeline's construction) and total seconds.
Output: JSON (--json) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
GiB = 1024**3
PROMPT = "a photograph of an astronaut riding a horse"

# name -> (implementation, options). Sizes are square; "file" names the checkpoint variant.
CONFIGS = {
    "sdlite-fp32": ("sdlite", dict(file="fp32", size=512)),
    "sdlite-low-fp16": ("sdlite", dict(file="fp16", size=512, memory="low")),
    "sdlite-low-int8": ("sdlite", dict(file="int8", size=512, memory="low")),
    "sdlite-low-int8-chunked": ("sdlite", dict(file="int8", size=512, memory="low", attention="chunked")),
    "sdlite-low-quantize-fp16file": ("sdlite", dict(file="fp16", size=512, memory="low", quantize="int8")),
    "sdlite-low-int8-1024": ("sdlite", dict(file="int8", size=1024, memory="low", vae_tiling="on")),
    "sdlite-low-int8-fast": ("sdlite", dict(file="int8", size=512, memory="low", fast=True)),
    "sdlite-fast": ("sdlite", dict(file="fp32", size=512, fast=True)),
    # img2img (strength 0.75): adds the VAE encode stage; "-plainvae" = vae_tiling "off", i.e.
    # the plain one-call VAE instead of the streamed one
    "sdlite-fp32-img2img": ("sdlite", dict(file="fp32", size=512, mode="img2img")),
    "sdlite-fp32-img2img-plainvae": ("sdlite", dict(file="fp32", size=512, mode="img2img", vae_tiling="off")),
    "sdlite-low-int8-img2img": ("sdlite", dict(file="int8", size=512, memory="low", mode="img2img")),
    "sdlite-low-int8-img2img-plainvae": ("sdlite", dict(file="int8", size=512, memory="low", mode="img2img",
                                                        vae_tiling="off")),
    "diffusers-fp32": ("diffusers", dict(file="fp32", size=512)),
    "diffusers-fp32-sliced-tiled": ("diffusers", dict(file="fp32", size=512, slicing=True, vae_tiling=True)),
    # CUDA configurations (fp16 compute)
    "sdlite-cuda-fp16": ("sdlite", dict(file="fp16", size=512)),  # text encoder + VAE parked on the host
    "sdlite-cuda-fp16-high": ("sdlite", dict(file="fp16", size=512, memory="high")),  # all on the GPU
    "sdlite-cuda-fp16-plainvae": ("sdlite", dict(file="fp16", size=512, vae_tiling="off")),
    "sdlite-cuda-low-int8": ("sdlite", dict(file="int8", size=512, memory="low")),  # CFG as one batch-2 call
    "sdlite-cuda-low-int8-split": ("sdlite", dict(file="int8", size=512, memory="low", cfg_batch=False)),
    "sdlite-cuda-low-int8-cl": ("sdlite", dict(file="int8", size=512, memory="low", channels_last=True)),
    "sdlite-cuda-low-int8-nographs": ("sdlite", dict(file="int8", size=512, memory="low", cuda_graphs=False)),
    "sdlite-cuda-fp16-1024": ("sdlite", dict(file="fp16", size=1024)),
    "sdlite-cuda-fp16-1024-high": ("sdlite", dict(file="fp16", size=1024, memory="high")),  # plain VAE decode
    "diffusers-cuda-fp16": ("diffusers", dict(file="fp16", size=512)),
    "diffusers-cuda-fp16-offload": ("diffusers", dict(file="fp16", size=512, offload="model")),
    "diffusers-cuda-fp16-seq-offload": ("diffusers", dict(file="fp16", size=512, offload="sequential")),
    "diffusers-cuda-fp16-1024": ("diffusers", dict(file="fp16", size=1024)),
    "diffusers-cuda-fp16-1024-tiled": ("diffusers", dict(file="fp16", size=1024, vae_tiling=True)),
}
CPU_DEFAULT = ["sdlite-fp32", "sdlite-low-fp16", "sdlite-low-int8", "sdlite-low-int8-1024",
               "diffusers-fp32", "diffusers-fp32-sliced-tiled"]
CUDA_DEFAULT = ["sdlite-cuda-fp16", "sdlite-cuda-fp16-high", "sdlite-cuda-low-int8", "sdlite-cuda-fp16-1024", "diffusers-cuda-fp16",
                "diffusers-cuda-fp16-offload", "diffusers-cuda-fp16-1024", "diffusers-cuda-fp16-1024-tiled"]


class StageMeter:
    """Peak memory per named stage: a sampling thread on CPU, allocator stats on CUDA."""

    def __init__(self, device: str):
        self.device, self.stage, self.peaks, self.bases = device, None, {}, {}
        self.seconds: dict[str, float] = {}  # wall time per stage (summed over its calls)
        self._entered = 0.0
        self.step_times: list[float] = []
        # a sample is taken and filed under one stage while the stage cannot change: without
        # it a denoise-time RSS could be filed under "decode" (or under None) at the switch
        self._lock = threading.Lock()
        if device == "cpu":
            threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _sample(self):
        while True:
            with self._lock:
                if self.stage is not None:
                    self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), self.rss())
            time.sleep(0.005)

    def enter(self, stage: str):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.bases.setdefault(stage, torch.cuda.memory_allocated())  # what the stage starts on
        with self._lock:
            self.stage = stage
        self._entered = time.perf_counter()

    def leave(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), torch.cuda.max_memory_allocated())
        self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + time.perf_counter() - self._entered
        with self._lock:
            if self.device != "cuda":
                self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), self.rss())
            self.stage = None

    def wrap(self, obj, name: str, stage: str):
        fn = getattr(obj, name)

        def wrapped(*a, **k):
            self.enter(stage)
            try:
                return fn(*a, **k)
            finally:
                self.leave()
        setattr(obj, name, wrapped)

    def step(self, *args):
        self.step_times.append(time.perf_counter())


def _files(workdir: Path) -> dict:
    return {"fp32": workdir / "sd15-fp32.safetensors", "fp16": workdir / "sd15-fp16.safetensors",
            "int8": workdir / "sd15-int8.safetensors"}


def run_sdlite(opts: dict, device: str, steps: int, meter: StageMeter, workdir: Path):
    import torch

    from sdlite.pipeline import StableDiffusion

    kwargs = {k: opts[k] for k in ("memory", "attention", "vae_tiling", "quantize", "fast", "cfg_batch",
                                        "channels_last", "cuda_graphs") if k in opts}
    sd = StableDiffusion(_files(workdir)[opts["file"]], device=device, **kwargs)
    meter.wrap(sd, "encode_prompt", "text")
    meter.wrap(sd, "denoise", "denoise")
    meter.wrap(sd, "decode", "decode")
    size = opts["size"]
    if opts.get("mode") == "img2img":
        import numpy as np
        from PIL import Image

        meter.wrap(sd, "encode_image", "encode")
        pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        return lambda: sd.img2img(PROMPT, Image.fromarray(pixels), strength=0.75, steps=steps, sampler="ddim",
                                  seed=1, callback=meter.step)
    return lambda: sd.txt2img(PROMPT, width=size, height=size, steps=steps, sampler="ddim", seed=1,
                              callback=meter.step)


def run_diffusers(opts: dict, device: str, steps: int, meter: StageMeter, workdir: Path):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_single_file(
        str(_files(workdir)[opts["file"]]), config=str(workdir / "diffusers-sd15-config"), local_files_only=True,
        safety_checker=None, torch_dtype=dtype)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    pipe.set_progress_bar_config(disable=True)
    if opts.get("slicing"):
        pipe.enable_attention_slicing()
    if opts.get("vae_tiling"):
        pipe.vae.enable_tiling()
    if opts.get("offload") == "model":
        pipe.enable_model_cpu_offload()
    elif opts.get("offload") == "sequential":
        pipe.enable_sequential_cpu_offload()
    elif device == "cuda":
        pipe.to("cuda")
    meter.wrap(pipe, "encode_prompt", "text")
    meter.wrap(pipe.unet, "forward", "denoise")
    meter.wrap(pipe.vae, "decode", "decode")
    size = opts["size"]
    return lambda: pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                        generator=torch.Generator().manual_seed(1),
                        callback_on_step_end=lambda p, i, t, kw: (meter.step(), kw)[1])


def child(name: str, device: str, steps: int, workdir: Path, images: int = 1) -> dict:
    """Load (the pipeline's construction), then make `images` images one after the other. Each
    image's seconds are the whole generation call (in low mode sdlite loads each model inside
    it; diffusers' offload moves its models to the GPU and back inside it)."""
    impl, opts = CONFIGS[name]
    meter = StageMeter(device)
    t0 = time.perf_counter()
    generate = (run_sdlite if impl == "sdlite" else run_diffusers)(opts, device, steps, meter, workdir)
    load = time.perf_counter() - t0
    image_seconds = []
    for _ in range(images):
        meter.step_times.clear()
        meter.seconds.clear()  # stage seconds, like s/step, are the last image's
        start = time.perf_counter()
        generate()
        if device == "cuda":
            import torch

            torch.cuda.synchronize()
        image_seconds.append(time.perf_counter() - start)
    total = time.perf_counter() - t0
    times = meter.step_times  # the last image's
    per_step = statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else None
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    out = {"name": name, "impl": impl, **opts, "device": device, "steps": steps, "seconds_total": total,
           "seconds_load": load, "image_seconds": image_seconds, "seconds_per_step": per_step,
           "stage_peaks": meter.peaks, "stage_bases": meter.bases, "stage_seconds": meter.seconds}
    if device == "cuda":
        import torch

        out["peak"] = max(meter.peaks.values())
        out["gpu"] = torch.cuda.get_device_name()
    else:
        out["peak"] = hwm
    out["peak_rss"] = hwm
    return out


def prepare(workdir: Path, need: set[str]) -> None:
    import load_memory

    load_memory.prepare(workdir)
    int8 = _files(workdir)["int8"]
    if "int8" in need and not int8.exists():
        import sdlite

        sdlite.export_checkpoint(_files(workdir)["fp32"], int8, int8=True)


def markdown(rows: list[dict]) -> str:
    encode = any("encode" in r.get("stage_peaks", {}) for r in rows)
    lines = ["| config | device | size | peak (GiB) | text |" + (" encode |" if encode else "")
             + " denoise | decode | s/step | decode s | image s |",
             "|---|---|---|---|---|" + ("---|" if encode else "") + "---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | | | error: {r['error'][:60]} | | | | | | |" + (" |" if encode else ""))
            continue
        sp = r["stage_peaks"]
        cell = lambda k: f"{sp[k] / GiB:.2f}" if k in sp else "-"  # noqa: E731
        s = f"{r['seconds_per_step']:.2f}" if r["seconds_per_step"] else "-"
        lines.append(f"| {r['name']} | {r['device']} | {r['size']} | {r['peak'] / GiB:.2f} | {cell('text')} | "
                     + (f"{cell('encode')} | " if encode else "") + f"{cell('denoise')} | {cell('decode')} | {s} | "
                     + (f"{r['stage_seconds']['decode']:.2f} |" if "decode" in r.get("stage_seconds", {}) else "- |")
                     + (" " + "/".join(f"{t:.2f}" for t in r["image_seconds"]) + " |" if r.get("image_seconds")
                        else " - |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--configs", help="comma-separated names from: " + ", ".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "bench"))
    ap.add_argument("--images", type=int, default=1, help="images made one after the other per child "
                    "(peaks cover all; s/step is the last image's)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    if args.child:
        print(json.dumps(child(args.child, args.device, args.steps, workdir, args.images)))
        return 0
    names = args.configs.split(",") if args.configs else (CUDA_DEFAULT if args.device == "cuda" else CPU_DEFAULT)
    prepare(workdir, {CONFIGS[n][1]["file"] for n in names})
    out = Path(args.json or ROOT / "benchmarks" / "results" / f"memory-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--steps", str(args.steps),
               "--images", str(args.images), "--workdir", str(workdir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"name": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        out.write_text(json.dumps(rows, indent=1))  # after each row: a run cut short keeps what it measured
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
