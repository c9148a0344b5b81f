"""The two-stage X-Adapter algorithm, its parameters and their validation.

The parameters and their validation (`params`) load without torch, so that the command-line
tools check a request before importing it; the pipeline and the schedulers load on first use.
"""

from __future__ import annotations

import lazy_loader

from .params import DEFAULT_SCHEDULER, SCHEDULERS, GenerationParams, SizeRules, validate

# public name -> the module that defines it, imported when the name is first used (these need torch)
__getattr__, _, _ = lazy_loader.attach(__name__, submod_attrs={
    "xadapter": ["XAdapterOutput", "XAdapterPipeline"],
    "schedulers": ["make_scheduler"],
})

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
