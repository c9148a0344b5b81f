"""The modules of one base model, as the pipeline consumes them.

Plain containers: loaders fill them from disk, `build_random_components` fills them with
seeded random weights (tiny models for tests and the demo, full size for benchmarks).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .presets import ModelPreset, get_preset
from .tokenizer import build_clip_tokenizer



@contextlib.contextmanager
def quiet_casts() -> Iterator[None]:
    """diffusers warns on every ModelMixin.to(dtype) that it "should" have been loaded in that
    dtype; building and placing models casts on purpose, so that logger is quieted while it
    runs (and restored: the process's logging stays as it was)."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

@dataclass
class SD15Components:
    """SD1.5 base branch: UNet, VAE, CLIP-L text encoder, its tokenizer, scheduler config."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    family: str = "sd15"


@dataclass
class SDXLComponents:
    """SDXL upgraded branch: UNet, VAE, CLIP-L + OpenCLIP-bigG (with projection), tokenizers."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    family: str = "sdxl"


def _strip_class(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_random_components(
    preset: str | ModelPreset, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> SD15Components | SDXLComponents:
    """Every module of a preset with seeded random weights (the real topology, any width).

    Tiny presets give CPU-sized models; "sd15"/"sdxl" give the full architectures, whose
    speed does not depend on the values, for benchmarks.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    # Parameters are created on `device` directly: initialising SDXL's 2.6 B weights on the
    # CPU and copying them over takes far longer than on a GPU.
    with torch.device(device):
        unet = UNet2DConditionModel(**_strip_class(p.unet))
        vae = AutoencoderKL(**_strip_class(p.vae))
        text_encoder = CLIPTextModel(CLIPTextConfig(**p.text_encoder))
    modules: list[torch.nn.Module] = [unet, vae, text_encoder]
    if p.family == "sd15":
        out: SD15Components | SDXLComponents = SD15Components(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(),
            scheduler_config=dict(p.scheduler),
        )
    else:
        assert p.text_encoder_2 is not None
        with torch.device(device):
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**p.text_encoder_2))
        modules.append(text_encoder_2)
        out = SDXLComponents(
            unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(pad_token="!"),
            scheduler_config=dict(p.scheduler),
        )
    with quiet_casts():
        for m in modules:
            m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return out
