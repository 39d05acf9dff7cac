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
