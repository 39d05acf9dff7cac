"""Models that wait in host memory between their stages.

The text encoder runs once per prompt and the VAE once per image, yet kept on a GPU they hold
0.39 GiB (SD v1 in fp16) through the whole denoising loop, which is where the GPU's peak
is. In `memory="normal"` on CUDA the pipeline therefore keeps them parked: `HostCopy(model)`
makes one page-locked host copy of every parameter and buffer, once; `to_device()` points the
model at device copies (asynchronous copies from pinned memory, ordered before the kernels
that read them on the same stream); `to_host()` points it back at the host copies and lets the
device copies go. Nothing is copied back: inference never changes the weights. The UNet stays
on the device (its CUDA graphs hold the addresses of its weights).

Parameter and buffer objects are kept (only their `.data` changes), so anything holding a
reference to a parameter sees the current copy.
"""

from __future__ import annotations

import torch
from torch import nn

# Device types whose memory is separate from the host's. (MPS shares the host's memory: moving
# a model to the CPU there saves nothing.)
SEPARATE_MEMORY = ("cuda",)


def parks(device: torch.device) -> bool:
    """Whether models are worth parking in host memory when `device` runs them."""
    return device.type in SEPARATE_MEMORY


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer once (shared ones once), by qualified name."""
    return list(model.named_parameters()) + list(model.named_buffers())


ALIGN = 64  # bytes: every tensor starts on a cache line (and any dtype's alignment)
REST = ""  # the part of a model outside every named part: it goes wherever any part goes


class HostCopy:
    """One host copy of a model's weights, and the switch between it and a device copy.

    All of a model's tensors live in one page-locked buffer (views at aligned offsets), so a
    switch to the device is one large copy into one device block, and back to the host frees
    that block. `parts` names groups of submodules (by name prefix) that can go to the device
    without the others, e.g. a VAE's decoder without its encoder; each part is one contiguous
    range of the buffer. Made from a model anywhere (loaded on the CPU, or on the device), it
    leaves the model parked: using the host copies, its own tensors let go."""

    def __init__(self, model: nn.Module, parts: dict[str, tuple[str, ...]] | None = None,
                 pin: bool | None = None):
        self.model = model
        tensors = _tensors(model)
        self.signature = _signature(tensors)
        parts = parts or {}
        self.parts: dict[str, list[str]] = {part: [] for part in [*parts, REST]}
        for name, _ in tensors:
            part = next((p for p, prefixes in parts.items() if name.startswith(prefixes)), REST)
            self.parts[part].append(name)
        self.layout, self.ranges, size = {}, {}, 0  # name -> (byte offset, shape, dtype); part -> (lo, hi)
        by_name = dict(tensors)
        for part, names in self.parts.items():
            lo = size = -(-size // ALIGN) * ALIGN
            for name in names:
                t, size = by_name[name], -(-size // ALIGN) * ALIGN
                self.layout[name] = (size, t.shape, t.dtype)
                size += t.numel() * t.element_size()
            self.ranges[part] = (lo, size)
        pin = torch.cuda.is_available() if pin is None else pin
        with torch.inference_mode(False), torch.no_grad():
            self.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            self.host = self._views(self.buffer, self.layout)
            for name, t in tensors:
                self.host[name].copy_(t)
        # Which tensors each part uses: "own" (those the model came with), "host" (the host
        # copies) or "device" (a device copy). It starts parked: its own tensors are let go.
        self.where = {part: "own" for part in self.parts}
        self.to_host()

    @staticmethod
    def _views(buffer: torch.Tensor, layout: dict, base: int = 0) -> dict[str, torch.Tensor]:
        """Tensors as views of a byte buffer that starts at byte `base` of the layout."""
        views = {}
        for name, (offset, shape, dtype) in layout.items():
            start = offset - base
            views[name] = buffer[start : start + shape.numel() * dtype.itemsize].view(dtype).view(shape)
        return views

    def to_device(self, device: torch.device | str, part: str | None = None) -> nn.Module:
        """Point the model (or one part of it, and the rest outside every part) at a fresh copy
        of its host weights on `device`; parts already there stay. One asynchronous copy per
        part from pinned memory, ordered before the kernels that read it on the same stream."""
        for p in self.parts if part is None else (part, REST):
            if self.where[p] != "device":
                lo, hi = self.ranges[p]
                layout = {name: self.layout[name] for name in self.parts[p]}
                with torch.inference_mode(False), torch.no_grad():
                    # copy=True: the device copy is never the host copy, even with a CPU "device".
                    block = self.buffer[lo:hi].to(device, non_blocking=True, copy=True)
                    self._point_at(p, self._views(block, layout, base=lo))
                self.where[p] = "device"
        return self.model

    def to_host(self) -> nn.Module:
        """Point the model at the host copies; the device copies are freed once unreferenced."""
        for p in self.parts:
            if self.where[p] != "host":
                with torch.inference_mode(False), torch.no_grad():
                    self._point_at(p, self.host)
                self.where[p] = "host"
        return self.model

    def _point_at(self, part: str, copies: dict[str, torch.Tensor]) -> None:
        names = set(self.parts[part])
        for name, t in _tensors(self.model):
            if name in names:
                t.data = copies[name]

    def nbytes(self) -> int:
        """The buffer's bytes. (PyTorch's pinned-memory allocator may round the allocation up to
        a power of two: the host memory taken can be up to twice this.)"""
        return self.buffer.numel()

    def stale(self) -> bool:
        """The model's parameters and buffers are no longer those this copy was made for (e.g.
        its layers were swapped for int8 ones): the copy must be made again."""
        return _signature(_tensors(self.model)) != self.signature


def _signature(tensors: list[tuple[str, torch.Tensor]]) -> list[tuple]:
    return [(name, id(t), t.shape, t.dtype) for name, t in tensors]
