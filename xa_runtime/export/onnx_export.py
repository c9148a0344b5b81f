"""PyTorch -> ONNX for each graph of the table (xa_runtime/graphs.py).

Exporter: the TorchScript-based one (`dynamo=False`). The dynamo exporter (torch 2.13,
onnxscript 0.7) fails on the diffusers UNet with dynamic height/width: torch.export
specialises the latent size through diffusers' `dim % default_overall_up_factor` check
("Constraints violated (8*h, 8*w)"), so the graph would be fixed-size. The TorchScript
trace keeps H/W/B/T symbolic and exports the tiny SD1.5 UNet in ~3 s.

After the export each graph is cleaned (export/cleanup.py: onnxruntime's basic offline
optimisation folds constants with the weights kept as named initializers, then onnx shape
inference with data propagation), then checked by onnx.checker with full_check (by path,
so > 2 GB models work). Files are written atomically: a staging folder beside the target,
then moved into place, the external data file (`NAME.onnx.data`, used above ~1.8 GB, e.g.
SDXL in fp32) first and the .onnx last.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import torch

import xa_runtime

from ..atomic_files import TEMP_TAG, move_all_or_nothing, remove_stale_temps, temp_prefix
from ..errors import ParameterError
from ..kernels.modules import kernels_off
from ..graphs import GRAPHS, SDXL_LATENT, GraphSpec, get_graph, resolve_dim
from .wrappers import ModuleBundle, build_graph_module, example_inputs, model_dims
from .options import DEFAULT_OPSET, DTYPE_NAMES, DTYPES_ACCEPTED, check_graph_names, check_opset

DTYPES = {name: getattr(torch, torch_name) for name, torch_name in DTYPE_NAMES.items()}
# protobuf cannot serialise a message over 2 GiB; stay well below it.
EXTERNAL_DATA_BYTES = 1_800_000_000
# Trace sizes: small (fast), not square (a swapped H/W would show), divisible by every
# downsampling factor (SD1.5 latent by 8, SDXL by 4).
EXAMPLE_DIMS = {"B": 2, "T": 77, "N": 8, "sd15": (16, 24), "sdxl": (16, 24)}


def check_dtype(dtype: object) -> torch.dtype:
    """The torch dtype of an export dtype name (or of a torch dtype already given)."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype  # type: ignore[return-value]
    raise ParameterError("dtype", dtype, DTYPES_ACCEPTED)


def check_bundle(spec: GraphSpec, bundle: ModuleBundle) -> None:
    missing = [part for part in spec.needs if getattr(bundle, part) is None]
    if missing:
        raise ParameterError("graphs", spec.name, f"graphs whose models are given; {spec.name} needs {', '.join(missing)}")


def available_graphs(bundle: ModuleBundle) -> list[str]:
    """The graphs of the table that `bundle` has the modules for."""
    return [n for n, s in GRAPHS.items() if all(getattr(bundle, part) is not None for part in s.needs)]


def trace_dims(spec: GraphSpec, bundle: ModuleBundle) -> dict[str, int]:
    """Model dimensions plus the small trace values of the dynamic ones."""
    h, w = EXAMPLE_DIMS["sdxl" if spec.profiles.get("H") is SDXL_LATENT else "sd15"]
    return {**model_dims(spec, bundle), "B": EXAMPLE_DIMS["B"], "T": EXAMPLE_DIMS["T"], "N": EXAMPLE_DIMS["N"],
            "H": h, "W": w}


def _module_dtype(module: torch.nn.Module) -> torch.dtype | None:
    p = next(module.parameters(), None)
    return None if p is None else p.dtype


def export_graph(
    name: str,
    bundle: ModuleBundle,
    path: str | os.PathLike,
    dtype: str | torch.dtype = torch.float32,
    opset: int = DEFAULT_OPSET,
    *,
    external_data: bool | None = None,
) -> Path:
    """Export graph `name` of the table from `bundle` to `path` (.onnx); returns the path.

    dtype: fp32 or fp16; modules in another dtype are exported from a converted copy
    (memory: one more model), so load them in the target dtype for big models. The
    export runs on the device the modules are on (fp16 wants a GPU). external_data:
    None decides by size; True / False force `NAME.onnx.data` or one file.
    """
    spec = get_graph(name)
    opset, dtype = check_opset(opset), check_dtype(dtype)
    path = Path(path)
    if path.suffix != ".onnx":
        raise ParameterError("path", str(path), "a file name ending in .onnx")
    if not path.parent.is_dir():
        raise ParameterError("path", str(path), f"a path in an existing folder; {str(path.parent)!r} is not one")
    check_bundle(spec, bundle)
    module = build_graph_module(spec, bundle)
    if _module_dtype(module) != dtype:
        getattr(module, "release", lambda: None)()
        module = build_graph_module(spec, bundle, convert=lambda m: copy.deepcopy(m).to(dtype))
    device = next(module.parameters()).device
    args = example_inputs(spec, trace_dims(spec, bundle), dtype, device)
    parameter_names = [n for n, _ in module.named_parameters()]
    staging = Path(tempfile.mkdtemp(prefix=f".{path.stem}-{STAGING_TAG}{os.getpid()}-", dir=path.parent))
    try:
        raw = staging / "raw" / path.name  # torch may write one external file per tensor beside it
        raw.parent.mkdir()
        with torch.no_grad(), warnings.catch_warnings(), kernels_off(module):  # trace torch's ops, not Triton's
            warnings.simplefilter("ignore")  # tracer warnings on diffusers' shape checks (constant for our profiles)
            torch.onnx.export(
                module.eval(), args, str(raw), dynamo=False, opset_version=opset,
                input_names=list(spec.input_names), output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes(),
                # Without constant folding, Linear weights stay initializers named as in torch
                # (behind a Transpose) instead of anonymous pre-transposed copies: refit maps by name.
                do_constant_folding=False,
            )
        _write_checked(raw, staging / path.name, path, spec, model_dims(spec, bundle), dtype, opset, external_data,
                       parameter_names)
    finally:
        getattr(module, "release", lambda: None)()
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _declare_io(model, spec: GraphSpec, dims: dict[str, int]) -> None:
    """Write the table's shapes into the graph's inputs and outputs: dynamic axes by their
    table names, the rest as numbers (the exporter leaves some, e.g. after a chunk, unnamed)."""
    for declared, values in ((spec.inputs, model.graph.input), (spec.outputs, model.graph.output)):
        for t, v in zip(declared, values):
            dynamic = set(t.dynamic_axes().values())
            for want, dim in zip(t.shape, v.type.tensor_type.shape.dim):
                if isinstance(want, str) and want in dynamic:
                    dim.dim_param = want
                else:
                    dim.dim_value = resolve_dim(want, dims)


def _write_checked(raw: Path, staged: Path, path: Path, spec: GraphSpec, dims: dict[str, int], dtype: torch.dtype,
                   opset: int, external_data: bool | None, parameter_names: list[str]) -> None:
    import onnx

    from .cleanup import FOLDING_KEY, fold_constants, infer_shapes, infer_shapes_file
    from .refit import build_name_map, names_path, write_name_map

    model = onnx.load(str(raw))  # with its external tensors, if torch wrote any
    _declare_io(model, spec, dims)
    size = sum(_tensor_bytes(t) for t in model.graph.initializer)
    external = size > EXTERNAL_DATA_BYTES if external_data is None else bool(external_data)
    name_map = build_name_map(spec, model, parameter_names)  # before folding: the exporter's Identity aliases
    fold_dir = staged.parent / "fold"
    fold_dir.mkdir()
    model, folding = fold_constants(model, name_map["initializers"], fold_dir, size > EXTERNAL_DATA_BYTES)
    shutil.rmtree(fold_dir)
    _declare_io(model, spec, dims)
    _set_transposed(name_map, model)
    meta = {"xa_runtime.graph": spec.name, "xa_runtime.dtype": str(dtype).removeprefix("torch."),
            "xa_runtime.opset": str(opset), "xa_runtime.version": xa_runtime.__version__, FOLDING_KEY: folding}
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    data = path.with_name(path.name + ".data")
    if external:
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=0)
        del model
        infer_shapes_file(staged)
    else:
        onnx.save_model(infer_shapes(model), str(staged))
        del model
    onnx.checker.check_model(str(staged), full_check=True)
    if external:
        os.replace(staged.with_name(data.name), data)
    write_name_map(name_map, staged.with_name(names_path(path).name))
    os.replace(staged.with_name(names_path(path).name), names_path(path))
    os.replace(staged, path)  # last: a present .onnx always has its complete data
    if not external and data.exists():
        data.unlink()  # left by an earlier export of the same name with external data


def _set_transposed(name_map: dict, model) -> None:
    """The name map's "transposed" flags as the cleaned graph reads its weights."""
    transposed = {i for n in model.graph.node if n.op_type == "Transpose" for i in n.input}
    for init, entry in name_map["initializers"].items():
        entry["transposed"] = init in transposed


def _tensor_bytes(t) -> int:
    import onnx

    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


STAGING_TAG = TEMP_TAG  # hidden staging folders: .NAME-xa-tmp-PID-XXXX (one graph), .xa-tmp-PID-XXXX (a set)


def remove_stale_staging(folder: str | os.PathLike) -> list[Path]:
    """Remove the hidden staging folders (and temporary files) in `folder` left by writers
    whose process is gone (killed mid-export); returns what was removed."""
    return remove_stale_temps(folder)


def export_graphs(
    names: Sequence[str], bundle: ModuleBundle, output_dir: str | os.PathLike, dtype: str | torch.dtype = torch.float32,
    opset: int = DEFAULT_OPSET, *, progress: bool = True, source: dict | None = None, force: bool = False,
) -> dict[str, Path]:
    """Export several graphs to `output_dir/NAME.onnx` with a progress bar, then write
    `manifest.json` (export/manifest.py); all inputs are checked before the first export.

    source: the source models' record (manifest.source_from_paths for model files); by
    default the fingerprint of the bundle's tensors. A folder whose manifest names another
    source is refused (ParameterError "output_dir") unless force; graphs of an earlier export
    of the same source stay listed.
    """
    from tqdm.auto import tqdm

    from . import manifest as mf

    names = check_graph_names(names)
    opset, dtype = check_opset(opset), check_dtype(dtype)
    for n in names:
        check_bundle(GRAPHS[n], bundle)
    out = Path(output_dir)
    if not out.is_dir():
        raise ParameterError("output_dir", str(out), "an existing folder")
    source = source or mf.source_from_bundle(bundle)
    previous = mf.check_source(out, source, force)
    for stale in remove_stale_staging(out):
        warnings.warn(f"removed {stale}, left by an interrupted export", stacklevel=2)
    # The new set is written beside the old one, in a hidden staging folder, with its manifest;
    # the old export (manifest and graphs) stays valid until every new file is complete (a full
    # disk fails here). Then the files move in (renames: quick), the manifest last, all or
    # nothing: a failure or a signal on the way puts the old files back.
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=out))
    try:
        for n in tqdm(names, desc="export", unit="graph", disable=not progress):
            export_graph(n, bundle, staging / f"{n}.onnx", dtype, opset)
        dtype_name = str(dtype).removeprefix("torch.")
        entries = {g: e for g, e in (previous or {}).get("graphs", {}).items()
                   if g not in names and (out / f"{g}.onnx").is_file()}
        entries.update({n: mf.graph_entry(staging, n, dtype_name, opset) for n in names})
        mf.write_manifest(staging, entries, source)
        moves = [(f, out / f.name) for n in names  # each .onnx after its data: it needs its data
                 for f in sorted(mf.graph_files(staging, n), key=lambda f: f.suffix == ".onnx")]
        move_all_or_nothing([*moves, (staging / mf.MANIFEST, out / mf.MANIFEST)])
        for n in names:
            if f"{n}.onnx.data" not in entries[n]["files"]:
                (out / f"{n}.onnx.data").unlink(missing_ok=True)  # an earlier export's external data
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    paths = {n: out / f"{n}.onnx" for n in names}
    return paths
