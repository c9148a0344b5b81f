"""Pure PyTorch models: mapping layers, branch wrappers, presets, random/tiny builders.

The presets (`presets`, plain data) load without torch, so that the command-line tools can
read default sizes before importing it; the modules load on first use.
"""

from __future__ import annotations

import lazy_loader

from .presets import PRESETS, ModelPreset, get_preset

# public name -> the module that defines it, imported when the name is first used (these need torch)
__getattr__, _, _ = lazy_loader.attach(__name__, submod_attrs={
    "mapping": ["MappingConfig", "MappingLayers"],
    "components": ["SD15Components", "SDXLComponents", "build_random_components"],
    "tokenizer": ["build_clip_tokenizer"],
})

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
