"""int8 weights: quantization maths, the Int8 layers, the int8 file format, quality, bad inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close
from sdlite.checkpoint import PREFIXES, build_model, export_checkpoint, open_checkpoint
from sdlite.config import SD_V1
from sdlite.errors import CheckpointError, InputError
from sdlite.precision import compute_in
from sdlite.quantize import (DEFAULT_KEEP, SCALE_SUFFIX, Deferred, Int8Conv2d, Int8Linear, dequantize,
                             install_int8, quantize_model, quantize_state_dict, quantize_tensor, quantized_layers)
from sdlite.tensorfile import load_safetensors, save_safetensors

UNET = PREFIXES["unet"]


def rel_rms(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return ((actual.double() - reference.double()).norm() / reference.double().norm()).item()


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory) -> dict[str, Path]:
    """The tiny reference as an fp32 CompVis file, an fp16 one and an int8 one (all by sdlite's exporter)."""
    d = tmp_path_factory.mktemp("int8")
    return {"fp32": export_checkpoint(tiny.folder, d / "fp32.safetensors"),
            "fp16": export_checkpoint(tiny.folder, d / "fp16.safetensors", dtype=torch.float16),
            "int8": export_checkpoint(tiny.folder, d / "int8.safetensors", int8=True)}


def unet_inputs(cfg, hw=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, cfg.unet.in_channels, hw, hw, generator=g), torch.tensor([100.0, 700.0]),
            torch.randn(2, 77, cfg.unet.context_dim, generator=g))


# ------------------------------------------------------------------ maths and layers


@pytest.mark.parametrize("shape", [(64, 300), (32, 16, 3, 3), (8, 4, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_error_is_at_most_half_a_step_per_channel(shape, dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=g) * torch.logspace(-4, 1, shape[0]).view(-1, *[1] * (len(shape) - 1))).to(dtype)
    w[1] = 0  # an all-zero output channel
    q, scale = quantize_tensor(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.dtype == torch.float32 and scale.shape == shape[:1]
    err = (dequantize(q, scale) - w.float()).abs().reshape(shape[0], -1).amax(dim=1)
    assert torch.all(err <= scale / 2 * (1 + 1e-5)), f"max error / scale = {(err / scale).max().item():.4f}"
    assert torch.all(q[1] == 0) and torch.all(dequantize(q, scale)[1] == 0)
    peak = q.abs().reshape(shape[0], -1).amax(dim=1)
    assert peak.max() == 127 and torch.all(peak[torch.arange(shape[0]) != 1] == 127)  # symmetric, full range


def test_dequantize_keeps_tiny_scales_in_half_precision():
    # A channel whose scale is subnormal in fp16: the product is formed in fp32, then rounded once.
    w = torch.tensor([[3e-6, -1e-6, 2e-6]])
    q, scale = quantize_tensor(w)
    assert_close(dequantize(q, scale, torch.float16).float(), w, rel=1e-3, what="fp16 dequantize")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_rounds_once_and_holds_no_intermediate_copy(dtype):
    # It runs on every call of an int8 layer: the result is the float32 product rounded once to
    # `dtype`; in float32 nothing but the result is allocated, in fp16/bf16 on the CPU one
    # float32 copy besides (the old code held two). LivePeak sees tensors made by ops, not
    # buffers a kernel allocates inside; the one-kernel GPU path cannot be checked here.
    from conftest import LivePeak

    g = torch.Generator().manual_seed(1)
    q, scale = quantize_tensor(torch.randn(96, 40, 3, 3, generator=g) * torch.logspace(-7, 0, 96).view(-1, 1, 1, 1))
    expected = (q.double() * scale.double().view(-1, 1, 1, 1)).float().to(dtype)
    with LivePeak(exclude={q.untyped_storage().data_ptr(), scale.untyped_storage().data_ptr()}) as counter:
        w = dequantize(q, scale, dtype)
    assert w.dtype == dtype and torch.equal(w, expected)
    assert counter.peak == w.numel() * (w.element_size() + (0 if dtype == torch.float32 else 4))
    # an NHWC (channels_last) int8 weight gives an NHWC weight, for NHWC convolutions
    nhwc = dequantize(q.to(memory_format=torch.channels_last), scale, dtype)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(nhwc, expected)


def test_channels_last_int8_conv_keeps_its_weight_layout():
    conv = Int8Conv2d.from_float(nn.Conv2d(8, 16, 3, padding=1))
    x = torch.randn(2, 8, 10, 10)
    expected = conv(x)
    conv = conv.to(memory_format=torch.channels_last)  # as the pipeline's channels_last option does
    assert conv.weight.dtype == torch.int8 and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert dequantize(conv.weight, conv.weight_scale).is_contiguous(memory_format=torch.channels_last)
    assert_close(conv(x.to(memory_format=torch.channels_last)), expected, rel=1e-6, what="NHWC int8 conv")


def test_int8_linear_equals_linear_with_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    q = Int8Linear.from_float(lin)
    assert q.weight.dtype == torch.int8 and q.weight.shape == lin.weight.shape and not q.weight.requires_grad
    assert set(q.state_dict()) == {"weight", "weight_scale", "bias"}
    x = torch.randn(3, 5, 40)
    expected = F.linear(x, dequantize(q.weight, q.weight_scale), lin.bias)
    assert torch.equal(q(x), expected)
    assert_close(q(x), lin(x), rel=2e-2, what="int8 linear vs float")
    assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16
    no_bias = Int8Linear.from_float(nn.Linear(40, 24, bias=False))
    assert no_bias.bias is None and set(no_bias.state_dict()) == {"weight", "weight_scale"}


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=0),
                                dict(kernel_size=1), dict(kernel_size=3, padding=2, dilation=2, groups=2)])
def test_int8_conv_equals_conv_with_dequantized_weight(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, **kw)
    q = Int8Conv2d.from_float(conv)
    assert q.weight.dtype == torch.int8 and q.weight.shape == conv.weight.shape
    x = torch.randn(2, 8, 11, 9)
    expected = F.conv2d(x, dequantize(q.weight, q.weight_scale), conv.bias, conv.stride, conv.padding,
                        conv.dilation, conv.groups)
    assert torch.equal(q(x), expected)
    assert q(x).shape == conv(x).shape


class _RecordWeights:
    """Records the weights passed to F.conv2d / F.linear (their output-channel counts)."""

    def __init__(self, monkeypatch):
        self.rows: list[int] = []
        for name in ("conv2d", "linear"):
            real = getattr(F, name)
            monkeypatch.setattr(F, name, self._wrap(real))

    def _wrap(self, real):
        def call(x, w, *args, **kwargs):
            self.rows.append(w.shape[0])
            return real(x, w, *args, **kwargs)
        return call


@pytest.mark.parametrize("kind", ["int8 conv", "int8 linear", "fp16 conv", "fp16 linear"])
def test_cpu_layers_rebuild_large_weights_in_groups_of_output_channels(kind, monkeypatch):
    """On the CPU a weight rebuilt per call (dequantized, or cast from fp16) larger than
    CPU_WEIGHT_GROUP_BYTES is rebuilt and applied in groups of output channels: no rebuilt
    group exceeds the bound, and the result equals the layer run in one piece."""
    from sdlite import precision

    torch.manual_seed(0)
    if kind.endswith("conv"):
        float_layer, x = nn.Conv2d(24, 40, 3, padding=1), torch.randn(2, 24, 9, 7)
    else:
        float_layer, x = nn.Linear(24, 40), torch.randn(2, 5, 24)
    if kind.startswith("int8"):
        layer = (Int8Conv2d if kind.endswith("conv") else Int8Linear).from_float(float_layer)
    else:
        layer = compute_in(float_layer.half(), torch.float32)
    row_bytes = layer.weight[0].numel() * 4
    whole = layer(x)  # one piece: the weight is below the default bound
    record = _RecordWeights(monkeypatch)
    monkeypatch.setattr(precision, "CPU_WEIGHT_GROUP_BYTES", 7 * row_bytes)  # 7 rows a group
    grouped = layer(x)
    assert record.rows == [7, 7, 7, 7, 7, 5]
    assert grouped.shape == whole.shape
    assert_close(grouped, whole, rel=1e-6, what=f"{kind} in groups vs whole")
    # one row a group, and no bias
    layer.bias = None
    monkeypatch.setattr(precision, "CPU_WEIGHT_GROUP_BYTES", 1)
    record.rows.clear()
    grouped = layer(x)
    assert record.rows == [1] * 40
    if kind.endswith("conv"):  # an unbatched (C, H, W) input: groups join along its channel dim
        assert_close(layer(x[0]), grouped[0], rel=1e-6, what=f"{kind}, unbatched input")
    monkeypatch.undo()
    assert_close(grouped, layer(x), rel=1e-6, what=f"{kind} without bias, one row a group")


def test_grouped_convolutions_are_not_split(monkeypatch):
    from sdlite import precision

    torch.manual_seed(0)
    q = Int8Conv2d.from_float(nn.Conv2d(8, 12, 3, padding=1, groups=2))
    x = torch.randn(1, 8, 5, 5)
    whole = q(x)
    monkeypatch.setattr(precision, "CPU_WEIGHT_GROUP_BYTES", 1)
    assert torch.equal(q(x), whole)


# ------------------------------------------------------------------ module swaps


def test_quantize_model_swaps_layers_and_keeps_the_default_ones(files, tiny):
    model = open_checkpoint(files["fp32"]).load("unet")
    x, t, c = unet_inputs(tiny.cfg)
    with torch.no_grad():
        ref = model(x, t, c)
        quantize_model(model)
        out = model(x, t, c)
    names = quantized_layers(model)
    linear_conv = [n for n, m in build_model("unet", tiny.cfg).named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    kept = [n for n in linear_conv if n in DEFAULT_KEEP["unet"]]  # the tiny model has only some of SD's
    assert len(kept) >= 6 and set(names) == set(linear_conv) - set(kept)
    for name in kept:
        assert type(model.get_submodule(name)) in (nn.Linear, nn.Conv2d)
    err = rel_rms(out, ref)
    print(f"[int8] tiny UNet eps rel RMS error {err:.4f}")
    assert 0 < err < 0.05
    quantize_model(model)  # already int8: nothing changes
    assert quantized_layers(model) == names


def test_quantize_model_handles_compute_in_layers(files, tiny):
    # fp16-stored model computing in fp32 (precision.compute_in's Cast* layers), then int8.
    model = compute_in(open_checkpoint(files["fp16"]).load("text"), torch.float32)
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        out = quantize_model(model)(ids)
    assert len(quantized_layers(model)) == 6 * (tiny.cfg.text.layers - 1)  # layer 0 kept (DEFAULT_KEEP)
    assert out.dtype == torch.float32 and rel_rms(out, ref) < 0.05


@pytest.mark.parametrize("component", ["unet", "text", "vae"])
def test_default_keep_names_sd_v1_layers(component):
    # Default patterns are not checked at run time (smaller models lack some): check them here.
    with torch.device("meta"):
        modules = dict(build_model(component, SD_V1).named_modules())
    for pattern in DEFAULT_KEEP[component]:
        assert pattern in modules, pattern
        inside = [m for n, m in modules.items() if n == pattern or n.startswith(pattern + ".")]
        assert any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in inside), pattern


def test_explicit_layers_and_unsupported_layer_types(files):
    model = open_checkpoint(files["fp32"]).load("unet")
    quantize_model(model, layers=["time_embed"], keep=["time_embed.2"])  # a container: the Linears inside it
    assert quantized_layers(model) == ["time_embed.0"]
    quantize_model(model, layers=(n for n in ["out.2"]))  # named explicitly: DEFAULT_KEEP does not apply
    assert quantized_layers(model) == ["time_embed.0", "out.2"]
    with pytest.raises(InputError, match=r"Linear and Conv2d layers only, not out\.0 \(GroupNorm\)"):
        quantize_model(model, layers=["out.0"])
    with pytest.raises(InputError, match=r"time_embed\.1 \(SiLU\)"):
        quantize_model(model, layers=["time_embed.1"])
    with pytest.raises(InputError, match="matches no module"):
        quantize_model(model, keep=["out.9"])
    text = open_checkpoint(files["fp32"]).load("text")
    with pytest.raises(InputError, match=r"token_embedding \(Embedding\)"):
        quantize_model(text, layers=["text_model.embeddings.token_embedding"])
    with pytest.raises(InputError, match="padding_mode='reflect'"):
        quantize_model(nn.Sequential(nn.Conv2d(3, 3, 3, padding_mode="reflect")), keep=())
    with pytest.raises(InputError, match=r"0 \(Conv1d\)"):
        quantize_model(nn.Sequential(nn.Conv1d(3, 3, 3)), keep=(), layers=["0"])
    with pytest.raises(InputError, match="no default layer choice"):
        quantize_model(nn.Sequential(nn.Linear(3, 3)))


def test_state_dict_path_equals_module_path(files, tiny):
    """quantize_state_dict + install_int8 (what a file load does) == quantize_model, lazily or not."""
    state = open_checkpoint(files["fp32"]).state_dict("unet")
    eager = quantize_state_dict(state, "unet", tiny.cfg)
    lazy = quantize_state_dict(state, "unet", tiny.cfg, lazy=True)
    assert set(eager) == set(lazy)
    for k, v in lazy.items():
        if isinstance(v, Deferred):
            assert (v.shape, v.dtype) == (eager[k].shape, eager[k].dtype)
            assert torch.equal(v.detach(), eager[k])
    with torch.device("meta"):
        loaded = build_model("unet", tiny.cfg)
    install_int8(loaded, eager).load_state_dict(eager, assign=True)
    swapped = quantize_model(open_checkpoint(files["fp32"]).load("unet"))
    assert quantized_layers(loaded) == quantized_layers(swapped)
    for k, v in swapped.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# ------------------------------------------------------------------ file format


def test_int8_file_layout(files, tiny):
    tensors, meta = load_safetensors(files["int8"])
    assert meta["sdlite.quantization"] == "int8-per-channel" and meta["sdlite.format_version"] == "1"
    fp32 = load_safetensors(files["fp32"])[0]
    scales = {k for k in tensors if k.endswith(SCALE_SUFFIX)}
    assert set(tensors) - scales == set(fp32)  # usual keys and shapes, plus the scales
    for k, v in tensors.items():
        if k in scales:
            weight = k[: -len(SCALE_SUFFIX)]
            assert v.dtype == torch.float32 and v.shape == tensors[weight].shape[:1] and tensors[weight].dtype == torch.int8
            q, scale = quantize_tensor(fp32[weight])
            assert torch.equal(tensors[weight], q) and torch.equal(v, scale)
        else:
            assert v.shape == fp32[k].shape
            assert v.dtype in (torch.int8, torch.float16), k
    int8 = {k for k, v in tensors.items() if v.dtype == torch.int8}
    assert {UNET + "input_blocks.2.1.proj_in.weight", UNET + "time_embed.0.weight",
            PREFIXES["text"] + "text_model.encoder.layers.1.mlp.fc1.weight"} <= int8
    assert PREFIXES["text"] + "text_model.encoder.layers.0.mlp.fc1.weight" not in int8  # DEFAULT_KEEP["text"]
    assert UNET + "out.2.weight" not in int8 and UNET + "input_blocks.0.0.weight" not in int8
    assert not any(k.startswith(PREFIXES["vae"]) for k in int8)  # the VAE stays float by default
    unet_bytes = {name: sum(v.numel() * v.element_size() for k, v in t.items() if k.startswith(UNET))
                  for name, t in (("int8", tensors), ("fp32", fp32))}
    assert unet_bytes["int8"] < 0.3 * unet_bytes["fp32"], unet_bytes


def test_int8_file_loads_int8_memory_mapped(files, tiny):
    ckpt = open_checkpoint(files["int8"])
    assert ckpt.quantization == "int8" and ckpt.dtype == torch.float16 and ckpt.config.name == "tiny"
    assert open_checkpoint(files["fp32"]).quantization is None
    unet = ckpt.load("unet", torch.float32)
    layer = unet.get_submodule("input_blocks.2.1.proj_in")
    assert isinstance(layer, Int8Conv2d) and layer.weight.dtype == torch.int8
    stored = ckpt.tensors[UNET + "input_blocks.2.1.proj_in.weight"]
    assert layer.weight.data_ptr() == stored.data_ptr()  # the file's memory map itself, no copy
    assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == torch.float32
    assert type(unet.out[2]) is nn.Conv2d and unet.out[2].weight.dtype == torch.float32
    reference = open_checkpoint(files["fp32"]).load("unet")
    x, t, c = unet_inputs(tiny.cfg)
    with torch.no_grad():
        err = rel_rms(unet(x, t, c), reference(x, t, c))
        in_memory = rel_rms(quantize_model(reference)(x, t, c), unet(x, t, c))
    print(f"[int8] tiny UNet from the int8 file: eps rel RMS error {err:.4f}; vs quantize_model {in_memory:.1e}")
    assert err < 0.05 and in_memory < 2e-3  # the file differs from quantize_model only by its fp16 biases/norms


def test_int8_file_in_the_pipeline(files):
    """The int8 file through StableDiffusion (CPU: int8 and fp16 weights, fp32 compute), vs the fp32 file."""
    from sdlite.pipeline import StableDiffusion

    images = {}
    for name in ("fp32", "int8"):
        sd = StableDiffusion(files[name])
        res = sd.txt2img("a watercolor fox", width=64, height=64, steps=10, seed=0)
        images[name] = np.asarray(res.images[0]).astype(np.float64)
    mse = np.mean((images["int8"] - images["fp32"]) ** 2)
    psnr = 10 * math.log10(255**2 / mse)
    print(f"[int8] tiny txt2img 64x64, 10 steps: PSNR int8 vs fp32 {psnr:.1f} dB")
    assert psnr > 30


def test_export_options_and_reexport(files, tiny, tmp_path):
    ckpt = open_checkpoint(export_checkpoint(tiny.folder, tmp_path / "a.safetensors", int8=True, int8_vae=True,
                                             dtype=torch.float32))
    vae_int8 = [k for k, v in ckpt.tensors.items() if k.startswith(PREFIXES["vae"]) and v.dtype == torch.int8]
    assert PREFIXES["vae"] + "decoder.up.0.block.0.conv1.weight" in vae_int8
    assert PREFIXES["vae"] + "decoder.conv_out.weight" not in vae_int8  # DEFAULT_KEEP["vae"]
    assert ckpt.dtype == torch.float32 and isinstance(ckpt.load("vae").decoder.conv_in, Int8Conv2d)
    # An int8 file converted again with int8=True stays int8 (its weights and scales as they are),
    # whatever dtype is asked for the rest; without it, it becomes a float file (test below).
    again = export_checkpoint(files["int8"], tmp_path / "b.safetensors", dtype=torch.float32, int8=True)
    a, b = load_safetensors(files["int8"]), load_safetensors(again)
    assert b[1]["sdlite.quantization"] == "int8-per-channel"
    assert set(a[0]) == set(b[0])
    for k, v in a[0].items():
        if v.dtype == torch.int8 or k.endswith(SCALE_SUFFIX):
            assert torch.equal(b[0][k], v), k
        else:
            assert b[0][k].dtype == torch.float32 and torch.equal(b[0][k], v.float()), k


def test_int8_file_is_a_quarter_of_fp32_for_the_full_architecture():
    """Bytes of the int8 layout of the full SD v1.5 UNet + text encoder, from shapes alone (meta)."""
    fp32 = int8 = 0
    for component in ("unet", "text"):
        with torch.device("meta"):
            state = build_model(component, SD_V1).state_dict()
        fp32 += sum(t.numel() * 4 for t in state.values())
        out = quantize_state_dict(state, component, SD_V1, dtype=torch.float16, lazy=True)
        int8 += sum(v.numel() * v.dtype.itemsize for v in out.values())
    ratio = int8 / fp32
    print(f"[int8] UNet + text encoder: int8 file {int8 / 1e9:.3f} GB vs fp32 {fp32 / 1e9:.3f} GB = {ratio:.3f}")
    assert 0.25 < ratio < 0.28  # int8 weights + fp16 token embedding (38M) and kept layers


# ------------------------------------------------------------------ bad files


def _rewrite(src: Path, dst: Path, change=None, metadata=None) -> Path:
    tensors, meta = load_safetensors(src)
    tensors = dict(tensors)
    if change:
        change(tensors)
    save_safetensors(tensors, dst, metadata={**meta, **(metadata or {})})
    return dst


def test_newer_format_version_is_refused(files, tmp_path):
    path = _rewrite(files["int8"], tmp_path / "v2.safetensors", metadata={"sdlite.format_version": "2"})
    with pytest.raises(CheckpointError, match=r"made by a newer sdlite \(format 2\); this version reads format 1"):
        open_checkpoint(path)
    path = _rewrite(files["int8"], tmp_path / "vx.safetensors", metadata={"sdlite.format_version": "beta"})
    with pytest.raises(CheckpointError, match="unknown sdlite format version 'beta'"):
        open_checkpoint(path)
    path = _rewrite(files["int8"], tmp_path / "q4.safetensors", metadata={"sdlite.quantization": "int4-group"})
    with pytest.raises(CheckpointError, match="quantization 'int4-group' is not supported"):
        open_checkpoint(path)


def test_scales_only_with_int8_weights(files, tmp_path):
    key = UNET + "input_blocks.2.1.proj_in.weight"

    def drop_scale(t):
        del t[key + SCALE_SUFFIX]

    with pytest.raises(CheckpointError, match=r"1 missing keys: .*proj_in\.weight_scale"):
        open_checkpoint(_rewrite(files["int8"], tmp_path / "a.safetensors", drop_scale))

    def scale_on_float(t):
        t[UNET + "out.2.weight" + SCALE_SUFFIX] = torch.ones(t[UNET + "out.2.weight"].shape[0])

    with pytest.raises(CheckpointError, match=r"1 unexpected keys: .*out\.2\.weight_scale"):
        open_checkpoint(_rewrite(files["int8"], tmp_path / "b.safetensors", scale_on_float))
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*out\.2\.weight_scale"):
        open_checkpoint(_rewrite(files["fp32"], tmp_path / "c.safetensors", scale_on_float))

    def int8_embedding(t):
        k = PREFIXES["text"] + "text_model.embeddings.token_embedding.weight"
        t[k], t[k + SCALE_SUFFIX] = quantize_tensor(t[k])

    with pytest.raises(CheckpointError, match="token_embedding.weight belongs to a Embedding"):
        open_checkpoint(_rewrite(files["int8"], tmp_path / "d.safetensors", int8_embedding))

    def int_scale(t):
        t[key + SCALE_SUFFIX] = torch.ones(t[key].shape[0], dtype=torch.int32)

    with pytest.raises(CheckpointError, match="scales must be floating point"):
        open_checkpoint(_rewrite(files["int8"], tmp_path / "e.safetensors", int_scale))


def test_int8_file_without_metadata_is_still_recognised(files, tmp_path):
    tensors, _ = load_safetensors(files["int8"])
    path = tmp_path / "stripped.safetensors"
    save_safetensors(dict(tensors), path)  # e.g. re-saved by a tool that drops metadata
    ckpt = open_checkpoint(path)
    assert ckpt.quantization == "int8" and isinstance(ckpt.load("unet").input_blocks[2][1].proj_in, Int8Conv2d)


# ------------------------------------------------------------------ full architecture quality


def _random_(model: nn.Module, seed: int) -> nn.Module:
    """tests/refmodels.randomize_'s scheme, filled in place (several times faster on 860M weights)."""
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
            elif name.endswith("weight"):
                p.normal_(1, 0.1, generator=g)
            else:
                p.normal_(0, 0.05, generator=g)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def full_unet_errors() -> dict[str, float]:
    """UNet eps relative RMS errors vs fp32 on the full SD v1.5 UNet (random weights, 16x16 latents)."""
    with torch.device("meta"):
        unet = build_model("unet", SD_V1)
    _random_(unet, 0)
    x, t, c = unet_inputs(SD_V1, hw=16, seed=1)
    errors = {}
    with torch.inference_mode():
        ref = unet(x, t, c)
        # fp16 weights computing in fp32: what an fp16 file gives on the CPU.
        half = {k: v.half() for k, v in unet.state_dict().items()}
        with torch.device("meta"):
            model = build_model("unet", SD_V1)
        model.load_state_dict(half, assign=True)
        errors["fp16"] = rel_rms(compute_in(model, torch.float32)(x, t, c), ref)
        del model, half
        # The int8 file as loaded on the CPU: quantize_state_dict (the exporter's layout, fp16
        # others), install_int8 + assign (the loader), compute in fp32.
        state = quantize_state_dict(unet.state_dict(), "unet", SD_V1, dtype=torch.float16)
        with torch.device("meta"):
            model = build_model("unet", SD_V1)
        install_int8(model, state).load_state_dict(state, assign=True)
        errors["int8"] = rel_rms(compute_in(model, torch.float32)(x, t, c), ref)
    print(f"[int8] full UNet eps rel RMS error vs fp32 (16x16 latents): int8 {errors['int8']:.4f}, "
          f"fp16 {errors['fp16']:.2e}")
    return errors


@pytest.mark.full
def test_full_unet_int8_error(full_unet_errors):
    # Measured 0.0296 here (16x16 latents, DEFAULT_KEEP in float, other weights fp16 as in the
    # file; 0.041 with every layer int8). The 1% is out of reach for per-channel int8 on
    # these random weights: each layer's weight error is about 0.8% RMS (Gaussian rows: max|w| is
    # about 3.6 sigma, the step 2 max / 254), the ~280 layers' errors add in quadrature (on an
    # H200 at 64x64 the per-layer errors' root-sum-square, 3.6%, equals the all-int8 error 3.5%)
    # and no layer dominates (the worst alone: 0.8%). Bound: the measurement plus a margin.
    assert full_unet_errors["int8"] <= 0.035


@pytest.mark.full
def test_full_unet_fp16_error(full_unet_errors):
    # Measured 1.5e-3 here (fp16 weights, fp32 compute); 1.1e-3 on an H200 at 64x64.
    assert full_unet_errors["fp16"] <= 2e-3


@pytest.mark.full
def test_full_text_encoder_int8_error():
    with torch.device("meta"):
        text = build_model("text", SD_V1)
    _random_(text, 1)
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = text(ids)
        err = rel_rms(quantize_model(text)(ids), ref)
    print(f"[int8] full text encoder context rel RMS error vs fp32: {err:.4f}")
    assert err <= 0.022  # measured 0.0183 (0.0235 with layer 0 in int8 too)


def test_quantizing_while_loading_equals_quantizing_the_loaded_model(tiny):
    """`quantize="int8"` on a float file: same int8 weights as quantize_model, every tensor a copy
    (nothing left pointing into the file's memory map), and a second load still reads the file."""
    from sdlite.checkpoint import open_checkpoint
    from sdlite.quantize import quantize_model

    ck = open_checkpoint(tiny.folder)
    reference = quantize_model(ck.load("unet"))
    ck.release()
    for _ in range(2):  # the second load must not see pages dropped by the first
        loaded = ck.load("unet", int8=True)
        ref_state, state = reference.state_dict(), loaded.state_dict()
        assert set(ref_state) == set(state)
        for k, v in state.items():
            assert torch.equal(v, ref_state[k]), k


# ------------------------------------------------------------------ review fixes (stop 17)


def test_converting_an_int8_file_without_int8_writes_plain_float_weights(files, tmp_path):
    """Other tools load an int8 file silently wrong (they copy the int8 values into float
    weights), so `convert` without --int8 writes each weight times its scales: a plain file."""
    from sdlite.quantize import SCALE_SUFFIX, dequantize

    out = export_checkpoint(files["int8"], tmp_path / "back.safetensors")
    src, _ = load_safetensors(files["int8"])
    got, meta = load_safetensors(out)
    assert not any(k.endswith(SCALE_SUFFIX) for k in got) and "sdlite.quantization" not in meta
    assert all(t.dtype == torch.float16 for t in got.values() if t.is_floating_point())
    assert not any(t.dtype == torch.int8 for t in got.values())
    key = next(k for k, t in src.items() if t.dtype == torch.int8)
    assert torch.equal(got[key], dequantize(src[key], src[key + SCALE_SUFFIX], torch.float16))
    assert open_checkpoint(out).quantization is None
    f32 = export_checkpoint(files["int8"], tmp_path / "back32.safetensors", dtype=torch.float32)
    assert load_safetensors(f32)[0][key].dtype == torch.float32


def test_nan_or_inf_weights_are_refused_by_int8_export_naming_the_key(tiny, tmp_path):
    state = {k: v.clone() for k, v in load_safetensors(export_checkpoint(tiny.folder, tmp_path / "a.safetensors"))[0].items()}
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    state[key][1].view(-1)[3] = float("nan")
    broken = tmp_path / "broken.safetensors"
    save_safetensors(state, broken)
    with pytest.raises(CheckpointError, match=r"input_blocks\.1\.0\.in_layers\.2\.weight has NaN/inf .*\[1\]"):
        export_checkpoint(broken, tmp_path / "b.safetensors", int8=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "broken.safetensors"]  # nothing partial


def test_an_integer_weight_without_scales_is_refused_when_opened(files, tmp_path):
    """What a key-filtering tool makes of an int8 file (the scales dropped): refused with its
    dtype, not accepted and failing later inside load_state_dict."""
    state = dict(load_safetensors(files["fp16"])[0])
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    state[key] = state[key].to(torch.int8)
    save_safetensors(state, tmp_path / "pruned.safetensors")
    with pytest.raises(CheckpointError, match=r"1 wrong dtypes: .*in_layers\.2\.weight int8 \(expected a float\)"):
        open_checkpoint(tmp_path / "pruned.safetensors")
