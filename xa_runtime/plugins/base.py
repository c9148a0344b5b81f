"""The contract between the pipeline and SD1.5 plugins that act per denoising step.

A plugin (ControlNet, T2I-Adapter, IP-Adapter, ...) is told once per generation what is
being generated (`prepare`), then asked at every SD1.5 UNet call for extra keyword
arguments in diffusers' own vocabulary (`unet_kwargs`). The pipeline merges what several
plugins return (`merge_unet_kwargs`). Plugins never see which backend runs the UNet.
Weight plugins (LoRA) change the models instead and do not use this interface.

A plugin class may also declare UNet states that cannot generate without one of its
instances (an IP-Adapter installed on the UNet needs its image): `@requires_plugin` and a
classmethod `required_for(unet)`; the pipeline calls `check_required_plugins` per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, TypeVar, runtime_checkable

import torch

from ..errors import ParameterError


@dataclass(frozen=True)
class PluginContext:
    """One generation as plugins see it.

    batch: images generated (B, without CFG doubling); cfg: UNet batches are [uncond; cond]
    (2B rows) when True; prompt_embeds: the SD1.5 text embeddings the UNet gets (rows x 77 x D);
    height/width: SD1.5 image size in pixels.
    """

    batch: int
    cfg: bool
    device: torch.device
    dtype: torch.dtype
    height: int
    width: int
    prompt_embeds: torch.Tensor
    generator: torch.Generator


@dataclass(frozen=True)
class StepInfo:
    """Where in the schedule an SD1.5 UNet call is: stage "stage1" or "stage2", index within
    the stage, steps in the stage, and the timestep."""

    stage: str
    index: int
    num_steps: int
    timestep: torch.Tensor


@runtime_checkable
class SD15StepPlugin(Protocol):
    name: str

    def prepare(self, ctx: PluginContext) -> None:
        """Per-generation work (encode the control image, image embeddings, ...)."""

    def unet_kwargs(self, ctx: PluginContext, step: StepInfo, sample: torch.Tensor) -> dict[str, Any]:
        """Extra SD1.5 UNet kwargs for this call; `sample` is the scaled UNet input."""


_REQUIRED: list[type] = []
P = TypeVar("P", bound=type)


def requires_plugin(cls: P) -> P:
    """Class decorator: `cls.required_for(unet)` returns None, or, when `unet`'s state needs
    an instance of `cls` among a request's plugins, what the request must include (words)."""
    if not callable(getattr(cls, "required_for", None)):
        raise TypeError(f"{cls.__name__} needs a classmethod required_for(unet) to be a required plugin")
    _REQUIRED.append(cls)
    return cls


def check_required_plugins(unet: torch.nn.Module, plugins: Sequence[Any]) -> None:
    """ParameterError("plugins", ...) when `unet` is in a state that a registered plugin
    class requires (requires_plugin) and no plugin of that class is given."""
    for cls in _REQUIRED:
        needed = cls.required_for(unet)
        if needed is not None and not any(isinstance(pl, cls) for pl in plugins):
            raise ParameterError("plugins", [getattr(pl, "name", type(pl).__name__) for pl in plugins], needed)


_SUMMED_TUPLES = ("down_block_additional_residuals", "down_intrablock_additional_residuals")


def merge_unet_kwargs(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine several plugins' kwargs: residual tuples and the mid residual are summed
    (as diffusers' MultiControlNet does), dict-valued kwargs are merged, and IP-Adapter
    `image_embeds` lists are concatenated."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if value is None:
                continue
            if key in _SUMMED_TUPLES:
                # Always a fresh list: diffusers pops T2I residuals off the list it is given.
                out[key] = [a + b for a, b in zip(out[key], value, strict=True)] if key in out else list(value)
            elif key not in out:
                out[key] = value
            elif key == "mid_block_additional_residual":
                out[key] = out[key] + value
            elif key in ("cross_attention_kwargs", "added_cond_kwargs"):
                merged = dict(out[key])
                for k, v in value.items():
                    merged[k] = list(merged[k]) + list(v) if k == "image_embeds" and k in merged else v
                out[key] = merged
            else:
                raise ValueError(f"two plugins both set the SD1.5 UNet argument {key!r}")
    return out
