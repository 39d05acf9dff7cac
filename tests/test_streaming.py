"""Streamed (row-band) VAE decode and encode: equal the plain ones within float rounding for every
kind of layer the pipeline uses, and hold much less activation memory (counted op by op)."""

from __future__ import annotations

import pytest
import torch

from conftest import LivePeak
from refmodels import randomize_
from sdlite import streaming, tiling
from sdlite.checkpoint import open_checkpoint
from sdlite.config import SD_V1, VAEConfig
from sdlite.kernels import available as kernels_available, cpu_speed_up
from sdlite.precision import compute_in
from sdlite.vae import AutoencoderKL


def latents(shape, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def full_vae():
    with torch.device("meta"):
        vae = AutoencoderKL(SD_V1.vae)
    return randomize_(vae, 7).eval()


@pytest.fixture
def tiny_bands(monkeypatch):
    """Stream everything, in bands of a few rows (the tiny VAE's maps are small)."""
    monkeypatch.setattr(streaming, "STREAM_ABOVE_BYTES", 0)
    monkeypatch.setattr(streaming, "BAND_BYTES", 2048)


@pytest.fixture(scope="module")
def tiny_vae(tiny):
    return open_checkpoint(tiny.folder).load("vae")


def test_needs_streaming_threshold(full_vae):
    # SD: the 256-channel input of the full-resolution level is 64 MiB at 256x256 in float32
    assert not streaming.needs_streaming(full_vae, latents((1, 4, 32, 32)), torch.float32)
    assert streaming.needs_streaming(full_vae, latents((1, 4, 40, 32)), torch.float32)
    assert streaming.needs_streaming(full_vae, latents((1, 4, 64, 64)), torch.float16)
    assert not streaming.needs_streaming(full_vae, latents((1, 4, 40, 32)), torch.float16)


@pytest.mark.parametrize("shape", [(2, 4, 16, 12), (1, 4, 13, 10), (1, 4, 9, 40)])
def test_tiny_streamed_equals_plain(tiny_vae, tiny_bands, shape):
    z = latents(shape)
    with torch.inference_mode():
        ref = tiny_vae.decode(z)
        out = streaming.decode(tiny_vae, z)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 2e-5 * ref.abs().max().item()


def test_bands_really_split(tiny_vae, tiny_bands, monkeypatch):
    """With the tiny budget every map is cut in several bands and input bands are freed."""
    seen, freed = [], []
    make, free = streaming.Banded.__init__, streaming._norm_act_conv

    def record(self, bands):
        seen.append(len(bands))
        make(self, bands)

    def record_free(x, *args, **kwargs):
        out = free(x, *args, **kwargs)
        freed.append(all(b is None for b in x.bands) if kwargs.get("consume") else None)
        return out

    monkeypatch.setattr(streaming.Banded, "__init__", record)
    monkeypatch.setattr(streaming, "_norm_act_conv", record_free)
    with torch.inference_mode():
        streaming.decode(tiny_vae, latents((1, 4, 16, 16)))
    assert max(seen) >= 4
    assert any(f is True for f in freed) and all(f in (True, None) for f in freed)


@pytest.mark.parametrize("kind", ["kernels", "winograd", "fp16-stored", "bf16", "fp16"])
def test_tiny_streamed_equals_plain_for_each_layer_kind(tiny, tiny_bands, kind, monkeypatch):
    vae = open_checkpoint(tiny.folder).load("vae")
    z, dtype = latents((1, 4, 12, 16)), torch.float32
    if kind in ("kernels", "winograd"):
        if not kernels_available():
            pytest.fail("oneDNN kernels unavailable on this CPU build (they are expected on x86 Linux)")
        cpu_speed_up(vae)
        if kind == "winograd":  # every 3x3 convolution, the band ones computing only their inner rows
            from sdlite import kernels

            monkeypatch.setattr(kernels, "WINOGRAD_MIN_PIXELS", 0)
            monkeypatch.setattr(kernels, "WINOGRAD_MIN_CHANNELS", 0)
            calls = []
            real = kernels.winograd_conv3x3
            monkeypatch.setattr(kernels, "winograd_conv3x3", lambda *a, **k: calls.append(k["pad_rows"]) or real(*a, **k))
    elif kind == "fp16-stored":
        vae = compute_in(vae.half(), torch.float32)
    else:  # reduced-precision compute, as on GPUs (fp16 is CUDA's default)
        dtype = torch.bfloat16 if kind == "bf16" else torch.float16
        vae = vae.to(dtype)
    image = torch.rand((1, 3, 22, 30), generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert next(vae.parameters()).dtype == (torch.float16 if kind == "fp16-stored" else dtype)
    with torch.inference_mode():
        ref = vae.decode(z.to(dtype)).float()
        out = streaming.decode(vae, z.to(dtype)).float()
        ref_enc = vae.encode(image.to(dtype))
        out_enc = streaming.encode(vae, image.to(dtype))
    # relative to max |ref|; fp16 measured 1e-3 (plain fp16 vs fp32: 1.4e-3), bf16 0
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert (out - ref).abs().max().item() < tol * ref.abs().max().item()
    for a, b in zip(out_enc, ref_enc):
        assert (a.float() - b.float()).abs().max().item() < tol * b.float().abs().max().item()
    if kind == "winograd":
        assert 0 in calls and 1 in calls  # band convolutions, and whole-map ones


@pytest.fixture(scope="module")
def three_level_vae():
    """Two downsamples, so the second one can see an odd height (a 30-row image: 30 -> 15 -> 7)."""
    return randomize_(AutoencoderKL(VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8)), 11).eval()


@pytest.mark.parametrize("which, shape", [("tiny", (2, 3, 32, 24)), ("tiny", (1, 3, 26, 20)),
                                          ("tiny", (1, 3, 18, 14)), ("three", (1, 3, 36, 28)),
                                          ("three", (2, 3, 30, 22)), ("three", (1, 3, 28, 13))])
def test_streamed_encode_equals_plain(tiny_vae, three_level_vae, tiny_bands, monkeypatch, which, shape):
    """Posterior mean and logvar, with the encode really banded (downsamples counted)."""
    vae = tiny_vae if which == "tiny" else three_level_vae
    calls = []
    real = streaming._downsample
    monkeypatch.setattr(streaming, "_downsample", lambda layer, x: calls.append(len(x.bands)) or real(layer, x))
    image = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        ref = vae.encode(image)
        out = streaming.encode(vae, image)
    assert len(calls) == len(vae.cfg.ch_mult) - 1 and max(calls) >= 2  # streamed, in several bands
    for a, b in zip(out, ref):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 2e-5 * b.abs().max().item()


def test_full_sd_streamed_equals_plain(full_vae, monkeypatch):
    """The SD decoder and encoder at 320x320 (the decode streams at this size in float32; the
    encode is made to): max abs diff within float rounding."""
    z = latents((1, 4, 40, 40), seed=3)
    assert streaming.needs_streaming(full_vae, z, torch.float32)
    with torch.inference_mode():
        ref = full_vae.decode(z)
        out = streaming.decode(full_vae, z)
    assert (out - ref).abs().max().item() < 2e-5 * ref.abs().max().item()  # measured 3.8e-6 of 3.76
    image = torch.rand((1, 3, 320, 320), generator=torch.Generator().manual_seed(3)) * 2 - 1
    monkeypatch.setattr(streaming, "STREAM_ABOVE_BYTES", 0)  # 320x320 is below the encode threshold
    with torch.inference_mode():
        ref_enc = full_vae.encode(image)
        out_enc = streaming.encode(full_vae, image)
    for a, b in zip(out_enc, ref_enc):
        assert (a - b).abs().max().item() < 2e-5 * b.abs().max().item()


def activation_peaks(plain, streamed, arg) -> dict[str, int]:
    """Peak bytes of live activations of each function on `arg`, counted at every aten op."""
    peaks = {}
    with torch.inference_mode():
        for name, fn in (("plain", plain), ("streamed", streamed)):
            with LivePeak() as counter:
                out = fn(arg)
            del out
            peaks[name] = counter.peak
    return peaks


def test_full_sd_streamed_holds_half_the_activations(full_vae):
    """The streamed 384x384 decode holds under 0.6x of what the plain decode holds (measured 191
    vs 360 MiB: 0.53x; 0.51x at 512x512: 327 vs 640 MiB)."""
    peaks = activation_peaks(full_vae.decode, lambda z: streaming.decode(full_vae, z), latents((1, 4, 48, 48), 4))
    assert peaks["plain"] > 10 * 3 * 384 * 384 * 4  # sanity: the counter sees the activations
    assert peaks["streamed"] < 0.6 * peaks["plain"], peaks


def test_reduced_precision_stream_adds_no_float32_band_copies(full_vae):
    """GroupNorm in bfloat16/float16 is computed in float32; the streamed decode does that a few
    rows at a time, so its activations are about half the float32 decode's (384x384: 101 vs 190
    MiB). Whole-band float32 copies, as before, made it 128 MiB (0.67x)."""
    import copy

    z = latents((1, 4, 48, 48), 4)
    half = copy.deepcopy(full_vae).to(torch.bfloat16)
    fp32 = activation_peaks(lambda z: z, lambda z: streaming.decode(full_vae, z), z)["streamed"]
    bf16 = activation_peaks(lambda z: z, lambda z: streaming.decode(half, z), z.to(torch.bfloat16))["streamed"]
    assert bf16 < 0.56 * fp32, (bf16, fp32)


def test_full_sd_streamed_encode_holds_less(full_vae):
    """The encoder streamed at 384x384 holds under 0.66x of the plain encoder's activations
    (measured 178 vs 288 MiB: 0.62x; 314 vs 512 MiB at 512x512). A plain resnet block keeps its
    input for the residual add while its first conv's output is made, so 2 full maps remain."""
    image = torch.rand((1, 3, 384, 384), generator=torch.Generator().manual_seed(4)) * 2 - 1
    peaks = activation_peaks(full_vae.encode, lambda x: streaming.encode(full_vae, x), image)
    assert peaks["plain"] > 2 * 128 * 384 * 384 * 4  # sanity: at least two full-resolution maps seen
    assert peaks["streamed"] < 0.66 * peaks["plain"], peaks


@pytest.mark.parametrize("direction", ["decode", "encode"])
def test_auto_path_streams_large_images(tiny_vae, tiny_bands, monkeypatch, direction):
    calls = []
    real = getattr(streaming, direction)
    monkeypatch.setattr(streaming, direction, lambda vae, t: calls.append(tuple(t.shape)) or real(vae, t))
    if direction == "decode":
        arg = latents((2, 4, 10, 12))
    else:
        arg = torch.rand((2, 3, 20, 24), generator=torch.Generator().manual_seed(2)) * 2 - 1
    front = getattr(tiling, direction)
    with torch.inference_mode():
        out, plain = front(tiny_vae, arg, "auto"), front(tiny_vae, arg, "off")
    assert calls == [(1, *arg.shape[1:])] * 2  # one image at a time
    for a, b in zip(*((out, plain) if direction == "encode" else ((out,), (plain,)))):
        assert (a - b).abs().max().item() < 2e-5 * b.abs().max().item()


@pytest.mark.parametrize("offset", [0.0, 300.0, 3000.0])
def test_group_norm_statistics_survive_a_large_mean(offset):
    """Band statistics are shifted sums: a mean far from zero against the spread costs no more
    accuracy than torch's own GroupNorm (plain float32 sums of x^2 lost 100x more at 300)."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(32))
        norm.bias.copy_(0.05 * torch.randn(32))
        x = torch.randn(2, 32, 40, 24) + offset
        ref = torch.nn.functional.group_norm(x.double(), 8, norm.weight.double(), norm.bias.double(), 1e-6)
        a, b = streaming._group_norm_affine(streaming.Banded.split(x, 7), norm)
        ours = (x * a + b).double()
        torch_err = (norm(x).double() - ref).abs().max().item()
    assert (ours - ref).abs().max().item() <= 3 * torch_err + 1e-6


@pytest.mark.parametrize("memory", ["normal", "low"])
def test_pipeline_streams_decode_always_and_encode_outside_low_mode(tiny, tiny_bands, monkeypatch, memory):
    """Low mode encodes with the plain encoder (a streamed encode raised its next stage's RSS peak
    by 0.1 GiB at 512x512, measured); every mode streams large decodes."""
    from PIL import Image

    from sdlite.pipeline import StableDiffusion

    used = []
    for name in ("encode", "decode"):
        real = getattr(streaming, name)
        monkeypatch.setattr(streaming, name, lambda vae, t, real=real, name=name: used.append(name) or real(vae, t))
    sd = StableDiffusion(tiny.folder, memory=memory)
    init = Image.new("RGB", (32, 24), (120, 60, 200))
    sd.img2img("a red house", init, strength=0.5, steps=2, sampler="ddim", seed=1)
    assert used == (["decode"] if memory == "low" else ["encode", "decode"])


def test_band_size_off_the_cpu():
    """Bands are BAND_BYTES on the CPU (cache-sized, fastest there) and DEVICE_BAND_BYTES on a GPU
    (smaller, for a lower peak): the 256-channel 512x512 float16 map of SD's decoder (128 MiB)."""
    cpu = torch.empty((1, 256, 512, 512), dtype=torch.float16, device="cpu")
    gpu_like = torch.empty((1, 256, 512, 512), dtype=torch.float16, device="meta")
    assert streaming._band_rows(cpu) * 256 * 512 * 2 == streaming.BAND_BYTES == 16 * 2**20
    assert streaming._band_rows(gpu_like) * 256 * 512 * 2 == streaming.DEVICE_BAND_BYTES == 8 * 2**20
