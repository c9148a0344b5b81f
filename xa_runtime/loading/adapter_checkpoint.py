"""The X-Adapter mapping-layer checkpoint: the released `X_Adapter_v1.bin` (a plain
`torch.save` state dict) or a .safetensors copy, loaded unchanged and all or nothing."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.mapping import MappingConfig, MappingLayers
from .checkpoint_files import SAFETENSORS_SUFFIXES, read_state_dict
from .exact_state import assign_exact, build_empty

ADAPTER_SUFFIXES = SAFETENSORS_SUFFIXES + (".bin", ".pt", ".pth")


def load_mapping(
    path: str | Path,
    config: MappingConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> MappingLayers:
    """Mapping layers of widths `config` with the weights of the checkpoint at `path`.

    `.bin`/`.pt`/`.pth` are read with `torch.load(weights_only=True)`, `.safetensors` with
    safetensors. The names must be the released ones (`body.N.block1.weight`, ...,
    `zero_out.N.bias`) with the shapes `config` implies: otherwise CheckpointError lists
    the missing keys, unexpected keys and shape mismatches, and nothing is loaded.
    Returns the module on `device` in `dtype`, eval mode, without gradients. Without
    `config` the widths are read off the checkpoint (MappingConfig.from_state_dict).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ADAPTER_SUFFIXES:
        raise CheckpointError(f"{path}: an X-Adapter checkpoint is a {', '.join(ADAPTER_SUFFIXES)} file")
    state = read_state_dict(path)
    if config is None:
        try:
            config = MappingConfig.from_state_dict(state)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    module = build_empty(lambda: MappingLayers(config))
    return assign_exact(module, state, f"X-Adapter checkpoint {path} (for {config})", dtype=dtype, device=device)
