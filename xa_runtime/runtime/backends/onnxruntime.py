"""The onnxruntime backend: one InferenceSession per exported graph (xa-export's folder).

`OnnxRuntimeBackend(folder)` gives `sd15_branch`, `sdxl_branch` and `mapping`, callable as
SD15Branch, SDXLBranch and MappingLayers are, so `XAdapterPipeline.with_backend(backend)`
runs stage 1 and stage 2 on onnxruntime. Inputs and outputs are checked against the graph
table. Two ways to pass tensors: plain `session.run` with numpy arrays (host copies), or IO
binding (`io_binding=True`, the default with the CUDA provider): torch tensors bound by
data_ptr as inputs, outputs allocated as torch tensors of the table's shapes on the inputs'
device and bound too, so on CUDA nothing crosses to the host between graphs. The branch
adapters over the sessions are adapters.py's, shared with the tensorrt backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ...errors import CheckpointError, ParameterError
from ...export.refit import RefitPlan, apply_weight_deltas, refit_branch
from ...graphs import GraphSpec, get_graph, graphs_wanted, select_folder_graphs, solve_dims
from .adapters import build_branches

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# onnxruntime's graph optimisation levels, by name; set explicitly on every session.
OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_KIND_DTYPES = {"float32": torch.float32, "int64": torch.int64}
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def resolve_providers(providers: Sequence[str]) -> list[str]:
    """"cpu" / "cuda" or onnxruntime's names -> onnxruntime's names, each available here."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    names = [PROVIDER_NAMES.get(p, p) for p in providers]
    bad = [p for p, n in zip(providers, names) if n not in available]
    if bad or not names:
        raise ParameterError("providers", list(providers), f"among those available here: {', '.join(available)} "
                             "(cuda needs the onnxruntime-gpu package)")
    return names


def check_threads(threads: object, name: str = "threads") -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ParameterError(name, threads, "None (onnxruntime's default: one per physical core) or an integer >= 1")
    return threads


def session_options(threads: int | None = None, optimization: str = "all", inter_op_threads: int | None = None):
    """onnxruntime.SessionOptions with the graph optimisation level set explicitly and the
    intra-op (`threads`) / inter-op thread counts when given."""
    import onnxruntime as ort

    if optimization not in OPTIMIZATION_LEVELS:
        raise ParameterError("optimization", optimization, " or ".join(OPTIMIZATION_LEVELS))
    options = ort.SessionOptions()
    level = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
             "all": "ORT_ENABLE_ALL"}[optimization]
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if check_threads(threads) is not None:
        options.intra_op_num_threads = threads
    if check_threads(inter_op_threads, "inter_op_threads") is not None:
        options.inter_op_num_threads = inter_op_threads
    return options


class GraphSession:
    """One exported graph: positional torch tensors in the table's order -> tuple of torch tensors.

    threads: onnxruntime intra-op threads (None: its default); optimization: graph
    optimisation level ("disabled", "basic", "extended", "all"); io_binding: bind torch
    tensors (see the module doc; outputs on the inputs' device) instead of numpy copies
    (outputs on the CPU); None: on with the CUDA provider first, off otherwise.
    """

    def __init__(self, spec: GraphSpec, path: str | os.PathLike, providers: Sequence[str] = ("cpu",),
                 threads: int | None = None, *, optimization: str = "all", io_binding: bool | None = None,
                 inter_op_threads: int | None = None):
        self.spec = spec
        self._options = session_options(threads, optimization, inter_op_threads)
        self._providers = resolve_providers(providers)
        self.io_binding = self._providers[0] == PROVIDER_NAMES["cuda"] if io_binding is None else bool(io_binding)
        self.reload(path)
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        got = ([i.name for i in ins], [o.name for o in outs])
        if got != (list(spec.input_names), list(spec.output_names)):
            raise CheckpointError(
                f"{path}: inputs {got[0]} / outputs {got[1]} are not those of graph {spec.name} "
                f"({list(spec.input_names)} / {list(spec.output_names)}); export it again with xa-export"
            )
        floats = {_ORT_FLOATS.get(i.type) for i, t in zip(ins, spec.inputs) if t.dtype == "float"}
        self.float_dtype = floats.pop() if len(floats) == 1 else np.float32
        self.torch_float = torch.float16 if self.float_dtype == np.float16 else torch.float32
        # model dimensions (channels, widths) are static in the graph: read them back
        self.model_dims = {
            d: v for i, t in zip(ins + outs, spec.inputs + spec.outputs) for d, v in zip(t.shape, i.shape)
            if isinstance(d, str) and d.islower() and isinstance(v, int)
        }

    def reload(self, path: str | os.PathLike) -> None:
        """Run another file of the same graph (a LoRA-refitted copy, or the base again)."""
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), self._options, providers=self._providers)
        self.path = Path(path)

    def _array(self, kind: str, x: Any) -> np.ndarray:
        dtype = {"float": self.float_dtype, "float32": np.float32, "int64": np.int64}[kind]
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu").numpy() if x.dtype != torch.bfloat16 else x.detach().float().cpu().numpy()
        return np.ascontiguousarray(np.asarray(x, dtype=dtype))

    def __call__(self, *tensors: Any) -> tuple[torch.Tensor, ...]:
        if len(tensors) != len(self.spec.inputs):
            raise ValueError(f"graph {self.spec.name} takes {len(self.spec.inputs)} inputs, got {len(tensors)}")
        if self.io_binding:
            return self._run_bound(tensors)
        feeds = {t.name: self._array(t.dtype, x) for t, x in zip(self.spec.inputs, tensors)}
        return tuple(torch.from_numpy(o) for o in self.session.run(None, feeds))

    def _run_bound(self, tensors: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        """IO binding: inputs and preallocated outputs bound by data_ptr on one device."""
        first = next((x for x in tensors if isinstance(x, torch.Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
        inputs = []
        for t, x in zip(self.spec.inputs, tensors):
            dtype = self.torch_float if t.dtype == "float" else _KIND_DTYPES[t.dtype]
            inputs.append(torch.as_tensor(x).detach().to(device, dtype).contiguous())
        dims = {**self.model_dims, **solve_dims(self.spec.inputs, [tuple(x.shape) for x in inputs])}
        outputs = [torch.empty(t.resolve(dims), dtype=self.torch_float if t.dtype == "float" else _KIND_DTYPES[t.dtype],
                               device=device) for t in self.spec.outputs]
        binding = self.session.io_binding()
        kind, index = device.type, device.index or 0
        for t, x in zip(self.spec.inputs, inputs):
            binding.bind_input(t.name, kind, index, _NUMPY[x.dtype], tuple(x.shape), x.data_ptr())
        for t, y in zip(self.spec.outputs, outputs):
            binding.bind_output(t.name, kind, index, _NUMPY[y.dtype], tuple(y.shape), y.data_ptr())
        if kind == "cuda":  # onnxruntime runs on its own stream: the inputs must be written first
            torch.cuda.current_stream(device).synchronize()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return tuple(outputs)


class OnnxRuntimeBackend:
    """The exported graphs of one folder (NAME.onnx as xa-export writes them) on onnxruntime.

    providers: "cpu", "cuda" or onnxruntime provider names, in order of preference.
    sdxl_mode: how the SDXL side of stage 2 runs: "split" (the mapping graph, then sdxl_unet),
    "fused" (sdxl_unet_fused: mapping inside the SDXL UNet graph, one call per step), or
    "auto" (default): graphs.PREFERRED_SDXL_MODE when the folder has its graphs, else the other.
    Needs sd15_unet and the chosen mode's graphs; loads sd15_unet_control, sd15_unet_t2i and
    sd15_unet_ip if present.
    verify: check the graphs' files against the folder's manifest.json first (sha256 of each;
    CheckpointError for a missing manifest or a changed file); False skips it (no hashing).
    threads / inter_op_threads: onnxruntime's intra-op / inter-op thread counts (None: its
    defaults); optimization: its graph optimisation level ("all" default, "extended",
    "basic", "disabled"); io_binding: see GraphSession (None: on for CUDA, off for CPU).
    """

    name = "onnxruntime"

    def __init__(self, folder: str | os.PathLike, providers: Sequence[str] = ("cpu",), threads: int | None = None,
                 verify: bool = True, sdxl_mode: str = "auto", *, optimization: str = "all",
                 io_binding: bool | None = None, inter_op_threads: int | None = None):
        folder = Path(folder)
        session_options(threads, optimization, inter_op_threads)  # every option checked before any file is read
        self.sdxl_mode, required, optional, missing = select_folder_graphs(folder, "onnx", sdxl_mode)
        if not folder.is_dir() or missing:
            raise ParameterError("folder", str(folder), f"a folder with {graphs_wanted(sdxl_mode, '.onnx')} "
                                 f"(xa-export writes them){'; missing ' + ', '.join(missing) if folder.is_dir() else ''}")
        resolve_providers(providers)  # named before any session is built
        names = required + optional
        if verify:
            from ...export.manifest import verify_graphs

            verify_graphs(folder, names)
        self.sessions = {g: GraphSession(get_graph(g), folder / f"{g}.onnx", providers, threads, optimization=optimization,
                                         io_binding=io_binding, inter_op_threads=inter_op_threads) for g in names}
        self.sd15_branch, self.sdxl_branch, self.mapping = build_branches(self.sessions, self.sdxl_mode)
        self._base_paths = {g: s.path for g, s in self.sessions.items()}
        self._lora_dir: Any = None

    def set_lora_deltas(self, deltas: Mapping[str, Any], branch: str = "sd15") -> dict[str, int]:
        """The TensorRT backend's LoRA switch on onnxruntime: the `branch` ("sd15" or "sdxl")
        UNet graphs run base + `deltas` ("unet.*" torch names, LoraManager.weight_deltas()),
        {} restores the base graphs. onnxruntime cannot refit a session in place, so each
        changed graph is written refitted to a temporary folder and its session reloaded
        (seconds at full size; the same weights TensorRT refit feeds). Returns graph -> number
        of initializers differing from base."""
        return refit_branch({g: _SessionRefitter(self, g) for g in self.sessions}, deltas, branch)


class _SessionRefitter:
    def __init__(self, backend: OnnxRuntimeBackend, graph: str):
        self.backend, self.graph = backend, graph

    def apply(self, deltas: Mapping[str, Any]) -> Any:
        import tempfile

        b, g = self.backend, self.graph
        if not deltas:
            b.sessions[g].reload(b._base_paths[g])
            return RefitPlan()
        if b._lora_dir is None:
            b._lora_dir = tempfile.TemporaryDirectory(prefix="xa-ort-lora-")
        out = Path(b._lora_dir.name) / f"{g}.onnx"
        report = apply_weight_deltas(b._base_paths[g], deltas, output=out)
        b.sessions[g].reload(out)
        return RefitPlan(dict.fromkeys(report.initializers), report)
