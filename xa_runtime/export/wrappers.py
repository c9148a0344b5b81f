"""Flat-tensor wrappers around the models, one per graph of the table, for tracing.

The models package stays pure; these adapt its branches (hooks, kwargs, tuples) to the
positional tensor inputs and tuple outputs of xa_runtime/graphs.py, chosen by the graph's
role in the table. Each wrapper
registers the wrapped model as `unet` / `vae` / `text_encoder` / ..., so exported weight
names read as the diffusers pipeline's (`unet.down_blocks.0...`), which the refit name
mapping relies on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..models.branches import SD15Branch, SDXLBranch
from ..models.components import SD15Components, SDXLComponents
from ..models.mapping import MappingLayers
from ..graphs import CONTROL_RESIDUALS, FUSION_NONE, GraphSpec


@dataclass
class ModuleBundle:
    """The modules graphs are exported from; parts a graph does not need may be None."""

    sd15: SD15Components | None = None
    sdxl: SDXLComponents | None = None
    mapping: MappingLayers | None = None
    controlnet: nn.Module | None = None
    t2i_adapter: nn.Module | None = None  # an SD1.5 diffusers T2IAdapter
    # an SD1.5 IP-Adapter file's state ({"image_proj": ..., "ip_adapter": ...}, as
    # plugins.ip_adapter_loading.read_ip_adapter_file gives it): installed on sd15.unet only
    # while its graph (sd15_unet_ip) is built, taken off again by the wrapper's release()
    ip_adapter: dict[str, dict[str, torch.Tensor]] | None = None

    @classmethod
    def tiny(cls, seed: int = 0) -> "ModuleBundle":
        """The built-in tiny random models, a tiny ControlNet, a tiny T2I-Adapter (real topology)
        and a tiny "plain" IP-Adapter (4 tokens per image)."""
        from ..models.tiny import build_tiny_models
        from ..plugins.controlnet import build_tiny_controlnet
        from ..plugins.ip_adapter_loading import tiny_ip_adapter_state
        from ..plugins.t2i_adapter import build_tiny_t2i_adapter

        sd15, sdxl, mapping = build_tiny_models(seed)
        return cls(sd15, sdxl, mapping, build_tiny_controlnet(sd15.unet, seed + 3),
                   build_tiny_t2i_adapter(sd15.unet, seed=seed + 4), tiny_ip_adapter_state(sd15.unet, seed=seed + 5))


class SD15UNetGraph(nn.Module):
    """sd15_unet / sd15_unet_control / sd15_unet_t2i: (sample, timestep, text[, 12 down + mid
    ControlNet residuals | 4 T2I-Adapter features]) -> (eps, f0, f1, f2)."""

    def __init__(self, unet: nn.Module, control: bool = False, adapter: bool = False):
        super().__init__()
        self.unet, self.control, self.adapter = unet, control, adapter
        self.__dict__["branch"] = SD15Branch(unet)  # not a submodule: weights stay named unet.*

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        kwargs: dict[str, Any] = {}
        if self.control:
            kwargs = {"down_block_additional_residuals": residuals[:-1], "mid_block_additional_residual": residuals[-1]}
        elif self.adapter:
            kwargs = {"down_intrablock_additional_residuals": list(residuals)}  # the UNet pops from the list
        eps, (f0, f1, f2) = self.branch(sample, timestep, encoder_hidden_states, **kwargs)
        return eps, f0, f1, f2

    def release(self) -> None:
        self.branch.remove_hooks()


class _GivenTokens(nn.Module):
    """Stands in for the UNet's encoder_hid_proj while sd15_unet_ip is traced: the image
    tokens are a graph input, already projected, and pass through as they are given."""

    def forward(self, image_embeds):
        return image_embeds


class _TracedScale:
    """One cross-attention layer's IP-Adapter scale as a traced tensor. diffusers'
    IPAdapterAttnProcessor2_0 reads `scale == 0` (skip the image attention) and `scale * h`:
    the first is never true here (a zero scale multiplies, giving the same h + 0), so the
    trace keeps the image attention of every layer; the second multiplies in h's dtype."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__

    def __mul__(self, h: torch.Tensor) -> torch.Tensor:
        return self.value.to(h.dtype) * h

    __rmul__ = __mul__


class SD15IPUNetGraph(nn.Module):
    """sd15_unet_ip: (sample, timestep, text, ip_tokens, ip_scale) -> (eps, f0, f1, f2).

    Installs the IP-Adapter `state` on `unet` (diffusers' IPAdapterAttnProcessor2_0 on every
    cross-attention layer, weights registered as unet.<layer>.processor.to_k_ip/to_v_ip) with
    its projection replaced by a pass-through, so the UNet's own process_encoder_hidden_states
    hands `ip_tokens` to the processors; release() puts the UNet back as it was."""

    def __init__(self, unet: nn.Module, state: dict[str, dict[str, torch.Tensor]]):
        super().__init__()
        from ..plugins.ip_adapter import IPAdapter, ip_processors

        self.unet = unet
        adapter = IPAdapter(unet, state, source="bundle.ip_adapter")
        self.__dict__["adapter"] = adapter
        self.__dict__["processors"] = ip_processors(unet)
        self.__dict__["projection"] = unet.encoder_hid_proj
        unet.encoder_hid_proj = _GivenTokens()
        self.__dict__["branch"] = SD15Branch(unet)

    def forward(self, sample, timestep, encoder_hidden_states, ip_tokens, ip_scale):
        saved = [p.scale for p in self.processors]
        for i, proc in enumerate(self.processors):
            proc.scale = [_TracedScale(ip_scale[i])]
        try:
            eps, (f0, f1, f2) = self.branch(sample, timestep, encoder_hidden_states,
                                            added_cond_kwargs={"image_embeds": [ip_tokens]})
        finally:
            for proc, scale in zip(self.processors, saved):
                proc.scale = scale
        return eps, f0, f1, f2

    def release(self) -> None:
        self.branch.remove_hooks()
        if self.adapter.loaded:
            self.unet.encoder_hid_proj = self.projection
            self.adapter.unload()


class SDXLUNetGraph(nn.Module):
    """sdxl_unet: (sample, timestep, text, pooled, time_ids, r0, r1, r2, acs, fusion) -> eps."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.__dict__["branch"] = SDXLBranch(unet)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, r0, r1, r2, acs, fusion):
        # the branch's own injection (models.mapping.inject_residual) with tensor scales;
        # fusion carries graphs.encode_fusion's value (negative: plain add)
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.branch(sample, timestep, encoder_hidden_states, cond, residuals=(r0, r1, r2),
                           adapter_condition_scale=acs, fusion_guidance_scale=fusion)

    def release(self) -> None:
        self.branch.remove_hooks()


class SDXLUNetFusedGraph(SDXLUNetGraph):
    """sdxl_unet_fused: (sample, timestep, text, pooled, time_ids, f0, f1, f2, acs, fusion) -> eps;
    the mapping layers (registered as `mapping`, so their weights read `mapping.body...`)
    make r0..r2 inside the graph."""

    def __init__(self, unet: nn.Module, mapping: MappingLayers):
        super().__init__(unet)
        self.mapping = mapping

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, f0, f1, f2, acs, fusion):
        r0, r1, r2 = self.mapping(f0, f1, f2)
        return super().forward(sample, timestep, encoder_hidden_states, text_embeds, time_ids, r0, r1, r2, acs, fusion)


class MappingGraph(nn.Module):
    def __init__(self, mapping: MappingLayers):
        super().__init__()
        self.mapping = mapping

    def forward(self, f0, f1, f2):
        return self.mapping(f0, f1, f2)


class ControlNetGraph(nn.Module):
    """controlnet: (sample, timestep, text, cond image, scale) -> 12 down residuals + mid."""

    def __init__(self, controlnet: nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond,
            conditioning_scale=conditioning_scale.to(sample.dtype), guess_mode=False, return_dict=False,
        )
        return (*down, mid)


class T2IAdapterGraph(nn.Module):
    """t2i_adapter: control image -> its 4 features (unscaled)."""

    def __init__(self, t2i_adapter: nn.Module):
        super().__init__()
        self.t2i_adapter = t2i_adapter

    def forward(self, image):
        return tuple(self.t2i_adapter(image))


class VAEDecoderGraph(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent).sample


class VAEEncoderGraph(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        posterior = self.vae.encode(image).latent_dist
        return posterior.mean, posterior.std


class TextEncoderGraph(nn.Module):
    """input_ids -> hidden states (last, or penultimate as SDXL uses) [, projected pooled]."""

    def __init__(self, text_encoder: nn.Module, penultimate: bool, pooled: bool):
        super().__init__()
        self.text_encoder, self.penultimate, self.pooled = text_encoder, penultimate, pooled

    def forward(self, input_ids):
        # Eager attention: the exporter's SDPA symbolic builds CLIP's causal mask in fp32,
        # which makes fp16 graphs mix types (onnxruntime refuses them); eager builds it in
        # the model dtype. The module's own setting is restored.
        config = self.text_encoder.config
        saved, config._attn_implementation = config._attn_implementation, "eager"
        try:
            out = self.text_encoder(input_ids, output_hidden_states=self.penultimate)
        finally:
            config._attn_implementation = saved
        hidden = out.hidden_states[-2] if self.penultimate else out[0]
        return (hidden, out[0]) if self.pooled else hidden


def _sd15_unet_graph(spec: GraphSpec, b: ModuleBundle, c: Callable[[nn.Module], nn.Module]) -> nn.Module:
    if spec.variant == "ip":
        return SD15IPUNetGraph(c(b.sd15.unet), b.ip_adapter)
    return SD15UNetGraph(c(b.sd15.unet), control=spec.variant == "control", adapter=spec.variant == "t2i")


def _vae_graph(spec: GraphSpec, b: ModuleBundle, c: Callable[[nn.Module], nn.Module]) -> nn.Module:
    vae = c(getattr(b, spec.needs[0]).vae)
    return VAEDecoderGraph(vae) if spec.input_names == ("latent",) else VAEEncoderGraph(vae)


def _text_encoder_graph(spec: GraphSpec, b: ModuleBundle, c: Callable[[nn.Module], nn.Module]) -> nn.Module:
    # SDXL conditions on the penultimate hidden state; a second output is the pooled embedding
    part = spec.needs[0]
    return TextEncoderGraph(c(getattr(getattr(b, part), spec.lora_target)), penultimate=part == "sdxl",
                            pooled=len(spec.outputs) == 2)


_Builder = Callable[[GraphSpec, ModuleBundle, Callable[[nn.Module], nn.Module]], nn.Module]
# graph role -> its wrapper (plugin graphs by the bundle part they export)
_ROLE_WRAPPERS: dict[str, _Builder] = {
    "sd15_unet": _sd15_unet_graph,
    "mapping": lambda s, b, c: MappingGraph(c(b.mapping)),
    "sdxl_split": lambda s, b, c: SDXLUNetGraph(c(b.sdxl.unet)),
    "sdxl_fused": lambda s, b, c: SDXLUNetFusedGraph(c(b.sdxl.unet), c(b.mapping)),
    "vae": _vae_graph,
    "text_encoder": _text_encoder_graph,
}
_PLUGIN_WRAPPERS: dict[str, _Builder] = {
    "controlnet": lambda s, b, c: ControlNetGraph(c(b.controlnet)),
    "t2i_adapter": lambda s, b, c: T2IAdapterGraph(c(b.t2i_adapter)),
}


def build_graph_module(spec: GraphSpec, bundle: ModuleBundle,
                       convert: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """The wrapper of `spec` around the bundle's module (call .release() if it has one);
    `convert` maps that module first (e.g. to a converted copy)."""
    c = convert or (lambda m: m)
    if spec.role == "plugin":
        return _PLUGIN_WRAPPERS[spec.needs[-1]](spec, bundle, c)
    if spec.role not in _ROLE_WRAPPERS:
        raise KeyError(spec.name)
    return _ROLE_WRAPPERS[spec.role](spec, bundle, c)


def model_dims(spec: GraphSpec, bundle: ModuleBundle) -> dict[str, int]:
    """Values of the graph's model dimensions (channels, text widths), read from the configs."""
    dims: dict[str, int] = {}
    if spec.role == "text_encoder" and spec.needs == ("sd15",):
        dims["ctx"] = bundle.sd15.text_encoder.config.hidden_size
    elif spec.role == "text_encoder":
        enc = getattr(bundle.sdxl, spec.lora_target)
        dims.update(ctx=enc.config.hidden_size, pooled=getattr(enc.config, "projection_dim", 0))
    if bundle.sd15 is not None:
        c = list(bundle.sd15.unet.config.block_out_channels)
        rev = c[::-1]
        dims.update(c_f0=rev[1], c_f1=rev[2], c_f2=rev[3], c_mid=c[-1])
        down = [c[0]] + [c[s] for s in range(len(c)) for _ in range(3)][: len(CONTROL_RESIDUALS) - 2]
        dims.update({f"c_down{i}": ch for i, ch in enumerate(down)})
        dims.update({f"c_block{i}": ch for i, ch in enumerate(c)})
        if spec.role == "sd15_unet" or spec.lora_target == "controlnet":
            dims["ctx"] = bundle.sd15.unet.config.cross_attention_dim
        dims["ip_layers"] = sum(n.endswith("attn2.processor") for n in bundle.sd15.unet.attn_processors)
    if bundle.t2i_adapter is not None:
        dims["c_image"] = bundle.t2i_adapter.config.in_channels
    if bundle.mapping is not None:
        dims.update({f"c_f{i}": ch for i, ch in enumerate(bundle.mapping.config.in_channels)})
        dims.update({f"c_r{i}": ch for i, ch in enumerate(bundle.mapping.config.out_channels)})
    if bundle.sdxl is not None and spec.role in ("sdxl_split", "sdxl_fused"):
        cfg = bundle.sdxl.unet.config
        rev = list(cfg.block_out_channels)[::-1]
        dims.update(ctx=cfg.cross_attention_dim, c_r0=rev[0], c_r1=rev[0], c_r2=rev[1],
                    pooled=cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)
    return dims


def example_inputs(spec: GraphSpec, dims: dict[str, int], dtype: torch.dtype, device: torch.device,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded inputs of the declared shapes: floats ~N(0,1), timesteps in [0, 1000), token
    ids below 49406 then the end-of-text id, scales 1.0 (fusion -1: plain add), IP-Adapter
    layer scales in [0.5, 1.5) (a different one per layer)."""
    g = torch.Generator("cpu").manual_seed(seed)
    out = []
    for t in spec.inputs:
        shape = t.resolve(dims)
        if t.dtype == "int64":
            x = torch.randint(0, 49406, shape, generator=g)
            x[:, -1] = 49407
        elif t.name == "image" and spec.name == "t2i_adapter":
            x = torch.rand(shape, generator=g)  # a control image in [0, 1]
        elif t.name == "timestep":
            x = torch.rand(shape, generator=g) * 999
        elif t.name in ("adapter_condition_scale", "conditioning_scale"):
            x = torch.ones(shape)
        elif t.name == "ip_scale":
            x = 0.5 + torch.rand(shape, generator=g)
        elif t.name == "fusion_guidance_scale":
            x = torch.full(shape, FUSION_NONE)
        else:
            x = torch.randn(shape, generator=g)
        out.append(x.to(device, dtype if t.dtype == "float" else x.dtype))
    return tuple(out)
