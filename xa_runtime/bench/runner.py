"""Latency runs of the pipeline in several variants, interleaved, with per-stage medians,
FLOP-based efficiency and the device's measured peak (a large matmul in the same run)."""

from __future__ import annotations

import math
import statistics
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ContextManager, Iterator

import torch

from ..pipeline import GenerationParams, XAdapterPipeline
from ..runtime import MIXED_LAYOUT, RuntimeConfig
from ..runtime.timing import synchronize, time_callable
from .flops import workload_flops

# Variants that exist now; the others are named so that asking for them says where they come from.
VARIANTS: dict[str, RuntimeConfig] = {
    "eager": RuntimeConfig(),
    "kernels": RuntimeConfig(triton_kernels=True),
    "mixed-layout": RuntimeConfig(channels_last=MIXED_LAYOUT),  # SD1.5 UNet + mapping channels-last, SDXL NCHW
    "compiled": RuntimeConfig(compile=True, channels_last=True, fuse_qkv=True),
    "graphs": RuntimeConfig(cuda_graphs=True),
    "streams": RuntimeConfig(streams=True),
    "lean": RuntimeConfig(compile=True, channels_last=True, fuse_qkv=True, cuda_graphs=True, streams=True, triton_kernels=True),
    "onnxruntime": RuntimeConfig(),  # the UNets and mapping layers on onnxruntime (exported at build time)
    "tensorrt": RuntimeConfig(),  # ... on TensorRT engines (exported, then built at build time)
}
BACKEND_VARIANTS = {"onnxruntime", "tensorrt"}  # variants that move the branches onto another backend
PLANNED: dict[str, str] = {}  # variant -> what it waits for (none now)


@dataclass(frozen=True)
class Workload:
    """The standard workload of xadapter.md by default (sizes None: the models' defaults)."""

    steps: int = 30
    adapter_guidance_start: float = 0.9
    guidance_scale: float = 7.5
    batch: int = 1
    height: int | None = None
    width: int | None = None
    height_sd15: int | None = None
    width_sd15: int | None = None
    scheduler: str = "dpmpp-2m"
    plugins: tuple[str, ...] = ()  # names of the plugins on (recorded); their objects below
    plugin_objects: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    def generate(self, pipe: Any, seed: int) -> Any:
        """One request of this workload on `pipe` (with the workload's plugins, if any)."""
        if self.plugin_objects:
            return pipe.generate(self.params(seed), plugins=list(self.plugin_objects))
        return pipe.generate(self.params(seed))

    def params(self, seed: int) -> GenerationParams:
        return GenerationParams(
            prompt="a photo of a cat", num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
            adapter_guidance_start=self.adapter_guidance_start, num_images_per_prompt=self.batch, height=self.height,
            width=self.width, height_sd15=self.height_sd15, width_sd15=self.width_sd15, scheduler=self.scheduler,
            seed=seed, output_type="np",  # the whole job, VAE decode included
        )


P99_MIN_SAMPLES = 100  # a p99 of fewer samples is just the maximum: reported from this many on
SPREAD_WARN_CV = 0.10  # run-to-run coefficient of variation above which xa-bench warns


def summarize(samples: list[float]) -> dict[str, float]:
    """median, p90, min, max, mean, cv (coefficient of variation: stdev / mean, 0 for one
    sample) and n of seconds; p99 too from P99_MIN_SAMPLES samples on (nearest-rank percentiles)."""
    s = sorted(samples)

    def pct(q: float) -> float:  # nearest rank: the ceil(q * n)-th smallest
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s) - 1e-9) - 1))]

    mean = statistics.fmean(s)
    out = {"median": statistics.median(s), "p90": pct(0.9), "min": s[0], "max": s[-1], "mean": mean,
           "cv": statistics.stdev(s) / mean if len(s) > 1 and mean > 0 else 0.0, "n": len(s)}
    if len(s) >= P99_MIN_SAMPLES:
        out["p99"] = pct(0.99)
    return out


def spread_warnings(result: dict[str, Any], threshold: float = SPREAD_WARN_CV) -> list[str]:
    """One line per measurement whose run-to-run spread (CV of its raw seconds) exceeds
    `threshold`, saying what to do about it."""
    series: list[tuple[str, list[float]]] = []
    for name, r in result.get("variants", {}).items():
        if "raw_seconds" in r:
            series.append((name, r["raw_seconds"]))
        for key in ("batches", "concurrency"):
            for level, v in r.get(key, {}).items():
                raw = v.get("raw_seconds") or [x for row in v.get("raw_request_seconds", []) for x in row]
                series.append((f"{name} {key[:-2] if key == 'batches' else key} {level}", raw))
    for name, b in result.get("baselines", {}).items():
        if "raw_seconds" in b:
            series.append((name, b["raw_seconds"]))
    lines = []
    for name, raw in series:
        if len(raw) < 2:
            continue
        cv = summarize(raw)["cv"]
        if cv > threshold:
            lines.append(
                f"{name}: run-to-run spread {cv:.0%} (coefficient of variation > {threshold:.0%}; {len(raw)} runs, "
                f"{min(raw):.3g}-{max(raw):.3g} s): the timings are not trustworthy. Something else is using the "
                f"machine or the threads oversubscribe it: rerun on an idle machine, with fewer threads (--threads 1 "
                f"on a busy CPU), and more --runs; compare medians only")
    return lines


def peak_tflops(device: torch.device, dtype: torch.dtype, n: int = 4096, iters: int = 20) -> float:
    """Dense matmul throughput measured now on this device (TFLOP/s)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    seconds = statistics.median(time_callable(lambda: a @ a, device, warmup=3, iters=iters))
    return 2 * n**3 / seconds / 1e12


class PeakMemory:
    """Peak device memory of the calls made inside `with memory.measure():` (bytes, max over
    all of them). CUDA: torch.cuda.max_memory_allocated; elsewhere None, with a reason."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None
        self.reason = None if device.type == "cuda" else f"not measured on {device.type} (CUDA allocator statistics only)"

    @contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type != "cuda":
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        self.bytes = max(self.bytes or 0, torch.cuda.max_memory_allocated(self.device))

    def as_dict(self) -> dict[str, Any]:
        return {"peak_allocated_bytes": self.bytes, "reason": self.reason}


# observe(name, pipe) wraps one timed run and yields finish(stage timings) -> {part: seconds},
# called after the wrapper has exited (CUDA events are resolved there).
Observer = Callable[[str, Any], ContextManager[Callable[[dict[str, float]], dict[str, float]]]]


def run_latency(
    pipes: dict[str, Any], workload: Workload, warmup: int, runs: int,
    progress: Callable[[str], None] | None = None, observe: Observer | None = None,
) -> dict[str, Any]:
    """Warm-up each variant, then `runs` rounds visiting the variants in turn (so drift
    hits all alike). Returns per-variant totals and per-stage summaries, and ratios to the
    first variant. A "pipe" is anything with `.device` and `.generate(params)` returning
    per-stage `.timings` (baselines too). `observe` (see Observer) adds per-run numbers such
    as component times, summarised under "parts". Peak memory per variant on CUDA."""
    names = list(pipes)
    for name in names:
        for i in range(warmup):
            workload.generate(pipes[name], seed=i)
    totals: dict[str, list[float]] = {n: [] for n in names}
    stages: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    parts: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    memory = {n: PeakMemory(torch.device(pipes[n].device)) for n in names}
    for r in range(runs):
        for name in names:
            with memory[name].measure(), (observe(name, pipes[name]) if observe else nullcontext(None)) as finish:
                out = workload.generate(pipes[name], seed=1000 + r)
                synchronize(pipes[name].device)
            totals[name].append(sum(out.timings.values()))
            for stage, sec in out.timings.items():
                stages[name].setdefault(stage, []).append(sec)
            for key, value in (finish(out.timings) if finish else {}).items():
                parts[name].setdefault(key, []).append(value)
        if progress:
            progress(f"round {r + 1}/{runs}")
    first = statistics.median(totals[names[0]])
    result = {}
    for name in names:
        med = statistics.median(totals[name])
        result[name] = {
            "total": summarize(totals[name]),
            "stages": {k: summarize(v) for k, v in stages[name].items()},
            "ratio_to_first": med / first,
            "raw_seconds": totals[name],
            "raw_stage_seconds": stages[name],
            "memory": memory[name].as_dict(),
        }
        if parts[name]:
            result[name]["parts"] = {k: summarize(v) for k, v in parts[name].items()}
            result[name]["raw_part_seconds"] = parts[name]
    return result


def efficiency(pipe: XAdapterPipeline, workload: Workload, seconds: dict[str, float], peak: float | None) -> dict[str, Any]:
    """Model FLOPs of the workload and achieved TFLOP/s per stage (and share of `peak`)."""
    p = workload.params(seed=0)
    from ..pipeline.params import validate

    p = validate(p, pipe.size_rules)
    f15 = 2 ** (len(pipe.sd15.vae.config.block_out_channels) - 1)
    fxl = 2 ** (len(pipe.sdxl.vae.config.block_out_channels) - 1)
    flops = workload_flops(
        pipe.sd15.unet.config, pipe.sdxl.unet.config, batch=workload.batch, cfg=workload.guidance_scale > 1,
        steps=workload.steps, stage2_steps=p.stage2_steps,
        sd15_latent=(p.height_sd15 // f15, p.width_sd15 // f15), sdxl_latent=(p.height // fxl, p.width // fxl),
    )
    out: dict[str, Any] = {"flops": flops.as_dict(), "peak_tflops": peak}
    for stage, count in (("stage1", flops.stage1), ("stage2", flops.stage2)):
        if stage in seconds and seconds[stage] > 0:
            achieved = count / seconds[stage] / 1e12
            out[f"{stage}_tflops"] = achieved
            out[f"{stage}_share_of_peak"] = achieved / peak if peak else None
    return out


def workload_dict(w: Workload) -> dict[str, Any]:
    """The workload's settings for the JSON (not the plugin objects: asdict would copy them)."""
    out = {f.name: getattr(w, f.name) for f in fields(w) if f.name != "plugin_objects"}
    out["plugins"] = list(w.plugins)
    return out
