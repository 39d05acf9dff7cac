"""Winograd F(4x4, 3x3) vs oneDNN's direct convolution on the CPU, per layer shape and per model.

    python benchmarks/winograd.py [--reps 3] [--json benchmarks/results/winograd-cpu.json]

Part 1, one convolution at a time: SD v1.5's 3x3 convolution shapes (UNet with CFG batch 2,
VAE decoder with batch 1), channels-last float32 input as exact mode's packed layers hand it
over, timed through `kernels.PackedConv2d` (weights packed once) and through
`kernels.winograd_conv3x3` (filter transformed per call, as exact mode runs it), each with its
max abs error against a float64 convolution relative to the output's max |value|.

Part 2, whole models from the benchmark checkpoint (`.cache/bench/sd15-fp32.safetensors`,
written by load_memory.py): one 512x512 UNet call (CFG batch 2) and one streamed 512x512 decode,
with Winograd off (`WINOGRAD_MIN_PIXELS` out of reach) and on (the default rule), alternating
so that this shared machine's drift falls on both alike, and the max relative difference
between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

# (batch, in channels, out channels, height = width, where)
SHAPES = [
    (2, 320, 320, 64, "UNet 64x64"), (2, 640, 320, 64, "UNet 64x64 (skip concat)"),
    (2, 960, 320, 64, "UNet 64x64 (skip concat)"), (2, 640, 640, 32, "UNet 32x32 (not used)"),
    (2, 1280, 1280, 16, "UNet 16x16 (not used)"),
    (1, 512, 512, 64, "VAE 64x64"), (1, 512, 512, 128, "VAE 128x128"), (1, 512, 256, 256, "VAE 256x256"),
    (1, 256, 256, 256, "VAE 256x256"), (1, 256, 128, 512, "VAE 512x512"), (1, 128, 128, 512, "VAE 512x512"),
]


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def layers(reps: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from sdlite import kernels

    rows = []
    g = torch.Generator().manual_seed(0)
    for n, c, k, hw, where in SHAPES:
        conv = torch.nn.Conv2d(c, k, 3, padding=1)
        x = torch.randn(n, c, hw, hw, generator=g).contiguous(memory_format=torch.channels_last)
        packed = kernels.cpu_speed_up(torch.nn.Sequential(conv))[0]
        w, b = conv.weight.detach(), conv.bias.detach()
        with torch.inference_mode():
            exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
            scale = exact.abs().max().item()
            saved = kernels.WINOGRAD_MIN_PIXELS
            kernels.WINOGRAD_MIN_PIXELS = 1 << 62
            try:
                y0 = packed(x)
                t_direct = timed(lambda: packed(x), reps)
            finally:
                kernels.WINOGRAD_MIN_PIXELS = saved
            y1 = kernels.winograd_conv3x3(x, w, b)
            t_wino = timed(lambda: kernels.winograd_conv3x3(x, w, b), reps)
            used = kernels._winograd_pays(packed, x)
        row = {"shape": f"{n}x{c}->{k} @{hw}x{hw}", "where": where, "onednn_ms": t_direct * 1e3,
               "winograd_ms": t_wino * 1e3, "speedup": t_direct / t_wino, "used_by_exact_mode": used,
               "onednn_rel_err": (y0.double() - exact).abs().max().item() / scale,
               "winograd_rel_err": (y1.double() - exact).abs().max().item() / scale}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def models(reps: int, workdir: Path) -> dict:
    import torch

    from sdlite import kernels, streaming
    from sdlite.checkpoint import open_checkpoint

    path = workdir / "sd15-fp32.safetensors"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run benchmarks/load_memory.py once to write it")
    ck = open_checkpoint(path)
    unet = kernels.cpu_speed_up(ck.load("unet", torch.float32, "cpu"))
    vae = kernels.cpu_speed_up(ck.load("vae", torch.float32, "cpu"))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 64, 64, generator=g), torch.tensor([500.0, 500.0])
    c, z = torch.randn(2, 77, 768, generator=g), torch.randn(1, 4, 64, 64, generator=g)
    rule = kernels.WINOGRAD_MIN_PIXELS
    times = {"off": {"unet": [], "decode": []}, "on": {"unet": [], "decode": []}}
    outputs = {}
    with torch.inference_mode():
        for rep in range(reps + 1):
            for mode in ("off", "on"):
                kernels.WINOGRAD_MIN_PIXELS = rule if mode == "on" else 1 << 62
                t0 = time.perf_counter()
                eps = unet(x, t, c)
                t1 = time.perf_counter()
                image = streaming.decode(vae, z)
                t2 = time.perf_counter()
                if rep:  # the first round packs the weights
                    times[mode]["unet"].append(t1 - t0)
                    times[mode]["decode"].append(t2 - t1)
                outputs[mode] = (eps, image)
        kernels.WINOGRAD_MIN_PIXELS = rule
    result = {mode: {part: statistics.median(v) for part, v in parts.items()} for mode, parts in times.items()}
    result["all_times"] = times
    for i, part in enumerate(("unet", "decode")):
        a, b = outputs["on"][i].double(), outputs["off"][i].double()
        result[f"{part}_rel_diff"] = (a - b).abs().max().item() / b.abs().max().item()
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "bench"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "layers": layers(args.reps)}
    if not args.skip_models:
        out["models"] = models(args.reps, Path(args.workdir))
    print("\n| layer | where | oneDNN direct | Winograd | speed-up | rel. error direct / Winograd |")
    print("|---|---|---|---|---|---|")
    for r in out["layers"]:
        print(f"| {r['shape']} | {r['where']} | {r['onednn_ms']:.1f} ms | {r['winograd_ms']:.1f} ms | "
              f"{r['speedup']:.2f}x | {r['onednn_rel_err']:.1e} / {r['winograd_rel_err']:.1e} |")
    if "models" in out:
        m = out["models"]
        print(f"\nUNet call 512x512 (CFG batch 2): {m['off']['unet']:.2f} s -> {m['on']['unet']:.2f} s "
              f"(rel diff {m['unet_rel_diff']:.1e}); streamed decode: {m['off']['decode']:.2f} s -> "
              f"{m['on']['decode']:.2f} s (rel diff {m['decode_rel_diff']:.1e})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
