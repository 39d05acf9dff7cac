"""Storage dtype vs compute dtype.

`compute_in(model, dtype)` makes a model whose weights are stored in one dtype (e.g. fp16, as
the file holds them, memory-mapped) compute in another (e.g. fp32 on a CPU without fast fp16),
one layer at a time: each layer casts its own weights when it runs, so no full-precision copy of
the model ever exists. It swaps the classes of the standard layers in place (the model files
stay plain); parameters and keys are untouched.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

# A reduced compute dtype this many times slower than float32 on the CPU is not worth it: the
# pipeline computes in float32 instead (weights stay stored in the reduced dtype).
CPU_SLOWDOWN_LIMIT = 2.0


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


class CastLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), _cast(self.bias, x.dtype))


class CastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.to(x.dtype), _cast(self.bias, x.dtype))


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


@functools.cache
def cpu_slowdown(dtype: torch.dtype) -> float:
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

    with torch.inference_mode():
        return best_of(dtype) / best_of(torch.float32)
