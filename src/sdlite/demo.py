"""`sdlite demo`: the whole engine on a fresh machine, with no weights to download.

It builds (once, cached in the user cache dir) a tiny SD v1 checkpoint with random weights in the
standard CompVis single-file .safetensors layout, using sdlite's own modules and file writer, and
runs txt2img, img2img and inpaint on it through the same code path as the `sdlite` command.
Random weights make noise: the demo checks the installation, not image quality.

Run it as `sdlite demo` or `python -m sdlite.demo`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from PIL import Image

from . import metadata as meta
from .checkpoint import PREFIXES, build_model, open_checkpoint
from .config import TINY
from .errors import CheckpointError
from .tensorfile import save_safetensors

# Bump when the recipe below changes, so an old cached file is not reused.
TINY_FILE = "tiny-random-sd-v1-r1.safetensors"
SEED = 0
PROMPT = "a photograph of an astronaut riding a horse"
SIZE = 64  # pixels; the tiny VAE downscales by 2, so 32x32 latents
STEPS = 10
REAL_MODEL_HINT = """\
These images come from a tiny model with RANDOM weights, so they are colored noise: that is expected.
For real images, use a real Stable Diffusion v1.x checkpoint (e.g. v1-5-pruned-emaonly.safetensors):
  sdlite txt2img "a photograph of an astronaut riding a horse" --model /path/to/v1-5-pruned-emaonly.safetensors
or set SDLITE_MODEL=/path/to/model.safetensors once and drop --model."""


def tiny_checkpoint_path() -> Path:
    return meta.cache_dir() / TINY_FILE


def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded noise of a sensible scale: weights ~ N(0, 1/fan_in), norm scales ~ 1, small biases."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))


def build_tiny_checkpoint(path: Path, seed: int = SEED) -> Path:
    """Write the tiny random-weight checkpoint (CompVis keys, safetensors) and check it loads."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, prefix in PREFIXES.items():
        with torch.device("meta"):
            model = build_model(component, TINY)
        model.to_empty(device="cpu")
        randomize_(model, generator)
        if any(True for _ in model.buffers()):
            raise CheckpointError(f"cannot build the demo model: the {component} has buffers this recipe does not fill")
        tensors.update({prefix + k: v for k, v in model.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, metadata={"format": "pt", "sdlite.architecture": TINY.name,
                                              "sdlite.note": "random weights, for the demo and tests"})
    open_checkpoint(path)  # the file must load like any real checkpoint
    return path


def tiny_checkpoint(rebuild: bool = False) -> tuple[Path, bool]:
    """The cached tiny checkpoint, built when missing, unreadable or `rebuild`; (path, built now)."""
    path = tiny_checkpoint_path()
    if path.is_file() and not rebuild:
        try:
            open_checkpoint(path)
            return path, False
        except CheckpointError:
            pass  # a damaged cache file: build it again
    return build_tiny_checkpoint(path), True


def _mask(size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))  # repaint the centre
    return mask


def run(args, ui) -> int:
    """The demo command: build or reuse the tiny model, then txt2img -> img2img -> inpaint."""
    from . import cli, images

    start = time.perf_counter()
    outdir = meta.check_outdir(args.outdir)
    try:
        path, built = tiny_checkpoint(rebuild=args.rebuild)
    except OSError as e:
        raise CheckpointError(f"cannot write the demo model to {tiny_checkpoint_path()}: {e.strerror or e}") from None
    ui.note(f"{'built' if built else 'using cached'} tiny random-weight SD v1 checkpoint: {path} "
            f"({path.stat().st_size / 1e6:.1f} MB)")
    model = cli.load_model(str(path), None, args.device, None, ui)
    common = dict(negative_prompt="blurry", steps=STEPS, cfg_scale=7.5, seed=SEED, random_seed=False,
                  batch_size=1, clip_skip=1, outdir=outdir)
    made = cli.generate(model, cli.Run("txt2img", [PROMPT], sampler="plms", karras=False, width=SIZE, height=SIZE,
                                       **common), ui)
    init = images.load_image(made[0], "init image")
    made += cli.generate(model, cli.Run("img2img", ["an oil painting of an astronaut riding a horse"],
                                        sampler="ddim", karras=False, width=None, height=None, strength=0.75,
                                        init_image=init, **common), ui)
    made += cli.generate(model, cli.Run("inpaint", ["a red helmet"], sampler="euler_a", karras=False, width=None,
                                        height=None, strength=1.0, init_image=init, mask_image=_mask(SIZE),
                                        **common), ui)
    ui.out(f"\ndemo done in {time.perf_counter() - start:.1f} s: txt2img, img2img and inpaint images in {outdir}/")
    ui.out(REAL_MODEL_HINT)
    return 0


def main() -> None:
    from .cli import main as cli_main

    sys.exit(cli_main(["demo", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
