"""Reading checkpoint files: .safetensors headers and tensors, and pickles only through
`torch.load(weights_only=True)`.

Pickled checkpoints (.ckpt, .bin, .pt, .pth) can execute code when unpickled; this
runtime never unpickles anything but tensors and plain containers, and says so when a
file needs more.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import stat
import struct
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import CheckpointError, ParameterError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # real headers are a few MB; more means not a safetensors file

Shapes = dict[str, tuple[int, ...]]

_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def non_regular_kind(path: str | os.PathLike) -> str | None:
    """What `path` is when it is not a regular file (links followed): "a FIFO (named pipe)",
    "a character device", ...; None for a regular file or nothing at all. Opening a FIFO
    blocks until a writer comes, so every checkpoint reader asks this first."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")


def check_regular_file(path: str | os.PathLike) -> None:
    """CheckpointError unless `path` is a regular file (or absent: opening it then says so)."""
    kind = non_regular_kind(path)
    if kind is not None:
        raise CheckpointError(f"{path} is not a regular file (it is {kind})")


def _header_shapes(path: Path, header: dict[str, Any]) -> Shapes:
    shapes: Shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise CheckpointError(
                f"{path} is not a valid .safetensors file: its header entry {name!r} is not a table with a "
                f"'shape' list of sizes (found {json.dumps(entry)[:80]})"
            )
        shapes[name] = tuple(shape)
    return shapes


def read_safetensors_shapes(path: str | Path) -> Shapes:
    """Tensor names and shapes from a .safetensors header, without reading any weights."""
    path = Path(path)
    check_regular_file(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path} is too short to be a .safetensors file")
            (size,) = struct.unpack("<Q", raw)
            if size > _MAX_HEADER_BYTES:
                raise CheckpointError(f"{path} is not a .safetensors file (header size {size} bytes)")
            header = json.loads(f.read(size))
    except RecursionError:
        raise CheckpointError(f"{path} is not a .safetensors file (its header nests too deeply)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the .safetensors header of {path}: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a .safetensors file (its header is not a table)")
    return _header_shapes(path, header)


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str, what: str = "tensor") -> None:
    """CheckpointError naming `source` and the first floating tensor that holds NaN or inf:
    a model file with such weights is refused when it loads, not found as NaN or black
    images after a whole generation. One pass over the weights (isfinite, no copy)."""
    for key, value in tensors:
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: {what} {key} holds NaN or infinite values")


def _unpickling_reason(e: Exception) -> str:
    # torch's message is a page long and suggests weights_only=False; keep the reason only.
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Please use", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _load_pickle(path: Path, mmap: bool) -> dict[str, Any]:
    check_regular_file(path)
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
    odd = [k for k in obj if not isinstance(k, str)]
    if odd:
        raise CheckpointError(f"{path} is not a state dict: its keys must be tensor names (strings); "
                              f"found {len(odd)} others, e.g. {odd[:3]!r}")
    return obj


def check_weights_only(path: str | os.PathLike) -> None:
    """CheckpointError (one line, naming the file) unless the pickle at `path` reads with
    torch.load(weights_only=True); memory-mapped where the format allows."""
    path = Path(path)
    with warnings.catch_warnings():  # torch's note on the pickle protocol says nothing about the refusal
        warnings.simplefilter("ignore", UserWarning)
        try:
            _load_pickle(path, mmap=True)
        except CheckpointError as e:
            if "mmap" not in str(e):
                raise
            _load_pickle(path, mmap=False)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file (.safetensors, or a weights-only pickle), on the CPU."""
    path = Path(path)
    check_regular_file(path)
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


# What a diffusers model config (UNet, VAE, ControlNet, T2I-Adapter) can hold for a model
# that runs: each key's ints (or each int of its list) within these bounds, every number
# finite. The real SD1.5 / SDXL values are far inside (layers_per_block 2, sample_size 64 /
# 128 / 1024, widths <= 1280, transformer_layers_per_block up to 10); a config beyond them
# would allocate gigabytes before failing, or put inf into the default image size.
MODEL_CONFIG_BOUNDS: dict[str, tuple[int, int]] = {
    "layers_per_block": (1, 16), "num_res_blocks": (1, 16), "transformer_layers_per_block": (1, 64),
    "sample_size": (1, 4096), "in_channels": (1, 64), "out_channels": (1, 64), "conditioning_channels": (1, 64),
    "latent_channels": (1, 64), "block_out_channels": (1, 8192), "channels": (1, 8192),
    "cross_attention_dim": (1, 8192), "attention_head_dim": (1, 8192), "num_attention_heads": (1, 1024),
    "norm_num_groups": (1, 1024), "addition_time_embed_dim": (1, 8192),
    "projection_class_embeddings_input_dim": (1, 65536), "downscale_factor": (1, 64),
    # the CLIP text encoders' (transformers) configs: CLIP-L and OpenCLIP-bigG are far inside
    "num_hidden_layers": (1, 128), "hidden_size": (1, 16384), "intermediate_size": (1, 65536),
    "max_position_embeddings": (1, 4096), "vocab_size": (1, 1_048_576), "projection_dim": (1, 16384),
}
_MAX_CONFIG_LIST = 16  # stages of a UNet: 3 (SDXL) or 4 (SD1.5)


def check_config_values(config: dict[str, Any], path: str | os.PathLike) -> None:
    """CheckpointError naming the file and the key when a number in `config` is not finite
    (JSON's 1e400 reads as inf) or a MODEL_CONFIG_BOUNDS key is not an int in its bounds."""
    stack: list[tuple[str, Any]] = [(k, v) for k, v in config.items()]
    while stack:  # iterative: a config may nest as deep as json.loads allowed
        key, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(f"{path}: config key {key!r} is {value}; accepted: a finite number")
        if isinstance(value, dict):
            stack.extend((f"{key}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{key}[{i}]", v) for i, v in enumerate(value))
    for key, (lo, hi) in MODEL_CONFIG_BOUNDS.items():
        value = config.get(key)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        ok = 1 <= len(values) <= _MAX_CONFIG_LIST and all(
            isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in values)
        if not ok:
            shown = json.dumps(value)
            raise CheckpointError(f"{path}: config key {key!r} is {shown[:80]}{'...' if len(shown) > 80 else ''}; "
                                  f"accepted: an integer in {lo}..{hi} (or a list of 1..{_MAX_CONFIG_LIST} of them)")


def read_json_config(path: str | os.PathLike) -> dict[str, Any]:
    """A model's JSON config file as a dict, its values checked (check_config_values);
    CheckpointError naming the file for anything else (unreadable, not JSON, nested too deep
    for the parser, not an object)."""
    check_regular_file(path)
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read(_MAX_HEADER_BYTES + 1).decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"cannot read {path}: its JSON nests too deeply to be a model config") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a model config: a JSON object, found a {type(config).__name__}")
    check_config_values(config, path)
    return config


def read_folder_config(
    folder: str | Path, param: str, accepted: str, class_name: str | None = None
) -> dict[str, Any]:
    """The `config.json` of a model folder. ParameterError (naming `param`) when there is
    none or it describes another class; CheckpointError when it cannot be read."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise ParameterError(param, str(folder), f"{accepted}; no config.json at this path")
    config = read_json_config(config_file)
    if class_name is not None and config.get("_class_name") != class_name:
        raise ParameterError(param, str(folder), f"{accepted}; its config is a {config.get('_class_name')!r}")
    return config
