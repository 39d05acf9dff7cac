"""Component parity: sdlite's CLIP text encoder, UNet and VAE, loaded from a diffusers folder on
disk, against the diffusers/transformers reference models they were saved from (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close
from sdlite.checkpoint import open_checkpoint
from sdlite.config import SD_V1, with_in_channels
from sdlite.keymap import unet_from_diffusers
from sdlite.tokenizer import get_tokenizer
from sdlite.unet import UNetModel

PROMPTS = ["a photograph of an astronaut riding a horse", "", "masterpiece, (best quality), oil on canvas " * 12]


def _final_norm(text_encoder):
    inner = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 vs 5 layout
    return inner.final_layer_norm


def check_text(ref, what: str) -> None:
    ck = open_checkpoint(ref.folder)
    ours = ck.load("text")
    ids = get_tokenizer()(PROMPTS)
    with torch.no_grad():
        out = ref.pipe.text_encoder(ids, output_hidden_states=True)
        assert_close(ours(ids), out.last_hidden_state, what=f"{what} text last_hidden_state")
        for skip in (2, 3):
            expect = _final_norm(ref.pipe.text_encoder)(out.hidden_states[-skip])
            assert_close(ours(ids, clip_skip=skip), expect, what=f"{what} text clip_skip={skip}")


def check_unet(ref_unet, ours, hw, what: str, batch: int = 2) -> None:
    cfg = ours.cfg
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, *hw, generator=g)
    ctx = torch.randn(batch, 77, cfg.context_dim, generator=g)
    for t in ([1, 999][:batch], [500] * batch, [261.5] * batch):
        tt = torch.tensor(t, dtype=torch.float32)
        with torch.no_grad():
            expect = ref_unet(x, tt, ctx).sample
            assert_close(ours(x, tt, ctx), expect, what=f"{what} unet {hw} t={t}")
    # guidance's call: each latent once with two contexts ([uncond, cond]) = the repeated batch
    pair = torch.cat([torch.randn(batch, 77, cfg.context_dim, generator=g), ctx])
    with torch.no_grad():
        expect = ref_unet(torch.cat([x, x]), torch.cat([tt, tt]), pair).sample
        assert_close(ours(x, tt, pair), expect, what=f"{what} unet {hw}, latents paired with two contexts")


def check_vae(ref, what: str, hw) -> None:
    vae = open_checkpoint(ref.folder).load("vae")
    g = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, *hw, generator=g) * 2 - 1
    z = torch.randn(2, 4, hw[0] // vae_down(ref), hw[1] // vae_down(ref), generator=g)
    with torch.no_grad():
        dist = ref.pipe.vae.encode(image).latent_dist
        mean, logvar = vae.encode(image)
        assert_close(mean, dist.mean, what=f"{what} vae encode mean")
        assert_close(logvar, dist.logvar, what=f"{what} vae encode logvar")
        assert_close(vae.decode(z), ref.pipe.vae.decode(z).sample, what=f"{what} vae decode")


def vae_down(ref) -> int:
    return ref.cfg.vae.downscale


def test_tiny_text_encoder(tiny):
    check_text(tiny, "tiny")


@pytest.mark.parametrize("hw", [(8, 8), (13, 9), (6, 10)])
def test_tiny_unet(tiny, hw):
    check_unet(tiny.pipe.unet, open_checkpoint(tiny.folder).load("unet"), hw, "tiny")


def test_unet_batch_rules(tiny):
    """t: one per latent, or one for all; context: a multiple of the latents' batch."""
    ours = open_checkpoint(tiny.folder).load("unet")
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, ours.cfg.context_dim, generator=g)
    with torch.no_grad():
        expect = ours(x, torch.tensor([300.0, 300.0]), ctx)
        assert_close(ours(x, torch.tensor([300.0]), ctx), expect, what="one t for both latents")
        assert_close(ours(x, torch.tensor(300.0), ctx), expect, what="scalar t")
        with pytest.raises(ValueError, match="timestep batch 4 is neither 1 nor the latents' 2"):
            ours(x, torch.full((4,), 300.0), torch.cat([ctx, ctx]))
        with pytest.raises(ValueError, match="context batch 3 is not a multiple of the latents' 2"):
            ours(x, torch.tensor([300.0, 300.0]), ctx[[0, 1, 0]])


def test_tiny_inpainting_unet(tiny_inpaint):
    ours = open_checkpoint(tiny_inpaint.folder).load("unet")
    assert ours.cfg.in_channels == 9
    check_unet(tiny_inpaint.pipe.unet, ours, (8, 12), "tiny 9-channel")


def test_tiny_vae(tiny):
    check_vae(tiny, "tiny", (16, 24))


@pytest.mark.full
def test_full_text_encoder(full):
    check_text(full, "full")


@pytest.mark.full
def test_full_unet(full):
    ours = open_checkpoint(full.folder).load("unet")
    check_unet(full.pipe.unet, ours, (32, 32), "full", batch=2)
    # 160x224 images: latents 20x28 -> 10x14 -> 5x7 -> 3x4, odd sizes on the way up.
    check_unet(full.pipe.unet, ours, (20, 28), "full", batch=1)


@pytest.mark.full
def test_full_models_through_exact_cpu_kernels_and_winograd(full, monkeypatch):
    """Exact mode's CPU path (packed oneDNN layers, transposed-conv upsampling, Winograd 3x3
    convolutions: here from 2048 pixels, so that the 32x32 latents of this test use it as
    64x64 ones do in a 512x512 image) against diffusers on the full SD v1.5 architecture."""
    from sdlite import kernels

    monkeypatch.setattr(kernels, "WINOGRAD_MIN_PIXELS", 2 * 32 * 32)
    shapes = []
    real = kernels.winograd_conv3x3
    monkeypatch.setattr(kernels, "winograd_conv3x3", lambda x, *a, **k: shapes.append(x.shape[1:]) or real(x, *a, **k))
    ours = kernels.cpu_speed_up(open_checkpoint(full.folder).load("unet"))
    check_unet(full.pipe.unet, ours, (32, 32), "full, exact CPU kernels", batch=2)
    assert (320, 32, 32) in shapes and (960, 32, 32) in shapes
    vae = kernels.cpu_speed_up(open_checkpoint(full.folder).load("vae"))
    g = torch.Generator().manual_seed(3)
    z, image = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    shapes.clear()
    with torch.inference_mode():
        assert_close(vae.decode(z), full.pipe.vae.decode(z).sample, what="full vae decode, exact CPU kernels")
        assert_close(vae.encode(image)[0], full.pipe.vae.encode(image).latent_dist.mean,
                     what="full vae encode mean, exact CPU kernels")
    assert (512, 32, 32) in shapes and (128, 64, 64) in shapes


@pytest.mark.full
def test_full_inpainting_unet(full_inpaint_unet):
    cfg = with_in_channels(SD_V1, 9).unet
    state, unknown = unet_from_diffusers(full_inpaint_unet.state_dict(), cfg)
    assert not unknown
    with torch.device("meta"):
        ours = UNetModel(cfg)
    ours.load_state_dict(state, strict=True, assign=True)
    check_unet(full_inpaint_unet, ours, (16, 16), "full 9-channel", batch=1)


@pytest.mark.full
def test_full_vae(full):
    check_vae(full, "full", (64, 64))


def test_unet_key_layout_is_compvis():
    """A few keys spelled out from the CompVis SD v1 checkpoint layout (not from our code)."""
    with torch.device("meta"):
        keys = set(UNetModel(SD_V1.unet).state_dict())
    for k in ("time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",
              "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.3.0.op.weight",
              "input_blocks.4.0.skip_connection.weight", "middle_block.1.proj_out.bias",
              "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
              "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight", "out.2.weight",
              "input_blocks.1.0.out_layers.3.weight", "input_blocks.1.0.emb_layers.1.weight"):
        assert k in keys, k
    assert len(keys) == 686  # SD v1 UNet tensor count in CompVis files
