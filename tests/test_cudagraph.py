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
