"""Exact low-memory VAE decode (and encode): the full-resolution levels run in bands of rows.

The plain SD decoder at 512x512 holds, at its peak, the 256-channel input of the full-resolution
level, that input's GroupNorm output and two 128-channel maps: 640 MiB of float32 activations
(counted op by op) for a 3 MiB image. Tiling cuts that but changes the result (GroupNorm
statistics and the mid-block attention become per tile). Streaming changes nothing: every
activation of the upsampling levels is held as a list of row bands, and each layer computes its
output band by band from the input rows it needs (a 3x3 convolution needs one row above and
one below):

- GroupNorm needs statistics of the whole map: per-channel sums (of x minus a per-channel
  shift, and of its square) are gathered band by band first, then each band is normalised as
  `x * a + b` with per-channel `a`, `b` (the fused form GroupNorm computes too), SiLU is applied
  in place and the convolution runs on it.
- Input bands are freed as soon as no later output band needs them, so a layer's input shrinks
  while its output grows: 327 MiB at 512x512 instead of 640 (tests/test_streaming.py counts it).
- The layers themselves are called as they are (plain, packed-kernel, int8 or cast-dtype
  modules alike) on slabs of `rows + 2` rows with zero rows at the image edges; the two
  boundary output rows are dropped. Each output element is the same sum as in the full
  convolution, so the result equals the plain decode within float rounding (3.3e-6 max abs
  diff at 512x512 in float32), and it is no slower (CPU: about 5 % faster, the bands stay in
  cache).

The mid block (attention over all pixels) runs whole: its maps are 64x smaller. `encode` does
the same for the encoder's downsampling levels (conv_in, resnets, the stride-2 convolutions):
314 instead of 512 MiB at 512x512 (a resnet block must keep its input for the residual add
while its first convolution's output is made, so two full maps remain).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import conv_inner_rows

# Stream when the largest activation of a decode would exceed this (bytes); below it the
# ordinary decode is used unchanged. 64 MiB: SD at 512x512 streams in float32 and float16.
STREAM_ABOVE_BYTES = 64 * 2**20
# Target size of one band of a layer's input (bytes). Smaller bands lower the peak but recompute
# two rows each; 16 MiB was the fastest of 4-64 MiB for SD at 512x512 on a 2-core CPU with the
# packed kernels (7.6-7.8 s per decode; 32 MiB 7.9-8.5 s; 4 MiB 8.4-8.7 s; plain decode 8.1-8.3 s).
BAND_BYTES = 16 * 2**20
# The same on a GPU, where the bands need not fit a cache and each halving of the band size saves
# part of the peak (SD 512x512 float16: 179 MiB of activations with 16 MiB bands, 165 with 8).
DEVICE_BAND_BYTES = 8 * 2**20
# Rows of float32 at a time when GroupNorm statistics are gathered (see _group_norm_affine).
STATS_BYTES = 4 * 2**20


class Banded:
    """A (N, C, H, W) map held as row bands; bands can be freed from the top down."""

    def __init__(self, bands: list[torch.Tensor]):
        self.bands: list[torch.Tensor | None] = bands
        self.starts = [0]
        for b in bands:
            self.starts.append(self.starts[-1] + b.shape[2])
        first = bands[0]
        self.shape = (first.shape[0], first.shape[1], self.starts[-1], first.shape[3])
        self.dtype, self.device = first.dtype, first.device

    @classmethod
    def split(cls, x: torch.Tensor, rows: int) -> "Banded":
        return cls(list(x.split(rows, dim=2)))

    @property
    def height(self) -> int:
        return self.shape[2]

    def parts(self, lo: int, hi: int) -> list[torch.Tensor]:
        """Rows [lo, hi) as views of the bands that hold them, top to bottom."""
        out = []
        for i, band in enumerate(self.bands):
            s, e = self.starts[i], self.starts[i + 1]
            if e <= lo or s >= hi:
                continue
            if band is None:
                raise RuntimeError(f"rows {lo}..{hi} were already freed")
            out.append(band[:, :, max(lo, s) - s : min(hi, e) - s])
        return out

    def slab(self, lo: int, hi: int, fill=None) -> torch.Tensor:
        """Rows [lo - 1, hi + 1) in one new tensor, with zero rows where they fall outside the
        map (a 3x3 conv's padding); fill(part, out) writes a transformed part (default: copy)."""
        n, c, height, w = self.shape
        parts = self.parts(max(lo - 1, 0), min(hi + 1, height))
        # the layout of the bands (oneDNN's packed convolutions give channels-last maps)
        nhwc = c > 1 and parts[0].stride(1) == 1
        out = torch.empty(n, c, hi - lo + 2, w, dtype=self.dtype, device=self.device,
                          memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        row = 0
        if lo == 0:
            out[:, :, 0].zero_()
            row = 1
        for part in parts:
            dst = out[:, :, row : row + part.shape[2]]
            fill(part, dst) if fill is not None else dst.copy_(part)
            row += part.shape[2]
        if hi == height:
            out[:, :, row].zero_()
        return out

    def free_below(self, row: int, on_free=None) -> None:
        """Drop every band that lies entirely above `row` (rows < row are no longer needed),
        calling on_free(band) on each first."""
        for i, band in enumerate(self.bands):
            if band is not None and self.starts[i + 1] <= row:
                if on_free is not None:
                    on_free(band)
                self.bands[i] = None

    def whole(self) -> torch.Tensor:
        return torch.cat(self.parts(0, self.height), dim=2)


# ---------------------------------------------------------------------------- decode


def needs_streaming(vae, z: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the decode of latents `z` has an activation above STREAM_ABOVE_BYTES."""
    cfg = vae.cfg
    widths = [cfg.ch * m for m in cfg.ch_mult]
    f = cfg.downscale
    n, _, h, w = z.shape
    # the largest map: the input of the full-resolution level (the width of the level below it)
    return _bytes(n, max(widths[:2]), h * f, w * f, dtype) > STREAM_ABOVE_BYTES


def _bytes(n: int, c: int, h: int, w: int, dtype: torch.dtype) -> int:
    return n * c * h * w * torch.finfo(dtype).bits // 8


@torch.no_grad()
def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z)` with the upsampling levels computed band by band: the same values
    (within float rounding), a fraction of the memory. Small decodes run `vae.decode` as is."""
    if not needs_streaming(vae, z, z.dtype):
        return vae.decode(z)
    dec = vae.decoder
    h = dec.conv_in(vae.post_quant_conv(z))
    for layer in dec.mid.layers():
        h = layer(h)
    x = Banded.split(h, _band_rows(h))
    del h
    for level in reversed(dec.up):  # lowest resolution first
        for layer in level.layers():
            x = _resnet(layer, x) if hasattr(layer, "norm1") else _upsample(layer, x)
    return _norm_act_conv(x, dec.norm_out, dec.conv_out, consume=True).whole()


@torch.no_grad()
def encode(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`vae.encode(x)` (images -> posterior mean, logvar) with the downsampling levels computed
    band by band; small images run `vae.encode` as is."""
    enc = vae.encoder
    n, _, h, w = x.shape
    width = vae.cfg.ch * vae.cfg.ch_mult[0]  # conv_in's output channels: the largest map
    if _bytes(n, width, h, w, x.dtype) <= STREAM_ABOVE_BYTES:
        return vae.encode(x)
    # bands sized for conv_in's output (128 channels in SD), not for the 3-channel image
    y = _norm_act_conv(Banded.split(x, _band_rows(x, width)), None, enc.conv_in, consume=True)
    for level in enc.down:
        for layer in level.layers():
            y = _resnet(layer, y) if hasattr(layer, "norm1") else _downsample(layer, y)
    features = y.whole()
    del y
    for layer in enc.mid.layers():
        features = layer(features)
    return vae.posterior(enc.conv_out(F.silu(enc.norm_out(features), inplace=True)))


def _band_rows(x: torch.Tensor | Banded, channels: int | None = None) -> int:
    """Rows per band for a map (with `channels` instead of its own, for a layer's output): the
    whole height when it is small, else the height halved until one band is at most BAND_BYTES
    (DEVICE_BAND_BYTES off the CPU; at least 8 rows)."""
    n, c, h, w = x.shape
    size = _bytes(n, channels or c, h, w, x.dtype)
    rows = h
    limit = BAND_BYTES if x.device.type == "cpu" else DEVICE_BAND_BYTES
    while size * rows / h > limit and rows % 2 == 0 and rows // 2 >= 8:
        rows //= 2
    return rows


def _float32_rows(x: Banded) -> int:
    """Rows of x that take STATS_BYTES in float32 (at least one)."""
    n, c, _, w = x.shape
    return max(1, STATS_BYTES // _bytes(n, c, 1, w, torch.float32))


def _resnet(block: nn.Module, x: Banded) -> Banded:
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))) with the 1x1 shortcut when widths differ."""
    shortcut = getattr(block, "nin_shortcut", None)
    if shortcut is None:
        h = _norm_act_conv(x, block.norm1, block.conv1)
        s = x
    else:
        s_bands: list[torch.Tensor] = []
        h = _norm_act_conv(x, block.norm1, block.conv1, consume=True,
                           on_consumed=lambda band: s_bands.append(shortcut(band)))
        s = Banded(s_bands)
    return _norm_act_conv(h, block.norm2, block.conv2, consume=True, residual=s)


def _norm_act_conv(x: Banded, norm: nn.GroupNorm | None, conv: nn.Module, *, consume: bool = False,
                   on_consumed=None, residual: Banded | None = None) -> Banded:
    """conv(silu(norm(x))) [+ residual], band by band; conv(x) when norm is None.

    consume: free x's bands once used (on_consumed(band) is called on each first); residual is
    added to each output band in place and freed as it goes.
    """
    a, b = _group_norm_affine(x, norm) if norm is not None else (None, None)
    height = x.height
    rows = _band_rows(x, max(x.shape[1], getattr(conv, "out_channels", 0)))  # the larger of input and output
    out = []
    step = _float32_rows(x)

    def normalize(part: torch.Tensor, dst: torch.Tensor) -> None:
        if dst.dtype == a.dtype:
            torch.addcmul(b, part, a, out=dst)
        else:  # reduced precision: normalise in float32, round once, as GroupNorm does (in pieces:
            # float32 copies of a whole band would add 4x a band to the peak)
            for p, d in zip(part.split(step, dim=2), dst.split(step, dim=2)):
                d.copy_(torch.addcmul(b, p.to(a.dtype), a))

    for lo in range(0, height, rows):
        hi = min(lo + rows, height)
        if norm is None:
            slab = x.slab(lo, hi)
        else:
            slab = x.slab(lo, hi, normalize)
            F.silu(slab, inplace=True)
        y = conv_inner_rows(conv, slab)
        del slab
        if residual is not None:
            row = 0
            for part in residual.parts(lo, hi):  # y + r == r + y exactly (IEEE addition commutes)
                y[:, :, row : row + part.shape[2]].add_(part)
                row += part.shape[2]
            residual.free_below(hi)
        out.append(y)
        if consume:
            x.free_below(hi - 1, on_consumed)  # the next band's slab starts one row above it
    if consume:
        x.free_below(height, on_consumed)
    return Banded(out)


def _upsample(layer: nn.Module, x: Banded) -> Banded:
    """Nearest x2 + 3x3 conv, band by band: output rows [2lo, 2hi) need input rows [lo-1, hi+1)."""
    height = x.height
    rows = max(1, _band_rows(x) // 4)  # an output band is twice as tall and as wide as its input rows
    out = []
    for lo in range(0, height, rows):
        hi = min(lo + rows, height)
        slab = x.slab(lo, hi)
        out.append(layer(slab)[:, :, 2:-2])
        del slab
        x.free_below(hi - 1)
    return Banded(out)


def _downsample(layer: nn.Module, x: Banded) -> Banded:
    """CompVis' downsample (zero pad right and bottom by one, 3x3 conv with stride 2), band by
    band: output rows [lo, hi) read input rows [2lo, 2hi + 1), the last one possibly the pad."""
    height = x.height
    out_height = (height - 2) // 2 + 1
    rows = max(1, _band_rows(x) // 2)
    out = []
    for lo in range(0, out_height, rows):
        hi = min(lo + rows, out_height)
        parts = x.parts(2 * lo, min(2 * hi + 1, height))
        slab = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        out.append(layer.conv(F.pad(slab, (0, 1, 0, 2 * hi + 1 - min(2 * hi + 1, height)))))
        del slab, parts
        x.free_below(2 * hi)
    return Banded(out)


def _group_norm_affine(x: Banded, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(image, channel) a, b with norm(x) == x * a + b, from statistics over all bands
    (float32, or float64 for the merge), shaped (N, C, 1, 1)."""
    n, c = x.shape[0], x.shape[1]
    g = norm.num_groups
    # Per-channel sums of d = x - k and d^2, k a per-channel shift (the first band's mean): with
    # the mean taken out first, sum(d^2) - sum(d)^2 / n loses nothing to cancellation even when
    # the mean is large against the spread (plain float32 sums of x^2 would). float32 reductions
    # (pairwise sums) merged in float64 (on the CPU for MPS, which has no float64); the squares
    # go through one scratch band (float64 conversions, var_mean or vector_norm were 6-30x slower).
    # Taken STATS_BYTES of float32 rows at a time: a whole band's float32 copy and scratch would
    # add 4x a float16 band to the peak.
    merge = torch.device("cpu") if x.device.type == "mps" else x.device
    k = None
    s1 = s2 = 0
    scratch = None
    step = _float32_rows(x)
    for part in x.parts(0, x.height):
        for chunk in part.split(step, dim=2):
            chunk = chunk.float()  # a copy only in reduced precision
            if k is None:
                k = chunk.mean(dim=(2, 3), keepdim=True)
            if scratch is None or scratch.shape != chunk.shape:
                scratch = torch.empty_like(chunk)
            d = torch.sub(chunk, k, out=scratch)
            s1 = s1 + d.sum(dim=(2, 3)).to(merge, torch.float64)
            s2 = s2 + d.mul_(d).sum(dim=(2, 3)).to(merge, torch.float64)
            del chunk, d
    del scratch
    per = c // g
    count = x.height * x.shape[3]  # per channel
    mean_c = k.view(n, c).to(merge, torch.float64) + s1 / count
    m2_c = (s2 - s1.square() / count).clamp_min(0)  # sum of squared deviations from mean_c
    mean = mean_c.view(n, g, per).mean(-1)  # (N, G)
    m2 = m2_c.view(n, g, per).sum(-1) + count * (mean_c.view(n, g, per) - mean[..., None]).square().sum(-1)
    rstd = torch.rsqrt(m2 / (count * per) + norm.eps).float().to(x.device)
    mean = mean.float().to(x.device)
    weight = norm.weight.float() if norm.weight is not None else torch.ones(c, device=x.device)
    bias = norm.bias.float() if norm.bias is not None else torch.zeros(c, device=x.device)
    a = rstd.repeat_interleave(per, dim=1) * weight  # (N, C)
    b = bias - mean.repeat_interleave(per, dim=1) * a
    return a.view(n, c, 1, 1), b.view(n, c, 1, 1)
