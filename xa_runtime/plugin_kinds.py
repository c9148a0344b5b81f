"""The one table of plugin kinds: each kind's name and aliases, its xa-generate flags, its
xa-serve config keys, whether it takes an image, the SD1.5 graph variant it needs, the
backends that run it and its loader. `PluginSpec` is the one typed value that xa-generate's
flags, the xa-serve TOML `[plugins.NAME]` tables and the Python API parse into, and
`check_backend` the one place that says whether a set of specs runs on a backend.

Pure data, no torch: importing it is free (the loaders are named by dotted path and
imported only when a plugin is loaded, by XAdapterPipeline.load_plugin). graphs.py derives
the graph a plugin kind feeds from `variant` here.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .errors import ParameterError

BACKENDS = ("torch", "onnxruntime", "tensorrt")  # torch runs the modules themselves, every plugin included


@dataclass(frozen=True)
class PluginKind:
    """One row of the table.

    name: the canonical kind (what specs carry); aliases: other spellings accepted on input.
    flags: xa-generate's flags of this kind (the first loads it); config_keys: the keys of an
    xa-serve [plugins.NAME] table besides kind and path. takes_image: a control / image prompt
    image per use. variant: the SD1.5 UNet graph variant (graphs.GraphSpec.variant) its step
    arguments go into on a graph backend; None: none (LoRAs change weights, refitted).
    backends: where one run (xa-generate, the Python API) runs it; served_backends: where
    xa-serve runs it, switched on and off per request. branch: "sd15" / "sdxl", the branch a
    LoRA kind goes to (None: a step plugin on the SD1.5 UNet). loader: "module:function"
    building the step plugin from (SD1.5 UNet, PluginSpec), resolved lazily (None for LoRAs:
    the pipeline's load_lora_weights loads them). installed: it installs into the SD1.5 UNet
    itself (attention processors): one active per generation, suspended while unused, and on a
    graph backend its weights are baked into its graph variant (exported from that file).
    cli_generic: xa-generate makes and checks its flags from the row alone: flags are (PATH
    flag, image flag, scale flag), the path a folder with a config.json; description: what
    the path is, for --help and errors. label: the kind's name in an image's infotext."""

    name: str
    aliases: tuple[str, ...]
    flags: tuple[str, ...]
    config_keys: tuple[str, ...]
    takes_image: bool
    variant: str | None
    backends: tuple[str, ...]
    served_backends: tuple[str, ...]
    branch: str | None = None
    loader: str | None = None
    installed: bool = False
    cli_generic: bool = False
    description: str = ""
    label: str = ""  # its name in an image's infotext (`X-Adapter <label> <i>` entries); "": none

    def load(self) -> Callable[..., Any]:
        """The loader function (imports its module: torch)."""
        if self.loader is None:
            raise ParameterError("kind", self.name, "a step plugin kind (LoRAs load through load_lora_weights)")
        module, _, name = self.loader.partition(":")
        return getattr(importlib.import_module(module), name)


PLUGIN_KINDS: tuple[PluginKind, ...] = (
    PluginKind("lora", (), ("--lora", "--lora-mode"), ("scale",), False, None, BACKENDS, ("torch",),
               branch="sd15", description="an SD1.5 LoRA (kohya or diffusers/PEFT) on the SD1.5 branch"),
    PluginKind("sdxl_lora", (), ("--sdxl-lora", "--lora-mode"), ("scale",), False, None, BACKENDS, ("torch",),
               branch="sdxl", description="an SDXL LoRA on the SDXL branch"),
    PluginKind("controlnet", (), ("--controlnet", "--control-image", "--control-type", "--controlnet-scale",
                                  "--control-start", "--control-end", "--guess-mode"),
               ("scale", "image"), True, "control", BACKENDS, BACKENDS,
               loader="xa_runtime.plugins.controlnet:plugin_from_spec", description="an SD1.5 ControlNet"),
    PluginKind("t2i", ("t2i_adapter",), ("--t2i-adapter", "--t2i-image", "--t2i-scale", "--t2i-factor"),
               ("scale", "image"), True, "t2i", ("torch", "onnxruntime"), ("torch", "onnxruntime"),
               loader="xa_runtime.plugins.t2i_adapter:plugin_from_spec", description="an SD1.5 T2I-Adapter",
               label="T2I-Adapter"),
    PluginKind("nexus", ("nexus_adapter",), ("--nexus-adapter", "--adapter-image", "--nexus-scale"),
               ("scale", "image"), True, "t2i", ("torch", "onnxruntime"), ("torch", "onnxruntime"),
               loader="xa_runtime.plugins.nexus:plugin_from_spec", cli_generic=True, description="Nexus Adapter folder",
               label="Nexus"),
    PluginKind("ip_adapter", ("ip",), ("--ip-adapter", "--ip-image", "--ip-scale", "--image-encoder"),
               ("scale", "image", "image_encoder"), True, "ip", ("torch", "onnxruntime"), ("torch",),
               loader="xa_runtime.plugins.ip_adapter:plugin_from_spec", installed=True,
               description="an SD1.5 IP-Adapter", label="IP-Adapter"),
)
KINDS: dict[str, PluginKind] = {k.name: k for k in PLUGIN_KINDS}
_BY_SPELLING: dict[str, PluginKind] = {s: k for k in PLUGIN_KINDS for s in (k.name, *k.aliases)}
KIND_NAMES = tuple(KINDS)
LORA_KINDS = tuple(k.name for k in PLUGIN_KINDS if k.branch is not None)
IMAGE_KINDS = tuple(k.name for k in PLUGIN_KINDS if k.takes_image)
CONTROLNET = "controlnet"  # the kind sd-webui-controlnet's infotext entries ("ControlNet <i>") describe


def get_kind(kind: str, name: str = "kind") -> PluginKind:
    """The row of `kind` (its name or an alias); a ParameterError naming the accepted kinds otherwise."""
    row = _BY_SPELLING.get(kind) if isinstance(kind, str) else None
    if row is None:
        accepted = ", ".join(f"{k.name}" + (f" ({'/'.join(k.aliases)})" if k.aliases else "") for k in PLUGIN_KINDS)
        raise ParameterError(name, kind, f"one of the plugin kinds {accepted}")
    return row


def _finite(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and lo <= value <= hi):
        raise ParameterError(name, value, f"a finite number in [{lo}, {hi}]")
    return float(value)


@dataclass(frozen=True)
class PluginSpec:
    """One plugin to load: its kind (canonicalised from an alias), the model path and its
    settings. name: the name it is known by (xa-serve's [plugins.NAME]; the LoRA adapter name);
    image: its control image, or the IP-Adapter's image(s); None where each use sends one.
    fused: a LoRA written into the weights (fastest per step) rather than a side path."""

    name: str | None
    kind: str
    path: str
    scale: float = 1.0
    image: str | tuple[str, ...] | None = None
    image_encoder: str | None = None   # ip_adapter only
    control_type: str = "none"
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    guess_mode: bool = False
    conditioning_factor: float = 1.0
    fused: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", get_kind(self.kind).name)

    @property
    def row(self) -> PluginKind:
        return KINDS[self.kind]

    def record(self) -> dict[str, Any]:
        """What a sidecar records of this plugin (the fields that matter for its kind)."""
        out: dict[str, Any] = {"path": self.path, "scale": self.scale}
        if self.row.branch is not None:
            out["mode"] = "fused" if self.fused else "unfused"
        elif self.kind == "ip_adapter":
            out.update(images=list(self.image) if isinstance(self.image, tuple) else [self.image],
                       image_encoder=self.image_encoder)
        else:
            out["image"] = self.image
        if self.kind == "controlnet":
            out["conditioning_scale"] = out.pop("scale")
            out.update(control_type=self.control_type, guidance_start=self.guidance_start,
                       guidance_end=self.guidance_end, guess_mode=self.guess_mode)
        elif self.kind == "t2i":
            out["conditioning_factor"] = self.conditioning_factor
        return out


def check_scale(name: str, value: Any, lo: float = 0.0, hi: float = 10.0) -> float:
    """A plugin's scale: a finite number in [lo, hi] (LoRAs: [-10, 10])."""
    return _finite(name, value, lo, hi)


def plugin_variants(kinds: Iterable[str]) -> list[str]:
    """The SD1.5 graph variants the given kinds need, sorted (none for LoRAs)."""
    return sorted({v for k in kinds if (v := get_kind(k).variant) is not None})


def check_backend(specs: Iterable[PluginSpec], backend: str, label: Callable[[PluginSpec], str], *,
                  served: bool = False, plugin_graphs: bool = True) -> str | None:
    """Whether `specs` run on `backend`: None, or the problem as one line naming the specs by
    label(spec) (a flag, a config key). served: xa-serve switches plugins per request
    (PluginKind.served_backends); otherwise one run's set (PluginKind.backends), which on a
    graph backend may need at most one SD1.5 graph variant (no graph takes two).
    plugin_graphs=False: the backend's graphs have no plugin inputs (the benchmark's), so
    any plugin needs torch."""
    if backend not in BACKENDS:
        return f"backend {backend!r}: one of {', '.join(BACKENDS)}"
    specs = list(specs)
    if backend == "torch" or not specs:
        return None
    for s in specs:
        allowed = s.row.served_backends if served else s.row.backends
        if backend not in allowed or not plugin_graphs:
            takes = [k.name for k in PLUGIN_KINDS if backend in (k.served_backends if served else k.backends)]
            why = "its graphs have no plugin inputs" if not plugin_graphs else f"{backend} takes {', '.join(takes)}"
            return f"{label(s)} needs backend torch ({why})"
    if not served:
        variants = plugin_variants(s.kind for s in specs)
        if len(variants) > 1:
            labels = list(dict.fromkeys(label(s) for s in specs if s.row.variant is not None))
            return f"{' and '.join(labels)} together need backend torch (no {backend} graph takes both)"
    return None
