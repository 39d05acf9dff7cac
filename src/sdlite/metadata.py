"""Generation parameters in PNG files, A1111-compatible; model hashes; safe output files.

The `parameters` text chunk follows AUTOMATIC1111's web UI (1.9+), so A1111's "PNG Info",
sd-parsers, civitai and other readers understand it::

    a photograph of an astronaut riding a horse
    Negative prompt: blurry
    Steps: 50, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: sdlite 0.1.0

A1111 1.9+ writes the schedule in its own `Schedule type` field and the sampler without the
" Karras" suffix; older versions wrote `Sampler: DPM++ 2M Karras`. Both are read back.
Values that contain `,`, `:` or a newline are JSON-quoted, as A1111 does.

Model hash: the first 10 hex digits of the file's SHA-256 (A1111's "new" hash, civitai's
AutoV2). Full hashes are cached in the user cache dir, keyed by path, size and mtime.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from .errors import InputError, SdliteError

# "Version: sdlite 0.1.0". A1111 writes "Version: v1.9.4" and, reading an infotext, turns on
# back-compatibility options for versions < 1.7 (packaging.version.parse); "sdlite 0.1.0" does
# not parse as a version there, so pasting our parameters into A1111 changes no option.
VERSION_TAG = "sdlite"
SCHEDULES = {"automatic": False, "karras": True}  # A1111 "Schedule type" -> karras flag
PARAMETERS_KEY = "parameters"
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param
_NAME_RE = re.compile(r"^(\d+)-")


# ---------------------------------------------------------------------------- sampler names


def _sampler_aliases() -> dict[str, tuple[str, bool]]:
    from . import samplers  # here, not at import: the CLI starts without torch

    out = {}
    for key, label in samplers.SAMPLER_LABELS.items():
        for name in (key, label, key.replace("_", " "), key.replace("_", "-"), label.replace(" ", "_")):
            out[name.lower()] = (key, False)
            out[(name + " karras").lower()] = (key, True)
            out[(name + "_karras").lower()] = (key, True)
    out["dpm++2m"] = out["dpm++_2m"] = ("dpmpp_2m", False)  # stable-diffusion.cpp's spelling
    out["pndm"] = ("plms", False)  # diffusers' name for the same method
    return out


def resolve_sampler(name: str) -> tuple[str, bool]:
    """sdlite key and Karras flag for a sampler name: `euler_a`, A1111's `Euler a`, `DPM++ 2M Karras`..."""
    hit = _sampler_aliases().get(" ".join(str(name).split()).lower())
    if hit is None:
        from . import samplers

        labels = ", ".join(f"{k} ({v})" for k, v in samplers.SAMPLER_LABELS.items())
        raise InputError(f"unknown sampler {name!r}; choose one of {labels}; "
                         "add --karras (or ' Karras') for the Karras schedule")
    return hit


# ---------------------------------------------------------------------------- infotext


def quote(value) -> str:
    """A1111's quoting: JSON-quote values that contain a comma, colon or newline."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _fmt_float(x: float) -> str:
    return repr(float(x))  # shortest exact round trip: 7.5, 7.0, 0.75


# sdlite's own field: the pipeline options that change the image, when not the defaults
# (A1111 has no fields for them; its parser and civitai keep unknown fields as they are).
OPTIONS_KEY = "sdlite options"


def run_options_label(params: dict) -> str:
    """`float16 int8 fast ema`: the options in a Result.params entry (or StableDiffusion.run_options())
    that change the image, those that are not the float32 exact defaults; "" for none."""
    words = [params["dtype"]] if params.get("dtype", "float32") != "float32" else []
    words += ["int8"] if params.get("quantize", "none") == "int8" else []
    return " ".join(words + [k for k in ("fast", "ema") if params.get(k)])


def format_parameters(params: dict, *, model_hash: str | None = None, model_name: str | None = None,
                      vae_hash: str | None = None, vae_name: str | None = None, version: str | None = None) -> str:
    """The A1111 `parameters` text for one image's params (a pipeline Result.params entry)."""
    from . import samplers

    fields = {
        "Steps": params["steps"],
        "Sampler": samplers.SAMPLER_LABELS[params["sampler"]],
        "Schedule type": "Karras" if params.get("karras") else "Automatic",
        "CFG scale": _fmt_float(params["cfg_scale"]),
        "Seed": params["seed"],
        "Size": f"{params['width']}x{params['height']}",
        "Model hash": model_hash,
        "Model": model_name,
        "VAE hash": vae_hash,
        "VAE": vae_name,
        "Denoising strength": _fmt_float(params["strength"]) if params.get("mode", "txt2img") != "txt2img" else None,
        "Clip skip": params["clip_skip"] if params.get("clip_skip", 1) > 1 else None,
        "Eta": _fmt_float(params["eta"]) if params.get("eta") is not None else None,
        OPTIONS_KEY: run_options_label(params) or None,
        "Version": f"{VERSION_TAG} {version}" if version else None,
    }
    body = ", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    negative = params.get("negative_prompt") or ""
    lines = [params.get("prompt") or ""] + ([f"Negative prompt: {negative}"] if negative else []) + [body]
    return "\n".join(lines).strip()  # as A1111: an empty prompt leaves no empty first line


def parse_parameters(text: str) -> dict[str, str]:
    """A1111 infotext -> {"Prompt", "Negative prompt", "Steps", "Sampler", ...} as strings.

    Follows A1111's parse_generation_parameters: the last line holds the `key: value` fields
    when it has at least 3 of them; lines before are the prompt, then `Negative prompt:`.
    """
    *lines, last = text.strip().split("\n")
    fields = _PARAM_RE.findall(last)
    if len(fields) < 3:
        lines.append(last)
        fields = []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    out.update({k.strip(): unquote(v.strip()) for k, v in fields})
    return out


def options_from_parameters(info: dict[str, str], source: str = "image", sampler: bool = True) -> dict:
    """sdlite run options (prompt, negative_prompt, steps, sampler, karras, cfg_scale, seed,
    width, height, clip_skip, strength) from parsed infotext; only the fields present.

    sampler=False skips the sampler and schedule (the caller chooses them), so an image made
    with a sampler sdlite lacks can still be reused.
    """
    if "Steps" not in info or "Sampler" not in info:
        raise InputError(f"{source}: no generation parameters (Steps, Sampler) in its metadata")
    opts: dict = {"prompt": info.get("Prompt", ""), "negative_prompt": info.get("Negative prompt", "")}
    try:
        if sampler:
            opts.update(_sampler_options(info, source))
        opts["steps"] = int(info["Steps"])
        for key, name, conv in (("CFG scale", "cfg_scale", float), ("Seed", "seed", int),
                                ("Clip skip", "clip_skip", int), ("Denoising strength", "strength", float)):
            if key in info:
                opts[name] = conv(info[key])
        if "Size" in info:
            w, h = info["Size"].lower().split("x")
            opts["width"], opts["height"] = int(w), int(h)
    except ValueError as e:
        raise InputError(f"{source}: unreadable generation parameters ({e})") from None
    return opts


def _sampler_options(info: dict[str, str], source: str) -> dict:
    try:
        name, karras = resolve_sampler(info["Sampler"])
    except InputError as e:
        raise InputError(f"{source}: {e}; choose one with --sampler") from None
    schedule = info.get("Schedule type", "Automatic").strip().lower()
    if schedule not in SCHEDULES:
        raise InputError(f"{source}: schedule type {info['Schedule type']!r} is not supported "
                         "(sdlite has Automatic and Karras); choose one with --sampler")
    return {"sampler": name, "karras": karras or SCHEDULES[schedule]}


# ---------------------------------------------------------------------------- reading images


def read_parameters(path: str | os.PathLike) -> str | None:
    """The generation-parameters text of a PNG (`parameters` chunk) or JPEG/WebP (EXIF UserComment)."""
    path = Path(path).expanduser()
    try:
        with Image.open(path) as im:
            text = im.info.get(PARAMETERS_KEY)
            if text is None:
                comment = im.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD -> UserComment
                text = _decode_user_comment(comment) if comment else None
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: cannot read it as an image ({e.__class__.__name__})") from None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text or None


def _decode_user_comment(raw) -> str | None:
    if isinstance(raw, str):
        return raw
    head, body = bytes(raw[:8]), bytes(raw[8:])
    if head == b"UNICODE\0":
        # piexif (A1111) writes UTF-16 big-endian; some writers use little-endian: keep the
        # decoding that gives more ASCII (a wrong byte order gives CJK-looking code points).
        texts = [body.decode(enc, "replace") for enc in ("utf-16-be", "utf-16-le")]
        return max(texts, key=lambda t: sum(c.isascii() for c in t))
    if head in (b"ASCII\0\0\0", b"\0" * 8):
        return body.decode("utf-8", "replace").rstrip("\0")
    return None


# ---------------------------------------------------------------------------- hashes


def cache_dir() -> Path:
    """sdlite's cache folder: $XDG_CACHE_HOME/sdlite, else ~/.cache/sdlite (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdlite"


def _hash_cache_file() -> Path:
    return cache_dir() / "hashes.json"


def sha256_file(path: str | os.PathLike, use_cache: bool = True) -> str:
    """The file's full SHA-256 (hex), cached by (absolute path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key, stamp = str(path), [st.st_size, st.st_mtime_ns]
    cache = _load_hash_cache() if use_cache else {}
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if use_cache:
        cache[key] = {"stamp": stamp, "sha256": digest}
        _save_hash_cache(cache)
    return digest


def model_hash(path: str | os.PathLike) -> str | None:
    """A1111's model hash: first 10 hex digits of the SHA-256; None for folders (diffusers)."""
    path = Path(path)
    return sha256_file(path)[:10] if path.is_file() else None


def legacy_model_hash(path: str | os.PathLike) -> str:
    """A1111's model hash before 2023: 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def same_model_hash(expected: str, current: str, path: str | os.PathLike) -> bool:
    """Whether a recorded "Model hash" (the 10-digit one, or the old 8-digit one) names this file."""
    expected = expected.strip().lower()
    if len(expected) == 8 and Path(path).expanduser().is_file():
        return expected == legacy_model_hash(Path(path).expanduser())
    return expected == current


def model_name(path: str | os.PathLike) -> str:
    """The model's name as A1111 writes it: the file name without extension, no ',' or ':'."""
    path = Path(path)
    name = path.stem if path.is_file() else path.resolve().name  # "." names its folder
    return name.replace(",", "").replace(":", "")


def _load_hash_cache() -> dict:
    try:
        data = json.loads(_hash_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_hash_cache(cache: dict) -> None:
    # Best effort: a cache that cannot be written only costs a re-hash next time.
    file = _hash_cache_file()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".hashes-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, file)
    except OSError:
        pass


# ---------------------------------------------------------------------------- output files


def check_outdir(outdir: str | os.PathLike) -> Path:
    """Make sure images can be written to the output folder, before any model loads, without
    leaving it created (save_png creates it, so a run that fails before its first image leaves
    no empty folder behind): a temporary file is written in it, in a new folder made for the
    probe and removed again with any parents it needed."""
    outdir = Path(outdir).expanduser()
    for _ in range(3):
        try:
            _probe_outdir(outdir)
            return outdir
        except (FileExistsError, FileNotFoundError) as e:
            error = e  # perhaps a run starting beside this one made or removed the folder: look again
        except OSError as e:
            error = e
            break
    raise SdliteError(f"cannot write to output folder {outdir}: {_reason(error)}")


def _probe_outdir(outdir: Path) -> None:
    # the folder itself or its nearest parent that is there (a dangling or looping symlink
    # counts as there, and is refused: it is not a folder)
    chain = (outdir.absolute(), *outdir.absolute().parents)
    there = next(p for p in chain if os.path.lexists(p))
    if not there.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    created = []
    try:
        for folder in reversed(chain[:chain.index(there)]):
            try:
                folder.mkdir()
                created.append(folder)
            except FileExistsError:  # `new/..` names a folder that is there; or another run made it
                if not folder.is_dir():
                    raise
        fd, probe = tempfile.mkstemp(dir=outdir, prefix=".sdlite-probe-")
        os.close(fd)
        os.unlink(probe)
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()


def _reason(e: OSError) -> str:
    return e.strerror or e.__class__.__name__


def next_index(outdir: Path) -> int:
    """1 + the highest NNNNN- number among the folder's files (0 for an empty or new folder)."""
    if not outdir.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in outdir.iterdir() if (m := _NAME_RE.match(p.name))]
    return max(numbers, default=-1) + 1


def save_png(image: Image.Image, outdir: Path, seed: int, parameters: str, index: int | None = None) -> Path:
    """Write `NNNNN-SEED.png` with the parameters chunk; never overwrites, never leaves half a file.

    The image is written to a hidden temporary file in `outdir`, then hard-linked to the first
    free name (an atomic create-if-absent), so a concurrent run or an interrupt cannot clobber
    or truncate an image. `outdir` is created (with its parents) if needed.
    """
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)  # tEXt, or iTXt for non-Latin-1 prompts
    for attempt in range(3):
        try:
            outdir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=outdir, prefix=".sdlite-", suffix=".png.partial")
            break
        except FileNotFoundError as e:  # another run's check_outdir removed its probe folder meanwhile
            if attempt == 2:
                raise SdliteError(f"cannot write to output folder {outdir}: {_reason(e)}") from None
        except OSError as e:
            raise SdliteError(f"cannot write to output folder {outdir}: {_reason(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            _write_png(image, f, info)
            f.flush()
            os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; an image gets the usual mode
        index = next_index(outdir) if index is None else index
        while True:
            target = outdir / f"{index:05d}-{seed}.png"
            if _claim(tmp, target):
                return target
            index += 1
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _write_png(image: Image.Image, f, info: PngImagePlugin.PngInfo) -> None:
    image.save(f, format="PNG", pnginfo=info)


def _claim(tmp: str, target: Path) -> bool:
    """Give the finished temp file the name `target` unless that name exists."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError:
        # Filesystems without hard links: check-then-rename (a small race, still no partial file).
        if target.exists():
            return False
        os.replace(tmp, target)
        return True
