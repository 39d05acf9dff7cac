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
    fresh tensor, so callers may keep it across steps (PLMS does). A graph reads the weights at
    the addresses they had when it was captured: `forget_if_weights_moved()` (the pipeline calls
    it before each denoising loop) drops the graphs when any weight was replaced since (e.g.
    `load_state_dict(..., assign=True)` of other weights), so they are captured again instead of
    reading freed memory. Changes in place (`weight += delta`) keep the addresses and are seen.
    """

    def __init__(self, unet: nn.Module, warmup: int = 2):
        super().__init__()
        self.unet = unet
        self.warmup = warmup
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None
        self._stream = None
        self._addresses = self._weight_addresses()

    @property
    def cfg(self):
        return self.unet.cfg

    def _weight_addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in list(self.unet.parameters()) + list(self.unet.buffers()))

    def forget_if_weights_moved(self) -> bool:
        """Drop the captured graphs if a weight is no longer where they read it; True if dropped."""
        addresses = self._weight_addresses()
        if addresses == self._addresses:
            return False
        self._graphs.clear()
        self._pool = None
        self._addresses = addresses
        return True

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
        # Warm-up and capture run on one side stream, the same for every capture: cuBLAS keeps a
        # workspace (32 MiB on Hopper) for each stream it has run on, for good, so a fresh stream
        # per capture plus torch.cuda.graph's own capture stream held two more of them.
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(self.warmup):  # lets cuDNN/cuBLAS pick and allocate before capture
                self.unet(sx, st, sc)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=stream), torch.inference_mode():
            out = self.unet(sx, st, sc)
        self._pool = graph.pool()  # graphs of other shapes share one memory pool
        return _Captured(graph, sx, st, sc, out)
