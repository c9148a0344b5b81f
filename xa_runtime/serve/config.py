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
    kind = "lora"                 # a plugin_kinds kind: lora, sdxl_lora, controlnet, t2i, nexus, ip_adapter
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
    # scales) and IP-Adapters need torch (plugin_kinds: served_backends)

The document is parsed by one pydantic model (ConfigModel); every error is one line naming
the key (e.g. `plugins.anime.scale: ...`).

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
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from ..errors import ParameterError
from ..graphs import BACKENDS, folder_problem
from ..plugin_kinds import KINDS, PluginSpec, check_backend, get_kind

from .auth import AuthConfig, AuthError, parse_auth_table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover -- Python 3.10
    import tomli as tomllib

__all__ = ["BackendOptions", "ConfigError", "Limits", "PluginSpec", "RayOptions", "ServeConfig", "load_config",
           "parse_config"]

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


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


# ---------------------------------------------------------------------- the TOML's typed model
_Number = float  # strict: an integer is a number too, a TOML boolean or string is not
_Positive = Annotated[_Number, Field(gt=0)]
_NonNegative = Annotated[_Number, Field(ge=0)]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Models(_Table):
    sd15: Optional[str] = None
    sdxl: Optional[str] = None
    adapter: Optional[str] = None
    device: str = "cpu"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    tiny_seed: int = 0

    @model_validator(mode="after")
    def _all_or_none(self) -> "_Models":
        given = [k for k in ("sd15", "sdxl", "adapter") if getattr(self, k) is not None]
        if given and len(given) != 3:
            raise ValueError(f"give sd15, sdxl and adapter together, or none (tiny models); got {given}")
        return self


# every Limits field, optional, a positive number
_Limits = create_model("_Limits", __base__=_Table,
                       **{f.name: (Optional[_Positive], None) for f in fields(Limits)})  # type: ignore[call-overload]


class _Plugin(_Table):
    kind: str
    path: str
    scale: _Number = 1.0
    image: Optional[str] = None
    image_encoder: Optional[str] = None

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        try:
            return get_kind(kind).name
        except ParameterError as e:
            raise ValueError(f"{kind!r}: {e.accepted}") from None

    @model_validator(mode="after")
    def _keys_of_kind(self) -> "_Plugin":
        row = KINDS[self.kind]
        for key in ("image", "image_encoder"):
            if getattr(self, key) is not None and key not in row.config_keys:
                takers = ", ".join(k.name for k in KINDS.values() if key in k.config_keys)
                raise ValueError(f"{key}: for {takers} only (not {self.kind})")
        return self


class _Ray(_Table):
    min_replicas: Annotated[_Number, Field(ge=1, multiple_of=1)] = 1
    max_replicas: Annotated[_Number, Field(ge=1, multiple_of=1)] = 1
    num_gpus: Optional[_NonNegative] = None
    num_cpus: _NonNegative = 1.0
    target_ongoing_requests: _NonNegative = 2.0

    @model_validator(mode="after")
    def _ordered(self) -> "_Ray":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas}: at least min_replicas={self.min_replicas}")
        return self


class _Backend(_Table):
    kind: Literal[BACKENDS] = "torch"  # type: ignore[valid-type]
    onnx_dir: Optional[str] = None
    engine_dir: Optional[str] = None


class ConfigModel(_Table):
    """The whole xa-serve TOML document (see the module doc)."""

    models: _Models = _Models()
    limits: _Limits = _Limits()  # type: ignore[valid-type]
    plugins: dict[str, _Plugin] = {}
    ray: _Ray = _Ray()
    backend: _Backend = _Backend()
    auth: dict[str, Any] = {}  # checked by serve.auth.parse_auth_table (its own messages)


def _one_line(error: ValidationError) -> str:
    """The first error as `key.path: what is wrong` (pydantic's own message)."""
    e = error.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{loc}: {msg}" + (f" (got {e['input']!r})" if e["type"] not in ("extra_forbidden", "value_error") else "")


def parse_config(data: dict[str, Any], base: Path = Path(".")) -> ServeConfig:
    """Check a parsed TOML document; relative paths are taken from `base` (the file's folder)."""
    try:
        doc = ConfigModel.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None

    def path(value: str | None) -> str | None:
        return None if value is None else str(base / value)

    m = doc.models
    cfg = ServeConfig(path(m.sd15), path(m.sdxl), path(m.adapter), m.device, m.dtype, m.tiny_seed)
    for key, value in doc.limits.model_dump(exclude_none=True).items():
        setattr(cfg.limits, key, float(value) if isinstance(Limits.__dataclass_fields__[key].default, float)
                else int(value))
    cfg.plugins = {name: PluginSpec(name, p.kind, str(base / p.path), float(p.scale), path(p.image),
                                    path(p.image_encoder))
                   for name, p in doc.plugins.items()}
    r = doc.ray
    cfg.ray = RayOptions(int(r.min_replicas), int(r.max_replicas), r.num_gpus, r.num_cpus, r.target_ongoing_requests)
    b = doc.backend
    cfg.backend = BackendOptions(b.kind, path(b.onnx_dir), path(b.engine_dir))
    _check_backend(cfg)
    try:
        cfg.auth = parse_auth_table(doc.auth, base)
    except AuthError as e:
        raise ConfigError(str(e)) from None
    return cfg


def _check_backend(cfg: ServeConfig) -> None:
    """[backend] against the models and the plugins (plugin_kinds.check_backend, served: the
    rules every CLI uses) and its folders (graphs.folder_problem); nothing is loaded."""
    opts = cfg.backend
    if opts.kind == "torch":
        if opts.onnx_dir or opts.engine_dir:
            raise ConfigError("backend.onnx_dir / backend.engine_dir: only with backend.kind onnxruntime or tensorrt")
        return
    if opts.engine_dir is not None and opts.kind != "tensorrt":
        raise ConfigError("backend.engine_dir: only with backend.kind = \"tensorrt\"")
    problem = check_backend(cfg.plugins.values(), opts.kind, lambda s: f"plugins.{s.name}.kind={s.kind!r}", served=True)
    if problem:
        raise ConfigError(problem)
    kinds = [s.kind for s in cfg.plugins.values()]
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


def load_config(path: str | Path | None) -> ServeConfig:
    if path is None:
        return ServeConfig()
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{p}: {e}") from None
    return parse_config(data, p.parent)
