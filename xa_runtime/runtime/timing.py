"""The one timing helper: seconds per named stage.

On CUDA a stage is bracketed by CUDA events on the current stream (no host
synchronisation between stages; the times are read once, when `seconds` is first asked
for); elsewhere by perf_counter. Event timing was CPU-untestable: GPU-untested-yet.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Accumulates seconds per stage name: `with timer.stage("stage1"): ...`."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._seconds: dict[str, float] = {}
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((name, start, end))
            return
        start_s = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start_s

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per stage so far (on CUDA this waits for the stages' last event)."""
        for name, start, end in self._pending:
            end.synchronize()
            self._seconds[name] = self._seconds.get(name, 0.0) + start.elapsed_time(end) / 1e3
        self._pending = []
        return self._seconds

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def time_callable(fn, device: torch.device | str, warmup: int = 10, iters: int = 100) -> list[float]:
    """Seconds per call of `fn()`, `iters` samples after `warmup` calls.

    CUDA: each sample is bracketed by CUDA events (no host sync inside the timed region);
    CPU: perf_counter around each call."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return samples
