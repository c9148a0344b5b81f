"""LoRA refit of TensorRT engines: the plan (which engine weights change, to what) is computed
on the ONNX graph with export.refit.apply_weight_deltas, so the values fed to trt.Refitter are
exactly those the CPU tests check through onnxruntime against PyTorch with the LoRA fused.

Engine weight names are the ONNX initializer names (TensorRT's ONNX parser names refittable
weights after their initializers); the export name map turns torch names into them. Values
are in the initializer's layout and dtype. Only refittable initializers (graph table regexes,
one reader) are in the plan; others are reported, never fed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..errors import CheckpointError
from ..export.refit import RefitPlan, merged_value, names_path, plan_weight_deltas, read_name_map

if TYPE_CHECKING:
    import tensorrt as trt


def _load(onnx_path: str | os.PathLike) -> Any:
    import onnx

    return onnx.load(str(onnx_path))


def refit_plan(onnx_path: str | os.PathLike, deltas: Mapping[str, Any], name_map: Mapping[str, Any] | None = None,
               model: Any = None) -> RefitPlan:
    """The merged weights a LoRA gives each refittable engine weight of this graph.
    model: the loaded base onnx.ModelProto (read, never changed or copied: only the
    initializers a delta touches are converted; loaded from onnx_path if None)."""
    base = model if model is not None else _load(onnx_path)
    name_map = name_map if name_map is not None else read_name_map(names_path(onnx_path))
    inits = {t.name: t for t in base.graph.initializer}
    report, planned = plan_weight_deltas(inits, deltas, name_map)
    skip = set(report.not_refittable)
    weights = {}
    for key, init, d in planned:
        report.applied.append(key)
        report.initializers.append(init)
        if key not in skip:
            weights[init] = merged_value(inits[init], d)
    return RefitPlan(weights, report)


def base_weights(model: Any, names: list[str]) -> dict[str, np.ndarray]:
    """The graph's own values of initializers `names` (what unloading a LoRA restores)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    missing = [n for n in names if n not in inits]
    if missing:
        raise CheckpointError(f"initializers {missing[:5]} are not in the ONNX graph")
    return {n: numpy_helper.to_array(inits[n]) for n in names}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal arrays? A strided sample first: a switch to another LoRA rejects in microseconds
    instead of comparing every byte (the full comparison only runs for equal-looking arrays)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    fa, fb = a.reshape(-1), b.reshape(-1)
    step = max(1, fa.size // 4096)
    return bool(np.array_equal(fa[::step], fb[::step])) and bool(np.array_equal(a, b))


def plan_changes(current: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """What to feed the refitter to go from `current` (weights now differing from base) to
    `target`: (weights whose value changes, names back to their base value)."""
    changed = {n: v for n, v in target.items() if n not in current or not _same(current[n], v)}
    restore = sorted(n for n in current if n not in target)
    return changed, restore


class EngineRefitter:
    """Refits one engine between requests: `apply(deltas)` sets merged LoRA weights (only those
    that change since the last call), `apply({})` / `restore()` puts the base weights back."""

    def __init__(self, engine: trt.ICudaEngine, onnx_path: str | os.PathLike, logger: trt.ILogger):
        import tensorrt as trt

        self.trt = trt
        self.engine, self.onnx_path, self.logger = engine, Path(onnx_path), logger
        self.name_map = read_name_map(names_path(onnx_path))
        self._model: Any = None
        self.current: dict[str, np.ndarray] = {}

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = _load(self.onnx_path)
        return self._model

    def apply(self, deltas: Mapping[str, Any]) -> RefitPlan:
        plan = refit_plan(self.onnx_path, deltas, self.name_map, self.model) if deltas else RefitPlan()
        changed, restore = plan_changes(self.current, plan.weights)
        feed = {**changed, **base_weights(self.model, restore)}
        if feed:
            self._refit(feed)
        self.current = dict(plan.weights)
        return plan

    def restore(self) -> None:
        self.apply({})

    def _refit(self, weights: Mapping[str, np.ndarray]) -> None:
        import torch

        trt = self.trt
        torch.cuda.current_stream().synchronize()  # no execution reads the weights while they change
        refitter = trt.Refitter(self.engine, self.logger)
        keep = []  # the arrays must outlive refit_cuda_engine
        for name, value in weights.items():
            array = np.ascontiguousarray(value)
            keep.append(array)
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise CheckpointError(f"engine refused weights {name!r} (not refittable in this engine? rebuild with "
                                      "xa-build-engines --refit refit)")
        if not refitter.refit_cuda_engine():
            missing = refitter.get_missing_weights()
            raise CheckpointError(f"refit of {self.onnx_path.stem} failed; missing weights: {missing[:5]}")
        del keep


def refit_from_onnx(engine: trt.ICudaEngine, onnx_path: str | os.PathLike, logger: trt.ILogger) -> None:
    """Fill a weight-stripped engine (--refit strip) with its ONNX file's weights."""
    import tensorrt as trt

    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
        raise CheckpointError(f"could not refit the weight-stripped engine from {onnx_path}; rebuild it with "
                              "xa-build-engines")
