"""The tensorrt backend: cached engines run on torch CUDA tensors (TensorRT 10 Python API).

`TensorRTBackend(engine_dir, onnx_dir)` gives `sd15_branch`, `sdxl_branch` and `mapping` with
the onnxruntime backend's call signatures (its branch adapters are reused over an
EngineSession), so `XAdapterPipeline.with_backend(backend)` works. Each engine is checked
against its manifest (GPU, TensorRT, source ONNX, plan sha256) before it is deserialized.
An EngineSession binds device buffers once per input shape (set_input_shape,
set_tensor_address), copies inputs into them and runs execute_async_v3 on the current torch
stream. `set_lora_deltas(deltas)` refits the SD1.5 UNet engines between requests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import tensorrt as trt
import torch

from ..errors import CheckpointError, ParameterError
from ..runtime.graphs_table import GraphSpec, get_graph
from ..runtime.onnxruntime_backend import OPTIONAL_GRAPHS, PIPELINE_GRAPHS, OrtMapping, OrtSD15Branch, OrtSDXLBranch
from . import manifest as mf
from .refit import EngineRefitter, refit_from_onnx

mf.require_tensorrt(trt)

_TORCH_DTYPES = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
                 trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
LORA_GRAPHS = ("sd15_unet", "sd15_unet_control")  # LoRAs are SD1.5 plugins


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(dims[i] for i in range(len(dims)))


class EngineSession:
    """One engine: positional torch tensors in the table's order -> tuple of CUDA torch tensors."""

    def __init__(self, spec: GraphSpec, engine: trt.ICudaEngine):
        self.spec, self.engine = spec, engine
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
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.spec.name} failed")
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
                 expect: Mapping[str, Any] | None = None, facts: mf.DeviceFacts | None = None):
        if not torch.cuda.is_available():
            raise ParameterError("backend", "tensorrt", "a CUDA GPU (torch.cuda.is_available() is False)")
        folder = Path(engine_dir)
        missing = [g for g in PIPELINE_GRAPHS if not mf.manifest_path(folder, g).is_file()]
        if not folder.is_dir() or missing:
            raise ParameterError("engine_dir", str(folder), "a folder with engines of " + ", ".join(PIPELINE_GRAPHS) +
                                 f" (xa-build-engines writes them); missing {', '.join(missing) or 'the folder'}")
        facts = facts or mf.DeviceFacts.current(trt.__version__)
        names = [g for g in PIPELINE_GRAPHS + OPTIONAL_GRAPHS if mf.manifest_path(folder, g).is_file()]
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
            if manifest["refit"] != "none" and g in LORA_GRAPHS and g in onnx:
                self.refitters[g] = EngineRefitter(engine, onnx[g], self.logger)
            self.sessions[g] = EngineSession(get_graph(g), engine)
        self.sd15_branch = OrtSD15Branch(self.sessions["sd15_unet"], self.sessions.get("sd15_unet_control"),  # type: ignore[arg-type]
                                         self.sessions.get("sd15_unet_t2i"))  # type: ignore[arg-type]
        self.sdxl_branch = OrtSDXLBranch(self.sessions["sdxl_unet"])  # type: ignore[arg-type]
        self.mapping = OrtMapping(self.sessions["mapping"])  # type: ignore[arg-type]

    def set_lora_deltas(self, deltas: Mapping[str, Any]) -> dict[str, int]:
        """Refit the SD1.5 UNet engines to base + `deltas` (LoraManager.weight_deltas(), torch
        names); only weights that change are fed; {} restores the base weights. Call between
        requests. Returns graph -> number of engine weights now differing from base."""
        if deltas and not self.refitters:
            raise ParameterError("loras", sorted(deltas)[:3], "engines built refittable (xa-build-engines --refit "
                                 "refit or strip) and the backend's onnx_dir")
        return {g: len(r.apply(deltas).weights) for g, r in self.refitters.items()}
