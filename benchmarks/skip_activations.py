"""How much the UNet's skip activations (kept from the down path for the up path) weigh.

    python benchmarks/skip_activations.py

Runs the SD v1.5 UNet's down path on the meta device (no weights, no compute) and sums the
tensors the up path will concatenate, in fp32, at 512 and 1024 px, batch 1 (memory="low")
and 2 (CFG batch).
"""

from __future__ import annotations

import json

import torch

from sdlite.config import SD_V1
from sdlite.unet import UNetModel


def skip_bytes(unet: UNetModel, size: int, batch: int) -> int:
    lat = size // 8
    h = torch.zeros(batch, 4, lat, lat, device="meta")
    emb = unet.time_embedding(torch.zeros(batch, device="meta"), torch.float32)
    context = torch.zeros(batch, 77, SD_V1.unet.context_dim, device="meta")
    total = 0
    for block in unet.input_blocks:
        h = block(h, emb, context)
        total += h.numel() * 4
    return total


def main() -> None:
    with torch.device("meta"):
        unet = UNetModel(SD_V1.unet)
    rows = [{"size": s, "batch": b, "skip_mib": skip_bytes(unet, s, b) / 2**20} for s in (512, 1024) for b in (1, 2)]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
