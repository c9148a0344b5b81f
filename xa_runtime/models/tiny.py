"""Tiny random X-Adapter models (real topology, CPU-sized): `build_tiny_models` is the
in-memory trio the tests, the benchmarks and the built-in demo (`xa-generate` without model
paths) run on. `xa_runtime.testing.models` writes it to disk in every format the loaders read.
"""

from __future__ import annotations

import torch

from .components import SD15Components, SDXLComponents, build_random_components
from .mapping import MappingConfig, MappingLayers


def build_tiny_models(seed: int = 0) -> tuple[SD15Components, SDXLComponents, MappingLayers]:
    """Seeded tiny SD1.5, SDXL and mapping layers, frozen, fp32, on the CPU."""
    sd15 = build_random_components("tiny-sd15", seed)
    sdxl = build_random_components("tiny-sdxl", seed + 1)
    torch.manual_seed(seed + 2)
    mapping = MappingLayers(MappingConfig.from_unet_configs(sd15.unet.config, sdxl.unet.config))
    # The release zero-initialises zero_out for training; left at zero the adapter would
    # add nothing and tests could not see it work.
    for p in mapping.zero_out.parameters():
        torch.nn.init.normal_(p, std=0.05)
    mapping.eval().requires_grad_(False)
    return sd15, sdxl, mapping
