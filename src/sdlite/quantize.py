"""int8 weights: per-output-channel symmetric quantization of Linear and Conv2d layers.

Each quantized layer keeps its weight as int8 `q` of the layer's own shape plus one float32
scale per output channel; it computes with `q * scale` rebuilt on the fly in the input's dtype,
so activations, norms, biases and embeddings keep their precision and only the weight storage
shrinks (UNet + text encoder: about 1/4 of fp32, 1/2 of fp16).

    scale[o] = max_i |w[o, i...]| / 127        (1.0 for an all-zero row)
    q[o, i...] = round(w[o, i...] / scale[o])  in [-127, 127]
    w ~= q * scale[o]                          (error <= scale[o] / 2 per weight)

Like `precision.compute_in`, this acts from outside: `quantize_model(model)` swaps the layers
of an already loaded model for `Int8Linear` / `Int8Conv2d` (explicit module swaps; the model
files stay plain), and `install_int8(model, state)` does the same on a model built on `meta`
so that a quantized file loads with `load_state_dict(assign=True)` and no float pass.

A few layers stay in floating point by default (`DEFAULT_KEEP`), chosen by measuring, on the
full SD v1.5 architecture with random weights, the UNet output error caused by quantizing each
layer alone (benchmarks/int8_quality.py; tests/test_quantize.py checks the bounds).

Measured quality (full SD v1.5 architecture, seeded Gaussian weights N(0, 1/fan_in), H200, fp32
reference without TF32, 64x64 latents; UNet eps relative RMS error vs fp32):
fp16 weights 0.11%, fp16 compute 0.22%, bf16 compute 1.8%; int8 on every layer 3.5%, keeping
the first/last conv 3.3%, keeping the 10 / 20 most sensitive layers 2.7% / 2.2% (DEFAULT_KEEP
keeps 15; CPU, 16x16 latents: 4.1% all int8 -> 3.0% with DEFAULT_KEEP, fp16 weights 0.15%).
The per-layer errors add in quadrature (their root-sum-square, 3.6%, is the all-int8 error) and
no layer dominates, so 1% is out of reach for per-channel int8 of these weights. txt2img, 10
PLMS steps, CFG 7.5, PSNR of the 8-bit image vs fp32: fp16 56 dB; int8 (first/last conv kept)
39.7 dB at 128x128 and 40.5 dB at 512x512, 39.3 / 39.8 dB with fp16 compute. Heavy-tailed
weights (Student-t, 4 degrees of freedom) make int8 coarser: eps error 8.9%, 26.9 dB at 512x512.
Trained checkpoints were not available here; their weights have heavier tails than Gaussian.

File format ("int8-per-channel", format version 1)
--------------------------------------------------
A standard CompVis-layout single-file `.safetensors` (`sdlite convert --int8`,
`export_checkpoint(..., int8=True)`), with:

- every key and shape of the usual layout; the weight of each quantized layer is stored as
  `I8` under its usual key (e.g. `model.diffusion_model.input_blocks.2.1.proj_in.weight`,
  shape (320, 320, 1, 1));
- beside it, `<weight key>_scale` (e.g. `...proj_in.weight_scale`): `F32`, shape
  (out_channels,), so that `weight = weight.float() * weight_scale[:, None, ...]`;
- all other floating-point tensors (biases, norms, embeddings, the layers kept in float, the
  VAE unless it was quantized too) in fp16 unless another dtype was asked for;
- safetensors metadata `"sdlite.quantization": "int8-per-channel"` and
  `"sdlite.format_version": "1"`. A reader must refuse a format version it does not know.

Which layers are quantized is read from the file (an `I8` weight with a `_scale` key), not from
`DEFAULT_KEEP`, so files made with other keep lists load the same way. Beware: a tool that does
not know the format may load it anyway and compute garbage (diffusers' from_single_file copies
the int8 values into its float weights and only warns about the `_scale` keys); `sdlite convert
IN OUT` without `--int8` writes such a file back as a plain float file (weight times scales).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, InputError
from .precision import by_output_groups

FORMAT = "int8-per-channel"
FORMAT_VERSION = 1
METADATA = {"sdlite.quantization": FORMAT, "sdlite.format_version": str(FORMAT_VERSION)}
SCALE_SUFFIX = "_scale"  # <weight key> + SCALE_SUFFIX holds that weight's per-channel scales

# Components quantized by default; the VAE is small (84M) and its output is the image itself.
DEFAULT_COMPONENTS = ("unet", "text")
# Layers kept in floating point (fnmatch patterns on module names; a pattern also covers the
# modules below it). The UNet list is the 15 layers with the largest error when quantized alone,
# measured on the full SD v1.5 UNet with random weights (benchmarks/int8_quality.py, H200, 64x64
# latents): the first and last convs, the 1x1 skip convs of the up-path ResBlocks, the first two
# downsamplers, the highest-resolution level's first block. They hold 13M of the 860M weights
# (+1% file size) and take the eps error from 3.5% (all int8) to about 2.4%. Text encoder: its
# first layer (errors there pass through all the others): 2.35% -> 1.94% context error. The
# names are SD v1's; patterns that a smaller test model lacks are skipped.
DEFAULT_KEEP: dict[str, tuple[str, ...]] = {
    "unet": ("input_blocks.0.0", "out.2",
             "output_blocks.11.0.skip_connection", "output_blocks.10.0.skip_connection",
             "output_blocks.9.0.skip_connection", "output_blocks.8.0.skip_connection",
             "output_blocks.7.0.skip_connection", "output_blocks.6.0.skip_connection",
             "input_blocks.4.0.skip_connection", "input_blocks.3.0.op", "input_blocks.6.0.op",
             "output_blocks.8.2.conv", "input_blocks.1.0.out_layers.3",
             "input_blocks.1.1.proj_in", "input_blocks.1.1.proj_out"),
    "text": ("text_model.encoder.layers.0",),
    "vae": ("encoder.conv_in", "decoder.conv_out", "quant_conv", "post_quant_conv"),
}


# ---------------------------------------------------------------------------- tensors


def quantize_tensor(w: torch.Tensor, name: str = "a weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (dim 0) symmetric int8: (q int8 of w's shape, scale float32 (out,)).
    A NaN/inf weight is an error (naming `name`): its row's scale would zero or NaN the row."""
    w = w.detach().to(torch.float32)
    low, high = torch.aminmax(w.reshape(w.shape[0], -1), dim=1)
    amax = torch.maximum(-low, high)
    if not torch.isfinite(amax).all():
        rows = torch.nonzero(~torch.isfinite(amax)).flatten().tolist()
        raise CheckpointError(f"{name} has NaN/inf values (output channel(s) {rows[:5]}): int8 cannot hold them; "
                              "the file's weights are broken")
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # zero rows: q = 0, any scale
    q = torch.div(w, _per_row(scale, w.ndim)).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale in `dtype`; the product is formed in float32 so tiny scales lose nothing in fp16.

    It runs on every call of an int8 layer, so it copies as little as it can. Off the CPU one
    kernel reads the int8 weight and writes the `dtype` result (1 + 2 bytes per weight in fp16,
    where int8 -> float32, x scale, -> fp16 as three steps moved 19 and held two float32 copies).
    On the CPU a float32 result is filled and scaled in place, which vectorizes better there
    than the mixed-dtype product (29.5M weights: 38 instead of 75 ms on 2 cores); a reduced
    `dtype` is then one conversion of it. The result keeps q's memory format (an NHWC weight
    stays NHWC)."""
    scale = _per_row(scale.to(torch.float32), q.ndim)
    if q.device.type == "cpu":
        return torch.empty_like(q, dtype=torch.float32).copy_(q).mul_(scale).to(dtype)
    return torch.mul(q, scale, out=torch.empty_like(q, dtype=dtype))


def _per_row(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    return scale.view(-1, *([1] * (ndim - 1)))  # (out,) -> (out, 1, ...)


# ---------------------------------------------------------------------------- modules


def _frozen(t: torch.Tensor) -> nn.Parameter:
    # Parameters (not buffers) so that parameters() still lists every weight; int8 cannot
    # require grad, and this is an inference engine.
    return nn.Parameter(t, requires_grad=False)


def _bias(layer: nn.Module) -> nn.Parameter | None:
    return None if layer.bias is None else _frozen(layer.bias.detach())


def _from_float(cls, layer: nn.Module) -> nn.Module:
    """An Int8Linear/Int8Conv2d quantized from a float layer (its bias kept as it is)."""
    new = cls.like(layer)
    new.weight, new.weight_scale = map(_frozen, quantize_tensor(layer.weight))
    new.bias = _bias(layer)
    return new


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight (out, in) and float32 `weight_scale` (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _frozen(torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.weight_scale = _frozen(torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = _frozen(torch.empty(out_features, device=device)) if bias else None

    @classmethod
    def like(cls, layer: nn.Linear) -> Int8Linear:
        """An empty int8 twin of `layer` on the same device (e.g. meta, to be filled by loading)."""
        return cls(layer.in_features, layer.out_features, layer.bias is not None, device=layer.weight.device)

    from_float = classmethod(lambda cls, layer: _from_float(cls, layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return by_output_groups(self, x, lambda s: dequantize(self.weight[s], self.weight_scale[s], x.dtype),
                                F.linear, -1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Conv2d(nn.Module):
    """nn.Conv2d (zero padding) with an int8 weight (out, in/groups, kh, kw) and float32 `weight_scale` (out,)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, device=None):
        super().__init__()
        kernel_size = nn.modules.utils._pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        shape = (out_channels, in_channels // groups, *kernel_size)
        self.weight = _frozen(torch.empty(shape, dtype=torch.int8, device=device))
        self.weight_scale = _frozen(torch.empty(out_channels, dtype=torch.float32, device=device))
        self.bias = _frozen(torch.empty(out_channels, device=device)) if bias else None

    @classmethod
    def like(cls, layer: nn.Conv2d) -> Int8Conv2d:
        if layer.padding_mode != "zeros":
            raise InputError(f"int8: Conv2d with padding_mode={layer.padding_mode!r} is not supported (only 'zeros')")
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                   layer.dilation, layer.groups, layer.bias is not None, device=layer.weight.device)

    from_float = classmethod(lambda cls, layer: _from_float(cls, layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return by_output_groups(self, x, lambda s: dequantize(self.weight[s], self.weight_scale[s], x.dtype),
                                lambda x, w, b: F.conv2d(x, w, b, self.stride, self.padding, self.dilation,
                                                         self.groups), -3)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, int8")


INT8_MODULES = {nn.Linear: Int8Linear, nn.Conv2d: Int8Conv2d}  # subclasses (precision.Cast*) too
INT8_TYPES = (Int8Linear, Int8Conv2d)


def _int8_class(layer: nn.Module) -> type | None:
    return next((cls for base, cls in INT8_MODULES.items() if isinstance(layer, base)), None)


# ---------------------------------------------------------------------------- choosing layers


def component_of(model: nn.Module) -> str:
    """"unet", "text" or "vae" for sdlite's models (picks the default keep list)."""
    from .clip import CLIPTextEncoder
    from .unet import UNetModel
    from .vae import AutoencoderKL

    for cls, name in ((UNetModel, "unet"), (CLIPTextEncoder, "text"), (AutoencoderKL, "vae")):
        if isinstance(model, cls):
            return name
    raise InputError(f"int8: no default layer choice for a {type(model).__name__}; pass keep= or layers=")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, p) or fnmatchcase(name, p + ".*") for p in patterns)


def select_layers(model: nn.Module, keep: Iterable[str] | None = None, layers: Iterable[str] | None = None,
                  component: str | None = None) -> list[str]:
    """Names of the modules of `model` to quantize.

    `layers=None`: every Linear and Conv2d except those matching `keep` (default:
    `DEFAULT_KEEP[component]`, whose SD v1 names a smaller model may lack). `layers=[...]`:
    the modules matching these patterns (minus an explicit `keep`), which must be Linear or
    Conv2d or contain some (anything else is an `InputError`). Patterns are fnmatch patterns on
    module names (`"out.2"`, `"time_embed"`, `"*.attn2.to_k"`); a pattern also covers the
    modules below it. A pattern given here that matches nothing is an `InputError` (a typo
    would otherwise silently change what is quantized).
    """
    layers = None if layers is None else tuple(layers)
    given = () if keep is None else tuple(keep)
    modules = dict(model.named_modules())
    for p in given + (layers or ()):
        if not any(_matches(n, (p,)) for n in modules if n):
            raise InputError(f"int8: layer pattern {p!r} matches no module of the {type(model).__name__}")
    if layers is not None:
        return [n for n in _named_layers(modules, layers) if not _matches(n, given)]
    keep = DEFAULT_KEEP[component or component_of(model)] if keep is None else given
    return [n for n, m in modules.items() if _int8_class(m) is not None and not _matches(n, keep)]


def _named_layers(modules: dict[str, nn.Module], patterns: tuple[str, ...]) -> list[str]:
    chosen, bad = set(), []
    for name in (n for n in modules if n and any(fnmatchcase(n, p) for p in patterns)):
        if _int8_class(modules[name]) is not None:
            chosen.add(name)
            continue
        # A pattern naming a container (e.g. "time_embed") selects the supported layers inside it.
        inside = {n for n, m in modules.items() if n.startswith(name + ".") and _int8_class(m) is not None}
        if not inside:
            bad.append(f"{name} ({type(modules[name]).__name__})")
        chosen |= inside
    if bad:
        raise InputError(f"int8 supports Linear and Conv2d layers only, not {', '.join(bad[:5])}")
    return [n for n in modules if n in chosen]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


# ---------------------------------------------------------------------------- module swaps


def quantize_model(model: nn.Module, keep: Iterable[str] | None = None, layers: Iterable[str] | None = None) -> nn.Module:
    """Quantize a loaded model in place (on its own device) and return it.

    For models loaded from ordinary float files (the pipeline's `quantize="int8"`). Each chosen
    Linear/Conv2d (see `select_layers`) becomes an Int8Linear/Int8Conv2d; its float weight is
    dropped, so memory falls as the layers are converted. Layers already int8 are left alone.
    """
    for name in select_layers(model, keep, layers):
        layer = model.get_submodule(name)
        if not isinstance(layer, INT8_TYPES):
            _replace(model, name, _int8_class(layer).from_float(layer))
    return model


def install_int8(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Swap in Int8 layers wherever `state` (the model's own keys) holds an int8 weight.

    Meant for a model built on `meta`, right before `load_state_dict(state, assign=True)`: the
    int8 tensors are then used as they are (memory-mapped), with no float copy.
    """
    for key, t in state.items():
        if t.dtype != torch.int8 or not key.endswith(".weight"):
            continue
        name = key[: -len(".weight")]
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            continue  # unknown key: strict loading / validation names it
        cls = _int8_class(layer)
        if cls is None:
            raise CheckpointError(f"int8 weight {key} belongs to a {type(layer).__name__}; only Linear and Conv2d "
                                  "layers can be int8")
        scale = state.get(key + SCALE_SUFFIX)
        if scale is not None and not scale.is_floating_point():
            raise CheckpointError(f"{key + SCALE_SUFFIX}: scales must be floating point, found {scale.dtype}")
        if not isinstance(layer, INT8_TYPES):
            _replace(model, name, cls.like(layer))
    return model


# ---------------------------------------------------------------------------- state dicts


class Deferred:
    """A tensor made only when it is written: `save_safetensors` reads `shape`, `dtype`,
    `numel()`, `is_floating_point()` for the header and calls `detach()` for the data, so an
    int8 export quantizes one tensor at a time instead of holding the whole result."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, make: Callable[[], torch.Tensor]):
        self.shape, self.dtype, self._make = torch.Size(shape), dtype, make

    def numel(self) -> int:
        return self.shape.numel()

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def detach(self) -> torch.Tensor:
        return self._make()


def quantize_state_dict(state: dict[str, torch.Tensor], component: str, cfg, keep: Iterable[str] | None = None,
                        layers: Iterable[str] | None = None, dtype: torch.dtype | None = None,
                        lazy: bool = False, release: bool = False) -> dict:
    """A component's state dict (its own keys) in the int8 file layout.

    The chosen layers' weights become int8 under their own keys plus `<key>_scale` (float32);
    every other floating-point tensor is converted to `dtype` (None = unchanged). Weights that
    are already int8 pass through with their scales. `cfg` is the ModelConfig (to know which
    keys are Linear/Conv2d weights). `lazy=True` returns `Deferred` values for anything that
    needs computing, for streaming with `save_safetensors`.
    """
    from .checkpoint import build_model

    with torch.device("meta"):
        model = build_model(component, cfg)
    chosen = {n + ".weight" for n in select_layers(model, keep, layers, component)}
    out: dict = {}
    for key, t in state.items():
        if t.dtype == torch.int8 or _is_scale(key, state):
            out[key] = t  # already quantized (re-export of an int8 file)
        elif key in chosen and not lazy:
            out[key], out[key + SCALE_SUFFIX] = quantize_tensor(t, key)
            if release:
                drop_pages(t)  # the float weight is done with: let its file pages go now
        elif key in chosen:
            # quantized twice, once per written tensor: caching the pair would hold every int8
            # weight from the (earlier written) float32 scales until the weights are written
            out[key] = _value(t.shape, torch.int8, lambda t=t, k=key: quantize_tensor(t, k)[0], lazy)
            out[key + SCALE_SUFFIX] = _value(t.shape[:1], torch.float32, lambda t=t, k=key: quantize_tensor(t, k)[1], lazy)
        elif t.is_floating_point() and dtype is not None and t.dtype != dtype:
            out[key] = _value(t.shape, dtype, lambda t=t: t.to(dtype), lazy)
        else:
            out[key] = t
    return out


def drop_pages(t: torch.Tensor) -> None:
    """Tell the kernel that the whole pages under a CPU tensor read from a private file mapping
    are not needed any more (madvise MADV_DONTNEED): they leave this process's resident set, and
    would be read from the file again if touched. Only pages of a file mapping are dropped
    (checked in /proc/self/maps: dropping anonymous memory would zero it); a no-op for other
    tensors or off Linux."""
    import ctypes
    import mmap
    import sys

    if t.device.type != "cpu" or not sys.platform.startswith("linux") or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
    if last > first and _in_file_mapping(first, last):
        try:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED
        except (OSError, AttributeError):
            pass


def _in_file_mapping(first: int, last: int) -> bool:
    """[first, last) lies inside one private mapping of a regular file (per /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                if lo <= first and last <= hi:
                    path = fields[5].strip() if len(fields) > 5 else ""
                    return fields[1].endswith("p") and path.startswith("/") and fields[4] != "0"
    except (OSError, ValueError, IndexError):
        pass
    return False


def _is_scale(key: str, tensors: dict) -> bool:
    """`key` is the scale of an int8 weight present in `tensors`."""
    weight = key[: -len(SCALE_SUFFIX)]
    return key.endswith(".weight" + SCALE_SUFFIX) and weight in tensors and tensors[weight].dtype == torch.int8


def _value(shape, dtype, make: Callable[[], torch.Tensor], lazy: bool):
    return Deferred(shape, dtype, make) if lazy else make()


# ---------------------------------------------------------------------------- files


def file_quantization(meta: dict, tensors: dict, path) -> str | None:
    """"int8" for a quantized file, None for a float one; refuses formats this version cannot read."""
    version = meta.get("sdlite.format_version")
    if version is not None and version != str(FORMAT_VERSION):
        newer = version.isdigit() and int(version) > FORMAT_VERSION
        what = f"made by a newer sdlite (format {version})" if newer else f"unknown sdlite format version {version!r}"
        raise CheckpointError(f"{path}: {what}; this version reads format {FORMAT_VERSION}. Upgrade sdlite, "
                              "or convert the original checkpoint again with this version")
    kind = meta.get("sdlite.quantization")
    if kind is not None and kind != FORMAT:
        raise CheckpointError(f"{path}: quantization {kind!r} is not supported by this sdlite (it reads {FORMAT!r})")
    if kind is None and not any(_is_scale(k, tensors) for k in tensors):
        return None  # a float file (an int8 file whose metadata was stripped is still recognised)
    return "int8"


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the int8 layers of a model."""
    return [n for n, m in model.named_modules() if isinstance(m, INT8_TYPES)]
