"""The `sdlite` command: every command on the tiny model, every error path, PNG metadata read
back by a real reader (sd-parsers), --params-from reproduction, output naming and batch seeds.

Most tests call the entry function `sdlite.cli.main(argv)`; a few run `python -m sdlite` in a
subprocess (the real entry point, Ctrl-C). Images are 32x32 with 2 steps to stay fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlite import metadata as meta
from sdlite.checkpoint import PREFIXES, export_checkpoint, open_checkpoint
from sdlite.cli import main
from sdlite.errors import InputError
from sdlite.tensorfile import load_safetensors, save_safetensors

FAST = ["-W", "32", "-H", "32", "--steps", "2"]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Hash cache and demo model in a per-test cache dir; no model from the environment."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SDLITE_MODEL", raising=False)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is as fast, and far faster when other jobs share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory) -> Path:
    """The tiny reference model as a standard single-file checkpoint."""
    return export_checkpoint(tiny.folder, tmp_path_factory.mktemp("cli") / "tiny.safetensors")


@pytest.fixture(scope="module")
def tiny_inpaint_file(tiny_inpaint, tmp_path_factory) -> Path:
    return export_checkpoint(tiny_inpaint.folder, tmp_path_factory.mktemp("cli") / "tiny-inpaint.safetensors")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def make_image(path: Path, w=32, h=32, seed=0) -> Path:
    g = np.random.default_rng(seed)
    Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def one_line_error(err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------ help, version, samplers


def test_help_everywhere_with_examples(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "examples:" in out and "sdlite demo" in out
    for cmd in ("txt2img", "img2img", "inpaint", "convert", "info", "demo"):
        rc, out, _ = run(capsys, cmd, "--help")
        assert rc == 0 and "examples:" in out and f"sdlite {cmd}" in out, cmd
    rc, out, _ = run(capsys, "samplers", "--help")
    assert rc == 0 and "usage:" in out


def test_version(capsys, tmp_path):
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.startswith("sdlite 0.1.0") and "torch 2." in out
    done = subprocess.run(f"{sys.executable} -m sdlite --version | true; echo rc=${{PIPESTATUS[0]}}", shell=True,
                          executable="/bin/bash", capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    assert done.stdout.strip() == "rc=0" and "Traceback" not in done.stderr, (done.stdout, done.stderr)


def test_the_command_starts_without_torch(tmp_path):
    """`sdlite --help` and usage errors answer without importing torch (0.08 instead of 1.5 s
    here); torch is imported inside the command's error handling, where a Ctrl-C is exit 130."""
    code = ("import sys, sdlite.cli, sdlite; assert 'torch' not in sys.modules; "
            "rc = sdlite.cli.main(['--help']); assert 'torch' not in sys.modules; "
            "assert sdlite.TINY.name == 'tiny' and sdlite.open_checkpoint; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr


def test_samplers_lists_names_and_a1111_labels(capsys):
    rc, out, _ = run(capsys, "samplers")
    assert rc == 0
    for name, label in [("plms", "PLMS"), ("ddim", "DDIM"), ("euler_a", "Euler a"), ("dpmpp_2m", "DPM++ 2M")]:
        assert any(line.split()[0] == name and label in line for line in out.splitlines()), name


@pytest.mark.parametrize("name,expected", [
    ("euler_a", ("euler_a", False)), ("Euler a", ("euler_a", False)), ("DPM++ 2M Karras", ("dpmpp_2m", True)),
    ("dpm++ 2m", ("dpmpp_2m", False)), ("PLMS", ("plms", False)), ("heun_karras", ("heun", True)),
])
def test_sampler_names_accept_a1111_labels(name, expected):
    assert meta.resolve_sampler(name) == expected


# ------------------------------------------------------------------ txt2img and metadata


def test_txt2img_png_metadata_read_by_sd_parsers(capsys, tiny_file, tmp_path):
    from sd_parsers import ParserManager

    out_dir = tmp_path / "out"
    prompt = "a cat, sitting: on a mat"
    rc, out, err = run(capsys, "txt2img", prompt, "--model", tiny_file, *FAST, "--seed", 42, "--sampler", "euler",
                       "--karras", "-n", "blurry, dark", "--cfg-scale", 5, "-o", out_dir)
    assert rc == 0, err
    [png] = pngs(out_dir)
    assert png.name == "00000-42.png"
    assert out.strip().split()[:3] == [str(png), "seed", "42"]
    text = Image.open(png).info["parameters"]
    model_hash = hashlib.sha256(tiny_file.read_bytes()).hexdigest()[:10]
    assert text.split("\n") == [
        prompt, "Negative prompt: blurry, dark",
        f"Steps: 2, Sampler: Euler, Schedule type: Karras, CFG scale: 5.0, Seed: 42, Size: 32x32, "
        f"Model hash: {model_hash}, Model: tiny, Version: sdlite 0.1.0"]

    info = ParserManager().parse(png)
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    [sampler] = info.samplers
    assert sampler.name == "Euler" and sampler.parameters["scheduler"] == "Karras"
    assert [p.value for p in sampler.prompts] == [prompt]
    assert [p.value for p in sampler.negative_prompts] == ["blurry, dark"]
    assert int(sampler.parameters["seed"]) == 42 and int(sampler.parameters["steps"]) == 2
    assert float(sampler.parameters["cfg_scale"]) == 5.0
    assert info.metadata["Size"] == "32x32"
    assert sampler.model.hash == model_hash and sampler.model.name == "tiny"


def test_params_from_reproduces_identical_pixels(capsys, tiny_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    rc, _, err = run(capsys, "txt2img", "a lighthouse\nat dusk", "-m", tiny_file, *FAST, "--sampler", "DPM++ 2M Karras",
                     "-n", "fog", "--cfg-scale", 6.5, "--clip-skip", 2, "-o", a)
    assert rc == 0, err
    [first] = pngs(a)
    assert "Clip skip: 2" in Image.open(first).info["parameters"]
    rc, _, err = run(capsys, "txt2img", "--params-from", first, "-m", tiny_file, "-o", b)
    assert rc == 0, err
    [second] = pngs(b)
    assert second.name == first.name
    assert Image.open(second).info["parameters"] == Image.open(first).info["parameters"]
    assert np.array_equal(pixels(first), pixels(second))
    # options on the command line win over the image's
    rc, _, err = run(capsys, "txt2img", "--params-from", first, "-m", tiny_file, "--seed", 5, "-o", b)
    assert rc == 0, err
    assert (b / "00001-5.png").is_file() and "Seed: 5," in Image.open(b / "00001-5.png").info["parameters"]


def test_never_overwrites_and_numbers_files(capsys, tiny_file, tmp_path):
    out_dir = tmp_path / "out"
    for _ in range(2):
        assert run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "--seed", 7, "-o", out_dir)[0] == 0
    assert [p.name for p in pngs(out_dir)] == ["00000-7.png", "00001-7.png"]
    first_bytes = (out_dir / "00000-7.png").read_bytes()
    (out_dir / "00041-3.png").write_bytes(b"someone else's file")
    assert run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "--seed", 7, "-o", out_dir)[0] == 0
    assert (out_dir / "00042-7.png").is_file()
    assert (out_dir / "00000-7.png").read_bytes() == first_bytes
    assert (out_dir / "00041-3.png").read_bytes() == b"someone else's file"
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_save_png_skips_a_name_taken_meanwhile(tmp_path):
    image = Image.new("RGB", (8, 8))
    (tmp_path / "00003-9.png").write_bytes(b"taken")
    path = meta.save_png(image, tmp_path, 9, "p", index=3)
    assert path.name == "00004-9.png" and (tmp_path / "00003-9.png").read_bytes() == b"taken"
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any file the user makes, not 0600


def test_batch_seeds_are_seed_plus_i(capsys, tiny_file, tmp_path):
    rc, out, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "--seed", 10, "--batch-size", 2,
                       "-o", tmp_path / "batch")
    assert rc == 0, err
    files = pngs(tmp_path / "batch")
    assert [p.name for p in files] == ["00000-10.png", "00001-11.png"]
    assert [ln.split()[2] for ln in out.strip().splitlines()] == ["10", "11"]
    assert "Seed: 11," in Image.open(files[1]).info["parameters"]
    rc, _, _ = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "--seed", 11, "-o", tmp_path / "single")
    assert np.array_equal(pixels(files[1]), pixels(pngs(tmp_path / "single")[0]))


def test_random_seed_is_printed_and_saved(capsys, tiny_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SDLITE_MODEL", str(tiny_file))  # the model from the environment
    rc, out, err = run(capsys, "txt2img", "x", *FAST, "-o", tmp_path)
    assert rc == 0, err
    seed = int(out.split()[2])
    [png] = pngs(tmp_path)
    assert png.name == f"00000-{seed}.png" and f"Seed: {seed}," in Image.open(png).info["parameters"]
    assert f"seed {seed} (random)" in err


def test_from_file_one_prompt_a_line(capsys, tiny_file, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n\na green pear\n")
    rc, out, err = run(capsys, "txt2img", "--from-file", prompts, "-m", tiny_file, *FAST, "--seed", 3,
                       "-o", tmp_path / "out")
    assert rc == 0, err
    files = pngs(tmp_path / "out")
    assert [p.name for p in files] == ["00000-3.png", "00001-3.png"]
    assert [Image.open(p).info["parameters"].split("\n")[0] for p in files] == ["a red apple", "a green pear"]


def test_quiet_prints_nothing(capsys, tiny_file, tmp_path):
    rc, out, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "--quiet", "-o", tmp_path)
    assert rc == 0 and out == "" and err == ""
    assert len(pngs(tmp_path)) == 1


def test_progress_and_result_lines(capsys, tiny_file, tmp_path):
    rc, out, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "--seed", 1, "-o", tmp_path)
    assert rc == 0
    assert re.search(r"\d/2 \[\d\d:\d\d<", err) and "step/s" in err  # tqdm on stderr: count, ETA, rate
    assert out.strip().splitlines()[0].startswith(str(tmp_path / "00000-1.png"))
    assert "compiles the UNet" not in err


def test_fast_mode_on_cuda_says_the_first_step_compiles(capsys, tiny_file, tmp_path, monkeypatch):
    from sdlite import pipeline

    # the note's condition, as fast mode on a CUDA device would set it (no GPU here)
    monkeypatch.setattr(pipeline.StableDiffusion, "compiles_unet", property(lambda self: self.fast))
    monkeypatch.setattr(pipeline.StableDiffusion, "_speed_up", lambda self, unet: unet)  # no compile on the CPU
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compiled"))
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "--fast", "-o", tmp_path)
    assert rc == 0 and "fast mode: the first step at each image size compiles the UNet" in err, err
    assert f"the compiled kernels are kept in {tmp_path / 'compiled'}" in err, err  # where they are


# ------------------------------------------------------------------ img2img, inpaint, VAE


def test_img2img_writes_strength_and_keeps_image_size(capsys, tiny_file, tmp_path):
    init = make_image(tmp_path / "init.png", 40, 24)
    rc, _, err = run(capsys, "img2img", "a painting", "--init-image", init, "-m", tiny_file, "--steps", 4,
                     "--strength", 0.5, "--seed", 1, "-o", tmp_path / "out")
    assert rc == 0, err
    [png] = pngs(tmp_path / "out")
    text = Image.open(png).info["parameters"]
    assert Image.open(png).size == (40, 24)
    assert "Sampler: DDIM," in text and "Size: 40x24" in text and "Denoising strength: 0.5" in text
    assert meta.options_from_parameters(meta.parse_parameters(text))["strength"] == 0.5


@pytest.mark.parametrize("which", ["mask", "green", "inpainting-model"])
def test_inpaint(capsys, tiny_file, tiny_inpaint_file, tmp_path, which):
    init = make_image(tmp_path / "init.png")
    model = tiny_inpaint_file if which == "inpainting-model" else tiny_file
    if which == "green":
        arr = np.asarray(Image.open(init)).copy()
        arr[8:24, 8:24] = (0, 255, 0)
        Image.fromarray(arr).save(init)
        mask_args = ["--green-mask"]
    else:
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24] = 255
        Image.fromarray(mask).save(tmp_path / "mask.png")
        mask_args = ["--mask", tmp_path / "mask.png"]
    rc, _, err = run(capsys, "inpaint", "--init-image", init, *mask_args, "-m", model, "--steps", 2, "--seed", 4,
                     "-o", tmp_path / "out")
    assert rc == 0, err
    [png] = pngs(tmp_path / "out")
    text = Image.open(png).info["parameters"]
    assert text.startswith("Steps: 2, Sampler: DDIM,")  # no prompt: A1111 writes no empty first line
    assert "Denoising strength: 1.0" in text and "Size: 32x32" in text
    info = meta.parse_parameters(text)
    assert info["Prompt"] == "" and info["Seed"] == "4"


def _vae_variants(tiny_file: Path, folder: Path, tiny) -> dict[str, Path]:
    """The tiny model's VAE written standalone, the ways real VAE files come."""
    tensors = load_safetensors(tiny_file)[0]
    prefix = PREFIXES["vae"]
    vae = {k[len(prefix):]: v.clone() for k, v in tensors.items() if k.startswith(prefix)}
    out = {"safetensors": folder / "vae.safetensors", "ckpt": folder / "vae.ckpt", "diffusers": tiny.folder / "vae"}
    save_safetensors({**vae, "loss.logvar": torch.zeros(())}, out["safetensors"])
    torch.save({"state_dict": {prefix + k: v for k, v in vae.items()}, "global_step": 10}, out["ckpt"])
    return out


def test_separate_vae_file(capsys, tiny, tiny_file, tmp_path, monkeypatch):
    base = tmp_path / "base"
    assert run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "--seed", 2, "-o", base)[0] == 0
    reference = pixels(pngs(base)[0])
    for kind, path in _vae_variants(tiny_file, tmp_path, tiny).items():
        rc, out, err = run(capsys, "txt2img", "x", "-m", tiny_file, "--vae", path, *FAST, "--seed", 2,
                           "-o", tmp_path / kind)
        assert rc == 0, f"{kind}: {err}"
        [png] = pngs(tmp_path / kind)
        assert np.array_equal(pixels(png), reference), kind
        if path.is_file():
            vae_hash = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
            assert f"VAE hash: {vae_hash}, VAE: {path.name}" in Image.open(png).info["parameters"]
    # a different VAE really is used, also when the low memory mode reloads it for each stage
    tensors = load_safetensors(tmp_path / "vae.safetensors")[0]
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors["decoder.conv_out.bias"] += 0.5
    save_safetensors(tensors, tmp_path / "brighter.safetensors")
    for memory in ("normal", "low", "high", "parked"):
        if memory == "parked":  # normal mode as on CUDA: the VAE waits in host memory between stages
            from sdlite import parking

            monkeypatch.setattr(parking, "SEPARATE_MEMORY", ("cpu",))
        out_dir = tmp_path / f"brighter-{memory}"
        rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, "--vae", tmp_path / "brighter.safetensors", *FAST,
                         "--seed", 2, "--memory", "normal" if memory == "parked" else memory, "-o", out_dir)
        assert rc == 0, err
        assert pixels(pngs(out_dir)[0]).mean() > reference.mean() + 20, memory


def test_channels_last_off_cuda_is_an_error(capsys, tiny_file, tmp_path):
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, "--device", "cpu", "--channels-last", "on", *FAST,
                     "-o", tmp_path)
    assert rc == 2  # bad input
    one_line_error(err, "channels_last=True needs device='cuda'")
    rc, _, _ = run(capsys, "txt2img", "x", "-m", tiny_file, "--device", "cpu", "--channels-last", "off", *FAST,
                   "-o", tmp_path)
    assert rc == 0 and len(pngs(tmp_path)) == 1


def test_cfg_batch_option_reaches_the_pipeline(capsys, tiny_file, tmp_path, monkeypatch):
    from sdlite import pipeline

    seen = []
    real = pipeline.StableDiffusion._batches_cfg
    monkeypatch.setattr(pipeline.StableDiffusion, "_batches_cfg",
                        lambda self, x: seen.append((self.cfg_batch, real(self, x))) or seen[-1][1])
    for option, expected in (("on", (True, True)), ("off", (False, False)), ("auto", (None, True))):
        rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, "--cfg-batch", option, *FAST,
                         "-o", tmp_path / option)
        assert rc == 0, err
        assert seen.pop() == expected and len(pngs(tmp_path / option)) == 1
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, "--cfg-batch", "maybe", *FAST, "-o", tmp_path)
    assert rc == 2 and "--cfg-batch" in err


def test_vae_errors(capsys, tiny_file, tmp_path):
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, "--vae", tiny_file, *FAST, "-o", tmp_path)
    assert rc == 1
    one_line_error(err, "full checkpoint, not a VAE")
    tensors = load_safetensors(tiny_file)[0]
    text = {k: v for k, v in tensors.items() if k.startswith(PREFIXES["text"])}
    save_safetensors(text, tmp_path / "text.safetensors")
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, "--vae", tmp_path / "text.safetensors", *FAST,
                     "-o", tmp_path)
    assert rc == 1
    one_line_error(err, "not a VAE file")
    assert pngs(tmp_path) == []


# ------------------------------------------------------------------ convert and info


def test_convert_and_info(capsys, tiny, tmp_path):
    dst = tmp_path / "tiny-fp16.safetensors"
    rc, out, err = run(capsys, "convert", tiny.folder, dst, "--dtype", "fp16")
    assert rc == 0, err
    assert "wrote" in out and "float16" in out
    ckpt = open_checkpoint(dst)
    assert ckpt.format == "safetensors" and ckpt.dtype == torch.float16 and ckpt.config.name == "tiny"

    rc, out, err = run(capsys, "info", dst, "--json")
    assert rc == 0, err
    info = json.loads(out)
    digest = hashlib.sha256(dst.read_bytes()).hexdigest()
    assert info["sha256"] == digest and info["model_hash"].startswith(digest[:10])
    assert info["dtype"] == "float16" and info["ema_weights"] == "no" and info["architecture"].startswith("tiny")
    rc, out, _ = run(capsys, "info", dst)
    assert rc == 0 and "architecture" in out and digest in out

    rc, _, err = run(capsys, "convert", tiny.folder, dst)  # never overwrite without --force
    assert rc == 2
    one_line_error(err, "exists", "--force")
    assert run(capsys, "convert", tiny.folder, dst, "--force")[0] == 0
    assert open_checkpoint(dst).dtype == torch.float32


def test_info_png_and_vae(capsys, tiny, tiny_file, tmp_path):
    assert run(capsys, "txt2img", "a boat", "-m", tiny_file, *FAST, "--seed", 8, "-o", tmp_path)[0] == 0
    rc, out, _ = run(capsys, "info", tmp_path / "00000-8.png")
    assert rc == 0 and out.startswith("a boat\nSteps: 2, Sampler: PLMS, Schedule type: Automatic, CFG scale: 7.5, Seed: 8")
    rc, out, _ = run(capsys, "info", tmp_path / "00000-8.png", "--json")
    assert rc == 0 and json.loads(out)["Seed"] == "8"
    vae = _vae_variants(tiny_file, tmp_path, tiny)["safetensors"]
    rc, out, _ = run(capsys, "info", vae, "--json")
    assert rc == 0 and json.loads(out)["format"] == "standalone VAE"

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    rc, _, err = run(capsys, "info", tmp_path / "plain.png")
    assert rc == 2
    one_line_error(err, "no generation parameters")


def test_reads_a1111_infotext_variants(tmp_path):
    # A1111 < 1.9: the schedule inside the sampler name; quoted values; a multi-line prompt.
    text = ('masterpiece, a castle\non a hill\nNegative prompt: lowres\n'
            'Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 123, Size: 512x768, '
            'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "a: 1, b: 2", Version: v1.6.0')
    info = meta.parse_parameters(text)
    assert info["Prompt"] == "masterpiece, a castle\non a hill" and info["Lora hashes"] == "a: 1, b: 2"
    opts = meta.options_from_parameters(info)
    assert (opts["sampler"], opts["karras"], opts["steps"], opts["cfg_scale"], opts["seed"]) == ("dpmpp_2m", True, 20, 7.0, 123)
    assert (opts["width"], opts["height"], opts["negative_prompt"]) == (512, 768, "lowres")
    # A1111 1.9+: the schedule in its own field
    opts = meta.options_from_parameters(meta.parse_parameters(
        "x\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 64x64"))
    assert (opts["sampler"], opts["karras"]) == ("euler_a", False)
    # a sampler sdlite lacks: an error naming the way out, unless the caller picks the sampler
    unknown = meta.parse_parameters("x\nSteps: 20, Sampler: DPM++ SDE, Schedule type: Karras, CFG scale: 7, Seed: 1")
    with pytest.raises(InputError, match="choose one with --sampler"):
        meta.options_from_parameters(unknown)
    assert meta.options_from_parameters(unknown, sampler=False)["seed"] == 1
    # JPEG/WebP: A1111 stores the text in EXIF UserComment (UTF-16 big-endian)
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg", exif=exif)
    assert meta.read_parameters(tmp_path / "a.jpg") == text


def test_metadata_round_trip_with_awkward_values():
    params = {"prompt": 'a "quoted", colon: prompt', "negative_prompt": "", "steps": 3, "sampler": "heun",
              "karras": False, "cfg_scale": 7.25, "seed": 2**32 - 1, "width": 64, "height": 72, "clip_skip": 1,
              "mode": "txt2img"}
    text = meta.format_parameters(params, model_hash="0123456789", model_name="my, model: v2")
    info = meta.parse_parameters(text)
    assert info["Prompt"] == params["prompt"] and info["Model"] == "my, model: v2"
    opts = meta.options_from_parameters(info)
    assert (opts["sampler"], opts["cfg_scale"], opts["seed"], opts["width"], opts["height"]) == \
        ("heun", 7.25, 2**32 - 1, 64, 72)


# ------------------------------------------------------------------ errors


def test_missing_model_says_how_to_pass_one(capsys, tmp_path):
    rc, _, err = run(capsys, "txt2img", "x", *FAST, "-o", tmp_path / "out")
    assert rc == 2
    one_line_error(err, "--model", "SDLITE_MODEL")
    assert not (tmp_path / "out").exists()
    rc, _, err = run(capsys, "txt2img", "x", "-m", tmp_path / "nope.safetensors", *FAST, "-o", tmp_path)
    assert rc == 2
    one_line_error(err, "nope.safetensors", "no such file")


def test_unreadable_image(capsys, tiny_file, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    rc, _, err = run(capsys, "img2img", "x", "--init-image", bad, "-m", tiny_file, "-o", tmp_path / "o")
    assert rc == 2
    one_line_error(err, "bad.png", "cannot read it as an image")
    rc, _, err = run(capsys, "inpaint", "--init-image", make_image(tmp_path / "i.png"), "--mask", tmp_path / "no.png",
                     "-m", tiny_file, "-o", tmp_path / "o")
    assert rc == 2
    one_line_error(err, "mask image", "no such file")


def test_wrong_architecture_checkpoint(capsys, tiny_file, tmp_path):
    sd2 = tmp_path / "sd2.safetensors"
    save_safetensors({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
                      "cond_stage_model.model.token_embedding.weight": torch.zeros(10, 8)}, sd2)
    rc, _, err = run(capsys, "txt2img", "x", "-m", sd2, *FAST, "-o", tmp_path / "o")
    assert rc == 1
    one_line_error(err, "SD 2.x")
    vae = tmp_path / "vae.safetensors"
    tensors = load_safetensors(tiny_file)[0]
    save_safetensors({k[len(PREFIXES["vae"]):]: v for k, v in tensors.items() if k.startswith(PREFIXES["vae"])}, vae)
    rc, _, err = run(capsys, "txt2img", "x", "-m", vae, *FAST, "-o", tmp_path / "o")
    assert rc == 1
    one_line_error(err, "standalone VAE")


@pytest.mark.parametrize("args,needles", [
    (["-W", "100", "-H", "64"], ["width 100 is not a multiple of 8", "96", "104"]),
    (["--sampler", "k_lms"], ["unknown sampler 'k_lms'", "euler_a", "DPM++ 2M"]),
    (["--sampler", "plms", "--karras"], ["Karras"]),
    (["--steps", "0"], ["--steps", "positive integer"]),
    (["--bogus-option"], ["unrecognized arguments: --bogus-option"]),
])
def test_usage_errors_exit_2_before_loading(capsys, tmp_path, args, needles):
    # the model path does not exist: a usage error is reported before the model is looked at
    rc, out, err = run(capsys, "txt2img", "x", "-m", tmp_path / "missing.safetensors", "-o", tmp_path, *args)
    assert rc == 2 and out == ""
    one_line_error(err, *needles)


def test_inpainting_checkpoint_needs_inpaint(capsys, tiny_inpaint_file, tmp_path):
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_inpaint_file, *FAST, "-o", tmp_path)
    assert rc == 2
    one_line_error(err.strip().splitlines()[-1], "inpainting checkpoint", "sdlite inpaint")  # after "loaded ..."


def test_unwritable_outdir(capsys, tiny_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a folder cannot be created under a file, even as root
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "-o", blocker / "out")
    assert rc == 1
    one_line_error(err, "cannot write to output folder")


def test_debug_shows_the_traceback(capsys, tmp_path):
    sd2 = tmp_path / "broken.safetensors"
    sd2.write_bytes(b"\x00" * 4)
    rc, _, err = run(capsys, "txt2img", "x", "-m", sd2, *FAST, "-o", tmp_path, "--debug")
    assert rc == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("sdlite: error:")


def test_interrupt_while_saving_leaves_no_file(capsys, tiny_file, tmp_path, monkeypatch):
    def half_then_ctrl_c(image, f, info):
        f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(meta, "_write_png", half_then_ctrl_c)
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "-o", tmp_path / "out")
    assert rc == 130
    one_line_error(err.split("\r")[-1], "interrupted")
    assert list((tmp_path / "out").iterdir()) == []


# ------------------------------------------------------------------ demo and the real entry point


def test_demo_builds_a_cached_checkpoint_and_writes_three_images(capsys, tmp_path, monkeypatch):
    from sdlite import demo

    monkeypatch.setattr(demo, "STEPS", 2)
    monkeypatch.setattr(demo, "SIZE", 32)
    rc, out, err = run(capsys, "demo", "-o", tmp_path / "out")
    assert rc == 0, err
    files = pngs(tmp_path / "out")
    assert len(files) == 3
    modes = [Image.open(p).info["parameters"] for p in files]
    assert "Denoising strength" not in modes[0] and all("Denoising strength" in m for m in modes[1:])
    assert "RANDOM weights" in out and "--model" in out and "SDLITE_MODEL" in out
    cached = demo.tiny_checkpoint_path()
    assert cached.parent == tmp_path / "cache" / "sdlite" and open_checkpoint(cached).config.name == "tiny"
    assert f"built tiny random-weight SD v1 checkpoint: {cached}" in err
    stamp = cached.stat().st_mtime_ns
    rc, _, err = run(capsys, "demo", "-o", tmp_path / "out")
    assert rc == 0 and "using cached" in err and cached.stat().st_mtime_ns == stamp
    assert len(pngs(tmp_path / "out")) == 6


def _env(tmp_path) -> dict:
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_python_dash_m_sdlite(tiny_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sdlite", "txt2img", "a tree", "--model", str(tiny_file), *FAST,
                           "--seed", "9", "-o", str(tmp_path)], capture_output=True, text=True, env=_env(tmp_path),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "00000-9.png").is_file() and "seed 9" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "sdlite", "txt2img", "x", "--sampler", "nope"],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown sampler" in proc.stderr


def test_ctrl_c_exits_130_without_a_partial_file(tiny_file, tmp_path):
    out_dir = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sdlite", "txt2img", "x", "--model", str(tiny_file), "-W", "32",
                             "-H", "32", "--steps", "1000", "--sampler", "euler", "-o", str(out_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tmp_path))
    seen = bytearray()
    reader = threading.Thread(target=lambda: [seen.extend(c) for c in iter(lambda: proc.stderr.read(1), b"")], daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while b"/1000" not in seen and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, f"finished before it could be interrupted: {bytes(seen)!r}"
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=120)
    reader.join(timeout=10)
    last = bytes(seen).decode().replace("\r", "\n").strip().splitlines()[-1]
    assert rc == 130 and last == "sdlite: error: interrupted"
    assert not out_dir.exists()  # no partial file, and no folder: it is made with the first image


def test_convert_int8_info_and_generate_with_memory_options(capsys, tiny_file, tmp_path):
    """`convert --int8` writes a file that `info` recognises and txt2img uses as it is; the memory
    options are accepted on the command line."""
    out = tmp_path / "tiny-int8.safetensors"
    rc, _, _ = run(capsys, "convert", str(tiny_file), str(out), "--int8")
    assert rc == 0
    rc, text, _ = run(capsys, "info", str(out))
    assert rc == 0 and "int8" in text
    rc, _, err = run(capsys, "txt2img", "a cat", "--model", str(out), "-W", "32", "-H", "32", "--steps", "2",
                     "--seed", "3", "--memory", "low", "--attention", "chunked", "--attention-chunk", "64",
                     "--vae-tiling", "on", "-o", str(tmp_path / "o"))
    assert rc == 0, err
    assert len(pngs(tmp_path / "o")) == 1
    rc, _, err = run(capsys, "txt2img", "a cat", "--model", str(tiny_file), "-W", "32", "-H", "32", "--steps", "2",
                     "--quantize", "int8", "-o", str(tmp_path / "o2"))
    assert rc == 0, err
    rc, _, err = run(capsys, "txt2img", "a cat", "--model", str(tiny_file), "--attention", "flash")
    assert rc == 2 and "flash" in err


# ------------------------------------------------------------------ review fixes (stop 17)


def _with_parameters(src: Path, dst: Path, edit) -> Path:
    from PIL import PngImagePlugin

    text = Image.open(src).info["parameters"]
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", edit(text))
    Image.open(src).save(dst, pnginfo=info)
    return dst


def test_old_8_digit_model_hash_is_recognised(capsys, tiny_file, tmp_path):
    """Images from A1111 before 2023 carry an 8-digit hash (SHA-256 of the 64 KiB at 1 MiB):
    the same file must not get the "image will differ" note, another file must."""
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "--seed", 3, "-o", tmp_path / "a")
    assert rc == 0, err
    [png] = pngs(tmp_path / "a")
    with open(tiny_file, "rb") as f:
        f.seek(0x100000)
        old = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    assert meta.legacy_model_hash(tiny_file) == old
    for hash_, differs in ((old, False), ("0123abcd", True)):
        src = _with_parameters(png, tmp_path / f"{hash_}.png",
                               lambda t, h=hash_: re.sub(r"Model hash: \w+", f"Model hash: {h}", t))
        rc, _, err = run(capsys, "txt2img", "--params-from", src, "-m", tiny_file, "-o", tmp_path / "b")
        assert rc == 0, err
        assert ("the image will differ" in err) == differs, err


def test_bad_values_from_an_image_or_flags_fail_before_the_model_loads(capsys, tiny_file, tmp_path):
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "--seed", 3, "-o", tmp_path / "a")
    assert rc == 0, err
    [png] = pngs(tmp_path / "a")
    cases = {"Seed: -5": "seed must be from 0", "Seed: 99999999999999999999": "seed must be from 0",
             "CFG scale: nan": "CFG scale must be a finite number"}
    for field, msg in cases.items():
        key = field.split(":")[0]
        src = _with_parameters(png, tmp_path / "p.png", lambda t: re.sub(rf"{key}: [^,]+", field, t))
        rc, _, err = run(capsys, "txt2img", "--params-from", src, "-m", tiny_file, "-o", tmp_path / "b")
        assert rc == 2 and msg in err and "loaded" not in err, (field, err)
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "--clip-skip", 13, "-o", tmp_path / "b")
    assert rc == 2 and "clip skip must be from 1 to 12" in err and "loaded" not in err, err
    Image.new("RGB", (7, 7)).save(tmp_path / "tiny.png")
    rc, _, err = run(capsys, "img2img", "x", "-i", tmp_path / "tiny.png", "-m", tiny_file, "--steps", 2,
                     "-o", tmp_path / "b")  # no size given: the image's own, rounded down to 8, is 0x0
    assert rc == 2 and "too small" in err and "loaded" not in err, err
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "--seed", 2**64 - 1, "-o", tmp_path / "c")
    assert rc == 0, err  # the largest seed, as in the Python API


def test_home_folder_paths_and_dot_as_model_name(capsys, tiny, tiny_file, tmp_path, monkeypatch):
    import shutil

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (home / "prompts.txt").write_text("a cat\n")
    Image.new("RGB", (32, 32), (200, 10, 10)).save(home / "init.png")
    rc, _, err = run(capsys, "img2img", "--from-file", "~/prompts.txt", "-i", "~/init.png", "-m", tiny_file, *FAST,
                     "-o", tmp_path / "a")
    assert rc == 0, err
    [png] = pngs(tmp_path / "a")
    shutil.copy(png, home / "made.png")
    rc, _, err = run(capsys, "img2img", "--params-from", "~/made.png", "-i", "~/init.png", "-m", tiny_file,
                     "-o", tmp_path / "b")
    assert rc == 0, err
    folder = tmp_path / "my-model"
    shutil.copytree(tiny.folder, folder)
    monkeypatch.chdir(folder)
    assert meta.model_name(".") == "my-model" and meta.model_name("./") == "my-model"


def test_info_counts_int8_files_like_float_ones_and_reads_vae_folders(capsys, tiny, tiny_file, tiny_inpaint, tmp_path):
    int8 = export_checkpoint(tiny_file, tmp_path / "int8.safetensors", int8=True)
    infos = []
    for path in (tiny_file, int8):
        rc, out, err = run(capsys, "info", path, "--json")
        assert rc == 0, err
        infos.append(json.loads(out))
    assert infos[0]["parameters"] == infos[1]["parameters"]  # the per-channel scales are not parameters
    assert "UNet and text encoder int8 per-channel" in infos[1]["dtype"]
    rc, out, err = run(capsys, "info", Path(tiny.folder) / "vae", "--json")  # as --vae accepts it
    assert rc == 0 and json.loads(out)["format"] == "standalone VAE", err
    rc, out, err = run(capsys, "info", tiny_inpaint.folder, "--json")
    assert rc == 0 and json.loads(out)["architecture"] == "tiny-inpainting: tiny test model (SD v1 inpainting layout)"


def test_convert_refuses_a_folder_as_output_and_expands_home(capsys, tiny_file, tmp_path, monkeypatch):
    (tmp_path / "d.safetensors").mkdir()
    rc, _, err = run(capsys, "convert", tiny_file, tmp_path / "d.safetensors", "--force")
    assert rc == 2 and "is a folder" in err, err
    monkeypatch.setenv("HOME", str(tmp_path))
    out = export_checkpoint(tiny_file, "~/home.safetensors", dtype=torch.float16)
    assert out == tmp_path / "home.safetensors" and out.is_file()


def test_sigterm_during_convert_cleans_up_like_ctrl_c():
    """`kill`/`timeout`/systemd send SIGTERM: while converting it raises KeyboardInterrupt, so
    the temporary file is removed as on Ctrl-C; the previous handler comes back after."""
    import signal

    from sdlite.cli import _terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with _terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted long before this ends
    assert signal.getsignal(signal.SIGTERM) is before


def test_info_into_a_pipe_closed_early_exits_quietly(tiny_file):
    """`sdlite info X | head`: a reader that leaves before sdlite writes is not an error."""
    done = subprocess.run(f"{sys.executable} -m sdlite info {tiny_file} | true; echo rc=${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "rc=0" and "Error" not in done.stderr, (done.stdout, done.stderr)


@pytest.mark.parametrize("streams", ["", "2>&1"])
def test_generation_into_a_pipe_closed_early_still_makes_every_image(tiny_file, tmp_path, streams):
    """`sdlite txt2img ... | head -1` (also with stderr): the images are the result, so the run
    goes on (rc 0)."""
    (tmp_path / "prompts.txt").write_text("a\nb\nc\n")
    cmd = (f"{sys.executable} -m sdlite txt2img --from-file {tmp_path / 'prompts.txt'} -m {tiny_file} "
           f"-W 32 -H 32 --steps 1 -o {tmp_path / 'out'} {streams} | head -1; echo rc=${{PIPESTATUS[0]}}")
    done = subprocess.run(cmd, shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=300,
                          env=_env(tmp_path))
    assert done.stdout.strip().splitlines()[-1] == "rc=0" and "Error" not in done.stderr, (done.stdout, done.stderr)
    assert len(pngs(tmp_path / "out")) == 3


def test_truncation_warnings_say_which_prompt_and_repeat(capsys, tiny_file, tmp_path):
    long = " ".join(["word"] * 90)
    (tmp_path / "prompts.txt").write_text(f"{long}\n{long}\n")
    rc, _, err = run(capsys, "txt2img", "--from-file", tmp_path / "prompts.txt", "-n", long, "-m", tiny_file,
                     "-W", "32", "-H", "32", "--steps", "1", "-o", tmp_path / "o")
    assert rc == 0, err
    lines = err.replace("\r", "\n").splitlines()
    assert sum(ln.startswith("warning: prompt truncated to 77 tokens (15 dropped)") for ln in lines) == 2, err
    assert sum(ln.startswith("warning: negative prompt truncated") for ln in lines) == 2, err


def test_run_header_and_load_line(capsys, tiny_file, tmp_path):
    init = make_image(tmp_path / "init.png", 40, 24)
    rc, _, err = run(capsys, "img2img", "x", "-i", init, "-W", "32", "--steps", "1", "--strength", "1", "--quantize", "int8",
                     "-m", tiny_file, "-o", tmp_path / "o")
    assert rc == 0, err
    assert "on cpu, float32, int8 weights in" in err
    assert "1 step, CFG" in err and "width 32 (the other side from the init image)" in err and "None" not in err


def test_params_from_notes_another_vae(capsys, tiny, tiny_file, tmp_path):
    vaes = _vae_variants(tiny_file, tmp_path, tiny)
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "--seed", 2, "--vae", vaes["safetensors"],
                     "-o", tmp_path / "a")
    assert rc == 0, err
    [with_vae] = pngs(tmp_path / "a")
    rc, _, err = run(capsys, "txt2img", "--params-from", with_vae, "-m", tiny_file, "--vae", vaes["ckpt"],
                     "-o", tmp_path / "b")
    assert rc == 0 and "was made with VAE hash" in err and "the image will differ" in err, err
    rc, _, err = run(capsys, "txt2img", "--params-from", with_vae, "-m", tiny_file, "--vae", vaes["safetensors"],
                     "-o", tmp_path / "c")
    assert rc == 0 and "VAE" not in err.replace("with VAE vae.safetensors", ""), err  # the same VAE: no note
    assert np.array_equal(pixels(pngs(tmp_path / "c")[0]), pixels(with_vae))
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "-o", tmp_path / "d")
    rc, _, err = run(capsys, "txt2img", "--params-from", pngs(tmp_path / "d")[0], "-m", tiny_file,
                     "--vae", vaes["ckpt"], "-o", tmp_path / "e")
    assert rc == 0 and "made without a separate VAE, this run uses vae.ckpt" in err, err


def test_outdir_probe_catches_a_folder_that_cannot_be_made(capsys, tiny_file, tmp_path, monkeypatch):
    """A new folder is really made for the check (then removed), so a place where mkdir fails
    (as root: /proc, a read-only mount) is refused before the model loads."""
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if "refused" in self.parts:
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "-o", tmp_path / "refused" / "out")
    assert rc == 1 and "loaded" not in err
    one_line_error(err, "cannot write to output folder", "Permission denied")
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "-o", tmp_path / "new" / "deeper")
    assert rc == 0 and len(pngs(tmp_path / "new" / "deeper")) == 1, err
    assert sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir())[0].endswith(".png")  # no probe left


def test_images_are_numbered_when_saved(capsys, tiny_file, tmp_path, monkeypatch):
    """Another run writing to the same folder meanwhile is counted: no two files share a number."""
    real = meta.save_png

    def save_png(image, outdir, seed, *args, **kwargs):
        path = real(image, outdir, seed, *args, **kwargs)
        if not (outdir / "00007-99.png").exists():
            (outdir / "00007-99.png").write_bytes(b"")  # the other run's image
        return path

    monkeypatch.setattr(meta, "save_png", save_png)
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "--batch-size", 2, "--seed", 1,
                     "-o", tmp_path / "o")
    assert rc == 0, err
    assert [p.name for p in pngs(tmp_path / "o")] == ["00000-1.png", "00007-99.png", "00008-2.png"]


def test_unquoted_prompt_hint(capsys):
    rc, _, err = run(capsys, "txt2img", "a", "red", "house")
    assert rc == 2
    one_line_error(err, "unrecognized arguments: red house", 'needs quotes: sdlite txt2img "a red house"')


def test_out_of_memory_is_one_line_with_a_hint(capsys, tiny_file, tmp_path, monkeypatch):
    from sdlite import pipeline

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(pipeline.StableDiffusion, "denoise", oom)
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "-o", tmp_path / "o")
    assert rc == 1
    one_line_error(err.strip().splitlines()[-1], "out of memory (", "--memory low")


def test_inpaint_with_an_all_black_mask_warns(capsys, tiny_file, tmp_path):
    init = make_image(tmp_path / "init.png")
    Image.new("L", (32, 32), 0).save(tmp_path / "black.png")
    rc, _, err = run(capsys, "inpaint", "x", "-i", init, "--mask", tmp_path / "black.png", "-m", tiny_file,
                     "--steps", "2", "-o", tmp_path / "o")
    assert rc == 0 and "warning: the mask has no white (repaint) pixels" in err, err


def test_a_bad_value_from_params_from_names_the_image(capsys, tiny_file, tmp_path):
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "-o", tmp_path / "a")
    assert rc == 0, err
    bad = _with_parameters(pngs(tmp_path / "a")[0], tmp_path / "bad.png", lambda t: t.replace("Size: 32x32", "Size: 60x64"))
    rc, _, err = run(capsys, "txt2img", "--params-from", bad, "-m", tiny_file, "-o", tmp_path / "b")
    assert rc == 2
    one_line_error(err, "width 60 is not a multiple of 8", f"(from --params-from {bad})")
    # a bad value typed on the command line is not blamed on the image
    good = pngs(tmp_path / "a")[0]
    for extra in (["-W", "36"], ["--sampler", "plms", "--karras"]):
        rc, _, err = run(capsys, "txt2img", "--params-from", good, *extra, "-m", tiny_file, "-o", tmp_path / "c")
        assert rc == 2 and "--params-from" not in err, err
    rc, _, err = run(capsys, "txt2img", "--params-from", bad, "-W", "64", "-m", tiny_file, "-o", tmp_path / "d")
    assert rc == 0, err  # the image's bad width replaced on the command line


def test_outdir_check_beside_another_run_making_the_same_folder(tmp_path, monkeypatch):
    """Two runs started at once on one new folder: the folder appearing (or going) between the
    look and the mkdir is looked at again, not reported as unwritable."""
    target = tmp_path / "new"
    real, calls = Path.mkdir, []

    def mkdir(self, *args, **kwargs):
        if self == target and not calls:
            calls.append(1)
            real(self)  # the other run got there first
            raise FileExistsError(17, "File exists")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert meta.check_outdir(target) == target and calls == [1]


def test_png_records_sdlite_options_and_params_from_notes_a_difference(capsys, tiny_file, tmp_path):
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "-o", tmp_path / "plain")
    assert rc == 0 and "sdlite options" not in Image.open(pngs(tmp_path / "plain")[0]).info["parameters"]
    rc, _, err = run(capsys, "txt2img", "x", "-m", tiny_file, *FAST, "--quantize", "int8", "-o", tmp_path / "q")
    [made] = pngs(tmp_path / "q")
    text = Image.open(made).info["parameters"]
    assert rc == 0 and "sdlite options: int8, Version: sdlite" in text, text
    assert meta.parse_parameters(text)["sdlite options"] == "int8"
    rc, _, err = run(capsys, "txt2img", "--params-from", made, "-m", tiny_file, "-o", tmp_path / "a")
    assert rc == 0 and "was made with options 'int8', this run has 'float32, exact'" in err, err
    rc, _, err = run(capsys, "txt2img", "--params-from", made, "-m", tiny_file, "--quantize", "int8", "-o", tmp_path / "b")
    assert rc == 0 and "made with options" not in err, err
    assert np.array_equal(pixels(pngs(tmp_path / "b")[0]), pixels(made))
    # an image from another program (no sdlite Version): its options are not known, no note
    other = _with_parameters(made, tmp_path / "a1111.png",
                             lambda t: t.replace("sdlite options: int8, ", "").replace("Version: sdlite", "Version: v1.9.4"))
    rc, _, err = run(capsys, "txt2img", "--params-from", other, "-m", tiny_file, "--fast", "-o", tmp_path / "c")
    assert rc == 0 and "made with options" not in err, err


def test_outdir_with_dot_dot_parts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("new2/../x", "new4/..", ".", "a/b/c"):
        assert meta.check_outdir(name) == Path(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the probes left nothing behind


def test_oom_while_reading_a_ckpt_is_not_called_a_corrupt_file(tmp_path, monkeypatch):
    from sdlite import tensorfile

    path = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(2)}, path)

    def load(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4 GB")

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        tensorfile.load_pickle(path)
