"""Pure PyTorch models: mapping layers, branch wrappers, presets, random/tiny builders.

The presets (`presets`, plain data) load without torch, so that the command-line tools can
read default sizes before importing it; the modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .presets import PRESETS, ModelPreset, get_preset

# public name -> the module that defines it, imported when the name is first used (these need torch)
_LAZY = {
    "MappingConfig": ".mapping", "MappingLayers": ".mapping", "SD15Components": ".components",
    "SDXLComponents": ".components", "build_random_components": ".components", "build_clip_tokenizer": ".tokenizer",
}

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
