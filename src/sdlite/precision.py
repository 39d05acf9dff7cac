"""Storage dtype vs compute dtype.

`compute_in(model, dtype)` makes a model whose weights are stored in one dtype (e.g. fp16, as
the file holds them, memory-mapped) compute in another (e.g. fp32 on a CPU without fast fp16),
one layer at a time: each layer casts its own weights when it runs, so no full-precision copy of
the model ever exists (kernels.cpu_speed_up(..., stored=True) may pack them in float32 instead,
as the pipeline does for the VAE on the CPU). It swaps the classes of the standard layers in place (the model files
stay plain); parameters and keys are untouched.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# A reduced compute dtype this many times slower than float32 on the CPU is not worth it: the
# pipeline computes in float32 instead (weights stay stored in the reduced dtype).
CPU_SLOWDOWN_LIMIT = 2.0


# On the CPU a layer whose weight is rebuilt on every call (cast from fp16/bf16, dequantized from
# int8) rebuilds and applies it in groups of output channels of at most this many bytes: the
# whole weight plus oneDNN's re-ordered copy of it were 236 MB at once for SD's largest
# convolution (1280 x 2560 x 3 x 3 in float32); in groups they are 16 MiB at most, and small
# enough for malloc to reuse the same heap blocks from group to group (low memory mode, see
# pipeline.LOW_MMAP_THRESHOLD) instead of faulting in fresh zeroed pages for each.
CPU_WEIGHT_GROUP_BYTES = 8 << 20


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def by_output_groups(layer: nn.Module, x: torch.Tensor, weight: Callable[[slice], torch.Tensor],
                     apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
                     dim: int) -> torch.Tensor:
    """`apply(x, weight_rows, bias_rows)` for all of `layer`'s output channels at once or, on the
    CPU when the weight is rebuilt (its stored dtype is not x's) and the rebuilt weight would
    exceed CPU_WEIGHT_GROUP_BYTES, group by group, each group's output copied into its slice of
    one output tensor along `dim` (the output's channel dim, counted from the end). `weight(rows)`
    rebuilds the weight rows in x's dtype. Each output channel is computed as it would be in one
    call (same products and sums; the kernel may block its sums differently: float rounding)."""
    out = layer.weight.shape[0]
    rows = max(1, CPU_WEIGHT_GROUP_BYTES // (layer.weight[0].numel() * x.element_size()))
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    if x.device.type != "cpu" or rows >= out or layer.weight.dtype == x.dtype or getattr(layer, "groups", 1) != 1:
        return apply(x, weight(slice(None)), bias)
    result = None
    for start in range(0, out, rows):
        s = slice(start, min(start + rows, out))
        part = apply(x, weight(s), None if bias is None else bias[s])  # the group's weight is freed here
        if result is None:
            shape = list(part.shape)
            shape[dim] = out
            result = part.new_empty(shape)
        result.narrow(dim, s.start, s.stop - s.start).copy_(part)
        del part
    return result


class CastLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return by_output_groups(self, x, lambda s: self.weight[s].to(x.dtype), F.linear, -1)


class CastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return by_output_groups(self, x, lambda s: self.weight[s].to(x.dtype), self._conv_forward, -3)


class CastGroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype), self.eps)


class CastLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype), self.eps)


class CastEmbedding(nn.Embedding):
    compute_dtype: torch.dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Look up in the stored dtype (exact), then convert only the rows that were used.
        return F.embedding(ids, self.weight).to(self.compute_dtype)


SWAPS = {nn.Linear: CastLinear, nn.Conv2d: CastConv2d, nn.GroupNorm: CastGroupNorm,
         nn.LayerNorm: CastLayerNorm, nn.Embedding: CastEmbedding}


def compute_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Let `model` run in `dtype` while its weights stay in their stored dtype."""
    for module in model.modules():
        cls = SWAPS.get(type(module))
        if cls is not None:
            module.__class__ = cls
            if cls is CastEmbedding:
                module.compute_dtype = dtype
    return model


def weights_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most of the model's weights are stored in."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get)


_MEASURING = threading.Lock()  # the measurement sets the process's thread count for a moment


@functools.cache
def cpu_slowdown(dtype: torch.dtype) -> float:
    """(Measured once per dtype, one measurement at a time: see _measure_slowdown.)"""
    with _MEASURING:
        return _measure_slowdown(dtype)


def _measure_slowdown(dtype: torch.dtype) -> float:
    """How many times slower than float32 this CPU runs a small matmul and 3x3 convolution in
    `dtype`, measured once per process (a few ms; up to ~0.1 s where `dtype` is emulated).

    CPUs without native bf16/fp16 instructions emulate them: on an AVX-512 Xeon without
    AVX512-BF16/FP16, bf16 ran about 5x and fp16 several hundred times slower than float32."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(128, 128, generator=g)
    x, w = torch.randn(1, 32, 16, 16, generator=g), torch.randn(32, 32, 3, 3, generator=g)

    def best_of(dt: torch.dtype, reps: int = 3) -> float:
        a2, x2, w2 = a.to(dt), x.to(dt), w.to(dt)
        times = []
        for _ in range(reps + 1):  # the first run warms up (kernel choice, allocation)
            start = time.perf_counter()
            a2 @ a2
            F.conv2d(x2, w2, padding=1)
            times.append(time.perf_counter() - start)
        return min(times[1:])

    # One thread: on a busy machine a multi-threaded product can stall at its barrier for the
    # whole time slice of a descheduled thread (a test run beside a compile once measured float32
    # 3x slower than emulated fp16); the ratio of single-thread speeds is what is asked.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return best_of(dtype) / best_of(torch.float32)
    finally:
        torch.set_num_threads(threads)
