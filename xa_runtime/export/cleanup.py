"""Graph clean-up after the TorchScript export: constant folding, then shape inference.

Constant folding is onnxruntime's offline optimisation at the basic level (constant
folding and redundant-node removal, provider-independent, standard ONNX ops only) on the CPU
provider. The weights are made graph inputs for that pass, so onnxruntime treats them as
non-constant: they stay initializers under their torch names, in torch's layout (what refit
maps by), while the exporter's Constant/Shape/Unsqueeze chains on constants fold (the tiny
SD1.5 UNet goes from ~5100 to ~2600 nodes). If onnxruntime cannot build a session for the
graph (e.g. an fp16 op without a CPU kernel) the graph is kept unfolded, with a warning and
the reason in the metadata. Shape inference (onnx, with data propagation) then writes
value_info for the intermediate tensors.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable

FOLDING_KEY = "xa_runtime.constant_folding"  # metadata: "onnxruntime-basic" or "none: <reason>"


def fold_constants(model: Any, protect: Iterable[str], workdir: str | os.PathLike, external: bool) -> tuple[Any, str]:
    """(folded model, what was done). `protect`: initializer names kept as they are (the
    weights); `workdir`: an empty staging folder; external: pass the tensors through
    external data files (graphs over protobuf's 2 GiB)."""
    import onnx
    import onnxruntime as ort

    workdir = Path(workdir)
    original_inputs = [i.name for i in model.graph.input]
    inits = {t.name: t for t in model.graph.initializer}
    staged = onnx.ModelProto()
    staged.CopyFrom(model)
    for name in protect:
        t = inits[name]
        staged.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    source, target = workdir / "fold_in.onnx", workdir / "fold_out.onnx"
    if external:
        onnx.save_model(staged, str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="fold_in.onnx.data", size_threshold=1024)
    else:
        onnx.save_model(staged, str(source))
    del staged
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3  # the "initializer appears in graph inputs" warnings are intended
    if external:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "fold_out.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail / NotImplemented / InvalidGraph types
        reason = f"none: onnxruntime could not optimise the graph ({str(e).splitlines()[0][:200]})"
        warnings.warn(f"constant folding skipped: {reason}", stacklevel=2)
        return model, reason
    folded = onnx.load(str(target))
    by_name = {i.name: i for i in folded.graph.input}
    del folded.graph.input[:]
    folded.graph.input.extend(by_name[n] for n in original_inputs)
    used = {n.domain for n in folded.graph.node} | {""}
    keep = [o for o in folded.opset_import if o.domain in used or (o.domain == "ai.onnx")]
    del folded.opset_import[:]
    folded.opset_import.extend(keep)
    foreign = sorted({n.op_type for n in folded.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise RuntimeError(f"onnxruntime's basic optimisation introduced non-standard ops {foreign}")
    missing = [n for n in protect if n not in {t.name for t in folded.graph.initializer}]
    if missing:
        raise RuntimeError(f"constant folding dropped weights {missing[:5]}")
    return folded, "onnxruntime-basic"


def infer_shapes(model: Any) -> Any:
    """The model with value_info for its intermediate tensors (onnx shape inference, data
    propagation on, so Shape -> Reshape chains get their static parts)."""
    import onnx

    return onnx.shape_inference.infer_shapes(model, check_type=True, data_prop=True)


def infer_shapes_file(path: str | os.PathLike) -> None:
    """infer_shapes for a saved graph with external data (over 2 GiB), in place."""
    import onnx

    onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, data_prop=True)
