"""Reading and writing tensor files without a second copy of the weights.

- `.safetensors` is parsed here and memory-mapped (copy-on-write), so a tensor costs no RAM
  until its pages are touched, and loading never builds a second copy.
- `.ckpt` / `.pt` / `.bin` go through `torch.load(weights_only=True)` only (mmap when the file is
  a zip archive), so a pickle that would run code is refused before anything runs.
- Writing streams one tensor at a time, in the standard safetensors layout.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import struct
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError, is_out_of_memory

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries, __metadata__, offset of the data section); validates sizes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: not a valid safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})"[:300]) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path}: corrupt safetensors metadata (not a map of strings to strings)")
    for name, entry in header.items():
        if not _valid_entry(entry):
            raise CheckpointError(f"{path}: corrupt safetensors entry for {name!r}")
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: file is truncated ({size} bytes, the header describes {8 + n + end}); download it again"
        )
    _check_coverage(path, header, size - 8 - n)
    return header, meta, 8 + n


def _no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a name appears twice: {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _check_coverage(path: Path, header: dict, data_bytes: int) -> None:
    """The tensors tile the data section exactly, as the format requires (and the safetensors
    library checks): a wrong header length or overlapping entries would otherwise shift or share
    bytes between tensors silently."""
    at = 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        a, b = entry["data_offsets"]
        if a != at:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} starts at byte {a} of the "
                                  f"data, expected {at} (entries overlap or leave a gap)")
        at = b
    if at != data_bytes:
        raise CheckpointError(f"{path}: corrupt safetensors file: its tensors cover {at} bytes of a {data_bytes}-byte "
                              "data section (wrong header length, or data appended)")


def _valid_entry(entry) -> bool:
    """dtype known, shape of non-negative ints, offsets 0 <= a <= b (ints)."""
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)  # noqa: E731
    return ints(shape) and ints(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of a .safetensors file as zero-copy views of a private memory map."""
    path = Path(path)
    header, meta, start = read_safetensors_header(path)
    size = path.stat().st_size
    if size == 0:
        return {}, meta
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    whole = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,))
    out = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            a, b = entry["data_offsets"]
            shape = entry["shape"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for {name!r}") from None
        raw = whole[start + a : start + b]
        if (start + a) % dtype.itemsize:  # misaligned (unusual writer): fall back to a copy
            raw = raw.clone()
        try:
            out[name] = raw.view(dtype).reshape(shape)
        except RuntimeError:
            raise CheckpointError(f"{path}: tensor {name!r} has a size that does not match its shape") from None
    return out, meta


class _Placeholder:
    """Stands in for non-tensor objects that training frameworks pickle beside the weights
    (e.g. PyTorch Lightning's ModelCheckpoint callback state in CompVis .ckpt files)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# Non-tensor globals found in real SD .ckpt files; mapped to harmless stand-ins or
# data-only constructors. Anything else is refused by torch's weights_only unpickler.
def _safe_globals() -> list:
    import numpy as np

    allowed: list = [
        (_Placeholder, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        (_Placeholder, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
        np.dtype,
    ]
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.append((core.multiarray.scalar, f"{mod}.scalar"))
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32")]
    return allowed


def _check_pickle_start(path: Path) -> None:
    """A file that is neither a zip nor starts like a pickle is not a PyTorch checkpoint at all
    (a web page saved in its place, a git-lfs pointer, an image): say so, rather than let the
    unpickler call it unsafe."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint: {e.strerror or e}") from None
    if head.startswith((b"\x80", b"PK")):  # a pickle (torch's legacy format), a zip cut short
        return
    if head.startswith(b"version https://git-lfs"):
        hint = "a git-lfs pointer, not the file: fetch it with 'git lfs pull'"
    elif head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        hint = "a web page saved in place of the file: download it again"
    elif not head:
        hint = "an empty file"
    else:
        hint = "an incomplete download or another kind of file?"
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (it starts with {head[:24]!r}): {hint}")


def load_pickle(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True), memory-mapped when possible, with one-line errors."""
    path = Path(path)
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        _check_pickle_start(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise CheckpointError(
            f"{path}: refused to load: the file's pickle asks to run code or build objects that are not "
            f"weights ({detail.strip()[:160]}); convert it to .safetensors with a tool you trust"
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        if is_out_of_memory(e):  # not the file's fault
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt file?): {msg[:200]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint: the file holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None,
                     cast: torch.dtype | None = None) -> None:
    """Write a standard .safetensors file one tensor at a time (no full in-memory copy).

    `cast` converts floating-point tensors as they are written. Written to a temporary file
    and renamed, so an interrupted export leaves nothing behind.
    """
    path = Path(path)

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return cast if cast is not None and t.is_floating_point() else t.dtype

    # Larger element sizes first keeps every tensor aligned to its itemsize.
    names = sorted(tensors, key=lambda k: (-out_dtype(tensors[k]).itemsize, k))
    header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}}
    offset = 0
    for name in names:
        t, dtype = tensors[name], out_dtype(tensors[name])
        if dtype not in CODES:
            raise CheckpointError(f"cannot store {name!r}: dtype {dtype} has no safetensors code")
        nbytes = t.numel() * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data section starts 8-byte aligned
    tmp = None
    try:
        # a name of its own (two exports to one OUT do not share it), next to OUT for the rename;
        # created like any file the user makes (mode from the umask)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
        with open(tmp, "xb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name in names:
                t = tensors[name].detach().to("cpu", out_dtype(tensors[name])).contiguous().reshape(-1)
                f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write: {e.strerror or e}") from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()

