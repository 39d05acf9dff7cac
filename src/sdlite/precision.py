"""Storage dtype vs compute dtype.

`compute_in(model, dtype)` makes a model whose weights are stored in one dtype (e.g. fp16, as
the file holds them, memory-mapped) compute in another (e.g. fp32 on a CPU without fast fp16),
one layer at a time: each layer casts its own weights when it runs, so no full-precision copy of
the model ever exists. It swaps the classes of the standard layers in place (the model files
stay plain); parameters and keys are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
