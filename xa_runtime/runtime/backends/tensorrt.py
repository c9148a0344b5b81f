"""The tensorrt backend: cached engines run on torch CUDA tensors (TensorRT 10 Python API).

`TensorRTBackend(engine_dir, onnx_dir)` gives `sd15_branch`, `sdxl_branch` and `mapping` with
the onnxruntime backend's call signatures (adapters.py's branch adapters over an
EngineSession), so `XAdapterPipeline.with_backend(backend)` works. Each engine is checked
against its manifest (GPU, TensorRT, source ONNX, plan sha256) before it is deserialized.
An EngineSession binds device buffers once per input shape (set_input_shape,
set_tensor_address), copies inputs into them and runs execute_async_v3 on the current torch
stream. `set_lora_deltas(deltas, branch)` refits the UNet engines of one branch between requests.
Graph selection (split mapping + sdxl_unet, or sdxl_unet_fused; optional ControlNet / T2I
variants) is the graph table's select_graphs, over the engines present. `build_engines_for`
exports and builds a temporary engine set (the benchmark's on-the-fly engines). Building,
refitting and checking engines is xa_runtime.engines'; this module only runs them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import tensorrt as trt
import torch

from ...availability import require_tensorrt
from ...engines import manifest as mf
from ...engines.refit import EngineRefitter, refit_from_onnx
from ...errors import CheckpointError, ParameterError
from ...export.refit import refit_branch
from ...graphs import LORA_GRAPHS, GraphSpec, get_graph, graphs_wanted, select_folder_graphs
from .adapters import build_branches

require_tensorrt(trt)

_TORCH_DTYPES = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
                 trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(dims[i] for i in range(len(dims)))


class EngineSession:
    """One engine: positional torch tensors in the table's order -> tuple of CUDA torch tensors.

    cuda_graphs: capture execute_async_v3 as a CUDA graph once per input shape (after one
    plain run: TensorRT initialises lazily) and replay it; a capture TensorRT refuses falls
    back to plain execution for that shape. A refit drops the captured graph (invalidate)."""

    def __init__(self, spec: GraphSpec, engine: trt.ICudaEngine, cuda_graphs: bool = True):
        self.spec, self.engine, self.cuda_graphs = spec, engine, cuda_graphs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_failed = False
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if (inputs, outputs) != (list(spec.input_names), list(spec.output_names)):
            raise CheckpointError(f"engine {spec.name}: inputs {inputs} / outputs {outputs} are not the graph "
                                  "table's; rebuild it with xa-build-engines")
        self.dtypes = {n: _TORCH_DTYPES[engine.get_tensor_dtype(n)] for n in names}
        self.model_dims = {
            d: int(v) for t in spec.inputs for d, v in zip(t.shape, _dims(engine.get_tensor_shape(t.name)))
            if isinstance(d, str) and d.islower() and int(v) >= 0
        }
        self.context = engine.create_execution_context()
        self.shapes: tuple[tuple[int, ...], ...] | None = None
        self.buffers: dict[str, torch.Tensor] = {}

    def _bind(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        """Allocate and bind every input and output buffer for these input shapes (once per shape)."""
        device = torch.device("cuda", torch.cuda.current_device())
        self.buffers = {}
        for t, shape in zip(self.spec.inputs, shapes):
            if not self.context.set_input_shape(t.name, shape):
                raise ParameterError(t.name, shape, f"a shape inside engine {self.spec.name}'s optimisation profile; "
                                     "rebuild with xa-build-engines --min/--max")
            self.buffers[t.name] = torch.empty(shape, dtype=self.dtypes[t.name], device=device)
        for name in self.spec.output_names:
            shape = _dims(self.context.get_tensor_shape(name))
            self.buffers[name] = torch.empty(shape, dtype=self.dtypes[name], device=device)
        for name, buffer in self.buffers.items():
            if not self.context.set_tensor_address(name, buffer.data_ptr()):
                raise CheckpointError(f"engine {self.spec.name}: could not bind {name}")
        self.shapes = shapes
        self.invalidate()

    def invalidate(self) -> None:
        """Forget the captured graph (new buffers, or refitted weights): captured again on the next call."""
        self.graph, self.graph_failed = None, False

    def _execute(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.spec.name} failed")

    def _capture(self, stream: torch.cuda.Stream) -> None:
        self._execute(stream)  # plain first: TensorRT's lazy initialisation must not be captured
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
                self._execute(torch.cuda.current_stream())
        except RuntimeError:  # e.g. data-dependent shapes; this shape runs without a graph
            self.graph_failed = True
            return
        self.graph = graph

    def __call__(self, *tensors: Any) -> tuple[torch.Tensor, ...]:
        if len(tensors) != len(self.spec.inputs):
            raise ValueError(f"graph {self.spec.name} takes {len(self.spec.inputs)} inputs, got {len(tensors)}")
        xs = [torch.as_tensor(x) for x in tensors]
        shapes = tuple(tuple(x.shape) for x in xs)
        if shapes != self.shapes:
            self._bind(shapes)
        for t, x in zip(self.spec.inputs, xs):
            self.buffers[t.name].copy_(x, non_blocking=True)
        stream = torch.cuda.current_stream()
        if not self.cuda_graphs or self.graph_failed:
            self._execute(stream)
        elif self.graph is None:
            self._capture(stream)  # its plain run computed this call's outputs
        else:
            self.graph.replay()
        return tuple(self.buffers[n].clone() for n in self.spec.output_names)  # the buffers are reused next call


def _logger() -> trt.Logger:
    return trt.Logger(trt.Logger.WARNING)


class TensorRTBackend:
    """The engines of one cache folder (xa-build-engines), checked, then loaded.

    onnx_dir: the xa-export folder the engines were built from: its hashes are checked, and
    it is where refit reads base weights and name maps (None: no source check, no LoRA refit,
    no weight-stripped engines). expect: manifest fields the engines must have (precision).
    """

    name = "tensorrt"

    def __init__(self, engine_dir: str | os.PathLike, onnx_dir: str | os.PathLike | None = None,
                 expect: Mapping[str, Any] | None = None, facts: mf.DeviceFacts | None = None, sdxl_mode: str = "auto",
                 cuda_graphs: bool = True):
        if not torch.cuda.is_available():
            raise ParameterError("backend", "tensorrt", "a CUDA GPU (torch.cuda.is_available() is False)")
        folder = Path(engine_dir)
        self.sdxl_mode, required, optional, missing = select_folder_graphs(folder, "engine", sdxl_mode)
        if not folder.is_dir() or missing:
            raise ParameterError("engine_dir", str(folder), f"a folder with engines of {graphs_wanted(sdxl_mode)}"
                                 f" (xa-build-engines writes them); missing {', '.join(missing) or 'the folder'}")
        facts = facts or mf.DeviceFacts.current(trt.__version__)
        names = required + optional
        onnx = {g: Path(onnx_dir) / f"{g}.onnx" for g in names} if onnx_dir is not None else {}
        checked = {g: mf.read_engine(folder, g, facts, onnx.get(g), expect) for g in names}  # all before any load
        self.logger = _logger()
        self.runtime = trt.Runtime(self.logger)
        self.sessions: dict[str, EngineSession] = {}
        self.refitters: dict[str, EngineRefitter] = {}
        for g, (plan, manifest) in checked.items():
            engine = self.runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise CheckpointError(f"TensorRT could not deserialize {mf.plan_path(folder, g)}; rebuild it: "
                                      f"{mf.rebuild_command(g, folder, onnx_dir)}")
            if manifest["refit"] == "strip":
                if g not in onnx:
                    raise ParameterError("onnx_dir", None, f"the ONNX folder: engine {g} was built without its weights")
                refit_from_onnx(engine, onnx[g], self.logger)
            if manifest["refit"] != "none" and any(g in gs for gs in LORA_GRAPHS.values()) and g in onnx:
                self.refitters[g] = EngineRefitter(engine, onnx[g], self.logger)
            self.sessions[g] = EngineSession(get_graph(g), engine, cuda_graphs)
        self.sd15_branch, self.sdxl_branch, self.mapping = build_branches(self.sessions, self.sdxl_mode)

    def set_lora_deltas(self, deltas: Mapping[str, Any], branch: str = "sd15") -> dict[str, int]:
        """Refit the `branch` ("sd15" or "sdxl") UNet engines to base + `deltas`
        (LoraManager.weight_deltas() of that branch's UNet: "unet.*" names; text encoder deltas
        are not engine weights and are refused); only weights that change are fed; {} restores
        the base weights. Call between requests (the refit synchronises the current stream
        first). Returns graph -> number of engine weights now differing from base."""
        changed = refit_branch(self.refitters, deltas, branch)
        for g in changed:
            self.sessions[g].invalidate()  # captured graphs may hold the old weights' addresses
        return changed


def build_engines_for(names: list[str], onnx_dir: str | os.PathLike, engine_dir: str | os.PathLike, precision: str,
                      progress: bool = True) -> None:
    """Engines of the exported graphs `names` (onnx_dir) into engine_dir: the graph table's
    profiles, no refit, no timing cache (a throw-away set; xa-build-engines builds lasting ones)."""
    from ...engines import build

    build.build_engines(names, Path(onnx_dir), Path(engine_dir), precision, {n: get_graph(n).profiles for n in names},
                        "none", None, progress=progress)
