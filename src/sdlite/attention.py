"""The one attention function every model calls, and the run-time switch that picks its kernel.

Inputs are (B, heads, T, d) tensors. Three modes, chosen per thread (not per model: the model
files stay plain and just call `attention`):

- ``sdpa`` (default): PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels
  where the device has them).
- ``chunked``: memory-bounded attention in plain PyTorch. Queries are cut into blocks of at most
  `chunk` rows and keys/values into blocks of at most `chunk` columns; the softmax is streamed over
  the key blocks (online log-sum-exp), so no more than one (B*heads, chunk, chunk) score block
  exists at a time instead of the whole (B*heads, Tq, Tk) matrix.
- ``plain``: the textbook formula, materialising every score (the reference the others are
  tested against).

    set_attention("chunked", chunk=512)       # from now on, in this thread
    with attention_mode("plain"):             # for a block; the previous setting comes back
        ...

The setting lives in a context variable: each thread (and asyncio task) has its own, so two
pipelines with different modes can run in two threads without racing; a new thread starts at
the default (``sdpa``), not at its creator's setting.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .errors import InputError

MODES = ("sdpa", "chunked", "plain")
DEFAULT_CHUNK = 1024  # one fp32 score block is then B*heads*4 MiB: 64 MiB for SD's UNet with CFG


@dataclass(frozen=True)
class AttentionSetting:
    """How `attention` computes: the mode, and the block size of the chunked mode."""

    mode: str = "sdpa"
    chunk: int = DEFAULT_CHUNK


_setting: ContextVar[AttentionSetting] = ContextVar("sdlite_attention", default=AttentionSetting())


def check_attention(mode: str, chunk: int | None = None) -> AttentionSetting:
    """The validated setting for `mode` / `chunk` (None = DEFAULT_CHUNK), without installing it.

    Raises InputError naming the valid modes; for run options checked before any work starts.
    """
    if mode not in MODES:
        raise InputError(f"unknown attention mode {mode!r}; valid modes: {', '.join(MODES)}")
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise InputError(f"attention chunk must be a positive integer, got {chunk!r} (modes: {', '.join(MODES)})")
    return AttentionSetting(mode, chunk)


def get_attention() -> AttentionSetting:
    """The current attention setting (of this thread / context)."""
    return _setting.get()


def set_attention(mode: str = "sdpa", chunk: int | None = None) -> AttentionSetting:
    """Select the attention kernel (for this thread / context); returns the previous setting.

    `chunk` (default 1024) is the most query rows and key columns one block of the chunked mode
    holds; it is validated in every mode but only used by ``chunked``.
    """
    previous = _setting.get()
    _setting.set(check_attention(mode, chunk))
    return previous


@contextmanager
def attention_mode(mode: str, chunk: int | None = None) -> Iterator[AttentionSetting]:
    """`set_attention(mode, chunk)` for the duration of a `with` block, then restore."""
    token = _setting.set(check_attention(mode, chunk))
    try:
        yield _setting.get()
    finally:
        _setting.reset(token)


def _current_setting() -> AttentionSetting:
    return _setting.get()


# torch.compile cannot trace ContextVar.get: marked as torch.compiler.assume_constant_result, it is
# read once while compiling and baked in (a compiled model keeps the mode it was compiled under).
# The mark is set directly: the decorator does only this (tests/test_attention.py checks that it
# still does), and calling it imports torch._dynamo, which took 1.0 s of every sdlite process's
# start (CLI calls included; cold start to the first image 31.4 s on this 2-core CPU).
_current_setting._dynamo_marked_constant = True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Multi-head attention on (B, heads, T, d) tensors, scale 1/sqrt(d), in the current mode.

    `causal=True` lets query i see keys 0..i (top-left aligned, as SDPA's is_causal).
    """
    setting = _current_setting()
    if setting.mode == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if setting.mode == "chunked":
        return chunked_attention(q, k, v, causal, setting.chunk)
    return plain_attention(q, k, v, causal)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, materialising the whole score matrix."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, h, Tq, Tk)
    if causal:
        tq, tk = scores.shape[-2:]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                      chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Attention with at most (B, heads, chunk, chunk) scores alive at once.

    Products run in the input dtype; the softmax statistics (running max, running sum) and the
    output accumulator are float32, so fp16/bf16 inputs lose nothing to the streaming.
    """
    check_attention("chunked", chunk)
    q = q * q.shape[-1] ** -0.5  # (B, h, Tq, d): scale once, not per block
    tq, tk = q.shape[-2], k.shape[-2]
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])  # (B, h, Tq, dv)
    for q0 in range(0, tq, chunk):
        q1 = min(q0 + chunk, tq)
        # Causal: keys after the block's last query are masked for every row, so skip them.
        k_end = min(tk, q1) if causal else tk
        if k_end <= chunk:
            out[..., q0:q1, :] = _one_block(q[..., q0:q1, :], k[..., :k_end, :], v[..., :k_end, :], causal, q0)
        else:
            out[..., q0:q1, :] = _streamed(q[..., q0:q1, :], k[..., :k_end, :], v[..., :k_end, :], causal, q0, chunk)
    return out


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, q0: int, k0: int) -> torch.Tensor:
    """(B, h, tq, tk) float32 scores of queries q0.. against keys k0.., -inf where causally hidden."""
    s = (q @ k.transpose(-1, -2)).float()  # no copy when already float32
    if causal and k0 + s.shape[-1] - 1 > q0:  # the block reaches above the diagonal
        rows = torch.arange(q0, q0 + s.shape[-2], device=s.device)[:, None]
        cols = torch.arange(k0, k0 + s.shape[-1], device=s.device)[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))
    return s


def _exp_shifted(s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """exp(s - m), in place when autograd does not need `s` (saves one block of memory)."""
    return (s - m).exp() if s.requires_grad else s.sub_(m).exp_()


def _one_block(q, k, v, causal: bool, q0: int) -> torch.Tensor:
    """All keys fit one block: an exact softmax with float32 statistics."""
    s = _scores(q, k, causal, q0, 0)  # (B, h, tq, Tk)
    p = _exp_shifted(s, s.amax(dim=-1, keepdim=True))
    total = p.sum(dim=-1, keepdim=True)  # (B, h, tq, 1)
    return ((p.to(v.dtype) @ v).float() / total).to(q.dtype)


def _streamed(q, k, v, causal: bool, q0: int, chunk: int) -> torch.Tensor:
    """Online softmax over key blocks: running max m, running sum l, running output acc."""
    m = q.new_full(q.shape[:-1] + (1,), float("-inf"), dtype=torch.float32)  # (B, h, tq, 1)
    l = torch.zeros_like(m)
    acc = q.new_zeros(q.shape[:-1] + v.shape[-1:], dtype=torch.float32)  # (B, h, tq, dv)
    for k0 in range(0, k.shape[-2], chunk):
        kb, vb = k[..., k0 : k0 + chunk, :], v[..., k0 : k0 + chunk, :]
        s = _scores(q, kb, causal, q0, k0)  # (B, h, tq, tk)
        # Key 0 is visible to every query, so after the first block m is finite in every row.
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        p = _exp_shifted(s, m_new)
        rescale = (m - m_new).exp()  # 0 on the first block
        l = l * rescale + p.sum(dim=-1, keepdim=True)
        acc = acc * rescale + (p.to(v.dtype) @ vb).float()
        m = m_new
        del s, p
    return (acc / l).to(q.dtype)
