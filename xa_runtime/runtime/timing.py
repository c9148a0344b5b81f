"""The one timing helper: seconds per named stage.

On CUDA a stage is bracketed by CUDA events on the current stream (no host
synchronisation between stages; the times are read once, when `seconds` is first asked
for); elsewhere by perf_counter.
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


def time_cuda_graph(fn, reps: int = 10, iters: int = 20, warmup: int = 3) -> list[float]:
    """Seconds of GPU time per call of `fn()`: `reps` calls captured into one CUDA graph,
    each of `iters` replays timed with events. Python and launch overhead are excluded, so
    set beside `time_callable` this says whether a region is bound by the host or the GPU.
    CUDA only; `fn` must be capturable (no host synchronisation, static shapes)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, cuBLAS/cuDNN plans) off the capture
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    del graph
    return [start.elapsed_time(end) / 1e3 / reps for start, end in events]


def now() -> float:
    """The host clock in seconds; benchmarks read wall time through here (tests fake `time`)."""
    return time.perf_counter()


class EventClock:
    """Time marks that never wait for the device: on CUDA a timing event recorded on the
    current stream, on CPU `now()`. Resolve marks with `seconds(start, end)` after
    `synchronize(device)` (CUDA events are only complete then)."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if not self.cuda:
            return now()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start
