"""manifest.json of an export folder: what was exported, from what, and the files' hashes.

Per graph: the table entry's summary (inputs, outputs, profiles), dtype, opset, and the
sha256 of each of its files (NAME.onnx, NAME.onnx.data when present, NAME.names.json);
the torch / onnx / diffusers versions; the source models' fingerprint (sha256 of the
model files' bytes for paths, of every tensor's bytes for in-memory models).

export_graphs writes the new graphs beside the old ones (a hidden staging folder), so the
previous export stays valid while they are made; then it removes the manifest, moves the new
files in and writes the manifest last, atomically: a folder whose export was interrupted in
that short swap has none and is not trusted. It refuses a folder
whose manifest names other source weights unless force=True. Backends check the graphs they
load against it (verify_graphs).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..atomic_files import write_all_or_nothing
from ..errors import CheckpointError, ParameterError
from ..graphs import GRAPHS

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
BUNDLE_PARTS = ("sd15", "sdxl", "mapping", "controlnet", "t2i_adapter", "ip_adapter")  # ModuleBundle's fields
_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def path_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over a file's bytes, or over a folder's files (sorted relative paths and bytes)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        h.update(rel.encode() + b"\0" + bytes.fromhex(file_sha256(f)))
    return h.hexdigest()


def modules_fingerprint(modules: Mapping[str, Any]) -> str:
    """sha256 over every parameter and buffer of each module (or every tensor of a flat state
    dict, e.g. an IP-Adapter file's "image_proj" part): names, dtypes, shapes and the full
    bytes of every tensor (streamed one tensor at a time)."""
    import torch

    h = hashlib.sha256()
    for part in sorted(modules):
        module = modules[part]
        if module is None:
            continue
        if isinstance(module, torch.nn.Module):
            tensors = list(module.state_dict().items())
        elif isinstance(module, Mapping):
            tensors = [(k, v) for k, v in module.items() if isinstance(v, torch.Tensor)]
        else:
            tensors = []
        for name, t in sorted(tensors):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{part}.{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def bundle_modules(bundle: Any) -> dict[str, Any]:
    """Every torch module of the bundle, by "part" or "part.component" name (an IP-Adapter
    state: its two state dicts, "ip_adapter.image_proj" and "ip_adapter.ip_adapter")."""
    import torch

    out = {}
    for part in BUNDLE_PARTS:
        value = getattr(bundle, part)
        if isinstance(value, torch.nn.Module):
            out[part] = value
        elif isinstance(value, Mapping):
            out.update({f"{part}.{k}": v for k, v in value.items() if isinstance(v, Mapping)})
        elif value is not None:
            out.update({f"{part}.{k}": v for k, v in vars(value).items() if isinstance(v, torch.nn.Module)})
    return out


def source_from_bundle(bundle: Any) -> dict[str, Any]:
    """Source record of in-memory models: the fingerprint of all the bundle's tensors (every
    part, not only those the exported graphs read, so later exports into the folder match)."""
    modules = bundle_modules(bundle)
    parts = {}
    for part in BUNDLE_PARTS:
        mine = {k: m for k, m in modules.items() if k.split(".")[0] == part}
        if mine:
            parts[part] = modules_fingerprint(mine)
    return {"kind": "modules", "fingerprint": modules_fingerprint(modules), "parts": parts}


def check_same_models(folder: str | os.PathLike, current: Mapping[str, str], what: str) -> None:
    """CheckpointError unless the folder's manifest records the same fingerprints for the keys
    of `current` ("sd15" / "sdxl" / "mapping" parts of in-memory models, or "--sd15" ... files)."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise CheckpointError(f"{folder}: no {MANIFEST}; export again")
    source = manifest.get("source", {})
    recorded = source.get("parts", {}) if source.get("kind") == "modules" else {
        k: v["sha256"] for k, v in source.get("files", {}).items()}
    differ = sorted(k for k, v in current.items() if recorded.get(k) != v)
    if differ:
        raise CheckpointError(f"{folder}: its graphs were exported from other weights than {what} "
                              f"({', '.join(differ)} differ, or another dtype); export these models with xa-export")


def source_from_paths(paths: Mapping[str, str]) -> dict[str, Any]:
    """{flag or part: path} -> source record with each file's or folder's hash."""
    files = {k: {"path": str(Path(p).resolve()), "sha256": path_fingerprint(p)} for k, p in sorted(paths.items())}
    combined = hashlib.sha256(json.dumps({k: v["sha256"] for k, v in files.items()}, sort_keys=True).encode())
    return {"kind": "files", "fingerprint": combined.hexdigest(), "files": files}


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not a readable manifest ({e}); export again") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path}: not a manifest of format {MANIFEST_FORMAT}; export again")
    return data


def check_source(folder: str | os.PathLike, source: Mapping[str, Any], force: bool) -> dict[str, Any] | None:
    """The folder's manifest (None if none); ParameterError if it names other source weights and not force."""
    try:
        old = read_manifest(folder)
    except CheckpointError:
        old = {"source": {"fingerprint": "unreadable"}}
    if old is None:
        return None
    was = old.get("source", {}).get("fingerprint")
    if was != source["fingerprint"]:
        if not force:
            raise ParameterError("output_dir", str(folder), f"a folder exported from the same source models; its "
                                 f"{MANIFEST} names source {str(was)[:12]}, these are {source['fingerprint'][:12]} "
                                 "(force=True / --force replaces it)")
        return None  # other weights: nothing of the old export is kept
    return old


def graph_files(folder: Path, name: str) -> list[Path]:
    from .refit import names_path

    onnx_path = folder / f"{name}.onnx"
    return [p for p in (onnx_path, onnx_path.with_name(onnx_path.name + ".data"), names_path(onnx_path)) if p.is_file()]


def graph_entry(folder: Path, name: str, dtype: str, opset: int) -> dict[str, Any]:
    spec = GRAPHS[name]
    return {
        "description": spec.description,
        "inputs": {t.name: [t.dtype, list(t.shape)] for t in spec.inputs},
        "outputs": {t.name: [t.dtype, list(t.shape)] for t in spec.outputs},
        "profiles": {d: [r.min, r.opt, r.max] for d, r in spec.profiles.items()},
        "refittable": list(spec.refittable),
        "dtype": dtype, "opset": opset,
        "files": {p.name: file_sha256(p) for p in graph_files(folder, name)},
    }


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    import xa_runtime

    out: dict[str, str | None] = {"xa_runtime": xa_runtime.__version__}
    for pkg in ("torch", "onnx", "diffusers", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def write_manifest(folder: str | os.PathLike, graphs: Mapping[str, dict[str, Any]], source: Mapping[str, Any]) -> Path:
    """Write manifest.json all or nothing (atomic_files.write_all_or_nothing)."""
    path = Path(folder) / MANIFEST
    data = {"format": MANIFEST_FORMAT, "versions": versions(), "source": dict(source),
            "graphs": {n: graphs[n] for n in sorted(graphs)}}
    write_all_or_nothing({path: json.dumps(data, indent=1, sort_keys=True).encode()})
    return path


def verify_graphs(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, Any]:
    """Check graphs `names` of an export folder against its manifest: each listed, its files
    (and only those) present with the recorded sha256. CheckpointError otherwise."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise CheckpointError(f"{folder}: no {MANIFEST} (an interrupted export, or files not written by xa-export); "
                              "export again, or load with verify=False")
    for name in names:
        entry = manifest["graphs"].get(name)
        if entry is None:
            raise CheckpointError(f"{folder / (name + '.onnx')}: not in {MANIFEST}; export it again")
        present = {p.name for p in graph_files(folder, name)}
        if present != set(entry["files"]):
            raise CheckpointError(f"{folder}: graph {name} has files {sorted(present)}, {MANIFEST} lists "
                                  f"{sorted(entry['files'])}; export it again")
        for fname, digest in entry["files"].items():
            if file_sha256(folder / fname) != digest:
                raise CheckpointError(f"{folder / fname}: changed since export (sha256 differs from {MANIFEST}); "
                                      "export it again, or load with verify=False")
    return manifest
