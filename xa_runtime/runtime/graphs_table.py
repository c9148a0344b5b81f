"""The one table of graphs: what each exported graph takes and gives, written once.

Export (xa_runtime.export), engine build and refit (xa_runtime.engines) and every backend
(xa_runtime.runtime.*_backend) read these declarations; nothing else names graph inputs.
Pure data, no torch: importing it is free.

Shapes are symbolic. An entry is an int (the same for every model of the family), a
dynamic dimension ("B" batch rows, "H"/"W" latent height/width, "T" tokens, "N" IP-Adapter
image tokens; also "H/2",
"8*H" ... derived from them), or a lowercase model dimension fixed by the weights
("ctx" text width, "c_f0" feature channels ...; static in the exported graph).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

DTYPE_KINDS = ("float", "float32", "int64")  # "float": the graph's dtype (fp16 or fp32)
DYNAMIC_DIMS = ("B", "H", "W", "T", "N")
_EXPR = re.compile(r"^(?:(\d+)\*)?([BHWTN])(?:/(\d+))?$")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype kind, symbolic shape."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape for dimension values `dims` (dynamic and model dimensions)."""
        return tuple(resolve_dim(d, dims) for d in self.shape)

    def dynamic_axes(self) -> dict[int, str]:
        """axis -> name of each dynamic axis (the exported graph's dim_param)."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str) and _EXPR.match(d)}


def resolve_dim(dim: int | str, dims: Mapping[str, int]) -> int:
    """An int as is; "H", "2*H", "H/4" or a model dimension ("ctx") from `dims`."""
    if isinstance(dim, int):
        return dim
    m = _EXPR.match(dim)
    if m is None:
        if dim not in dims:
            raise KeyError(f"model dimension {dim!r} is not given")
        return dims[dim]
    mult, base, div = m.groups()
    value = dims[base] * int(mult or 1)
    if div is not None:
        if value % int(div):
            raise ValueError(f"{dim} is not whole for {base}={dims[base]}")
        value //= int(div)
    return value


def solve_dims(tensors: tuple[TensorSpec, ...], shapes: list[tuple[int, ...]]) -> dict[str, int]:
    """Values of the dynamic dimensions ("B", "H", ...) read back from concrete `shapes` of
    `tensors` (an axis "H/4" of size 8 gives H = 32; "8*H" of 256 gives 32)."""
    out: dict[str, int] = {}
    for t, shape in zip(tensors, shapes):
        for d, v in zip(t.shape, shape):
            m = _EXPR.match(d) if isinstance(d, str) else None
            if m is not None:
                mult, base, div = m.groups()
                out.setdefault(base, v * int(div or 1) // int(mult or 1))
    return out


@dataclass(frozen=True)
class DimRange:
    """TensorRT-style optimisation profile of one dynamic dimension."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: ordered inputs and outputs, profiles, refittable weights.

    profiles: dynamic dimension -> DimRange (latent units for H/W, rows for B).
    refittable: regular expressions (re.search) over the torch parameter names of the
    exported module; matches are the weights a LoRA changes, refitted without a rebuild.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: Mapping[str, DimRange]
    refittable: tuple[str, ...] = ()
    description: str = ""
    # bundle parts: "sd15", "sdxl", "mapping", "controlnet", "t2i_adapter", "ip_adapter"
    needs: tuple[str, ...] = field(default=())

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes for every input and output."""
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs if t.dynamic_axes()}

    def profile_dims(self, which: str) -> dict[str, int]:
        """Dynamic dimension values at "min", "opt" or "max"."""
        return {d: getattr(r, which) for d, r in self.profiles.items()}

    def profile_shapes(self, model_dims: Mapping[str, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """input name -> (min, opt, max) shapes, as a TensorRT optimisation profile takes them."""
        out = {}
        for t in self.inputs:
            out[t.name] = tuple(t.resolve({**model_dims, **self.profile_dims(w)}) for w in ("min", "opt", "max"))
        return out

    def is_refittable(self, parameter_name: str) -> bool:
        return any(re.search(p, parameter_name) for p in self.refittable)


# ------------------------------------------------------------------ profiles
# Rows: 1-4 images, x2 with classifier-free guidance. Latents are 1/8 of pixels:
# SD1.5 256-1024 px, SDXL 512-1536 px. The pipeline pads prompts to CLIP's 77 tokens;
# T stays dynamic in the graphs so a wider profile (prompt chunks) needs no re-export.
UNET_ROWS = DimRange(1, 2, 8)
IMAGE_ROWS = DimRange(1, 1, 4)  # VAEs see images, never the CFG-doubled batch
SD15_LATENT = DimRange(32, 64, 128)
SDXL_LATENT = DimRange(64, 128, 192)
TOKENS = DimRange(77, 77, 77)
# IP-Adapter image tokens after its projection, all images of the prompt side by side:
# 4 per image ("plain" ip-adapter_sd15), 16 ("plus"), 257 ("full": one per CLIP ViT-H token).
IP_TOKENS = DimRange(4, 16, 257)

# ------------------------------------------------------------------ refittable weights
# What LoRAs change (plugins/lora_formats.py): attention projections, the transformer's
# proj_in/proj_out and feed-forward, and (kohya LoCon) every conv/linear of the resnets and
# the down/upsamplers. Weights only: LoRA deltas never touch biases or norms.
UNET_LORA_WEIGHTS = (
    r"\.attn[12]\.to_(q|k|v|out\.0)\.weight$",
    r"\.attentions\.\d+\.proj_(in|out)\.weight$",
    r"\.ff\.net\.(0\.proj|2)\.weight$",
    r"\.resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)\.weight$",
    r"\.(downsamplers|upsamplers)\.0\.conv\.weight$",
)
TEXT_LORA_WEIGHTS = (r"\.self_attn\.(q|k|v|out)_proj\.weight$", r"\.mlp\.fc[12]\.weight$")


def _t(name: str, dtype: str, *shape: int | str) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


_LATENT_IN = (_t("sample", "float", "B", 4, "H", "W"), _t("timestep", "float32", "B"),
              _t("encoder_hidden_states", "float", "B", "T", "ctx"))
_FEATURES = (_t("f0", "float", "B", "c_f0", "H/2", "W/2"), _t("f1", "float", "B", "c_f1", "H", "W"),
             _t("f2", "float", "B", "c_f2", "H", "W"))
# ControlNet residuals of the SD1.5 down path: conv_in, then per stage two resnets and a
# downsampler (none after the last stage): 12 tensors at H, H, H, H/2 x 3, H/4 x 3, H/8 x 3.
_DOWN_SCALES = ("", "", "", "/2", "/2", "/2", "/4", "/4", "/4", "/8", "/8", "/8")
CONTROL_RESIDUALS = tuple(
    _t(f"down_block_residual_{i}", "float", "B", f"c_down{i}", "H" + s, "W" + s) for i, s in enumerate(_DOWN_SCALES)
) + (_t("mid_block_residual", "float", "B", "c_mid", "H/8", "W/8"),)
# T2I-Adapter features: one per SD1.5 down block (added after its last resnet/attention pair,
# diffusers' down_intrablock_additional_residuals), at H, H/2, H/4, H/8 with the blocks' widths.
ADAPTER_RESIDUALS = tuple(
    _t(f"adapter_residual_{i}", "float", "B", f"c_block{i}", "H" + s, "W" + s) for i, s in enumerate(("", "/2", "/4", "/8"))
)
_SD15 = {"B": UNET_ROWS, "H": SD15_LATENT, "W": SD15_LATENT, "T": TOKENS}
# IP-Adapter: its projected image tokens and one scale per cross-attention layer ("ip_layers":
# the UNet's attn2 layers in attn_processors order, 16 for SD1.5).
IP_INPUTS = (_t("ip_tokens", "float", "B", "N", "ctx"), _t("ip_scale", "float32", "ip_layers"))
_SDXL = {"B": UNET_ROWS, "H": SDXL_LATENT, "W": SDXL_LATENT, "T": TOKENS}


def _vae_graphs(prefix: str, latent: DimRange, needs: str) -> tuple[GraphSpec, GraphSpec]:
    dims = {"B": IMAGE_ROWS, "H": latent, "W": latent}
    decoder = GraphSpec(
        f"{prefix}_vae_decoder", (_t("latent", "float", "B", 4, "H", "W"),),
        (_t("image", "float", "B", 3, "8*H", "8*W"),), dims,
        description="VAE decode of unscaled latents (divide by scaling_factor first); image in [-1, 1]",
        needs=(needs,),
    )
    encoder = GraphSpec(
        f"{prefix}_vae_encoder", (_t("image", "float", "B", 3, "8*H", "8*W"),),
        (_t("latent_mean", "float", "B", 4, "H", "W"), _t("latent_std", "float", "B", 4, "H", "W")), dims,
        description="VAE encode: the posterior's mean and std (sampling and scaling stay outside)",
        needs=(needs,),
    )
    return decoder, encoder


def _text_graph(name: str, hidden: str, pooled: bool, needs: str, what: str) -> GraphSpec:
    outputs = (_t(hidden, "float", "B", "T", "ctx"),) + ((_t("text_embeds", "float", "B", "pooled"),) if pooled else ())
    return GraphSpec(name, (_t("input_ids", "int64", "B", "T"),), outputs, {"B": UNET_ROWS, "T": TOKENS},
                     TEXT_LORA_WEIGHTS, what, (needs,))


_GRAPHS = (
    GraphSpec("sd15_unet", _LATENT_IN, (_t("eps", "float", "B", 4, "H", "W"),) + _FEATURES, _SD15, UNET_LORA_WEIGHTS,
              "SD1.5 UNet: noise prediction and decoder features f0, f1, f2 (up_blocks[1..3] outputs)", ("sd15",)),
    GraphSpec("sd15_unet_control", _LATENT_IN + CONTROL_RESIDUALS, (_t("eps", "float", "B", 4, "H", "W"),) + _FEATURES,
              _SD15, UNET_LORA_WEIGHTS, "sd15_unet taking ControlNet down/mid residuals (their sum over ControlNets)",
              ("sd15",)),
    GraphSpec("sd15_unet_t2i", _LATENT_IN + ADAPTER_RESIDUALS, (_t("eps", "float", "B", 4, "H", "W"),) + _FEATURES,
              _SD15, UNET_LORA_WEIGHTS, "sd15_unet taking T2I-Adapter (or Nexus Adapter) features, already scaled, "
              "added inside the down blocks", ("sd15",)),
    GraphSpec("sd15_unet_ip", _LATENT_IN + IP_INPUTS, (_t("eps", "float", "B", 4, "H", "W"),) + _FEATURES,
              {**_SD15, "N": IP_TOKENS}, UNET_LORA_WEIGHTS,
              "sd15_unet with one IP-Adapter file's decoupled cross-attention (its to_k_ip/to_v_ip weights baked in, "
              "not refittable): image tokens after the adapter's projection, one scale per cross-attention layer "
              "(a float scale or InstantStyle's per-block dict, expanded)", ("sd15", "ip_adapter")),
    GraphSpec("t2i_adapter", (_t("image", "float", "B", "c_image", "8*H", "8*W"),),
              tuple(TensorSpec(f"adapter_feature_{i}", "float", t.shape) for i, t in enumerate(ADAPTER_RESIDUALS)),
              {"B": UNET_ROWS, "H": SD15_LATENT, "W": SD15_LATENT}, (),
              "SD1.5 T2I-Adapter: control image in [0, 1] (grey for 1-channel adapters) -> its 4 features, unscaled "
              "(inputs of sd15_unet_t2i once scaled)", ("sd15", "t2i_adapter")),
    GraphSpec(
        "mapping",
        (_t("f0", "float", "B", "c_f0", "H/4", "W/4"), _t("f1", "float", "B", "c_f1", "H/2", "W/2"),
         _t("f2", "float", "B", "c_f2", "H/2", "W/2")),
        (_t("r0", "float", "B", "c_r0", "H/4", "W/4"), _t("r1", "float", "B", "c_r1", "H/2", "W/2"),
         _t("r2", "float", "B", "c_r2", "H", "W")),
        {d: r for d, r in _SDXL.items() if d != "T"}, (), "X-Adapter mapping layers, H/W the SDXL latent grid; r not yet scaled", ("mapping",),
    ),
    GraphSpec(
        "sdxl_unet",
        _LATENT_IN + (
            _t("text_embeds", "float", "B", "pooled"), _t("time_ids", "float", "B", 6),
            _t("r0", "float", "B", "c_r0", "H/4", "W/4"), _t("r1", "float", "B", "c_r1", "H/2", "W/2"),
            _t("r2", "float", "B", "c_r2", "H", "W"),
            _t("adapter_condition_scale", "float32", 1), _t("fusion_guidance_scale", "float32", 1),
        ),
        (_t("eps", "float", "B", 4, "H", "W"),), _SDXL, UNET_LORA_WEIGHTS,
        "SDXL UNet with the residuals injected (mid_block, up_blocks[0], up_blocks[1] outputs): h + acs*r, or "
        "with fusion_guidance_scale s >= 0 h + s*(acs*r - h); s < 0 means plain add",
        ("sdxl",),
    ),
    GraphSpec(
        "sdxl_unet_fused",
        _LATENT_IN + (
            _t("text_embeds", "float", "B", "pooled"), _t("time_ids", "float", "B", 6),
            _t("f0", "float", "B", "c_f0", "H/4", "W/4"), _t("f1", "float", "B", "c_f1", "H/2", "W/2"),
            _t("f2", "float", "B", "c_f2", "H/2", "W/2"),
            _t("adapter_condition_scale", "float32", 1), _t("fusion_guidance_scale", "float32", 1),
        ),
        (_t("eps", "float", "B", 4, "H", "W"),), _SDXL, UNET_LORA_WEIGHTS,
        "mapping + sdxl_unet in one graph: SD1.5 features f0..f2 in (as mapping takes them), the residuals "
        "made and injected inside; the mapping weights are not refittable",
        ("sdxl", "mapping"),
    ),
    GraphSpec(
        "controlnet",
        _LATENT_IN + (_t("controlnet_cond", "float", "B", 3, "8*H", "8*W"), _t("conditioning_scale", "float32", 1)),
        CONTROL_RESIDUALS, _SD15, UNET_LORA_WEIGHTS,
        "SD1.5 ControlNet (no guess mode): residuals times conditioning_scale, inputs of sd15_unet_control",
        ("sd15", "controlnet"),
    ),
    *_vae_graphs("sd15", SD15_LATENT, "sd15"),
    *_vae_graphs("sdxl", SDXL_LATENT, "sdxl"),
    _text_graph("sd15_text_encoder", "hidden_states", False, "sd15", "SD1.5 CLIP-L: last hidden state"),
    _text_graph("sdxl_text_encoder", "hidden_states", False, "sdxl", "SDXL CLIP-L: penultimate hidden state"),
    _text_graph("sdxl_text_encoder_2", "hidden_states", True, "sdxl",
                "SDXL OpenCLIP-bigG: penultimate hidden state and projected pooled embedding"),
)

GRAPHS: dict[str, GraphSpec] = {g.name: g for g in _GRAPHS}


def get_graph(name: str) -> GraphSpec:
    """The declaration of graph `name`; ParameterError listing the known graphs."""
    from ..errors import ParameterError

    if name not in GRAPHS:
        raise ParameterError("graph", name, f"one of {', '.join(GRAPHS)}")
    return GRAPHS[name]
