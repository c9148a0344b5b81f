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

    [http]                        # every key optional
    allowed_origins = ["https://app.example"]  # other web origins that may call (default: none)
    log_format = "json"           # one line per request: text (default) or json (also --log-format)
    log_prompts = false           # prompts in that line (default off)

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

from pydantic import (BaseModel, ConfigDict, Field, StringConstraints, ValidationError, create_model, field_validator,
                      model_validator)

from ..errors import ParameterError
from ..graphs import BACKENDS, folder_problem
from ..plugin_kinds import KINDS, LORA_KINDS, PluginSpec, check_backend, check_scale, get_kind

from .auth import AuthConfig, AuthError, parse_auth_table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover -- Python 3.10
    import tomli as tomllib

__all__ = ["BackendOptions", "ConfigError", "HttpOptions", "Limits", "PluginSpec", "RayOptions", "ServeConfig", "check_at_start",
           "load_config", "parse_config"]

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
    # a request's cost before it is queued: (SDXL pixels + SD1.5 pixels) x steps x images; the
    # default admits 1024x1024 (SD1.5 512x512) at 50 steps x 4 images, 2048x2048 at 50 steps x 1
    max_pixel_steps: int = 300_000_000
    header_timeout_s: float = 10.0  # a connection's request head and body, each read within this (slow clients)
    max_connections: int = 64       # open connections at once; more -> 503 (uvicorn's limit_concurrency)


# the largest value each [limits] key takes (a bound past which the server could not hold its
# promise: a queue or a body that does not fit in memory, a drain that never ends)
LIMITS_MAX: dict[str, float] = {
    "queue_size": 10_000, "deadline_s": 86_400.0, "max_body_bytes": 1 << 30, "max_image_pixels": 1 << 28,
    "max_request_pixels": 1 << 30, "max_prompt_chars": 1_000_000, "max_steps": 10_000, "max_side": 16_384,
    "max_batch": 256, "shutdown_timeout_s": 3_600.0, "retry_after_s": 3_600, "max_pixel_steps": 10**13,
    "header_timeout_s": 3_600.0, "max_connections": 100_000,
}


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
class HttpOptions:
    """The HTTP side: which other origins may call (serve.guard), the request log's format."""

    allowed_origins: tuple[str, ...] = ()
    log_format: str = "text"       # text or json: one line per request (serve.requestlog)
    log_prompts: bool = False      # the prompts in that line (off: they may be private)


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
    http: HttpOptions = field(default_factory=HttpOptions)

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
    tiny_seed: Annotated[int, Field(ge=0, lt=2**63)] = 0

    @model_validator(mode="after")
    def _all_or_none(self) -> "_Models":
        given = [k for k in ("sd15", "sdxl", "adapter") if getattr(self, k) is not None]
        if given and len(given) != 3:
            raise ValueError(f"give sd15, sdxl and adapter together, or none (tiny models); got {given}")
        return self


def _limit_type(f: Any) -> Any:
    """A [limits] key: a positive finite number up to LIMITS_MAX, a whole one where Limits' field is an int."""
    whole = {"multiple_of": 1} if isinstance(f.default, int) else {}
    return Optional[Annotated[_Number, Field(gt=0, le=LIMITS_MAX[f.name], allow_inf_nan=False, **whole)]]


# every Limits field, optional
_Limits = create_model("_Limits", __base__=_Table,
                       **{f.name: (_limit_type(f), None) for f in fields(Limits)})  # type: ignore[call-overload]

# a plugin's name: what requests send and logs show; never a path
PLUGIN_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"


class _Plugin(_Table):
    kind: str
    path: str
    scale: Annotated[_Number, Field(allow_inf_nan=False)] = 1.0
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
        lo = -10.0 if self.kind in LORA_KINDS else 0.0
        try:
            check_scale("scale", self.scale, lo)
        except ParameterError as e:
            raise ValueError(f"scale={self.scale!r}: {e.accepted}") from None
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


class _Http(_Table):
    allowed_origins: list[Annotated[str, StringConstraints(pattern=r"^https?://[^/\s]+$")]] = []
    log_format: Literal["text", "json"] = "text"
    log_prompts: bool = False


class ConfigModel(_Table):
    """The whole xa-serve TOML document (see the module doc)."""

    models: _Models = _Models()
    limits: _Limits = _Limits()  # type: ignore[valid-type]
    plugins: dict[Annotated[str, StringConstraints(pattern=PLUGIN_NAME)], _Plugin] = {}
    ray: _Ray = _Ray()
    backend: _Backend = _Backend()
    http: _Http = _Http()
    # [auth] is read by auth.parse_auth_table: its messages never echo a value (keys are secrets)
    auth: Any = {}


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
    h = doc.http
    cfg.http = HttpOptions(tuple(h.allowed_origins), h.log_format, h.log_prompts)
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
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason}); TOML files are UTF-8") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{p}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested deeper than Python can read") from None
    return parse_config(data, p.parent)


def check_at_start(cfg: ServeConfig) -> None:
    """What parse_config cannot know without the machine: the device exists on this build,
    every path names something that exists (model files and folders, plugin files, their
    images, readable as images). ConfigError naming the key; nothing is loaded but the
    images' headers."""
    import torch

    try:
        dev = torch.device(cfg.device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"models.device={cfg.device!r}: cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"models.device={cfg.device!r}: this torch build has no CUDA device (torch "
                          f"{torch.__version__}); use device = \"cpu\"")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"models.device={cfg.device!r}: {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"models.device={cfg.device!r}: cpu, cuda or cuda:N")
    for key in ("sd15", "sdxl", "adapter"):
        value = getattr(cfg, key)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"models.{key}={value!r}: no such file or folder")
    for name, spec in cfg.plugins.items():
        if not Path(spec.path).exists():
            raise ConfigError(f"plugins.{name}.path={spec.path!r}: no such file or folder")
        if spec.image_encoder is not None and not Path(spec.image_encoder).is_dir():
            raise ConfigError(f"plugins.{name}.image_encoder={spec.image_encoder!r}: no such folder")
        for image in ([spec.image] if isinstance(spec.image, str) else spec.image or ()):
            _check_image(f"plugins.{name}.image", image)


def _check_image(key: str, path: str) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except FileNotFoundError:
        raise ConfigError(f"{key}={path!r}: no such file") from None
    except Exception as e:  # noqa: BLE001 -- PIL raises several kinds for a file that is not an image
        raise ConfigError(f"{key}={path!r}: not a readable image ({type(e).__name__}: {e})") from None
