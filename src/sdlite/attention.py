"""The one attention function every model calls.

Inputs are (B, heads, T, d) tensors. The default is PyTorch's scaled_dot_product_attention;
`plain` is the textbook formula (the reference the other modes are tested against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, materialising the whole score matrix."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, h, Tq, Tk)
    if causal:
        tq, tk = scores.shape[-2:]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Multi-head attention on (B, heads, T, d) tensors."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
