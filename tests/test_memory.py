"""Memory behaviour: one model resident at a time, storage vs compute dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdlite.checkpoint import export_checkpoint, open_checkpoint
from sdlite.pipeline import StableDiffusion
from sdlite.precision import CastLinear, weights_dtype

PROMPT = "a watercolor fox"


def _image(seed=0, size=32):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _track(sd: StableDiffusion):
    """Record which models are resident whenever any model runs."""
    seen = []
    real_load = sd.load_component

    def load(component):
        model = real_load(component)
        model.register_forward_pre_hook(lambda m, a: seen.append((component, tuple(sd.resident_components()))))
        if component == "vae":  # encode/decode are not forward(): wrap them
            for name in ("encode", "decode"):
                fn = getattr(model, name)
                setattr(model, name, lambda *a, _fn=fn, **k: (seen.append(("vae", tuple(sd.resident_components()))),
                                                               _fn(*a, **k))[1])
        return model

    sd.load_component = load
    return seen


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_low_memory_keeps_one_model_resident_and_changes_nothing(tiny, mode):
    low = StableDiffusion(tiny.folder, memory="low")
    assert low.resident_components() == [] and low.checkpoint.tensors is None
    seen = _track(low)
    normal = StableDiffusion(tiny.folder)
    assert normal.resident_components() == ["text", "unet", "vae"]
    run = {
        "txt2img": lambda sd: sd.txt2img(PROMPT, width=32, height=32, steps=3, seed=5, sampler="euler_a"),
        "img2img": lambda sd: sd.img2img(PROMPT, _image(), steps=4, strength=0.5, seed=5),
        "inpaint": lambda sd: sd.inpaint(PROMPT, _image(), _image(1).convert("L"), steps=3, seed=5),
    }[mode]
    a, b = run(low), run(normal)
    # low mode runs the CFG halves as two calls: equal up to the last bits of batched matmuls
    assert (a.latents - b.latents).abs().max() <= 1e-5 * max(1, b.latents.abs().max())
    assert seen, "no model ran"
    assert all(resident == (component,) for component, resident in seen), seen
    assert [c for c, _ in seen][0] == "text" and [c for c, _ in seen][-1] == "vae"
    assert low.resident_components() == []


def test_fp16_weights_compute_in_fp32_without_a_full_copy(tiny, tmp_path):
    half = export_checkpoint(tiny.folder, tmp_path / "half.safetensors", dtype=torch.float16)
    sd = StableDiffusion(half, dtype=torch.float32)
    assert weights_dtype(sd.unet) == torch.float16  # weights stay as stored (memory-mapped)
    assert isinstance(sd.unet.time_embed[0], CastLinear)
    # Reference: the same weights converted to fp32 up front.
    ck = open_checkpoint(half)
    unet32 = ck.load("unet", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 600.0]), torch.randn(2, 77, 128, generator=g)
    with torch.no_grad():
        assert torch.equal(sd.unet(x, t, c), unet32(x, t, c))
    res = sd.txt2img(PROMPT, width=32, height=32, steps=2, seed=1)
    assert res.latents.dtype == torch.float32 and torch.isfinite(res.latents).all()


def test_unknown_memory_mode_is_an_error(tiny):
    from sdlite.errors import InputError

    with pytest.raises(InputError, match="memory must be one of normal, low"):
        StableDiffusion(tiny.folder, memory="tiny")


def test_run_options_give_the_same_image_or_a_bounded_change(tiny):
    """chunked/plain attention and forced VAE tiling change nothing measurable; int8 stays close."""
    from sdlite.attention import get_attention

    base = StableDiffusion(tiny.folder).txt2img(PROMPT, width=32, height=32, steps=3, seed=9)
    for kw in (dict(attention="chunked", attention_chunk=7), dict(attention="plain")):
        res = StableDiffusion(tiny.folder, **kw).txt2img(PROMPT, width=32, height=32, steps=3, seed=9)
        assert (res.latents - base.latents).abs().max() <= 1e-4 * max(1, base.latents.abs().max())
    assert get_attention().mode == "sdpa"  # the setting is restored after each call
    int8 = StableDiffusion(tiny.folder, quantize="int8", memory="low").txt2img(PROMPT, width=32, height=32,
                                                                               steps=3, seed=9)
    rel = ((int8.latents - base.latents).norm() / base.latents.norm()).item()
    print(f"[diff] tiny int8 vs fp32 latents relative L2 {rel:.4f}")
    assert 0 < rel < 0.05


def test_bad_run_options_are_clear_errors(tiny):
    from sdlite.errors import InputError

    for kw, msg in ((dict(quantize="int4"), "quantize must be one of none, int8"),
                    (dict(attention="flash"), "unknown attention mode"),
                    (dict(attention="chunked", attention_chunk=0), "positive integer"),
                    (dict(vae_tiling="maybe"), "vae_tiling must be one of auto, on, off")):
        with pytest.raises(InputError, match=msg):
            StableDiffusion(tiny.folder, **kw)
