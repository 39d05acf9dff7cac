"""Exact CPU kernels (kernels.py): same results as the eager layers, within float32 rounding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close
from refmodels import randomize_
from sdlite import kernels, unet as unet_mod, vae as vae_mod
from sdlite.checkpoint import build_model, open_checkpoint
from sdlite.config import TINY
from sdlite.pipeline import StableDiffusion
from sdlite.quantize import drop_pages



def test_kernels_are_available_on_this_build():
    """The exact CPU kernels are what exact mode uses on x86: their self-test must pass here."""
    assert kernels.available()


def randomized(meta: nn.Module, seed: int) -> nn.Module:
    return randomize_(meta, seed).eval()


@pytest.mark.parametrize("channels,out_channels,h,w", [(8, 8, 5, 7), (16, 24, 8, 8), (3, 5, 1, 1)])
def test_transposed_taps_equal_nearest_upsample_then_conv(channels, out_channels, h, w):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, out_channels, 3, padding=1)
    x = torch.randn(2, channels, h, w)
    reference = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    ours = F.conv_transpose2d(x, kernels.transposed_taps(conv.weight.detach()), conv.bias, stride=2, padding=1)
    assert_close(ours, reference, rel=1e-5, what="upsample as transposed conv")


def test_upsample_swaps_match_and_keep_odd_sizes():
    torch.manual_seed(1)
    up = unet_mod.Upsample(16)
    swapped = kernels.cpu_speed_up(copy.deepcopy(up))
    assert type(swapped) is kernels.TransposedUNetUpsample
    x = torch.randn(2, 16, 5, 6)
    with torch.inference_mode():
        for size in [(10, 12), (9, 11)]:  # 9x11: a skip of an odd latent size takes the plain path
            assert_close(swapped(x, size), up(x, size), rel=1e-5, what=f"UNet upsample to {size}")
    vup = vae_mod.Upsample(8)
    vswapped = kernels.cpu_speed_up(copy.deepcopy(vup))
    assert type(vswapped) is kernels.TransposedVAEUpsample
    with torch.inference_mode():
        assert_close(vswapped(x[:, :8]), vup(x[:, :8]), rel=1e-5, what="VAE upsample")


@pytest.fixture
def winograd_everywhere(monkeypatch):
    """Every 3x3 stride-1 convolution through Winograd (the tiny models' maps are below the
    size where exact mode uses it)."""
    monkeypatch.setattr(kernels, "WINOGRAD_MIN_PIXELS", 0)
    monkeypatch.setattr(kernels, "WINOGRAD_MIN_CHANNELS", 0)


@pytest.mark.parametrize("points", [kernels.WINOGRAD_POINTS, (0.0, 1.0, -1.0, 2.0, -2.0)])
def test_toom_cook_matrices_compute_the_correlation(points):
    """A^T [(G g) * (B^T d)] is the 4-output correlation of a 6-tap input with a 3-tap filter
    (float64: exact up to rounding), for our points and the textbook ones."""
    at, g, bt = kernels._toom_cook(points)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        d, f = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
        expect = torch.stack([(d[i:i + 3] * f).sum() for i in range(4)])
        assert torch.allclose(at @ ((g @ f) * (bt @ d)), expect, atol=1e-12)


@pytest.mark.parametrize("n,c,k,h,w", [(1, 8, 16, 8, 12), (2, 12, 8, 17, 5), (1, 32, 24, 34, 20), (1, 4, 4, 1, 1),
                                       (2, 16, 16, 3, 2)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_winograd_conv3x3_equals_conv2d(n, c, k, h, w, layout, monkeypatch):
    """F(4x4, 3x3) against a float64 convolution: ragged tile edges, both layouts, with and
    without bias, one tile row per band and one band for all; a result in channels-last."""
    gen = torch.Generator().manual_seed(h * w + c)
    x = torch.randn(n, c, h, w, generator=gen)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 3, 3, generator=gen) / (3 * c**0.5)
    bias = torch.randn(k, generator=gen)
    for band_bytes in (1, 1 << 30):
        monkeypatch.setattr(kernels, "WINOGRAD_BAND_BYTES", band_bytes)
        for b, pad_rows in ((bias, 1), (None, 1), (bias, 0)):
            if h + 2 * pad_rows < 3:
                continue
            ours = kernels.winograd_conv3x3(x, weight, b, pad_rows=pad_rows)
            expect = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=(pad_rows, 1))
            assert ours.is_contiguous(memory_format=torch.channels_last) and ours.dtype == torch.float32
            assert_close(ours, expect, rel=1e-5,
                         what=f"winograd {tuple(x.shape)} band {band_bytes} bias {b is not None} pad_rows {pad_rows}")


def test_packed_convolutions_use_winograd_only_where_it_pays(monkeypatch):
    """3x3 stride-1 convolutions on maps of WINOGRAD_MIN_PIXELS (batch x height x width) with
    WINOGRAD_MIN_CHANNELS in and out; strided, 1x1, narrow or small ones stay on oneDNN."""
    calls = []
    real = kernels.winograd_conv3x3
    monkeypatch.setattr(kernels, "winograd_conv3x3", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(kernels, "WINOGRAD_MIN_PIXELS", 2 * 16 * 16)
    monkeypatch.setattr(kernels, "WINOGRAD_MIN_CHANNELS", 16)
    torch.manual_seed(0)
    cases = [  # (conv, input shape, expected to use Winograd)
        (nn.Conv2d(16, 24, 3, padding=1), (2, 16, 16, 16), True),
        (nn.Conv2d(16, 24, 3, padding=1), (1, 16, 16, 32), True),
        (nn.Conv2d(16, 24, 3, padding=1), (1, 16, 16, 16), False),  # too few pixels
        (nn.Conv2d(8, 24, 3, padding=1), (2, 8, 16, 16), False),  # too few input channels
        (nn.Conv2d(16, 8, 3, padding=1), (2, 16, 16, 16), False),  # too few output channels
        (nn.Conv2d(16, 24, 3, padding=1, stride=2), (2, 16, 16, 16), False),
        (nn.Conv2d(16, 24, 1), (2, 16, 16, 16), False),
        (nn.Conv2d(16, 24, 3, padding=2, dilation=2), (2, 16, 16, 16), False),
        (nn.Conv2d(16, 24, 3, padding=1, groups=2), (2, 16, 16, 16), False),
    ]
    for conv, shape, expected in cases:
        packed = kernels.cpu_speed_up(nn.Sequential(copy.deepcopy(conv)))
        x = torch.randn(shape)
        calls.clear()
        with torch.inference_mode():
            assert_close(packed(x), conv(x), rel=1e-5, what=f"{conv} on {shape}")
        assert bool(calls) == expected, f"{conv} on {shape}: winograd used {bool(calls)}"


def test_conv_inner_rows_drops_the_padded_rows(monkeypatch):
    """streaming.py's band convolution: conv(x) without its first and last rows, computed
    without them by Winograd where it pays, by the layer itself otherwise."""
    calls = []
    real = kernels.winograd_conv3x3
    monkeypatch.setattr(kernels, "winograd_conv3x3", lambda *a, **k: calls.append(k["pad_rows"]) or real(*a, **k))
    monkeypatch.setattr(kernels, "WINOGRAD_MIN_PIXELS", 16 * 16)
    monkeypatch.setattr(kernels, "WINOGRAD_MIN_CHANNELS", 8)
    torch.manual_seed(2)
    for conv, shape, winograd in [(nn.Conv2d(8, 16, 3, padding=1), (1, 8, 18, 16), True),
                                  (nn.Conv2d(8, 16, 3, padding=1), (1, 8, 10, 16), False),
                                  (nn.Conv2d(8, 16, 1), (1, 8, 18, 16), False)]:
        packed = kernels.cpu_speed_up(nn.Sequential(copy.deepcopy(conv)))[0]
        x = torch.randn(shape)
        calls.clear()
        with torch.inference_mode():
            assert_close(kernels.conv_inner_rows(packed, x), conv(x)[:, :, 1:-1], rel=1e-5, what=f"{conv} {shape}")
        assert calls == ([0] if winograd else [])


@pytest.mark.parametrize("component,winograd", [("unet", False), ("vae", False), ("text", False), ("unet", True),
                                                ("vae", True)])
def test_swapped_models_equal_eager(component, winograd, request):
    if winograd:
        request.getfixturevalue("winograd_everywhere")
    with torch.device("meta"):
        meta = build_model(component, TINY)
    eager = randomized(meta, seed=3)
    state = {k: v.clone() for k, v in eager.state_dict().items()}
    fast = kernels.cpu_speed_up(copy.deepcopy(eager))
    kinds = {type(m) for m in fast.modules()}
    assert kernels.PackedConv2d in kinds or kernels.PackedLinear in kinds
    if component == "unet":
        assert {kernels.SplitGEGLU, kernels.TransposedUNetUpsample} <= kinds
    # The parameters (and so state dicts, exports, hashes) are unchanged.
    assert all(torch.equal(state[k], v) for k, v in fast.state_dict().items())
    g = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        if component == "unet":
            context = torch.randn(2, 77, TINY.text.width, generator=g)
            # Two sizes in a row: the packed weights are re-made for the new input shape.
            for hw in [(8, 8), (6, 10), (8, 8)]:
                x = torch.randn(2, 4, *hw, generator=g)
                t = torch.tensor([10.0, 700.0])
                assert_close(fast(x, t, context), eager(x, t, context), what=f"unet {hw}")
        elif component == "vae":
            z = torch.randn(1, 4, 6, 10, generator=g)
            assert_close(fast.decode(z), eager.decode(z), what="vae decode")
            img = torch.rand(1, 3, 48, 40, generator=g) * 2 - 1
            assert_close(fast.encode(img)[0], eager.encode(img)[0], what="vae encode")
        else:
            ids = torch.randint(0, TINY.text.vocab_size, (2, 77), generator=g)
            assert_close(fast(ids), eager(ids), what="text encoder")


def test_changed_weights_are_packed_again():
    """Loading new weights into a swapped model (in place, or replacing the tensors) is seen."""
    with torch.device("meta"):
        meta = build_model("unet", TINY)
    eager = randomized(meta, seed=6)
    fast = kernels.cpu_speed_up(copy.deepcopy(eager))
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([50.0]), torch.randn(1, 77, TINY.text.width)
    with torch.inference_mode():
        fast(x, t, c)  # packs the first weights
    new = randomized(copy.deepcopy(eager), seed=7)
    fast.load_state_dict(new.state_dict())  # in place: version counters move
    with torch.inference_mode():
        assert_close(fast(x, t, c), new(x, t, c), what="after load_state_dict")
    newer = randomized(copy.deepcopy(eager), seed=8)
    fast.load_state_dict(newer.state_dict(), assign=True)  # new tensors
    with torch.inference_mode():
        assert_close(fast(x, t, c), newer(x, t, c), what="after load_state_dict(assign=True)")
    newest = randomized(copy.deepcopy(eager), seed=9)
    with torch.no_grad():  # the same Parameter objects, new data (what parking.py does)
        for p, q in zip(fast.parameters(), newest.parameters(), strict=True):
            p.data = q.detach().clone()
    with torch.inference_mode():
        assert_close(fast(x, t, c), newest(x, t, c), what="after .data was replaced")


def test_other_layers_are_left_alone():
    """Cast-on-the-fly and int8 layers, and non-float32 weights, keep their own classes."""
    from sdlite.precision import compute_in

    with torch.device("meta"):
        meta = build_model("unet", TINY)
    half = randomized(meta, seed=5).half()
    compute_in(half, torch.float32)
    before = [type(m) for m in half.modules()]
    kernels.cpu_speed_up(half)
    assert [type(m) for m in half.modules()] == before


def test_drop_pages_only_touches_file_mappings(tmp_path):
    anonymous = torch.randn(1 << 18)
    expected = anonymous.clone()
    drop_pages(anonymous)  # anonymous memory would read back as zeros if it were dropped
    assert torch.equal(anonymous, expected)


def test_winograd_layers_hold_no_packed_copy_and_drop_released_pages(monkeypatch):
    """A layer that runs by Winograd frees a packed copy made for an earlier (smaller) input,
    works outside no_grad like the packed path, and with release=True drops its weight's pages
    after each call."""
    monkeypatch.setattr(kernels, "WINOGRAD_MIN_PIXELS", 16 * 16)
    monkeypatch.setattr(kernels, "WINOGRAD_MIN_CHANNELS", 8)
    dropped = []
    monkeypatch.setattr(kernels, "drop_pages", lambda t: dropped.append(t))
    conv = nn.Conv2d(8, 16, 3, padding=1)
    packed = kernels.cpu_speed_up(nn.Sequential(copy.deepcopy(conv)), release=True)[0]
    small, large = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 16, 16)
    with torch.inference_mode():
        packed(small)
    assert packed.packed.entry is not None and len(dropped) == 1  # packed, then its pages dropped
    y = packed(large)  # grad mode on, as a user's own call may be
    assert packed.packed.entry is None and len(dropped) == 2 and dropped[-1] is packed.weight
    assert_close(y, conv(large).detach(), rel=1e-5, what="winograd layer in grad mode")


def test_release_keeps_mapped_weights_readable(tiny):
    """release=True drops the file pages of packed weights; they read back from the file."""
    ck = open_checkpoint(tiny.folder)
    ck.release()
    model = ck.load("unet")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    kernels.cpu_speed_up(model, release=True)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([50.0]), torch.randn(1, 77, TINY.text.width)
    with torch.inference_mode():
        model(x, t, c)  # packs, then drops the pages of the original weights
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())


def test_pipeline_uses_kernels_in_normal_mode_and_for_the_vae(tiny):
    normal = StableDiffusion(tiny.folder)
    assert any(isinstance(m, kernels.PackedConv2d) for m in normal.unet.modules())
    assert any(isinstance(m, kernels.TransposedVAEUpsample) for m in normal.vae.modules())
    low = StableDiffusion(tiny.folder, memory="low")
    unet = low.resident("unet")
    assert not any(isinstance(m, (kernels.PackedConv2d, kernels.PackedLinear)) for m in unet.modules())
    low.done_with("unet")
    vae = low.resident("vae")  # runs once per image: packed in low mode too
    assert any(isinstance(m, kernels.PackedConv2d) for m in vae.modules())
    assert any(isinstance(m, kernels.TransposedVAEUpsample) for m in vae.modules())


@pytest.mark.parametrize("winograd", [False, True], ids=["onednn", "winograd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stored_reduced_precision_layers_are_packed_from_their_float32_form(dtype, winograd, request):
    """stored=True packs precision.Cast layers (fp16/bf16 weights computed in float32) from the
    float32 conversion they compute with: the same results as casting on every call, the stored
    weights unchanged; without stored=True they are left alone (test_other_layers_are_left_alone)."""
    from sdlite.precision import compute_in

    if winograd:
        request.getfixturevalue("winograd_everywhere")

    with torch.device("meta"):
        meta = build_model("vae", TINY)
    cast = compute_in(randomized(meta, seed=11).to(dtype), torch.float32)
    state = {k: v.clone() for k, v in cast.state_dict().items()}
    packed = kernels.cpu_speed_up(copy.deepcopy(cast), stored=True)
    kinds = {type(m) for m in packed.modules()}
    assert {kernels.PackedCastConv2d, kernels.TransposedVAEUpsample} <= kinds
    g = torch.Generator().manual_seed(12)
    z = torch.randn(1, 4, 6, 10, generator=g)
    img = torch.rand(1, 3, 48, 40, generator=g) * 2 - 1
    with torch.inference_mode():
        assert packed.decode(z).dtype == torch.float32
        assert_close(packed.decode(z), cast.decode(z), what=f"{dtype} VAE decode, packed")
        assert_close(packed.encode(img)[0], cast.encode(img)[0], what=f"{dtype} VAE encode, packed")
        # another input dtype falls back to casting on the fly
        assert packed.decode(z.to(dtype)).dtype == dtype
    assert all(v.dtype == dtype and torch.equal(state[k], v) for k, v in packed.state_dict().items()
               if v.is_floating_point())
    linear = compute_in(nn.Sequential(nn.Linear(24, 40)).to(dtype), torch.float32)
    packed_linear = kernels.cpu_speed_up(copy.deepcopy(linear), stored=True)
    assert type(packed_linear[0]) is kernels.PackedCastLinear
    x = torch.randn(3, 24, generator=g)
    with torch.inference_mode():
        assert_close(packed_linear(x), linear(x), rel=1e-6, what=f"{dtype} linear, packed")
