"""Tiled VAE: encode and decode images larger than memory allows, one overlapping tile at a time.

Only the output tensor and one tile's activations are alive at once: the untiled SD decoder keeps
several (B, 128..512, H, W) float maps of the full image, the tiled one keeps them for a tile.
Tiles overlap and are blended with a smoothstep ramp across each overlap (the weights of two
neighbours sum to one), so there is no hard seam. Tiling is not exact: GroupNorm statistics and
the mid-block attention of the VAE are global and become per-tile; the decode error this causes
is measured in tests/test_tiling.py.

Units. Both directions count in *latent* pixels of the grid the tiles are cut on, except that
`tiled_encode` takes image pixels (what its input is): decode tile=64 latent px = 512 image px
for SD (downscale 8); encode tile=512 image px. The VAE's own `cfg.downscale` converts, so
the tiny test VAE (downscale 2) works the same.

Front doors `decode` / `encode` take `tiling="auto" | "on" | "off"`:
- "off": one call of the VAE on the whole batch (exactly `vae.decode` / `vae.encode`).
- "on": always tiled (one untiled call when the input fits in one tile).
- "auto" (default): one image at a time (exact: the VAE has no cross-batch op); an image is
  tiled when it has more than AUTO_MAX_LATENT_PIXELS latent pixels, and an untiled call that runs
  out of memory is retried in tiles with a warning. Untiled decodes and encodes of large images
  run their full-resolution levels in bands of rows (`streaming.py`: the same result within
  float rounding, about half the activation memory).
  With `plain=True` (the pipeline passes it on CUDA in memory="high" and in fast mode outside
  memory="low": speed before memory) an image whose one-call VAE pass fits in the free device memory (`plain_fits`)
  runs that pass instead, at any size: one kernel per layer, where the bands and tiles launch
  many (H200, fp16, fast mode at 1024x1024: 1.642 s per image with tiles, 1.539 s with the plain
  decode, in two device calls).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from . import streaming
from .errors import InputError, is_out_of_memory

TILINGS = ("auto", "on", "off")
DECODE_TILE, DECODE_OVERLAP = 64, 16  # latent px: 512 px tiles overlapping by 128 px in SD (as diffusers)
ENCODE_TILE, ENCODE_OVERLAP = 512, 128  # image px
# "auto" tiles images with more latent pixels than 96 x 96 (768 x 768 px in SD). Faithful first:
# every usual SD v1 size (up to 768 px) decodes untiled, i.e. exactly. Measured fp32 CPU peaks of
# the SD decoder: 3.6 GiB untiled at 1024 px (so ~2 GiB at 768 px) vs 1.0 GiB in 64/16 tiles.
AUTO_MAX_LATENT_PIXELS = 96 * 96
# What a plain (one-call) VAE pass of one image holds, in values of the compute dtype, for p
# latent pixels: its convolution maps grow with p (the SD decoder's full-resolution levels held
# 640 MiB of float32 activations at 512x512, about 41k values per latent pixel) and the mid
# block's attention (one 512-wide head) with p^2: our streamed 1024x1024 decode peaked 2.53 GiB
# above its start on an H200, where the same decode counted op by op on the CPU (whose SDPA
# never forms the scores) holds 0.65 GiB in fp16 terms; the rest, about four 16384^2
# score-sized buffers, is SDPA on the GPU falling back to a kernel that forms the scores.
# `plain_fits` asks for twice both.
PLAIN_VALUES_PER_LATENT_PIXEL = 2 * 41_000
PLAIN_SCORE_BUFFERS = 2 * 4


# ---------------------------------------------------------------------------- front doors


def decode(vae, z: torch.Tensor, tiling: str = "auto", tile: int | None = None,
           overlap: int | None = None, plain: bool = False) -> torch.Tensor:
    """Unscaled latents (B, C, h, w) -> images (B, 3, h*f, w*f); `tiling` and `plain` as in the module doc.

    `tile` / `overlap` in latent pixels; None = DECODE_TILE / DECODE_OVERLAP (64 / 16).
    """
    tile = DECODE_TILE if tile is None else tile
    overlap = DECODE_OVERLAP if overlap is None else overlap
    _check(tiling, tile, overlap, 1, "decode", "latent pixels")
    if tiling == "off":
        return vae.decode(z)
    if tiling == "on":
        return tiled_decode(vae, z, tile, overlap)
    return torch.cat([_auto(lambda x: streaming.decode(vae, x), lambda x: tiled_decode(vae, x, tile, overlap),
                            z[i : i + 1], z.shape[-2] * z.shape[-1], "decode", vae.decode if plain else None)
                      for i in range(z.shape[0])])


def encode(vae, x: torch.Tensor, tiling: str = "auto", tile: int | None = None,
           overlap: int | None = None, stream: bool = True, plain: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) in [-1, 1] -> (mean, logvar) of the posterior; `tiling` and `plain` as in the module doc.

    `tile` / `overlap` in image pixels, multiples of the VAE's downscale; None = ENCODE_TILE /
    ENCODE_OVERLAP (512 / 128). `stream=False`: untiled "auto" encodes run the plain encoder.
    """
    tile = ENCODE_TILE if tile is None else tile
    overlap = ENCODE_OVERLAP if overlap is None else overlap
    f = vae.cfg.downscale
    _check(tiling, tile, overlap, f, "encode", "image pixels")
    if tiling == "off":
        return vae.encode(x)
    if tiling == "on":
        return tiled_encode(vae, x, tile, overlap)
    untiled = (lambda im: streaming.encode(vae, im)) if stream else vae.encode
    pairs = [_auto(untiled, lambda im: tiled_encode(vae, im, tile, overlap),
                   x[i : i + 1], (x.shape[-2] // f) * (x.shape[-1] // f), "encode", vae.encode if plain else None)
             for i in range(x.shape[0])]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def _auto(untiled: Callable, tiled: Callable, x: torch.Tensor, latent_pixels: int, what: str,
          plain: Callable | None = None):
    """`plain` where given and it fits (`plain_fits`); else tiled above the size threshold and
    untiled below it; an untiled or plain call that runs out of memory is retried in tiles."""
    if plain is not None and plain_fits(x.device, x.dtype, latent_pixels):
        untiled = plain
    elif latent_pixels > AUTO_MAX_LATENT_PIXELS:
        return tiled(x)
    try:
        return untiled(x)
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError is a RuntimeError too
        if not is_out_of_memory(error):
            raise
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
    # Outside the except block: the traceback (and the activations its frames hold) is gone now.
    _release_cache(x.device)
    warnings.warn(f"VAE {what} of a {tuple(x.shape[-2:])} input ran out of memory ({reason}); "
                  "retrying in tiles (seams may differ slightly from an untiled result)", stacklevel=3)
    return tiled(x)


def plain_fits(device: torch.device, dtype: torch.dtype, latent_pixels: int) -> bool:
    """Whether a plain VAE pass of one image of `latent_pixels` (p) fits in the CUDA `device`'s
    free memory as the driver reports it (PyTorch's cached blocks are not counted: the CUDA
    graph's private pool and split blocks cannot serve the VAE's large tensors), counting
    PLAIN_VALUES_PER_LATENT_PIXEL * p + PLAIN_SCORE_BUFFERS * p^2 values; False off CUDA (host
    memory: running out there is not a catchable error everywhere)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    values = PLAIN_VALUES_PER_LATENT_PIXEL * latent_pixels + PLAIN_SCORE_BUFFERS * latent_pixels**2
    return values * torch.empty((), dtype=dtype).element_size() <= free


def _release_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def check_tiling(tiling: str) -> str:
    """`tiling` if it is one of TILINGS, else InputError; for run options checked up front."""
    _check(tiling, 1, 0, 1, "decode", "latent pixels")
    return tiling


def _check(tiling, tile, overlap, multiple: int, what: str, unit: str) -> None:
    if tiling not in TILINGS:
        raise InputError(f"unknown VAE tiling {tiling!r}; valid values: {', '.join(TILINGS)}")
    for name, value in (("tile", tile), ("overlap", overlap)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value % multiple:
            need = f"a non-negative multiple of {multiple}" if multiple > 1 else "a non-negative integer"
            raise InputError(f"VAE {what} {name} must be {need} ({unit}), got {value!r}")
    if tile == 0:
        raise InputError(f"VAE {what} tile must be positive ({unit}), got 0")
    if not overlap < tile:
        raise InputError(f"VAE {what} overlap ({overlap}) must be smaller than the tile ({tile} {unit})")


# ---------------------------------------------------------------------------- tiled runs


@torch.no_grad()
def tiled_decode(vae, z: torch.Tensor, tile: int = DECODE_TILE, overlap: int = DECODE_OVERLAP) -> torch.Tensor:
    """Decode latents (B, C, h, w) in overlapping tiles of `tile` latent px (overlap `overlap`).

    Inputs that fit in one tile get one untiled `vae.decode` call (the exact result).
    """
    _check("on", tile, overlap, 1, "decode", "latent pixels")
    return _tiled(vae.decode, z, tile, overlap, 1, vae.cfg.downscale)[0]


@torch.no_grad()
def tiled_encode(vae, x: torch.Tensor, tile: int = ENCODE_TILE,
                 overlap: int = ENCODE_OVERLAP) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode images (B, 3, H, W) in overlapping tiles of `tile` image px -> (mean, logvar).

    H, W, tile and overlap must be multiples of the VAE's downscale (8 for SD) so tiles land on
    the latent grid. Inputs that fit in one tile get one untiled `vae.encode` call.
    """
    f = vae.cfg.downscale
    _check("on", tile, overlap, f, "encode", "image pixels")
    if x.shape[-2] % f or x.shape[-1] % f:
        raise InputError(f"cannot encode a {x.shape[-2]}x{x.shape[-1]} image in tiles: "
                         f"height and width must be multiples of {f}")
    mean, logvar = _tiled(vae.encode, x, tile // f, overlap // f, f, 1)
    return mean, logvar


def _tiled(fn: Callable, x: torch.Tensor, tile: int, overlap: int, f_in: int, f_out: int) -> tuple:
    """Run `fn` over overlapping tiles of x and blend its output(s).

    Tiles are cut on a grid where one cell is f_in input pixels and f_out output pixels (a latent
    pixel); `tile` and `overlap` count grid cells. Images of the batch run one at a time.
    """
    b, _, hgt, wid = x.shape
    grid_h, grid_w = hgt // f_in, wid // f_in
    if grid_h <= tile and grid_w <= tile:
        out = fn(x)
        return out if isinstance(out, tuple) else (out,)
    rows, cols = _spans(grid_h, tile, overlap, f_out), _spans(grid_w, tile, overlap, f_out)
    outs, dtype = None, None
    for i in range(b):
        for y0, y1, wy in rows:
            for x0, x1, wx in cols:
                piece = fn(x[i : i + 1, :, y0 * f_in : y1 * f_in, x0 * f_in : x1 * f_in])
                piece = piece if isinstance(piece, tuple) else (piece,)
                if outs is None:  # (B, C_out, h*f_out, w*f_out) float32 accumulators
                    outs = [p.new_zeros(b, p.shape[1], grid_h * f_out, grid_w * f_out, dtype=torch.float32)
                            for p in piece]
                    dtype = piece[0].dtype
                weight = (wy[:, None] * wx[None, :]).to(x.device)  # (tile_h*f_out, tile_w*f_out)
                for acc, p in zip(outs, piece):
                    acc[i, :, y0 * f_out : y1 * f_out, x0 * f_out : x1 * f_out] += p[0].float() * weight
                del piece
    return tuple(acc.to(dtype) for acc in outs)


def _spans(size: int, tile: int, overlap: int, f_out: int) -> list[tuple[int, int, torch.Tensor]]:
    """Tiles along one axis of `size` grid cells: (start, end, blend weight per output pixel).

    Starts are spread evenly so every overlap is at least `overlap` cells and the last tile ends
    at the border. Each weight ramps up (smoothstep) across the overlap with the previous tile
    and down across the overlap with the next; the weights are then divided by their sum over
    tiles, so they add up to exactly one at every output pixel.
    """
    if size <= tile:
        return [(0, size, torch.ones(size * f_out))]
    n = math.ceil((size - overlap) / (tile - overlap))
    starts = [round(i * (size - tile) / (n - 1)) for i in range(n)]
    spans = [(s, s + tile) for s in starts]
    weights = []
    for j, (s, e) in enumerate(spans):
        w = torch.ones((e - s) * f_out)
        if j > 0:  # ramp up over the overlap with the previous tile
            up = (spans[j - 1][1] - s) * f_out
            w[:up] = torch.minimum(w[:up], _smoothstep(up))
        if j < n - 1:  # ramp down over the overlap with the next tile
            down = (e - spans[j + 1][0]) * f_out
            w[w.numel() - down :] = torch.minimum(w[w.numel() - down :], _smoothstep(down).flip(0))
        weights.append(w)
    total = torch.zeros(size * f_out)
    for (s, e), w in zip(spans, weights):
        total[s * f_out : e * f_out] += w
    return [(s, e, w / total[s * f_out : e * f_out]) for (s, e), w in zip(spans, weights)]


def _smoothstep(n: int) -> torch.Tensor:
    """n weights rising from near 0 to near 1, sampled at pixel centres; w(t) + w(1-t) = 1."""
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (t * t * (3 - 2 * t)).float()
