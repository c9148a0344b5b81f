"""Pure PyTorch models: mapping layers, branch wrappers, presets, random/tiny builders."""

from .components import SD15Components, SDXLComponents, build_random_components
from .mapping import MappingConfig, MappingLayers
from .presets import PRESETS, ModelPreset, get_preset
from .tokenizer import build_clip_tokenizer

__all__ = [
    "PRESETS",
    "MappingConfig",
    "MappingLayers",
    "ModelPreset",
    "SD15Components",
    "SDXLComponents",
    "build_clip_tokenizer",
    "build_random_components",
    "get_preset",
]
