"""Branch adapters shared by the onnxruntime and tensorrt backends: the pipeline's
sd15_branch, sdxl_branch and mapping (called as SD15Branch, SDXLBranch and MappingLayers
are) over "sessions", callables that take a graph's inputs positionally in the graph
table's order and return its outputs (onnxruntime GraphSession, TensorRT EngineSession).
Each adapter picks the graph variant a call needs (plugin inputs, split or fused SDXL mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import torch

from ...graphs import BASE_SD15_UNET, FUSED_GRAPH, GRAPHS, GraphSpec, encode_fusion, graphs_with_role
from ...models.branches import ResidualInjection


class Session(Protocol):
    """What an adapter needs of a session: its graph's declaration, the model dimensions read
    back from the graph, and a call on positional tensors."""

    spec: GraphSpec
    model_dims: dict[str, int]

    def __call__(self, *tensors: Any) -> tuple[torch.Tensor, ...]: ...


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

    def __init__(self, plain: Session, control: Session | None = None, t2i: Session | None = None,
                 ip: Session | None = None, torch_unet: torch.nn.Module | None = None):
        self.plain, self.control, self.t2i, self.ip, self.torch_unet = plain, control, t2i, ip, torch_unet

    def attach_torch_unet(self, unet: torch.nn.Module) -> "OrtSD15Branch":
        """A copy of this branch that reaches the torch SD1.5 UNet `unet` for IP-Adapter
        projections and scales (the sessions are shared)."""
        return OrtSD15Branch(self.plain, self.control, self.t2i, self.ip, unet)

    def _ip_inputs(self, added: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from ...plugins.ip_adapter import ip_layer_scales, ip_tokens

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

    def __init__(self, session: Session | None, fused: Session | None = None):
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
        (eps,) = graph(
            sample, _rows(timestep, b), encoder_hidden_states, added_cond_kwargs["text_embeds"],
            added_cond_kwargs["time_ids"], *residuals, [float(adapter_condition_scale)],
            [encode_fusion(fusion_guidance_scale)],
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

    def __init__(self, session: Session):
        self.session = session

    def __call__(self, f0: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_like(self.session(f0, f1, f2), f0))


class OrtDeferredMapping:
    """The mapping layers in fused mode: (f0, f1, f2) -> three DeferredResidual; the
    sdxl_unet_fused graph maps them in the SDXL step (no mapping graph runs)."""

    def __call__(self, f0: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> tuple[DeferredResidual, ...]:
        return tuple(DeferredResidual((f0, f1, f2), i) for i in range(3))


def build_branches(sessions: Mapping[str, Any], sdxl_mode: str) -> tuple[OrtSD15Branch, OrtSDXLBranch, Any]:
    """The pipeline's sd15_branch, sdxl_branch and mapping over graph sessions (onnxruntime
    Sessions or TensorRT EngineSessions: same call convention)."""
    variants = {GRAPHS[g].variant: sessions[g] for g in sessions if GRAPHS[g].role == "sd15_unet"}
    sd15 = OrtSD15Branch(sessions[BASE_SD15_UNET], variants.get("control"), variants.get("t2i"), variants.get("ip"))
    if sdxl_mode == "split":
        (mapping,), (sdxl,) = graphs_with_role("mapping"), graphs_with_role("sdxl_split")
        return sd15, OrtSDXLBranch(sessions[sdxl]), OrtMapping(sessions[mapping])
    return sd15, OrtSDXLBranch(None, sessions[FUSED_GRAPH]), OrtDeferredMapping()

