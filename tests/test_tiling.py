"""Tiled VAE: exact when one tile covers the input, bounded seam error otherwise, the `auto`
policy (size threshold, out-of-memory retry), odd sizes, bad options, and what a tiled run
allocates. Tiny VAE (downscale 2) for speed; the full SD VAE with random weights for the figures."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import LargestOutput
from refmodels import randomize_
from sdlite import tiling
from sdlite.attention import attention_mode
from sdlite.checkpoint import build_model, open_checkpoint
from sdlite.config import SD_V1
from sdlite.errors import InputError
from sdlite.tiling import decode, encode, tiled_decode, tiled_encode


@pytest.fixture(scope="module")
def vae(tiny):
    model = open_checkpoint(tiny.folder).load("vae")
    assert model.cfg.downscale == 2, "these tests assume the tiny VAE's downscale of 2"
    return model


def latents(shape, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def image(shape, seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def seam_error(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs diff, PSNR in dB for a [-1, 1] signal, i.e. peak-to-peak 2)."""
    diff = (out.double() - ref.double())
    return diff.abs().max().item(), 10 * math.log10(4 / max(diff.square().mean().item(), 1e-30))


class Calls:
    """Wraps a VAE method; records the spatial shape of every input it sees."""

    def __init__(self, fn, fail_above: int | None = None, error: Exception | None = None):
        self.fn, self.fail_above, self.error, self.shapes = fn, fail_above, error, []

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        if self.fail_above is not None and x.shape[-2] * x.shape[-1] > self.fail_above:
            raise self.error
        return self.fn(x)


# ---------------------------------------------------------------------------- exactness


def test_one_tile_covering_the_input_is_exact(vae):
    z = latents((2, 4, 20, 12))
    with torch.no_grad():
        expect = vae.decode(z)
        mean, logvar = vae.encode(image((2, 3, 40, 24)))
    for tile in (20, 64):
        assert torch.equal(tiled_decode(vae, z, tile=tile, overlap=4), expect)
        assert torch.equal(decode(vae, z, "on", tile=tile, overlap=4), expect)
        got = tiled_encode(vae, image((2, 3, 40, 24)), tile=2 * tile, overlap=8)
        assert torch.equal(got[0], mean) and torch.equal(got[1], logvar)
    with torch.no_grad():
        assert torch.equal(decode(vae, z, "off"), expect)


def test_weights_are_a_partition_of_unity():
    """Blend weights: positive, at most 1, summing to exactly 1 at every output pixel, and every
    overlap at least the requested one -- for sizes that are and are not multiples of the tile."""
    for size, tile, overlap, f in [(40, 16, 4, 2), (37, 16, 8, 8), (128, 64, 16, 8), (65, 64, 16, 1),
                                   (100, 10, 0, 1), (50, 12, 11, 3)]:
        spans = tiling._spans(size, tile, overlap, f)
        total = torch.zeros(size * f, dtype=torch.float64)
        for j, (s, e, w) in enumerate(spans):
            assert e - s == tile and w.numel() == tile * f and (w > 0).all() and (w <= 1 + 1e-6).all()
            total[s * f : e * f] += w.double()
            if j:
                assert spans[j - 1][1] - s >= overlap
        assert spans[0][0] == 0 and spans[-1][1] == size
        assert (total - 1).abs().max().item() < 1e-6, f"{(size, tile, overlap, f)}: weights sum to {total}"


# ---------------------------------------------------------------------------- seam error


# Bounds on the tiny VAE (random weights; decoded std ~0.6, |max| ~3). Measured: max abs diff
# 0.38-0.43, PSNR 28.2-32.5 dB -- spread over the whole image, not at the seams: GroupNorm
# statistics and the mid-block attention become per-tile. Broken assembly (weights not summing
# to one, a tile misplaced) measured max abs >= 1.6 and PSNR <= 22.3 dB on the same inputs.
TINY_DECODE_MAX_ABS, TINY_DECODE_MIN_PSNR = 0.75, 25.0


@pytest.mark.parametrize("shape, tile, overlap", [((2, 4, 40, 40), 24, 12), ((1, 4, 37, 23), 16, 8),
                                                  ((1, 4, 33, 70), 24, 6)])
def test_tiled_decode_error_is_bounded(vae, shape, tile, overlap):
    z = latents(shape, seed=1)
    with torch.no_grad():
        expect = vae.decode(z)
    out = tiled_decode(vae, z, tile=tile, overlap=overlap)
    assert out.shape == expect.shape == (shape[0], 3, shape[2] * 2, shape[3] * 2)
    assert torch.isfinite(out).all()
    max_abs, psnr = seam_error(out, expect)
    print(f"[tiling] tiny decode {shape} tile {tile}/{overlap}: max abs {max_abs:.3g}, PSNR {psnr:.1f} dB")
    assert max_abs <= TINY_DECODE_MAX_ABS and psnr >= TINY_DECODE_MIN_PSNR, \
        f"max abs {max_abs:.3g} (bound {TINY_DECODE_MAX_ABS}), PSNR {psnr:.1f} dB (bound {TINY_DECODE_MIN_PSNR})"


def test_blending_beats_butting_tiles(vae):
    """The ramps earn their keep: the same tiles put side by side without blending (overlap 0 and
    a grid that divides the input) give a clearly larger error than overlapping blended tiles."""
    z = latents((1, 4, 48, 48), seed=2)
    with torch.no_grad():
        expect = vae.decode(z)
    blended = seam_error(tiled_decode(vae, z, tile=24, overlap=12), expect)
    butted = seam_error(tiled_decode(vae, z, tile=24, overlap=0), expect)
    print(f"[tiling] tiny decode 48x48: blended {blended}, butted {butted}")
    assert blended[1] > butted[1] + 3, f"blended PSNR {blended[1]:.1f} dB vs butted {butted[1]:.1f} dB"


def test_tiled_encode_error_is_bounded(vae):
    x = image((2, 3, 90, 64), seed=3)
    with torch.no_grad():
        mean, logvar = vae.encode(x)
    got_mean, got_logvar = tiled_encode(vae, x, tile=48, overlap=16)  # 24 / 8 latent px
    assert got_mean.shape == mean.shape == (2, 4, 45, 32) and got_logvar.shape == logvar.shape
    for name, got, ref in (("mean", got_mean, mean), ("logvar", got_logvar, logvar)):
        max_abs, _ = seam_error(got, ref)
        rel = max_abs / ref.abs().max().item()
        print(f"[tiling] tiny encode {name}: max abs {max_abs:.3g} (max|ref| {ref.abs().max().item():.3g})")
        # measured: 9.8% (mean), 7.1% (logvar); broken assembly: >= 52%
        assert rel <= 0.2, f"encode {name}: max abs diff {max_abs:.3g} is {rel:.1%} of max|ref|"


# ---------------------------------------------------------------------------- memory




def test_tiled_decode_holds_only_the_output_and_one_tile(vae):
    """No op of a tiled decode returns anything larger than the output image or the largest
    activation of decoding one tile alone -- while the untiled decode's activations are 8x larger.
    (Chunked attention, so that the VAE's attention scores do not hide the conv activations.)"""
    z = latents((1, 4, 64, 64), seed=4)
    with torch.no_grad(), attention_mode("chunked", 256):
        with LargestOutput() as one_tile:
            vae.decode(z[..., :16, :16])
        with LargestOutput() as untiled:
            vae.decode(z)
        with LargestOutput() as tiled:
            out = tiled_decode(vae, z, tile=16, overlap=4)
    bound = max(out.numel(), one_tile.largest)
    print(f"[mem] largest tensor: tiled {tiled.largest}, one tile {one_tile.largest}, output {out.numel()}, "
          f"untiled {untiled.largest}")
    assert tiled.largest <= bound, f"tiled decode made a tensor of {tiled.largest} elements (> {bound})"
    assert untiled.largest >= 4 * bound, "control: the untiled decode's activations are much larger"


# ---------------------------------------------------------------------------- the auto policy


def test_auto_tiles_above_the_threshold_only(vae, monkeypatch):
    """96 x 96 latents (768 px in SD) decode in one untiled call; one row more is tiled."""
    assert tiling.AUTO_MAX_LATENT_PIXELS == 96 * 96
    for shape, tiled in (((1, 4, 96, 96), False), ((1, 4, 97, 96), True)):
        calls = Calls(vae.decode)
        monkeypatch.setattr(vae, "decode", calls)
        out = decode(vae, latents(shape))
        monkeypatch.undo()
        assert out.shape == (1, 3, shape[2] * 2, shape[3] * 2)
        if tiled:
            assert len(calls.shapes) == 4 and all(s[-2:] == (64, 64) for s in calls.shapes), calls.shapes
        else:
            assert calls.shapes == [shape]


@pytest.fixture
def cuda_free(monkeypatch):
    """torch.cuda.mem_get_info answering from a one-element list (free bytes)."""
    free = [0]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 80 * 2**30))
    return free


def test_plain_fits_counts_free_device_memory(cuda_free):
    """A plain pass fits when the driver's free bytes cover PLAIN_VALUES_PER_LATENT_PIXEL * p +
    PLAIN_SCORE_BUFFERS * p^2 values (p latent pixels) in the compute dtype; never off CUDA."""
    cuda = torch.device("cuda")

    def need(p, size):
        return (tiling.PLAIN_VALUES_PER_LATENT_PIXEL * p + tiling.PLAIN_SCORE_BUFFERS * p * p) * size

    p = 128 * 128  # a 1024x1024 SD image
    assert 6 * 2**30 < need(p, 2) < 7 * 2**30  # the README's "6.5 GiB"
    for free, fits in ((60 * 2**30, True), (need(p, 2), True), (need(p, 2) - 1, False)):
        cuda_free[0] = free
        assert tiling.plain_fits(cuda, torch.float16, p) is fits, free
    cuda_free[0] = need(p, 2)
    assert not tiling.plain_fits(cuda, torch.float32, p)  # 4-byte values: twice the bytes
    assert not tiling.plain_fits(cuda, torch.float16, 2 * p)  # the attention term grows with p^2:
    assert need(2 * p, 2) > 3 * need(p, 2)  # twice the pixels need more than three times the memory
    assert not tiling.plain_fits(torch.device("cpu"), torch.float16, 8 * 8)


@pytest.mark.parametrize("fits", [True, False])
def test_plain_runs_one_call_at_any_size_where_it_fits(vae, monkeypatch, fits):
    """`plain=True`: an image above the tiling threshold runs as one plain VAE call where it fits
    (the same call as tiling="off"), else is tiled; below the threshold it is plain or streamed."""
    monkeypatch.setattr(tiling, "plain_fits", lambda device, dtype, pixels: fits)
    monkeypatch.setattr(tiling, "AUTO_MAX_LATENT_PIXELS", 16 * 16)
    z, x = latents((2, 4, 24, 20), seed=8), image((1, 3, 48, 40), seed=9)
    with torch.no_grad():
        expect = torch.cat([vae.decode(z[i : i + 1]) for i in range(2)])
        expect_mean, _ = vae.encode(x)
    decodes, encodes = Calls(vae.decode), Calls(vae.encode)
    monkeypatch.setattr(vae, "decode", decodes)
    monkeypatch.setattr(vae, "encode", encodes)
    with torch.no_grad():
        out = decode(vae, z, tile=16, overlap=4, plain=True)
        mean, _ = encode(vae, x, tile=32, overlap=8, plain=True)
    if fits:
        assert decodes.shapes == [(1, 4, 24, 20)] * 2 and encodes.shapes == [(1, 3, 48, 40)]
        assert torch.equal(out, expect) and torch.equal(mean, expect_mean)
    else:
        assert len(decodes.shapes) == 2 * 4 and all(s[-2:] == (16, 16) for s in decodes.shapes)
        assert len(encodes.shapes) == 4 and all(s[-2:] == (32, 32) for s in encodes.shapes)
    monkeypatch.setattr(tiling, "AUTO_MAX_LATENT_PIXELS", 96 * 96)
    decodes.shapes.clear()
    with torch.no_grad():
        small = decode(vae, z[:1], plain=True)  # below the threshold: one call either way (plain or streamed)
    assert decodes.shapes == [(1, 4, 24, 20)] and torch.equal(small, expect[:1])


def test_plain_call_out_of_memory_retries_in_tiles(vae, monkeypatch):
    """Above the tiling threshold (lowered here), a plain call that runs out of memory is retried
    in tiles (without `plain` such an input would go to the tiles at once)."""
    monkeypatch.setattr(tiling, "plain_fits", lambda device, dtype, pixels: True)
    monkeypatch.setattr(tiling, "AUTO_MAX_LATENT_PIXELS", 16 * 16)
    z = latents((1, 4, 24, 20), seed=6)
    expect = tiled_decode(vae, z, tile=16, overlap=4)
    calls = Calls(vae.decode, fail_above=16 * 16, error=OOM_ERRORS[0])
    monkeypatch.setattr(vae, "decode", calls)
    with pytest.warns(UserWarning, match="ran out of memory.*retrying in tiles"):
        out = decode(vae, z, tile=16, overlap=4, plain=True)
    assert calls.shapes[0] == (1, 4, 24, 20) and len(calls.shapes) == 1 + 4
    assert torch.equal(out, expect)


def test_auto_decodes_one_image_at_a_time(vae, monkeypatch):
    z = latents((3, 4, 12, 10), seed=5)
    with torch.no_grad():
        expect = vae.decode(z)
    calls = Calls(vae.decode)
    monkeypatch.setattr(vae, "decode", calls)
    with torch.no_grad():
        out = decode(vae, z)
        mean, logvar = encode(vae, image((2, 3, 16, 16)))
    assert calls.shapes == [(1, 4, 12, 10)] * 3
    assert (out - expect).abs().max().item() <= 1e-5
    assert mean.shape == logvar.shape == (2, 4, 8, 8)


OOM_ERRORS = [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:119] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 9663676416 bytes."),
    RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"),
]


@pytest.mark.parametrize("error", OOM_ERRORS, ids=["cuda", "cpu", "mps"])
def test_auto_retries_in_tiles_after_out_of_memory(vae, monkeypatch, error):
    z = latents((1, 4, 24, 20), seed=6)  # below the auto threshold: tried untiled first
    expect = tiled_decode(vae, z, tile=16, overlap=4)
    calls = Calls(vae.decode, fail_above=16 * 16, error=error)
    monkeypatch.setattr(vae, "decode", calls)
    with pytest.warns(UserWarning, match="ran out of memory.*retrying in tiles"):
        out = decode(vae, z, tile=16, overlap=4)
    assert calls.shapes[0] == (1, 4, 24, 20) and len(calls.shapes) == 1 + 4
    assert all(s[-2:] == (16, 16) for s in calls.shapes[1:]), calls.shapes
    assert torch.equal(out, expect)


def test_auto_encode_retries_in_tiles_after_out_of_memory(vae, monkeypatch):
    x = image((1, 3, 48, 40), seed=7)  # 24 x 20 latents with the tiny VAE
    expect = tiled_encode(vae, x, tile=32, overlap=8)
    calls = Calls(vae.encode, fail_above=32 * 32, error=OOM_ERRORS[0])
    monkeypatch.setattr(vae, "encode", calls)
    with pytest.warns(UserWarning, match="encode .* ran out of memory"):
        mean, logvar = encode(vae, x, tile=32, overlap=8)
    assert len(calls.shapes) == 5 and all(s[-2:] == (32, 32) for s in calls.shapes[1:]), calls.shapes
    assert torch.equal(mean, expect[0]) and torch.equal(logvar, expect[1])


@pytest.mark.parametrize("tiling_mode", ["auto", "off", "on"])
def test_other_errors_propagate(vae, monkeypatch, tiling_mode):
    calls = Calls(vae.decode, fail_above=0, error=RuntimeError("expected 4 channels, got 5"))
    monkeypatch.setattr(vae, "decode", calls)
    with pytest.raises(RuntimeError, match="expected 4 channels"):
        decode(vae, latents((1, 4, 8, 8)), tiling_mode)
    assert len(calls.shapes) == 1, "no retry for an error that is not out-of-memory"


def test_off_never_tiles_and_does_not_retry(vae, monkeypatch):
    calls = Calls(vae.decode, fail_above=0, error=OOM_ERRORS[0])
    monkeypatch.setattr(vae, "decode", calls)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        decode(vae, latents((2, 4, 200, 8)), "off")
    assert calls.shapes == [(2, 4, 200, 8)]


# ---------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("kwargs", [dict(tiling="yes"), dict(tiling=None), dict(tiling=True), dict(tile=0),
                                    dict(tile=-64), dict(tile=32.0), dict(overlap=-1), dict(overlap=64),
                                    dict(tile=16, overlap=20), dict(overlap=True)])
def test_bad_decode_options(vae, kwargs):
    with pytest.raises(InputError) as err:
        decode(vae, latents((1, 4, 8, 8)), **kwargs)
    assert "\n" not in str(err.value)
    if "tiling" in kwargs:
        assert "auto, on, off" in str(err.value)


def test_check_tiling():
    assert [tiling.check_tiling(t) for t in ("auto", "on", "off")] == ["auto", "on", "off"]
    for bad in ("Auto", "", None, 1):
        with pytest.raises(InputError, match="valid values: auto, on, off"):
            tiling.check_tiling(bad)


@pytest.mark.parametrize("kwargs", [dict(tile=33), dict(overlap=7), dict(tiling="tiled"), dict(tile=64, overlap=64)])
def test_bad_encode_options(vae, kwargs):
    with pytest.raises(InputError):
        encode(vae, image((1, 3, 16, 16)), **kwargs)


def test_tiled_encode_needs_sizes_on_the_latent_grid(vae):
    with pytest.raises(InputError, match="multiples of 2"):
        tiled_encode(vae, image((1, 3, 65, 64)), tile=32, overlap=8)


# ---------------------------------------------------------------------------- full SD VAE


@pytest.fixture(scope="module")
def full_vae():
    """The SD v1 VAE architecture with seeded random weights (built on meta, no reference pipeline)."""
    with torch.device("meta"):
        model = build_model("vae", SD_V1)
    return randomize_(model, 11).eval().requires_grad_(False)


# Full SD VAE (random weights), 32x32 latents in 2x2 tiles of 20 with an overlap of 8.
FULL_DECODE_MAX_ABS, FULL_DECODE_MIN_PSNR = 1.0, 25.0


@pytest.mark.full
def test_full_vae_tiled_decode(full_vae):
    assert full_vae.cfg.downscale == 8
    z = latents((1, 4, 32, 32), seed=12)
    with torch.no_grad():
        expect = full_vae.decode(z)
        small = full_vae.decode(z[..., :10, :7])
    assert torch.equal(tiled_decode(full_vae, z[..., :10, :7]), small), "one tile: exact"
    out = tiled_decode(full_vae, z, tile=20, overlap=8)
    assert out.shape == (1, 3, 256, 256)
    max_abs, psnr = seam_error(out, expect)
    print(f"[tiling] full SD VAE decode 32x32 latents, tile 20/8: max abs {max_abs:.3g}, PSNR {psnr:.1f} dB, "
          f"output std {expect.std().item():.3g}")
    assert max_abs <= FULL_DECODE_MAX_ABS and psnr >= FULL_DECODE_MIN_PSNR, \
        f"max abs {max_abs:.3g} (bound {FULL_DECODE_MAX_ABS}), PSNR {psnr:.1f} dB (bound {FULL_DECODE_MIN_PSNR})"
