"""The stage-2 step scheduler: SD1.5 step i+1 overlaps mapping + SDXL step i.

In stage 2 the SD1.5 chain never reads from SDXL, and SDXL step i needs only SD1.5 step
i's decoder features. With streams on a CUDA device the SD1.5 steps (UNet, plugins, its
sampler) run on one stream and mapping + SDXL steps on another; events hand f0..f2 over
through a ring of 2 preallocated feature buffers, so the caching allocator never reuses
a feature's memory while the other stream still reads it. The host enqueues exactly the
sequential order (so CPU generators are drawn in the same order) and never synchronises
inside the loop: progress is read from events. Anywhere else it is the plain loop.
tests/test_runtime_fake_cuda.py checks the two-stream path against a stand-in torch.cuda
(same result; a vector-clock race check finds every cross-stream access ordered by events).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

SD15Step = Callable[[int, torch.Tensor], Sequence[torch.Tensor]]  # (i, t) -> (f0, f1, f2)
SDXLStep = Callable[[int, torch.Tensor, Sequence[torch.Tensor]], None]  # (i, t, features) -> None
StepDone = Callable[[int], None]  # called with i once step i (both branches) is done

RING_DEPTH = 2  # SD1.5 is at most one step ahead of the SDXL step still reading its slot


class FeatureRing:
    """RING_DEPTH slots of (f0, f1, f2) buffers, reallocated only when shapes change."""

    def __init__(self) -> None:
        self._slots: list[list[torch.Tensor] | None] = [None] * RING_DEPTH

    def fill(self, slot: int, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        bufs = self._slots[slot]
        if bufs is None or [(b.shape, b.dtype) for b in bufs] != [(f.shape, f.dtype) for f in features]:
            bufs = [torch.empty_like(f, memory_format=torch.preserve_format) for f in features]
            self._slots[slot] = bufs
        for b, f in zip(bufs, features):
            b.copy_(f)
        return bufs

    def clear(self) -> None:
        self._slots = [None] * RING_DEPTH


class Stage2Scheduler:
    """Runs stage 2's steps; `overlap` (two CUDA streams) when `streams` and `device` is CUDA.

    run(timesteps, sd15_step, sdxl_step, step_done): sd15_step(i, t) does SD1.5's UNet and
    sampler step and returns its features; sdxl_step(i, t, feats) does mapping, SDXL and
    its sampler step. step_done(i) is called in order: sequentially right after step i; with
    overlap when step i's completion event is seen (event.query(), never blocking), and for
    the rest after the loop. The caller's current stream waits for both streams at the end.
    """

    def __init__(self, device: torch.device | str, streams: bool):
        self.device = torch.device(device)
        self.overlap = streams and self.device.type == "cuda"
        if self.overlap:
            self.sd15_stream = torch.cuda.Stream(self.device)
            self.sdxl_stream = torch.cuda.Stream(self.device)
            self.ring = FeatureRing()

    def run(self, timesteps: Sequence[torch.Tensor], sd15_step: SD15Step, sdxl_step: SDXLStep,
            step_done: StepDone | None = None) -> None:
        if not self.overlap:
            for i, t in enumerate(timesteps):
                sdxl_step(i, t, sd15_step(i, t))
                if step_done:
                    step_done(i)
            return
        self._run_overlapped(timesteps, sd15_step, sdxl_step, step_done)

    def _run_overlapped(self, timesteps: Sequence[torch.Tensor], sd15_step: SD15Step, sdxl_step: SDXLStep,
                        step_done: StepDone | None) -> None:
        a, b = self.sd15_stream, self.sdxl_stream
        current = torch.cuda.current_stream(self.device)
        # Everything made before stage 2 (latents, embeddings, plugin state) is on `current`.
        a.wait_stream(current)
        b.wait_stream(current)
        ready = [torch.cuda.Event() for _ in range(RING_DEPTH)]  # slot filled (on a)
        free = [torch.cuda.Event() for _ in range(RING_DEPTH)]  # slot read (on b)
        done: list[torch.cuda.Event] = []
        reported = 0
        for i, t in enumerate(timesteps):
            slot = i % RING_DEPTH
            with torch.cuda.stream(a):
                if i >= RING_DEPTH:
                    a.wait_event(free[slot])  # recorded by SDXL step i - RING_DEPTH
                feats = self.ring.fill(slot, sd15_step(i, t))
                ready[slot].record(a)
            with torch.cuda.stream(b):
                b.wait_event(ready[slot])
                sdxl_step(i, t, feats)
                free[slot].record(b)
                done.append(torch.cuda.Event())
                done[-1].record(b)
            del feats
            while step_done and reported < len(done) and done[reported].query():
                step_done(reported)
                reported += 1
        # Tensors made on a or b and used later (the final latents) are freed on the host
        # after this; their blocks are only reused by a or b after the next run's
        # wait_stream(current), which orders that reuse after everything queued here.
        current.wait_stream(a)
        current.wait_stream(b)
        while step_done and reported < len(done):
            done[reported].synchronize()  # after the loop: the GPU has all the work already
            step_done(reported)
            reported += 1
