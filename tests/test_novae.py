"""Checkpoints shipped without VAE weights ("no-VAE" files), VAE files given to the pipeline,
and VAEs baked into an export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sdlite.checkpoint import PREFIXES, export_checkpoint, open_checkpoint
from sdlite.cli import main
from sdlite.config import TINY
from sdlite.errors import CheckpointError, InputError
from sdlite.pipeline import StableDiffusion
from sdlite.tensorfile import load_safetensors, save_safetensors

VAE = PREFIXES["vae"]
SMALL = dict(width=32, height=32, steps=2, seed=5)


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as a single file, the same without its VAE, and its VAE alone."""
    d = tmp_path_factory.mktemp("novae")
    full = export_checkpoint(tiny.folder, d / "tiny.safetensors")
    tensors = load_safetensors(full)[0]
    save_safetensors({k: v for k, v in tensors.items() if not k.startswith(VAE)}, d / "novae.safetensors")
    save_safetensors({k[len(VAE):]: v for k, v in tensors.items() if k.startswith(VAE)}, d / "vae.safetensors")
    folder = d / "novae-diffusers"  # a diffusers folder without vae/
    folder.mkdir()
    for sub in ("unet", "text_encoder"):
        os.symlink(tiny.folder / sub, folder / sub)
    return {"full": full, "novae": d / "novae.safetensors", "vae": d / "vae.safetensors", "folder": folder}


def test_no_vae_checkpoint_opens_and_asks_for_a_vae(files):
    ck = open_checkpoint(files["novae"])
    assert not ck.has_vae and ck.config.name == "tiny" and ck.config.vae == TINY.vae
    assert open_checkpoint(files["full"]).has_vae
    with pytest.raises(CheckpointError, match="no VAE weights") as e:
        ck.load("vae")
    assert "--vae" in str(e.value) and "\n" not in str(e.value)
    for model in (files["novae"], files["folder"]):
        for memory in ("normal", "low"):
            with pytest.raises(CheckpointError, match="no VAE weights; give a VAE file"):
                StableDiffusion(model, memory=memory)
    assert not open_checkpoint(files["folder"]).has_vae


@pytest.mark.parametrize("memory", ["normal", "low"])
def test_no_vae_checkpoint_with_a_vae_file_equals_the_full_one(files, tiny, memory):
    reference = StableDiffusion(files["full"], memory=memory).txt2img("a cat", **SMALL)
    for model, vae in ((files["novae"], files["vae"]), (files["folder"], tiny.folder / "vae"),
                       (files["novae"], tiny.folder)):  # a diffusers model folder: its vae/
        sd = StableDiffusion(model, memory=memory, vae=vae)
        out = sd.txt2img("a cat", **SMALL)
        assert torch.equal(out.latents, reference.latents), (model.name, vae)
        assert np.array_equal(np.asarray(out.images[0]), np.asarray(reference.images[0]))
        if memory == "low":  # reloaded from the file for each decode
            again = sd.txt2img("a cat", **SMALL)
            assert np.array_equal(np.asarray(again.images[0]), np.asarray(reference.images[0]))


def test_a_reduced_precision_vae_file_is_kept_as_stored(files, tmp_path):
    """On the CPU an fp16 VAE file computes in float32 without a float32 copy of its weights,
    as the VAE inside an fp16 checkpoint does, and gives the same image."""
    novae16 = export_checkpoint(files["novae"], tmp_path / "novae16.safetensors", dtype=torch.float16)
    vae16 = tmp_path / "vae16.safetensors"
    save_safetensors({k: v.half() for k, v in load_safetensors(files["vae"])[0].items()}, vae16)
    baked16 = export_checkpoint(files["full"], tmp_path / "full16.safetensors", dtype=torch.float16)
    for memory in ("normal", "low"):
        a, b = StableDiffusion(baked16, memory=memory), StableDiffusion(novae16, vae=vae16, memory=memory)
        ra, rb = a.txt2img("a cat", **SMALL), b.txt2img("a cat", **SMALL)
        assert np.array_equal(np.asarray(ra.images[0]), np.asarray(rb.images[0])), memory
        if memory == "normal":
            dtypes = [{k: v.dtype for k, v in m.vae.state_dict().items()} for m in (a, b)]
            assert dtypes[0] == dtypes[1] and torch.float16 in dtypes[1].values()
        assert rb.params[0]["vae"] == "vae16.safetensors" and ra.params[0]["vae"] is None


def test_a_vae_file_replaces_the_checkpoints_own(files, tmp_path):
    tensors = {k: v.clone() for k, v in load_safetensors(files["vae"])[0].items()}
    tensors["decoder.conv_out.bias"] += 0.5
    save_safetensors(tensors, tmp_path / "brighter.safetensors")
    plain = np.asarray(StableDiffusion(files["full"]).txt2img("a cat", **SMALL).images[0], dtype=float)
    for memory in ("normal", "low"):
        sd = StableDiffusion(files["full"], vae=tmp_path / "brighter.safetensors", memory=memory)
        brighter = np.asarray(sd.txt2img("a cat", **SMALL).images[0], dtype=float)
        assert brighter.mean() > plain.mean() + 20, memory


def test_vae_file_errors(files, tmp_path):
    with pytest.raises(InputError, match="vae must be a path"):
        StableDiffusion(files["novae"], vae=123)
    with pytest.raises(CheckpointError, match="no such file"):
        StableDiffusion(files["novae"], vae=tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="full checkpoint, not a VAE"):
        StableDiffusion(files["novae"], vae=files["full"])
    from sdlite.config import VAEConfig
    from sdlite.vae import AutoencoderKL

    # A VAE with another downscale (one more level) does not replace a checkpoint's own VAE,
    # whose latent space the model was trained in; a no-VAE checkpoint takes it (the UNet works
    # at any latent size), but not one with other latent channels.
    other = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1))
    save_safetensors(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="does not fit the model") as e:
        StableDiffusion(files["full"], vae=tmp_path / "other.safetensors")
    assert "downscale 4" in str(e.value) and "\n" not in str(e.value)
    sd = StableDiffusion(files["novae"], vae=tmp_path / "other.safetensors")
    assert sd.latent_factor == 4 and sd.txt2img("a cat", **SMALL).latents.shape == (1, 4, 8, 8)
    wide = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, embed_dim=8))
    save_safetensors(wide.state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match="latent channels 8; the model's UNet works on 4"):
        StableDiffusion(files["novae"], vae=tmp_path / "wide.safetensors")


def test_export_without_vae_and_with_a_baked_vae(files, tmp_path):
    plain = export_checkpoint(files["novae"], tmp_path / "plain.safetensors")
    assert not any(k.startswith(VAE) for k in load_safetensors(plain)[0]) and not open_checkpoint(plain).has_vae
    baked = export_checkpoint(files["novae"], tmp_path / "baked.safetensors", vae=files["vae"])
    ours, reference = load_safetensors(baked), load_safetensors(files["full"])[0]
    assert set(ours[0]) == set(reference) and all(torch.equal(ours[0][k], reference[k]) for k in reference)
    assert ours[1]["sdlite.vae"] == "vae.safetensors" and open_checkpoint(baked).has_vae
    # baking replaces a VAE that is there, also in an int8 export
    half = {k: v * 0.5 if k.startswith("decoder.") else v for k, v in load_safetensors(files["vae"])[0].items()}
    save_safetensors(half, tmp_path / "half.safetensors")
    int8 = export_checkpoint(files["full"], tmp_path / "int8.safetensors", int8=True, vae=tmp_path / "half.safetensors")
    ck = open_checkpoint(int8)
    assert ck.quantization == "int8" and ck.has_vae
    stored = ck.state_dict("vae")
    assert torch.equal(stored["decoder.conv_out.weight"], half["decoder.conv_out.weight"].half())
    # an fp32 VAE baked into an fp16 file is written in fp16 (the file's dtype)
    novae16 = export_checkpoint(files["novae"], tmp_path / "novae16.safetensors", dtype=torch.float16)
    baked16 = export_checkpoint(novae16, tmp_path / "baked16.safetensors", vae=files["vae"])
    assert {v.dtype for k, v in load_safetensors(baked16)[0].items() if k.startswith(VAE)} == {torch.float16}
    with pytest.raises(CheckpointError, match="full checkpoint, not a VAE"):
        export_checkpoint(files["novae"], tmp_path / "bad.safetensors", vae=files["novae"])
    assert not (tmp_path / "bad.safetensors").exists() and not list(tmp_path.glob(".*.partial"))


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_no_vae_checkpoint(capsys, files, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the CLI's hash cache
    args = ("x", "-W", "32", "-H", "32", "--steps", "2", "--seed", "3")
    rc, _, err = _run(capsys, "txt2img", *args, "-m", files["novae"], "-o", tmp_path / "a")
    assert rc == 1 and "no VAE weights" in err and "--vae" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()  # the output folder is made with the first image, not before
    rc, _, err = _run(capsys, "txt2img", *args, "-m", files["novae"], "--vae", files["vae"], "-o", tmp_path / "b")
    assert rc == 0, err
    rc, _, err = _run(capsys, "txt2img", *args, "-m", files["full"], "-o", tmp_path / "c")
    assert rc == 0, err
    [b], [c] = sorted((tmp_path / "b").glob("*.png")), sorted((tmp_path / "c").glob("*.png"))
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(b)), np.asarray(Image.open(c)))
    rc, out, _ = _run(capsys, "info", files["novae"])
    assert rc == 0 and "no VAE (give one with --vae)" in out
    rc, out, _ = _run(capsys, "info", files["folder"], "--json")
    assert rc == 0 and json.loads(out)["vae_weights"] == "no (give a VAE file with --vae)"
    # a diffusers folder with unet/ and vae/ but no text_encoder/ is a broken model, not a VAE
    broken = tmp_path / "broken"
    broken.mkdir()
    for sub in ("unet", "vae"):
        os.symlink(tiny.folder / sub, broken / sub)
    rc, out, err = _run(capsys, "info", broken)
    assert rc == 1 and "missing text_encoder/" in err and "standalone VAE" not in out
    rc, out, err = _run(capsys, "convert", files["novae"], tmp_path / "baked.safetensors", "--vae", files["vae"])
    assert rc == 0 and "VAE vae.safetensors baked in" in out, err
    rc, out, err = _run(capsys, "convert", files["novae"], tmp_path / "still.safetensors")
    assert rc == 0 and ", no VAE," in out, err
    rc, _, err = _run(capsys, "convert", files["novae"], tmp_path / "x.safetensors", "--vae", tmp_path / "nope")
    assert rc == 2 and "--vae" in err and "no such file" in err and not (tmp_path / "x.safetensors").exists()
    rc, out, err = _run(capsys, "convert", files["novae"], tmp_path / "y.safetensors", "--vae", tiny.folder / "vae")
    assert rc == 0 and "VAE diffusers/vae baked in" in out, err
    assert load_safetensors(tmp_path / "y.safetensors")[1]["sdlite.vae"] == "diffusers/vae"


def test_cli_refuses_a_dangling_outdir_link_before_loading(capsys, files, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "dangling").symlink_to(tmp_path / "unmounted-drive")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    for out in (tmp_path / "dangling", tmp_path / "loop1" / "x"):
        rc, _, err = _run(capsys, "txt2img", "x", "-W", "32", "-H", "32", "--steps", "2", "-m", files["full"], "-o", out)
        assert rc == 1 and "cannot write to output folder" in err and "loaded" not in err, err
