"""Training checkpoints and the final adapter.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` with the mapping layers
(`adapter.safetensors`, the released key layout), the optimizer, learning-rate scheduler,
grad scaler and random-number states (`*.pt`, tensors and plain values only: read back with
`torch.load(weights_only=True)`) and `state.json` (step, data position, sample counts, the
fingerprint of the models and settings). It is written under a temporary name and renamed
into place, so a failed write never replaces the last good checkpoint; the oldest are
removed only after a new one is complete.

The final adapter is `x_adapter.safetensors` (and `x_adapter.bin`, a plain `torch.save`
state dict as the authors released, on request) beside `x_adapter.json` (widths, models,
settings, counts): what xa-generate --adapter, xa-serve and the ComfyUI pack load unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ParameterError
from ..models.mapping import MappingConfig, MappingLayers
from .options import MATH_FIELDS, TrainOptions

CHECKPOINTS = "checkpoints"
ADAPTER_NAME = "x_adapter"
STATE_FILE = "state.json"
FORMAT = "xa-train checkpoint 1"


def fingerprint(options: TrainOptions, config: MappingConfig, models: dict[str, Any], data: str) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint: the pair, the data and every
    setting that changes a step's arithmetic."""
    return {
        "mapping": {"in_channels": list(config.in_channels), "out_channels": list(config.out_channels),
                    "blocks_per_stage": config.blocks_per_stage},
        "models": models,
        "data": str(Path(data).resolve()) if Path(data).exists() else data,
        "settings": {k: getattr(options, k) for k in MATH_FIELDS},
    }


def _mapping_state(mapping: MappingLayers) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in mapping.state_dict().items()}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints under `output`, oldest first."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(output: Path, step: int, mapping: MappingLayers, optimizer: Any, lr_scheduler: Any,
                    scaler: Any, rng: dict[str, Any], state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep`. Returns its folder."""
    root = output / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        save_file(_mapping_state(mapping), tmp / "adapter.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"format": FORMAT, "step": step, **state}, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        if final.exists():  # the same step written again (a resumed run stopped at once): replace it whole
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(path: str) -> Path:
    """--resume: a checkpoint folder, or a training output folder (its newest checkpoint)."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    found = checkpoint_dirs(p) if p.is_dir() else []
    if not found:
        raise ParameterError("--resume", path, "a checkpoint folder (checkpoints/step-N) or an xa-train output folder "
                             "holding one; none found here")
    return found[-1]


def read_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ParameterError("--resume", str(folder), f"a readable checkpoint ({e})") from None
    if state.get("format") != FORMAT:
        raise ParameterError("--resume", str(folder), f"a checkpoint of format {FORMAT!r}; found {state.get('format')!r}")
    return state


def check_fingerprint(folder: Path, state: dict[str, Any], current: dict[str, Any]) -> None:
    """ParameterError naming --resume when the checkpoint was made for other models, data or settings."""
    saved = state.get("fingerprint", {})
    for key in ("mapping", "models", "data"):
        if saved.get(key) != current[key]:
            raise ParameterError("--resume", str(folder), f"a checkpoint of the same {key} as this run; it has "
                                 f"{saved.get(key)!r}, this run {current[key]!r}")
    for key, value in current["settings"].items():
        old = saved.get("settings", {}).get(key)
        if old != value:
            raise ParameterError("--resume", str(folder), f"a checkpoint made with the same settings; it has "
                                 f"--{key.replace('_', '-')} {old!r}, this run {value!r}")


def load_checkpoint(folder: Path, mapping: MappingLayers, optimizer: Any, lr_scheduler: Any, scaler: Any) -> dict:
    """Restore the mapping layers, optimizer, scheduler and scaler in place; returns the RNG states."""
    state = load_file(folder / "adapter.safetensors")
    with torch.no_grad():
        for name, value in mapping.state_dict().items():
            value.copy_(state[name])
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (folder / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(folder / "scaler.pt", map_location="cpu", weights_only=True))
    return torch.load(folder / "rng.pt", map_location="cpu", weights_only=True)


def write_adapter(output: Path, mapping: MappingLayers, record: dict[str, Any], save_bin: bool) -> list[Path]:
    """The final adapter (released key layout) and its JSON, each written atomically."""
    state = _mapping_state(mapping)
    targets = [output / f"{ADAPTER_NAME}.safetensors", output / f"{ADAPTER_NAME}.json"]
    writers = [lambda p: save_file(state, p), lambda p: p.write_text(json.dumps(record, indent=2) + "\n")]
    if save_bin:
        targets.append(output / f"{ADAPTER_NAME}.bin")
        writers.append(lambda p: torch.save(state, p))
    for target, write in zip(targets, writers):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=output)
        os.close(fd)
        try:
            write(Path(tmp))
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return targets
