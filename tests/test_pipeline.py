"""End-to-end parity: sdlite's txt2img / img2img / inpaint against diffusers' pipelines on the
same random weights, seeds and settings (float32, CPU).

Noise: both sides draw from one CPU generator per image (seed + i) in the same order, so no
noise is injected by hand; a change of draw order would show as an O(1) difference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_close
from refmodels import reference_scheduler
from sdlite.errors import InputError
from sdlite.pipeline import StableDiffusion

PROMPT = "a photograph of an astronaut riding a horse"
NEG = "blurry, low quality"


@pytest.fixture(scope="module")
def tiny_sd(tiny):
    return StableDiffusion(tiny.folder)


@pytest.fixture(scope="module")
def tiny_inpaint_sd(tiny_inpaint):
    return StableDiffusion(tiny_inpaint.folder)


def reference(pipe_cls, ref, sampler, karras=False, seeds=(42, 43), **kwargs):
    """Run a diffusers pipeline; return (final latents, uint8 images)."""
    pipe = pipe_cls(**{k: v for k, v in ref.pipe.components.items()
                       if k in ("vae", "text_encoder", "tokenizer", "unet", "safety_checker", "feature_extractor")},
                    scheduler=reference_scheduler(sampler, karras), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    captured = {}

    def grab(p, i, t, kw):
        captured["latents"] = kw["latents"].clone()
        return kw

    out = pipe(generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np",
               callback_on_step_end=grab, **kwargs)
    latents = captured["latents"]
    return latents, (out.images * 255).round().astype(np.uint8)


def compare(result, ref_latents, ref_images, what):
    assert_close(result.latents, ref_latents, what=f"{what} latents")
    ours = np.stack([np.asarray(im) for im in result.images])
    diff = np.abs(ours.astype(int) - ref_images.astype(int)).max()
    print(f"[diff] {what} image uint8 max diff {diff}")
    assert diff <= 1, f"{what}: uint8 max diff {diff}"


def make_image(w=32, h=32, seed=0):
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_mask(w=32, h=32):
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : 3 * h // 4, w // 3 :] = 255
    return Image.fromarray(m)


# PLMS with 1 step is left out: diffusers skips the second model call there, CompVis does not
# (tests/test_samplers.py checks that case against the CompVis algorithm).
SAMPLER_CASES = [("plms", False, 4), ("plms", False, 7), ("ddim", False, 4), ("euler", False, 4),
                 ("euler", True, 4), ("euler_a", False, 4), ("heun", False, 3), ("dpmpp_2m", False, 5),
                 ("dpmpp_2m", True, 5)]


@pytest.mark.parametrize("sampler,karras,steps", SAMPLER_CASES)
def test_txt2img_matches_diffusers(tiny, tiny_sd, sampler, karras, steps):
    from diffusers import StableDiffusionPipeline

    ref_lat, ref_img = reference(StableDiffusionPipeline, tiny, sampler, karras, prompt=[PROMPT] * 2,
                                 negative_prompt=[NEG] * 2, height=32, width=40, num_inference_steps=steps,
                                 guidance_scale=7.5)
    res = tiny_sd.txt2img(PROMPT, NEG, width=40, height=32, steps=steps, sampler=sampler, karras=karras,
                          seed=42, batch_size=2)
    compare(res, ref_lat, ref_img, f"txt2img {sampler}{' karras' if karras else ''} {steps} steps")
    assert [p["seed"] for p in res.params] == [42, 43]


def _clip_skip_embeds(ref, prompt: str, skip: int, n: int) -> torch.Tensor:
    # diffusers' own clip_skip reaches for `text_encoder.text_model`, which transformers 5's
    # CLIPTextModel no longer has; compute its definition (penultimate hidden state through the
    # final LayerNorm) with transformers directly and hand diffusers the embeddings.
    te = ref.pipe.text_encoder
    ids = ref.pipe.tokenizer([prompt] * n, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).hidden_states[-skip]
        return getattr(te, "text_model", te).final_layer_norm(hidden)


def test_txt2img_ddim_eta_and_clip_skip(tiny, tiny_sd):
    from diffusers import StableDiffusionPipeline

    ref_lat, ref_img = reference(StableDiffusionPipeline, tiny, "ddim", prompt_embeds=_clip_skip_embeds(tiny, PROMPT, 2, 2),
                                 negative_prompt_embeds=_clip_skip_embeds(tiny, "", 2, 2), height=32, width=32,
                                 num_inference_steps=4, guidance_scale=5.0, eta=0.7)
    res = tiny_sd.txt2img(PROMPT, width=32, height=32, steps=4, sampler="ddim", eta=0.7, seed=42, batch_size=2,
                          guidance_scale=5.0, clip_skip=2)  # A1111 clip skip 2 = diffusers clip_skip=1
    compare(res, ref_lat, ref_img, "txt2img ddim eta=0.7 clip_skip=2")


def test_txt2img_guidance_one_skips_uncond(tiny, tiny_sd):
    from diffusers import StableDiffusionPipeline

    ref_lat, ref_img = reference(StableDiffusionPipeline, tiny, "euler", seeds=(7,), prompt=PROMPT, height=32,
                                 width=32, num_inference_steps=3, guidance_scale=1.0)
    res = tiny_sd.txt2img(PROMPT, width=32, height=32, steps=3, sampler="euler", seed=7, guidance_scale=1.0)
    compare(res, ref_lat, ref_img, "txt2img guidance 1")


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "euler_a"])
def test_img2img_matches_diffusers(tiny, tiny_sd, sampler):
    from diffusers import StableDiffusionImg2ImgPipeline

    init = make_image(40, 32)
    ref_lat, ref_img = reference(StableDiffusionImg2ImgPipeline, tiny, sampler, prompt=[PROMPT] * 2,
                                 negative_prompt=[NEG] * 2, image=init, strength=0.6, num_inference_steps=6,
                                 guidance_scale=7.5)
    res = tiny_sd.img2img(PROMPT, init, NEG, strength=0.6, steps=6, sampler=sampler, seed=42, batch_size=2)
    compare(res, ref_lat, ref_img, f"img2img {sampler}")
    assert res.params[0]["strength"] == 0.6


# Heun's predictor and PLMS's look-ahead are model evaluations between steps; diffusers' schedulers
# take them as steps, after which its pipeline blends the known region back in.
@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "plms"])
def test_inpaint_ordinary_checkpoint_matches_diffusers(tiny, tiny_sd, sampler):
    from diffusers import StableDiffusionInpaintPipeline

    init, mask = make_image(32, 32, 1), make_mask(32, 32)
    ref_lat, ref_img = reference(StableDiffusionInpaintPipeline, tiny, sampler, seeds=(42,), prompt=PROMPT,
                                 image=init, mask_image=mask, height=32, width=32, num_inference_steps=4,
                                 guidance_scale=7.5)
    res = tiny_sd.inpaint(PROMPT, init, mask, steps=4, sampler=sampler, seed=42)
    compare(res, ref_lat, ref_img, f"inpaint 4-channel {sampler}")


def test_inpaint_ordinary_checkpoint_callback_sees_and_can_replace_the_blended_latents(tiny_sd):
    """The user's callback runs after the known region is put back, and latents it returns
    replace the step's, as in the other modes."""
    init, mask = make_image(32, 32, 1), make_mask(32, 32)
    seen = []

    def callback(step, total, x):
        seen.append((step, total, x.clone()))
        return torch.zeros_like(x) if step == total else None

    res = tiny_sd.inpaint(PROMPT, init, mask, steps=3, sampler="euler", seed=42, callback=callback)
    plain = tiny_sd.inpaint(PROMPT, init, mask, steps=3, sampler="euler", seed=42)
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    assert torch.equal(seen[-1][2], plain.latents)  # the blended final latents
    assert not res.latents.any()  # replaced by the callback's


@pytest.mark.parametrize("sampler,prompt,strength", [("ddim", PROMPT, 1.0), ("plms", "", 1.0),
                                                     ("euler_a", PROMPT, 1.0), ("ddim", "", 0.7)])
def test_inpaint_9_channel_matches_diffusers(tiny_inpaint, tiny_inpaint_sd, sampler, prompt, strength):
    from diffusers import StableDiffusionInpaintPipeline

    init, mask = make_image(32, 32, 2), make_mask(32, 32)
    ref_lat, ref_img = reference(StableDiffusionInpaintPipeline, tiny_inpaint, sampler, seeds=(42,), prompt=prompt,
                                 image=init, mask_image=mask, height=32, width=32, num_inference_steps=4,
                                 guidance_scale=7.5, strength=strength)
    res = tiny_inpaint_sd.inpaint(prompt, init, mask, steps=4, sampler=sampler, seed=42, strength=strength)
    compare(res, ref_lat, ref_img, f"inpaint 9-channel {sampler} prompt={prompt!r} strength={strength}")


# Inpainting parity runs one image: with a list of generators, diffusers' inpainting pipeline
# samples the init/masked image posteriors for the whole batch from generator 0 only. sdlite
# keeps every image of a batch equal to the same image generated alone with seed + i:
@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_batch_image_i_equals_single_run_with_seed_plus_i(tiny_sd, tiny_inpaint_sd, mode):
    init, mask = make_image(32, 32, 4), make_mask(32, 32)
    run = {
        "txt2img": lambda **kw: tiny_sd.txt2img(PROMPT, width=32, height=32, sampler="euler_a", steps=3, **kw),
        "img2img": lambda **kw: tiny_sd.img2img(PROMPT, init, sampler="euler_a", steps=4, strength=0.5, **kw),
        "inpaint": lambda **kw: tiny_inpaint_sd.inpaint(PROMPT, init, mask, sampler="euler_a", steps=3, **kw),
    }[mode]
    batch = run(seed=100, batch_size=3)
    single = run(seed=102)
    assert [p["seed"] for p in batch.params] == [100, 101, 102]
    assert_close(batch.latents[2:], single.latents, rel=1e-5, what=f"{mode} batch[2] vs seed+2 alone")


def test_green_mask_equals_white_mask(tiny_inpaint_sd):
    init = np.asarray(make_image(32, 32, 3)).copy()
    init[8:20, 10:30] = (0, 255, 0)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 10:30] = 255
    a = tiny_inpaint_sd.inpaint("", Image.fromarray(init), green_mask=True, steps=2, seed=1, sampler="ddim")
    b = tiny_inpaint_sd.inpaint("", Image.fromarray(init), Image.fromarray(mask), steps=2, seed=1, sampler="ddim")
    assert torch.equal(a.latents, b.latents)


# ------------------------------------------------------------------ full SD v1.5 architecture


@pytest.fixture(scope="module")
def full_sd(full):
    return StableDiffusion(full.folder)


@pytest.mark.full
def test_full_txt2img_256(full, full_sd):
    from diffusers import StableDiffusionPipeline

    ref_lat, ref_img = reference(StableDiffusionPipeline, full, "plms", seeds=(1234,), prompt=PROMPT,
                                 negative_prompt=NEG, height=256, width=256, num_inference_steps=3,
                                 guidance_scale=7.5)
    res = full_sd.txt2img(PROMPT, NEG, width=256, height=256, steps=3, sampler="plms", seed=1234)
    compare(res, ref_lat, ref_img, "full txt2img plms 256x256 3 steps")


@pytest.mark.full
def test_full_img2img_256(full, full_sd):
    from diffusers import StableDiffusionImg2ImgPipeline

    init = make_image(256, 256, 5)
    ref_lat, ref_img = reference(StableDiffusionImg2ImgPipeline, full, "ddim", seeds=(99,), prompt=PROMPT,
                                 image=init, strength=0.75, num_inference_steps=4, guidance_scale=7.5)
    res = full_sd.img2img(PROMPT, init, strength=0.75, steps=4, sampler="ddim", seed=99)
    compare(res, ref_lat, ref_img, "full img2img ddim 256x256 3 of 4 steps")


@pytest.mark.full
def test_full_inpaint_256(full, full_sd):
    from diffusers import StableDiffusionInpaintPipeline

    init, mask = make_image(256, 256, 6), make_mask(256, 256)
    ref_lat, ref_img = reference(StableDiffusionInpaintPipeline, full, "euler", seeds=(5,), prompt=PROMPT,
                                 image=init, mask_image=mask, height=256, width=256, num_inference_steps=3,
                                 guidance_scale=7.5)
    res = full_sd.inpaint(PROMPT, init, mask, steps=3, sampler="euler", seed=5)
    compare(res, ref_lat, ref_img, "full inpaint (4-channel) euler 256x256 3 steps")


# ------------------------------------------------------------------ bad input


def test_bad_sizes_steps_strength_and_images(tiny_sd, tmp_path):
    with pytest.raises(InputError, match="width 50 is not a multiple of 8"):
        tiny_sd.txt2img(PROMPT, width=50, height=32, steps=1)
    for steps in (0, -3):
        with pytest.raises(InputError, match="steps"):
            tiny_sd.txt2img(PROMPT, width=32, height=32, steps=steps)
    for strength in (0, -0.5, 1.5):
        with pytest.raises(InputError, match="strength"):
            tiny_sd.img2img(PROMPT, make_image(), strength=strength, steps=4)
    with pytest.raises(InputError, match="runs no step"):
        tiny_sd.img2img(PROMPT, make_image(), strength=0.1, steps=4)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InputError, match="cannot read it as an image"):
        tiny_sd.img2img(PROMPT, bad, steps=2)
    with pytest.raises(InputError, match="no such file"):
        tiny_sd.img2img(PROMPT, tmp_path / "missing.png", steps=2)
    with pytest.raises(InputError, match="unknown sampler 'k_lms'.*plms"):
        tiny_sd.txt2img(PROMPT, width=32, height=32, sampler="k_lms")
    with pytest.raises(InputError, match="mask"):
        tiny_sd.inpaint(PROMPT, make_image())
    with pytest.raises(InputError, match="no pure green"):
        tiny_sd.inpaint(PROMPT, make_image(), green_mask=True)


def test_guidance_below_one_follows_the_compvis_rule(tiny_sd):
    """uncond + 0 * (cond - uncond) = the negative prompt's prediction: CFG 0 with negative N
    gives the image of prompt N without guidance (diffusers would drop guidance instead)."""
    kw = dict(width=32, height=32, steps=3, sampler="euler", seed=5)
    zero = tiny_sd.txt2img(PROMPT, "a red square", guidance_scale=0.0, **kw)
    negative_alone = tiny_sd.txt2img("a red square", guidance_scale=1.0, **kw)
    prompt_alone = tiny_sd.txt2img(PROMPT, guidance_scale=1.0, **kw)
    assert_close(zero.latents, negative_alone.latents, rel=1e-5, what="CFG 0 vs the negative prompt alone")
    assert (zero.latents - prompt_alone.latents).abs().max() > 1e-2  # not the prompt's image


def test_bad_prompts_options_and_image_types_are_clear_errors(tiny_sd):
    """Wrong types get one-line InputErrors before any work, not a TypeError from deep inside,
    and options a sampler would ignore are refused rather than silently dropped."""
    import numpy as np

    for kw, msg in ((dict(prompt=None), "prompt must be a string or a non-empty list of strings, got None"),
                    (dict(prompt=123), "prompt must be .* got 123"), (dict(prompt=[]), "prompt must be"),
                    (dict(prompt=["a", 2]), "prompt must be"),
                    (dict(negative_prompt=5), "negative prompt must be None, a string or"),
                    (dict(prompt=["a", "b"], batch_size=3), "batch_size applies to one prompt string"),
                    (dict(sampler="euler", eta=0.5), "eta applies to the ddim and euler_a samplers, not 'euler'"),
                    (dict(sampler="plms", eta=0.0), "eta applies"),
                    (dict(karras="no"), "karras must be True or False"),
                    (dict(guidance_scale=True), "guidance scale must be a finite number")):
        kw = {"prompt": PROMPT, **kw}
        with pytest.raises(InputError, match=msg):
            tiny_sd.txt2img(kw.pop("prompt"), width=32, height=32, steps=1, **kw)
    with pytest.raises(InputError, match="strength must be in"):
        tiny_sd.img2img(PROMPT, make_image(), strength=True, steps=2)
    array = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="init image must be a PIL image or a file path, got ndarray"):
        tiny_sd.img2img(PROMPT, array, steps=2)
    with pytest.raises(InputError, match="mask image must be a PIL image or a file path, got Tensor"):
        tiny_sd.inpaint(PROMPT, make_image(), torch.zeros(32, 32), steps=2)
    # what the checks let through still works: a tuple of prompts, eta where it applies
    res = tiny_sd.txt2img(("a", "b"), ("c", "d"), width=32, height=32, steps=1, sampler="ddim", eta=0.5)
    assert [p["prompt"] for p in res.params] == ["a", "b"] and res.params[0]["eta"] == 0.5


def test_params_record_the_options_that_change_the_image(tiny, tiny_sd):
    run = dict(width=32, height=32, steps=1, seed=2)
    p = tiny_sd.txt2img(PROMPT, **run).params[0]
    assert (p["dtype"], p["quantize"], p["fast"], p["ema"], p["vae"]) == ("float32", "none", False, False, None)
    p = StableDiffusion(tiny.folder, quantize="int8", ema=False).txt2img(PROMPT, **run).params[0]
    assert (p["dtype"], p["quantize"], p["fast"]) == ("float32", "int8", False)


def test_bad_device_and_dtype_are_clear_errors(tiny):
    for kw, msg in ((dict(device="gpu"), "unknown device 'gpu'"), (dict(device=3.5), "unknown device 3.5"),
                    (dict(dtype="float16"), "dtype must be torch.float32, torch.float16 or torch.bfloat16"),
                    (dict(dtype=torch.int8), "dtype must be")):
        with pytest.raises(InputError, match=msg):
            StableDiffusion(tiny.folder, **kw)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device 'cuda': CUDA is not available"):
            StableDiffusion(tiny.folder, device="cuda")


def test_inpainting_checkpoint_refuses_txt2img(tiny_inpaint_sd):
    with pytest.raises(InputError, match="inpainting checkpoint"):
        tiny_inpaint_sd.txt2img(PROMPT, width=32, height=32, steps=1)


def test_mask_of_another_size_is_resized(tiny_inpaint_sd):
    init = make_image(32, 32, 7)
    small = make_mask(32, 32).resize((16, 16), Image.NEAREST)
    a = tiny_inpaint_sd.inpaint(PROMPT, init, small, steps=2, seed=3, sampler="ddim")
    b = tiny_inpaint_sd.inpaint(PROMPT, init, small.resize((32, 32), Image.LANCZOS), steps=2, seed=3, sampler="ddim")
    assert torch.equal(a.latents, b.latents)


def test_any_image_mode_and_odd_size_init_image(tiny_sd):
    init = make_image(37, 29).convert("P")  # palette mode, not a multiple of 8
    res = tiny_sd.img2img(PROMPT, init, steps=2, strength=1.0, seed=1)
    assert res.images[0].size == (32, 24) and res.images[0].mode == "RGB"


def test_init_image_files_are_read_upright_and_16_bit_scaled(tiny_sd, tmp_path):
    """A phone photo's EXIF orientation is applied (as diffusers' load_image does), and 16-bit
    greyscale PNGs are scaled to 8 bits, not clipped to white by PIL's conversion."""
    from sdlite import images as imgs

    photo = Image.new("RGB", (80, 48), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    photo.save(tmp_path / "phone.jpg", exif=exif)
    assert imgs.load_image(tmp_path / "phone.jpg").size == (48, 80)
    res = tiny_sd.img2img(PROMPT, tmp_path / "phone.jpg", steps=2, strength=1.0, seed=1)
    assert res.images[0].size == (48, 80)

    ramp = (np.arange(64 * 8, dtype=np.uint16).reshape(8, 64) * 128)  # 0 .. 65408
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    g16 = imgs.load_image(tmp_path / "g16.png")
    assert g16.mode.startswith("I")
    got = imgs.to_tensor(g16)[0, 0]
    want = torch.from_numpy(np.round(ramp / 257.0).astype(np.float32)) / 255.0 * 2 - 1
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    eight_in_i = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), mode="I")  # 8-bit values in mode I
    assert np.asarray(imgs.eight_bit(eight_in_i)).tolist() == [[0, 100, 255]]
    mask = imgs.mask_to_tensor(g16, 64, 8)[0, 0]
    assert torch.equal(mask, torch.from_numpy((np.round(ramp / 257.0) / 255.0 >= 0.5).astype(np.float32)))


def test_nan_latents_are_an_error_not_a_black_image(tiny_sd, monkeypatch):
    from sdlite.errors import SdliteError

    monkeypatch.setattr(tiny_sd, "denoise", lambda *a, **k: torch.full((1, 4, 16, 16), float("nan")))
    with pytest.raises(SdliteError, match="NaN"):
        tiny_sd.txt2img(PROMPT, width=32, height=32, steps=1)


def test_half_precision_vae_nan_is_retried_in_float32(tiny, monkeypatch):
    from sdlite import precision

    monkeypatch.setattr(precision, "cpu_slowdown", lambda dtype: 1.0)  # compute in bf16 even if emulated
    sd = StableDiffusion(tiny.folder, dtype=torch.bfloat16)
    assert sd.dtype == torch.bfloat16
    real_decode = sd.vae.decode

    def flaky(z):  # what a broken fp16 VAE does: overflow to inf/NaN in half precision only
        out = real_decode(z)
        return out * float("nan") if z.dtype != torch.float32 else out

    sd.vae.decode = flaky
    with pytest.warns(UserWarning, match="retrying in float32"):
        res = sd.txt2img(PROMPT, width=32, height=32, steps=2, seed=1, sampler="euler")
    assert np.isfinite(np.asarray(res.images[0], dtype=float)).all()


def test_too_many_ddim_steps_is_a_clear_error(tiny_sd):
    with pytest.raises(InputError, match="at most 999"):
        tiny_sd.txt2img(PROMPT, width=32, height=32, steps=1000, sampler="ddim")


def test_bad_seed_batch_and_clip_skip_are_clear_errors(tiny_sd):
    for kw, msg in ((dict(seed=2**64), "seed"), (dict(seed=True), "seed"), (dict(seed=2**64 - 1, batch_size=2), "seed"),
                    (dict(batch_size=0), "batch size"), (dict(batch_size=2.0), "batch size"),
                    (dict(clip_skip=1.5), "clip_skip"), (dict(clip_skip=0), "clip_skip"), (dict(clip_skip=4), "clip_skip")):
        with pytest.raises(InputError, match=msg):
            tiny_sd.txt2img(PROMPT, width=32, height=32, steps=1, **kw)


# ------------------------------------------------------------------ review fixes (stop 17)


def test_replaced_model_lasts_in_low_memory_mode_and_waits_outside_its_stage(tiny):
    kw = dict(width=32, height=32, steps=2, sampler="euler", seed=4)
    normal = StableDiffusion(tiny.folder)
    low = StableDiffusion(tiny.folder, memory="low")
    for sd in (normal, low):
        vae = sd.prepare("vae", sd.load_component("vae"))
        with torch.no_grad():
            vae.decoder.conv_out.bias.add_(0.5)  # a visibly different VAE
        sd.replace("vae", vae)
    assert low.resident_components() == []  # not resident until its stage
    first, second = low.txt2img(PROMPT, **kw), low.txt2img(PROMPT, **kw)
    want = normal.txt2img(PROMPT, **kw)
    plain = StableDiffusion(tiny.folder, memory="low").txt2img(PROMPT, **kw)
    for res in (first, second):
        assert np.array_equal(np.asarray(res.images[0]), np.asarray(want.images[0]))
    assert not np.array_equal(np.asarray(second.images[0]), np.asarray(plain.images[0]))
    with pytest.raises(InputError, match="unknown component 'bogus'; components: text, unet, vae"):
        low.resident("bogus")
    with pytest.raises(InputError, match="unknown component"):
        normal.done_with("bogus")
    with pytest.raises(InputError, match="unknown part 'middle' of 'vae' .*encoder, decoder"):
        normal.resident("vae", "middle")


def test_low_memory_frees_the_model_even_when_the_exception_is_kept(tiny, monkeypatch):
    """A notebook keeps the last exception (sys.last_exc): its traceback must not keep the
    low-mode UNet or VAE alive beside the next stage's model."""
    import gc
    import weakref

    from sdlite import pipeline

    sd = StableDiffusion(tiny.folder, memory="low")
    models = []
    load = sd.load_component

    def tracked(component):
        model = load(component)
        models.append(weakref.ref(model))
        return model

    sd.load_component = tracked

    def stop(step, total, x):
        raise KeyboardInterrupt

    kept = []
    try:
        sd.txt2img(PROMPT, width=32, height=32, steps=3, callback=stop)
    except KeyboardInterrupt as e:
        kept.append(e)
    real_decode = pipeline.tiling.decode

    def failing_decode(vae, z, *args, **kwargs):
        real_decode(vae, z, *args, **kwargs)
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(pipeline.tiling, "decode", failing_decode)
    try:
        sd.txt2img(PROMPT, width=32, height=32, steps=1)
    except RuntimeError as e:
        kept.append(e)
    gc.collect()
    assert len(kept) == 2 and len(models) >= 4  # text, unet; text, unet, vae
    assert [m() for m in models] == [None] * len(models)
    assert sd.resident_components() == []


def test_reduced_precision_measurements_never_overlap(monkeypatch):
    """cpu_slowdown sets the process's thread count while it measures: two threads measuring
    at once could leave it at 1. One measurement runs at a time."""
    import threading
    import time

    from sdlite import precision

    running, most = [0], [0]

    def measure(dtype):
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.05)
        running[0] -= 1
        return 1.0

    precision.cpu_slowdown.cache_clear()
    monkeypatch.setattr(precision, "_measure_slowdown", measure)
    try:
        threads = [threading.Thread(target=precision.cpu_slowdown, args=(dt,)) for dt in (torch.float16, torch.bfloat16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        precision.cpu_slowdown.cache_clear()
    assert most[0] == 1


def test_web_ui_prompt_syntax_warns(tiny_sd):
    run = dict(width=32, height=32, steps=1, seed=4)
    with pytest.warns(UserWarning, match=r"prompt has web-UI syntax .*'\(red:1\.2\)'"):
        tiny_sd.txt2img("a (red:1.2) house", **run)
    with pytest.warns(UserWarning, match=r"negative prompt has web-UI syntax .*<lora:x:0\.8>"):
        tiny_sd.txt2img("a house", "<lora:x:0.8>", **run)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ordinary brackets are not flagged
        tiny_sd.txt2img("a cat (oil painting), ratio (16:9)", **run)
