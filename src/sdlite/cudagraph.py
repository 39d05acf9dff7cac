"""Replaying the UNet call as a CUDA graph.

A UNet call launches hundreds of small kernels; on a fast GPU the launches, not the arithmetic,
take most of the time. A CUDA graph records the call once per input shape and replays it with
one launch. The kernels and their order are those of the eager call, so results are unchanged
(exact mode); only the Python and launch overhead goes away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    out: torch.Tensor


class GraphedUNet(nn.Module):
    """Wraps a CUDA UNet: the first call per input shape is captured, later calls replay.

    Inputs are copied into static buffers before each replay and the output is returned as a
    fresh tensor, so callers may keep it across steps (PLMS does).
    """

    def __init__(self, unet: nn.Module, warmup: int = 2):
        super().__init__()
        self.unet = unet
        self.warmup = warmup
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None

    @property
    def cfg(self):
        return self.unet.cfg

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, tuple(context.shape), context.dtype)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(x, t, context)
        captured.x.copy_(x)
        captured.t.copy_(t)
        captured.context.copy_(context)
        captured.graph.replay()
        return captured.out.clone()

    def _capture(self, x, t, context) -> _Captured:
        sx, st, sc = x.clone(), t.clone(), context.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(self.warmup):  # lets cuDNN/cuBLAS pick and allocate before capture
                self.unet(sx, st, sc)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
            out = self.unet(sx, st, sc)
        self._pool = graph.pool()  # graphs of other shapes share one memory pool
        return _Captured(graph, sx, st, sc, out)
