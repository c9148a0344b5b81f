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
    kind = "lora"                 # lora, sdxl_lora, controlnet, t2i, nexus
    path = "loras/anime.safetensors"
    scale = 0.8
    # controlnet / t2i / nexus also take image = "control.png" (a fixed control image)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

PLUGIN_KINDS = ("lora", "sdxl_lora", "controlnet", "t2i", "nexus")
IMAGE_KINDS = ("controlnet", "t2i", "nexus")
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover -- Python 3.10
    import tomli as tomllib

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class ConfigError(ValueError):
    """A bad config file; the message names the key."""


@dataclass
class Limits:
    queue_size: int = 8            # requests waiting (not counting the one running); full -> 429
    deadline_s: float = 300.0      # queue + run, per request; past it the run stops between steps -> 504
    max_body_bytes: int = 65536
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
    image: str | None = None


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
    unknown = set(data) - {"models", "limits", "plugins"}
    if unknown:
        raise ConfigError(f"unknown top-level keys {sorted(unknown)}: models, limits, plugins")
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
        image = spec.get("image")
        if (image is None) == (kind in IMAGE_KINDS):
            raise ConfigError(f"plugins.{name}.image: required for {', '.join(IMAGE_KINDS)}, not allowed otherwise")
        extra = set(spec) - {"kind", "path", "scale", "image"}
        if extra:
            raise ConfigError(f"plugins.{name}: unknown keys {sorted(extra)}")
        cfg.plugins[name] = PluginSpec(name, kind, str(base / path), float(scale),
                                       None if image is None else str(base / image))
    return cfg


def load_config(path: str | Path | None) -> ServeConfig:
    if path is None:
        return ServeConfig()
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{p}: {e}") from None
    return parse_config(data, p.parent)
