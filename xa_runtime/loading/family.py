"""Which model a path holds (SD1.5, SDXL, VAE, adapter), from configs and safetensors
headers only, so that a wrong path fails before gigabytes of weights are read."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import CheckpointError, ParameterError
from ..models.original_layout import (
    SD15_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)
from ..models.presets import PRESETS, ModelPreset
from .adapter_checkpoint import ADAPTER_SUFFIXES
from .checkpoint_files import Shapes, non_regular_kind, read_json_config, read_shapes

FAMILY_NAMES = {"sd15": "an SD1.5 model", "sdxl": "an SDXL base model"}
_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
_FORMATS = "a diffusers folder or a single-file checkpoint (.safetensors, or a weights-only .ckpt)"
_ACCEPTED = {
    "sd15": f"a local SD1.5 model: {_FORMATS}",
    "sdxl": f"a local SDXL base model: {_FORMATS}",
    "adapter": "a local X-Adapter checkpoint file (.bin, .pt, .pth or .safetensors)",
    "vae": "a local VAE: a diffusers AutoencoderKL folder or a single-file .safetensors",
}


def family_of_unet_config(config: Mapping[str, Any]) -> str:
    """"sd15" for a 4-stage UNet without added embeddings, "sdxl" for a 3-stage UNet with
    SDXL's text_time embedding; CheckpointError for anything else (refiner, inpainting)."""
    stages = len(config.get("block_out_channels", ()))
    added = config.get("addition_embed_type")
    in_channels = config.get("in_channels", 4)
    if in_channels == 4 and stages == 3 and added == "text_time":
        return "sdxl"
    if in_channels == 4 and stages == 4 and added is None:
        return "sd15"
    raise CheckpointError(
        f"its UNet (stages {list(config.get('block_out_channels', ()))}, addition_embed_type={added!r}, "
        f"in_channels={in_channels}) is neither SD1.5- nor SDXL-base-like; refiner and inpainting "
        "models do not fit X-Adapter"
    )


def family_of_folder(path: str | Path) -> str:
    """Family of a diffusers model folder, from its unet/config.json."""
    path = Path(path)
    unet_config = path / "unet" / "config.json"
    if not unet_config.is_file():
        own = path / "config.json"
        if own.is_file() and read_json_config(own).get("_class_name") == "AutoencoderKL":
            raise CheckpointError(f"{path} is a VAE folder, not a full diffusers model folder")
        raise CheckpointError(f"{path} is not a diffusers model folder (no unet/config.json)")
    family = family_of_unet_config(read_json_config(unet_config))
    for part in ("vae", "text_encoder", "text_encoder_2"):  # their values checked before anything is built
        if (path / part / "config.json").is_file():
            read_json_config(path / part / "config.json")
    return family


def _has(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def family_of_checkpoint(shapes: Shapes) -> str:
    """Family of an original-layout (single-file) checkpoint, from tensor names and shapes."""
    if not _has(shapes, UNET_PREFIX):
        if "encoder.conv_in.weight" in shapes or _has(shapes, VAE_PREFIX):
            raise CheckpointError("it holds a VAE only, not a full SD1.5/SDXL checkpoint")
        if _has(shapes, "down_blocks."):
            raise CheckpointError("it holds a diffusers-layout UNet only; pass the whole diffusers folder")
        raise CheckpointError(f"it has no UNet weights ({UNET_PREFIX}*): not an SD1.5/SDXL single-file checkpoint")
    if _has(shapes, SDXL_OPENCLIP_PREFIX) and _has(shapes, SDXL_CLIP_PREFIX):
        family = "sdxl"
    elif _has(shapes, "conditioner.embedders.0.model."):
        raise CheckpointError("it is an SDXL refiner (OpenCLIP-bigG only), which X-Adapter does not use")
    elif _has(shapes, SD15_CLIP_PREFIX):
        family = "sd15"
    elif _has(shapes, "cond_stage_model.model."):
        raise CheckpointError("it is an SD2.x checkpoint (OpenCLIP-H text encoder), which X-Adapter does not use")
    else:
        raise CheckpointError("it has a UNet but no SD1.5 or SDXL text encoder weights")
    conv_in = shapes.get(_CONV_IN)
    if conv_in is None or len(conv_in) != 4:
        raise CheckpointError(f"it has no {_CONV_IN} (the UNet input conv)")
    if conv_in[1] != 4:
        raise CheckpointError(
            f"its UNet takes {conv_in[1]} input channels (an inpainting or instruct-pix2pix model); "
            "X-Adapter needs a text-to-image UNet with 4"
        )
    return family


def preset_for_checkpoint(shapes: Shapes, family: str) -> ModelPreset:
    """The preset of `family` whose UNet width matches the checkpoint's input conv, so real
    ("sd15"/"sdxl") and tiny checkpoints go through the same loader."""
    width = shapes[_CONV_IN][0]
    for preset in PRESETS.values():
        if preset.family == family and preset.unet["block_out_channels"][0] == width:
            return preset
    known = {p.name: p.unet["block_out_channels"][0] for p in PRESETS.values() if p.family == family}
    raise CheckpointError(f"its UNet width {width} matches no {family} preset (known widths: {known})")


def detect_family(path: str | Path) -> str:
    """"sd15" or "sdxl" for a diffusers folder or single-file checkpoint, reading only
    configs and headers (a memory-mapped weights-only load for pickles); CheckpointError
    when the path is neither."""
    path = Path(path)
    try:
        if path.is_dir():
            return family_of_folder(path)
        return family_of_checkpoint(read_shapes(path))
    except CheckpointError as e:
        if str(e).startswith(str(path)):
            raise
        raise CheckpointError(f"{path}: {e}") from e


def _check_vae(path: Path) -> None:
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file() or read_json_config(config).get("_class_name") != "AutoencoderKL":
            raise CheckpointError("this folder has no AutoencoderKL config.json")
        return
    shapes = read_shapes(path)
    if not any(k in shapes for k in ("encoder.conv_in.weight", VAE_PREFIX + "encoder.conv_in.weight")):
        raise CheckpointError("this file has no VAE encoder weights (encoder.conv_in.weight)")


def _check_adapter(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError("this is a folder, not a checkpoint file")
    if path.suffix.lower() not in ADAPTER_SUFFIXES:
        raise CheckpointError(f"unknown suffix {path.suffix!r}")
    # Names only (widths follow the UNets, known after loading them); a memory-mapped,
    # weights-only read for pickles. in_conv exists only where a stage changes width.
    names = set(read_shapes(path))
    allowed = _released_adapter_names()
    missing = sorted(n for n in allowed - names if ".in_conv." not in n)
    unexpected = sorted(names - allowed)
    if missing or unexpected:
        raise CheckpointError(
            "not an X-Adapter checkpoint: "
            + "; ".join(f"{what} ({len(v)}): {', '.join(v[:5])}{', ...' if len(v) > 5 else ''}"
                        for what, v in (("missing keys", missing), ("unexpected keys", unexpected)) if v)
        )


@functools.lru_cache(maxsize=1)
def _released_adapter_names() -> frozenset[str]:
    import torch

    from ..models.mapping import MappingLayers

    with torch.device("meta"):
        return frozenset(MappingLayers().state_dict())


def check_model_path(path: str | os.PathLike | None, family: str, param: str) -> None:
    """Cheap check that `path` holds what parameter `param` needs, before any weights load.

    family: "sd15", "sdxl" (diffusers folder or single file of that family), "adapter"
    (a .bin/.pt/.pth/.safetensors file) or "vae" (AutoencoderKL folder or file). Raises
    ParameterError(param, path, accepted) for a missing or unreadable path, the wrong kind
    of folder or file, or the other model family (saying which one was found).
    """
    if family not in _ACCEPTED:
        raise ValueError(f"unknown model family {family!r}; accepted: {', '.join(_ACCEPTED)}")
    accepted = _ACCEPTED[family]
    if path is None or str(path) == "":
        raise ParameterError(param, path, accepted)
    p = Path(path)
    if not p.exists():
        raise ParameterError(param, str(path), f"{accepted}; nothing exists at this path")
    if not os.access(p, os.R_OK):
        raise ParameterError(param, str(path), f"{accepted}; this path is not readable")
    kind = non_regular_kind(p)
    if kind is not None and kind != "a folder":
        raise ParameterError(param, str(path), f"{accepted}; this is not a regular file (it is {kind})")
    try:
        if family == "adapter":
            _check_adapter(p)
        elif family == "vae":
            _check_vae(p)
        else:
            found = family_of_folder(p) if p.is_dir() else family_of_checkpoint(read_shapes(p))
            if found != family:
                raise CheckpointError(f"found {FAMILY_NAMES[found]} instead")
    except CheckpointError as e:
        raise ParameterError(param, str(path), f"{accepted}; {e}") from e
