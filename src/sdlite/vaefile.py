"""Standalone VAE files (e.g. vae-ft-mse-840000-ema-pruned): read, check against a model, load.

A VAE file replaces the checkpoint's own VAE (`StableDiffusion(..., vae=PATH)`, `--vae`), is
required by checkpoints shipped without one ("no-VAE" files), and can be baked into an export.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from . import checkpoint as ck
from .config import VAEConfig
from .errors import CheckpointError, UnsupportedModelError
from .vae import AutoencoderKL


def vae_name(path: str | Path) -> str:
    """How a VAE file is named in metadata: its file name; a diffusers `vae/` folder as `model/vae`."""
    path = Path(path).expanduser()
    return f"{path.absolute().parent.name}/{path.name}" if path.is_dir() and path.name == "vae" else path.name


def read_vae_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A standalone VAE's tensors in native (CompVis, `first_stage_model.`-less) keys, or CheckpointError.

    Accepts CompVis-layout files (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`;
    `loss.*` ignored; a `state_dict` wrapper or a `first_stage_model.` prefix stripped),
    diffusers-layout files, and diffusers `vae/` folders (or a diffusers model folder's `vae/`).
    """
    from .tensorfile import load_pickle, load_safetensors

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        file = next((folder / n for n in ck._DIFFUSERS_FILES if (folder / n).is_file()), None)
        if file is None:
            raise CheckpointError(f"{path}: no VAE weights (diffusion_pytorch_model.safetensors) in this folder")
        path = file
    if path.suffix.lower() == ".safetensors":
        tensors = load_safetensors(path)[0]
    elif path.suffix.lower() in ck.SINGLE_FILE_SUFFIXES:
        obj = load_pickle(path)
        if isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    else:
        raise CheckpointError(f"{path}: unknown VAE file type (expected .safetensors, .ckpt or a diffusers vae/ folder)")
    if any(k.startswith(ck.PREFIXES["unet"]) for k in tensors):
        raise CheckpointError(f"{path}: this is a full checkpoint, not a VAE; pass it as the model")
    prefix = ck.PREFIXES["vae"]
    if any(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("loss.", "model_ema."))}
    if any(".down_blocks." in k or ".mid_block." in k for k in tensors):
        tensors, unknown = ck._diffusers_to_native("vae", tensors)
        if unknown:
            raise CheckpointError(f"{path}: unexpected keys for a VAE: {ck._few(unknown)}")
    if "encoder.conv_in.weight" not in tensors or "decoder.conv_out.weight" not in tensors:
        what = ck.describe_foreign(tensors) if tensors else "an empty file"
        raise CheckpointError(f"{path}: not a VAE file: it looks like {what}")
    return tensors


def vae_config(path: str | Path, tensors: dict[str, torch.Tensor], model_vae: VAEConfig,
               latent_channels: int | None = None) -> VAEConfig:
    """The architecture of the VAE in `tensors`, checked to fit a model whose VAE is `model_vae`
    (same latent channels and downscale; the model's latent scale factor is kept), and checked
    key by key. CheckpointError names what does not fit. For a model without a VAE of its own,
    give `latent_channels` (its UNet's): then only those must match, at any downscale."""
    try:
        cfg = ck._infer_vae(tensors, path)
    except UnsupportedModelError as e:
        raise CheckpointError(f"{path}: not a usable VAE ({e})") from None
    if latent_channels is not None:
        if cfg.embed_dim != latent_channels:
            raise CheckpointError(f"{path}: this VAE does not fit the model (latent channels {cfg.embed_dim}; "
                                  f"the model's UNet works on {latent_channels})")
    elif (cfg.embed_dim, cfg.z_channels, cfg.downscale) != (model_vae.embed_dim, model_vae.z_channels, model_vae.downscale):
        raise CheckpointError(f"{path}: this VAE does not fit the model (latent channels {cfg.embed_dim}, "
                              f"downscale {cfg.downscale}; the model has {model_vae.embed_dim} and "
                              f"{model_vae.downscale})")
    cfg = replace(cfg, scale_factor=model_vae.scale_factor)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in AutoencoderKL(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in sorted(set(expected) & set(tensors)) if tensors[k].shape != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{len(x)} {what}: {ck._few(x, 3)}" for x, what in
                 ((missing, "missing keys"), (unexpected, "unexpected keys"), (wrong, "wrong shapes")) if x]
        raise CheckpointError(f"{path}: not an SD v1 VAE: " + "; ".join(parts))
    return cfg


def fit_vae(path: str | Path, tensors: dict[str, torch.Tensor], ckpt: "ck.Checkpoint") -> VAEConfig:
    """vae_config() for a VAE file given to a checkpoint: one with a VAE of its own needs the same
    latent space; one without (a "no-VAE" file) only its UNet's latent channels."""
    return vae_config(path, tensors, ckpt.config.vae, None if ckpt.has_vae else ckpt.config.unet.out_channels)


def load_vae(path: str | Path, model_vae: VAEConfig, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> torch.nn.Module:
    """sdlite's AutoencoderKL from a standalone VAE file, checked against the model's VAE config."""
    tensors = read_vae_tensors(path)
    return build_vae(vae_config(path, tensors, model_vae), tensors, device, dtype)


def build_vae(cfg: VAEConfig, tensors: dict[str, torch.Tensor], device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The AutoencoderKL of an already checked `cfg` (vae_config) from a VAE file's tensors;
    `dtype` None keeps the stored one."""
    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
    state = {k: v.to(device=device, dtype=dtype or v.dtype) if v.is_floating_point() else v.to(device)
             for k, v in tensors.items()}
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.eval().requires_grad_(False)
