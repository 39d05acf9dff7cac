"""CLIP ViT-L/14 text transformer, as SD v1 uses it (CompVis `FrozenCLIPEmbedder`).

Parameter names mirror `cond_stage_model.transformer.*` (the transformers CLIPTextModel
layout), so CompVis checkpoints load by stripping that prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import attention
from .config import CLIPTextConfig
from .errors import InputError


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI CLIP's sigmoid approximation of GELU, which the weights were trained with.
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, heads, T, d)
            return y.view(b, t, self.heads, c // self.heads).transpose(1, 2)

        out = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        # `_weight` skips nn.Embedding's random init (every weight is loaded from a file): on the
        # meta device that init's normal_ runs a Python reference that imports torch._dynamo,
        # about 1 s of each process's start.
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, _weight=torch.empty(cfg.vocab_size, cfg.width))
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width,
                                               _weight=torch.empty(cfg.max_positions, cfg.width))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


class CLIPTextEncoder(nn.Module):
    """SD v1's text encoder: token ids (B, 77) -> context (B, 77, width)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """Hidden state of layer -clip_skip, through the final LayerNorm.

        clip_skip follows the AUTOMATIC1111 convention: 1 = last layer (the SD v1 default),
        2 = the penultimate layer, ... The final LayerNorm is applied in every case, as
        A1111 and diffusers do.
        """
        layers = self.text_model.encoder.layers
        if not 1 <= clip_skip <= len(layers):
            raise InputError(f"clip_skip must be between 1 and {len(layers)}, got {clip_skip}")
        x = self.text_model.embeddings(ids)  # (B, T, C)
        for layer in layers[: len(layers) - clip_skip + 1]:
            x = layer(x)
        return self.text_model.final_layer_norm(x)
