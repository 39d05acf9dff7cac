"""Key tables between diffusers folders and sdlite's native (CompVis) key space.

The mapping is data: per-module prefix pairs generated from the architecture config, plus
per-layer suffix tables. A diffusers key is renamed by its longest matching module prefix,
then by the layer table of that module kind. `None` in a table drops the key.
"""

from __future__ import annotations

from .config import CLIPTextConfig, UNetConfig, VAEConfig

# Layer names inside a UNet ResBlock: diffusers -> CompVis.
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Layer names inside a VAE ResnetBlock.
VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# VAE mid-block attention; older diffusers files use query/key/value/proj_attn.
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
# Spatial transformers use the same names on both sides.
SAME = None

# Named shape transforms, applied after renaming (diffusers -> CompVis direction).
VAE_LINEAR_TO_CONV = "linear_to_conv1x1"


def unet_modules(cfg: UNetConfig) -> list[tuple[str, str, dict | None]]:
    """(diffusers prefix, CompVis prefix, layer table) for every module of the UNet."""
    rows: list[tuple[str, str, dict | None]] = [
        ("time_embedding.linear_1", "time_embed.0", SAME),
        ("time_embedding.linear_2", "time_embed.2", SAME),
        ("conv_in", "input_blocks.0.0", SAME),
        ("conv_norm_out", "out.0", SAME),
        ("conv_out", "out.2", SAME),
    ]
    levels = len(cfg.channel_mult)
    per = cfg.num_res_blocks + 1  # input_blocks per level: resblocks + downsample
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            n = per * i + j + 1
            rows.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", UNET_RESNET))
            if i in cfg.attention_levels:
                rows.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", SAME))
        if i < levels - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{per * (i + 1)}.0.op", SAME))
    rows.append(("mid_block.attentions.0", "middle_block.1", SAME))
    rows.append(("mid_block.resnets.0", "middle_block.0", UNET_RESNET))
    rows.append(("mid_block.resnets.1", "middle_block.2", UNET_RESNET))
    for i in range(levels):  # diffusers up block i = CompVis level (levels - 1 - i)
        level = levels - 1 - i
        has_attn = level in cfg.attention_levels
        for j in range(per):
            n = per * i + j
            rows.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", UNET_RESNET))
            if has_attn:
                rows.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", SAME))
        if level > 0:
            n = per * i + per - 1
            rows.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{n}.{2 if has_attn else 1}.conv", SAME))
    return rows


def vae_modules(cfg: VAEConfig) -> list[tuple[str, str, dict | None]]:
    """(diffusers prefix, CompVis prefix, layer table) for every module of the VAE."""
    rows: list[tuple[str, str, dict | None]] = []
    levels = len(cfg.ch_mult)
    for side in ("encoder", "decoder"):
        rows += [
            (f"{side}.conv_in", f"{side}.conv_in", SAME),
            (f"{side}.conv_out", f"{side}.conv_out", SAME),
            (f"{side}.conv_norm_out", f"{side}.norm_out", SAME),
            (f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", VAE_RESNET),
            (f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", VAE_RESNET),
            (f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", VAE_ATTENTION),
        ]
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            rows.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET))
        if i < levels - 1:
            rows.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", SAME))
        level = levels - 1 - i  # decoder up block i = CompVis up level (levels - 1 - i)
        for j in range(cfg.num_res_blocks + 1):
            rows.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", VAE_RESNET))
        if level > 0:
            rows.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv", SAME))
    rows += [("quant_conv", "quant_conv", SAME), ("post_quant_conv", "post_quant_conv", SAME)]
    return rows


def _rename(key: str, rows: list[tuple[str, str, dict | None]]) -> str | None:
    """Rename one diffusers key, or return None when no module prefix matches."""
    best = None
    for src, dst, table in rows:
        if (key == src or key.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, dst, table)
    if best is None:
        return None
    src, dst, table = best
    rest = key[len(src):].lstrip(".")
    if table is not None:
        for name in sorted(table, key=len, reverse=True):
            if rest == name or rest.startswith(name + "."):
                rest = table[name] + rest[len(name):]
                break
    return f"{dst}.{rest}" if rest else dst


def _convert(state: dict, rows, transform=None) -> tuple[dict, list[str]]:
    out, unknown = {}, []
    for key, value in state.items():
        new = _rename(key, rows)
        if new is None:
            unknown.append(key)
            continue
        out[new] = transform(new, value) if transform else value
    return out, unknown


def _vae_transform(key: str, value):
    # diffusers stores the VAE attention projections as Linear (C, C); CompVis as 1x1 convs.
    if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
        return value.reshape(*value.shape, 1, 1)
    return value


def unet_from_diffusers(state: dict, cfg: UNetConfig) -> tuple[dict, list[str]]:
    """Native UNet keys from a diffusers `unet/` state dict; also returns unmatched keys."""
    return _convert(state, unet_modules(cfg))


def vae_from_diffusers(state: dict, cfg: VAEConfig) -> tuple[dict, list[str]]:
    """Native VAE keys from a diffusers `vae/` state dict; also returns unmatched keys."""
    return _convert(state, vae_modules(cfg), _vae_transform)


def text_from_diffusers(state: dict, cfg: CLIPTextConfig | None = None) -> tuple[dict, list[str]]:
    """Native text-encoder keys (`text_model.*`) from a transformers CLIPTextModel state dict.

    diffusers folders store keys with the `text_model.` prefix; transformers 5's
    `save_pretrained` writes them without it. Both are accepted.
    """
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith("text_model."):
            out[key] = value
        elif key.split(".")[0] in ("embeddings", "encoder", "final_layer_norm"):
            out["text_model." + key] = value
        else:
            unknown.append(key)
    return out, unknown
