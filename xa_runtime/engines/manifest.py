"""The engine cache: one `NAME.plan` per graph with `NAME.engine.json` beside it (pure Python).

The manifest records what the plan is valid for: GPU name and compute capability, TensorRT
version, precision, optimisation profiles, builder flags, the sha256 of the source ONNX file
and of the plan itself. `read_engine` checks all of it, reading the plan once and hashing
those bytes, before anything is deserialized; a mismatch is an EngineMismatchError naming
the field and the command that rebuilds. Builds write temp names, then rename (plan first,
manifest last): a failed build leaves nothing, an interrupted one leaves no manifest.

Device and TensorRT facts come in as a DeviceFacts, so CPU tests can fake another GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import CheckpointError, ParameterError
from ..graphs import DimRange, GraphSpec

ENGINE_FORMAT = 1
PRECISIONS = ("fp16", "bf16", "fp32")
REFIT_MODES = ("none", "refit", "strip")  # strip: refittable weights left out of the plan, refitted from ONNX at load
# presets in pixels of the graph's own image: (min, opt, max) side
PRESETS = {"1024": (1024, 1024, 1024), "512-1536": (512, 1024, 1536)}
MAX_ROWS = 64
SIDE_MULTIPLE, MIN_SIDE, MAX_SIDE = 64, 64, 4096
_SHAPE = re.compile(r"^(\d+)[,x](\d+)[,x](\d+)$")
class EngineMismatchError(CheckpointError):
    """A cached engine does not fit this machine or its source; the message says how to rebuild."""

    def __init__(self, name: str, field: str, message: str, rebuild: str):
        self.graph, self.field = name, field
        super().__init__(f"engine {name}: {message}; rebuild it: {rebuild}")


@dataclass(frozen=True)
class DeviceFacts:
    """What an engine is bound to: the GPU and the TensorRT version."""

    gpu_name: str
    compute_capability: str  # "8.9"
    tensorrt_version: str

    @classmethod
    def current(cls, tensorrt_version: str, device: int = 0) -> DeviceFacts:
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        return cls(torch.cuda.get_device_name(device), f"{major}.{minor}", tensorrt_version)


def plan_path(folder: str | os.PathLike, name: str) -> Path:
    return Path(folder) / f"{name}.plan"


def manifest_path(folder: str | os.PathLike, name: str) -> Path:
    return Path(folder) / f"{name}.engine.json"


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def onnx_sha256(onnx_path: str | os.PathLike) -> str:
    """sha256 over NAME.onnx and, when present, its NAME.onnx.data (the weights)."""
    from ..export.manifest import file_sha256

    p = Path(onnx_path)
    parts = [file_sha256(p)] + ([file_sha256(d)] if (d := p.with_name(p.name + ".data")).is_file() else [])
    return parts[0] if len(parts) == 1 else sha256_bytes("".join(parts).encode())


# ------------------------------------------------------------------ profiles
def parse_shape(flag: str, text: str) -> tuple[int, int, int]:
    """"ROWS,HEIGHT,WIDTH" (pixels; `x` also separates) -> ints, each in range."""
    m = _SHAPE.match(text.strip())
    accepted = (f"ROWS,HEIGHT,WIDTH: rows 1-{MAX_ROWS}, height and width in pixels, multiples of {SIDE_MULTIPLE} "
                f"in {MIN_SIDE}-{MAX_SIDE} (e.g. 2,1024,1024)")
    if m is None:
        raise ParameterError(flag, text, accepted)
    rows, h, w = (int(g) for g in m.groups())
    if not 1 <= rows <= MAX_ROWS or any(s % SIDE_MULTIPLE or not MIN_SIDE <= s <= MAX_SIDE for s in (h, w)):
        raise ParameterError(flag, text, accepted)
    return rows, h, w


def check_choice(flag: str, value: str, choices: tuple[str, ...] | list[str]) -> str:
    if value not in choices:
        raise ParameterError(flag, value, f"one of {', '.join(choices)}")
    return value


def resolve_profiles(spec: GraphSpec, preset: str | None = None, min: str | None = None, opt: str | None = None,
                     max: str | None = None, static: bool = False) -> dict[str, DimRange]:
    """The graph table's profiles with a preset and --min/--opt/--max overrides (pixels, rows),
    in the table's units (latent cells for H/W). static: min = max = opt."""
    dims = dict(spec.profiles)
    spatial = "H" in dims and "W" in dims
    if preset is not None:
        sides = PRESETS[check_choice("--preset", preset, list(PRESETS))]
        if spatial:
            dims["H"] = dims["W"] = DimRange(*(s // 8 for s in sides))
    given = {w: parse_shape(f"--{w}", t) for w, t in (("min", min), ("opt", opt), ("max", max)) if t is not None}
    for which, (rows, h, w) in given.items():
        if "B" in dims:
            dims["B"] = DimRange(**{**asdict(dims["B"]), which: rows})
        if spatial:
            dims["H"] = DimRange(**{**asdict(dims["H"]), which: h // 8})
            dims["W"] = DimRange(**{**asdict(dims["W"]), which: w // 8})
    if static:
        dims = {d: DimRange(r.opt, r.opt, r.opt) for d, r in dims.items()}
    for d, r in dims.items():
        if not r.min <= r.opt <= r.max:
            flag = "--opt" if "opt" in given else ("--min" if "min" in given else "--max")
            raise ParameterError(flag, f"{d}: {r.min}/{r.opt}/{r.max}", f"min <= opt <= max for every dimension "
                                 f"(graph {spec.name}, {d} in {'latent cells' if d in 'HW' else 'rows/tokens'})")
    return dims


def profiles_json(profiles: Mapping[str, DimRange]) -> dict[str, list[int]]:
    return {d: [r.min, r.opt, r.max] for d, r in sorted(profiles.items())}


# ------------------------------------------------------------------ manifests
def engine_manifest(name: str, facts: DeviceFacts, precision: str, profiles: Mapping[str, DimRange],
                    flags: list[str], refit: str, onnx_hash: str, engine_hash: str,
                    refittable: list[str] | None = None) -> dict[str, Any]:
    return {
        "format": ENGINE_FORMAT, "graph": name, "gpu_name": facts.gpu_name,
        "compute_capability": facts.compute_capability, "tensorrt_version": facts.tensorrt_version,
        "precision": precision, "profiles": profiles_json(profiles), "builder_flags": sorted(flags),
        "refit": refit, "refittable_weights": sorted(refittable or []), "onnx_sha256": onnx_hash,
        "engine_sha256": engine_hash,
    }


def _write_atomic(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_engine(folder: str | os.PathLike, name: str, produce: Callable[[], bytes],
                 manifest_for: Callable[[str], dict[str, Any]]) -> Path:
    """Build and store one engine: the old manifest goes first (the old plan is no longer
    trusted), `produce()` gives the plan bytes, written to a temp name then renamed, then
    the manifest (`manifest_for(engine_sha256)`), also atomically. An exception in produce
    or a write leaves neither a new plan nor a manifest."""
    folder = Path(folder)
    manifest_path(folder, name).unlink(missing_ok=True)
    data = produce()
    path = _write_atomic(plan_path(folder, name), bytes(data))
    _write_atomic(manifest_path(folder, name), json.dumps(manifest_for(sha256_bytes(data)), indent=1).encode())
    return path


def rebuild_command(name: str, folder: str | os.PathLike, onnx_dir: str | os.PathLike | None = None) -> str:
    return f"xa-build-engines --onnx-dir {onnx_dir or 'ONNX_DIR'} --output {folder} --graphs {name}"


def read_engine(folder: str | os.PathLike, name: str, facts: DeviceFacts, onnx_path: str | os.PathLike | None = None,
                expect: Mapping[str, Any] | None = None) -> tuple[bytes, dict[str, Any]]:
    """The plan's bytes and manifest, after every check: manifest present and readable, same
    GPU, compute capability and TensorRT version, source ONNX unchanged (when onnx_path is
    given), plan bytes hashing to the recorded sha256, and `expect` fields (e.g. precision)."""
    onnx_dir = Path(onnx_path).parent if onnx_path is not None else None
    rebuild = rebuild_command(name, folder, onnx_dir)
    mpath, ppath = manifest_path(folder, name), plan_path(folder, name)
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise EngineMismatchError(name, "manifest", f"no manifest {mpath.name} (never built, or the build was "
                                  "interrupted)", rebuild) from None
    except (OSError, ValueError) as e:
        raise EngineMismatchError(name, "manifest", f"unreadable manifest {mpath} ({e})", rebuild) from None
    if not isinstance(manifest, dict) or manifest.get("format") != ENGINE_FORMAT or manifest.get("graph") != name:
        raise EngineMismatchError(name, "format", f"{mpath} is not a format-{ENGINE_FORMAT} manifest of {name}", rebuild)
    here = asdict(facts)
    for field in ("gpu_name", "compute_capability", "tensorrt_version"):
        if manifest.get(field) != here[field]:
            raise EngineMismatchError(name, field, f"built for {field.replace('_', ' ')} {manifest.get(field)!r}, "
                                      f"this machine has {here[field]!r}", rebuild)
    for field, value in (expect or {}).items():
        if manifest.get(field) != value:
            raise EngineMismatchError(name, field, f"built with {field} {manifest.get(field)!r}, {value!r} asked for",
                                      rebuild)
    if onnx_path is not None and manifest.get("onnx_sha256") != onnx_sha256(onnx_path):
        raise EngineMismatchError(name, "onnx_sha256", f"its source {onnx_path} changed since the build", rebuild)
    try:
        data = ppath.read_bytes()
    except FileNotFoundError:
        raise EngineMismatchError(name, "engine", f"plan file {ppath} is missing", rebuild) from None
    if sha256_bytes(data) != manifest.get("engine_sha256"):
        raise EngineMismatchError(name, "engine_sha256", f"plan file {ppath} is corrupted (sha256 differs from the "
                                  "manifest's)", rebuild)
    return data, manifest
