"""The two-stage X-Adapter algorithm, its parameters and their validation.

The parameters and their validation (`params`) load without torch, so that the command-line
tools check a request before importing it; the pipeline and the schedulers load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .params import DEFAULT_SCHEDULER, SCHEDULERS, GenerationParams, SizeRules, validate

# public name -> the module that defines it, imported when the name is first used (these need torch)
_LAZY = {"XAdapterOutput": ".xadapter", "XAdapterPipeline": ".xadapter", "make_scheduler": ".schedulers"}

__all__ = [
    "DEFAULT_SCHEDULER",
    "SCHEDULERS",
    "GenerationParams",
    "SizeRules",
    "XAdapterOutput",
    "XAdapterPipeline",
    "make_scheduler",
    "validate",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
