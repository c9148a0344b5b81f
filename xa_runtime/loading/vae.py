"""A replacement VAE (e.g. the fp16-safe SDXL VAE the authors pair with SDXL): a diffusers
AutoencoderKL folder, or a single file in the original or the diffusers layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from ..errors import CheckpointError
from .checkpoint_files import read_state_dict
from .diffusers_folder import load_pretrained
from .exact_state import assign_exact, build_empty

_DIFFUSERS_LAYOUT_KEY = "encoder.down_blocks.0.resnets.0.conv1.weight"


def load_vae(
    path: str | Path,
    base_config: Mapping[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> AutoencoderKL:
    """The VAE at `path`. A folder brings its own config (the fp16-fix VAE turns
    force_upcast off there); a single file carries none and takes `base_config`, the config
    of the VAE it replaces (same architecture and latent scaling factor)."""
    path = Path(path)
    if path.is_dir():
        return load_pretrained(AutoencoderKL, path, None, dtype, device)
    state = read_state_dict(path)
    if _DIFFUSERS_LAYOUT_KEY not in state:
        try:
            # Handles both a bare VAE file and the "first_stage_model." prefix of a full checkpoint.
            state = convert_ldm_vae_checkpoint(state, dict(base_config))
        except (KeyError, IndexError) as e:
            raise CheckpointError(f"{path}: not a complete VAE checkpoint (missing {e})") from e
    config = dict(base_config)
    module = build_empty(lambda: AutoencoderKL.from_config(config))
    return assign_exact(module, state, f"VAE {path}", strict_unexpected=False, dtype=dtype, device=device)
