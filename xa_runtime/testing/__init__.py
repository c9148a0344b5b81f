"""Tiny fixture writers for the tests, the docs and the benchmarks: random models and plugin
files written in the real on-disk layouts, so that every loader reads the bytes a user would
hand it. No production module imports this package (the benchmark library may).

- `models`: `save_tiny_models` / `TinyModelPaths`, the tiny X-Adapter trio in every format.
- `lora`: `write_random_lora` in each LoRA layout (`LORA_FORMATS`).
- `plugins`: `write_tiny_controlnet`, `write_tiny_t2i_adapter`, `write_tiny_nexus`,
  `write_tiny_ip_adapter`, `write_tiny_image_encoder` (and `controlnet_to_original`, the
  original-layout ControlNet weights the single file holds).
"""

from .lora import FORMATS as LORA_FORMATS
from .lora import write_random_lora
from .models import TinyModelPaths, save_tiny_models
from .plugins import (
    TINY_IMAGE_ENCODER,
    controlnet_to_original,
    write_tiny_controlnet,
    write_tiny_image_encoder,
    write_tiny_ip_adapter,
    write_tiny_nexus,
    write_tiny_t2i_adapter,
)

__all__ = [
    "LORA_FORMATS",
    "TINY_IMAGE_ENCODER",
    "TinyModelPaths",
    "controlnet_to_original",
    "save_tiny_models",
    "write_random_lora",
    "write_tiny_controlnet",
    "write_tiny_image_encoder",
    "write_tiny_ip_adapter",
    "write_tiny_nexus",
    "write_tiny_t2i_adapter",
]
