"""Named configurations of the models X-Adapter combines.

"sd15" and "sdxl" are the released architectures (diffusers config dicts, as in the
official diffusers folders); "tiny-sd15" and "tiny-sdxl" keep their block topology
(block types, layers per block, number of up/down stages, conditioning paths) with
widths small enough for CPU tests. Loaders, tiny models and the bundled single-file
configs are all built from this one table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_SCHEDULER = {
    # The scheduler config both official folders ship (betas identical for SD1.5 and SDXL).
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def _vae(widths: list[int], sample_size: int, scaling_factor: float, force_upcast: bool) -> dict[str, Any]:
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": widths,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "force_upcast": force_upcast,
    }


def _clip_text(hidden: int, intermediate: int, layers: int, heads: int, act: str, projection: int) -> dict[str, Any]:
    # eos_token_id=2 is what the official configs carry; transformers then pools at the
    # position of the highest token id (the end-of-text token), which is what CLIP did.
    return {
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "projection_dim": projection,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def _sd15_unet(widths: list[int], cross_dim: int, heads: int, sample_size: int) -> dict[str, Any]:
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": heads,  # diffusers' name; SD1.5 means "number of heads" here
        "block_out_channels": widths,
        "center_input_sample": False,
        "cross_attention_dim": cross_dim,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "sample_size": sample_size,
    }


def _sdxl_unet(
    widths: list[int], cross_dim: int, heads: list[int], depth: list[int], time_dim: int, pooled_dim: int, sample_size: int
) -> dict[str, Any]:
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": time_dim,
        "attention_head_dim": heads,
        "block_out_channels": widths,
        "center_input_sample": False,
        "cross_attention_dim": cross_dim,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        # pooled text embedding + 6 size/crop ids of addition_time_embed_dim each
        "projection_class_embeddings_input_dim": pooled_dim + 6 * time_dim,
        "sample_size": sample_size,
        "transformer_layers_per_block": depth,
        "use_linear_projection": True,
    }


@dataclass(frozen=True)
class ModelPreset:
    """Configs of one base model family (SD1.5-like or SDXL-like)."""

    name: str
    family: str  # "sd15" or "sdxl"
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any] | None = None
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(_SCHEDULER))

    @property
    def default_size(self) -> int:
        """Default image side in pixels (latent sample size x VAE factor)."""
        return self.unet["sample_size"] * 2 ** (len(self.vae["block_out_channels"]) - 1)


PRESETS: dict[str, ModelPreset] = {
    "sd15": ModelPreset(
        name="sd15",
        family="sd15",
        unet=_sd15_unet([320, 640, 1280, 1280], cross_dim=768, heads=8, sample_size=64),
        vae=_vae([128, 256, 512, 512], 512, 0.18215, force_upcast=True),
        text_encoder=_clip_text(768, 3072, 12, 12, "quick_gelu", 768),
    ),
    "sdxl": ModelPreset(
        name="sdxl",
        family="sdxl",
        unet=_sdxl_unet([320, 640, 1280], 2048, [5, 10, 20], [1, 2, 10], time_dim=256, pooled_dim=1280, sample_size=128),
        vae=_vae([128, 256, 512, 512], 1024, 0.13025, force_upcast=True),
        text_encoder=_clip_text(768, 3072, 12, 12, "quick_gelu", 768),
        text_encoder_2=_clip_text(1280, 5120, 32, 20, "gelu", 1280),
    ),
    # Tiny: channel widths divisible by the 32 GroupNorm groups, two transformer depths in
    # SDXL's last stage so "several transformer layers per block" stays exercised.
    "tiny-sd15": ModelPreset(
        name="tiny-sd15",
        family="sd15",
        unet=_sd15_unet([32, 64, 128, 128], cross_dim=32, heads=4, sample_size=8),
        vae=_vae([32, 32, 64, 64], 64, 0.18215, force_upcast=True),
        text_encoder=_clip_text(32, 64, 2, 4, "quick_gelu", 32),
    ),
    "tiny-sdxl": ModelPreset(
        name="tiny-sdxl",
        family="sdxl",
        unet=_sdxl_unet([32, 64, 128], 64, [2, 4, 8], [1, 1, 2], time_dim=8, pooled_dim=32, sample_size=16),
        vae=_vae([32, 32, 64, 64], 128, 0.13025, force_upcast=True),
        text_encoder=_clip_text(32, 64, 2, 4, "quick_gelu", 32),
        text_encoder_2=_clip_text(32, 64, 2, 4, "gelu", 32),
    ),
}


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`; raises ValueError listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}") from None
