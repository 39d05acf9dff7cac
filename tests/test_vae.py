"""sdlite's AutoencoderKL against diffusers' AutoencoderKL, run here on the same random weights."""

from __future__ import annotations

import pytest
import torch

from refmodels import diffusers_vae
from sdlite import keymap
from sdlite.config import SD_V1, TINY, VAEConfig
from sdlite.vae import AutoencoderKL


def diffusers_vae_meta(cfg: VAEConfig) -> torch.nn.Module:
    return diffusers_vae(cfg, meta=True)


def sdlite_vae(ref: torch.nn.Module, cfg: VAEConfig) -> AutoencoderKL:
    """sdlite's VAE built on meta and loaded (strict, assign) from the diffusers weights."""
    state, unknown = keymap.vae_from_diffusers(ref.state_dict(), cfg)
    assert unknown == [], f"keys the VAE table does not map: {unknown}"
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert diff <= 1e-4 * scale, f"{what}: max abs diff {diff:.3g} > 1e-4 x {scale:.3g}"
    print(f"{what}: max abs diff {diff:.3g} (max |ref| {scale:.3g})")
    return diff


def check_parity(cfg: VAEConfig, image_hw: tuple[int, int], seed: int) -> None:
    ref = diffusers_vae(cfg, seed)
    ours = sdlite_vae(ref, cfg)
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    h, w = image_hw
    x = torch.rand(2, cfg.in_channels, h, w, generator=gen) * 2 - 1  # images in [-1, 1]
    f = cfg.downscale
    z = torch.randn(2, cfg.embed_dim, h // f, w // f, generator=gen)
    with torch.inference_mode():
        post = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        assert_close(mean, post.mean, f"encode mean {h}x{w}")
        assert_close(logvar, post.logvar, f"encode logvar {h}x{w}")
        assert_close(ours.decode(z), ref.decode(z).sample, f"decode {h // f}x{w // f}")


@pytest.mark.parametrize("hw", [(16, 16), (24, 40)])
def test_tiny_matches_diffusers(hw):
    check_parity(TINY.vae, hw, seed=hw[1])


@pytest.mark.full
def test_sd_v1_matches_diffusers():
    check_parity(SD_V1.vae, (64, 64), seed=3)


@pytest.mark.parametrize("cfg", [TINY.vae, pytest.param(SD_V1.vae, marks=pytest.mark.full)], ids=["tiny", "sd_v1"])
def test_meta_key_set_matches_diffusers(cfg):
    ref = diffusers_vae_meta(cfg)
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
    state, unknown = keymap.vae_from_diffusers(ref.state_dict(), cfg)
    assert unknown == []
    native = ours.state_dict()
    assert set(native) == set(state), (
        f"missing in sdlite: {sorted(set(state) - set(native))}; extra in sdlite: {sorted(set(native) - set(state))}"
    )
    shapes = {k: (tuple(native[k].shape), tuple(v.shape)) for k, v in state.items() if native[k].shape != v.shape}
    assert shapes == {}, f"shape mismatches (sdlite, converted): {shapes}"
    assert all(p.is_meta for p in ours.parameters()) and list(ours.buffers()) == []
    assert not any(".attn." in k for k in native), "SD v1 VAE levels have no attention"


def test_logvar_is_clamped_like_the_reference():
    cfg = TINY.vae
    ref = diffusers_vae(cfg, seed=7)
    with torch.no_grad():  # blow up the logvar half of quant_conv's output channels
        ref.quant_conv.weight[cfg.embed_dim:] *= 1e4
        ref.quant_conv.bias[cfg.embed_dim:] *= 1e4
    ours = sdlite_vae(ref, cfg)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator("cpu").manual_seed(8)) * 2 - 1
    with torch.inference_mode():
        raw = ours.quant_conv(ours.encoder(x))[:, cfg.embed_dim:]
        assert raw.max() > 20 and raw.min() < -30, "the test must push logvar past both bounds"
        mean, logvar = ours.encode(x)
        ref_logvar = ref.encode(x).latent_dist.logvar
    lo, hi = logvar.min().item(), logvar.max().item()
    assert (lo, hi) == (-30.0, 20.0), f"logvar spans [{lo}, {hi}], expected the clamp [-30, 20]"
    assert torch.equal(logvar == 20.0, ref_logvar == 20.0)
    assert_close(logvar, ref_logvar, "clamped logvar")
    assert torch.equal(logvar, raw.clamp(-30.0, 20.0))
