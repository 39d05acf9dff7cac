"""Fast mode on the CPU: int8 x int8 products on oneDNN's VNNI kernels (opt-in, not exact).

The UNet's int8 layers (quantize.py's per-output-channel int8 weights: quantized while loading
a float file, or as stored in an int8 file; the sensitive layers of `DEFAULT_KEEP` stay float)
also quantize their input, per call: one scale and zero point for the whole tensor (uint8,
asymmetric; the range always includes 0, so a convolution's zero padding stays exact). The
products then run uint8 x int8 -> int32 in oneDNN (VNNI instructions: about 4x the float32
multiply-add rate on an AVX-512 VNNI CPU) and come out float32 with the bias added. Attention's
own products, norms, activations and the float layers stay float32.

Each layer packs its int8 weight for oneDNN once; the packed copy is then the only one (the
plain int8 weight is released: its file pages dropped, or its memory freed), so fast mode holds
the UNet in int8 (0.86 GB for SD v1) and a swapped model's state_dict is not loadable anywhere.
Accuracy against exact mode is measured in benchmarks/ and tested (PSNR of the decoded image).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .quantize import Int8Conv2d, Int8Linear, drop_pages
from .unet import GEGLU


@functools.cache
def available() -> bool:
    """oneDNN's quantized convolution and linear operators exist in this PyTorch build and
    compute what they should (private operators: tried once on a small case), and the CPU has
    VNNI (without it, uint8 x int8 products go through 16-bit intermediate sums that can
    saturate, and they would not be faster anyway)."""
    ops = torch.ops.onednn
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)
    names = ("qconv_prepack", "qconv2d_pointwise", "qlinear_prepack", "qlinear_pointwise")
    if not (torch.backends.mkldnn.is_available() and vnni() and all(hasattr(ops, n) for n in names)):
        return False
    try:
        with torch.inference_mode():
            g = torch.Generator().manual_seed(0)
            conv, lin = nn.Conv2d(8, 4, 3, padding=1), nn.Linear(8, 4)
            x = torch.randn(1, 8, 5, 6, generator=g)
            ok = True
            for layer, inp in ((conv, x), (lin, torch.randn(3, 8, generator=g))):
                twin = (Int8Conv2d if layer is conv else Int8Linear).from_float(layer)
                w = twin.weight.float() * twin.weight_scale.view(-1, *[1] * (twin.weight.ndim - 1))
                q, scale, zp, _ = quantize_input(inp)
                xd = (q.float() - zp) * scale
                ref = F.conv2d(xd, w, layer.bias, padding=1) if layer is conv else F.linear(xd, w, layer.bias)
                ok = ok and torch.allclose(fast_int8(twin)(inp), ref, atol=1e-4)
                if layer is lin:  # the same product with the GELU post-op (FastInt8GEGLU's gate)
                    geglu = GEGLU(8, 2)
                    geglu.proj = Int8Linear.from_float(lin)
                    value, gate = F.linear(xd, w, lin.bias).chunk(2, dim=-1)
                    ok = ok and torch.allclose(fast_int8(geglu)(inp), value * F.gelu(gate), atol=1e-4)
            return ok
    except (RuntimeError, TypeError, ValueError):
        return False


def quantize_input(x: torch.Tensor) -> tuple[torch.Tensor, float, int, bool]:
    """x (float32) -> (uint8 tensor of the same shape and memory format, scale, zero point,
    whether x was all finite). NaN/inf values (a diverged run) quantize as 0 and the layer then
    returns NaN, so they reach the pipeline's finite-latents check as in exact mode."""
    lo, hi = (v.item() for v in torch.aminmax(_flat(x)))
    finite = math.isfinite(lo) and math.isfinite(hi)
    if not finite:
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (v.item() for v in torch.aminmax(_flat(x)))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0
    if not scale > 0.0:  # all zeros
        scale = 1.0
    zero_point = min(255, max(0, round(-lo / scale)))
    with warnings.catch_warnings():  # quantized tensors are "deprecated", the fused kernel is not gone
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    # the same bytes as a plain uint8 tensor (oneDNN's operators take those): a view of q's
    # storage, where int_repr() would copy them (2.3 % of a 512x512 UNet call)
    plain = torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.size(), q.stride())
    return plain, scale, zero_point, finite


def _flat(x: torch.Tensor) -> torch.Tensor:
    """x's values as one contiguous row, without a copy for NCHW and NHWC (channels_last) maps:
    aminmax on a channels_last tensor first copies it to NCHW (3.9 % of a 512x512 UNet call)."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)  # (B, H, W, C): contiguous, so a view
    return x.reshape(-1)


def _release(module: nn.Module) -> None:
    """Drop the plain int8 weight once packed: file pages go back, anonymous memory is freed."""
    drop_pages(module.weight)
    module.weight = nn.Parameter(torch.empty(0, dtype=torch.int8), requires_grad=False)


def _qlinear(q, scale, zp, packed, weight_scale, zero_points, bias, post_op="none", algorithm=""):
    """oneDNN's uint8 x int8 linear with float32 output (bias added, optional unary post-op)."""
    return torch.ops.onednn.qlinear_pointwise(q, scale, zp, packed, weight_scale, zero_points, bias, 1.0, 0,
                                              torch.float32, post_op, [], algorithm)


class FastInt8Linear(Int8Linear):
    packed: torch.Tensor
    zero_points: torch.Tensor

    def _pack(self) -> None:
        self.packed = torch.ops.onednn.qlinear_prepack(self.weight.detach(), None)
        self.zero_points = torch.zeros(self.out_features, dtype=torch.int64)
        _release(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale, zp, finite = quantize_input(x)
        y = _qlinear(q, scale, zp, self.packed, self.weight_scale, self.zero_points, self.bias)
        return y if finite else y.fill_(float("nan"))


class FastInt8Conv2d(Int8Conv2d):
    packed: torch.Tensor
    zero_points: torch.Tensor

    def _pack(self) -> None:
        pair = nn.modules.utils._pair
        self.stride, self.padding, self.dilation = pair(self.stride), pair(self.padding), pair(self.dilation)
        w = self.weight.detach().contiguous(memory_format=torch.channels_last)
        self.packed = torch.ops.onednn.qconv_prepack(w, self.weight_scale, 1.0, 0, list(self.stride),
                                                     list(self.padding), list(self.dilation), self.groups, None)
        self.zero_points = torch.zeros(self.out_channels, dtype=torch.int64)
        _release(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale, zp, finite = quantize_input(x.contiguous(memory_format=torch.channels_last))
        y = torch.ops.onednn.qconv2d_pointwise(q, scale, zp, self.packed, self.weight_scale, self.zero_points,
                                               self.bias, list(self.stride), list(self.padding),
                                               list(self.dilation), self.groups, 1.0, 0, torch.float32,
                                               "none", [], "")
        return y if finite else y.fill_(float("nan"))


class FastInt8GEGLU(GEGLU):
    """GEGLU on an int8 projection as two oneDNN products of one quantized input: the value half,
    and the gate half with oneDNN's (erf) GELU applied to its float32 output; then value *= gate.
    No (T, 2 inner) intermediate and no GELU and product over its strided halves (those took
    4.7 % of a 512x512 UNet call in fast mode). Each half computes what the int8 projection's
    rows compute."""

    halves: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], ...]  # (packed, scale, bias) x 2
    zero_points: torch.Tensor

    def _pack(self) -> None:
        proj = self.proj
        inner = proj.out_features // 2
        bias = None if proj.bias is None else proj.bias.detach().float()
        self.halves = tuple((torch.ops.onednn.qlinear_prepack(proj.weight.detach()[rows], None),
                             proj.weight_scale.detach()[rows].contiguous(),
                             None if bias is None else bias[rows].contiguous())
                            for rows in (slice(0, inner), slice(inner, 2 * inner)))
        self.zero_points = torch.zeros(inner, dtype=torch.int64)
        _release(proj)
        del self.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale, zp, finite = quantize_input(x)
        (value_w, value_s, value_b), (gate_w, gate_s, gate_b) = self.halves
        value = _qlinear(q, scale, zp, value_w, value_s, self.zero_points, value_b)
        gate = _qlinear(q, scale, zp, gate_w, gate_s, self.zero_points, gate_b, "gelu", "none")  # erf GELU
        return value.mul_(gate) if finite else value.fill_(float("nan"))


_SWAPS = {Int8Linear: FastInt8Linear, Int8Conv2d: FastInt8Conv2d}


def _swappable(layer: nn.Module) -> bool:
    return layer.weight.device.type == "cpu" and layer.weight.numel() > 0


def fast_int8(model: nn.Module) -> nn.Module:
    """Swap every int8 layer of a float32 CPU model for its oneDNN int8 x int8 twin (in place);
    a GEGLU whose projection is int8 becomes one FastInt8GEGLU."""
    for module in list(model.modules()):
        if type(module) is GEGLU and type(module.proj) is Int8Linear and _swappable(module.proj):
            module.__class__ = FastInt8GEGLU
            module._pack()
    for module in model.modules():
        cls = _SWAPS.get(type(module))
        if cls is not None and _swappable(module):
            if module.bias is not None and module.bias.dtype != torch.float32:
                module.bias = nn.Parameter(module.bias.float(), requires_grad=False)
            module.__class__ = cls
            module._pack()
    return model
