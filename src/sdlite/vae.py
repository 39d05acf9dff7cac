"""The SD v1 autoencoder (AutoencoderKL): image <-> latent.

Parameter names are the CompVis `first_stage_model.*` keys without that prefix, so a CompVis
checkpoint loads by stripping it. The down/up levels have no attention (SD's attn_resolutions
is empty); only the middle of each half attends, with a single head over all pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import VAEConfig


def _norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _conv3(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _norm(groups, c_in)
        self.conv1 = _conv3(c_in, c_out)
        self.norm2 = _norm(groups, c_out)
        self.conv2 = _conv3(c_out, c_out)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_silu(self.norm1(x)))
        h = self.conv2(_silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


def _silu(x: torch.Tensor) -> torch.Tensor:
    # In place when no gradient is recorded: at full resolution one activation of the decoder
    # is 134-268 MB (512x512), and the norm's output is not needed once SiLU has read it.
    return F.silu(x, inplace=not torch.is_grad_enabled())


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs as in CompVis."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, HW, C)
            return t.reshape(b, 1, c, hgt * wid).transpose(-1, -2)

        q, k, v = tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h))
        del h
        h = attention(q, k, v)  # (B, 1, HW, C); scale 1/sqrt(C) like CompVis
        del q, k, v
        h = h.transpose(-1, -2).reshape(b, c, hgt, wid)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom only (CompVis' asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock, attention, ResnetBlock at the lowest resolution (`mid.*`)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def layers(self) -> tuple[nn.Module, ...]:
        return self.block_1, self.attn_1, self.block_2


class Level(nn.Module):
    """One resolution level: `block.{j}` ResnetBlocks, then an optional down/upsample.

    A container: the Encoder/Decoder run its `layers()` so they can drop activations early.
    """

    def __init__(self, c_in: int, c_out: int, n_blocks: int, groups: int, resample: type | None = None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(n_blocks))
        if resample is Downsample:
            self.downsample = Downsample(c_out)
        elif resample is Upsample:
            self.upsample = Upsample(c_out)

    def layers(self) -> list[nn.Module]:
        resample = [getattr(self, name) for name in ("downsample", "upsample") if hasattr(self, name)]
        return [*self.block, *resample]


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = _conv3(cfg.in_channels, cfg.ch)
        self.down = nn.ModuleList(
            Level(([cfg.ch] + widths)[i], widths[i], cfg.num_res_blocks, cfg.norm_groups,
                  Downsample if i < last else None)
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        self.norm_out = _norm(cfg.norm_groups, widths[-1])
        self.conv_out = _conv3(widths[-1], 2 * cfg.z_channels)  # double_z: mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        # Rebinding `h` layer by layer lets each layer's input go as soon as it is consumed.
        for level in self.down:
            for layer in level.layers():
                h = layer(h)
        for layer in self.mid.layers():
            h = layer(h)
        h = _silu(self.norm_out(h))
        return self.conv_out(h)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_channels, h*f, w*f).

    `up.{i}` is stored by resolution level (0 = full size) but run from the lowest level up,
    as in CompVis; each level has num_res_blocks + 1 ResnetBlocks.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = _conv3(cfg.z_channels, widths[-1])
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        self.up = nn.ModuleList(
            Level((widths + [widths[-1]])[i + 1], widths[i], cfg.num_res_blocks + 1, cfg.norm_groups,
                  Upsample if i > 0 else None)
            for i in range(len(widths))
        )
        self.norm_out = _norm(cfg.norm_groups, widths[0])
        self.conv_out = _conv3(widths[0], cfg.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for layer in self.mid.layers():
            h = layer(h)
        for level in reversed(self.up):  # lowest resolution first
            for layer in level.layers():
                h = layer(h)
        h = _silu(self.norm_out(h))
        return self.conv_out(h)


class AutoencoderKL(nn.Module):
    """The SD v1 VAE; `encode` gives the posterior's (mean, logvar), `decode` maps latents to images."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1], (B, 3, H, W) -> (mean, logvar), each (B, embed_dim, H/8, W/8).

        The latents the UNet sees are `cfg.scale_factor * (mean + exp(logvar/2) * noise)`.
        logvar is clamped to [-30, 20] as CompVis' DiagonalGaussianDistribution does.
        """
        return self.posterior(self.encoder(x))

    def posterior(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's output (B, 2*z_channels, h, w) -> (mean, logvar)."""
        moments = self.quant_conv(features)  # (B, 2*embed_dim, h, w)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, embed_dim, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
