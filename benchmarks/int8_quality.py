"""int8 weights (and fp16) vs fp32 on the full SD v1.5 architecture with seeded random weights.

    python benchmarks/int8_quality.py [--device cuda] [--config full|tiny] [--latent 64]
                                      [--sizes 128,512] [--steps 10] [--tails normal|t4]
                                      [--no-sensitivity] [--json OUT]

Measures, in one run, on the same weights:
1. UNet eps relative RMS error ||eps - eps_fp32|| / ||eps_fp32|| at `--latent` (batch 2,
   t = 100 and 700, random context) for: fp16 weights with fp32 compute, fp16 compute, bf16
   compute, int8 everywhere, int8 with sdlite's DEFAULT_KEEP, the int8 file (other weights
   fp16) and int8 with fp16 compute;
2. per-layer sensitivity: the same error with one layer at a time in int8 (ranking);
3. text encoder context error and VAE decoder error (int8 all / default keep);
4. txt2img after `--steps` PLMS steps (CFG 7.5) at each of `--sizes`: PSNR (8-bit images) of
   int8 / fp16 (and on the CPU fast mode) against fp32, through `sdlite.pipeline.StableDiffusion`.

Random weights follow tests/refmodels.randomize_ (weights N(0, 1/fan_in), norm scales 1 +
0.1 N, biases 0.05 N). `--tails t4` draws weights from a unit-variance Student-t (4 degrees of
freedom) instead: heavier tails, as trained weights have, make per-channel int8 coarser.
fp32 matrix products run without TF32 so the reference is real fp32.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sdlite.checkpoint import PREFIXES, Checkpoint, build_model
from sdlite.config import SD_V1, TINY
from sdlite.quantize import DEFAULT_KEEP, Int8Conv2d, Int8Linear, quantize_model, select_layers

PROMPT = "a photograph of an astronaut riding a horse"


def fill_(model: torch.nn.Module, seed: int, device: str, tails: str = "normal") -> torch.nn.Module:
    """Seeded random weights on `device` (the scheme of tests/refmodels.randomize_)."""
    model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
                if tails == "t4":  # Student-t(4) = N / sqrt(chi2_4 / 4), rescaled to unit variance
                    chi2 = torch.empty_like(p).exponential_(generator=g) + torch.empty_like(p).exponential_(generator=g)
                    p.mul_(torch.rsqrt(chi2 / 2) / math.sqrt(2))  # chi2_4 = 2 * (Exp + Exp)
            elif name.endswith("weight"):
                p.normal_(1, 0.1, generator=g)
            else:
                p.normal_(0, 0.05, generator=g)
    return model.eval().requires_grad_(False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def fp16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose float weights (not int8 scales) are rounded to fp16 and kept in fp32."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not name.endswith("weight_scale"):
                p.copy_(p.half().float())
    return model


def swap(model, name, new):
    parent, _, child = name.rpartition(".")
    old = model.get_submodule(name)
    setattr(model.get_submodule(parent), child, new)
    return old


def int8_of(layer):
    return (Int8Linear if isinstance(layer, torch.nn.Linear) else Int8Conv2d).from_float(layer)


def unet_figures(unet, cfg, args, report):
    dev = args.device
    g = torch.Generator("cpu").manual_seed(1)
    x = torch.randn(2, cfg.unet.in_channels, args.latent, args.latent, generator=g).to(dev)
    c = torch.randn(2, 77, cfg.unet.context_dim, generator=g).to(dev)
    t = torch.tensor([100.0, 700.0], device=dev)
    with torch.inference_mode():
        ref = unet(x, t, c)
        out = {"fp16 weights, fp32 compute": rel(fp16_rounded(unet)(x, t, c), ref)}
        for name, dtype in (("fp16 compute", torch.float16), ("bf16 compute", torch.bfloat16)):
            if dev != "cpu":
                low = copy.deepcopy(unet).to(dtype)
                out[name] = rel(low(x.to(dtype), t, c.to(dtype)).float(), ref)
                del low
        for name, keep in (("int8 all layers", ()), ("int8 DEFAULT_KEEP", None)):
            q = quantize_model(copy.deepcopy(unet), keep=keep)
            out[name] = rel(q(x, t, c), ref)
            if keep is None:
                out["int8 file (other weights fp16), fp32 compute"] = rel(fp16_rounded(q)(x, t, c), ref)
                if dev != "cpu":
                    h = copy.deepcopy(q).half()
                    out["int8 DEFAULT_KEEP, fp16 compute"] = rel(h(x.half(), t, c.half()).float(), ref)
                    del h
            del q
        if dev == "cpu" and fast_cpu_available():
            from sdlite.fastcpu import fast_int8

            q = fast_int8(quantize_model(copy.deepcopy(unet)))
            out["fast mode (CPU): int8 weights x uint8 activations, DEFAULT_KEEP"] = rel(q(x, t, c), ref)
            del q
        report["unet_eps_rel_rms"] = out
        if args.sensitivity:
            start = time.perf_counter()
            per = {}
            for name in select_layers(unet, keep=()):
                old = swap(unet, name, int8_of(unet.get_submodule(name)))
                per[name] = rel(unet(x, t, c), ref)
                swap(unet, name, old)
            ranked = sorted(per.items(), key=lambda kv: -kv[1])
            report["unet_sensitivity"] = {
                "top": ranked[:15],
                "layers": len(per),
                "sqrt_sum_of_squares": math.sqrt(sum(v * v for v in per.values())),
                "seconds": time.perf_counter() - start,
            }
            for keep_n in (2, 5, 10, 20):
                keep = [n for n, _ in ranked[:keep_n]]
                q = quantize_model(copy.deepcopy(unet), keep=keep)
                report["unet_sensitivity"][f"int8 keeping top {keep_n}"] = rel(q(x, t, c), ref)
                del q


def text_figures(text, cfg, args, report):
    g = torch.Generator("cpu").manual_seed(2)
    ids = torch.randint(0, cfg.text.vocab_size, (4, 77), generator=g).to(args.device)
    with torch.inference_mode():
        ref = text(ids)
        out = {"int8 all layers": rel(quantize_model(copy.deepcopy(text), keep=())(ids), ref)}
        per = {}
        if args.sensitivity:
            for name in select_layers(text, keep=()):
                old = swap(text, name, int8_of(text.get_submodule(name)))
                per[name] = rel(text(ids), ref)
                swap(text, name, old)
            out["top"] = sorted(per.items(), key=lambda kv: -kv[1])[:5]
    report["text_context_rel_rms"] = out


def vae_figures(vae, cfg, args, report):
    g = torch.Generator("cpu").manual_seed(3)
    z = torch.randn(1, cfg.vae.z_channels, args.latent, args.latent, generator=g).to(args.device)
    with torch.inference_mode():
        ref = vae.decode(z)
        out = {}
        for name, keep in (("int8 all layers", ()), ("int8 DEFAULT_KEEP", None)):
            img = quantize_model(copy.deepcopy(vae), keep=keep).decode(z)
            out[name] = {"rel_rms": rel(img, ref),
                         "psnr_db": 10 * math.log10(4 / ((img.clamp(-1, 1) - ref.clamp(-1, 1)) ** 2).mean().item())}
    report["vae_decode"] = out


def pipeline_figures(models, cfg, args, report):
    from sdlite.pipeline import StableDiffusion

    tensors = {}
    for component, model in models.items():
        tensors.update({PREFIXES[component] + k: v for k, v in model.state_dict().items()})
    ckpt = Checkpoint(Path("random-sd15"), "safetensors", tensors, cfg, dtype=torch.float32)
    ckpt.release = lambda: None  # in memory, nothing to re-map: keep the tensors for every variant
    # Plain eager UNet (no CUDA-graph wrapper), so that quantize_model sees sdlite's UNetModel.
    extra = {"cuda_graphs": False} if "cuda_graphs" in inspect.signature(StableDiffusion).parameters else {}
    extra["memory"] = "high"  # the models are quantized in place below: keep them where they are
    variants = {"fp32": (torch.float32, False), "int8": (torch.float32, True)}
    if args.device == "cpu" and fast_cpu_available():
        variants["fast (CPU int8 x int8)"] = (torch.float32, "fast")
    if args.device != "cpu":
        variants.update({"fp16": (torch.float16, False), "int8 + fp16 compute": (torch.float16, True)})
    out = {}
    for size in args.sizes:
        images, latents, row = {}, {}, {}
        for name, (dtype, int8) in variants.items():
            fast = {"fast": True} if int8 == "fast" else {}
            sd = StableDiffusion(ckpt, device=args.device, dtype=dtype, **extra, **fast)
            if int8 is True:
                quantize_model(sd.unet)
                quantize_model(sd.text_encoder)
            start = time.perf_counter()
            res = sd.txt2img(PROMPT, width=size, height=size, steps=args.steps, seed=0)
            row[f"{name} seconds"] = round(time.perf_counter() - start, 2)
            images[name], latents[name] = np.asarray(res.images[0]), res.latents.float().cpu()
            del sd, res
        ref = images["fp32"]
        row["saturated pixels (fp32 image)"] = float(np.mean((ref == 0) | (ref == 255)))
        for name in variants:
            if name != "fp32":
                row[f"{name} PSNR dB"] = round(psnr(images[name], ref), 2)
                row[f"{name} latent rel rms"] = rel(latents[name], latents["fp32"])
        out[f"{size}x{size}"] = row
    report[f"txt2img_{args.steps}_steps"] = out


def fast_cpu_available() -> bool:
    try:
        from sdlite.fastcpu import available
    except ImportError:  # an older sdlite
        return False
    return available()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", choices=("full", "tiny"), default="full")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--sizes", default="128,512")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tails", choices=("normal", "t4"), default="normal")
    ap.add_argument("--no-sensitivity", dest="sensitivity", action="store_false")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: unet,text,vae,pipeline")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    skip = set(args.skip.split(","))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = SD_V1 if args.config == "full" else TINY
    start = time.perf_counter()
    models = {}
    for i, component in enumerate(("unet", "text", "vae")):
        with torch.device("meta"):
            models[component] = fill_(build_model(component, cfg), 100 + i, args.device, args.tails)
    report = {"config": cfg.name, "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
              "tails": args.tails, "latent": args.latent, "default_keep": {k: list(v) for k, v in DEFAULT_KEEP.items()},
              "build_seconds": round(time.perf_counter() - start, 1)}
    parts = (("unet", unet_figures, "unet"), ("text", text_figures, "text"), ("vae", vae_figures, "vae"))
    for part, fn, component in parts:
        if part not in skip:
            t0 = time.perf_counter()
            fn(models[component], cfg, args, report)
            report[f"{part}_seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(report, indent=1), flush=True)
    if "pipeline" not in skip:
        pipeline_figures(models, cfg, args, report)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
