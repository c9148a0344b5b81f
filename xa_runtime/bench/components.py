"""Per-component time and FLOPs of a generation, without touching the pipeline's algorithm.

Forward pre/post hooks on the modules (text encoders, SD1.5 UNet, mapping blocks, SDXL
UNet, VAE encoders/decoders) and wrappers around the scheduler step record a mark before
and after each call; the pipeline's own stage names (text_encoders, stage1, handover,
stage2, vae_decode) tag each interval. Marks are CUDA events on a GPU (no sync per call;
resolved after the run) or the host clock on CPU, or, for FLOPs, the running total of
torch's FLOP counter (so one counted run gives FLOPs per component per call).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..pipeline.schedulers import Sampler
from ..runtime import timing
from ..runtime.timing import EventClock, StageTimer

# The rows of the breakdown, in pipeline order; stage2/* split the stage-2 loop.
BREAKDOWN = (
    "text_encoders", "stage1", "handover", "stage2/sd15_unet", "stage2/mapping", "stage2/sdxl_unet",
    "stage2/scheduler", "stage2/other", "vae_decode",
)
STAGE2_PARTS = ("sd15_unet", "mapping", "sdxl_unet", "scheduler")

# torch's counter has no formula for the CPU flash-attention op that SDPA picks on CPU;
# it is the same attention, so count it like the GPU kernels.
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)


def component_modules(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    """(component, module) pairs of an XAdapterPipeline. The mapping is hooked per block and
    per zero_out conv, so the fused kernels' path (blocks only) is covered too."""
    m = pipe.mapping
    return [
        ("text_encoder", pipe.sd15.text_encoder), ("text_encoder", pipe.sdxl.text_encoder),
        ("text_encoder", pipe.sdxl.text_encoder_2), ("sd15_unet", pipe.sd15.unet), ("sdxl_unet", pipe.sdxl.unet),
        *[("mapping", b) for b in m.body], *[("mapping", z) for z in m.zero_out],
        ("sd15_vae_encode", pipe.sd15.vae.encoder), ("sd15_vae_decode", pipe.sd15.vae.decoder),
        ("sdxl_vae_encode", pipe.sdxl.vae.encoder), ("sdxl_vae_decode", pipe.sdxl.vae.decoder),
    ]


class ComponentRecorder:
    """Records (stage, component, start mark, end mark) for every hooked call while attached.

    `mark()` returns a token; `span(start, end)` turns two tokens into a number (seconds or
    FLOPs). Single-threaded: the stage is read from the pipeline's StageTimer."""

    def __init__(self, modules: list[tuple[str, torch.nn.Module]], mark: Callable[[], Any],
                 span: Callable[[Any, Any], float]):
        self.modules, self.mark, self.span = modules, mark, span
        self.stage: str | None = None
        self.intervals: list[tuple[str | None, str, Any, Any]] = []
        self._open: dict[int, list[Any]] = defaultdict(list)

    def _pre(self, name: str, module: torch.nn.Module, args: Any) -> None:
        self._open[id(module)].append(self.mark())

    def _post(self, name: str, module: torch.nn.Module, args: Any, output: Any) -> None:
        start = self._open[id(module)].pop()
        self.intervals.append((self.stage, name, start, self.mark()))

    def _timed(self, fn: Callable, name: str) -> Callable:
        recorder = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = recorder.mark()
            try:
                return fn(*args, **kwargs)
            finally:
                recorder.intervals.append((recorder.stage, name, start, recorder.mark()))

        return wrapper

    @contextmanager
    def attached(self) -> Iterator["ComponentRecorder"]:
        """Hooks on, StageTimer.stage and Sampler.step/scale_model_input wrapped (class level),
        all undone on exit."""
        handles, seen = [], set()
        for name, module in self.modules:
            if id(module) in seen:  # tiny models may share a module between branches
                continue
            seen.add(id(module))
            handles.append(module.register_forward_pre_hook(functools.partial(self._pre, name)))
            handles.append(module.register_forward_hook(functools.partial(self._post, name)))
        recorder, stage_cm = self, StageTimer.stage

        @contextmanager
        def stage(timer: StageTimer, name: str):
            outer, recorder.stage = recorder.stage, name
            try:
                with stage_cm(timer, name):
                    yield
            finally:
                recorder.stage = outer

        saved = {"step": Sampler.step, "scale_model_input": Sampler.scale_model_input}
        StageTimer.stage = stage  # type: ignore[method-assign]
        for attr, fn in saved.items():
            setattr(Sampler, attr, self._timed(fn, "scheduler"))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            StageTimer.stage = stage_cm  # type: ignore[method-assign]
            for attr, fn in saved.items():
                setattr(Sampler, attr, fn)

    def totals(self) -> tuple[dict[str, float], dict[str, int]]:
        """Sum and number of calls per "stage/component" (resolve CUDA marks after a sync)."""
        sums: dict[str, float] = defaultdict(float)
        calls: dict[str, int] = defaultdict(int)
        for stage, name, start, end in self.intervals:
            key = f"{stage}/{name}"
            sums[key] += self.span(start, end)
            calls[key] += 1
        return dict(sums), dict(calls)


def modules_of(runner: Any) -> Any:
    """The XAdapterPipeline whose modules a runner (pipeline or baseline) calls."""
    return getattr(runner, "pipe", runner)


@contextmanager
def timed_components(name: str, runner: Any) -> Iterator[Callable[[dict[str, float]], dict[str, float]]]:
    """An Observer for run_latency: times the components of one generation and yields
    finish(stage timings) -> the breakdown row (see `breakdown`) plus every "stage/component"."""
    pipe = modules_of(runner)
    clock = EventClock(pipe.device)
    recorder = ComponentRecorder(component_modules(pipe), clock.mark, clock.seconds)
    sums: dict[str, float] = {}

    def finish(stages: dict[str, float]) -> dict[str, float]:
        return {**sums, **breakdown(stages, sums)}

    with recorder.attached():
        yield finish
    timing.synchronize(pipe.device)
    sums.update(recorder.totals()[0])


def breakdown(stages: dict[str, float], parts: dict[str, float]) -> dict[str, float]:
    """The issue's rows for one run: stage times, stage 2 split into its hooked parts and the rest."""
    row = {k: stages[k] for k in ("text_encoders", "stage1", "handover", "vae_decode") if k in stages}
    if "stage2" in stages:
        split = {f"stage2/{p}": parts.get(f"stage2/{p}", 0.0) for p in STAGE2_PARTS}
        row.update(split)
        row["stage2/other"] = stages["stage2"] - sum(split.values())
    for k, v in stages.items():  # stages a baseline names differently (e.g. "denoise")
        if k not in row and k != "stage2":
            row[k] = v
    return row


def count_component_flops(pipe: Any, params: Any) -> dict[str, Any]:
    """One generation under torch's FLOP counter: FLOPs and calls per "stage/component".

    Run it on an eager pipeline (Triton kernels are invisible to the counter)."""
    with flop_counter() as counter:
        recorder = ComponentRecorder(component_modules(pipe), counter.get_total_flops, lambda a, b: b - a)
        with recorder.attached():
            pipe.generate(params)
        total = counter.get_total_flops()
    sums, calls = recorder.totals()
    return {"total": int(total), "per_component": {k: int(v) for k, v in sums.items()}, "calls": calls}


_COUNTED: dict[tuple, dict[str, Any]] = {}


def workload_component_flops(pipe: Any, workload: Any) -> dict[str, Any]:
    """FLOPs per "stage/component" of one generation of `workload`, from torch's counter.

    Counted once per (modules, shapes) on a 2-step run of an eager pipeline over the same
    modules, then scaled by the workload's step counts (a UNet call costs the same at every
    step); also FLOPs per call, and the calls of the counted run."""
    from dataclasses import replace

    from ..pipeline.params import validate

    p = validate(workload.params(seed=0), pipe.size_rules)
    key = (id(pipe.sd15.unet), id(pipe.sdxl.unet), id(pipe.mapping), pipe.dtype, p.num_images_per_prompt,
           p.guidance_scale > 1.0, p.height, p.width, p.height_sd15, p.width_sd15)
    if key not in _COUNTED:
        eager = type(pipe)(pipe.sd15, pipe.sdxl, pipe.mapping, device=pipe.device, dtype=pipe.dtype, progress=False)
        try:
            counted = count_component_flops(eager, replace(workload, steps=2, adapter_guidance_start=1.0).params(seed=0))
        finally:
            eager.sd15_branch.remove_hooks()
            eager.sdxl_branch.remove_hooks()
        _COUNTED[key] = counted
    counted = _COUNTED[key]
    scale = {"stage1": p.num_inference_steps, "stage2": p.stage2_steps}
    per_component = {k: v * scale[k.split("/")[0]] // 2 if k.split("/")[0] in scale else v
                     for k, v in counted["per_component"].items()}
    per_call = {k: v // counted["calls"][k] for k, v in counted["per_component"].items() if counted["calls"][k]}
    return {"per_component": per_component, "per_call": per_call, "counted_run": counted,
            "total": sum(per_component.values())}


def compare_with_analytic(counted: dict[str, Any], analytic: dict[str, int]) -> dict[str, Any]:
    """Counter (this run's modules) against flops.py (the configs on the meta device), per forward;
    the mapping per stage-2 step (its blocks are hooked one by one)."""
    per_call, run = counted["per_call"], counted["counted_run"]
    mapping_per_step = run["per_component"].get("stage2/mapping", 0) // max(1, run["calls"].get("stage2/sdxl_unet", 1))
    pairs = {"sd15_unet": per_call.get("stage1/sd15_unet"), "sdxl_unet": per_call.get("stage2/sdxl_unet"),
             "mapping": mapping_per_step}
    return {k: {"counted": c, "analytic": analytic[k],
                "rel_diff": (abs(c - analytic[k]) / analytic[k]) if c is not None and analytic[k] else None}
            for k, c in pairs.items()}
