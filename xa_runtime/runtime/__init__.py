"""Execution of the graphs: runtime switches, the step executor (eager, compiled, CUDA
graphs), the stage-2 step scheduler (two CUDA streams), memory residency, stage timing, and
the backends (`backends`: torch, onnxruntime, tensorrt and their `open_backend`; imported on
demand so that onnxruntime and tensorrt stay optional)."""

from .config import CHANNELS_LAST_PARTS, MIXED_LAYOUT, RuntimeConfig
from .executor import StepExecutor, model_fingerprint, prepare_models
from .graphs import GraphCache
from .memory import Residency, peak_memory_bytes, reset_peak_memory
from .stage2 import Stage2Scheduler
from .timing import StageTimer

__all__ = [
    "CHANNELS_LAST_PARTS", "MIXED_LAYOUT", "GraphCache", "Residency", "RuntimeConfig", "Stage2Scheduler", "StageTimer", "StepExecutor", "model_fingerprint",
    "peak_memory_bytes", "prepare_models", "reset_peak_memory",
]
