"""load_sd15 / load_sdxl: one entry point per model family, whatever the on-disk format."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointError, ParameterError
from ..models.components import SD15Components, SDXLComponents
from .diffusers_folder import load_sd15_folder, load_sdxl_folder
from .family import FAMILY_NAMES, family_of_folder
from .single_file import load_single_file
from .vae import load_vae


def _existing(path: str | os.PathLike, name: str = "path") -> Path:
    # A local path only: a name that is not one here (a hub id) stops before any diffusers call.
    p = Path(path)
    if not p.exists():
        raise ParameterError(name, str(path), "a local model folder or file; nothing exists at this path (hub ids "
                             "are not downloaded)")
    return p


def _check_folder_family(folder: Path, family: str) -> None:
    try:
        found = family_of_folder(folder)
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from e
    if found != family:
        raise CheckpointError(f"{folder} holds {FAMILY_NAMES[found]}, not {FAMILY_NAMES[family]}")


def load_sd15(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> SD15Components:
    """SD1.5 (UNet, VAE, CLIP-L, tokenizer, scheduler config) from a local diffusers folder
    or a single-file original-layout checkpoint (.safetensors). Never reaches a hub.
    Modules end on `device` in `dtype`, eval mode, without gradients; CheckpointError if
    the path holds another family or incomplete weights."""
    p = _existing(path, "sd15")
    if p.is_dir():
        _check_folder_family(p, "sd15")
        return load_sd15_folder(p, dtype=dtype, device=device)
    return load_single_file(p, "sd15", dtype=dtype, device=device)  # type: ignore[return-value]


def load_sdxl(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vae_path: str | os.PathLike | None = None,
) -> SDXLComponents:
    """SDXL base (UNet, VAE, CLIP-L + OpenCLIP-bigG, two tokenizers, scheduler config) from a
    local diffusers folder or single-file checkpoint. `vae_path` (a diffusers VAE folder or
    a single-file VAE) replaces the bundled VAE, e.g. with the fp16-safe SDXL VAE."""
    p = _existing(path, "sdxl")
    if p.is_dir():
        _check_folder_family(p, "sdxl")
        sdxl = load_sdxl_folder(p, dtype=dtype, device=device)
    else:
        sdxl = load_single_file(p, "sdxl", dtype=dtype, device=device)  # type: ignore[assignment]
    if vae_path is not None:
        sdxl.vae = load_vae(_existing(vae_path, "sdxl_vae"), sdxl.vae.config, dtype=dtype, device=device)
    return sdxl
