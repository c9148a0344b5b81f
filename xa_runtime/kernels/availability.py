"""Whether Triton can run here, and the one place every kernel launch goes through.

Triton is optional: without it (or on a CPU without TRITON_INTERPRET=1) every kernel's
dispatch function runs its plain-torch reference. `launch` is how the launchers start a
kernel; `recording_launches` lets build tooling (benchmarks/kernels_aot.py) see each launch
with its arguments instead of running it, and makes the launchers take their GPU path.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

try:  # triton is optional: on CPU without the interpreter the references run
    import triton
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

Recorder = Callable[[Any, Any, tuple, dict], None]  # (kernel, grid, args, meta)
_recorder: Recorder | None = None


def interpreted() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1); False
    while launches are being recorded (the launchers then take their GPU path)."""
    if _recorder is not None:
        return False
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device | str) -> bool:
    """Whether Triton kernels can run for tensors on `device`."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or interpreted()


def launch(kernel: Any, grid: Any, *args: Any, **meta: Any) -> None:
    """kernel[grid](*args, **meta), or, inside `recording_launches`, hand it to the recorder."""
    if _recorder is not None:
        _recorder(kernel, grid, args, meta)
        return
    kernel[grid](*args, **meta)


@contextmanager
def recording_launches(recorder: Recorder) -> Iterator[None]:
    """Within: every `launch` calls `recorder(kernel, grid, args, meta)` instead of running
    the kernel, and `interpreted()` is False, so launchers size their grids and tiles for
    a GPU. Nothing runs on the tensors; their shapes, dtypes and strides are what counts."""
    global _recorder
    if triton is None:
        raise RuntimeError("triton is not installed")
    saved, _recorder = _recorder, recorder
    try:
        yield
    finally:
        _recorder = saved
