"""Accuracy checks that need a GPU, on the full random-weight SD v1.5 checkpoint (fp16, CUDA):
- CUDA graphs (exact mode) vs eager: identical latents;
- sdlite vs diffusers, same seed and settings: PSNR of the decoded images and max latent diff;
- fast mode (torch.compile) vs exact mode: PSNR of the decoded images (target >= 40 dB);
- the streamed VAE decode (streaming.py) vs the plain one: max diff, time, peak allocated;
- memory="normal" (text encoder and VAE parked in host memory) vs "high" (all on the GPU):
  identical images, seconds per image of each;
- CUDA graphs after the UNet's weights were replaced (same values, new tensors): captured again,
  identical latents.

    python benchmarks/cuda_checks.py [--steps 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "bench"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "cuda-checks.json"))
    args = ap.parse_args(argv)
    import load_memory
    import torch

    from sdlite.pipeline import StableDiffusion

    workdir = Path(args.workdir)
    config = load_memory.prepare(workdir)
    path = workdir / "sd15-fp16.safetensors"
    kw = dict(width=args.size, height=args.size, steps=args.steps, sampler="ddim", seed=3)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": args.steps, "size": args.size}
    prompt = "a photograph of an astronaut riding a horse"
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)

    def save():  # after each part: a run cut short keeps what it checked
        Path(args.json).write_text(json.dumps(out, indent=1))

    eager = StableDiffusion(path, device="cuda", cuda_graphs=False).txt2img(prompt, **kw)
    graphs_sd = StableDiffusion(path, device="cuda")
    graphs = graphs_sd.txt2img(prompt, **kw)
    out["graphs_vs_eager_latent_max_diff"] = (graphs.latents - eager.latents).abs().max().item()
    out["graphs_vs_eager_psnr"] = psnr(graphs.images[0], eager.images[0])
    unet = graphs_sd.unet.unet  # inside the GraphedUNet: move every weight to a new tensor
    unet.load_state_dict({k: v.clone() for k, v in unet.state_dict().items()}, assign=True)
    again = graphs_sd.txt2img(prompt, **kw)
    out["graphs_after_weights_moved_latent_max_diff"] = (again.latents - graphs.latents).abs().max().item()
    save()

    out["streamed_decode"] = streamed_vs_plain(graphs_sd, graphs.latents)
    save()
    out["parking"] = parked_vs_high(graphs_sd, StableDiffusion(path, device="cuda", memory="high"), prompt, kw)
    save()
    del graphs_sd
    torch.cuda.empty_cache()

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                    safety_checker=None, torch_dtype=torch.float16).to("cuda")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    lat = {}
    ref = pipe(prompt, height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(3), output_type="pil",
               callback_on_step_end=lambda p, i, t, k: (lat.__setitem__("x", k["latents"].float().cpu()), k)[1])
    out["sdlite_vs_diffusers_latent_max_diff"] = (eager.latents.cpu() - lat["x"]).abs().max().item()
    out["sdlite_vs_diffusers_latent_max_abs"] = lat["x"].abs().max().item()
    out["sdlite_vs_diffusers_psnr"] = psnr(eager.images[0], ref.images[0])
    save()
    del pipe
    torch.cuda.empty_cache()

    t0 = time.perf_counter()
    fast = StableDiffusion(path, device="cuda", fast=True)
    first = fast.txt2img(prompt, **kw)
    out["fast_first_image_s"] = time.perf_counter() - t0
    out["fast_vs_exact_psnr"] = psnr(first.images[0], eager.images[0])
    out["fast_vs_exact_latent_max_diff"] = (first.latents - eager.latents).abs().max().item()
    save()
    print(json.dumps(out, indent=1))
    return 0


def streamed_vs_plain(sd, latents) -> dict:
    """One 512x512 decode both ways on the GPU: max abs diff, seconds (3rd of 3 runs) and the
    activations' peak (max_memory_allocated above what was allocated before)."""
    import torch

    from sdlite import streaming

    z = (latents / sd.config.vae.scale_factor).to("cuda", sd.dtype)
    vae = sd.resident("vae")
    res = {}
    with torch.inference_mode():
        for name, fn in (("plain", vae.decode), ("streamed", lambda z: streaming.decode(vae, z))):
            for _ in range(3):
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                img = fn(z)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
            res[name] = {"seconds": seconds, "activations_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
            res[name + "_image"] = img.float().cpu()
    res["max_abs_diff"] = (res.pop("streamed_image") - res.pop("plain_image")).abs().max().item()
    sd.done_with("vae")
    return res


def parked_vs_high(parked, high, prompt: str, kw: dict) -> dict:
    """The same image with the text encoder and VAE parked in host memory (normal) and kept on
    the GPU (high); seconds per image (best of 3, after a warm-up) of both, interleaved."""
    import torch

    res, images = {"normal_s": [], "high_s": []}, {}
    for _ in range(4):
        for name, sd in (("normal", parked), ("high", high)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            images[name] = sd.txt2img(prompt, **kw)
            torch.cuda.synchronize()
            res[name + "_s"].append(time.perf_counter() - t0)
    res = {k: min(v[1:]) for k, v in res.items()}
    res["latents_equal"] = bool(torch.equal(images["normal"].latents, images["high"].latents))
    res["images_psnr"] = psnr(images["normal"].images[0], images["high"].images[0])
    res["parked_mib"] = sum(p.nbytes() for p in parked._parked.values()) / 2**20
    return res


if __name__ == "__main__":
    sys.exit(main())
