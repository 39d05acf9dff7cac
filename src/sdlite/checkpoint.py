"""Checkpoints: read CompVis single files and diffusers folders into sdlite's native
(CompVis) key space, detect the architecture, build models without a second copy of the
weights, and export standard single-file `.safetensors`.

Native keys are full CompVis keys: `model.diffusion_model.*` (UNet), `first_stage_model.*`
(VAE), `cond_stage_model.transformer.*` (CLIP text encoder).
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import keymap
from .config import SD_V1, VARIANTS, CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from .errors import CheckpointError, UnsupportedModelError
from .tensorfile import load_pickle, load_safetensors, save_safetensors

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text": "cond_stage_model.transformer.",
}
COMPONENTS = tuple(PREFIXES)

# Keys that real checkpoints carry and that inference does not use. Nothing else is ignored.
IGNORED_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
}
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")
IGNORED_SUFFIXES = (".position_ids",)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# Sub-folder and weight file names (in order of preference) of each part of a diffusers folder.
_DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
_TRANSFORMERS_FILES = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")
DIFFUSERS_PARTS = {"unet": ("unet", _DIFFUSERS_FILES), "vae": ("vae", _DIFFUSERS_FILES),
                   "text": ("text_encoder", _TRANSFORMERS_FILES)}


@dataclass
class Checkpoint:
    """An opened checkpoint: native-keyed tensors (memory-mapped where the format allows)."""

    path: Path
    format: str  # "safetensors" | "ckpt" | "diffusers"
    tensors: dict[str, torch.Tensor] | None  # None after release(): re-read per component on demand
    config: ModelConfig
    has_ema: bool = False
    ema: bool = False
    metadata: dict = field(default_factory=dict)
    # False for checkpoints shipped without VAE weights ("no-VAE" files): they need a VAE file,
    # and config.vae is then the matching standard variant's VAE, which that file must fit.
    has_vae: bool = True

    def state_dict(self, component: str) -> dict[str, torch.Tensor]:
        """One component's tensors with its prefix stripped (the module's own keys)."""
        prefix = PREFIXES[component]
        tensors = self.tensors if self.tensors is not None else self._reread(component)
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and not _ignored(k)}

    @property
    def memory_mapped(self) -> bool:
        """Whether re-reading the file is free (safetensors, zip .ckpt): then components can each
        get their own memory map. A legacy (non-zip) pickle is read whole every time."""
        if self.format in ("safetensors", "diffusers"):
            return self.format == "safetensors" or all(
                f.suffix == ".safetensors" or zipfile.is_zipfile(f)
                for sub, _ in DIFFUSERS_PARTS.values() for f in (self.path / sub).glob("*.*") if f.suffix in (".safetensors", ".bin"))
        return zipfile.is_zipfile(self.path)

    def release(self) -> None:
        """Drop this object's own view of the file (the memory map), keeping only what the loaded
        models use. Later `load()` calls map the file again, so a model that is deleted after
        use really gives its memory back (`memory="low"`)."""
        self.tensors = None

    def _reread(self, component: str) -> dict[str, torch.Tensor]:
        if self.format == "diffusers":
            sub, names = DIFFUSERS_PARTS[component]
            converted, _ = _diffusers_to_native(component, _read_part(self.path / sub, names))
            return {PREFIXES[component] + k: v for k, v in converted.items()}
        return _read_all(self.path, self.ema)[0]

    def load(self, component: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
             int8: bool = False) -> nn.Module:
        """Build one model on `meta` and fill it from the file (no second copy when dtype matches).

        In an int8 file the quantized layers become Int8Linear/Int8Conv2d before loading, so
        their int8 weights are used as stored (memory-mapped on the CPU) and their float32
        scales are kept as they are; `dtype` converts the other floating-point tensors.
        `int8=True` quantizes a float file's UNet/text encoder while loading, one tensor at a
        time: the float model never exists whole (not on the GPU either), and every tensor is a
        copy, so the file's pages are given back once the load returns.
        """
        if component == "vae" and not self.has_vae:
            raise CheckpointError(no_vae_message(self.path))
        with torch.device("meta"):
            model = build_model(component, self.config)
        state, scales, copy = self.state_dict(component), set(), False
        if int8 and not self.quantization and component in ("unet", "text"):
            from .quantize import quantize_state_dict

            # Pages are dropped only from a private read made for this load (after release()):
            # tensors this object keeps would otherwise be read again later.
            state, copy = quantize_state_dict(state, component, self.config, release=self.tensors is None), True
        if self.quantization or copy:
            from .quantize import SCALE_SUFFIX, install_int8

            install_int8(model, state)
            scales = {k for k in state if k.endswith(SCALE_SUFFIX)}  # stay float32
        state = {k: v.to(device=device, dtype=dtype or v.dtype, copy=copy) if v.is_floating_point() and k not in scales
                 else v.to(device) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    dtype: torch.dtype = torch.float32  # the stored dtype of the UNet weights (float ones in an int8 file)
    size_bytes: int = 0  # bytes of all tensors in the file
    quantization: str | None = None  # "int8" for files written by export_checkpoint(int8=True), else None


def build_model(component: str, cfg: ModelConfig) -> nn.Module:
    from .clip import CLIPTextEncoder
    from .unet import UNetModel
    from .vae import AutoencoderKL

    return {"unet": lambda: UNetModel(cfg.unet), "vae": lambda: AutoencoderKL(cfg.vae),
            "text": lambda: CLIPTextEncoder(cfg.text)}[component]()


# ---------------------------------------------------------------------------- reading files


def open_checkpoint(path: str | Path, ema: bool = False) -> Checkpoint:
    """Open a CompVis .ckpt/.safetensors single file or a diffusers folder.

    `ema=True` selects the EMA UNet weights (`model_ema.*`) of files that carry both; the
    default follows the CompVis v1 inference config (`use_ema: False`).
    """
    from .quantize import file_quantization

    path = Path(path).expanduser()
    tensors, fmt, meta, has_ema = _read_all(path, ema)
    quantization = file_quantization(meta, tensors, path)  # refuses newer sdlite formats first
    cfg = detect(tensors, path)
    validate(tensors, cfg, path, quantized=quantization is not None)
    return Checkpoint(path, fmt, tensors, cfg, has_ema=has_ema, ema=ema, metadata=meta, has_vae=_has(tensors, "vae"),
                      dtype=_stored_dtype(tensors),
                      size_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
                      quantization=quantization)


def no_vae_message(path) -> str:
    return (f"{path}: this checkpoint has no VAE weights; give a VAE file "
            "(CLI: --vae PATH, Python: vae=PATH), e.g. vae-ft-mse-840000-ema-pruned.safetensors")


def _has(tensors: dict, component: str) -> bool:
    return any(k.startswith(PREFIXES[component]) for k in tensors)


def _stored_dtype(tensors: dict) -> torch.dtype:
    first = tensors[PREFIXES["unet"] + "input_blocks.0.0.weight"]
    if first.is_floating_point():
        return first.dtype
    # int8 file that quantized the first conv too: the dtype of its float weights
    return next(v.dtype for k, v in tensors.items()
                if k.startswith(PREFIXES["unet"]) and k.endswith(".weight") and v.is_floating_point())


def _read_all(path: Path, ema: bool) -> tuple[dict, str, dict, bool]:
    """(native-keyed tensors, format, file metadata, has EMA weights)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        tensors, fmt, meta = _read_diffusers(path), "diffusers", {}
    else:
        tensors, fmt, meta = _read_single_file(path)
    tensors = _normalize_text_keys(tensors)
    has_ema = any(k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates") for k in tensors)
    if ema:
        tensors = _select_ema(tensors, path)
    return tensors, fmt, meta, has_ema


def _read_single_file(path: Path) -> tuple[dict, str, dict]:
    if path.suffix.lower() == ".safetensors":
        tensors, meta = load_safetensors(path)
        return tensors, "safetensors", meta
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint type (expected .safetensors, .ckpt or a diffusers folder)")
    obj = load_pickle(path)
    if isinstance(obj.get("state_dict"), dict):  # PyTorch Lightning wrapper
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: the file holds no tensors")
    return tensors, "ckpt", {}


def _read_part(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    file = next((folder / n for n in names if (folder / n).is_file()), None)
    if file is None:
        found = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(f"{folder}: no weights file ({names[0]}, {names[2]} or their fp16 variants); found {found[:6]}")
    if file.suffix == ".safetensors":
        return load_safetensors(file)[0]
    return {k: v for k, v in load_pickle(file).items() if isinstance(v, torch.Tensor)}


def _read_diffusers(root: Path) -> dict[str, torch.Tensor]:
    # a folder without vae/ is read like a no-VAE single file (it needs a VAE file)
    missing = [sub for c, (sub, _) in DIFFUSERS_PARTS.items() if c != "vae" and not (root / sub).is_dir()]
    if missing:
        raise CheckpointError(
            f"{root}: not a diffusers Stable Diffusion folder (missing {', '.join(f'{m}/' for m in missing)}); "
            "pass a folder with unet/, vae/ and text_encoder/, or a single .safetensors/.ckpt file"
        )
    out = {}
    for component, (sub, names) in DIFFUSERS_PARTS.items():
        if not (root / sub).is_dir():
            continue
        state = _read_part(root / sub, names)
        converted, unknown = _diffusers_to_native(component, state)
        if unknown:
            raise CheckpointError(f"{root / sub}: unexpected keys for an SD v1 {component}: {_few(unknown)}")
        out.update({PREFIXES[component] + k: v for k, v in converted.items()})
    return out


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def _diffusers_to_native(component: str, state: dict) -> tuple[dict, list]:
    keys = list(state)
    if component == "text":
        return keymap.text_from_diffusers(state)
    if component == "unet":
        levels = _count(keys, r"down_blocks\.(\d+)\.")
        attn = tuple(i for i in range(levels) if any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys))
        cfg = UNetConfig(channel_mult=(1,) * levels, attention_levels=attn,
                         num_res_blocks=_count(keys, r"down_blocks\.0\.resnets\.(\d+)\."))
        return keymap.unet_from_diffusers(state, cfg)
    levels = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
    cfg = VAEConfig(ch_mult=(1,) * levels, num_res_blocks=_count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
    return keymap.vae_from_diffusers(state, cfg)


def _normalize_text_keys(tensors: dict) -> dict:
    # Files saved with old transformers versions lack the `text_model.` level.
    old = PREFIXES["text"] + "embeddings."
    if not any(k.startswith(old) for k in tensors):
        return tensors
    fixed = {}
    for k, v in tensors.items():
        if k.startswith(PREFIXES["text"]) and not k.startswith(PREFIXES["text"] + "text_model."):
            k = PREFIXES["text"] + "text_model." + k[len(PREFIXES["text"]):]
        fixed[k] = v
    return fixed


def _select_ema(tensors: dict, path: Path) -> dict:
    """Replace the UNet weights by their EMA copies (CompVis LitEma names drop the dots)."""
    prefix = PREFIXES["unet"]
    if not any(k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates") for k in tensors):
        raise CheckpointError(f"{path}: EMA weights requested, but this file has none (no model_ema.* weights; "
                              "it is probably pruned to one set): load it without --ema / ema=True")
    out = dict(tensors)
    for k in tensors:
        if k.startswith(prefix):
            ema_key = "model_ema." + ("diffusion_model." + k[len(prefix):]).replace(".", "")
            if ema_key not in tensors:
                raise CheckpointError(f"{path}: EMA weights requested but the file's are incomplete (no {ema_key})")
            out[k] = tensors[ema_key]
    return out


# ---------------------------------------------------------------------------- detection


def _few(keys, n: int = 5) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def describe_foreign(tensors: dict) -> str:
    """A short guess of what a non-SD-v1 file is, for error messages."""
    keys = list(tensors)
    if any(k.startswith("conditioner.embedders.") for k in keys) or "model.diffusion_model.label_emb.0.0.weight" in tensors:
        return "an SDXL checkpoint"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "an SD 2.x checkpoint (OpenCLIP text encoder)"
    if any(k.startswith(("lora_", "lora_unet_", "lora_te_")) or ".lora_" in k for k in keys):
        return "a LoRA, not a full checkpoint"
    if "encoder.conv_in.weight" in tensors and "decoder.conv_out.weight" in tensors:
        return "a standalone VAE, not a full checkpoint"
    if any(k.startswith(("text_model.", "embeddings.token_embedding")) for k in keys):
        return "a text encoder alone, not a full checkpoint"
    return f"no Stable Diffusion layout (first keys: {_few(sorted(keys), 3)})"


def detect(tensors: dict, path: Path | str = "checkpoint") -> ModelConfig:
    """Infer the architecture from tensor names and shapes; refuse anything but SD v1."""
    unet_key = PREFIXES["unet"] + "input_blocks.0.0.weight"
    foreign = describe_foreign(tensors) if unet_key not in tensors else None
    if foreign is None and any(k.startswith(("conditioner.", "cond_stage_model.model.")) for k in tensors):
        foreign = describe_foreign(tensors)
    if foreign:
        raise UnsupportedModelError(f"{path}: not an SD v1.x checkpoint: it looks like {foreign}")
    if not _has(tensors, "text"):
        raise UnsupportedModelError(f"{path}: incomplete checkpoint: no text weights ({PREFIXES['text']}*)")
    unet = _infer_unet({k[len(PREFIXES["unet"]):]: v for k, v in tensors.items() if k.startswith(PREFIXES["unet"])}, path)
    # No VAE weights ("no-VAE" files): the matching variant's VAE stands in until a VAE file is given.
    vae = _infer_vae({k[len(PREFIXES["vae"]):]: v for k, v in tensors.items() if k.startswith(PREFIXES["vae"])}, path) \
        if _has(tensors, "vae") else None
    text = _infer_text({k[len(PREFIXES["text"]):]: v for k, v in tensors.items() if k.startswith(PREFIXES["text"])}, path)
    if text.width != unet.context_dim:
        raise UnsupportedModelError(f"{path}: text encoder width {text.width} does not match the UNet's context {unet.context_dim}")
    name, variant = _variant(unet, vae, text)
    return ModelConfig(name, unet, vae or (variant or SD_V1).vae, text)


def _variant(unet: UNetConfig, vae: VAEConfig | None, text: CLIPTextConfig) -> tuple[str, ModelConfig | None]:
    """The name of the known variant these configs make (a VAE of None matches any), and that variant."""
    for name, v in VARIANTS.items():
        if replace(v.unet, in_channels=unet.in_channels) == unet and vae in (None, v.vae) and v.text == text:
            base = name.removesuffix("-inpainting")
            return (base + "-inpainting" if unet.in_channels == 9 else base), v
    return "sd-v1-custom", None


def _shape(sd: dict, key: str, path) -> torch.Size:
    if key not in sd:
        raise UnsupportedModelError(f"{path}: not an SD v1 layout: missing {key}")
    return sd[key].shape


def _infer_unet(sd: dict, path) -> UNetConfig:
    mc, cin = _shape(sd, "input_blocks.0.0.weight", path)[:2]
    if cin not in (4, 9):
        kind = "an InstructPix2Pix checkpoint" if cin == 8 else f"a UNet with {cin} input channels"
        raise UnsupportedModelError(f"{path}: not an SD v1.x checkpoint: it looks like {kind} (SD v1 has 4, inpainting 9)")
    ctx_keys = [k for k in sd if k.endswith("attn2.to_k.weight")]
    context = sd[ctx_keys[0]].shape[1] if ctx_keys else 0
    proj_in = sd.get("middle_block.1.proj_in.weight")
    if context == 1024 or (proj_in is not None and proj_in.ndim == 2):
        raise UnsupportedModelError(f"{path}: not an SD v1.x checkpoint: it looks like an SD 2.x checkpoint (context width {context})")
    mults, attn, counts, level = [], [], [0], 0
    for i in range(1, _count(sd, r"input_blocks\.(\d+)\.")):
        if f"input_blocks.{i}.0.op.weight" in sd:
            level += 1
            counts.append(0)
            continue
        if counts[level] == 0:
            mults.append(_shape(sd, f"input_blocks.{i}.0.in_layers.2.weight", path)[0] // mc)
        if f"input_blocks.{i}.1.proj_in.weight" in sd and level not in attn:
            attn.append(level)
        counts[level] += 1
    depth = _count(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    return UNetConfig(in_channels=cin, out_channels=_shape(sd, "out.2.weight", path)[0], model_channels=mc,
                      channel_mult=tuple(mults), num_res_blocks=counts[0], attention_levels=tuple(attn),
                      num_heads=8, context_dim=context, transformer_depth=depth)


def _infer_vae(sd: dict, path) -> VAEConfig:
    ch, cin = _shape(sd, "encoder.conv_in.weight", path)[:2]
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    mults = tuple(_shape(sd, f"encoder.down.{i}.block.0.conv2.weight", path)[0] // ch for i in range(levels))
    return VAEConfig(in_channels=cin, out_channels=_shape(sd, "decoder.conv_out.weight", path)[0], ch=ch,
                     ch_mult=mults, num_res_blocks=_count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
                     z_channels=_shape(sd, "decoder.conv_in.weight", path)[1],
                     embed_dim=_shape(sd, "quant_conv.weight", path)[0] // 2)


def _infer_text(sd: dict, path) -> CLIPTextConfig:
    vocab, width = _shape(sd, "text_model.embeddings.token_embedding.weight", path)
    return CLIPTextConfig(vocab_size=vocab, max_positions=_shape(sd, "text_model.embeddings.position_embedding.weight", path)[0],
                          width=width, layers=_count(sd, r"text_model\.encoder\.layers\.(\d+)\."),
                          heads=max(1, width // 64),  # ViT-L/14: 64-wide heads
                          mlp_width=_shape(sd, "text_model.encoder.layers.0.mlp.fc1.weight", path)[0])


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES)


def validate(tensors: dict, cfg: ModelConfig, path, quantized: bool = False) -> None:
    """Every expected key present with the right shape; nothing unexpected but the ignore list.

    In a quantized file (`quantized=True`) each int8 weight must come with its `<key>_scale`
    (and a scale only with an int8 weight); float files accept no `_scale` keys.
    """
    expected = {}
    for component, prefix in PREFIXES.items():
        if component == "vae" and not _has(tensors, "vae"):
            continue  # a no-VAE checkpoint (detect() allows it)
        with torch.device("meta"):
            model = build_model(component, cfg)
        if quantized:
            from .quantize import install_int8

            try:
                install_int8(model, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None
        expected.update({prefix + k: v for k, v in model.state_dict().items()})  # meta tensors
    present = {k for k in tensors if not _ignored(k)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(expected[k].shape)})"
             for k in sorted(present & set(expected)) if tensors[k].shape != expected[k].shape]
    # a float weight stored as integers (e.g. an int8 weight whose scales a tool dropped)
    wrong_types = [f"{k} {str(tensors[k].dtype).replace('torch.', '')} (expected a float)"
                   for k in sorted(present & set(expected))
                   if expected[k].is_floating_point() and not tensors[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_few(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes: {_few(wrong, 3)}")
    if wrong_types:
        problems.append(f"{len(wrong_types)} wrong dtypes: {_few(wrong_types, 3)}")
    if problems:
        raise CheckpointError(f"{path}: does not match the {cfg.name} architecture: " + "; ".join(problems))


# ---------------------------------------------------------------------------- export


def export_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None, ema: bool = False,
                      int8: bool = False, int8_vae: bool = False, vae: str | Path | None = None) -> Path:
    """Write any supported checkpoint as a standard CompVis-layout single-file .safetensors.

    Only the weights inference uses are written (no EMA copy, no schedule buffers).
    `dtype` converts floating-point weights (e.g. torch.float16 halves the file).
    `int8=True` writes sdlite's int8 format (see `sdlite.quantize`): UNet and text encoder
    Linear/Conv2d weights in int8 with per-channel scales (the VAE too with `int8_vae=True`),
    everything else in `dtype` (default float16), quantized one tensor at a time as it is
    written. An int8 source file is written as a float file (each weight times its scales, in
    `dtype`, default float16) unless `int8=True`, which keeps it int8.
    `vae` bakes a standalone VAE file in, in place of the source's VAE (or where it has none).
    A source without VAE weights is written without them unless `vae` is given.
    """
    dst = Path(dst).expanduser()
    if dst.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{dst}: the output must be a .safetensors file")
    if not dst.parent.is_dir():
        raise CheckpointError(f"{dst.parent}: output folder does not exist")
    if dst.is_dir():
        raise CheckpointError(f"{dst}: is a folder; give the output file's name")
    if not os.access(dst.parent, os.W_OK):
        raise CheckpointError(f"{dst.parent}: cannot write in this folder (permission denied)")
    ckpt = open_checkpoint(src, ema=ema)
    metadata = {"format": "pt", "sdlite.architecture": ckpt.config.name}
    if vae is not None:
        _bake_vae(ckpt, Path(vae).expanduser())
        from .vaefile import vae_name

        metadata["sdlite.vae"] = vae_name(vae)
    if int8:
        return _export_int8(ckpt, dst, metadata, dtype or torch.float16, int8, int8_vae)
    if ckpt.quantization:  # back to a plain float file, which any tool reads as it is
        return _export_dequantized(ckpt, dst, metadata, dtype or torch.float16)
    out = {k: v for k, v in ckpt.tensors.items() if not _ignored(k)}
    save_safetensors(out, dst, metadata=metadata, cast=dtype)
    return dst


def _bake_vae(ckpt: Checkpoint, vae: Path) -> None:
    """Put a VAE file's weights in the opened checkpoint in place of its own (checked to fit),
    in the checkpoint's stored dtype (an fp32 VAE baked into an fp16 file is fp16 too)."""
    from .vaefile import fit_vae, read_vae_tensors

    tensors = read_vae_tensors(vae)
    cfg = fit_vae(vae, tensors, ckpt)
    prefix = PREFIXES["vae"]
    kept = {k: v for k, v in ckpt.tensors.items() if not k.startswith(prefix)}
    ckpt.tensors = {**kept, **{prefix + k: v.to(ckpt.dtype) if v.is_floating_point() else v for k, v in tensors.items()}}
    ckpt.config, ckpt.has_vae = replace(ckpt.config, vae=cfg), True


def _export_dequantized(ckpt: Checkpoint, dst: Path, metadata: dict, dtype: torch.dtype) -> Path:
    """An int8 file written as a float one: each int8 weight times its scales, in `dtype`."""
    from .quantize import SCALE_SUFFIX, Deferred, _is_scale, dequantize

    tensors = {k: v for k, v in ckpt.tensors.items() if not _ignored(k)}
    out = {}
    for k, v in tensors.items():
        if _is_scale(k, tensors):
            continue
        if v.dtype == torch.int8 and k + SCALE_SUFFIX in tensors:
            out[k] = Deferred(v.shape, dtype, lambda q=v, s=tensors[k + SCALE_SUFFIX]: dequantize(q, s, dtype))
        else:
            out[k] = v
    save_safetensors(out, dst, metadata=metadata, cast=dtype)
    return dst


def _export_int8(ckpt: Checkpoint, dst: Path, metadata: dict, dtype: torch.dtype | None, int8: bool,
                 int8_vae: bool) -> Path:
    from .quantize import DEFAULT_COMPONENTS, METADATA, quantize_state_dict

    out = {}
    for component, prefix in PREFIXES.items():
        state = {k: v for k, v in ckpt.state_dict(component).items() if not _ignored(prefix + k)}
        quantize = int8 and (component in DEFAULT_COMPONENTS or (component == "vae" and int8_vae))
        # Deferred values: each tensor is quantized/converted only when save_safetensors writes it.
        part = quantize_state_dict(state, component, ckpt.config, layers=None if quantize else (), dtype=dtype, lazy=True)
        out.update({prefix + k: v for k, v in part.items()})
    save_safetensors(out, dst, metadata={**metadata, **METADATA})
    return dst
