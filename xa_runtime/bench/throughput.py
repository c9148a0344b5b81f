"""Throughput: images/s at several batch sizes, and with concurrent requests from threads.

The pipeline object is not thread-safe: its branch wrappers keep per-call state (captured
features, pending injections) and their hooks sit on the shared UNets, so two threads in
one pipeline, or in two pipelines over the same modules, would mix their features. Each
worker thread therefore gets its own pipeline over its own module objects that share the
weight tensors (no copy of the weights; see `weight_sharing_copy`), its own tokenizers and,
on CUDA, its own stream. The pipeline's per-stage timer synchronises the whole device at
stage boundaries, so threads overlap host work and kernels only within a stage.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import statistics
import threading
from contextlib import nullcontext
from typing import Any, Callable

import torch

from ..runtime import timing
from .runner import PeakMemory, Workload


def weight_sharing_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose submodules are new objects (own hooks, none copied; the
    owners of lazily installed hooks re-install theirs) but whose parameters and buffers
    are the same tensors."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    for m in module.modules():
        for key, value in vars(m).items():
            if "hooks" in key and isinstance(value, dict):
                memo[id(value)] = type(value)()
    clone = copy.deepcopy(module, memo)
    for m in clone.modules():  # transformers installs its output-capturing hooks lazily, once
        if vars(m).get("_output_capturing_hooks_installed"):
            m._output_capturing_hooks_installed = False
    return clone


def pipeline_replica(pipe: Any) -> Any:
    """A new pipeline of the same class and runtime over weight-sharing copies of the modules."""
    def share(c):
        fields = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
        for k, v in fields.items():
            if isinstance(v, torch.nn.Module):
                fields[k] = weight_sharing_copy(v)
            elif k.startswith("tokenizer"):
                fields[k] = copy.deepcopy(v)  # fast tokenizers refuse concurrent use ("Already borrowed")
        return type(c)(**fields)

    return type(pipe)(share(pipe.sd15), share(pipe.sdxl), weight_sharing_copy(pipe.mapping), device=pipe.device,
                      dtype=pipe.dtype, progress=False, runtime=pipe.runtime)


def _images_per_s(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("inf")


def run_batches(
    pipes: dict[str, Any], workload: Workload, batches: list[int], warmup: int, runs: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Per variant and batch size: seconds per request (wall clock around a synchronised
    generate), interleaved over variants, and images/s = batch / median seconds."""
    out: dict[str, Any] = {name: {} for name in pipes}
    for b in batches:
        w = dataclasses.replace(workload, batch=b)
        for pipe in pipes.values():
            for i in range(warmup):
                w.generate(pipe, seed=i)
        samples: dict[str, list[float]] = {name: [] for name in pipes}
        memory = {name: PeakMemory(torch.device(p.device)) for name, p in pipes.items()}
        for r in range(runs):
            for name, pipe in pipes.items():
                with memory[name].measure():
                    timing.synchronize(pipe.device)
                    start = timing.now()
                    w.generate(pipe, seed=1000 + r)
                    timing.synchronize(pipe.device)
                    samples[name].append(timing.now() - start)
        for name in pipes:
            med = statistics.median(samples[name])
            out[name][str(b)] = {"batch": b, "median_seconds": med, "images_per_s": _images_per_s(b, med),
                                 "raw_seconds": samples[name], "memory": memory[name].as_dict()}
        if progress:
            progress(f"batch {b} done")
    return out


def run_concurrency(
    pipes: dict[str, Any], workload: Workload, levels: list[int], warmup: int, runs: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Per variant and level c: c threads, each with its own pipeline replica, each sending
    `runs` requests of the workload's batch; images/s = all images / wall time from the
    common start to the last finish. Replicas are made once per variant (max level)."""
    out: dict[str, Any] = {}
    for name, pipe in pipes.items():
        replicas = [pipe] + [pipeline_replica(pipe) for _ in range(max(levels) - 1)]
        out[name] = {}
        for c in levels:
            out[name][str(c)] = _concurrent(replicas[:c], workload, warmup, runs)
            if progress:
                progress(f"{name}: concurrency {c} done")
    return out


def _concurrent(replicas: list[Any], workload: Workload, warmup: int, runs: int) -> dict[str, Any]:
    device = torch.device(replicas[0].device)
    barrier = threading.Barrier(len(replicas) + 1)
    latencies: list[list[float]] = [[] for _ in replicas]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if stream is None:
            torch.set_flush_denormal(True)  # per thread; as xa-bench sets it for the main thread on CPU
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                for i in range(warmup):
                    workload.generate(replicas[k], seed=i)
                barrier.wait()
                for r in range(runs):
                    start = timing.now()
                    workload.generate(replicas[k], seed=1000 + 100 * k + r)
                    timing.synchronize(device)
                    latencies[k].append(timing.now() - start)
        except BaseException as e:  # re-raised in the caller
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(len(replicas))]
    memory = PeakMemory(device)
    with memory.measure():
        for t in threads:
            t.start()
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        start = timing.now()
        for t in threads:
            t.join()
        wall = timing.now() - start
    if errors:
        raise errors[0]
    images = len(replicas) * runs * workload.batch
    flat = [x for row in latencies for x in row]
    return {"concurrency": len(replicas), "requests": len(replicas) * runs, "images": images, "wall_seconds": wall,
            "images_per_s": _images_per_s(images, wall), "request_seconds": statistics.median(flat),
            "raw_request_seconds": latencies, "memory": memory.as_dict()}

