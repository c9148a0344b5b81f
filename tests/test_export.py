"""ONNX export of every graph of the table, checked with onnxruntime (CPU) against the torch
module, at two batch sizes and two spatial sizes; the exported IO against the table.

Tolerances (fp32, tiny random models): onnxruntime vs torch agree to about 1e-6 of the
output's largest magnitude (VAE decoders 2e-5, more ops in a row); the tests allow
rtol 1e-4 and atol 1e-4 x max|torch output|. fp16 graphs: 1e-2 of the largest magnitude.
"""

import os

import numpy as np
import onnx
import pytest
import torch

from xa_runtime.errors import ParameterError
from xa_runtime.export import ModuleBundle, build_graph_module, example_inputs, export_graph, model_dims
from xa_runtime.graphs import (
    DYNAMIC_DIMS, GRAPHS, SD15_LATENT, SDXL_LATENT, DimRange, TensorSpec, get_graph, resolve_dim,
)
from xa_runtime.runtime.backends.onnxruntime import GraphSession

RTOL, ATOL_REL = 1e-4, 1e-4
ONNX_TYPES = {"float": onnx.TensorProto.FLOAT, "float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}


def _sizes(name):
    """Two sets of dynamic-dim values unlike the trace's (B=2, 16x24 latents, 77 tokens)."""
    if "text_encoder" in name:
        return [{"B": 1, "T": 77}, {"B": 3, "T": 20}]
    if name.endswith(("vae_decoder", "vae_encoder")):
        return [{"B": 1, "H": 8, "W": 16}, {"B": 3, "H": 16, "W": 8}]
    # N: IP-Adapter image tokens (sd15_unet_ip), 4 as "plain" gives for one image, 16 as "plus"
    return [{"B": 1, "H": 16, "W": 16, "T": 77, "N": 4}, {"B": 3, "H": 32, "W": 16, "T": 9, "N": 16}]


def _compare(out, ref, rtol=RTOL, atol_rel=ATOL_REL):
    ref = (ref,) if isinstance(ref, torch.Tensor) else ref
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.shape == r.shape
        torch.testing.assert_close(o.float(), r.float(), rtol=rtol, atol=atol_rel * float(r.abs().max()))


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graph_matches_torch_at_two_sizes(tiny_onnx, name):
    bundle, folder = tiny_onnx
    spec = GRAPHS[name]
    session = GraphSession(spec, folder / f"{name}.onnx")
    module = build_graph_module(spec, bundle)
    try:
        for i, dims in enumerate(_sizes(name)):
            x = example_inputs(spec, {**model_dims(spec, bundle), **dims}, torch.float32, torch.device("cpu"), seed=i)
            with torch.no_grad():
                ref = module(*x)
            _compare(session(*x), ref)
    finally:
        getattr(module, "release", lambda: None)()


@pytest.mark.parametrize("name", list(GRAPHS))
def test_onnx_io_is_the_table(tiny_onnx, name):
    """Names, order, ranks, element types, dynamic dim names and static sizes as declared."""
    bundle, folder = tiny_onnx
    spec = GRAPHS[name]
    model = onnx.load(str(folder / f"{name}.onnx"), load_external_data=False)
    dims = model_dims(spec, bundle)
    for declared, actual in ((spec.inputs, model.graph.input), (spec.outputs, model.graph.output)):
        assert [v.name for v in actual] == [t.name for t in declared]
        for t, v in zip(declared, actual):
            ttype = v.type.tensor_type
            assert ttype.elem_type == ONNX_TYPES[t.dtype], t.name
            shape = [d.dim_param or d.dim_value for d in ttype.shape.dim]
            assert len(shape) == len(t.shape), t.name
            for want, got in zip(t.shape, shape):
                if isinstance(want, str) and want in t.dynamic_axes().values():
                    assert got == want, (t.name, shape)
                else:
                    assert got == resolve_dim(want, dims), (t.name, shape)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["xa_runtime.graph"] == name and meta["xa_runtime.dtype"] == "float32"
    assert meta["xa_runtime.opset"] == "17"
    # cleaned (export/cleanup.py): constants folded, standard ops only, shapes of the intermediates
    assert meta["xa_runtime.constant_folding"] == "onnxruntime-basic"
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"} and not any(
        n.op_type == "Constant" and n.output[0] in {i for m in model.graph.node for i in m.input if m.op_type == "Unsqueeze"}
        for n in model.graph.node)  # the exporter's Constant -> Unsqueeze chains are gone
    shaped = {v.name for v in model.graph.value_info if v.type.tensor_type.HasField("shape")}
    intermediate = {o for n in model.graph.node for o in n.output} - {o.name for o in model.graph.output}
    assert len(shaped & intermediate) >= 0.95 * len(intermediate), (len(shaped & intermediate), len(intermediate))


@pytest.mark.parametrize("name", ["sd15_unet", "sd15_unet_ip", "sdxl_unet", "sdxl_unet_fused", "controlnet",
                                  "sdxl_text_encoder_2"])
def test_refittable_weights_are_named_initializers(tiny_onnx, name):
    """Every LoRA-targeted weight is an ONNX initializer under its torch name, with its values
    (what refit maps by); norms and biases are not refittable."""
    bundle, folder = tiny_onnx
    spec = GRAPHS[name]
    model = onnx.load(str(folder / f"{name}.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    module = build_graph_module(spec, bundle)
    getattr(module, "release", lambda: None)()
    refit = {n: p for n, p in module.named_parameters() if spec.is_refittable(n)}
    assert len(refit) > 10
    for n, p in refit.items():
        assert n in inits, n
        np.testing.assert_array_equal(inits[n], p.numpy())
    kinds = ("to_q", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj") if "text" not in name else (
        "q_proj", "out_proj", "fc1")
    for kind in kinds:
        assert any(f".{kind}.weight" in n for n in refit), kind
    assert not any(n.endswith(".bias") or "norm" in n for n in refit)


def test_table_profiles_and_shapes():
    sd15 = get_graph("sd15_unet").profile_shapes({"ctx": 768})
    assert sd15["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))  # 256-1024 px, batch 1-8
    assert sd15["encoder_hidden_states"][1] == (2, 77, 768)
    xl = get_graph("sdxl_unet").profile_shapes({"ctx": 2048, "pooled": 1280, "c_r0": 1280, "c_r1": 1280, "c_r2": 640})
    assert xl["sample"][0] == (1, 4, 64, 64) and xl["sample"][2] == (8, 4, 192, 192)  # 512-1536 px
    assert xl["r0"][1] == (2, 1280, 32, 32) and xl["r2"][1] == (2, 640, 128, 128)  # xadapter.md shapes at 1024 px
    assert get_graph("sdxl_vae_encoder").profile_shapes({})["image"][2] == (4, 3, 1536, 1536)
    assert get_graph("sd15_unet").profiles["H"] is SD15_LATENT and get_graph("mapping").profiles["H"] is SDXL_LATENT
    assert isinstance(SD15_LATENT, DimRange)
    assert resolve_dim("8*H", {"H": 3}) == 24 and resolve_dim("W/4", {"W": 8}) == 2 and resolve_dim(4, {}) == 4
    with pytest.raises(ValueError):
        resolve_dim("H/8", {"H": 12})
    with pytest.raises(KeyError):
        TensorSpec("x", "float", ("B", "ctx")).resolve({"B": 1})
    for spec in GRAPHS.values():
        assert len(set(spec.input_names)) == len(spec.inputs) and len(set(spec.output_names)) == len(spec.outputs)
        assert all(t.dtype in ("float", "float32", "int64") for t in spec.inputs + spec.outputs)
        assert set(spec.profiles) == {d for t in spec.inputs for d in DYNAMIC_DIMS if any(d in str(s) for s in t.shape)}
    ip = get_graph("sd15_unet_ip").profile_shapes({"ctx": 768, "ip_layers": 16})
    assert ip["ip_tokens"] == ((1, 4, 768), (2, 16, 768), (8, 257, 768))  # plain 4 .. full 257 image tokens
    assert ip["ip_scale"][0] == (16,)


def test_external_data_pair_is_written_and_replaced(tiny_onnx, tmp_path):
    bundle, _ = tiny_onnx
    path = tmp_path / "mapping.onnx"
    export_graph("mapping", bundle, path, external_data=True)
    data = tmp_path / "mapping.onnx.data"
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    onnx.checker.check_model(str(path))
    spec = GRAPHS["mapping"]
    x = example_inputs(spec, {**model_dims(spec, bundle), "B": 1, "H": 16, "W": 8}, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        _compare(GraphSession(spec, path)(*x), bundle.mapping(*x))
    export_graph("mapping", bundle, path)  # one file again: the stale data file goes
    assert path.is_file() and not data.exists()
    assert sorted(os.listdir(tmp_path)) == ["mapping.names.json", "mapping.onnx"]  # no staging leftovers


def test_fp16_export(tmp_path):
    """fp16 graphs from fp32 modules (converted copies; the originals stay fp32), run on CPU."""
    bundle = ModuleBundle.tiny(1)
    for name in ("mapping", "sdxl_text_encoder_2"):
        spec = GRAPHS[name]
        path = export_graph(name, bundle, tmp_path / f"{name}.onnx", dtype="fp16")
        model = onnx.load(str(path))
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["xa_runtime.constant_folding"] == "onnxruntime-basic"  # fp16 folds on the CPU provider too
        assert model.graph.input[0].type.tensor_type.elem_type == (
            onnx.TensorProto.FLOAT16 if spec.inputs[0].dtype == "float" else onnx.TensorProto.INT64)
        x = example_inputs(spec, {**model_dims(spec, bundle), "B": 2, "H": 16, "W": 16, "T": 77}, torch.float32,
                           torch.device("cpu"))
        module = build_graph_module(spec, bundle)
        assert next(module.parameters()).dtype == torch.float32
        with torch.no_grad():
            _compare(GraphSession(spec, path)(*x), module(*x), rtol=1e-2, atol_rel=1e-2)


def test_bad_inputs_are_named(tiny_onnx, tmp_path):
    bundle, _ = tiny_onnx
    target = tmp_path / "g.onnx"
    cases = [
        (dict(name="unet"), "graph"),
        (dict(opset=13), "opset"), (dict(opset=21), "opset"), (dict(opset="17"), "opset"),
        (dict(dtype="bf16"), "dtype"), (dict(dtype=torch.bfloat16), "dtype"),
        (dict(path=tmp_path / "g.pt"), "path"), (dict(path=tmp_path / "nope" / "g.onnx"), "path"),
        (dict(bundle=ModuleBundle(sd15=bundle.sd15)), "graphs"),
    ]
    for overrides, param in cases:
        kwargs = {**dict(name="mapping", bundle=bundle, path=target, dtype="fp32", opset=17), **overrides}
        with pytest.raises(ParameterError) as e:
            export_graph(kwargs["name"], kwargs["bundle"], kwargs["path"], kwargs["dtype"], kwargs["opset"])
        assert e.value.name == param, overrides
    assert list(tmp_path.iterdir()) == []  # nothing written, not even staging folders


def test_cli_exports_and_refuses_before_work(tmp_path, capsys):
    from xa_runtime.cli.export import main

    out = tmp_path / "graphs"
    assert main(["--tiny", "--output", str(out), "--graphs", "mapping,sd15_text_encoder", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".onnx") == ["mapping.onnx", "sd15_text_encoder.onnx"]
    bad = [
        ["--tiny", "--output", str(tmp_path / "a"), "--graphs", "bogus"],
        ["--tiny", "--output", str(tmp_path / "a"), "--dtype", "bf16"],
        ["--tiny", "--output", str(tmp_path / "a"), "--opset", "12"],
        ["--tiny", "--output", str(tmp_path / "a"), "--device", "tpu"],
        ["--tiny", "--output", str(tmp_path / "x" / "y")],
        ["--tiny", "--sd15", str(tmp_path), "--output", str(tmp_path / "a")],
        ["--tiny-seed", "-1", "--output", str(tmp_path / "a")],
        ["--tiny-seed", "1", "--sd15", str(tmp_path), "--output", str(tmp_path / "a")],
        ["--sd15", str(tmp_path / "missing"), "--output", str(tmp_path / "a"), "--graphs", "sd15_unet"],
        ["--sd15", str(tmp_path / "missing"), "--output", str(tmp_path / "a"), "--graphs", "mapping"],
    ]
    capsys.readouterr()
    for argv in bad:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graphs"]


def test_cli_exports_the_ip_adapter_graph(tiny_paths, tmp_path, capsys):
    """xa-export --sd15 DIR --ip-adapter FILE: the sd15_unet_ip graph, its manifest fingerprint
    covering the IP-Adapter file; without the file the graph is refused before any work."""
    import json

    from xa_runtime.cli.export import main
    from xa_runtime.export.manifest import file_sha256
    from xa_runtime.models.tiny import build_tiny_models
    from xa_runtime.testing import write_tiny_ip_adapter

    ip = write_tiny_ip_adapter(tmp_path / "ip", build_tiny_models(0)[0].unet)["safetensors"]
    out = tmp_path / "graphs"
    argv = ["--sd15", tiny_paths.sd15_dir, "--output", out, "--graphs", "sd15_unet_ip", "--no-progress"]
    assert main([str(a) for a in argv + ["--ip-adapter", ip]]) == 0
    assert (out / "sd15_unet_ip.onnx").is_file()
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert source["files"]["--ip-adapter"]["sha256"] == file_sha256(ip)
    names = json.loads((out / "sd15_unet_ip.names.json").read_text())["initializers"]
    ip_weights = [e for e in names.values() if any("to_k_ip" in n for n in e["torch"])]
    assert len(ip_weights) == 16 and not any(e["refittable"] for e in ip_weights)  # baked in, not refittable
    assert any(e["refittable"] and e["torch"][0].startswith("unet.") for e in names.values())  # LoRA targets are
    capsys.readouterr()
    for bad, says in ((argv, "needs --ip-adapter"), (argv + ["--ip-adapter", tmp_path / "missing.bin"], "--ip-adapter")):
        assert main([str(a) for a in bad[:3] + [tmp_path / "b"] + bad[4:]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err, err
    assert not (tmp_path / "b").exists()
