"""Model FLOPs per component, counted by torch's FLOP counter on the meta device.

Counting runs the real module graph with meta tensors (no memory, no arithmetic), so the
full-size numbers take about a second; they are cached per (config, shape). Convention:
one multiply-add = 2 FLOPs (torch's counter), batch as given.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from ..models.mapping import MappingConfig, MappingLayers


def _unet(config_json: str) -> UNet2DConditionModel:
    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    return UNet2DConditionModel(**config)


def count_flops(fn) -> int:
    """FLOPs of `fn()` run on the meta device (build the modules inside `fn`)."""
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@functools.lru_cache(maxsize=64)
def _unet_flops(config_json: str, batch: int, latent_hw: tuple[int, int], text_tokens: int, sdxl: bool) -> int:
    def run():
        unet = _unet(config_json)
        x = torch.empty(batch, unet.config.in_channels, *latent_hw)
        ctx = torch.empty(batch, text_tokens, unet.config.cross_attention_dim)
        extra = {}
        if sdxl:
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            extra = {"added_cond_kwargs": {"text_embeds": torch.empty(batch, pooled), "time_ids": torch.empty(batch, 6)}}
        unet(x, torch.empty(batch), ctx, **extra)

    return count_flops(run)


@functools.lru_cache(maxsize=64)
def _mapping_flops(config: MappingConfig, batch: int, f0_hw: tuple[int, int]) -> int:
    h, w = f0_hw

    def run():
        m = MappingLayers(config)
        c0, c1, c2 = config.in_channels
        m(torch.empty(batch, c0, h, w), torch.empty(batch, c1, 2 * h, 2 * w), torch.empty(batch, c2, 2 * h, 2 * w))

    return count_flops(run)


def unet_flops(config: dict[str, Any], batch: int, latent_hw: tuple[int, int], text_tokens: int = 77) -> int:
    """FLOPs of one UNet forward (SDXL detected from its added time/text embedding)."""
    sdxl = config.get("addition_embed_type") == "text_time"
    return _unet_flops(json.dumps(dict(config), sort_keys=True, default=str), batch, tuple(latent_hw), text_tokens, sdxl)


def mapping_flops(config: MappingConfig, batch: int, f0_hw: tuple[int, int]) -> int:
    """FLOPs of one mapping forward with f0 on an h x w grid."""
    return _mapping_flops(config, batch, tuple(f0_hw))


@dataclass(frozen=True)
class WorkloadFlops:
    """Per-forward FLOPs (at the UNet batch, i.e. doubled under CFG) and per-image totals."""

    sd15_unet: int
    sdxl_unet: int
    mapping: int
    stage1_steps: int
    stage2_steps: int

    @property
    def stage1(self) -> int:
        return self.stage1_steps * self.sd15_unet

    @property
    def stage2(self) -> int:
        return self.stage2_steps * (self.sd15_unet + self.mapping + self.sdxl_unet)

    @property
    def total(self) -> int:
        return self.stage1 + self.stage2

    def as_dict(self) -> dict[str, int]:
        return {
            "sd15_unet": self.sd15_unet, "sdxl_unet": self.sdxl_unet, "mapping": self.mapping,
            "stage1": self.stage1, "stage2": self.stage2, "total": self.total,
        }


def workload_flops(
    sd15_unet: dict[str, Any], sdxl_unet: dict[str, Any], *, batch: int, cfg: bool, steps: int, stage2_steps: int,
    sd15_latent: tuple[int, int], sdxl_latent: tuple[int, int],
) -> WorkloadFlops:
    """UNet + mapping FLOPs of one generation (text encoders and VAEs excluded)."""
    rows = batch * (2 if cfg else 1)
    mapping_cfg = MappingConfig.from_unet_configs(sd15_unet, sdxl_unet)
    return WorkloadFlops(
        sd15_unet=unet_flops(sd15_unet, rows, sd15_latent),
        sdxl_unet=unet_flops(sdxl_unet, rows, sdxl_latent),
        mapping=mapping_flops(mapping_cfg, rows, (sdxl_latent[0] // 4, sdxl_latent[1] // 4)),
        stage1_steps=steps,
        stage2_steps=stage2_steps,
    )
