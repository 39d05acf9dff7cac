"""Which of PyTorch's SDPA kernels runs SD's UNet fastest: one UNet call (CFG batch 2) with
each backend forced, at each size, against PyTorch's own choice.

    python benchmarks/sdpa_backends.py [--device cuda] [--sizes 512,1024] [--json OUT]

At 1024x1024 the 16384-token self-attention of the first level is most of a UNet call on a GPU
(convolutions grow 4x from 512, that attention 16x), so its kernel decides exact mode's speed
there. Each backend computes the same attention with its own summation order; the table gives
the UNet output's max abs difference from the default's and the time per call (median of
`--reps`, after a warm-up call). A backend the device or shape does not support is reported as
such. Exact-mode CUDA graphs are off here: the kernels are timed, not the launches.

`--vae` times the VAE's mid-block attention instead (one head 512 wide over every latent pixel:
16384 tokens at 1024x1024) with each backend and sdlite's chunked attention, and on CUDA the
memory each adds at its peak. On an H200 the streamed 1024x1024 decode held about 1.8 GiB more
than the score-free count predicts, so PyTorch's default seems to form the 16384^2 scores there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def time_call(fn, device: str, reps: int) -> float:
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sdpa_kernels() -> dict:
    """Our backend names -> PyTorch's SDPBackend members that this torch version has."""
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def _record(out: dict, row: dict, path: str | None, cuda: bool) -> None:
    """Keep a row, print it, and rewrite the JSON (a run cut short keeps what it measured)."""
    import torch

    out["rows"].append(row)
    print(json.dumps(row), flush=True)
    if path:
        Path(path).write_text(json.dumps(out, indent=1))
    if cuda:
        torch.cuda.empty_cache()


def vae_attention(args) -> int:
    import torch
    from torch.nn.attention import sdpa_kernel

    from sdlite.attention import chunked_attention

    cuda = args.device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    kernels = sdpa_kernels()
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "rows": []}
    for size in (int(s) for s in args.sizes.split(",")):
        tokens = (size // 8) ** 2
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 1, tokens, 512, generator=g).to(args.device, dtype) for _ in range(3))
        reference = None
        for name in args.backends.split(",") + ["sdlite-chunked"]:
            row = {"size": size, "tokens": tokens, "backend": name}
            try:
                if name == "sdlite-chunked":
                    fn = lambda: chunked_attention(q, k, v, chunk=1024)  # noqa: E731
                    ctx = contextlib.nullcontext
                elif name == "default":
                    fn, ctx = (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)), contextlib.nullcontext
                elif name not in kernels:
                    raise ValueError(f"this torch has no SDPA backend {name!r}")
                else:
                    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
                    ctx = lambda name=name: sdpa_kernel(kernels[name])  # noqa: E731
                with torch.inference_mode(), ctx():
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    result = fn().float()
                    if cuda:
                        row["extra_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                    row["seconds"] = time_call(fn, args.device, args.reps)
                reference = result if reference is None else reference
                row["max_abs_diff_vs_first"] = (result - reference).abs().max().item()
                del result
            except Exception as e:  # a backend this device/shape has no kernel for
                row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            _record(out, row, args.json, cuda)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backends", default="default,flash,efficient,cudnn,math")
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "bench"))
    ap.add_argument("--vae", action="store_true", help="the VAE mid-block's attention instead of the UNet")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.vae:
        return vae_attention(args)
    import load_memory
    import torch
    from torch.nn.attention import sdpa_kernel

    from sdlite.checkpoint import open_checkpoint

    workdir = Path(args.workdir)
    load_memory.prepare(workdir)
    cuda = args.device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    unet = open_checkpoint(workdir / "sd15-fp16.safetensors").load("unet", dtype, args.device)
    if cuda:
        unet = unet.to(memory_format=torch.channels_last)  # as exact mode runs it on CUDA
    kernels = sdpa_kernels()
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "rows": []}
    for size in (int(s) for s in args.sizes.split(",")):
        g = torch.Generator().manual_seed(0)
        lat = size // 8
        x = torch.randn(2, 4, lat, lat, generator=g).to(args.device, dtype)
        t = torch.tensor([500.0, 500.0], device=args.device)
        c = torch.randn(2, 77, 768, generator=g).to(args.device, dtype)
        reference = None  # the default's output: compared against when "default" is listed first
        for name in args.backends.split(","):
            row = {"size": size, "backend": name}
            try:
                if name != "default" and name not in kernels:
                    raise ValueError(f"this torch has no SDPA backend {name!r}")
                with torch.inference_mode(), (sdpa_kernel(kernels[name]) if name != "default"
                                              else contextlib.nullcontext()):
                    eps = unet(x, t, c).float()
                    row["seconds_per_call"] = time_call(lambda: unet(x, t, c), args.device, args.reps)
                if name == "default":
                    reference = eps
                if reference is not None:
                    row["max_abs_diff_vs_default"] = (eps - reference).abs().max().item()
            except Exception as e:  # a backend this device/shape has no kernel for
                row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            _record(out, row, args.json, cuda)
    print("| size | SDPA backend | UNet call | max abs diff vs default |\n|---|---|---|---|")
    for r in out["rows"]:
        call = f"{r['seconds_per_call'] * 1e3:.1f} ms" if "seconds_per_call" in r else r["error"][:60]
        diff = f"{r['max_abs_diff_vs_default']:.2e}" if "max_abs_diff_vs_default" in r else "-"
        print(f"| {r['size']} | {r['backend']} | {call} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
