"""SD1.5 (and SDXL) plugins that the pipeline composes; they never know the backend."""

from .base import PluginContext, SD15StepPlugin, StepInfo, merge_unet_kwargs
from .ip_adapter import IPAdapter, IPAdapterPlugin, load_ip_adapter, load_ip_adapter_plugin
from .ip_adapter_image import load_image_encoder

__all__ = [
    "IPAdapter",
    "IPAdapterPlugin",
    "PluginContext",
    "SD15StepPlugin",
    "StepInfo",
    "load_image_encoder",
    "load_ip_adapter",
    "load_ip_adapter_plugin",
    "merge_unet_kwargs",
]
