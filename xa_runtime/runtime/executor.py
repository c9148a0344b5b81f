"""Runs a branch step (a function of tensors and constants) eagerly, compiled, and/or as a
replayed CUDA graph, as the RuntimeConfig asks. The pipeline names its steps and passes
them here; it never sees torch.compile or CUDA graphs. Also the model-level switches
(channels-last, fused QKV) and the fingerprint that tells when captured graphs are stale.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Hashable, Iterable, Mapping

import torch
from torch import nn

from .config import RuntimeConfig
from .graphs import GraphCache, graph_key
from .timing import synchronize

# dynamo keeps one compiled entry per shape (and per baked constant) of each step; the
# default limit of 8 would silently fall back to eager after a few request sizes.
RECOMPILE_LIMIT = 64


def model_fingerprint(modules: Iterable[nn.Module]) -> Hashable:
    """What a captured graph bakes in besides its inputs: which modules run (ids, types),
    their hooks (unfused LoRA), attention processors and their scales (IP-Adapter), where
    the weights live (a LoRA fused by copy_ keeps it: graphs read the new values anyway),
    and the scales of hook owners that expose `scales` (xa_runtime's LoraManager)."""
    parts: list[Any] = []
    for root in modules:
        for name, m in root.named_modules():
            hooks = []
            for hook in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values()):
                owner = getattr(hook, "__self__", None)
                scales = getattr(owner, "scales", None) if owner is not None else None
                hooks.append((id(hook) if owner is None else id(owner), repr(scales)))
            processor = getattr(m, "processor", None)
            proc = (type(processor).__name__, id(processor), repr(getattr(processor, "scale", None))) if processor else None
            parts.append((name, id(m), type(m).__name__, tuple(hooks), proc))
        parts.append(tuple(p.data_ptr() for p in root.parameters()))
        parts.append(tuple(b.data_ptr() for b in root.buffers()))
    return hash(tuple(parts))


def prepare_models(config: RuntimeConfig, parts: Mapping[str, nn.Module]) -> None:
    """Apply the config's model-level changes in place: channels-last (the parts that
    `config.channels_last` names, keys of CHANNELS_LAST_PARTS), diffusers'
    fuse_qkv_projections (the UNets). Shared modules change for every user."""
    if config.fuse_qkv:
        for name in ("sd15_unet", "sdxl_unet"):
            unet = parts[name]
            if not hasattr(unet, "fuse_qkv_projections"):
                raise ValueError(f"fuse_qkv: {type(unet).__name__} has no fuse_qkv_projections()")
            unet.fuse_qkv_projections()
    for name in config.channels_last_parts():
        parts[name].to(memory_format=torch.channels_last)


class StepExecutor:
    """One per pipeline. `run(name, fn, args)` returns fn(*args) (a pytree of tensors).

    compile: `fn` is wrapped once by torch.compile (dynamic=False: one specialisation per
    shape); the first call of each new (shapes, constants) key is timed and added to
    `compile_seconds`. cuda_graphs: the (compiled or eager) fn is captured per key by a
    GraphCache and replayed. `begin_request` drops the graphs when the models changed.
    """

    def __init__(self, config: RuntimeConfig, device: torch.device):
        self.config, self.device = config, torch.device(device)
        self.graphs = GraphCache() if config.graphs_active(self.device) else None
        self._compiled: dict[str, Callable[..., Any]] = {}
        self._compiled_keys: set[Hashable] = set()
        self.compile_seconds = 0.0
        self._fingerprint: Hashable | None = None
        self._request_overheads = {"compile": 0.0, "graph_capture": 0.0}

    def reconfigured(self, config: RuntimeConfig) -> "StepExecutor":
        """A new executor for `config` that keeps this one's compiled steps when the compile
        settings are the same (dynamo re-checks its guards, e.g. on triton_kernels, anyway);
        graphs are never carried over."""
        new = StepExecutor(config, self.device)
        same = (config.compile, config.compile_backend, config.compile_mode) == (
            self.config.compile, self.config.compile_backend, self.config.compile_mode)
        if config.compile and same:
            new._compiled, new._compiled_keys = self._compiled, self._compiled_keys
            new.compile_seconds = self.compile_seconds
        return new

    def begin_request(self, models: Iterable[nn.Module]) -> None:
        """Call at the start of each request: graphs captured against other weights, hooks
        or attention processors are dropped (and recaptured on first use)."""
        self._request_overheads = {"compile": self.compile_seconds, "graph_capture": self._capture_seconds()}
        if self.graphs is None:
            return
        fingerprint = model_fingerprint(models)
        if fingerprint != self._fingerprint:
            self.graphs.clear()
            self._fingerprint = fingerprint

    def request_overheads(self) -> dict[str, float]:
        """Seconds of compile and graph capture paid since begin_request (inside the stage times)."""
        return {
            "compile": self.compile_seconds - self._request_overheads["compile"],
            "graph_capture": self._capture_seconds() - self._request_overheads["graph_capture"],
        }

    def _capture_seconds(self) -> float:
        return self.graphs.capture_seconds if self.graphs is not None else 0.0

    def run(self, name: str, fn: Callable[..., Any], args: tuple) -> Any:
        if self.config.compile:
            fn = self._compile(name, fn)
            call = self._timed_first_call(name, fn, args)
        else:
            call = fn
        if self.graphs is not None:
            return self.graphs.run(name, call, args, extra=(self.config,))
        return call(*args)

    def _compile(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        compiled = self._compiled.get(name)
        if compiled is None:
            import torch._dynamo.config as dynamo_config

            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
            kwargs = {"mode": self.config.compile_mode} if self.config.compile_mode else {}
            inner = torch.compile(fn, backend=self.config.compile_backend, dynamic=False, **kwargs)

            def compiled(*args: Any) -> Any:
                # Guard on module hooks too (dynamo skips them by default): adding or removing
                # an unfused LoRA or a branch hook must recompile, not run stale code.
                with dynamo_config.patch(skip_nnmodule_hook_guards=False):
                    return inner(*args)

            self._compiled[name] = compiled
        return compiled

    def _timed_first_call(self, name: str, fn: Callable[..., Any], args: tuple) -> Callable[..., Any]:
        # what the traced code reads besides its arguments (a change recompiles)
        traced = (self.config.triton_kernels, self.config.channels_last, self.config.fuse_qkv)
        key = graph_key(name, args, traced)[0]
        if key in self._compiled_keys:
            return fn

        def first(*call_args: Any) -> Any:
            if key in self._compiled_keys:
                return fn(*call_args)
            synchronize(self.device)
            start = time.perf_counter()
            out = fn(*call_args)
            synchronize(self.device)
            self.compile_seconds += time.perf_counter() - start
            self._compiled_keys.add(key)
            return out

        return first
