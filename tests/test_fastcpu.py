"""CPU fast mode (fastcpu.py): int8 x uint8 products, checked against their exact definition
and, end to end, against exact mode (decoded-image PSNR, the issue's bar for int8 paths)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close
from sdlite import fastcpu
from sdlite.pipeline import StableDiffusion
from sdlite.quantize import Int8Conv2d, Int8Linear, dequantize

needs_fast = pytest.mark.skipif(not fastcpu.available(), reason="no VNNI or no oneDNN int8 operators here")


def test_fast_mode_is_available_on_a_vnni_cpu():
    """Where the CPU has VNNI (this machine and CI do), the int8 operators' self-test passes,
    so none of the tests below is skipped."""
    if torch.cpu._is_vnni_supported():
        assert fastcpu.available()


def psnr(a, b) -> float:
    mse = ((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@needs_fast
@pytest.mark.parametrize("shift", [0.0, 0.7, -2.0])
def test_quantize_input_round_trip(shift):
    x = torch.randn(2, 8, 5, 7) + shift
    x[0, 0, 0, 0] = 0.0
    q, scale, zp, finite = fastcpu.quantize_input(x)
    assert finite and q.dtype == torch.uint8 and q.shape == x.shape
    back = (q.float() - zp) * scale
    assert (back - x).abs().max() <= scale / 2 + 1e-6
    assert 0 <= zp <= 255 and q[0, 0, 0, 0] == zp  # zero is exact: convolution's zero padding stays exact
    q0, s0, z0, _ = fastcpu.quantize_input(torch.zeros(3, 4))
    assert s0 == 1.0 and z0 == 0 and not q0.any()


def _dequantized_input(x):
    q, scale, zp, _ = fastcpu.quantize_input(x)
    return (q.float() - zp) * scale


@needs_fast
@pytest.mark.parametrize("kind", ["conv3", "conv1", "down", "linear"])
def test_fast_layers_compute_the_quantized_product(kind):
    """The oneDNN kernels equal the float product of the dequantized input and weight, and
    stay within int8 error of the float layer."""
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(48, 40), torch.randn(2, 9, 48)
    else:
        k, s, p = {"conv3": (3, 1, 1), "conv1": (1, 1, 0), "down": (3, 2, 0)}[kind]
        layer, x = nn.Conv2d(24, 32, k, stride=s, padding=p), F.silu(torch.randn(2, 24, 11, 9))
    int8 = (Int8Linear if kind == "linear" else Int8Conv2d).from_float(layer)
    w = dequantize(int8.weight, int8.weight_scale)
    fast = fastcpu.fast_int8(copy.deepcopy(int8))
    assert type(fast) in (fastcpu.FastInt8Linear, fastcpu.FastInt8Conv2d) and fast.weight.numel() == 0
    with torch.inference_mode():
        y = fast(x)
        xd = _dequantized_input(x)
        exact = F.linear(xd, w, layer.bias) if kind == "linear" else \
            F.conv2d(xd, w, layer.bias, layer.stride, layer.padding)
        assert_close(y, exact, rel=1e-5, what=f"{kind}: oneDNN int8 vs its definition")
        ref = layer(x)
        err = ((y - ref).norm() / ref.norm()).item()
    assert err < 0.02, f"{kind}: relative error {err:.4f} against the float layer"
    bad = x.clone()
    bad.view(-1)[3] = float("nan")
    with torch.inference_mode():
        assert fast(bad).isnan().all()  # a diverged input stays visible, as in the float layer


@needs_fast
def test_fast_geglu_computes_the_quantized_product():
    """A GEGLU on an int8 projection becomes two oneDNN products of one quantized input, the
    gate's with GELU on its output: equal to the unfused definition on the dequantized input
    and weight, within int8 error of the float GEGLU."""
    from sdlite.unet import GEGLU

    torch.manual_seed(0)
    ref = GEGLU(48, 40)
    int8 = copy.deepcopy(ref)
    int8.proj = Int8Linear.from_float(ref.proj)
    w = dequantize(int8.proj.weight, int8.proj.weight_scale)
    fast = fastcpu.fast_int8(copy.deepcopy(int8))
    assert type(fast) is fastcpu.FastInt8GEGLU and not hasattr(fast, "proj")
    x = torch.randn(2, 9, 48)
    with torch.inference_mode():
        y = fast(x)
        value, gate = F.linear(_dequantized_input(x), w, ref.proj.bias).chunk(2, dim=-1)
        assert_close(y, value * F.gelu(gate), rel=1e-5, what="fast GEGLU vs its definition")
        expect = ref(x)
        err = ((y - expect).norm() / expect.norm()).item()
        assert err < 0.02, f"relative error {err:.4f} against the float GEGLU"
        bad = x.clone()
        bad.view(-1)[5] = float("nan")
        assert fast(bad).isnan().all()


@needs_fast
@pytest.mark.full
def test_fast_mode_on_the_cpu(full):
    """Full SD v1 architecture (seeded weights of realistic scale): the decoded image of fast
    mode stays within 35 dB PSNR of exact mode's, the bar the issue sets for int8 paths."""
    args = dict(width=128, height=128, steps=8, sampler="ddim", seed=3)
    exact = StableDiffusion(full.folder).txt2img("a red house by a lake", "blurry", **args).images[0]
    sd = StableDiffusion(full.folder, fast=True)
    kinds = {type(m) for m in sd.unet.modules()}
    assert {fastcpu.FastInt8Conv2d, fastcpu.FastInt8Linear, fastcpu.FastInt8GEGLU} <= kinds
    fast = sd.txt2img("a red house by a lake", "blurry", **args).images[0]
    value = psnr(fast, exact)
    print(f"[psnr] CPU fast mode vs exact, full SD v1, 128x128, 8 DDIM steps: {value:.2f} dB")
    assert value >= 35.0


@needs_fast
def test_fast_mode_with_low_memory(tiny):
    sd = StableDiffusion(tiny.folder, fast=True, memory="low")
    res = sd.txt2img("a cat", width=32, height=32, steps=2, seed=1)
    assert res.images[0].size == (32, 32) and res.params[0]["fast"] is True
    unet = sd.resident("unet")
    assert any(isinstance(m, fastcpu.FastInt8Conv2d) for m in unet.modules())


def test_fast_mode_off_cpu_float32_warns_and_runs_exact(tiny, monkeypatch):
    from sdlite import precision

    monkeypatch.setattr(precision, "cpu_slowdown", lambda dtype: 1.0)  # compute in bf16 even if emulated
    with pytest.warns(UserWarning, match="fast mode on the CPU"):
        sd = StableDiffusion(tiny.folder, fast=True, dtype=torch.bfloat16)
    assert not any(isinstance(m, fastcpu.FastInt8Conv2d) for m in sd.unet.modules())
    assert sd.run_options()["fast"] is False  # recorded as it ran: exact
