"""Architecture configs: frozen dataclasses with SD v1 defaults.

These describe *what the network is*, never how it is run (device, dtype, attention
mode, memory mode are run options passed as keyword arguments elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408  # OpenAI CLIP BPE vocabulary (incl. BOS/EOS)
    max_positions: int = 77  # context length; SD v1 always pads to it
    width: int = 768  # hidden size of ViT-L/14's text tower
    layers: int = 12  # transformer blocks
    heads: int = 12  # attention heads
    mlp_width: int = 3072  # 4 x width
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 4 = txt2img model, 9 = inpainting (latents + mask + masked latents)
    out_channels: int = 4
    model_channels: int = 320  # channels of the first level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # per-level multiplier of model_channels
    num_res_blocks: int = 2  # ResBlocks per level on the down path (+1 on the up path)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with a SpatialTransformer
    num_heads: int = 8  # SD v1 fixes the head count, not the head width
    context_dim: int = 768  # CLIP text width (cross-attention keys/values)
    transformer_depth: int = 1
    norm_groups: int = 32  # GroupNorm groups everywhere

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128  # channels of the first level
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # encoder ResBlocks per level (decoder has one more)
    z_channels: int = 4  # latent channels
    embed_dim: int = 4  # channels after quant_conv (== z_channels for SD)
    norm_groups: int = 32
    scale_factor: float = 0.18215  # latents = scale_factor * posterior sample

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ModelConfig:
    """The three networks of one Stable Diffusion checkpoint."""

    name: str
    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig


SD_V1 = ModelConfig("sd-v1", UNetConfig(), VAEConfig(), CLIPTextConfig())
SD_V1_INPAINT = ModelConfig("sd-v1-inpainting", UNetConfig(in_channels=9), VAEConfig(), CLIPTextConfig())

# A tiny model with the same structure and the same head rules (8 UNet heads, 64-wide CLIP
# heads), so it is detected from its shapes like a real one. For tests and the demo.
TINY = ModelConfig(
    "tiny",
    UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(0, 1), context_dim=128),
    VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    CLIPTextConfig(width=128, layers=3, heads=2, mlp_width=256),  # SD rule: 64-wide heads
)

VARIANTS = {c.name: c for c in (SD_V1, SD_V1_INPAINT, TINY)}


def with_in_channels(cfg: ModelConfig, in_channels: int) -> ModelConfig:
    """The same model with a UNet taking `in_channels` (9 for inpainting checkpoints)."""
    return replace(cfg, unet=replace(cfg.unet, in_channels=in_channels))
