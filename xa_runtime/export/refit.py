"""LoRA on exported graphs: weight deltas added to the ONNX initializers (the CPU half of refit).

Each exported graph has a name map beside it (`NAME.names.json`, written by export_graph):
ONNX initializer -> the torch parameter names that read it, under the pipeline's component
names (`unet.down_blocks.0...`, `text_encoder_2.text_model...`, the keys of
LoraManager.weight_deltas()), whether it is refittable (graph table regexes, one reader
only), and whether the graph transposes it before use.

How weights appear in the graphs (TorchScript exporter, no constant folding): every weight
is an initializer named as in torch, in torch's layout; a Linear's weight feeds a
Transpose (or a Gemm with transB), so a delta is added in the initializer's own layout,
which is torch's (a 2-D delta given transposed is transposed back). The exporter
deduplicates initializers of equal values: the duplicates become Identity nodes named by
their torch names that read one shared initializer. Such a weight cannot take its own
delta without changing the others: it is reported as `shared`, not applied.

`RefitPlan` and `refit_branch` (which graphs a branch's LoRA changes, graphs.LORA_GRAPHS) are
framework-free and shared by both backends' set_lora_deltas: onnxruntime reloads refitted
graphs, TensorRT refits its engines (engines/refit.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import ParameterError
from ..graphs import LORA_GRAPHS, LORA_TARGETS, GraphSpec

NAME_MAP_FORMAT = 1
def names_path(onnx_path: str | os.PathLike) -> Path:
    """`NAME.onnx` -> `NAME.names.json`, the name map beside it."""
    p = Path(onnx_path)
    return p.with_name(p.stem + ".names.json")


def build_name_map(spec: GraphSpec, model: Any, parameter_names: Iterable[str]) -> dict[str, Any]:
    """The name map of an exported graph: `parameter_names` are the exported wrapper module's
    (e.g. `unet.conv_in.weight`, `text_encoder.text_model...`)."""
    import onnx

    target = LORA_TARGETS.get(spec.name)
    inits = {t.name: t for t in model.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and len(n.input) == 1}
    consumers: dict[str, set[str]] = defaultdict(set)
    for node in model.graph.node:
        for i in node.input:
            consumers[i].add(node.op_type)
    readers: dict[str, list[str]] = {}
    for name in parameter_names:
        seen, init = set(), name
        while init not in inits and init in alias and init not in seen:
            seen.add(init)
            init = alias[init]
        if init in inits:
            readers.setdefault(init, []).append(name)

    def torch_name(name: str) -> str:
        # The wrapper's own module (unet, text_encoder, ...) takes the target's name; the mapping
        # layers fused into sdxl_unet_fused keep theirs (no LoRA targets them).
        if not target or name.startswith("mapping."):
            return name
        return f"{target}.{name.partition('.')[2]}"

    entries = {}
    for init, names in readers.items():
        t = inits[init]
        entries[init] = {
            "torch": [torch_name(n) for n in names],
            "refittable": len(names) == 1 and spec.is_refittable(names[0]),
            "transposed": "Transpose" in consumers[init],
            "shape": list(t.dims),
            "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).name,
        }
    return {"format": NAME_MAP_FORMAT, "graph": spec.name, "target": target, "initializers": entries}


def write_name_map(name_map: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a name map as JSON, atomically (temp name, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(name_map, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_name_map(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ParameterError("name_map", str(path), f"a name map JSON as export_graph writes it ({e})") from None
    if not isinstance(data, dict) or data.get("format") != NAME_MAP_FORMAT or "initializers" not in data:
        raise ParameterError("name_map", str(path), f"a name map JSON of format {NAME_MAP_FORMAT}")
    return data


@dataclass
class RefitReport:
    """What apply_weight_deltas did. Names are the deltas' keys (torch parameter names).

    applied: added to an initializer; initializers: the ONNX initializers changed;
    unmapped: no initializer reads that parameter in this graph (another component, a
    folded weight), not applied; shared: its initializer is shared with other parameters
    (deduplicated equal values), not applied; not_refittable: applied, but outside the
    graph table's refittable weights (a TensorRT engine built with those would refuse them).
    """

    applied: list[str] = field(default_factory=list)
    initializers: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)
    not_refittable: list[str] = field(default_factory=list)
    model: Any = None

    def summary(self) -> str:
        return (f"{len(self.applied)} deltas applied, {len(self.unmapped)} unmapped, {len(self.shared)} shared, "
                f"{len(self.not_refittable)} outside the refittable weights")


def _as_array(delta: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(delta, torch.Tensor):
            return delta.detach().to("cpu", torch.float32).numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(delta, dtype=np.float32)


def apply_weight_deltas(
    model: str | os.PathLike | Any, deltas: Mapping[str, Any], name_map: str | os.PathLike | Mapping[str, Any] | None = None,
    *, output: str | os.PathLike | None = None,
) -> RefitReport:
    """Add LoRA weight deltas (torch parameter name -> tensor, as LoraManager.weight_deltas()
    gives) to the matching initializers of an exported graph; returns a RefitReport.

    model: a .onnx path (loaded with its external data; its name map read from beside it
    unless given) or an onnx.ModelProto (changed in place; name_map required). Each delta is
    added in fp32 to the initializer in its own layout, then cast to the graph's dtype (what
    "fused" LoRA does to torch weights). Every delta is checked before anything changes: a
    shape that fits neither the initializer nor its transpose raises ParameterError.
    output: also save the changed graph there (.onnx, external data beside it if the source
    had it, and its name map), atomically.
    """
    import onnx
    from onnx import numpy_helper

    source = None
    if isinstance(model, (str, os.PathLike)):
        source = Path(model)
        if source.suffix != ".onnx" or not source.is_file():
            raise ParameterError("model", str(source), "an exported .onnx file")
        if name_map is None:
            name_map = names_path(source)
        model = onnx.load(str(source))
    elif not isinstance(model, onnx.ModelProto):
        raise ParameterError("model", type(model).__name__, "a .onnx path or an onnx.ModelProto")
    if name_map is None:
        raise ParameterError("name_map", None, "the graph's NAME.names.json (path or dict) for an in-memory model")
    if not isinstance(name_map, Mapping):
        name_map = read_name_map(name_map)
    inits = {t.name: t for t in model.graph.initializer}
    report, planned = plan_weight_deltas(inits, deltas, name_map)
    report.model = model
    for key, init, d in planned:
        inits[init].CopyFrom(numpy_helper.from_array(merged_value(inits[init], d), init))
        report.applied.append(key)
        report.initializers.append(init)
    if output is not None:
        external = source is not None and source.with_name(source.name + ".data").exists()
        save_model_atomic(model, output, external)
        write_name_map(name_map, names_path(output))
    return report


def plan_weight_deltas(
    inits: Mapping[str, Any], deltas: Mapping[str, Any], name_map: str | os.PathLike | Mapping[str, Any],
) -> tuple[RefitReport, list[tuple[str, str, np.ndarray]]]:
    """Check every delta against the graph's initializers (name -> TensorProto) without
    changing anything: (report with unmapped / shared / not_refittable filled, [(torch name,
    initializer name, fp32 delta in the initializer's layout)]). ParameterError for a shape
    that fits neither the initializer nor its transpose."""
    if not isinstance(name_map, Mapping):
        name_map = read_name_map(name_map)
    index: dict[str, tuple[str, dict[str, Any]]] = {}
    for init, entry in name_map["initializers"].items():
        for t in entry["torch"]:
            index[t] = (init, entry)
    report, planned = RefitReport(), []
    for key, delta in deltas.items():
        if key not in index or index[key][0] not in inits:
            report.unmapped.append(key)
            continue
        init, entry = index[key]
        if len(entry["torch"]) > 1:
            report.shared.append(key)
            continue
        d = _as_array(delta)
        shape = tuple(inits[init].dims)
        if d.shape != shape:
            if len(shape) == 2 and d.shape == shape[::-1]:
                d = d.T
            else:
                raise ParameterError("deltas", key, f"a delta of shape {shape} (initializer {init}), not {d.shape}")
        planned.append((key, init, d))
        if not entry.get("refittable", False):
            report.not_refittable.append(key)
    return report, planned


def merged_value(initializer: Any, delta: np.ndarray) -> np.ndarray:
    """base + delta, added in fp32 and cast back to the initializer's dtype (what fusing a
    LoRA does to a torch weight)."""
    import warnings

    from onnx import numpy_helper

    w = numpy_helper.to_array(initializer)
    if w.dtype not in (np.float16, np.float32):
        return (w.astype(np.float32) + delta).astype(w.dtype)
    import torch  # the same arithmetic, bit for bit, ~7x faster than numpy's fp16 casts on one core

    with warnings.catch_warnings():  # w may be a read-only view of the proto's bytes: only read here
        warnings.simplefilter("ignore", UserWarning)
        base = torch.from_numpy(w)
    merged = base.to(torch.float32, copy=True).add_(torch.from_numpy(np.ascontiguousarray(delta, dtype=np.float32)))
    return merged.to(base.dtype).numpy()


def save_model_atomic(model: Any, path: str | os.PathLike, external: bool) -> Path:
    """Save `model` to `path` (.onnx; with external=True its tensors in `NAME.onnx.data`)
    through a staging folder beside it: the data file moves first, the .onnx last."""
    import onnx

    path = Path(path)
    if path.suffix != ".onnx" or not path.parent.is_dir():
        raise ParameterError("output", str(path), "a .onnx file name in an existing folder")
    staging = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=path.parent))
    data = path.with_name(path.name + ".data")
    try:
        staged = staging / path.name
        if external:
            model = _copy(model)  # saving with external data empties the saved proto's tensors
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=0)
            os.replace(staging / data.name, data)
        else:
            onnx.save_model(model, str(staged))
        os.replace(staged, path)
        if not external and data.exists():
            data.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _copy(model: Any) -> Any:
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


@dataclass
class RefitPlan:
    """weights: engine weight name -> merged value (base + deltas) in the initializer's layout
    and dtype; report: what apply_weight_deltas did (unmapped, shared, not_refittable)."""

    weights: dict[str, np.ndarray] = field(default_factory=dict)
    report: RefitReport = field(default_factory=RefitReport)


def refit_branch(refitters: Mapping[str, Any], deltas: Mapping[str, Any], branch: str) -> dict[str, int]:
    """A backend's set_lora_deltas over its refitters (graph -> object whose apply(deltas)
    returns a RefitPlan): the UNet graphs of `branch` (graphs.LORA_GRAPHS) take the deltas.
    Returns graph -> number of weights now differing from base."""
    if branch not in LORA_GRAPHS:
        raise ParameterError("branch", branch, " or ".join(LORA_GRAPHS))
    foreign = sorted(k for k in deltas if not k.startswith("unet."))
    if foreign:
        raise ParameterError("deltas", foreign[:3], "UNet deltas (\"unet.*\"); text encoders run in PyTorch: fuse "
                             "their LoRA there (LoraManager on the branch)")
    mine = {g: r for g, r in refitters.items() if g in LORA_GRAPHS[branch]}
    if deltas and not mine:
        raise ParameterError("loras", sorted(deltas)[:3], f"{branch} UNet engines built refittable (xa-build-engines "
                             "--refit refit or strip) and the backend's onnx_dir")
    return {g: len(r.apply(deltas).weights) for g, r in mine.items()}
