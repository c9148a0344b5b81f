"""SD1.5 (and SDXL) plugins that the pipeline composes; they never know the backend."""

from .base import PluginContext, SD15StepPlugin, StepInfo, merge_unet_kwargs
from .control_images import CONTROL_TYPES, canny
from .controlnet import ControlNetPlugin, load_controlnet, load_controlnet_plugin
from .ip_adapter import IPAdapter, IPAdapterPlugin, load_ip_adapter, load_ip_adapter_plugin
from .ip_adapter_image import load_image_encoder
from .lora import LoraManager, load_lora, lora_delta
from .nexus import NexusAdapter, NexusAdapterPlugin, NexusConfig, load_nexus_adapter, load_nexus_adapter_plugin
from .t2i_adapter import T2IAdapterPlugin, load_t2i_adapter, load_t2i_adapter_plugin

__all__ = [
    "CONTROL_TYPES",
    "ControlNetPlugin",
    "IPAdapter",
    "IPAdapterPlugin",
    "LoraManager",
    "NexusAdapter",
    "NexusAdapterPlugin",
    "NexusConfig",
    "PluginContext",
    "SD15StepPlugin",
    "StepInfo",
    "T2IAdapterPlugin",
    "canny",
    "load_controlnet",
    "load_controlnet_plugin",
    "load_image_encoder",
    "load_ip_adapter",
    "load_ip_adapter_plugin",
    "load_lora",
    "lora_delta",
    "load_nexus_adapter",
    "load_nexus_adapter_plugin",
    "load_t2i_adapter",
    "load_t2i_adapter_plugin",
    "merge_unet_kwargs",
]
