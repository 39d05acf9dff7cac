"""sdlite's AutoencoderKL against diffusers' AutoencoderKL, run here on the same random weights."""

from __future__ import annotations

import math

import pytest
import torch

from sdlite import keymap
from sdlite.config import SD_V1, TINY, VAEConfig
from sdlite.vae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with seeded random values (no zeros, no ones left anywhere).

    Weights get std 1/sqrt(fan_in); 1-D `weight`s (norm scales) scatter around 1; biases are
    small and nonzero. A mis-mapped or unloaded key then changes the output by O(1).
    """
    gen = torch.Generator("cpu").manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim >= 2:
            value = noise / math.sqrt(p[0].numel())
        elif name.endswith("weight"):
            value = 1.0 + 0.2 * noise
        else:
            value = 0.1 * noise
        p.copy_(value)
    return module


def diffusers_vae_meta(cfg: VAEConfig) -> torch.nn.Module:
    """A diffusers AutoencoderKL with the architecture of `cfg`, on the meta device."""
    levels = len(cfg.ch_mult)
    with torch.device("meta"):
        return diffusers.AutoencoderKL(
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            layers_per_block=cfg.num_res_blocks,
            latent_channels=cfg.z_channels,
            norm_num_groups=cfg.norm_groups,
            sample_size=64,
            scaling_factor=cfg.scale_factor,
        )


def diffusers_vae(cfg: VAEConfig, seed: int = 0) -> torch.nn.Module:
    """A diffusers AutoencoderKL with the architecture of `cfg` and seeded random weights."""
    ref = diffusers_vae_meta(cfg).to_empty(device="cpu")  # skips diffusers' own (discarded) init
    assert list(ref.buffers()) == [], "randomize_ only fills parameters"
    return randomize_(ref, seed).eval()


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
