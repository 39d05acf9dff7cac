"""Reference models (diffusers / transformers) built from sdlite's architecture configs,
with every parameter re-randomised from a seed so that a mis-mapped key cannot hide behind
diffusers' default init (zeros, ones)."""

from __future__ import annotations

import torch

from sdlite.config import CLIPTextConfig, UNetConfig, VAEConfig


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise of a sensible scale."""
    if any(p.is_meta for p in module.parameters()):
        meta_buffers = [n for n, b in module.named_buffers() if b.is_meta]
        module.to_empty(device="cpu")
        for name in meta_buffers:  # to_empty leaves buffers uninitialised: refill the known ones
            assert name.endswith("position_ids"), f"cannot refill buffer {name}"
            buf = module.get_buffer(name)
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:  # weights: keep activations O(1)
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("weight"):  # norm scales around 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:  # biases
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module


def diffusers_unet(cfg: UNetConfig, seed: int = 0):
    from diffusers import UNet2DConditionModel

    levels = range(len(cfg.channel_mult))
    down = tuple("CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels)
    up = tuple("CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels))
    with torch.device("meta"):  # skip diffusers' init: randomize_ overwrites everything
        model = UNet2DConditionModel(
            sample_size=64,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
            layers_per_block=cfg.num_res_blocks,
            cross_attention_dim=cfg.context_dim,
            attention_head_dim=cfg.num_heads,  # diffusers' name for SD v1's head *count*
            norm_num_groups=cfg.norm_groups,
            transformer_layers_per_block=cfg.transformer_depth,
        )
    return randomize_(model, seed).eval()


def transformers_clip(cfg: CLIPTextConfig, seed: int = 0):
    from transformers import CLIPTextConfig as HFConfig, CLIPTextModel

    hf = HFConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        hidden_act="quick_gelu",
        layer_norm_eps=cfg.layer_norm_eps,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    with torch.device("meta"):
        model = CLIPTextModel(hf)
    return randomize_(model, seed).eval()


def diffusers_vae(cfg: VAEConfig, seed: int = 0, meta: bool = False):
    """diffusers' AutoencoderKL for `cfg`, randomised from `seed` (or left on meta: configs only)."""
    from diffusers import AutoencoderKL

    levels = len(cfg.ch_mult)
    with torch.device("meta"):
        model = AutoencoderKL(
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
            layers_per_block=cfg.num_res_blocks,
            latent_channels=cfg.z_channels,
            norm_num_groups=cfg.norm_groups,
            sample_size=64,
            scaling_factor=cfg.scale_factor,
        )
    return model if meta else randomize_(model, seed).eval()


def _byte_chars() -> list[str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to 256+n.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def write_hf_tokenizer_files(folder) -> None:
    """vocab.json + merges.txt (the Hugging Face CLIP layout) built from sdlite's shipped BPE file."""
    import gzip
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gz = Path(__import__("sdlite").__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(_byte_chars())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def hf_tokenizer(folder):
    from transformers import CLIPTokenizer

    write_hf_tokenizer_files(folder)
    # transformers 5 ignores vocab_file/merges_file given to the constructor; from_pretrained reads them.
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=77,
                                        pad_token="<|endoftext|>")
    assert len(tok) == 49408 and tok("a photograph of an astronaut")["input_ids"][:3] == [49406, 320, 8853]
    return tok


def diffusers_pipeline(cfg, folder, seed: int = 0):
    """A diffusers StableDiffusionPipeline with random weights for `cfg` (a sdlite ModelConfig)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=diffusers_vae(cfg.vae, seed + 1),
        text_encoder=transformers_clip(cfg.text, seed + 2),
        tokenizer=hf_tokenizer(folder / "tok"),
        unet=diffusers_unet(cfg.unet, seed + 3),
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe


def reference_scheduler(sampler: str, karras: bool = False):
    """The diffusers scheduler sdlite's sampler is tested against (SD v1.5 scheduler settings)."""
    import diffusers

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if sampler == "plms":
        return diffusers.PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common)
    if sampler == "ddim":
        return diffusers.DDIMScheduler(set_alpha_to_one=False, clip_sample=False, **common)
    if sampler == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                     use_karras_sigmas=karras, **common)
    cls = {"euler": diffusers.EulerDiscreteScheduler, "euler_a": diffusers.EulerAncestralDiscreteScheduler,
           "heun": diffusers.HeunDiscreteScheduler}[sampler]
    return cls(**common, **({"use_karras_sigmas": True} if karras else {}))
