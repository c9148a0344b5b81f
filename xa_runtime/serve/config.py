"""The `xa-serve` TOML config: models, configured plugins (name -> path, kind, scale), limits.

    [models]                      # all three, or none for the built-in tiny models
    sd15 = "models/stable-diffusion-v1-5"
    sdxl = "models/sd_xl_base_1.0.safetensors"
    adapter = "models/X_Adapter_v1.bin"
    device = "cuda"               # default cpu
    dtype = "fp16"                # fp32 (default), fp16, bf16

    [limits]                      # every key optional (defaults: Limits below)
    queue_size = 8
    deadline_s = 120

    [plugins.anime]               # requests name plugins by these names only
    kind = "lora"                 # lora, sdxl_lora, controlnet, t2i, nexus, ip_adapter
    path = "loras/anime.safetensors"
    scale = 0.8
    # controlnet / t2i / nexus / ip_adapter may take image = "control.png": the image used when
    # a request sends none (without it every request naming the plugin must send one);
    # ip_adapter may take image_encoder = "DIR" (default: image_encoder/ beside the file)

    [backend]                     # where the UNets and mapping layers run; every key optional
    kind = "onnxruntime"          # torch (default), onnxruntime, tensorrt (device = "cuda")
    onnx_dir = "export"           # xa-export folder of these models (tiny models: exported at start)
    engine_dir = "engines"        # xa-build-engines folder (tensorrt)
    # onnxruntime takes controlnet, t2i and nexus plugins; tensorrt controlnet; LoRAs (per-request
    # scales) and IP-Adapters need torch

    [auth]                        # API keys (docs/clients.md); every key optional
    api_keys = ["..."]            # Bearer keys (also: --api-key, XA_API_KEY)
    api_auth = "user:pass"        # A1111's --api-auth: Basic on /sdapi/..., or Bearer "user:pass"
    key_file = "keys.txt"         # one key per line
    requests_per_minute = 60      # generation requests per key (0: no limit), then 429
    concurrent_jobs = 2           # generation jobs queued or running per key (0: no limit)

    [ray]                         # xa-serve --ray only (Ray Serve); every key optional
    min_replicas = 1
    max_replicas = 1              # > min_replicas: autoscaling on ongoing requests
    num_gpus = 1                  # per replica; default 1 with device = "cuda", else 0
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .auth import AuthConfig, AuthError, parse_auth_table

PLUGIN_KINDS = ("lora", "sdxl_lora", "controlnet", "t2i", "nexus", "ip_adapter")
IMAGE_KINDS = ("controlnet", "t2i", "nexus", "ip_adapter")
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover -- Python 3.10
    import tomli as tomllib

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# serve's plugin kind -> the kind the graph table names it by
_GRAPH_PLUGIN_KINDS = {"controlnet": "controlnet", "t2i": "t2i", "nexus": "nexus"}


class ConfigError(ValueError):
    """A bad config file; the message names the key."""


@dataclass
class Limits:
    queue_size: int = 8            # requests waiting (not counting the one running); full -> 429
    deadline_s: float = 300.0      # queue + run, per request; past it the run stops between steps -> 504
    max_body_bytes: int = 16 << 20     # JSON with base64 images
    max_image_pixels: int = 4096 * 4096  # per image sent in a request (decoded size)
    max_request_pixels: int = 4 * 4096 * 4096  # all images of one request together, checked before decoding
    max_prompt_chars: int = 2000
    max_steps: int = 150
    max_side: int = 2048           # SDXL height/width in pixels
    max_batch: int = 4             # images per request (prompts x num_images_per_prompt)
    shutdown_timeout_s: float = 60.0
    retry_after_s: int = 5


@dataclass
class PluginSpec:
    name: str
    kind: str
    path: str
    scale: float = 1.0
    image: str | None = None           # the default image of an image plugin; None: each request sends one
    image_encoder: str | None = None   # ip_adapter only


@dataclass
class RayOptions:
    """Ray Serve deployment options (xa-serve --ray): one replica per GPU."""

    min_replicas: int = 1
    max_replicas: int = 1
    num_gpus: float | None = None      # None: 1 when models.device is cuda, else 0
    num_cpus: float = 1.0
    target_ongoing_requests: float = 2.0  # autoscaling target per replica


@dataclass
class BackendOptions:
    """Where the UNets and mapping layers run (runtime.backends.open_backend)."""

    kind: str = "torch"
    onnx_dir: str | None = None
    engine_dir: str | None = None


@dataclass
class ServeConfig:
    sd15: str | None = None
    sdxl: str | None = None
    adapter: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    tiny_seed: int = 0
    limits: Limits = field(default_factory=Limits)
    plugins: dict[str, PluginSpec] = field(default_factory=dict)
    ray: RayOptions = field(default_factory=RayOptions)
    backend: BackendOptions = field(default_factory=BackendOptions)
    auth: AuthConfig = field(default_factory=AuthConfig)

    @property
    def tiny(self) -> bool:
        return self.sd15 is None and self.sdxl is None and self.adapter is None


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table")
    return value


def parse_config(data: dict[str, Any], base: Path = Path(".")) -> ServeConfig:
    """Check a parsed TOML document; relative paths are taken from `base` (the file's folder)."""
    unknown = set(data) - {"models", "limits", "plugins", "ray", "backend", "auth"}
    if unknown:
        raise ConfigError(f"unknown top-level keys {sorted(unknown)}: models, limits, plugins, ray, backend, auth")
    cfg = ServeConfig()
    models = _table(data, "models")
    for key, value in models.items():
        if key in ("sd15", "sdxl", "adapter"):
            setattr(cfg, key, str(base / str(value)))
        elif key == "device" or key == "dtype":
            setattr(cfg, key, str(value))
        elif key == "tiny_seed" and isinstance(value, int):
            cfg.tiny_seed = value
        else:
            raise ConfigError(f"models.{key}: unknown key or bad value {value!r}")
    given = [k for k in ("sd15", "sdxl", "adapter") if getattr(cfg, k) is not None]
    if given and len(given) != 3:
        raise ConfigError(f"models: give sd15, sdxl and adapter together, or none (tiny models); got {given}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"models.dtype={cfg.dtype!r}: one of {', '.join(DTYPES)}")
    names = {f.name: f.type for f in fields(Limits)}
    for key, value in _table(data, "limits").items():
        if key not in names:
            raise ConfigError(f"limits.{key}: unknown key; known: {', '.join(names)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"limits.{key}={value!r}: a positive number")
        setattr(cfg.limits, key, value if names[key] == "float" else int(value))
    for name, spec in _table(data, "plugins").items():
        if not isinstance(spec, dict):
            raise ConfigError(f"plugins.{name} must be a table")
        kind, path = spec.get("kind"), spec.get("path")
        if kind not in PLUGIN_KINDS:
            raise ConfigError(f"plugins.{name}.kind={kind!r}: one of {', '.join(PLUGIN_KINDS)}")
        if not isinstance(path, str):
            raise ConfigError(f"plugins.{name}.path: a string")
        scale = spec.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ConfigError(f"plugins.{name}.scale={scale!r}: a number")
        image, encoder = spec.get("image"), spec.get("image_encoder")
        if image is not None and (kind not in IMAGE_KINDS or not isinstance(image, str)):
            raise ConfigError(f"plugins.{name}.image: a path, for {', '.join(IMAGE_KINDS)} only")
        if encoder is not None and (kind != "ip_adapter" or not isinstance(encoder, str)):
            raise ConfigError(f"plugins.{name}.image_encoder: a folder, for ip_adapter only")
        extra = set(spec) - {"kind", "path", "scale", "image", "image_encoder"}
        if extra:
            raise ConfigError(f"plugins.{name}: unknown keys {sorted(extra)}")
        cfg.plugins[name] = PluginSpec(name, kind, str(base / path), float(scale),
                                       None if image is None else str(base / image),
                                       None if encoder is None else str(base / encoder))
    cfg.ray = _ray_options(_table(data, "ray"))
    cfg.backend = _backend_options(_table(data, "backend"), cfg, base)
    try:
        cfg.auth = parse_auth_table(_table(data, "auth"), base)
    except AuthError as e:
        raise ConfigError(str(e)) from None
    return cfg


def _backend_options(table: dict[str, Any], cfg: ServeConfig, base: Path) -> BackendOptions:
    """[backend], checked as xa-generate checks --backend / --onnx-dir / --engine-dir (the
    folders by graphs.folder_problem); nothing is loaded."""
    from ..graphs import BACKEND_PLUGINS, BACKENDS, folder_problem

    opts = BackendOptions()
    for key, value in table.items():
        if key == "kind" and value in BACKENDS:
            opts.kind = value
        elif key in ("onnx_dir", "engine_dir") and isinstance(value, str):
            setattr(opts, key, str(base / value))
        else:
            raise ConfigError(f"backend.{key}={value!r}: unknown key or bad value (kind: {', '.join(BACKENDS)}; "
                              "onnx_dir, engine_dir: folders)")
    if opts.kind == "torch":
        if opts.onnx_dir or opts.engine_dir:
            raise ConfigError("backend.onnx_dir / backend.engine_dir: only with backend.kind onnxruntime or tensorrt")
        return opts
    if opts.engine_dir is not None and opts.kind != "tensorrt":
        raise ConfigError("backend.engine_dir: only with backend.kind = \"tensorrt\"")
    kinds = []
    for name, spec in cfg.plugins.items():
        kind = _GRAPH_PLUGIN_KINDS.get(spec.kind)
        if kind not in BACKEND_PLUGINS[opts.kind]:
            raise ConfigError(f"plugins.{name}.kind={spec.kind!r}: backend.kind = {opts.kind!r} takes "
                              f"{', '.join(k for k, v in _GRAPH_PLUGIN_KINDS.items() if v in BACKEND_PLUGINS[opts.kind])} "
                              "plugins; the others need backend.kind = \"torch\"")
        kinds.append(kind)
    if opts.kind == "tensorrt":
        from ..availability import NOT_INSTALLED, tensorrt_installed

        if not tensorrt_installed():
            raise ConfigError(f"backend.kind=\"tensorrt\": {NOT_INSTALLED}")
        if cfg.device != "cuda":
            raise ConfigError(f"backend.kind=\"tensorrt\": models.device = \"cuda\" (got {cfg.device!r})")
        if opts.engine_dir is None:
            raise ConfigError("backend.kind=\"tensorrt\": backend.engine_dir (xa-build-engines' folder)")
        problem = folder_problem(opts.engine_dir, "engine", kinds)
        if problem:
            raise ConfigError(f"backend.engine_dir={opts.engine_dir!r}: {problem}")
    elif opts.onnx_dir is None and not cfg.tiny:
        raise ConfigError("backend.kind=\"onnxruntime\" with model paths: backend.onnx_dir (xa-export's folder of "
                          "these models)")
    if opts.kind == "onnxruntime" and opts.onnx_dir is not None:
        problem = folder_problem(opts.onnx_dir, "onnx", kinds)
        if problem:
            raise ConfigError(f"backend.onnx_dir={opts.onnx_dir!r}: {problem}")
    return opts


def _ray_options(table: dict[str, Any]) -> RayOptions:
    opts = RayOptions()
    known = {f.name for f in fields(RayOptions)}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"ray.{key}: unknown key; known: {', '.join(sorted(known))}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"ray.{key}={value!r}: a number >= 0")
        if key in ("min_replicas", "max_replicas"):
            if value != int(value) or value < 1:
                raise ConfigError(f"ray.{key}={value!r}: an integer >= 1")
            value = int(value)
        setattr(opts, key, value)
    if opts.max_replicas < opts.min_replicas:
        raise ConfigError(f"ray.max_replicas={opts.max_replicas}: at least ray.min_replicas={opts.min_replicas}")
    return opts


def load_config(path: str | Path | None) -> ServeConfig:
    if path is None:
        return ServeConfig()
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{p}: {e}") from None
    return parse_config(data, p.parent)
