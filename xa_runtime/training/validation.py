"""Validation while training: fixed prompts and seeds through the real XAdapterPipeline
with the current mapping layers (a copy the pipeline owns, refreshed at each call)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..models.components import SD15Components, SDXLComponents
from ..models.mapping import MappingLayers
from ..pipeline import GenerationParams, XAdapterPipeline


class Validator:
    """Generates `prompts` (seed = index) at the training resolutions; images are written to
    `output/validation/step-NNNNNNN-I.png` and returned as N x H x W x 3 arrays for the trackers."""

    def __init__(self, sd15: SD15Components, sdxl: SDXLComponents, mapping: MappingLayers, device: torch.device,
                 dtype: torch.dtype, prompts: tuple[str, ...], steps: int, sizes: tuple[int, int, int, int]):
        copy = MappingLayers(mapping.config)
        self.pipe = XAdapterPipeline(sd15, sdxl, copy, device=device, dtype=dtype, progress=False)
        self.prompts, self.steps = prompts, steps
        self.height, self.width, self.height_sd15, self.width_sd15 = sizes

    def __call__(self, mapping: MappingLayers, step: int, output: Path) -> Any:
        import numpy as np

        with torch.no_grad():
            for dst, src in zip(self.pipe.mapping.parameters(), mapping.parameters()):
                dst.copy_(src)
        folder = output / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        arrays = []
        for i, prompt in enumerate(self.prompts):
            params = GenerationParams(prompt=prompt, num_inference_steps=self.steps, seed=i, height=self.height,
                                      width=self.width, height_sd15=self.height_sd15, width_sd15=self.width_sd15)
            image = self.pipe.generate(params).images[0]
            image.save(folder / f"step-{step:07d}-{i}.png")
            arrays.append(np.asarray(image))
        return np.stack(arrays)
