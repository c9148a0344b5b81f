"""The two-stage X-Adapter algorithm, its parameters and their validation."""

from .params import GenerationParams, SizeRules, validate
from .schedulers import DEFAULT_SCHEDULER, SCHEDULERS, make_scheduler
from .xadapter import XAdapterOutput, XAdapterPipeline

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
