"""Top operators of one UNet call (CFG batch 2) on the CPU, for sdlite's paths and diffusers.

    python benchmarks/profile_cpu.py [--size 512] [--top 12] [--variants eager,exact,fast,diffusers]

Variants: `eager` = sdlite's UNet as plain PyTorch modules (what exact mode was before
kernels.py), `exact` = with the CPU kernels (exact mode's default in memory="normal"), `fast` =
fast mode (int8 x int8, fastcpu.py), `diffusers` = diffusers' UNet on the same file. Each is
timed once warm and profiled once (torch.profiler, self CPU time per operator).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def build(variant: str, path: Path, config: Path):
    import torch

    from sdlite.checkpoint import open_checkpoint

    if variant == "diffusers":
        from speed import DiffusersRunner

        return DiffusersRunner(path, "cpu", torch.float32, config).unet()
    model = open_checkpoint(path).load("unet", torch.float32, "cpu", int8=variant == "fast")
    if variant in ("exact", "fast"):
        from sdlite.kernels import cpu_speed_up

        cpu_speed_up(model)
    if variant == "fast":
        from sdlite.fastcpu import fast_int8

        fast_int8(model)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--variants", default="eager,exact,fast,diffusers")
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "bench"))
    args = ap.parse_args(argv)
    import load_memory
    import torch
    from torch.profiler import profile

    workdir = Path(args.workdir)
    config = load_memory.prepare(workdir)
    path = workdir / "sd15-fp32.safetensors"
    g = torch.Generator().manual_seed(0)
    lat = args.size // 8
    x, t = torch.randn(2, 4, lat, lat, generator=g), torch.tensor([500.0, 500.0])
    c = torch.randn(2, 77, 768, generator=g)
    for variant in args.variants.split(","):
        unet = build(variant, path, config)
        if variant != "diffusers":
            from speed import paired_call

            unet = paired_call(unet)
        with torch.inference_mode():
            unet(x, t, c)  # warm: packing, allocator
            t0 = time.perf_counter()
            unet(x, t, c)
            wall = time.perf_counter() - t0
            with profile() as prof:
                unet(x, t, c)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n## {variant}, {args.size}x{args.size}: {wall:.2f} s per call ({total / 1e6:.2f} s profiled)")
        print("| operator | self CPU | share | calls |\n|---|---|---|---|")
        for e in events[:args.top]:
            print(f"| {e.key} | {e.self_cpu_time_total / 1e3:.0f} ms | {100 * e.self_cpu_time_total / total:.1f} % "
                  f"| {e.count} |")
        del unet
    return 0


if __name__ == "__main__":
    sys.exit(main())
