"""LoRA on exported graphs: weight deltas (LoraManager.weight_deltas) added to the ONNX
initializers through the name map give what PyTorch gives with the LoRA fused.

Tolerance: onnxruntime CPU vs torch, fp32, same as the export tests: rtol 1e-4 and atol
1e-4 x max|torch output| (observed ~1e-6 relative)."""

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from xa_runtime.errors import ParameterError
from xa_runtime.export import ModuleBundle, apply_weight_deltas, build_graph_module, example_inputs, model_dims
from xa_runtime.export.refit import names_path, read_name_map
from xa_runtime.plugins.lora import LoraManager, load_lora
from xa_runtime.testing import write_random_lora
from xa_runtime.graphs import GRAPHS
from xa_runtime.runtime.backends.onnxruntime import GraphSession


def _compare(out, ref):
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


def _run_both(name, bundle, path, dims):
    spec = GRAPHS[name]
    x = example_inputs(spec, {**model_dims(spec, bundle), **dims}, torch.float32, torch.device("cpu"), seed=5)
    module = build_graph_module(spec, bundle)
    try:
        with torch.no_grad():
            ref = module(*x)
    finally:
        getattr(module, "release", lambda: None)()
    ref = (ref,) if isinstance(ref, torch.Tensor) else tuple(ref)
    return GraphSession(spec, path)(*x), ref


@pytest.mark.parametrize("name,fmt", [("sd15_unet", "kohya"), ("sdxl_text_encoder_2", "peft"),
                                      ("sdxl_unet_fused", "kohya")])
def test_lora_on_onnx_equals_fused_torch(tiny_onnx, tmp_path, name, fmt):
    bundle, folder = tiny_onnx
    family = "sdxl" if name.startswith("sdxl") else "sd15"
    comps = copy.deepcopy(getattr(bundle, family))  # the session bundle stays the base
    lora_file = tmp_path / "lora.safetensors"
    if family == "sd15":
        write_random_lora(lora_file, comps.unet, comps.text_encoder, fmt=fmt, std=0.2)
    else:
        write_random_lora(lora_file, comps.unet, comps.text_encoder, text_encoder_2=comps.text_encoder_2, fmt=fmt,
                          std=0.2)
    manager = LoraManager.for_branch(comps, "fused")
    assert manager.add("style", load_lora(lora_file), scale=0.7) == []
    deltas = manager.weight_deltas()
    deltas["unet.no_such_block.weight"] = torch.zeros(3)  # a target this graph does not have

    out = tmp_path / f"{name}.onnx"
    report = apply_weight_deltas(folder / f"{name}.onnx", deltas, output=out)
    target = "text_encoder_2." if "text_encoder_2" in name else "unet."
    mine = sorted(k for k in deltas if k.startswith(target) and "no_such" not in k)
    assert sorted(report.applied) == mine and len(mine) >= 3
    assert "unet.no_such_block.weight" in report.unmapped
    assert sorted(report.unmapped) == sorted(set(deltas) - set(mine))  # the other components' deltas too
    assert report.shared == [] and report.not_refittable == []
    assert names_path(out).is_file() and read_name_map(names_path(out))["graph"] == name

    fused = ModuleBundle(**{**vars(bundle), family: comps})
    dims = {"B": 2, "H": 16, "W": 16, "T": 77}
    got, ref = _run_both(name, fused, out, dims)
    _compare(got, ref)
    base, _ = _run_both(name, bundle, folder / f"{name}.onnx", dims)
    assert (base[0] - ref[0]).abs().max() > 1e-2 * ref[0].abs().max()  # the LoRA changes the output


def test_name_map_of_export(tiny_onnx):
    _, folder = tiny_onnx
    unet = read_name_map(names_path(folder / "sd15_unet.onnx"))
    entries = unet["initializers"]
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert entries[q]["torch"] == [q] and entries[q]["refittable"] and entries[q]["transposed"]
    conv = entries["unet.down_blocks.0.resnets.0.conv1.weight"]
    assert conv["refittable"] and not conv["transposed"] and len(conv["shape"]) == 4 and conv["dtype"] == "float32"
    assert not entries["unet.conv_in.bias"]["refittable"]
    shared = [e for e in entries.values() if len(e["torch"]) > 1]  # equal-valued norms, deduplicated by the exporter
    assert shared and not any(e["refittable"] for e in shared)
    fused = read_name_map(names_path(folder / "sdxl_unet_fused.onnx"))  # the mapping layers inside, not refittable
    assert fused["target"] == "unet"
    names = {t: e["refittable"] for e in fused["initializers"].values() for t in e["torch"]}
    mapping = {t: r for t, r in names.items() if t.startswith("mapping.")}
    assert "mapping.body.0.block1.weight" in mapping and "mapping.zero_out.2.weight" in mapping
    assert not any(mapping.values())
    assert all(t.startswith(("unet.", "mapping.")) for t in names)
    assert names["unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    te2 = read_name_map(names_path(folder / "sdxl_text_encoder_2.onnx"))
    assert te2["target"] == "text_encoder_2"
    assert all(t.startswith("text_encoder_2.") for e in te2["initializers"].values() for t in e["torch"])


def test_layout_dtype_shared_and_errors():
    """fp16 initializer, a delta given transposed, a shared initializer, a wrong shape."""
    w = np.arange(6, dtype=np.float16).reshape(3, 2)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [1, 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [1, 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros((2, 3), np.float16), "s")],
    )
    model = helper.make_model(graph)
    name_map = {"format": 1, "initializers": {"w": {"torch": ["unet.a.weight"], "refittable": True},
                                              "s": {"torch": ["unet.b.weight", "unet.c.weight"], "refittable": False}}}
    delta = torch.full((2, 3), 0.5)  # transposed relative to the initializer
    with pytest.raises(ParameterError) as e:
        apply_weight_deltas(model, {"unet.a.weight": torch.zeros(3, 3)}, name_map)
    assert e.value.name == "deltas" and "(3, 2)" in e.value.accepted
    assert np.array_equal(numpy_helper.to_array(model.graph.initializer[0]), w)  # nothing changed
    report = apply_weight_deltas(model, {"unet.a.weight": delta, "unet.b.weight": delta, "te.x": delta}, name_map)
    assert report.applied == ["unet.a.weight"] and report.unmapped == ["te.x"]
    assert report.shared == ["unet.b.weight"]  # read by two parameters: not applied
    new = numpy_helper.to_array(model.graph.initializer[0])
    assert new.dtype == np.float16 and np.array_equal(new, (w.astype(np.float32) + 0.5).astype(np.float16))
    with pytest.raises(ParameterError) as e:
        apply_weight_deltas(model, {}, None)
    assert e.value.name == "name_map"
    with pytest.raises(ParameterError):
        apply_weight_deltas("missing.onnx", {})


def test_external_data_graph_refit_to_a_new_file(tiny_onnx, tmp_path):
    """A graph with NAME.onnx.data: the changed copy keeps that layout; the source is untouched;
    a weight outside the refittable ones is applied and reported."""
    from xa_runtime.export import export_graph

    bundle, _ = tiny_onnx
    src = tmp_path / "src"
    src.mkdir()
    export_graph("mapping", bundle, src / "mapping.onnx", external_data=True)
    name_map = read_name_map(names_path(src / "mapping.onnx"))
    key = next(t for e in name_map["initializers"].values() for t in e["torch"] if t.endswith("weight"))
    init = next(i for i, e in name_map["initializers"].items() if key in e["torch"])
    shape = name_map["initializers"][init]["shape"]
    before = (src / "mapping.onnx.data").read_bytes()
    report = apply_weight_deltas(src / "mapping.onnx", {key: torch.ones(shape)}, output=tmp_path / "mapping.onnx")
    assert report.applied == [key] and report.not_refittable == [key]
    assert (src / "mapping.onnx.data").read_bytes() == before
    assert (tmp_path / "mapping.onnx.data").is_file() and names_path(tmp_path / "mapping.onnx").is_file()
    old = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src / "mapping.onnx")).graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "mapping.onnx")).graph.initializer}
    np.testing.assert_allclose(new[init], old[init] + 1, rtol=0, atol=1e-6)
    assert all(np.array_equal(new[n], old[n]) for n in old if n != init)
