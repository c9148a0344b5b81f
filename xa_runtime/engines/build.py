"""ONNX -> TensorRT engine plans (TensorRT 10 Python API). Imported only by xa-build-engines.

One network per graph from its exported ONNX file (trt.OnnxParser, external data beside it),
one optimisation profile from the graph table (with the CLI's overrides), precision flags,
a persistent timing cache, refittable LoRA target weights (REFIT_INDIVIDUAL, the name map's
refittable initializers; STRIP_PLAN leaves them out of the plan, refitted from ONNX at load),
builder progress through trt.IProgressMonitor. Plans and manifests are written by
manifest.write_engine: temp names, then rename.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

import tensorrt as trt

from ..availability import require_tensorrt
from ..errors import CheckpointError
from ..export.refit import names_path, read_name_map
from ..graphs import DimRange, GraphSpec
from . import manifest as mf

require_tensorrt(trt)

TIMING_CACHE = "timing.cache"


class Progress(trt.IProgressMonitor):
    """Builder phases on stderr, indented by nesting; never cancels."""

    def __init__(self, stream=sys.stderr):
        trt.IProgressMonitor.__init__(self)
        self.stream, self.depth = stream, {}

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        self.depth[phase_name] = self.depth.get(parent_phase or "", -1) + 1
        print(f"{'  ' * self.depth[phase_name]}{phase_name} ({num_steps} steps)", file=self.stream, flush=True)

    def step_complete(self, phase_name: str, step: int) -> bool:
        return True

    def phase_finish(self, phase_name: str) -> None:
        self.depth.pop(phase_name, None)


def onnx_model_dims(spec: GraphSpec, onnx_path: Path) -> dict[str, int]:
    """Static model dimensions (channels, widths) read from the graph's declared inputs."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    dims: dict[str, int] = {}
    for value, t in zip(model.graph.input, spec.inputs):
        for sym, d in zip(t.shape, value.type.tensor_type.shape.dim):
            if isinstance(sym, str) and sym.islower() and d.HasField("dim_value"):
                dims[sym] = d.dim_value
    return dims


def refittable_weights(onnx_path: Path) -> list[str]:
    """The ONNX initializers the name map marks refittable (the LoRA targets)."""
    entries = read_name_map(names_path(onnx_path))["initializers"]
    return sorted(n for n, e in entries.items() if e.get("refittable"))


def _logger() -> trt.Logger:
    return trt.Logger(trt.Logger.WARNING)


def build_engine(spec: GraphSpec, onnx_path: Path, folder: Path, facts: mf.DeviceFacts, precision: str = "fp16",
                 profiles: Mapping[str, DimRange] | None = None, refit: str = "refit",
                 timing_cache: Path | None = None, progress: bool = True, workspace_gib: float | None = None) -> Path:
    """Build `spec`'s engine from `onnx_path` into folder/NAME.plan (+ NAME.engine.json)."""
    profiles = dict(profiles if profiles is not None else spec.profiles)
    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise CheckpointError(f"TensorRT could not parse {onnx_path}: {'; '.join(errors[:5])}")
    config = builder.create_builder_config()
    flags: list[str] = []
    if precision in ("fp16", "bf16"):
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        flags.append(precision.upper())
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    refittable: list[str] = []
    if refit != "none":
        refittable = refittable_weights(onnx_path)
        config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
        flags.append("REFIT_INDIVIDUAL")
        for name in refittable:
            if not network.mark_weights_refittable(name):
                raise CheckpointError(f"{onnx_path}: TensorRT has no weights named {name!r} to mark refittable")
        if refit == "strip":
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)
            flags.append("STRIP_PLAN")
    model_dims = onnx_model_dims(spec, onnx_path)
    profile = builder.create_optimization_profile()
    shapes = GraphSpec(spec.name, spec.inputs, spec.outputs, profiles).profile_shapes(model_dims)
    for name, (lo, mid, hi) in shapes.items():
        profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(mid)), trt.Dims(list(hi)))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    if progress:
        config.progress_monitor = Progress()
    onnx_hash = mf.onnx_sha256(onnx_path)

    def produce() -> bytes:
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise CheckpointError(f"TensorRT could not build {spec.name} from {onnx_path} (see the log above)")
        return bytes(memoryview(plan))

    path = mf.write_engine(folder, spec.name, produce, lambda engine_hash: mf.engine_manifest(
        spec.name, facts, precision, profiles, flags, refit, onnx_hash, engine_hash, refittable))
    if timing_cache is not None:
        mf._write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return path


def tensorrt_facts() -> mf.DeviceFacts:
    return mf.DeviceFacts.current(trt.__version__)


def build_engines(names: list[str], onnx_dir: Path, folder: Path, precision: str,
                  profiles: Mapping[str, Mapping[str, DimRange]], refit: str, timing_cache: Path | None,
                  progress: bool = True) -> list[Path]:
    from ..graphs import get_graph

    facts = tensorrt_facts()
    folder.mkdir(exist_ok=True)
    out = []
    for name in names:
        if progress:
            print(f"xa-build-engines: {name} ({precision}, refit {refit})", file=sys.stderr, flush=True)
        out.append(build_engine(get_graph(name), onnx_dir / f"{name}.onnx", folder, facts, precision,
                                profiles[name], refit if get_graph(name).refittable else "none", timing_cache,
                                progress))
    return out


__all__ = ["build_engine", "build_engines", "Progress", "TIMING_CACHE"]
