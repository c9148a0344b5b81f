"""Reading checkpoint files: .safetensors headers and tensors, and pickles only through
`torch.load(weights_only=True)`.

Pickled checkpoints (.ckpt, .bin, .pt, .pth) can execute code when unpickled; this
runtime never unpickles anything but tensors and plain containers, and says so when a
file needs more.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ParameterError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # real headers are a few MB; more means not a safetensors file

Shapes = dict[str, tuple[int, ...]]


def read_safetensors_shapes(path: str | Path) -> Shapes:
    """Tensor names and shapes from a .safetensors header, without reading any weights."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path} is too short to be a .safetensors file")
            (size,) = struct.unpack("<Q", raw)
            if size > _MAX_HEADER_BYTES:
                raise CheckpointError(f"{path} is not a .safetensors file (header size {size} bytes)")
            header = json.loads(f.read(size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the .safetensors header of {path}: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a .safetensors file (its header is not a table)")
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _unpickling_reason(e: Exception) -> str:
    # torch's message is a page long and suggests weights_only=False; keep the reason only.
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Please use", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _load_pickle(path: Path, mmap: bool) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError, AttributeError) as e:
        raise CheckpointError(
            f"{path} cannot be read with torch.load(weights_only=True) ({_unpickling_reason(e)}). "
            "This runtime never unpickles arbitrary Python objects: convert it to .safetensors "
            "(with a tool you trust) and pass that file instead"
        ) from e
    # Lightning/LDM checkpoints wrap the weights: {"state_dict": {...}, "global_step": ...}.
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file (.safetensors, or a weights-only pickle), on the CPU."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from e
    if suffix in PICKLE_SUFFIXES:
        obj = _load_pickle(path, mmap=False)
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(
        f"{path}: unknown checkpoint format {suffix!r}; accepted: "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
    )


def read_shapes(path: str | Path) -> Shapes:
    """Tensor names and shapes of a checkpoint file, reading as little as the format allows
    (the header of a .safetensors file; a memory-mapped weights-only load of a pickle)."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return read_safetensors_shapes(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        try:
            obj = _load_pickle(path, mmap=True)
        except CheckpointError as e:
            # Pre-1.6 (non-zip) pickles cannot be memory-mapped; read them fully instead.
            if "mmap" not in str(e):
                raise
            obj = _load_pickle(path, mmap=False)
        return {k: tuple(v.shape) for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return read_state_dict(path)  # raises the "unknown format" error


def read_folder_config(
    folder: str | Path, param: str, accepted: str, class_name: str | None = None
) -> dict[str, Any]:
    """The `config.json` of a model folder. ParameterError (naming `param`) when there is
    none or it describes another class; CheckpointError when it cannot be read."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise ParameterError(param, str(folder), f"{accepted}; no config.json at this path")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read {config_file}: {e}") from e
    if class_name is not None and config.get("_class_name") != class_name:
        raise ParameterError(param, str(folder), f"{accepted}; its config is a {config.get('_class_name')!r}")
    return config
