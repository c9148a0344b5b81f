"""SD1.5 (and SDXL) plugins that the pipeline composes; they never know the backend."""

from .base import PluginContext, SD15StepPlugin, StepInfo, merge_unet_kwargs

__all__ = ["PluginContext", "SD15StepPlugin", "StepInfo", "merge_unet_kwargs"]
