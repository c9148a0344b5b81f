"""One xa-bench run: a mode (latency, throughput, components) over the variants, the
baselines, FLOPs (analytic and counted) and efficiency, as one JSON-ready dict."""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .baselines import SDXLAlone, mapping_alone
from .components import compare_with_analytic, timed_components, workload_component_flops
from .report import device_info, git_commit, versions
from .runner import Workload, efficiency, peak_tflops, run_latency, spread_warnings, workload_dict
from .throughput import run_batches, run_concurrency

MODES = ("latency", "throughput", "components")
CONCURRENCY_NOTE = (
    "each thread runs its own pipeline object over its own module objects that share the weight tensors "
    "(the pipeline is not thread-safe: its branch hooks keep per-call state), with its own tokenizers and, on "
    "CUDA, its own stream; the per-stage timer synchronises the device at stage boundaries"
)


@dataclass
class SuiteOptions:
    mode: str = "latency"
    warmup: int = 1
    runs: int = 5
    batches: list[int] = field(default_factory=lambda: [1])
    concurrency: list[int] = field(default_factory=list)
    baselines: list[str] = field(default_factory=list)
    flops: bool = True


def run_suite(
    pipes: dict[str, Any], workload: Workload, options: SuiteOptions, *, models: str, dtype_name: str,
    command: str, progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Everything of one run. `pipes`: variant name -> XAdapterPipeline (first = reference)."""
    names = list(pipes)
    first = pipes[names[0]]
    device = torch.device(first.device)
    result: dict[str, Any] = {
        "benchmark": options.mode, "mode": options.mode,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "command": command,
        "git_commit": git_commit(), "models": models, "workload": workload_dict(workload),
        "device": device_info(device)["name"], "device_info": device_info(device), "dtype": dtype_name,
        "threads": torch.get_num_threads(), "versions": versions(),
        "options": dataclasses.asdict(options), "baselines": {},
    }
    if options.mode == "throughput":
        variants: dict[str, Any] = {n: {} for n in names}
        for name, r in run_batches(pipes, workload, options.batches, options.warmup, options.runs, progress).items():
            variants[name]["batches"] = r
        if options.concurrency:
            for name, r in run_concurrency(pipes, workload, options.concurrency, options.warmup, options.runs,
                                           progress).items():
                variants[name]["concurrency"] = r
            result["concurrency_note"] = CONCURRENCY_NOTE
        result["variants"] = variants
    else:
        runners = dict(pipes)
        if "sdxl-alone" in options.baselines:
            runners["sdxl-alone"] = SDXLAlone(first)  # interleaved with the variants
        observe = timed_components if options.mode == "components" else None
        runs = run_latency(runners, workload, options.warmup, options.runs, progress, observe=observe)
        result["variants"] = {n: runs[n] for n in names}
        if "sdxl-alone" in runs:
            base = runs["sdxl-alone"]
            base["xadapter_ratio"] = runs[names[0]]["total"]["median"] / base["total"]["median"]
            result["baselines"]["sdxl-alone"] = base
    if "mapping" in options.baselines:
        result["baselines"]["mapping"] = mapping_alone(first, workload.params(seed=0), options.warmup, options.runs)
    result["memory"] = _memory(device, result)
    result["efficiency"] = _efficiency(first, workload, result, options) if options.mode != "throughput" else None
    result["warnings"] = spread_warnings(result)
    return result


def _memory(device: torch.device, result: dict[str, Any]) -> dict[str, Any]:
    """The largest peak of all measured calls (each variant, batch, concurrency level, baseline)."""
    if device.type != "cuda":
        return {"peak_allocated_bytes": None, "reason": f"not measured on {device.type} (CUDA allocator statistics only)"}
    peaks: list[int] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            mem = node.get("memory")
            if isinstance(mem, dict) and mem.get("peak_allocated_bytes") is not None:
                peaks.append(mem["peak_allocated_bytes"])
            for value in node.values():
                walk(value)

    walk({"v": result["variants"], "b": result["baselines"]})
    return {"peak_allocated_bytes": max(peaks) if peaks else None,
            "reason": None if peaks else "no measured call", "device_total_bytes": result["device_info"].get("memory_bytes")}


def _efficiency(first: Any, workload: Workload, result: dict[str, Any], options: SuiteOptions) -> dict[str, Any]:
    """Analytic UNet + mapping FLOPs and stage TFLOP/s (runner.efficiency); with `flops`, the
    counter's FLOPs per component, checked against the analytic ones, and TFLOP/s per
    component in components mode. The peak is a large matmul measured now (CUDA only)."""
    device = torch.device(first.device)
    peak = peak_tflops(device, first.dtype) if device.type == "cuda" else None
    ref = result["variants"][next(iter(result["variants"]))]
    medians = {k: v["median"] for k, v in ref["stages"].items()}
    eff = efficiency(first, workload, medians, peak)
    if device.type != "cuda":
        eff["peak_reason"] = "peak measured on CUDA only"
    if not options.flops:
        return eff
    counted = workload_component_flops(first, workload)
    eff["counted"] = {"per_component": counted["per_component"], "per_call": counted["per_call"],
                      "total": counted["total"], "vs_analytic": compare_with_analytic(counted, eff["flops"])}
    if options.mode == "components":
        eff["components"] = {}
        for name, r in result["variants"].items():
            rows = {}
            for key, flops in counted["per_component"].items():
                seconds = r.get("parts", {}).get(key, {}).get("median")
                if flops and seconds:
                    tflops = flops / seconds / 1e12
                    rows[key] = {"flops": flops, "seconds": seconds, "tflops": tflops,
                                 "share_of_peak": tflops / peak if peak else None}
            eff["components"][name] = rows
    return eff
