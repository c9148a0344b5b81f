"""T2I-Adapter (SD1.5) on the SD1.5 branch: control-image features computed once per
generation and added inside the UNet's down blocks (`down_intrablock_additional_residuals`).

As diffusers' StableDiffusionAdapterPipeline: the features are multiplied by
`adapter_conditioning_scale` and duplicated for the CFG rows (both halves get them). As its
SDXL adapter pipeline: `adapter_conditioning_factor` f keeps them for the first
int(n * f) of n steps; here n is each X-Adapter stage's own step count (no authors'
T2I-Adapter pipeline exists to follow). `AdapterFeaturePlugin` is the shared part that the
Nexus Adapter reuses.
"""

from __future__ import annotations

import copy

from pathlib import Path
from typing import Any

import torch
from diffusers import T2IAdapter

from ..errors import CheckpointError, ParameterError
from ..loading.checkpoint_files import check_finite, read_folder_config
from .base import PluginContext, StepInfo
from .control_images import CONTROL_TYPES, control_image_tensor, to_grey
from .controlnet import check_plugin_number

SD15_ADAPTER_TYPES = ("full_adapter", "light_adapter")  # full_adapter_xl is SDXL's


def feature_channels(adapter: torch.nn.Module) -> list[int]:
    """Channels of the 4 features a diffusers T2IAdapter (or NexusAdapter) returns."""
    config = adapter.config
    channels = list(config.channels)
    return channels + [channels[-1]] if getattr(config, "adapter_type", None) == "light_adapter" else channels


def check_adapter_fits(adapter: torch.nn.Module, unet: torch.nn.Module, source: str = "adapter") -> None:
    """CheckpointError unless the adapter's 4 features have the SD1.5 UNet's down-block widths."""
    mine, theirs = feature_channels(adapter), list(unet.config.block_out_channels)
    if mine != theirs or adapter.config.downscale_factor != 8:
        raise CheckpointError(
            f"{source}: adapter features of {mine} channels at 1/{adapter.config.downscale_factor} do not fit the "
            f"SD1.5 UNet's down blocks ({theirs} channels, first at 1/8 of the image)"
        )


class AdapterFeaturePlugin:
    """Features of an adapter on the control image, entering the SD1.5 UNet like T2I-Adapter's.

    adapter: a module whose `features(pixels, ctx)` (override) gives 4 feature maps B x C x h x w;
    image: path, PIL, array or tensor in [0, 1] (resized to the SD1.5 size); scale: multiplies
    the features; conditioning_factor: the fraction of each stage's first steps they act in.
    """

    name = "adapter"
    scale_name = "adapter_scale"

    def __init__(
        self, adapter: torch.nn.Module, image: Any, scale: float = 1.0, conditioning_factor: float = 1.0,
        control_type: str = "none",
    ):
        self.scale = check_plugin_number(self.scale_name, scale)
        self.conditioning_factor = check_plugin_number("adapter_conditioning_factor", conditioning_factor, 0.0, 1.0)
        if control_type not in CONTROL_TYPES:
            raise ParameterError("control_type", control_type, f"one of {', '.join(CONTROL_TYPES)}")
        self.adapter, self.image, self.control_type = adapter, image, control_type
        self._features: list[torch.Tensor] | None = None

    def with_image(self, image: Any) -> "AdapterFeaturePlugin":
        """The same adapter and settings on another control image (a per-request image)."""
        clone = copy.copy(self)
        clone.image, clone._features = image, None
        return clone

    def features(self, pixels: torch.Tensor, ctx: PluginContext) -> list[torch.Tensor]:
        """4 feature maps for B x C x H x W control pixels in [0, 1]."""
        raise NotImplementedError

    def prepare(self, ctx: PluginContext) -> None:
        self.adapter.to(device=ctx.device, dtype=ctx.dtype)
        pixels = control_image_tensor(self.image, self.control_type, ctx.height, ctx.width, ctx.batch)
        if self.adapter.config.in_channels == 1:
            pixels = to_grey(pixels)
        feats = [f * self.scale for f in self.features(pixels.to(ctx.device, ctx.dtype), ctx)]
        self._features = [torch.cat([f, f]) for f in feats] if ctx.cfg else feats

    def unet_kwargs(self, ctx: PluginContext, step: StepInfo, sample: torch.Tensor) -> dict[str, Any]:
        if self._features is None:
            raise RuntimeError(f"{type(self).__name__}.prepare must run before unet_kwargs")
        if sample.shape[0] != self._features[0].shape[0]:
            raise ValueError(f"SD1.5 UNet batch of {sample.shape[0]} rows, features prepared for {self._features[0].shape[0]}")
        if step.index >= int(step.num_steps * self.conditioning_factor):
            return {}
        return {"down_intrablock_additional_residuals": list(self._features)}  # the UNet pops from the list


class T2IAdapterPlugin(AdapterFeaturePlugin):
    """A diffusers T2IAdapter (full or light, SD1.5) as a step plugin.

    adapter_conditioning_scale / adapter_conditioning_factor: diffusers' names (see the module doc).
    """

    name = "t2i-adapter"
    scale_name = "t2i_scale"

    def __init__(
        self, adapter: T2IAdapter, image: Any, adapter_conditioning_scale: float = 1.0,
        adapter_conditioning_factor: float = 1.0, control_type: str = "none",
    ):
        super().__init__(adapter, image, adapter_conditioning_scale, adapter_conditioning_factor, control_type)

    def features(self, pixels: torch.Tensor, ctx: PluginContext) -> list[torch.Tensor]:
        return list(self.adapter(pixels))


def load_t2i_adapter(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> T2IAdapter:
    """An SD1.5 T2I-Adapter (full_adapter or light_adapter) from a local diffusers folder."""
    p = Path(path)
    accepted = "a local diffusers T2IAdapter folder (config.json + weights) for SD1.5"
    config = read_folder_config(p, "t2i_adapter", accepted, "T2IAdapter")
    kind = config.get("adapter_type", "full_adapter")
    if kind not in SD15_ADAPTER_TYPES:
        raise CheckpointError(
            f"{p}: adapter_type {kind!r} is not an SD1.5 T2I-Adapter ({', '.join(SD15_ADAPTER_TYPES)}); "
            "SDXL adapters do not fit the SD1.5 branch"
        )
    adapter = T2IAdapter.from_pretrained(p, local_files_only=True, torch_dtype=dtype)
    check_finite(adapter.named_parameters(), f"{p} (T2I-Adapter)", "weight")
    return adapter.to(device=device).eval().requires_grad_(False)


def load_t2i_adapter_plugin(
    unet: torch.nn.Module | None, path: str | Path, image: Any, *, scale: float = 1.0,
    conditioning_factor: float = 1.0, control_type: str = "none",
) -> T2IAdapterPlugin:
    """What `--t2i-adapter PATH --t2i-image IMG --t2i-scale F` means; with `unet` (the SD1.5
    UNet) the adapter is loaded on its device and dtype and checked to fit it."""
    where = {"dtype": unet.dtype, "device": unet.device} if unet is not None else {}
    adapter = load_t2i_adapter(path, **where)
    if unet is not None:
        check_adapter_fits(adapter, unet, str(path))
    return T2IAdapterPlugin(adapter, image, scale, conditioning_factor, control_type)


def build_tiny_t2i_adapter(sd15_unet: torch.nn.Module, adapter_type: str = "full_adapter", seed: int = 0) -> T2IAdapter:
    """A random T2IAdapter whose features fit `sd15_unet` (full: one stage per down block;
    light: one stage fewer plus its extra downsampling block, 4 residual blocks)."""
    widths = list(sd15_unet.config.block_out_channels)
    torch.manual_seed(seed)
    if adapter_type == "full_adapter":
        adapter = T2IAdapter(channels=widths, num_res_blocks=2, downscale_factor=8, adapter_type=adapter_type)
    elif adapter_type == "light_adapter":
        adapter = T2IAdapter(channels=widths[:-1], num_res_blocks=4, downscale_factor=8, adapter_type=adapter_type)
    else:
        raise ParameterError("adapter_type", adapter_type, f"one of {', '.join(SD15_ADAPTER_TYPES)}")
    return adapter.eval().requires_grad_(False)


def plugin_from_spec(unet: torch.nn.Module | None, spec: Any) -> T2IAdapterPlugin:
    """The table's loader (plugin_kinds, kind "t2i"): a PluginSpec's T2I-Adapter."""
    return load_t2i_adapter_plugin(unet, spec.path, spec.image, scale=spec.scale,
                                   conditioning_factor=spec.conditioning_factor)
