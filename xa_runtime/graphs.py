"""The one table of graphs: what each exported graph takes and gives, and what it is for.

Export (xa_runtime.export), engine build and refit (xa_runtime.engines), every backend
(xa_runtime.runtime.backends) and the CLIs read these declarations; nothing else names graph
inputs, and every *set* of graphs (what a backend needs per SDXL mode, which graph a plugin
kind feeds, which graphs a LoRA changes, what xa-build-engines builds, what a folder must
hold) is derived here from each graph's role. Pure data, no torch: importing it is free.

Shapes are symbolic. An entry is an int (the same for every model of the family), a
dynamic dimension ("B" batch rows, "H"/"W" latent height/width, "T" tokens, "N" IP-Adapter
image tokens; also "H/2",
"8*H" ... derived from them), or a lowercase model dimension fixed by the weights
("ctx" text width, "c_f0" feature channels ...; static in the exported graph).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .errors import ParameterError
from .plugin_kinds import BACKENDS, PLUGIN_KINDS, get_kind

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
    role: what the graph does in a generation (ROLES); variant: which SD1.5 UNet input set
    ("" plain, "control", "t2i", "ip"; plugin_kinds.PluginKind.variant names it per plugin
    kind); lora_target: the pipeline component whose weights the graph holds (the
    LoRA target name of its weights: "unet", "text_encoder", ...; None: no LoRA reaches it).
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: Mapping[str, DimRange]
    refittable: tuple[str, ...] = ()
    description: str = ""
    # bundle parts: "sd15", "sdxl", "mapping", "controlnet", "t2i_adapter", "ip_adapter"
    needs: tuple[str, ...] = field(default=())
    role: str = ""
    variant: str = ""
    lora_target: str | None = None

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
# The SDXL side of the mapping: SD1.5's features as the mapping takes them (H/W: the SDXL latent
# grid), its residuals, SDXL's added conditions and the two injection scales.
_MAPPING_FEATURES = (_t("f0", "float", "B", "c_f0", "H/4", "W/4"), _t("f1", "float", "B", "c_f1", "H/2", "W/2"),
                     _t("f2", "float", "B", "c_f2", "H/2", "W/2"))
_RESIDUALS = (_t("r0", "float", "B", "c_r0", "H/4", "W/4"), _t("r1", "float", "B", "c_r1", "H/2", "W/2"),
              _t("r2", "float", "B", "c_r2", "H", "W"))
_SDXL_ADDED = (_t("text_embeds", "float", "B", "pooled"), _t("time_ids", "float", "B", 6))
_INJECTION_SCALES = (_t("adapter_condition_scale", "float32", 1), _t("fusion_guidance_scale", "float32", 1))


def _vae_graphs(prefix: str, latent: DimRange, needs: str) -> tuple[GraphSpec, GraphSpec]:
    dims = {"B": IMAGE_ROWS, "H": latent, "W": latent}
    decoder = GraphSpec(
        f"{prefix}_vae_decoder", (_t("latent", "float", "B", 4, "H", "W"),),
        (_t("image", "float", "B", 3, "8*H", "8*W"),), dims,
        description="VAE decode of unscaled latents (divide by scaling_factor first); image in [-1, 1]",
        needs=(needs,), role="vae",
    )
    encoder = GraphSpec(
        f"{prefix}_vae_encoder", (_t("image", "float", "B", 3, "8*H", "8*W"),),
        (_t("latent_mean", "float", "B", 4, "H", "W"), _t("latent_std", "float", "B", 4, "H", "W")), dims,
        description="VAE encode: the posterior's mean and std (sampling and scaling stay outside)",
        needs=(needs,), role="vae",
    )
    return decoder, encoder


def _text_graph(name: str, hidden: str, pooled: bool, needs: str, what: str, component: str) -> GraphSpec:
    outputs = (_t(hidden, "float", "B", "T", "ctx"),) + ((_t("text_embeds", "float", "B", "pooled"),) if pooled else ())
    return GraphSpec(name, (_t("input_ids", "int64", "B", "T"),), outputs, {"B": UNET_ROWS, "T": TOKENS},
                     TEXT_LORA_WEIGHTS, what, (needs,), role="text_encoder", lora_target=component)


_GRAPHS = (
    GraphSpec("sd15_unet", _LATENT_IN, (_t("eps", "float", "B", 4, "H", "W"),) + _FEATURES, _SD15, UNET_LORA_WEIGHTS,
              "SD1.5 UNet: noise prediction and decoder features f0, f1, f2 (up_blocks[1..3] outputs)", ("sd15",),
              role="sd15_unet", lora_target="unet"),
    GraphSpec("sd15_unet_control", _LATENT_IN + CONTROL_RESIDUALS, (_t("eps", "float", "B", 4, "H", "W"),) + _FEATURES,
              _SD15, UNET_LORA_WEIGHTS, "sd15_unet taking ControlNet down/mid residuals (their sum over ControlNets)",
              ("sd15",), role="sd15_unet", variant="control", lora_target="unet"),
    GraphSpec("sd15_unet_t2i", _LATENT_IN + ADAPTER_RESIDUALS, (_t("eps", "float", "B", 4, "H", "W"),) + _FEATURES,
              _SD15, UNET_LORA_WEIGHTS, "sd15_unet taking T2I-Adapter (or Nexus Adapter) features, already scaled, "
              "added inside the down blocks", ("sd15",),
              role="sd15_unet", variant="t2i", lora_target="unet"),
    GraphSpec("sd15_unet_ip", _LATENT_IN + IP_INPUTS, (_t("eps", "float", "B", 4, "H", "W"),) + _FEATURES,
              {**_SD15, "N": IP_TOKENS}, UNET_LORA_WEIGHTS,
              "sd15_unet with one IP-Adapter file's decoupled cross-attention (its to_k_ip/to_v_ip weights baked in, "
              "not refittable): image tokens after the adapter's projection, one scale per cross-attention layer "
              "(a float scale or InstantStyle's per-block dict, expanded)", ("sd15", "ip_adapter"),
              role="sd15_unet", variant="ip", lora_target="unet"),
    GraphSpec("t2i_adapter", (_t("image", "float", "B", "c_image", "8*H", "8*W"),),
              tuple(TensorSpec(f"adapter_feature_{i}", "float", t.shape) for i, t in enumerate(ADAPTER_RESIDUALS)),
              {"B": UNET_ROWS, "H": SD15_LATENT, "W": SD15_LATENT}, (),
              "SD1.5 T2I-Adapter: control image in [0, 1] (grey for 1-channel adapters) -> its 4 features, unscaled "
              "(inputs of sd15_unet_t2i once scaled)", ("sd15", "t2i_adapter"), role="plugin"),
    GraphSpec(
        "mapping", _MAPPING_FEATURES, _RESIDUALS,
        {d: r for d, r in _SDXL.items() if d != "T"}, (), "X-Adapter mapping layers, H/W the SDXL latent grid; r not yet scaled", ("mapping",),
        role="mapping",
    ),
    GraphSpec(
        "sdxl_unet",
        _LATENT_IN + _SDXL_ADDED + _RESIDUALS + _INJECTION_SCALES,
        (_t("eps", "float", "B", 4, "H", "W"),), _SDXL, UNET_LORA_WEIGHTS,
        "SDXL UNet with the residuals injected (mid_block, up_blocks[0], up_blocks[1] outputs): h + acs*r, or "
        "with fusion_guidance_scale s >= 0 h + s*(acs*r - h); s < 0 means plain add (encode_fusion)",
        ("sdxl",), role="sdxl_split", lora_target="unet",
    ),
    GraphSpec(
        "sdxl_unet_fused",
        _LATENT_IN + _SDXL_ADDED + _MAPPING_FEATURES + _INJECTION_SCALES,
        (_t("eps", "float", "B", 4, "H", "W"),), _SDXL, UNET_LORA_WEIGHTS,
        "mapping + sdxl_unet in one graph: SD1.5 features f0..f2 in (as mapping takes them), the residuals "
        "made and injected inside; the mapping weights are not refittable",
        ("sdxl", "mapping"), role="sdxl_fused", lora_target="unet",
    ),
    GraphSpec(
        "controlnet",
        _LATENT_IN + (_t("controlnet_cond", "float", "B", 3, "8*H", "8*W"), _t("conditioning_scale", "float32", 1)),
        CONTROL_RESIDUALS, _SD15, UNET_LORA_WEIGHTS,
        "SD1.5 ControlNet (no guess mode): residuals times conditioning_scale, inputs of sd15_unet_control",
        ("sd15", "controlnet"), role="plugin", lora_target="controlnet",
    ),
    *_vae_graphs("sd15", SD15_LATENT, "sd15"),
    *_vae_graphs("sdxl", SDXL_LATENT, "sdxl"),
    _text_graph("sd15_text_encoder", "hidden_states", False, "sd15", "SD1.5 CLIP-L: last hidden state", "text_encoder"),
    _text_graph("sdxl_text_encoder", "hidden_states", False, "sdxl", "SDXL CLIP-L: penultimate hidden state",
                "text_encoder"),
    _text_graph("sdxl_text_encoder_2", "hidden_states", True, "sdxl",
                "SDXL OpenCLIP-bigG: penultimate hidden state and projected pooled embedding", "text_encoder_2"),
)

GRAPHS: dict[str, GraphSpec] = {g.name: g for g in _GRAPHS}


def get_graph(name: str) -> GraphSpec:
    """The declaration of graph `name`; ParameterError listing the known graphs."""
    if name not in GRAPHS:
        raise ParameterError("graph", name, f"one of {', '.join(GRAPHS)}")
    return GRAPHS[name]


# ------------------------------------------------------------------ roles and the sets derived from them
ROLES = ("sd15_unet", "mapping", "sdxl_split", "sdxl_fused", "plugin", "vae", "text_encoder")
# How the SDXL side of stage 2 runs: "split" (the mapping graph, then sdxl_unet) or "fused"
# (sdxl_unet_fused: the mapping inside the SDXL UNet graph, one call per step); "auto" picks.
SDXL_MODE_ROLES = {"split": ("mapping", "sdxl_split"), "fused": ("sdxl_fused",)}
SDXL_MODES = ("auto", *SDXL_MODE_ROLES)
# What "auto" picks when a folder has both: the faster one measured on onnxruntime CPU
# (benchmarks/bench_sdxl_split.py, README "Export").
PREFERRED_SDXL_MODE = "fused"
# The UNet graphs of each pipeline branch: a LoRA of that branch changes all of them.
LORA_BRANCH_ROLES = {"sd15": ("sd15_unet",), "sdxl": ("sdxl_split", "sdxl_fused")}
# The plugin kinds each non-torch backend runs through graph variants (plugin_kinds' table).
BACKEND_PLUGINS = {b: tuple(k.name for k in PLUGIN_KINDS if k.variant and b in k.backends) for b in BACKENDS[1:]}
# How a folder holds each graph: an xa-export folder NAME.onnx (+ manifest.json); an
# xa-build-engines folder NAME.engine.json beside NAME.plan.
FOLDER_KINDS = ("onnx", "engine")
ONNX_MANIFEST = "manifest.json"
# fusion_guidance_scale in the graphs is a tensor: this value stands for None (plain add).
FUSION_NONE = -1.0


def graphs_with_role(*roles: str) -> tuple[str, ...]:
    """Names of the graphs of these roles, in table order."""
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ParameterError("role", bad[0], f"one of {', '.join(ROLES)}")
    return tuple(g.name for g in _GRAPHS if g.role in roles)


# the SD1.5 UNet every backend runs, and its variants with plugin inputs (ControlNet
# residuals / T2I-Adapter features / IP-Adapter image tokens), loaded when present
BASE_SD15_UNET = next(g.name for g in _GRAPHS if g.role == "sd15_unet" and not g.variant)
OPTIONAL_GRAPHS = tuple(g.name for g in _GRAPHS if g.role == "sd15_unet" and g.variant)
FUSED_GRAPH = graphs_with_role("sdxl_fused")[0]  # mapping + SDXL UNet in one graph
# plugin kind -> the SD1.5 UNet graph its step arguments go into
PLUGIN_GRAPHS = {k.name: g.name for k in PLUGIN_KINDS for g in _GRAPHS if g.role == "sd15_unet" and g.variant == k.variant}
# LoRA branch -> the graphs holding that branch's UNet
LORA_GRAPHS = {branch: graphs_with_role(*roles) for branch, roles in LORA_BRANCH_ROLES.items()}
# graph -> the pipeline component its weights belong to (the LoRA target name)
LORA_TARGETS = {g.name: g.lora_target for g in _GRAPHS if g.lora_target is not None}


def check_sdxl_mode(sdxl_mode: str, name: str = "sdxl_mode", auto: bool = True) -> str:
    modes = SDXL_MODES if auto else tuple(SDXL_MODE_ROLES)
    if sdxl_mode not in modes:
        raise ParameterError(name, sdxl_mode, " or ".join(modes))
    return sdxl_mode


def required_graphs(sdxl_mode: str) -> list[str]:
    """The graphs a backend needs to run both stages in SDXL mode "split" or "fused"."""
    check_sdxl_mode(sdxl_mode, auto=False)
    return [BASE_SD15_UNET, *graphs_with_role(*SDXL_MODE_ROLES[sdxl_mode])]


def plugin_graphs(kinds: Sequence[str]) -> list[str]:
    """The SD1.5 UNet graph variants the given plugin kinds need (none for LoRAs), sorted."""
    names = [get_kind(k).name for k in kinds]
    return sorted({PLUGIN_GRAPHS[k] for k in names if k in PLUGIN_GRAPHS})


def default_build_graphs(sdxl_mode: str, exported: Callable[[str], bool] = lambda name: False) -> list[str]:
    """What xa-build-engines builds without --graphs: the graphs of `sdxl_mode` ("split" or
    "fused"), plus the plugin variants the tensorrt backend runs that exported(name) says
    the ONNX folder holds."""
    return required_graphs(sdxl_mode) + [g for g in backend_optional_graphs("tensorrt") if exported(g)]


def backend_optional_graphs(backend: str) -> list[str]:
    """The graph variants of the plugins `backend` runs ("onnxruntime" or "tensorrt")."""
    if backend not in BACKEND_PLUGINS:
        raise ParameterError("backend", backend, " or ".join(BACKEND_PLUGINS))
    variants = {get_kind(k).variant for k in BACKEND_PLUGINS[backend]}
    return [g for g in OPTIONAL_GRAPHS if GRAPHS[g].variant in variants]


def resolve_sdxl_mode(has: Callable[[str], bool], sdxl_mode: str) -> str:
    """"auto" -> PREFERRED_SDXL_MODE when its graphs are present (has(name)), or the other
    mode's when only those are; "split" / "fused" as given."""
    check_sdxl_mode(sdxl_mode)
    if sdxl_mode != "auto":
        return sdxl_mode
    ok = {m: all(has(g) for g in graphs_with_role(*roles)) for m, roles in SDXL_MODE_ROLES.items()}
    other = next(m for m in SDXL_MODE_ROLES if m != PREFERRED_SDXL_MODE)
    return PREFERRED_SDXL_MODE if ok[PREFERRED_SDXL_MODE] or not ok[other] else other


def select_graphs(has: Callable[[str], bool], sdxl_mode: str) -> tuple[str, list[str], list[str]]:
    """(resolved sdxl_mode, required graphs, optional graphs present) for a folder in which
    has(name) tells whether graph `name` exists (ONNX files or engines)."""
    mode = resolve_sdxl_mode(has, sdxl_mode)
    return mode, required_graphs(mode), [g for g in OPTIONAL_GRAPHS if has(g)]


def select_folder_graphs(folder: str | Path, kind: str, sdxl_mode: str) -> tuple[str, list[str], list[str], list[str]]:
    """select_graphs for a backend folder (kind "onnx" or "engine"), plus the required graphs
    it lacks: (resolved sdxl_mode, required, optional present, missing)."""
    has = has_graph(folder, kind)
    mode, required, optional = select_graphs(has, sdxl_mode)
    return mode, required, optional, [g for g in required if not has(g)]


def graphs_wanted(sdxl_mode: str, suffix: str = "") -> str:
    """Words for an error: the graphs a backend folder needs in `sdxl_mode`."""
    if sdxl_mode == "auto":
        split, fused = (" + ".join(g + suffix for g in graphs_with_role(*SDXL_MODE_ROLES[m])) for m in ("split", "fused"))
        return f"{BASE_SD15_UNET}{suffix} and either {split} or {fused}"
    return ", ".join(g + suffix for g in required_graphs(sdxl_mode))


def graph_files(name: str, kind: str) -> tuple[str, ...]:
    """The files of graph `name` in a folder of `kind` ("onnx": NAME.onnx; "engine":
    NAME.engine.json and NAME.plan)."""
    if kind not in FOLDER_KINDS:
        raise ParameterError("kind", kind, " or ".join(FOLDER_KINDS))
    return (f"{name}.onnx",) if kind == "onnx" else (f"{name}.engine.json", f"{name}.plan")


def has_graph(folder: str | Path, kind: str) -> Callable[[str], bool]:
    """has(name): whether `folder` holds all files of graph `name` (graph_files)."""
    return lambda name: all((Path(folder) / f).is_file() for f in graph_files(name, kind))


def missing_files(folder: str | Path, kind: str, sdxl_mode: str = "auto", extra: Sequence[str] = ()) -> list[str]:
    """The files a backend folder of `kind` lacks to run in `sdxl_mode` (and the `extra`
    graphs, e.g. plugin_graphs(...)); [] when the set is usable. "auto" accepts either mode's
    graphs (and names what the closer one lacks when neither is complete). An ONNX folder
    also needs its manifest.json."""
    folder = Path(folder)
    if not folder.is_dir():
        return [str(folder)]
    check_sdxl_mode(sdxl_mode)

    def missing(mode: str) -> list[str]:
        names = list(dict.fromkeys([*required_graphs(mode), *extra]))
        files = [f for g in names for f in graph_files(g, kind)] + ([ONNX_MANIFEST] if kind == "onnx" else [])
        return [f for f in files if not (folder / f).is_file()]

    if sdxl_mode != "auto":
        return missing(sdxl_mode)
    # either mode will do: the one closest to complete (the preferred one on a tie)
    modes = sorted(SDXL_MODE_ROLES, key=lambda m: m != PREFERRED_SDXL_MODE)
    return min((missing(m) for m in modes), key=len)


def folder_problem(folder: str | Path, kind: str, plugin_kinds: Sequence[str] = ()) -> str | None:
    """What a backend folder lacks (None: a usable set in either SDXL mode, plus the graph
    variants of `plugin_kinds`), as the end of "FLAG: FOLDER is not ...": the checks of
    xa-generate, xa-bench and xa-serve. kind: "onnx" (xa-export's folder) or "engine"
    (xa-build-engines')."""
    extra = plugin_graphs(plugin_kinds)
    missing = missing_files(folder, kind, extra=extra)
    if not missing:
        return None
    plus = f" and {', '.join(g + ('.onnx' if kind == 'onnx' else '') for g in extra)}" if extra else ""
    if kind == "onnx":
        wanted = f"an xa-export folder with {ONNX_MANIFEST}, {graphs_wanted('auto', '.onnx')}{plus}"
    else:
        wanted = f"an xa-build-engines folder with engines (NAME.engine.json + NAME.plan) of {graphs_wanted('auto')}{plus}"
    return f"{wanted}; missing {', '.join(missing)}"


def encode_fusion(fusion_guidance_scale: float | None) -> float:
    """fusion_guidance_scale as the graphs take it: a float, FUSION_NONE for None (plain add)."""
    return FUSION_NONE if fusion_guidance_scale is None else float(fusion_guidance_scale)
