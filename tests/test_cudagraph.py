"""CUDA-graph bookkeeping that needs no GPU (capture and replay run in benchmarks/cuda_checks.py)."""

from __future__ import annotations

import copy

import torch

from refmodels import randomize_
from sdlite.checkpoint import build_model
from sdlite.config import TINY


def test_cuda_graphs_are_dropped_when_the_weights_move():
    """A captured graph reads the UNet's weights at fixed addresses: replacing a weight must
    drop the graphs (captured again on the next call), changing one in place must not."""
    from sdlite.cudagraph import GraphedUNet

    with torch.device("meta"):
        meta = build_model("unet", TINY)
    graphed = GraphedUNet(randomize_(meta, 3).eval())  # no capture happens before the first call
    graphed._graphs[("shape",)] = "a captured graph"
    assert not graphed.forget_if_weights_moved() and graphed._graphs
    with torch.no_grad():
        graphed.unet.out[2].weight.add_(1.0)  # in place: same address
    assert not graphed.forget_if_weights_moved() and graphed._graphs
    with torch.no_grad():
        graphed.unet.out[2].weight.data = graphed.unet.out[2].weight.detach().clone()  # moved
    assert graphed.forget_if_weights_moved() and not graphed._graphs
    assert not graphed.forget_if_weights_moved()  # the new addresses are remembered
    graphed.unet.load_state_dict(copy.deepcopy(graphed.unet.state_dict()), assign=True)
    assert graphed.forget_if_weights_moved()


def test_channels_last_option():
    """NHWC UNet: on by default for a float UNet on CUDA only; asking for it elsewhere is a
    one-line error; int8 layers keep NCHW unless asked."""
    import pytest

    from sdlite.errors import InputError
    from sdlite.pipeline import _channels_last

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _channels_last(None, cuda, "none") and not _channels_last(None, cuda, "int8")
    assert _channels_last(True, cuda, "int8") and not _channels_last(False, cuda, "none")
    assert not _channels_last(None, cpu, "none") and not _channels_last(False, cpu, "none")
    with pytest.raises(InputError, match="channels_last=True needs device='cuda'"):
        _channels_last(True, cpu, "none")


def test_channels_last_unet_computes_the_same(tiny):
    """The conversion the CUDA default applies (`_speed_up` with channels_last) gives NHWC
    convolution weights, and the UNet's code runs on them with the same result (here eager on
    the CPU; on an H100 the images were 80 dB PSNR from NCHW in fp16)."""
    from conftest import assert_close
    from sdlite.pipeline import StableDiffusion

    sd = StableDiffusion(tiny.folder, memory="low")
    ref = sd.load_component("unet")
    sd.channels_last = True
    nhwc = sd._speed_up(copy.deepcopy(ref))
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs
                         if w.shape[2] * w.shape[3] > 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10.0, 500.0])
    c = torch.randn(2, 77, sd.config.unet.context_dim, generator=g)
    with torch.inference_mode():
        assert_close(nhwc(x, t, c), ref(x, t, c), rel=1e-5, what="NHWC vs NCHW UNet")
        paired = nhwc(x[:1].contiguous(memory_format=torch.channels_last), t[:1], c)  # the guidance call
        assert_close(paired, ref(x[:1], t[:1], c), rel=1e-5, what="NHWC vs NCHW UNet, latent paired with 2 contexts")
        assert paired.is_contiguous(memory_format=torch.channels_last)  # widening the batch kept NHWC


def test_fast_mode_compile_scopes_compute_the_same():
    """Fast mode's torch.compile, whole UNet or block by block (`compile_unet`; on CUDA under the
    CUDA graph, here on the CPU with inductor's C++ backend): the same result as eager, and by
    blocks, blocks of equal shapes share one compiled graph."""
    import pytest
    import torch._dynamo
    from torch._dynamo.utils import counters

    from sdlite.errors import InputError
    from sdlite.pipeline import BLOCK_RECOMPILE_LIMIT, compile_unet, recompile_limit_setting
    from sdlite.unet import ResBlock, SpatialTransformer

    with torch.device("meta"):
        meta = build_model("unet", TINY)
    ref = randomize_(meta, 5).eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0])
    c = torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    blocks = [m for m in ref.modules() if isinstance(m, (ResBlock, SpatialTransformer))]
    shapes = set()  # what dynamo specializes a block's graph on: its class, input and weight shapes
    hooks = [m.register_forward_pre_hook(lambda m, a: shapes.add(
        (type(m), tuple(tuple(v.shape) for v in a), tuple(tuple(p.shape) for p in m.parameters()))))
        for m in blocks]
    with torch.inference_mode():
        # the batch-2 call, and the pipeline's guidance call: one latent paired with both contexts
        expect = ref(x, t, c), ref(x[:1], t[:1], c)
    for h in hooks:
        h.remove()
    config, name = recompile_limit_setting()
    limit = getattr(config, name)
    setattr(config, name, 4)  # below the number of distinct block shapes here, as 8 is below SD v1's 20
    try:
        _compare_scopes(ref, len(blocks), len(shapes), expect, x, t, c, counters)
        assert getattr(config, name) == BLOCK_RECOMPILE_LIMIT  # raised for "blocks"
    finally:
        setattr(config, name, limit)
        torch._dynamo.reset()
    with pytest.raises(InputError, match="compile scope must be one of unet, blocks"):
        compile_unet(ref, "layers")


def _compare_scopes(ref, blocks, shapes, expect, x, t, c, counters):
    import torch._dynamo

    from conftest import assert_close
    from sdlite.pipeline import compile_unet
    from sdlite.unet import ResBlock, SpatialTransformer

    for scope in ("unet", "blocks"):
        torch._dynamo.reset()
        counters.clear()
        unet = compile_unet(copy.deepcopy(ref), scope)
        if scope == "unet":
            with torch.inference_mode():
                out = unet(x, t, c), unet(x[:1], t[:1], c)
        else:
            # called from another thread whose own limit is low too (dynamo's config is per thread
            # since torch 2.12, so a web UI's worker thread would not see the raised limit)
            out = _call_in_thread(unet, x, t, c)
        for got, want, call in zip(out, expect, ("batch-2", "paired")):
            assert_close(got, want, rel=1e-5, what=f"compiled ({scope}) vs eager UNet, {call} call")
        graphs = counters["stats"]["unique_graphs"]
        if scope == "unet":
            assert graphs == 2  # one per input signature
        else:
            # one graph per distinct block shape, shared by equal blocks; none fell back to eager at
            # dynamo's recompile limit (set to 4 above, fewer than the ResBlock shapes here)
            assert graphs == shapes < blocks, (graphs, shapes, blocks)
            assert all(getattr(m, "_compiled_call_impl", None) is not None for m in unet.modules()
                       if isinstance(m, (ResBlock, SpatialTransformer)))


def _call_in_thread(unet, x, t, c):
    import threading

    from sdlite.pipeline import recompile_limit_setting

    config, name = recompile_limit_setting()
    result = {}

    def run():
        limit = getattr(config, name)
        setattr(config, name, 4)
        try:
            with torch.inference_mode():
                result["out"] = unet(x, t, c), unet(x[:1], t[:1], c)
        except BaseException as e:  # re-raised in the test's thread
            result["error"] = e
        finally:
            setattr(config, name, limit)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["out"]


_COMPILE_IN_A_FRESH_PROCESS = """
import json, torch
import torch._dynamo  # as any earlier torch.compile would: sets TORCHINDUCTOR_CACHE_DIR to torch's default
from torch._dynamo.utils import counters
from sdlite.pipeline import persistent_compile_cache
folder = persistent_compile_cache()
f = torch.compile(lambda x: torch.nn.functional.silu(x) * 2 + 1, dynamic=False)
x = torch.linspace(-3, 3, 16).reshape(4, 4)
err = (f(x) - (torch.nn.functional.silu(x) * 2 + 1)).abs().max().item()
print(json.dumps({"folder": str(folder), "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"], "err": err}))
"""


def test_fast_mode_compile_cache_outlives_the_process_in_sdlites_cache_folder(tmp_path):
    """torch.compile's cache goes to ~/.cache/sdlite/torch-compile (here $XDG_CACHE_HOME/sdlite/...)
    rather than torch's temp folder (emptied at boot on most Linux systems), even after dynamo's
    import has set TORCHINDUCTOR_CACHE_DIR to that default: a second process finds the compiled
    graph there instead of compiling it again."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    folder = tmp_path / "xdg" / "sdlite" / "torch-compile"
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _COMPILE_IN_A_FRESH_PROCESS], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert [r["folder"] for r in runs] == [str(folder)] * 2
    assert runs[0]["misses"] >= 1 and runs[0]["hits"] == 0, runs  # compiled, into the folder
    assert runs[1]["hits"] >= 1 and runs[1]["misses"] == 0, runs  # found there by the next process
    assert all(r["err"] < 1e-6 for r in runs), runs
    assert any((folder / "fxgraph").iterdir())


def test_compile_cache_respects_the_users_folder_and_an_unwritable_home(tmp_path, monkeypatch):
    import os

    from sdlite import pipeline

    mine = str(tmp_path / "mine")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", mine)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pipeline.persistent_compile_cache() is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == mine and not (tmp_path / "xdg").exists()

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))  # the folder cannot be made
    assert pipeline.persistent_compile_cache() is None
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # torch's default then


def test_fast_mode_on_cuda_compiles_into_the_persistent_cache(tiny, tmp_path, monkeypatch):
    """The pipeline's compile path (fast mode on CUDA, its condition forced here) sets the cache
    folder before it compiles."""
    import os

    from sdlite import pipeline

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(pipeline.StableDiffusion, "compiles_unet", property(lambda self: True))
    seen = []
    monkeypatch.setattr(pipeline, "compile_unet",
                        lambda unet, scope: seen.append((os.environ.get("TORCHINDUCTOR_CACHE_DIR"), scope)))
    pipeline.StableDiffusion(tiny.folder, cuda_graphs=False)  # loads and speeds up the UNet
    assert seen == [(str(tmp_path / "sdlite" / "torch-compile"), pipeline.FAST_COMPILE_SCOPE)]
