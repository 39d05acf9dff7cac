"""The SD v1 UNet (CompVis `openaimodel.UNetModel` with `SpatialTransformer`s).

Attribute names and index positions mirror the CompVis `model.diffusion_model.*` keys.
Parameter-less CompVis layers (SiLU, Dropout) keep their index slots so that keys such as
`out_layers.3.weight` line up.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (B,) timesteps -> (B, dim), as CompVis."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, out_channels: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Identity(),  # Identity = CompVis dropout slot
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Identity())  # Identity = dropout slot

    def split(self, y: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, heads, T, d)
        b, t, c = y.shape
        return y.view(b, t, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.split(self.to_q(x)), self.split(self.to_k(context)), self.split(self.to_v(context))
        out = attention(q, k, v)  # (B, heads, T, d)
        b, _, t, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, t, -1))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)  # self-attention
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)  # attends to the text
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = paired(x, context.shape[0])  # from here on, one row per context
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, cfg.context_dim, cfg.num_heads) for _ in range(cfg.transformer_depth)
        )
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.flatten(2).transpose(1, 2)  # (B, H*W, C)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = y.transpose(1, 2).reshape(y.shape[0], c, h, w)  # y may have k times x's batch (see paired)
        return paired(x, y.shape[0]) + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # Upsample to the skip connection's size, not a fixed x2: latents whose sides are not
        # multiples of 8 (e.g. 520x776 images) then still line up, as in diffusers.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Step(nn.ModuleList):
    """CompVis `TimestepEmbedSequential`: each layer gets what it needs."""

    def forward(self, x, emb, context, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, paired(emb, x.shape[0]))
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def paired(x: torch.Tensor, batch: int) -> torch.Tensor:
    """x for a batch of `batch` rows: x itself, or x repeated k times when `batch` is k times x's,
    i.e. when each latent is paired with k contexts (see UNetModel). torch.cat keeps a
    channels_last x channels_last (repeat would not, and the next layers would copy it back)."""
    return x if x.shape[0] == batch else torch.cat([x] * (batch // x.shape[0]))


class UNetModel(nn.Module):
    """eps-prediction UNet: (x (B,C,h,w), t (B,) or (), context (k*B,77,768)) -> eps (k*B,4,h,w).

    k = 1: one context per latent. k > 1: k contexts per latent, ordered as k groups of B
    (classifier-free guidance's [uncond, cond]: k = 2), and the result is what x repeated k
    times would give. The layers before the first cross-attention (the input
    convolution, the first ResBlock, the first self-attention) do not read the context, so they
    run once per latent instead of once per pair; the first cross-attention widens the batch.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, emb_dim, groups = cfg.model_channels, cfg.time_embed_dim, cfg.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks = nn.ModuleList([Step([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        skips = [ch]  # channels of each skip connection, in push order
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, cfg.model_channels * mult, emb_dim, groups)]
                ch = cfg.model_channels * mult
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg))
                self.input_blocks.append(Step(layers))
                skips.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.input_blocks.append(Step([Downsample(ch)]))
                skips.append(ch)
        self.middle_block = Step([ResBlock(ch, ch, emb_dim, groups), SpatialTransformer(ch, cfg),
                                  ResBlock(ch, ch, emb_dim, groups)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), cfg.model_channels * mult, emb_dim, groups)]
                ch = cfg.model_channels * mult
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Step(layers))
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0 or t.shape[0] == 1:
            t = t.reshape(1).expand(x.shape[0])
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"timestep batch {t.shape[0]} is neither 1 nor the latents' {x.shape[0]}")
        if context.shape[0] % x.shape[0]:  # paired() relies on this
            raise ValueError(f"context batch {context.shape[0]} is not a multiple of the latents' {x.shape[0]}")
        emb = self.time_embedding(t, x.dtype)
        skips = []
        for block in self.input_blocks:
            x = block(x, emb, context)
            skips.append(x)
        x = self.middle_block(x, emb, context)
        for block in self.output_blocks:
            x = torch.cat([x, paired(skips.pop(), x.shape[0])], dim=1)
            x = block(x, emb, context, size=skips[-1].shape[-2:] if skips else None)
        return paired(self.out(x), context.shape[0])
