"""ControlNet (SD1.5) on the SD1.5 branch, in both X-Adapter stages.

Semantics are diffusers' StableDiffusionControlNetPipeline: the residuals are multiplied by
`conditioning_scale * keep`, with `keep = 1 - float(i/n < start or (i+1)/n > end)`; guess
mode runs the ControlNet on the conditional rows only, scales its residuals by
`logspace(-1, 0)` (inside diffusers' ControlNetModel) and gives the unconditional rows
zeros. Several ControlNets are several plugins: the contract sums their residuals, as
diffusers' MultiControlNetModel does.

The guidance window applies to each stage over that stage's own steps (i/n in stage 1,
i/k in stage 2). The authors' ControlNet pipelines divide the stage-2 index by the stage-1
step count n instead; that equals ours at their ControlNet setting (adapter_guidance_start
1.0, k = n) and for k < n silently shifts the window (e.g. [0.5, 1.0] with n = 4, k = 2
switches the ControlNet off for all of stage 2). We treat it as a slip and do not copy it
(README, "Differences from the authors' code").

Loading: diffusers ControlNetModel folders, and single files in the original layout
(lllyasviel's `control_v11p_sd15_*.safetensors/.pth`, or `control_model.*` full files) with a
config derived offline from the SD1.5 preset of matching width (tiny or real) and the
hint-block shapes, converted by diffusers' own `convert_controlnet_checkpoint`.
"""

from __future__ import annotations

import copy

import inspect
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

from ..errors import CheckpointError, ParameterError
from ..loading.checkpoint_files import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    read_folder_config,
    check_finite,
    read_state_dict,
)
from ..loading.exact_state import assign_exact, build_empty
from ..models.presets import PRESETS, ModelPreset
from .base import PluginContext, StepInfo
from .control_images import CONTROL_TYPES, control_image_tensor

_LDM_PREFIX = "control_model."  # full SD + ControlNet files of ControlNet 1.0
_CROSS_KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def control_keep(index: int, num_steps: int, start: float, end: float) -> float:
    """diffusers' ControlNet window: 1.0 if step `index` of `num_steps` lies in [start, end], else 0.0."""
    return 1.0 - float(index / num_steps < start or (index + 1) / num_steps > end)


def check_plugin_number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """`value` as a float if it is a finite number within [low, high]; else ParameterError(name, ...)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        bounds = f" in [{low}, {high}]" if high is not None else (f" >= {low}" if low is not None else "")
        raise ParameterError(name, value, f"a finite number{bounds}")
    return float(value)


class ControlNetPlugin:
    """One SD1.5 ControlNet as a step plugin (see plugins/base.py).

    controlnet: a diffusers ControlNetModel (moved to the generation's device and dtype in
    `prepare`); image: the control image (path, PIL, array, tensor in [0, 1]; any size, resized
    to the SD1.5 size); control_type: "none" or "canny" (edge map computed after resizing);
    conditioning_scale, guidance_start, guidance_end, guess_mode: as diffusers defines them.
    """

    name = "controlnet"

    def __init__(
        self,
        controlnet: ControlNetModel,
        image: Any,
        conditioning_scale: float = 1.0,
        guidance_start: float = 0.0,
        guidance_end: float = 1.0,
        guess_mode: bool = False,
        control_type: str = "none",
    ):
        self.conditioning_scale = check_plugin_number("controlnet_scale", conditioning_scale)
        self.guidance_start = check_plugin_number("control_start", guidance_start, 0.0, 1.0)
        self.guidance_end = check_plugin_number("control_end", guidance_end, 0.0, 1.0)
        if self.guidance_start >= self.guidance_end:
            raise ParameterError(
                "control_start", guidance_start, f"a number below control_end={guidance_end} (the active window)"
            )
        if control_type not in CONTROL_TYPES:
            raise ParameterError("control_type", control_type, f"one of {', '.join(CONTROL_TYPES)}")
        self.controlnet, self.image, self.control_type = controlnet, image, control_type
        # diffusers: a ControlNet trained with global pooling (shuffle) always runs in guess mode
        self.guess_mode = bool(guess_mode) or bool(getattr(controlnet.config, "global_pool_conditions", False))
        self._pixels: tuple[tuple, torch.Tensor] | None = None
        self._cond: torch.Tensor | None = None

    def prepare(self, ctx: PluginContext) -> None:
        self.controlnet.to(device=ctx.device, dtype=ctx.dtype)
        key = (ctx.height, ctx.width, ctx.batch, self.control_type)
        if self._pixels is None or self._pixels[0] != key:  # image work once per size, not per generation
            pixels = control_image_tensor(self.image, self.control_type, ctx.height, ctx.width, ctx.batch)
            self._pixels = (key, pixels)
        cond = self._pixels[1].to(ctx.device, ctx.dtype)
        self._cond = torch.cat([cond, cond]) if ctx.cfg and not self.guess_mode else cond

    def with_image(self, image: Any) -> "ControlNetPlugin":
        """The same ControlNet and settings on another control image (a per-request image)."""
        clone = copy.copy(self)
        clone.image, clone._pixels, clone._cond = image, None, None
        return clone

    def keep(self, step: StepInfo) -> float:
        """The window factor for this call, over the current stage's steps (module doc)."""
        return control_keep(step.index, step.num_steps, self.guidance_start, self.guidance_end)

    def unet_kwargs(self, ctx: PluginContext, step: StepInfo, sample: torch.Tensor) -> dict[str, Any]:
        if self._cond is None:
            raise RuntimeError("ControlNetPlugin.prepare must run before unet_kwargs")
        keep = self.keep(step)
        if keep == 0.0:
            return {}  # outside the window diffusers adds residuals x 0; skipping the ControlNet is the same
        x, text = sample, ctx.prompt_embeds
        if self.guess_mode and ctx.cfg:
            x, text = sample.chunk(2)[1], ctx.prompt_embeds.chunk(2)[1]
        if x.shape[0] != self._cond.shape[0]:
            raise ValueError(f"SD1.5 UNet batch of {x.shape[0]} rows, control image prepared for {self._cond.shape[0]}")
        down, mid = self.controlnet(
            x, step.timestep, encoder_hidden_states=text, controlnet_cond=self._cond,
            conditioning_scale=self.conditioning_scale * keep, guess_mode=self.guess_mode, return_dict=False,
        )
        if self.guess_mode and ctx.cfg:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}


# ---------------------------------------------------------------------------------- loading
def _check_sd15_config(config: Any, source: str) -> None:
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if len(get("block_out_channels", ())) != 4 or get("addition_embed_type") is not None:
        raise CheckpointError(
            f"{source}: not an SD1.5 ControlNet (stages {list(get('block_out_channels', ()))}, "
            f"addition_embed_type={get('addition_embed_type')!r}); X-Adapter runs SD1.5 ControlNets on its SD1.5 branch"
        )


def check_controlnet_fits(controlnet: ControlNetModel, unet: torch.nn.Module, source: str = "controlnet") -> None:
    """CheckpointError unless the ControlNet's widths and text width are the SD1.5 UNet's."""
    mine, theirs = controlnet.config, unet.config
    for key in ("block_out_channels", "cross_attention_dim", "layers_per_block"):
        a, b = getattr(mine, key), getattr(theirs, key)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise CheckpointError(f"{source}: ControlNet {key}={a} does not fit the SD1.5 UNet ({key}={b})")


def _ldm_controlnet_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith(_LDM_PREFIX) for k in state):
        return {k[len(_LDM_PREFIX):]: v for k, v in state.items() if k.startswith(_LDM_PREFIX)}
    return dict(state)


def controlnet_config_from_state(state: dict[str, torch.Tensor], source: str = "controlnet") -> dict[str, Any]:
    """ControlNetModel config for an original-layout ControlNet state dict (no `control_model.`
    prefix): the SD1.5 preset whose width matches `input_blocks.0.0.weight`, the hint channels
    read from `input_hint_block.*`."""
    if "input_blocks.0.0.weight" not in state or not any(k.startswith("input_hint_block.") for k in state):
        raise CheckpointError(
            f"{source}: not an original-layout ControlNet (no input_blocks.0.0.weight / input_hint_block.*); "
            "pass a diffusers ControlNet folder or a control_*.safetensors/.pth file"
        )
    width = state["input_blocks.0.0.weight"].shape[0]
    cross = state[_CROSS_KEY].shape[1] if _CROSS_KEY in state else None
    preset: ModelPreset | None = next(
        (p for p in PRESETS.values() if p.family == "sd15" and p.unet["block_out_channels"][0] == width), None
    )
    if preset is None or cross != preset.unet["cross_attention_dim"]:
        known = {p.name: (p.unet["block_out_channels"][0], p.unet["cross_attention_dim"]) for p in PRESETS.values()
                 if p.family == "sd15"}
        raise CheckpointError(
            f"{source}: ControlNet width {width} / text width {cross} matches no SD1.5 preset "
            f"(width, text width: {known}); SD2.x and SDXL ControlNets do not fit the SD1.5 branch"
        )
    hint = sorted({int(k.split(".")[1]) for k in state if k.startswith("input_hint_block.")})
    hint_out = [state[f"input_hint_block.{i}.weight"].shape[0] for i in hint]
    allowed = inspect.signature(ControlNetModel.__init__).parameters
    config = {k: v for k, v in preset.unet.items() if k in allowed}
    config.update(
        conditioning_channels=state[f"input_hint_block.{hint[0]}.weight"].shape[1],
        # conv_in, then the output of every second conv (the strided ones): (16, 32, 96, 256) for SD1.5
        conditioning_embedding_out_channels=[hint_out[0]] + hint_out[2:-1:2],
    )
    return config


def controlnet_from_state(
    state: dict[str, torch.Tensor], source: str = "controlnet", *, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ControlNetModel:
    """A ControlNetModel from an original-layout state dict, every tensor accounted for."""
    state = _ldm_controlnet_state(state)
    config = controlnet_config_from_state(state, source)
    try:
        converted = convert_controlnet_checkpoint(state, config)
    except (KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{source}: the ControlNet weights are incomplete (missing {e})") from e
    converted = {k: v for k, v in converted.items() if v is not None}
    module = build_empty(lambda: ControlNetModel.from_config(config))
    return assign_exact(module, converted, f"{source} (ControlNet)", dtype=dtype, device=device)


def load_controlnet(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> ControlNetModel:
    """An SD1.5 ControlNet from a local diffusers folder (config.json + weights) or a single
    original-layout file (.safetensors, or a pickle read with weights_only=True); never a hub."""
    p = Path(path)
    accepted = "a local SD1.5 ControlNet: a diffusers folder or a control_*.safetensors/.pth file"
    if not p.exists():
        raise ParameterError("controlnet", str(path), f"{accepted}; nothing exists at this path")
    if p.is_dir():
        config = read_folder_config(p, "controlnet", accepted, "ControlNetModel")
        _check_sd15_config(config, str(p))
        model = ControlNetModel.from_pretrained(p, local_files_only=True, torch_dtype=dtype)
        check_finite(model.named_parameters(), f"{p} (ControlNet)", "weight")
        return model.to(device=device).eval().requires_grad_(False)
    if p.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise ParameterError("controlnet", str(path), f"{accepted}; unknown suffix {p.suffix!r}")
    return controlnet_from_state(read_state_dict(p), str(p), dtype=dtype, device=device)


def load_controlnet_plugin(
    unet: torch.nn.Module | None,
    path: str | Path,
    image: Any,
    *,
    scale: float = 1.0,
    control_type: str = "none",
    guidance_start: float = 0.0,
    guidance_end: float = 1.0,
    guess_mode: bool = False,
) -> ControlNetPlugin:
    """What `--controlnet PATH --control-image IMG [--control-type] [--controlnet-scale]
    [--control-start --control-end] [--guess-mode]` means; with `unet` (the SD1.5 UNet) the
    ControlNet is loaded on its device and dtype and checked to fit it. Every plugin loader
    takes (unet, path, image, *, scale=..., ...); `scale` is diffusers' controlnet_conditioning_scale."""
    where = {"dtype": unet.dtype, "device": unet.device} if unet is not None else {}
    controlnet = load_controlnet(path, **where)
    if unet is not None:
        check_controlnet_fits(controlnet, unet, str(path))
    return ControlNetPlugin(
        controlnet, image, conditioning_scale=scale, guidance_start=guidance_start,
        guidance_end=guidance_end, guess_mode=guess_mode, control_type=control_type,
    )


# ---------------------------------------------------------------------------------- tiny model
def build_tiny_controlnet(sd15_unet: torch.nn.Module, seed: int = 0) -> ControlNetModel:
    """`ControlNetModel.from_unet(sd15_unet)` with its zero-initialised convs (hint output, zero
    convs) randomised, so that it visibly acts in tests."""
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(sd15_unet)
    zero_init = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block,
                 *controlnet.controlnet_down_blocks]
    for module in zero_init:
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return controlnet.eval().requires_grad_(False)


def plugin_from_spec(unet: torch.nn.Module | None, spec: Any) -> ControlNetPlugin:
    """The table's loader (plugin_kinds, kind "controlnet"): a PluginSpec's ControlNet."""
    return load_controlnet_plugin(unet, spec.path, spec.image, scale=spec.scale, control_type=spec.control_type,
                                  guidance_start=spec.guidance_start, guidance_end=spec.guidance_end,
                                  guess_mode=spec.guess_mode)
