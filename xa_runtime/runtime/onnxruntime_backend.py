"""onnxruntime backend: one InferenceSession per exported graph (xa-export's folder).

`OnnxRuntimeBackend(folder)` gives `sd15_branch`, `sdxl_branch` and `mapping`, callable as
SD15Branch, SDXLBranch and MappingLayers are, so `XAdapterPipeline.with_backend(backend)`
runs stage 1 and stage 2 on onnxruntime. Inputs and outputs are checked against the graph
table. Two ways to pass tensors: plain `session.run` with numpy arrays (host copies), or IO
binding (`io_binding=True`, the default with the CUDA provider): torch tensors bound by
data_ptr as inputs, outputs allocated as torch tensors of the table's shapes on the inputs'
device and bound too, so on CUDA nothing crosses to the host between graphs. CPU-tested:
both paths (equal); GPU-untested-yet: the CUDA provider and CUDA binding (no GPU here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import CheckpointError, ParameterError
from ..models.branches import ResidualInjection
from .graphs_table import GraphSpec, get_graph, solve_dims

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# ControlNet residuals / T2I-Adapter features / IP-Adapter image tokens, when exported
OPTIONAL_GRAPHS = ("sd15_unet_control", "sd15_unet_t2i", "sd15_unet_ip")
FUSED_GRAPH = "sdxl_unet_fused"  # mapping + SDXL UNet in one graph, replaces mapping and sdxl_unet
SDXL_MODES = ("auto", "split", "fused")
# What "auto" picks when the folder has both: the faster one measured on onnxruntime CPU
# (benchmarks/bench_sdxl_split.py, README "Export"); GPU / TensorRT not measured yet.
PREFERRED_SDXL_MODE = "fused"
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


def _rows(timestep: Any, batch: int) -> torch.Tensor:
    t = torch.as_tensor(timestep).detach().to("cpu", torch.float32).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


def _like(outputs: Sequence[torch.Tensor], ref: torch.Tensor) -> list[torch.Tensor]:
    return [o.to(ref.device, ref.dtype) for o in outputs]


class OrtSD15Branch:
    """SD15Branch on onnxruntime: (sample, timestep, text, **unet_kwargs) -> (eps, (f0, f1, f2)).

    unet_kwargs: ControlNet residuals (the sd15_unet_control graph), T2I-Adapter / Nexus
    features (`down_intrablock_additional_residuals`, the sd15_unet_t2i graph) or IP-Adapter
    image embeddings (`added_cond_kwargs["image_embeds"]`, the sd15_unet_ip graph), one kind
    per call; other plugins' kwargs (unfused LoRA scales) need the PyTorch backend.

    IP-Adapter: the graph holds the adapter's attention weights but not its image projection
    (whose input differs between variants), so the embeddings are projected to tokens in
    PyTorch by the IP-Adapter installed on the torch SD1.5 UNet (`torch_unet`, attached by
    XAdapterPipeline.with_backend through `attach_torch_unet`), which also gives the
    per-layer scales. The graph must be exported from the same IP-Adapter file.
    """

    CONTROL_KEYS = ("down_block_additional_residuals", "mid_block_additional_residual")
    ADAPTER_KEY = "down_intrablock_additional_residuals"
    IP_KEY = "added_cond_kwargs"

    def __init__(self, plain: GraphSession, control: GraphSession | None = None, t2i: GraphSession | None = None,
                 ip: GraphSession | None = None, torch_unet: torch.nn.Module | None = None):
        self.plain, self.control, self.t2i, self.ip, self.torch_unet = plain, control, t2i, ip, torch_unet

    def attach_torch_unet(self, unet: torch.nn.Module) -> "OrtSD15Branch":
        """A copy of this branch that reaches the torch SD1.5 UNet `unet` for IP-Adapter
        projections and scales (the sessions are shared)."""
        return OrtSD15Branch(self.plain, self.control, self.t2i, self.ip, unet)

    def _ip_inputs(self, added: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from ..plugins.ip_adapter import ip_layer_scales, ip_tokens

        if not isinstance(added, Mapping) or set(added) != {"image_embeds"}:
            raise ValueError(f"the onnxruntime SD1.5 UNet takes added_cond_kwargs with image_embeds (IP-Adapter) only, "
                             f"got {sorted(added) if isinstance(added, Mapping) else type(added).__name__}")
        if self.ip is None:
            raise ValueError("IP-Adapter image_embeds given (added_cond_kwargs), but no sd15_unet_ip graph was exported "
                             "to this folder (xa-export --ip-adapter FILE)")
        if self.torch_unet is None:
            raise ValueError("IP-Adapter image_embeds given (added_cond_kwargs), but no torch SD1.5 UNet is attached to "
                             "project them (XAdapterPipeline.with_backend attaches it; or attach_torch_unet(unet))")
        tokens, scales = ip_tokens(self.torch_unet, added["image_embeds"]), ip_layer_scales(self.torch_unet)
        layers = self.ip.model_dims.get("ip_layers")
        if scales.numel() != layers or tokens.shape[-1] != self.ip.model_dims.get("ctx"):
            raise ValueError(f"the sd15_unet_ip graph takes {layers} layer scales and tokens of width "
                             f"{self.ip.model_dims.get('ctx')}; the IP-Adapter gives {scales.numel()} and "
                             f"{tokens.shape[-1]}: export the graph from this IP-Adapter and UNet")
        return tokens, scales

    def __call__(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **unet_kwargs: Any):
        other = sorted(k for k in unet_kwargs if k not in self.CONTROL_KEYS + (self.ADAPTER_KEY, self.IP_KEY))
        if other:
            raise ValueError(f"the onnxruntime SD1.5 UNet takes ControlNet residuals, T2I-Adapter features and "
                             f"IP-Adapter image embeddings only, not {other}; run these plugins on the PyTorch backend")
        t = _rows(timestep, sample.shape[0])
        if self.IP_KEY in unet_kwargs:
            if len(unet_kwargs) > 1:
                raise ValueError("IP-Adapter image embeddings together with ControlNet residuals or T2I-Adapter "
                                 "features need the PyTorch backend (no graph takes both)")
            tokens, scales = self._ip_inputs(unet_kwargs[self.IP_KEY])
            out = self.ip(sample, t, encoder_hidden_states, tokens, scales)
        elif self.ADAPTER_KEY in unet_kwargs:
            if len(unet_kwargs) > 1:
                raise ValueError("ControlNet residuals and T2I-Adapter features together need the PyTorch backend "
                                 "(no graph takes both)")
            if self.t2i is None:
                raise ValueError("T2I-Adapter features given, but no sd15_unet_t2i graph was exported to this folder")
            feats = list(unet_kwargs[self.ADAPTER_KEY])
            if len(feats) != len(self.t2i.spec.inputs) - 3:
                raise ValueError(f"the sd15_unet_t2i graph takes {len(self.t2i.spec.inputs) - 3} adapter features, "
                                 f"got {len(feats)}")
            out = self.t2i(sample, t, encoder_hidden_states, *feats)
        elif unet_kwargs:
            if self.control is None:
                raise ValueError("ControlNet residuals given, but no sd15_unet_control graph was exported to this folder")
            n_down = len(self.control.spec.inputs) - 4
            down = unet_kwargs.get("down_block_additional_residuals")
            mid = unet_kwargs.get("mid_block_additional_residual")
            if down is None or mid is None or len(down) != n_down:
                raise ValueError(f"the sd15_unet_control graph takes {n_down} down residuals and a mid residual")
            out = self.control(sample, t, encoder_hidden_states, *down, mid)
        else:
            out = self.plain(sample, t, encoder_hidden_states)
        eps, f0, f1, f2 = _like(out, sample)
        return eps, (f0, f1, f2)


@dataclass(frozen=True)
class DeferredResidual:
    """What OrtDeferredMapping gives in place of residual r_index: the SD1.5 features, which
    the sdxl_unet_fused graph maps itself. Only OrtSDXLBranch in fused mode reads it."""

    features: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    index: int


class OrtSDXLBranch:
    """SDXLBranch on onnxruntime: residuals= or ResidualInjection injections (what the
    pipeline passes); without either, zero residuals (the stock UNet).

    session: the sdxl_unet graph (split mode) or None; fused: the sdxl_unet_fused graph, run
    when the injections carry DeferredResidual features (fused mode: OrtDeferredMapping).
    """

    def __init__(self, session: GraphSession | None, fused: GraphSession | None = None):
        if session is None and fused is None:
            raise ValueError("OrtSDXLBranch needs the sdxl_unet or the sdxl_unet_fused graph")
        self.session, self.fused = session, fused

    def __call__(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: dict[str, torch.Tensor], residuals: Sequence[torch.Tensor] | None = None,
                 adapter_condition_scale: float = 1.0, fusion_guidance_scale: float | None = None,
                 injections: Sequence[Any] | None = None, **unet_kwargs: Any) -> torch.Tensor:
        if unet_kwargs:
            raise ValueError(f"the onnxruntime SDXL UNet takes no extra UNet arguments, got {sorted(unet_kwargs)}")
        if residuals is not None and injections is not None:
            raise ValueError("pass residuals or injections, not both")
        if injections is not None:
            residuals, adapter_condition_scale, fusion_guidance_scale = _read_injections(injections)
        b, _, h, w = sample.shape
        graph = self.session
        if residuals is None:
            # the stock UNet: zero residuals (zero features with scale 0 in the fused graph)
            graph = self.session or self.fused
            dims = {**graph.model_dims, "B": b, "H": h, "W": w}
            residuals = [torch.zeros(s.resolve(dims)) for s in graph.spec.inputs[5:8]]
            adapter_condition_scale = 0.0
        elif any(isinstance(r, DeferredResidual) for r in residuals):
            if not all(isinstance(r, DeferredResidual) for r in residuals) or [r.index for r in residuals] != [0, 1, 2]:
                raise ValueError("fused mode takes the three DeferredResidual of one OrtDeferredMapping call")
            graph, residuals = self.fused, list(residuals[0].features)
        elif graph is None:
            raise ValueError("residual tensors given, but this backend runs the sdxl_unet_fused graph, which takes "
                             "SD1.5 features; use OnnxRuntimeBackend(..., sdxl_mode='split') with sdxl_unet.onnx")
        if len(residuals) != 3:
            raise ValueError(f"expected 3 residuals (r0, r1, r2), got {len(residuals)}")
        fusion = -1.0 if fusion_guidance_scale is None else float(fusion_guidance_scale)
        (eps,) = graph(
            sample, _rows(timestep, b), encoder_hidden_states, added_cond_kwargs["text_embeds"],
            added_cond_kwargs["time_ids"], *residuals, [float(adapter_condition_scale)], [fusion],
        )
        return eps.to(sample.device, sample.dtype)


def _read_injections(injections: Sequence[Any]) -> tuple[list[torch.Tensor], float, float | None]:
    if len(injections) != 3 or not all(isinstance(i, ResidualInjection) for i in injections):
        raise ValueError("the onnxruntime SDXL UNet takes 3 ResidualInjection injections (plain residuals), not "
                         "kernel callables; turn RuntimeConfig.triton_kernels off")
    settings = {(i.scale, i.fusion_guidance_scale) for i in injections}
    if len(settings) != 1:
        raise ValueError(f"the sdxl_unet graph takes one scale and fusion for all three sites, got {sorted(settings)}")
    scale, fusion = settings.pop()
    return [i.residual for i in injections], scale, fusion


class OrtMapping:
    """MappingLayers on onnxruntime: (f0, f1, f2) -> (r0, r1, r2)."""

    def __init__(self, session: GraphSession):
        self.session = session

    def __call__(self, f0: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_like(self.session(f0, f1, f2), f0))


class OrtDeferredMapping:
    """The mapping layers in fused mode: (f0, f1, f2) -> three DeferredResidual; the
    sdxl_unet_fused graph maps them in the SDXL step (no mapping graph runs)."""

    def __call__(self, f0: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> tuple[DeferredResidual, ...]:
        return tuple(DeferredResidual((f0, f1, f2), i) for i in range(3))


class OnnxRuntimeBackend:
    """The exported graphs of one folder (NAME.onnx as xa-export writes them) on onnxruntime.

    providers: "cpu", "cuda" or onnxruntime provider names, in order of preference.
    sdxl_mode: how the SDXL side of stage 2 runs: "split" (the mapping graph, then sdxl_unet),
    "fused" (sdxl_unet_fused: mapping inside the SDXL UNet graph, one call per step), or
    "auto" (default): PREFERRED_SDXL_MODE when the folder has its graphs, else the other.
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
        self.sdxl_mode, required, optional = select_graphs(lambda g: (folder / f"{g}.onnx").is_file(), sdxl_mode)
        missing = [g for g in required if not (folder / f"{g}.onnx").is_file()]
        if not folder.is_dir() or missing:
            raise ParameterError("folder", str(folder), f"a folder with {graphs_wanted(required, sdxl_mode, '.onnx')} "
                                 f"(xa-export writes them){'; missing ' + ', '.join(missing) if folder.is_dir() else ''}")
        resolve_providers(providers)  # named before any session is built
        names = required + optional
        if verify:
            from ..export.manifest import verify_graphs

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
        from ..engines.refit import refit_branch

        return refit_branch({g: _SessionRefitter(self, g) for g in self.sessions}, deltas, branch)


class _SessionRefitter:
    def __init__(self, backend: OnnxRuntimeBackend, graph: str):
        self.backend, self.graph = backend, graph

    def apply(self, deltas: Mapping[str, Any]) -> Any:
        import tempfile

        from ..engines.refit import RefitPlan
        from ..export.refit import apply_weight_deltas

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


def select_graphs(has: Callable[[str], bool], sdxl_mode: str) -> tuple[str, list[str], list[str]]:
    """(resolved sdxl_mode, required graphs, optional graphs present) for a folder in which
    has(name) tells whether graph `name` exists (ONNX files here, engines in engines/run.py)."""
    if sdxl_mode not in SDXL_MODES:
        raise ParameterError("sdxl_mode", sdxl_mode, " or ".join(SDXL_MODES))
    if sdxl_mode == "auto":
        ok = {"split": has("mapping") and has("sdxl_unet"), "fused": has(FUSED_GRAPH)}
        other = "split" if PREFERRED_SDXL_MODE == "fused" else "fused"
        sdxl_mode = PREFERRED_SDXL_MODE if ok[PREFERRED_SDXL_MODE] or not ok[other] else other
    required = ["sd15_unet"] + (["mapping", "sdxl_unet"] if sdxl_mode == "split" else [FUSED_GRAPH])
    return sdxl_mode, required, [g for g in OPTIONAL_GRAPHS if has(g)]


def graphs_wanted(required: Sequence[str], sdxl_mode: str, suffix: str) -> str:
    """Words for an error: the graphs a backend folder needs."""
    if sdxl_mode == "auto":
        return f"sd15_unet{suffix} and either mapping{suffix} + sdxl_unet{suffix} or {FUSED_GRAPH}{suffix}"
    return ", ".join(g + suffix for g in required)


def build_branches(sessions: Mapping[str, Any], sdxl_mode: str) -> tuple[OrtSD15Branch, OrtSDXLBranch, Any]:
    """The pipeline's sd15_branch, sdxl_branch and mapping over graph sessions (onnxruntime
    GraphSessions or TensorRT EngineSessions: same call convention)."""
    sd15 = OrtSD15Branch(sessions["sd15_unet"], sessions.get("sd15_unet_control"), sessions.get("sd15_unet_t2i"),
                         sessions.get("sd15_unet_ip"))
    if sdxl_mode == "split":
        return sd15, OrtSDXLBranch(sessions["sdxl_unet"]), OrtMapping(sessions["mapping"])
    return sd15, OrtSDXLBranch(None, sessions[FUSED_GRAPH]), OrtDeferredMapping()

