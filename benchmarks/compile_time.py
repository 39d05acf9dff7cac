"""Fast mode's warm-up: the first (compiling) UNet call, sdlite vs diffusers, cold and warm cache.

    python benchmarks/compile_time.py --device cpu  --size 256 [--scopes unet,blocks]
    python benchmarks/compile_time.py --device cuda --size 1024

Each row is one child process on the SD v1.5 UNet (random weights, channels_last, CFG batch 2;
sdlite's call as its pipeline makes it, the latent once with both contexts):
sdlite's `compile_unet` per scope ("unet": whole, fast mode's default; "blocks": block by block)
and diffusers' UNet2DConditionModel under torch.compile(fullgraph=True), as benchmarks/speed.py's
diffusers-compile variant builds it. "cold": a fresh, empty TORCHINDUCTOR_CACHE_DIR (a first run
on a machine); "warm": a second process on that same cache (every later run: torch keeps
the compiled graphs and kernels on disk). Each child reports its first call (compile included),
its second call, the graphs dynamo made, and dynamo's own phase timers (summed over graphs):
tracing the Python, inductor's lowering, its scheduling + code generation, and the wait for the
kernel compiler (C++ on the CPU, Triton on CUDA). On the CPU this is a proxy: the tracing,
lowering and scheduling are the same Python work as on a GPU, the kernel compiler is not.
JSON to --json, markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# dynamo_timed names -> the table's columns
PHASES = {"tracing_s": "bytecode_tracing", "lowering_s": "GraphLowering.run",
          "codegen_s": "GraphLowering.codegen", "kernel_compile_wait_s": "async_compile.wait"}


def child(impl: str, scope: str, device: str, size: int) -> dict:
    import torch
    from torch._dynamo.utils import compilation_time_metrics, counters

    cuda = device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    unet = build(impl, scope, device, dtype)
    g = torch.Generator().manual_seed(0)
    lat = size // 8
    x = torch.randn(2, 4, lat, lat, generator=g).to(device, dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    c = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    if cuda:  # load cuDNN and cuBLAS before the clock starts (the first process reads them from disk)
        w = torch.randn(8, 4, 3, 3, device=device, dtype=dtype)
        torch.nn.functional.conv2d(x, w).sum().item()
        (c[0] @ c[0].T).sum().item()
    times = []
    with torch.inference_mode():
        for _ in range(2):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            unet(x, t, c)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    phases = {k: round(sum(compilation_time_metrics.get(v, [])), 3) for k, v in PHASES.items()}
    return {"first_call_s": times[0], "second_call_s": times[1],
            "graphs": counters["stats"]["unique_graphs"], **phases}


def build(impl: str, scope: str, device: str, dtype):
    import torch

    if impl == "diffusers":
        sys.path.insert(0, str(ROOT / "tests"))
        import refmodels

        from sdlite.config import SD_V1

        unet = refmodels.diffusers_unet(SD_V1.unet).to(device, dtype).eval()
        unet.to(memory_format=torch.channels_last)
        compiled = torch.compile(unet, fullgraph=True)
        return lambda x, t, c: compiled(x, t, c).sample
    from sdlite.checkpoint import build_model
    from sdlite.config import SD_V1
    from sdlite.demo import randomize_
    from sdlite.pipeline import compile_unet

    with torch.device("meta"):
        unet = build_model("unet", SD_V1)
    unet = unet.to_empty(device="cpu")
    randomize_(unet, torch.Generator().manual_seed(0))
    from speed import paired_call  # this script's folder is on sys.path

    return paired_call(compile_unet(unet.to(device, dtype).eval().to(memory_format=torch.channels_last), scope))


def run_child(impl, scope, device, size, cache: Path) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT / "src"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", f"{impl}:{scope}", "--device", device,
                           "--size", str(size)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} {scope} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["process_s"] = time.perf_counter() - t0
    return row


def markdown(rows, meta) -> str:
    lines = [f"Fast mode's first UNet call ({meta['device_name']}, torch {meta['torch']}, {meta['size']}x{meta['size']}, "
             f"{meta['date']}):", "",
             "| variant | cache | first call | second call | graphs | tracing | lowering | codegen | kernel compile wait |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['cache']} | {r['first_call_s']:.1f} s | {r['second_call_s']:.3f} s | {r['graphs']} "
                     f"| {r['tracing_s']:.1f} s | {r['lowering_s']:.1f} s | {r['codegen_s']:.1f} s "
                     f"| {r['kernel_compile_wait_s']:.1f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", type=int, default=None, help="image size (default 256 on the CPU, 1024 on CUDA)")
    ap.add_argument("--scopes", default="unet,blocks", help="sdlite compile scopes to time")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--no-warm", action="store_true", help="only the cold-cache processes")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    size = args.size or (1024 if args.device == "cuda" else 256)
    if args.child:
        impl, scope = args.child.split(":")
        print(json.dumps(child(impl, scope, args.device, size)))
        return 0
    import torch

    from sdlite.pipeline import FAST_COMPILE_SCOPES

    scopes = args.scopes.split(",")
    unknown = set(scopes) - set(FAST_COMPILE_SCOPES)
    if unknown:
        ap.error(f"unknown scopes {sorted(unknown)} (known: {', '.join(FAST_COMPILE_SCOPES)})")
    variants = [("sdlite", s) for s in scopes] + ([] if args.no_diffusers else [("diffusers", "-")])
    meta = {"torch": torch.__version__, "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "size": size, "date": time.strftime("%Y-%m-%d")}
    out = Path(args.json or ROOT / "benchmarks" / "results" / f"compile-time-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdlite-inductor-") as tmp:
        for impl, scope in variants:
            cache = Path(tmp) / f"{impl}-{scope}"  # empty for the cold child, filled by it for the warm one
            for state in ("cold",) if args.no_warm else ("cold", "warm"):
                name = f"sdlite {scope}" if impl == "sdlite" else "diffusers"
                row = {"name": name, "cache": state, **run_child(impl, scope, args.device, size, cache)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
