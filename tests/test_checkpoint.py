"""Checkpoint formats, architecture detection, export, and every bad-input path."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_close
from sdlite.checkpoint import PREFIXES, export_checkpoint, open_checkpoint
from sdlite.errors import CheckpointError, UnsupportedModelError
from sdlite.tensorfile import load_safetensors


@pytest.fixture(scope="session")
def tiny_single(tiny, tmp_path_factory) -> Path:
    """The tiny reference written as a CompVis single file by sdlite's exporter."""
    out = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    return export_checkpoint(tiny.folder, out)


def tiny_inputs(cfg, hw=(8, 8)):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, cfg.unet.in_channels, *hw, generator=g), torch.tensor([20.0, 700.0]),
            torch.randn(2, 77, cfg.unet.context_dim, generator=g))


def check_unet_matches(ckpt_path, ref, dtype=None, rel=1e-4, **kw):
    ours = open_checkpoint(ckpt_path, **kw).load("unet", dtype=dtype)
    x, t, c = tiny_inputs(ref.cfg)
    with torch.no_grad():
        return assert_close(ours(x, t, c), ref.pipe.unet(x, t, c).sample, rel=rel, what=f"unet from {ckpt_path.name}")


def compvis_state(path) -> dict:
    return dict(load_safetensors(path)[0])


# ------------------------------------------------------------------ formats


def test_exported_file_is_standard_compvis_layout(tiny_single):
    sd = load_file(str(tiny_single))  # the real safetensors library reads it
    assert "model.diffusion_model.input_blocks.0.0.weight" in sd
    assert "first_stage_model.decoder.conv_out.weight" in sd
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd
    assert all(k.startswith(tuple(PREFIXES.values())) for k in sd)
    ours = compvis_state(tiny_single)
    assert set(ours) == set(sd) and all(torch.equal(ours[k], sd[k]) for k in sd)


def test_exported_file_loads_in_diffusers_from_single_file(tiny, tiny_single):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(tiny_single), config=str(tiny.folder), local_files_only=True, safety_checker=None)
    x, t, c = tiny_inputs(tiny.cfg)
    z = torch.randn(1, 4, 8, 8)
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(pipe.unet(x, t, c).sample, tiny.pipe.unet(x, t, c).sample, what="diffusers<-export unet")
        assert_close(pipe.vae.decode(z).sample, tiny.pipe.vae.decode(z).sample, what="diffusers<-export vae")
        assert_close(pipe.text_encoder(ids)[0], tiny.pipe.text_encoder(ids)[0], what="diffusers<-export text")


@pytest.mark.full
def test_full_export_loads_in_diffusers_from_single_file(full, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = export_checkpoint(full.folder, tmp_path / "sd15.safetensors")
    try:
        ck = open_checkpoint(out)
        assert ck.config.name == "sd-v1" and ck.format == "safetensors"
        pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(full.folder), local_files_only=True,
                                                        safety_checker=None)
    finally:
        out.unlink()  # 4.3 GB: freed now, not at the end of the run
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        assert_close(pipe.unet(x, 300, c).sample, full.pipe.unet(x, 300, c).sample, what="full diffusers<-export unet")
        z = torch.randn(1, 4, 8, 8, generator=g)
        assert_close(pipe.vae.decode(z).sample, full.pipe.vae.decode(z).sample, what="full diffusers<-export vae")
    del pipe


def test_single_file_safetensors_parity(tiny, tiny_single):
    ck = open_checkpoint(tiny_single)
    assert ck.config.name == "tiny" and ck.format == "safetensors" and ck.dtype == torch.float32
    check_unet_matches(tiny_single, tiny)


@pytest.mark.parametrize("wrapper", [True, False])
@pytest.mark.parametrize("zip_format", [True, False])
def test_ckpt_with_and_without_state_dict_wrapper(tiny, tiny_single, tmp_path, wrapper, zip_format, monkeypatch):
    import sys
    import types

    # A Lightning-style file: numpy global_step and a pickled callback object beside the weights,
    # as in the released CompVis checkpoints.
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "last.ckpt"

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.setitem(sys.modules, name, mod if name == mod.__name__ else types.ModuleType(name))
    sd = compvis_state(tiny_single)
    sd = {k: v.clone() for k, v in sd.items()}
    sd["betas"] = torch.linspace(0.00085, 0.012, 1000)  # schedule buffers are ignored
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    obj = {"state_dict": sd, "global_step": np.int64(470000), "epoch": 5,
           "callbacks": {ModelCheckpoint: ModelCheckpoint()}} if wrapper else sd
    path = tmp_path / "model.ckpt"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    monkeypatch.delitem(sys.modules, mod.__name__)  # the loader must not need the class
    ck = open_checkpoint(path)
    assert ck.format == "ckpt"
    check_unet_matches(path, tiny)
    ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():  # the text encoder loads although the file has a position_ids buffer
        assert_close(ck.load("text")(ids), tiny.pipe.text_encoder(ids)[0], what="text from .ckpt")


def test_diffusers_folder_bin_and_prefixed_text_keys(tiny, tmp_path):
    folder = tmp_path / "bin"
    tiny.pipe.save_pretrained(folder, safe_serialization=False)
    # The SD 1.5 diffusers release has text_encoder/pytorch_model.bin with `text_model.`-prefixed
    # keys (transformers 5 writes model.safetensors without the prefix).
    st = folder / "text_encoder" / "model.safetensors"
    if st.exists():
        state = load_file(str(st))
        st.unlink()
        torch.save({("text_model." + k if not k.startswith("text_model.") else k): v for k, v in state.items()},
                   folder / "text_encoder" / "pytorch_model.bin")
    assert (folder / "unet" / "diffusion_pytorch_model.bin").exists()
    ck = open_checkpoint(folder)
    assert ck.format == "diffusers"
    check_unet_matches(folder, tiny)
    ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_close(ck.load("text")(ids), tiny.pipe.text_encoder(ids)[0], what="text from prefixed .bin")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stored_weights(tiny, tiny_single, tmp_path, dtype):
    out = export_checkpoint(tiny_single, tmp_path / "half.safetensors", dtype=dtype)
    ck = open_checkpoint(out)
    assert ck.dtype == dtype
    assert out.stat().st_size < 0.55 * tiny_single.stat().st_size
    ours = ck.load("unet", dtype=torch.float32)
    ref = ck.load("unet")  # stored dtype kept
    assert next(ref.parameters()).dtype == dtype
    # Loaded weights are exactly the reference weights rounded to the stored dtype.
    full = open_checkpoint(tiny_single).state_dict("unet")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, full[k].to(dtype).float()), k
    x, t, c = tiny_inputs(tiny.cfg)
    with torch.no_grad():
        assert_close(ours(x, t, c), tiny.pipe.unet(x, t, c).sample, rel=3e-2, what=f"unet stored {dtype}")


def test_fp16_variant_diffusers_folder(tiny, tmp_path):
    import shutil

    # The layout of `save_pretrained(variant="fp16")`, made without touching the shared reference.
    folder = tmp_path / "fp16"
    shutil.copytree(tiny.folder, folder)
    for f in folder.glob("*/*.safetensors"):
        half = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(f)).items()}
        save_file(half, str(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors"))))
        f.unlink()
    ck = open_checkpoint(folder)
    assert ck.dtype == torch.float16
    check_unet_matches(folder, tiny, dtype=torch.float32, rel=3e-2)


def test_ema_selection(tiny, tiny_single, tmp_path):
    sd = {k: v.clone() for k, v in compvis_state(tiny_single).items()}
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    for k in unet_keys:  # EMA copy: CompVis LitEma names drop the dots
        sd["model_ema." + k[len("model."):].replace(".", "")] = sd[k] * 0.5
    sd["model_ema.num_updates"] = torch.tensor(1000)
    path = tmp_path / "ema.ckpt"
    torch.save({"state_dict": sd}, path)
    default, ema = open_checkpoint(path), open_checkpoint(path, ema=True)
    assert default.has_ema and ema.ema
    k = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(default.tensors[k], sd[k])
    assert torch.equal(ema.tensors[k], sd[k] * 0.5)
    check_unet_matches(path, tiny)
    with pytest.raises(CheckpointError, match="no EMA weights|has none"):
        open_checkpoint(tiny_single, ema=True)


def test_old_transformers_text_keys(tiny, tiny_single, tmp_path):
    sd = compvis_state(tiny_single)
    pre = "cond_stage_model.transformer."
    old = {(pre + k[len(pre + "text_model."):] if k.startswith(pre) else k): v for k, v in sd.items()}
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old.items()}, str(path))
    ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_close(open_checkpoint(path).load("text")(ids), tiny.pipe.text_encoder(ids)[0], what="old text keys")


def test_loading_is_zero_copy(tiny_single):
    """Weights stay views of the file's memory map when no dtype change is asked for."""
    ck = open_checkpoint(tiny_single)
    vae = ck.load("vae")
    w = vae.decoder.conv_out.weight
    src = ck.tensors["first_stage_model.decoder.conv_out.weight"]
    assert w.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()


# ------------------------------------------------------------------ bad input


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        open_checkpoint(path)
    assert not marker.exists()
    with open(tmp_path / "evil_legacy.ckpt", "wb") as f:  # a raw pickle, not a torch zip
        pickle.dump({"payload": _Evil(marker)}, f)
    with pytest.raises(CheckpointError):
        open_checkpoint(tmp_path / "evil_legacy.ckpt")
    assert not marker.exists()


def test_ema_requested_from_a_pruned_file_says_so(tiny_single):
    with pytest.raises(CheckpointError, match="EMA weights requested, but this file has none .*without --ema"):
        open_checkpoint(tiny_single, ema=True)


def _raw_safetensors(path, header: dict, data: bytes, pad: int = 8, n_delta: int = 0):
    import json
    import struct

    text = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(text) + n_delta) + text + data)
    return path


def test_safetensors_headers_that_would_shift_or_share_bytes_are_refused(tmp_path):
    """What the safetensors library refuses, sdlite refuses too, instead of reading shifted or
    shared bytes: a header length that lands in the padding, overlapping or gapped entries,
    data past the last tensor, a name given twice, metadata that is not strings."""
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()
    good = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    ok, _ = load_safetensors(_raw_safetensors(tmp_path / "ok.safetensors", good, data))
    assert ok["b"].tolist() == [4.0, 5.0, 6.0, 7.0]
    cases = {
        "short.safetensors": (dict(good), data, -4, "cover 32 bytes of a 36-byte data section"),
        "overlap.safetensors": ({**good, "b": {"dtype": "F32", "shape": [4], "data_offsets": [12, 28]}}, data[:28], 0,
                                "starts at byte 12 of the data, expected 16"),
        "appended.safetensors": (dict(good), data + b"\0" * 4, 0, "cover 32 bytes of a 36-byte"),
        "meta.safetensors": ({**good, "__metadata__": {"sdlite.format_version": 1}}, data, 0, "corrupt safetensors metadata"),
    }
    for name, (header, payload, n_delta, msg) in cases.items():
        with pytest.raises(CheckpointError, match=msg):
            load_safetensors(_raw_safetensors(tmp_path / name, header, payload, n_delta=n_delta))
    twice = tmp_path / "twice.safetensors"
    text = (b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
            b'"a":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}}')
    import struct

    twice.write_bytes(struct.pack("<Q", len(text)) + text + data)
    with pytest.raises(CheckpointError, match="a name appears twice: 'a'"):
        load_safetensors(twice)


def test_truncated_and_corrupt_files(tiny_single, tmp_path):
    data = tiny_single.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="corrupt"):
        open_checkpoint(junk)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        open_checkpoint(empty)
    ck = tmp_path / "cut.ckpt"
    torch.save({"a": torch.zeros(1000)}, ck)
    ck.write_bytes(ck.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        open_checkpoint(ck)
    # not checkpoints at all: called that, not "unsafe" (the unpickler's words for junk)
    for name, head, hint in (("page.ckpt", b"<!DOCTYPE html><html><body>404</body></html>", "a web page"),
                             ("lfs.ckpt", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab", "git-lfs"),
                             ("photo.ckpt", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(100), "another kind"),
                             ("empty.ckpt", b"", "an empty file")):
        (tmp_path / name).write_bytes(head)
        with pytest.raises(CheckpointError, match=f"not a PyTorch checkpoint .*{hint}"):
            open_checkpoint(tmp_path / name)


def _write(tmp_path, name, tensors):
    path = tmp_path / name
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_foreign_architectures_are_named(tmp_path):
    z = torch.zeros(1)
    cases = {
        "sdxl": ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": z,
                  "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
                  "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1280, 2816)}, "SDXL"),
        "sd2": ({"cond_stage_model.model.ln_final.weight": z,
                 "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, "SD 2"),
        "vae": ({"encoder.conv_in.weight": z, "decoder.conv_out.weight": z}, "standalone VAE"),
        "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": z}, "LoRA"),
        "other": ({"foo.bar": z}, "no Stable Diffusion layout"),
    }
    for name, (tensors, expect) in cases.items():
        with pytest.raises(UnsupportedModelError, match=expect):
            open_checkpoint(_write(tmp_path, f"{name}.safetensors", tensors))


def test_sd2_context_width_and_pix2pix_channels_are_named(tiny_single, tmp_path):
    sd = {k: v.clone() for k, v in compvis_state(tiny_single).items()}
    k = "model.diffusion_model.input_blocks.0.0.weight"
    p2p = dict(sd, **{k: torch.zeros(sd[k].shape[0], 8, 3, 3)})
    with pytest.raises(UnsupportedModelError, match="InstructPix2Pix"):
        open_checkpoint(_write(tmp_path, "p2p.safetensors", p2p))
    sd2 = {kk: (torch.zeros(v.shape[0], 1024) if kk.endswith("attn2.to_k.weight") else v) for kk, v in sd.items()}
    with pytest.raises(UnsupportedModelError, match="SD 2"):
        open_checkpoint(_write(tmp_path, "sd2.safetensors", sd2))


def test_missing_unexpected_and_wrong_shapes_are_listed(tiny_single, tmp_path):
    sd = {k: v.clone() for k, v in compvis_state(tiny_single).items()}
    sd.pop("first_stage_model.decoder.conv_out.bias")
    sd["model.diffusion_model.extra.weight"] = torch.zeros(3)
    sd["first_stage_model.quant_conv.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(_write(tmp_path, "bad.safetensors", sd))
    msg = str(e.value)
    assert "1 missing keys: first_stage_model.decoder.conv_out.bias" in msg
    assert "1 unexpected keys: model.diffusion_model.extra.weight" in msg
    assert "first_stage_model.quant_conv.bias (5,)" in msg and "\n" not in msg


def test_missing_paths_and_incomplete_folders(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="missing unet/"):
        open_checkpoint(tmp_path)
    folder = tmp_path / "partial"
    for sub in ("unet", "vae", "text_encoder"):
        (folder / sub).mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no weights file"):
        open_checkpoint(folder)
    txt = tmp_path / "model.txt"
    txt.write_text("hello")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        open_checkpoint(txt)
    notdict = tmp_path / "list.ckpt"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        open_checkpoint(notdict)


def test_export_refuses_bad_destination(tiny_single, tmp_path):
    with pytest.raises(CheckpointError, match=".safetensors"):
        export_checkpoint(tiny_single, tmp_path / "out.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_checkpoint(tiny_single, tmp_path / "no" / "out.safetensors")
    assert not list(tmp_path.glob("*.partial"))


def test_malformed_safetensors_entries_are_one_line_errors(tmp_path):
    import json as _json
    import struct as _struct

    for entry in ("text", {"dtype": "F32", "shape": [1]}, {"dtype": "F32", "shape": [1], "data_offsets": ["0", 4]},
                  {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}):
        blob = _json.dumps({"w": entry}).encode()
        path = tmp_path / "bad.safetensors"
        path.write_bytes(_struct.pack("<Q", len(blob)) + blob + b"\0" * 8)
        with pytest.raises(CheckpointError, match="corrupt safetensors entry"):
            open_checkpoint(path)
