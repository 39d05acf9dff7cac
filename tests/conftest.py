"""Shared fixtures: reference pipelines with seeded random weights, written in real formats."""

from __future__ import annotations

import gc
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from refmodels import diffusers_pipeline, diffusers_unet
from sdlite.config import SD_V1, TINY, ModelConfig, with_in_channels

torch.set_num_threads(max(1, torch.get_num_threads()))
# The first parallel exp of a process was sometimes (about 1 run in 6 of the attention tests on
# this machine, only with diffusers/transformers imported) up to 1e-4 less accurate than every
# later call with the same input: a PyTorch/library first-call effect, not sdlite's arithmetic.
# One exp here, before any test, keeps the 1e-5 attention bounds measuring sdlite.
torch.randn(2, 8, 256, 64, generator=torch.Generator().manual_seed(0)).exp_()


@dataclass
class RefModel:
    cfg: ModelConfig
    pipe: object  # diffusers StableDiffusionPipeline (fp32, CPU)
    folder: Path  # the pipeline saved as a diffusers folder (safetensors)


def tolerance(reference: torch.Tensor, rel: float = 1e-4) -> float:
    """The suite's tolerance: rel x max(1, max |reference|)."""
    return rel * max(1.0, reference.abs().max().item())


def assert_close(actual: torch.Tensor, reference: torch.Tensor, rel: float = 1e-4, what: str = "") -> float:
    diff = (actual.double() - reference.double()).abs().max().item()
    tol = tolerance(reference, rel)
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert diff <= tol, f"{what}: max abs diff {diff:.3e} > tolerance {tol:.3e}"
    print(f"[diff] {what}: max abs diff {diff:.3e} (tol {tol:.1e}, max|ref| {reference.abs().max().item():.3g})")
    return diff


def _make(tmp_path_factory, cfg: ModelConfig, name: str, seed: int) -> RefModel:
    folder = tmp_path_factory.mktemp(name)
    pipe = diffusers_pipeline(cfg, folder, seed=seed)
    pipe.save_pretrained(folder / "diffusers", safe_serialization=True)
    return RefModel(cfg, pipe, folder / "diffusers")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> RefModel:
    return _make(tmp_path_factory, TINY, "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_inpaint(tmp_path_factory) -> RefModel:
    return _make(tmp_path_factory, with_in_channels(TINY, 9), "tiny_inpaint", seed=10)


# The full-size model as a diffusers folder (4.3 GB) plus test_checkpoint's single-file export of it.
FULL_DISK_BYTES = 9 * 2**30


@pytest.fixture(scope="session")
def full(tmp_path_factory) -> RefModel:
    base = tmp_path_factory.getbasetemp()
    free = shutil.disk_usage(base).free
    if free < FULL_DISK_BYTES:
        pytest.fail(f"the full-size tests write about {FULL_DISK_BYTES / 2**30:.0f} GB under {base}, "
                    f"which has {free / 2**30:.1f} GB free", pytrace=False)
    ref = _make(tmp_path_factory, SD_V1, "full", seed=100)
    yield ref
    folder = ref.folder.parent
    del ref
    gc.collect()
    shutil.rmtree(folder, ignore_errors=True)  # 4.3 GB: not kept with a failing run's folder


@pytest.fixture(scope="session")
def full_inpaint_unet():
    return diffusers_unet(with_in_channels(SD_V1, 9).unet, seed=200)


class LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


class LivePeak(TorchDispatchMode):
    """The peak of the bytes held by tensors that aten ops created while the mode was on
    (activations; weights and inputs made before it do not count). A storage counts from the
    op that made it until the last tensor viewing it (any op output) is gone."""

    def __init__(self, exclude: set[int] = frozenset()):
        super().__init__()
        self.live: dict[int, list] = {}  # storage address -> [bytes, live tensors viewing it]
        self.current = self.peak = 0
        # Storages made before (e.g. weights, whose views ops return) are not counted.
        self.exclude = exclude

    def _drop(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self.exclude:
                continue
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._drop, key)
        return out

