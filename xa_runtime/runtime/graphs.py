"""CUDA graph capture and replay of one branch step, with static input/output buffers.

A step is a function of a pytree of arguments (tensors and constants). Its tensors are
copied into static input buffers before each replay; its constants (adapter condition
scale, fusion scale, the structure of plugin kwargs, ...) are baked into the graph and
part of the cache key with every input's shape, dtype and layout, so a change of any of
them captures a new graph. CUDA only (`RuntimeConfig.check_device` refuses cuda_graphs
elsewhere; tests/test_runtime_fake_cuda.py runs it on the CPU against a stand-in torch.cuda
whose "graphs" record and replay aten ops).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch
from torch.utils import _pytree as pytree

WARMUP_CALLS = 2  # eager calls on a side stream before capture (cuBLAS/cuDNN/Triton/compile warm-up)


def _tensor_key(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, t.device, t.stride())


def _constant_key(value: Any) -> Hashable:
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def graph_key(name: str, args: tuple, extra: Hashable = ()) -> tuple[Hashable, list[Any], Any]:
    """(key, flat leaves, treespec) of a call `name(*args)`."""
    leaves, spec = pytree.tree_flatten(args)
    parts = tuple(_tensor_key(v) if isinstance(v, torch.Tensor) else ("const", _constant_key(v)) for v in leaves)
    return (name, str(spec), parts, extra), leaves, spec


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    static_inputs: list[torch.Tensor | None]  # None where the leaf is a constant
    outputs: Any  # pytree of static output tensors, rewritten by each replay

    def replay(self, leaves: list[Any]) -> Any:
        for static, value in zip(self.static_inputs, leaves):
            if static is not None and value is not static:
                static.copy_(value)  # on the current stream, ordered before the replay
        self.graph.replay()
        return self.outputs


class GraphCache:
    """Captured steps keyed by graph_key; least recently used dropped beyond `max_graphs`.

    `run(name, fn, args)` replays (capturing first when the key is new) on the current
    stream and returns the static outputs: valid until the next replay of the same graph,
    so consume or copy them on the same stream before that. `captures` counts captures,
    `capture_seconds` their time (warm-up included).
    """

    def __init__(self, max_graphs: int = 8):
        self.max_graphs = max_graphs
        self._steps: OrderedDict[Hashable, CapturedStep] = OrderedDict()
        self.captures = 0
        self.capture_seconds = 0.0

    def __len__(self) -> int:
        return len(self._steps)

    def clear(self) -> None:
        """Drop every graph and its memory pool (the next call of each step recaptures)."""
        self._steps.clear()

    def run(self, name: str, fn: Callable[..., Any], args: tuple, extra: Hashable = ()) -> Any:
        key, leaves, spec = graph_key(name, args, extra)
        step = self._steps.get(key)
        if step is None:
            step = self._capture(fn, leaves, spec)
            self._steps[key] = step
            while len(self._steps) > self.max_graphs:
                self._steps.popitem(last=False)
        else:
            self._steps.move_to_end(key)
        return step.replay(leaves)

    def _capture(self, fn: Callable[..., Any], leaves: list[Any], spec: Any) -> CapturedStep:
        start = time.perf_counter()
        current = torch.cuda.current_stream()
        with torch.cuda.stream(current):  # static inputs belong to the stream that replays
            static = [v.clone(memory_format=torch.preserve_format) if isinstance(v, torch.Tensor) else None for v in leaves]
        args = pytree.tree_unflatten([s if s is not None else v for s, v in zip(static, leaves)], spec)

        # Warm-up on a side stream, as torch.cuda.graphs' docs require before capture.
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                fn(*args)
        current.wait_stream(side)

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # its own capture stream; one memory pool per graph
            outputs = fn(*args)
        self.captures += 1
        self.capture_seconds += time.perf_counter() - start
        return CapturedStep(graph, static, outputs)
