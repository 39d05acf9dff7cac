"""PIL <-> tensor conversion and inpainting masks, with one-line errors for bad images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError


def load_image(source: str | os.PathLike | Image.Image, what: str = "image") -> Image.Image:
    """Open an image file (or pass a PIL image through), fully decoded, or raise InputError."""
    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"{what} must be a PIL image or a file path, got {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            # upright as viewers show it (a phone photo's EXIF orientation), as diffusers' and
            # A1111's loaders do
            return ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{what} {path}: cannot read it as an image ({e.__class__.__name__})") from None


def resize_for(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to (width, height) with Lanczos, as diffusers' image processor does; no-op if equal."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=Image.LANCZOS)


def default_size(image: Image.Image) -> tuple[int, int]:
    """The image's size rounded down to multiples of 8 (the size used when none is given)."""
    w, h = image.size
    w8, h8 = w - w % 8, h - h % 8
    if w8 < 8 or h8 < 8:
        raise InputError(f"image is {w}x{h}: too small (at least 8x8 pixels)")
    return w8, h8


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale (PIL modes I;16*, and I as 16-bit PNGs open) scaled to 8 bits ("L"):
    PIL's own conversion clips every value above 255 to white. Other modes pass through."""
    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    arr = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or arr.max(initial=0) > 255:  # "I" holding 8-bit values stays as it is
        arr = arr / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode) -> (1, 3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(eight_bit(image).convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) decoder output in [-1, 1] -> PIL RGB images (rounded like diffusers)."""
    arr = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """Mask image -> (1, 1, H, W) float32 of 0/1; white (>= 0.5) = repaint.

    A mask of another size than the image is resized (a documented automatic fix).
    """
    gray = resize_for(eight_bit(mask).convert("L"), width, height)
    arr = np.asarray(gray, dtype=np.float32) / 255.0
    return torch.from_numpy((arr >= 0.5).astype(np.float32))[None, None]


def green_mask(image: Image.Image) -> Image.Image:
    """The green convention: pure green pixels (0, 255, 0) of the image mark the region to repaint."""
    arr = np.asarray(image.convert("RGB"))
    green = (arr[..., 0] == 0) & (arr[..., 1] == 255) & (arr[..., 2] == 0)
    if not green.any():
        raise InputError("green mask: the init image has no pure green (0, 255, 0) pixels to repaint")
    return Image.fromarray((green * 255).astype(np.uint8), mode="L")
