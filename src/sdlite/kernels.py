"""Exact CPU speed-ups: the same arithmetic as eager PyTorch, less overhead and fewer FLOPs.

Swapped in from outside the model files (`cpu_speed_up(model)`), for float32 models on the CPU:

- **Pre-packed oneDNN weights.** Eager `conv2d` re-orders a convolution's weights into oneDNN's
  blocked layout on every call; for SD's 1280-channel convolutions on 8x8 or 16x16 latents that
  re-order costs as much as the convolution itself. `PackedConv2d` / `PackedLinear` re-order
  once and call oneDNN directly. oneDNN picks the layout for the input shape (packing without a
  shape was slower for some layers), so a convolution packs on its first call and again only
  when the input shape changes (a new image size).
- **Upsampling as a transposed convolution.** Nearest-neighbour x2 followed by a 3x3 convolution
  is, for each of the four output phases (row parity, column parity), a 2x2 convolution on the
  small input whose taps are sums of the 3x3 taps: together, a stride-2 transposed convolution
  with 4x4 taps. It costs 16 multiply-adds per small pixel and channel pair instead of 36: 2.25x
  fewer FLOPs for the UNet's three and the VAE decoder's three upsampling convolutions (28 % of
  a 512x512 decode's FLOPs), and the 4x upsampled input is never built.
- **3x3 convolutions by Winograd's F(4x4, 3x3)** (`winograd_conv3x3`), on large enough feature
  maps: each 6x6 input tile and each filter are transformed so that the 4x4 output tile costs 36
  multiplies per channel pair instead of 144 (4x fewer; 1.3-1.8x faster per layer here after
  the transforms, `benchmarks/winograd.py`). It is a different way of rounding the same sum, not an approximation: about 4e-6
  of the output's largest value here vs 2e-6 for oneDNN's direct convolution (both against
  float64), with interpolation points 0, 1, -1, 2, -1/2 (the standard 0, +-1, +-2 double that).
- **GEGLU as two linears**, the gate's with GELU fused on its output (`SplitGEGLU`).

Results equal the eager model's within float32 rounding (different summation order; about
1e-6 relative, a few 1e-6 with Winograd), which the parity tests check. The original weights
stay the module parameters (state dicts are unchanged), and every derived form (packed weights, taps) is made on first use
and made again if its weight is replaced or changed in place (e.g. by `load_state_dict`).
`release=True` says the weights are file-mapped, so their pages can be dropped once packed
(they would be read again from the file if ever touched).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import unet as unet_mod
from . import vae as vae_mod
from .precision import CastConv2d, CastLinear
from .quantize import drop_pages


@functools.cache
def available() -> bool:
    """oneDNN's pre-packed convolution, transposed convolution and linear operators exist in
    this PyTorch build and compute what they should (private operators: their signatures may
    change between releases, so they are tried once on a small case instead of trusted)."""
    ops = torch.ops.mkldnn
    names = ("_reorder_convolution_weight", "_convolution_pointwise", "_reorder_convolution_transpose_weight",
             "_convolution_transpose_pointwise", "_reorder_linear_weight", "_linear_pointwise")
    if not (torch.backends.mkldnn.is_available() and all(hasattr(ops, n) for n in names)):
        return False
    try:
        with torch.inference_mode():
            g = torch.Generator().manual_seed(0)
            x, w = torch.randn(1, 8, 5, 6, generator=g), torch.randn(4, 8, 3, 3, generator=g)
            conv = ops._convolution_pointwise(x, _pack_conv(w, (1, 1), (1, 1), (1, 1), 1, x.shape), None,
                                              [1, 1], [1, 1], [1, 1], 1, "none", [], "")
            taps = transposed_taps(w)
            packed = ops._reorder_convolution_transpose_weight(taps, [1, 1], [0, 0], [2, 2], [1, 1], 1, list(x.shape))
            up = ops._convolution_transpose_pointwise(x, packed, None, [1, 1], [0, 0], [2, 2], [1, 1], 1, "none", [], "")
            xl = torch.randn(3, 8, generator=g)
            lin = ops._linear_pointwise(xl, ops._reorder_linear_weight(w[:, :, 0, 0].contiguous(), None), None,
                                        "none", [], "")
            return (torch.allclose(conv, F.conv2d(x, w, padding=1), atol=1e-4)
                    and torch.allclose(up, F.conv2d(F.interpolate(x, scale_factor=2.0), w, padding=1), atol=1e-4)
                    and torch.allclose(lin, xl @ w[:, :, 0, 0].t(), atol=1e-4))
    except (RuntimeError, TypeError, ValueError):
        return False


def _pack_conv(weight: torch.Tensor, padding, stride, dilation, groups: int, shape) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_convolution_weight(_float32(weight), list(padding), list(stride),
                                                        list(dilation), groups, list(shape))


def _float32(weight: torch.Tensor) -> torch.Tensor:
    """The weight as float32 for packing: itself, or the float32 conversion of an fp16/bf16-stored
    weight (what a precision.Cast layer computes with, so the results stay the same)."""
    return weight.detach().to(torch.float32)


def _bias32(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.to(torch.float32)


class _Derived:
    """A value derived from a weight (its packed form, upsampling taps), made on first use and
    made again when the weight was replaced or changed in place (its version counter moved, e.g.
    `load_state_dict` into the model) or, for packed convolutions, the input shape changed.
    `release`: the weight is file-mapped; drop its pages after each use of it (they come back
    from the file if it is ever read again)."""

    __slots__ = ("entry", "release")

    def __init__(self, release: bool = False):
        self.entry: tuple | None = None  # (weight, (version, key), value): replaced as one object
        self.release = release

    def get(self, weight: torch.Tensor, key, make) -> torch.Tensor:
        # One read of self.entry (another thread may replace it). data_ptr: a weight whose .data
        # was replaced (parking.py moves weights so) is a new weight.
        entry, stamp = self.entry, (_version(weight), weight.data_ptr(), key)
        if entry is not None and entry[0] is weight and entry[1] == stamp:
            return entry[2]
        self.entry = None  # free the old value first
        value = make()
        self.entry = (weight, stamp, value)
        if self.release:
            drop_pages(weight)
        return value


def _version(t: torch.Tensor) -> int:
    """The in-place modification counter; inference tensors have none (only replacing them is seen)."""
    return -1 if t.is_inference() else t._version


def _packed_conv(x: torch.Tensor, packed: torch.Tensor, bias, padding, stride, dilation, groups: int):
    return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, list(padding), list(stride), list(dilation),
                                                   groups, "none", [], "")


def _packed_linear(x: torch.Tensor, cache: _Derived, weight: torch.Tensor, bias, rows: slice = slice(None),
                   attr: str = "none"):
    """x @ weight[rows].T + bias with the rows' packed form from `cache`; attr "gelu" applies
    oneDNN's erf GELU to the output."""
    packed = cache.get(weight, None, lambda: torch.ops.mkldnn._reorder_linear_weight(
        _float32(weight[rows]).contiguous(), None))
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, [], "none" if attr == "gelu" else "")


def _toom_cook(points: tuple[float, ...], m: int = 4, r: int = 3):
    """Winograd F(m, r) matrices (A^T, G, B^T) from `points` (m + r - 2 finite points, plus the
    point at infinity), so that a correlation y = A^T [(G g) * (B^T d)] of an (m + r - 1) input
    tile d with an r-tap filter g gives its m outputs. A^T evaluates powers at the points, G
    evaluates the filter there divided by prod(p_j - p_l), and the rows of B^T are the
    coefficients of prod(x - p_l) over the other finite points (over all of them for infinity)."""
    n = m + r - 1
    assert len(points) == n - 1
    at, g, bt = torch.zeros(m, n, dtype=torch.float64), torch.zeros(n, r, dtype=torch.float64), []
    for j, p in enumerate(points):
        others = [q for i, q in enumerate(points) if i != j]
        at[:, j] = torch.tensor([p ** i for i in range(m)], dtype=torch.float64)
        g[j] = torch.tensor([p ** k for k in range(r)], dtype=torch.float64) / math.prod(p - q for q in others)
        bt.append(_poly_coefficients(others, n))
    at[m - 1, n - 1], g[n - 1, r - 1] = 1.0, 1.0
    bt.append(_poly_coefficients(list(points), n))
    return at, g, torch.tensor(bt, dtype=torch.float64)


def _poly_coefficients(roots, n: int) -> list[float]:
    """Coefficients (ascending powers, n of them) of prod(x - root)."""
    c = [1.0]
    for root in roots:
        c = [(c[i - 1] if i > 0 else 0.0) - root * (c[i] if i < len(c) else 0.0) for i in range(len(c) + 1)]
    return c + [0.0] * (n - len(c))


@functools.cache
def _winograd_matrices() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kron(G, G) (36, 9), kron(B^T, B^T) (36, 36) and kron(A^T, A^T) (16, 36) in float32: the
    2-D transforms of a flattened 3x3 filter, 6x6 input tile and 6x6 product tile."""
    at, g, bt = _toom_cook(WINOGRAD_POINTS)
    return tuple(torch.kron(a, a).to(torch.float32).contiguous() for a in (g, bt, at))


# 0, +-1, 2, -1/2: the same cost as the usual 0, +-1, +-2 and about half its rounding error.
WINOGRAD_POINTS = (0.0, 1.0, -1.0, 2.0, -0.5)
# Winograd is used when batch x height x width reaches this (the filter transform, made per
# call, costs 4x the weight's bytes: at 32x32 and 640 channels that ate the gain) and both
# channel counts reach WINOGRAD_MIN_CHANNELS (the narrowest measured, 128 channels at 512x512,
# still gained 1.3x); measured on a 2-core AVX-512 Xeon (benchmarks/winograd.py).
WINOGRAD_MIN_PIXELS = 64 * 64
WINOGRAD_MIN_CHANNELS = 128
# Bytes of transformed input per band of tile rows: the band's intermediates stay in cache.
WINOGRAD_BAND_BYTES = 8 << 20


@torch.no_grad()
def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     pad_rows: int = 1) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=(pad_rows, 1)) for a 3x3 float32 weight on a CPU input
    (pad_rows 1 or 0), by Winograd F(4x4, 3x3). Computed channels-last (oneDNN's
    convolutions hand each other NHWC tensors), and so is the result, as oneDNN's is.

    The filter transform U (36, in, out) is made per call, so no 4x larger copy of the weights
    stays in memory. The image is processed in bands of tile rows: each band is padded, cut into
    overlapping 6x6 tiles (channels contiguous), transformed (one GEMM with kron(B^T, B^T)),
    multiplied by U (36 GEMMs over the input channels, as one bmm), transformed back (one GEMM
    with kron(A^T, A^T)) and written into its rows of the output with the bias."""
    kg, kb, ka = _winograd_matrices()
    n, c, h_in, w = x.shape
    k = weight.shape[0]
    h = h_in + 2 * pad_rows - 2  # output rows
    if h < 0:
        raise ValueError(f"a 3x3 convolution without row padding needs 2 rows or more, got {h_in}")
    rows, cols = -(-h // 4), -(-w // 4)  # tiles; ragged edges are computed on zeros and cut off
    u = torch.mm(kg, weight.reshape(k * c, 9).t()).view(36, k, c).transpose(1, 2)
    band = max(1, min(rows, WINOGRAD_BAND_BYTES // (36 * 4 * max(c, k) * cols)))
    xh = x.permute(0, 2, 3, 1)
    out = torch.empty(n, h, w, k, dtype=x.dtype)
    for i in range(n):
        for r0 in range(0, rows, band):
            r = min(band, rows - r0)
            lo, hi = 4 * r0 - pad_rows, 4 * (r0 + r) + 2 - pad_rows  # input rows the band's tiles read
            part = F.pad(xh[i, max(lo, 0):min(hi, h_in)], (0, 0, 1, 1 + 4 * cols - w, max(-lo, 0), max(hi - h_in, 0)))
            tiles = part.unfold(0, 6, 4).unfold(1, 6, 4).permute(3, 4, 0, 1, 2).reshape(36, r * cols * c)
            v = torch.mm(kb, tiles).view(36, r * cols, c)
            y = torch.mm(ka, torch.bmm(v, u).view(36, r * cols * k)).view(4, 4, r, cols, k).permute(2, 0, 3, 1, 4)
            top, bottom = 4 * r0, min(4 * (r0 + r), h)
            ragged = bottom - top < 4 * r or w < 4 * cols  # then through a whole-tile buffer
            dst = torch.empty(r, 4, cols, 4, k, dtype=x.dtype) if ragged else out[i, top:bottom].view(r, 4, cols, 4, k)
            if bias is None:
                dst.copy_(y)
            else:
                torch.add(y, bias, out=dst)
            if ragged:
                out[i, top:bottom].copy_(dst.view(4 * r, 4 * cols, k)[:bottom - top, :w])
    return out.permute(0, 3, 1, 2)


def conv_inner_rows(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv(x) without its first and last output rows (the rows its zero padding touches): what
    a row band of a larger map needs when x already holds the rows above and below it
    (streaming.py). A packed 3x3 convolution that runs by Winograd computes only those rows."""
    if isinstance(conv, PackedConv2d) and _winograd_pays(conv, x, rows=x.shape[-2] - 2):
        return _winograd(conv, x, pad_rows=0)
    return conv(x)[:, :, 1:-1]


def _winograd(conv: "PackedConv2d", x: torch.Tensor, pad_rows: int = 1) -> torch.Tensor:
    """A packed layer's call by Winograd. Its weight is read as stored on every call (no packed
    copy: one made for another input shape is freed), and a file-mapped weight (`release`) has
    its pages dropped again afterwards, so only the layer running holds them."""
    conv.packed.entry = None
    y = winograd_conv3x3(x, _float32(conv.weight), _bias32(conv.bias), pad_rows=pad_rows)
    if conv.packed.release:
        drop_pages(conv.weight)
    return y


def _winograd_pays(conv: nn.Conv2d, x: torch.Tensor, rows: int | None = None) -> bool:
    """Whether `conv` on x (giving `rows` output rows, default x's height) runs by Winograd:
    float32 on the CPU, the layer's shape, and the map's size."""
    n, c, h, w = x.shape if x.dim() == 4 else (0, 0, 0, 0)
    h = h if rows is None else rows
    return (x.dtype == torch.float32 and x.device.type == "cpu" and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.padding_mode == "zeros"
            and conv.dilation == (1, 1) and conv.groups == 1
            and n * h * w >= WINOGRAD_MIN_PIXELS and min(c, conv.out_channels) >= WINOGRAD_MIN_CHANNELS)


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d (zero padding) whose weight is re-ordered for oneDNN once per input shape, or,
    for 3x3 convolutions on large enough inputs, computed by `winograd_conv3x3`."""

    packed: _Derived

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x)
        if _winograd_pays(self, x):
            return _winograd(self, x)
        w = self.packed.get(self.weight, x.shape, lambda: _pack_conv(self.weight, self.padding, self.stride,
                                                                    self.dilation, self.groups, x.shape))
        return _packed_conv(x, w, _bias32(self.bias), self.padding, self.stride, self.dilation, self.groups)


class PackedCastConv2d(PackedConv2d, CastConv2d):
    """A precision.CastConv2d (fp16/bf16-stored weight, float32 compute) packed from its float32
    conversion (or, by Winograd, converted per call); other input dtypes fall back to the
    cast-on-the-fly forward."""


class PackedLinear(nn.Linear):
    packed: _Derived

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x)
        return _packed_linear(x, self.packed, self.weight, _bias32(self.bias))


class PackedCastLinear(PackedLinear, CastLinear):
    """PackedLinear for a precision.CastLinear (see PackedCastConv2d)."""


def transposed_taps(w: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) taps of a conv run after nearest x2 -> (I, O, 4, 4) taps of the equal
    stride-2, padding-1 transposed convolution on the small input.

    Along one axis, an even output 2i sees small-input rows (i-1, i) with taps (w0, w1 + w2) and
    an odd one 2i+1 sees (i, i+1) with (w0 + w1, w2); in a transposed conv (output = 2 * input
    + k - 1) these land at k = 3, 1 and 2, 0. Sums run in float64 and round once.
    """

    def fold(t: torch.Tensor, dim: int) -> torch.Tensor:
        t0, t1, t2 = t.unbind(dim)
        return torch.stack([t2, t1 + t2, t0 + t1, t0], dim)

    dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype  # stored-only dtypes
    return fold(fold(w.detach().double(), 2), 3).to(dtype).transpose(0, 1).contiguous()


class _TransposedUpsample:
    """Mixin for the two Upsample classes (`self.conv` is the 3x3 conv after nearest x2):
    nearest x2 + conv as one transposed convolution."""

    taps: _Derived
    packed: _Derived

    def _prepare(self, release: bool) -> None:
        self.taps, self.packed = _Derived(release), _Derived()  # the packed taps are ours, not file pages

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv.weight
        taps = self.taps.get(weight, None, lambda: transposed_taps(weight))
        packed = self.packed.get(taps, x.shape, lambda: torch.ops.mkldnn._reorder_convolution_transpose_weight(
            taps, [1, 1], [0, 0], [2, 2], [1, 1], 1, list(x.shape)))
        return torch.ops.mkldnn._convolution_transpose_pointwise(x, packed, _bias32(self.conv.bias), [1, 1], [0, 0], [2, 2],
                                                                 [1, 1], 1, "none", [], "")


class TransposedUNetUpsample(_TransposedUpsample, unet_mod.Upsample):
    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(size) != (2 * x.shape[-2], 2 * x.shape[-1]) or x.dtype != torch.float32:
            return super().forward(x, size)  # odd latent sizes: upsample to the skip's size
        return self._up(x)


class TransposedVAEUpsample(_TransposedUpsample, vae_mod.Upsample):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return super().forward(x)
        return self._up(x)


class SplitGEGLU(unet_mod.GEGLU):
    """GEGLU as two packed linears, the gate's with oneDNN's (erf) GELU applied on its output:
    no (T, 2 inner) intermediate, no strided halves, one pass less (25 % faster at 64x64)."""

    value: _Derived
    gate: _Derived

    def _prepare(self, release: bool) -> None:
        self.value, self.gate = _Derived(release), _Derived(release)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x)
        w, b = self.proj.weight, self.proj.bias
        inner = w.shape[0] // 2
        value = _packed_linear(x, self.value, w, b[:inner], slice(None, inner))
        gate = _packed_linear(x, self.gate, w, b[inner:], slice(inner, None), attr="gelu")
        return value.mul_(gate)


_UPSAMPLES = {unet_mod.Upsample: TransposedUNetUpsample, vae_mod.Upsample: TransposedVAEUpsample}


_CAST = {CastConv2d: PackedCastConv2d, CastLinear: PackedCastLinear}


def _plain_float32(module: nn.Module, stored: bool = False) -> bool:
    """A CPU layer computing in float32 with float32 weights, or (`stored`) a precision.Cast layer
    whose fp16/bf16-stored weights are converted to float32 when it runs."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.device.type != "cpu":
        return False
    if type(module) in _CAST:
        return stored and w.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return w.dtype == torch.float32


def cpu_speed_up(model: nn.Module, release: bool = False, stored: bool = False) -> nn.Module:
    """Swap in the exact CPU speed-ups for every plain float32 layer of `model` (in place).

    Layers of other classes (int8) and other dtypes/devices are left alone, and so are
    cast-on-the-fly layers (precision.Cast*, fp16/bf16-stored weights computed in float32)
    unless `stored=True`: then they are packed from their float32 conversion, which holds the
    weights in float32 (twice their stored size) for a faster call (the pipeline does so for the
    VAE). Convolutions that run by Winograd hold no float32 copy: they convert per call.
    `release=True`: the weights are memory-mapped from the checkpoint file, so the pages of
    weights that were re-packed are dropped from memory (no second copy stays resident).
    """
    if not available():
        return model
    handled = set()  # layers a swapped parent module runs itself
    for module in model.modules():
        cls = _UPSAMPLES.get(type(module))
        if cls is not None and type(module.conv) in (nn.Conv2d, CastConv2d) and _plain_float32(module.conv, stored) \
                and module.conv.kernel_size == (3, 3) and module.conv.padding == (1, 1) \
                and module.conv.stride == (1, 1) and module.conv.groups == 1:
            module.__class__ = cls
            module._prepare(release)
            handled.add(id(module.conv))
    for module in model.modules():
        if type(module) is unet_mod.GEGLU and type(module.proj) is nn.Linear and _plain_float32(module.proj) \
                and module.proj.bias is not None:
            module.__class__ = SplitGEGLU
            module._prepare(release)
            handled.add(id(module.proj))
    for module in model.modules():
        if id(module) in handled or not _plain_float32(module, stored):
            continue
        if type(module) in (nn.Conv2d, CastConv2d) and module.padding_mode == "zeros" \
                and isinstance(module.padding, tuple):
            module.packed = _Derived(release)
            module.__class__ = _CAST.get(type(module), PackedConv2d)
        elif type(module) in (nn.Linear, CastLinear):
            module.packed = _Derived(release)
            module.__class__ = _CAST.get(type(module), PackedLinear)
    return model
