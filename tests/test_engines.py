"""The TensorRT layer's CPU half: refit plan vs PyTorch with the LoRA fused (through
onnxruntime), engine manifest checks for every field, atomic builds, xa-build-engines
argument errors before any work. Nothing here runs TensorRT (see test_engines_gpu.py).

Tolerance of the refit comparison: onnxruntime CPU vs torch, fp32, as test_refit.py:
rtol 1e-4, atol 1e-4 x max|torch output|."""

import copy
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from xa_runtime import availability
from xa_runtime.cli import build_engines as cli
from xa_runtime.engines import manifest as mf
from xa_runtime.engines.refit import base_weights, plan_changes, refit_plan
from xa_runtime.errors import ParameterError
from xa_runtime.export import ModuleBundle, build_graph_module, example_inputs, export_graphs, model_dims
from xa_runtime.export.refit import names_path, read_name_map
from xa_runtime.plugins.lora import LoraManager, load_lora
from xa_runtime.testing import write_random_lora
from xa_runtime.graphs import GRAPHS, DimRange, default_build_graphs
from xa_runtime.runtime.backends.onnxruntime import GraphSession

FACTS = mf.DeviceFacts("NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35")


@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory):
    bundle = ModuleBundle.tiny(0)
    folder = tmp_path_factory.mktemp("onnx_unet")
    export_graphs(["sd15_unet"], bundle, folder, progress=False)
    return bundle, folder / "sd15_unet.onnx"


def _deltas(comps, path, scale):
    write_random_lora(path, comps.unet, comps.text_encoder, fmt="kohya", std=0.2)
    manager = LoraManager.for_branch(comps, "fused")
    assert manager.add("style", load_lora(path), scale=scale) == []
    return manager


def _run(spec, bundle, path, seed=5):
    dims = {**model_dims(spec, bundle), "B": 2, "H": 16, "W": 16, "T": 77}
    x = example_inputs(spec, dims, torch.float32, torch.device("cpu"), seed=seed)
    module = build_graph_module(spec, bundle)
    try:
        with torch.no_grad():
            ref = module(*x)
    finally:
        getattr(module, "release", lambda: None)()
    return GraphSession(spec, path)(*x), tuple(ref)


def _with_weights(onnx_path, weights, out):
    """The base graph with `weights` put in by name: what trt.Refitter.set_named_weights does."""
    model = onnx.load(str(onnx_path))
    for t in model.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name], t.name))
    onnx.save(model, str(out))
    return out


def test_refit_plan_equals_fused_torch(unet_onnx, tmp_path):
    bundle, path = unet_onnx
    spec = GRAPHS["sd15_unet"]
    comps = copy.deepcopy(bundle.sd15)  # fused in place below; the bundle stays the base
    manager = _deltas(comps, tmp_path / "lora.safetensors", 0.7)
    deltas = manager.weight_deltas()
    deltas["unet.conv_in.weight"] = torch.full_like(comps.unet.conv_in.weight, 0.1)  # not a refittable weight
    plan = refit_plan(path, deltas)
    name_map = read_name_map(names_path(path))["initializers"]
    assert plan.weights and all(name_map[n]["refittable"] for n in plan.weights)
    assert "unet.conv_in.weight" not in plan.weights and plan.report.not_refittable == ["unet.conv_in.weight"]
    lora_keys = {k for k in deltas if k.startswith("unet.") and k != "unet.conv_in.weight"}
    assert set(plan.weights) == {i for k, i in zip(plan.report.applied, plan.report.initializers) if k in lora_keys}
    base = base_weights(onnx.load(str(path)), sorted(plan.weights))
    for name, value in plan.weights.items():  # base + delta in the initializer's layout and dtype
        assert value.shape == base[name].shape and value.dtype == base[name].dtype
    del deltas["unet.conv_in.weight"]

    fused = ModuleBundle(**{**vars(bundle), "sd15": comps})
    got, ref = _run(spec, fused, _with_weights(path, plan.weights, tmp_path / "refitted.onnx"))
    for o, r in zip(got, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))
    base_out, _ = _run(spec, bundle, path)
    assert (base_out[0] - ref[0]).abs().max() > 1e-2 * ref[0].abs().max()  # the LoRA changes the output

    # refit between requests: only changed weights are fed; unloading feeds the base values back
    changed, restore = plan_changes(plan.weights, plan.weights)
    assert changed == {} and restore == []
    manager.set_scale("style", 0.3)
    plan2 = refit_plan(path, manager.weight_deltas())
    changed, restore = plan_changes(plan.weights, plan2.weights)
    assert set(changed) == set(plan.weights) and restore == []
    changed, restore = plan_changes(plan2.weights, {})
    assert changed == {} and restore == sorted(plan2.weights)
    unloaded = base_weights(onnx.load(str(path)), restore)
    got, _ = _run(spec, bundle, _with_weights(path, unloaded, tmp_path / "unloaded.onnx"))
    for o, b in zip(got, base_out, strict=True):
        assert torch.equal(o, b)


def _store(folder, onnx_path, plan=b"plan-bytes", facts=FACTS, precision="fp16"):
    profiles = GRAPHS["mapping"].profiles
    return mf.write_engine(folder, "mapping", lambda: plan, lambda h: mf.engine_manifest(
        "mapping", facts, precision, profiles, ["FP16"], "none", mf.onnx_sha256(onnx_path), h))


@pytest.fixture
def stored(tmp_path):
    onnx_path = tmp_path / "mapping.onnx"
    onnx_path.write_bytes(b"fake onnx")
    engines = tmp_path / "engines"
    engines.mkdir()
    _store(engines, onnx_path)
    return engines, onnx_path


def test_manifest_accepts_the_same_machine(stored):
    engines, onnx_path = stored
    data, manifest = mf.read_engine(engines, "mapping", FACTS, onnx_path, {"precision": "fp16"})
    assert data == b"plan-bytes" and manifest["compute_capability"] == "9.0"
    assert manifest["profiles"]["H"] == [64, 128, 192] and manifest["builder_flags"] == ["FP16"]


@pytest.mark.parametrize("field,facts", [
    ("gpu_name", mf.DeviceFacts("NVIDIA L4", "9.0", "10.13.0.35")),
    ("compute_capability", mf.DeviceFacts("NVIDIA H100 80GB HBM3", "8.9", "10.13.0.35")),
    ("tensorrt_version", mf.DeviceFacts("NVIDIA H100 80GB HBM3", "9.0", "10.14.1.0")),
])
def test_manifest_refuses_another_machine(stored, field, facts):
    engines, onnx_path = stored
    with pytest.raises(mf.EngineMismatchError) as e:
        mf.read_engine(engines, "mapping", facts, onnx_path)
    assert e.value.field == field and "xa-build-engines" in str(e.value) and "--graphs mapping" in str(e.value)


def test_manifest_refuses_changed_sources_and_files(stored, monkeypatch):
    engines, onnx_path = stored
    with pytest.raises(mf.EngineMismatchError) as e:
        mf.read_engine(engines, "mapping", FACTS, onnx_path, {"precision": "bf16"})
    assert e.value.field == "precision"
    onnx_path.write_bytes(b"fake onnx, exported again")
    with pytest.raises(mf.EngineMismatchError) as e:
        mf.read_engine(engines, "mapping", FACTS, onnx_path)
    assert e.value.field == "onnx_sha256" and "changed" in str(e.value)
    mf.read_engine(engines, "mapping", FACTS)  # no source given: not checked
    plan = mf.plan_path(engines, "mapping")
    plan.write_bytes(b"plan-bytEs")
    with pytest.raises(mf.EngineMismatchError) as e:
        mf.read_engine(engines, "mapping", FACTS)
    assert e.value.field == "engine_sha256" and "corrupted" in str(e.value)
    plan.unlink()
    with pytest.raises(mf.EngineMismatchError) as e:
        mf.read_engine(engines, "mapping", FACTS)
    assert e.value.field == "engine"
    mf.manifest_path(engines, "mapping").write_text("{not json")
    with pytest.raises(mf.EngineMismatchError) as e:
        mf.read_engine(engines, "mapping", FACTS)
    assert e.value.field == "manifest"
    mf.manifest_path(engines, "mapping").write_text(json.dumps({"format": 99, "graph": "mapping"}))
    with pytest.raises(mf.EngineMismatchError) as e:
        mf.read_engine(engines, "mapping", FACTS)
    assert e.value.field == "format"


def test_failing_build_leaves_nothing(tmp_path, stored):
    folder = tmp_path / "fresh"
    folder.mkdir()

    def fail():
        raise RuntimeError("builder ran out of memory")

    with pytest.raises(RuntimeError):
        mf.write_engine(folder, "mapping", fail, lambda h: {})
    assert list(folder.iterdir()) == []
    engines, onnx_path = stored  # a failed rebuild: the old plan is no longer trusted
    with pytest.raises(RuntimeError):
        mf.write_engine(engines, "mapping", fail, lambda h: {})
    assert not mf.manifest_path(engines, "mapping").exists()
    assert sorted(p.name for p in engines.iterdir()) == ["mapping.plan"]
    with pytest.raises(mf.EngineMismatchError) as e:
        mf.read_engine(engines, "mapping", FACTS)
    assert e.value.field == "manifest"


def test_profiles_presets_overrides_static():
    spec = GRAPHS["sdxl_unet"]
    assert mf.resolve_profiles(spec) == dict(spec.profiles)
    one = mf.resolve_profiles(spec, "1024")
    assert one["H"] == one["W"] == DimRange(128, 128, 128) and one["B"] == spec.profiles["B"]
    wide = mf.resolve_profiles(spec, "512-1536", max="4,1536,2048")
    assert wide["H"] == DimRange(64, 128, 192) and wide["W"] == DimRange(64, 128, 256) and wide["B"].max == 4
    static = mf.resolve_profiles(spec, opt="2,768,1024", static=True)
    assert static["H"] == DimRange(96, 96, 96) and static["B"] == DimRange(2, 2, 2) and static["T"].min == 77
    assert mf.resolve_profiles(GRAPHS["sd15_text_encoder"], "1024")["B"] == spec.profiles["B"]


@pytest.mark.parametrize("argv,flag,accepted", [
    (["--refit", "always"], "--refit", "none, refit, strip"),
    (["--preset", "2048"], "--preset", "1024, 512-1536"),
    (["--min", "0,512,512"], "--min", "rows 1-64"),
    (["--opt", "2,1000,1024"], "--opt", "multiples of 64 in 64-4096"),
    (["--max", "2x8192x1024"], "--max", "64-4096"),
    (["--min", "2,1024,1024", "--opt", "2,512,512"], "--opt", "min <= opt <= max"),
    (["--graphs", "sd15_unet,nope"], "--graphs", "sdxl_unet"),
])
def test_cli_argument_errors(tmp_path, argv, flag, accepted, capsys):
    base = ["--onnx-dir", str(tmp_path), "--output", str(tmp_path / "engines")]
    with pytest.raises(ParameterError) as e:
        cli.check_inputs(cli.build_parser().parse_args(base + argv))
    assert e.value.name == flag and accepted in e.value.accepted
    assert cli.main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: invalid {flag}") and accepted in err
    assert not (tmp_path / "engines").exists()


@pytest.mark.parametrize("flag", ["--dtype", "--precision"])
def test_cli_dtype_choices(tmp_path, flag, capsys):
    assert cli.main(["--onnx-dir", str(tmp_path), "--output", str(tmp_path / "engines"), flag, "int8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --dtype/--precision: invalid choice: 'int8'") and "'fp32', 'fp16', 'bf16'" in err
    assert not (tmp_path / "engines").exists()


def test_cli_folders_and_usage(tmp_path, capsys):
    out = ["--output", str(tmp_path / "engines")]
    # no model paths and no exported graphs (no NAME.onnx): the tiny models are exported there first
    for folder in (tmp_path / "none", tmp_path):
        args = cli.build_parser().parse_args(["--onnx-dir", str(folder)] + out)
        cli.check_inputs(args)
        assert args.tiny and cli._export_argv(args, ["mapping"])[-1] == "--tiny"
    assert cli.main(["--onnx-dir", str(tmp_path / "x" / "y")] + out) == 2
    assert "invalid --onnx-dir" in capsys.readouterr().err
    (tmp_path / "controlnet.onnx").write_bytes(b"x")  # an export folder without the default graphs
    assert cli.main(["--onnx-dir", str(tmp_path)] + out) == 2
    assert "sd15_unet, mapping, sdxl_unet" in capsys.readouterr().err
    assert cli.main(["--onnx-dir", str(tmp_path), "--static", "--min", "1,512,512"] + out) == 2
    assert "--static takes --opt only" in capsys.readouterr().err
    assert cli.main(["--onnx-dir", str(tmp_path), "--tiny", "--sd15", "x"] + out) == 2
    assert not (tmp_path / "engines").exists()


def test_cli_without_tensorrt_says_how_to_install(tmp_path, capsys):
    if availability.tensorrt_installed():  # tensorrt-stubs alone (or nothing) does not count
        pytest.skip("TensorRT is installed here")
    for name in default_build_graphs(cli.DEFAULT_SDXL_MODE):
        (tmp_path / f"{name}.onnx").write_bytes(b"x")
        (tmp_path / f"{name}.names.json").write_text("{}")
    assert cli.main(["--onnx-dir", str(tmp_path), "--output", str(tmp_path / "engines")]) == 2
    assert availability.NOT_INSTALLED in capsys.readouterr().err
    assert not (tmp_path / "engines").exists()


def test_engines_import_no_tensorrt():
    code = ("import sys, xa_runtime.engines.manifest, xa_runtime.engines.refit, xa_runtime.cli.build_engines; "
            "assert 'tensorrt' not in sys.modules, 'tensorrt imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_require_tensorrt_refuses_the_stub_namespace():
    class Namespace:  # what `import tensorrt` gives with only the stubs installed
        __path__ = ["site-packages/tensorrt"]

    with pytest.raises(ImportError, match="pip install tensorrt"):
        availability.require_tensorrt(Namespace())


@pytest.mark.parametrize("extra,needle", [
    (["--backend", "tensorrt"], availability.NOT_INSTALLED),
    (["--engine-dir", "{tmp}"], "--engine-dir only applies to --backend tensorrt"),
])
def test_generate_tensorrt_backend_checked_first(tmp_path, capsys, extra, needle):
    from xa_runtime.cli.generate import main

    if extra[-1] == "tensorrt" and availability.tensorrt_installed():
        pytest.skip("TensorRT is installed here")
    args = ["--steps", "4", "--no-progress", "--prompt", "a cat", "--output", str(tmp_path / "o.png")]
    assert main(args + [a.format(tmp=tmp_path) for a in extra]) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "o.png").exists()


def test_lora_deltas_go_to_their_branch_engines():
    """set_lora_deltas' routing (CPU, fake refitters): SD1.5 deltas to every SD1.5 UNet engine,
    SDXL deltas to the SDXL ones (split or fused), text encoder keys and unknown branches refused."""
    from xa_runtime.export.refit import RefitPlan, refit_branch
    from xa_runtime.errors import ParameterError

    class Fake:
        def __init__(self):
            self.calls = []

        def apply(self, deltas):
            self.calls.append(dict(deltas))
            return RefitPlan(dict.fromkeys(deltas))

    fakes = {g: Fake() for g in ("sd15_unet", "sd15_unet_control", "sdxl_unet_fused", "mapping")}
    deltas = {"unet.a.weight": 1, "unet.b.weight": 2}
    assert refit_branch(fakes, deltas, "sd15") == {"sd15_unet": 2, "sd15_unet_control": 2}
    assert refit_branch(fakes, {"unet.c.weight": 3}, "sdxl") == {"sdxl_unet_fused": 1}
    assert fakes["mapping"].calls == [] and fakes["sdxl_unet_fused"].calls == [{"unet.c.weight": 3}]
    assert refit_branch(fakes, {}, "sd15") == {"sd15_unet": 0, "sd15_unet_control": 0}
    with pytest.raises(ParameterError, match="text encoders run in PyTorch"):
        refit_branch(fakes, {"text_encoder.x.weight": 1}, "sd15")
    with pytest.raises(ParameterError, match="branch"):
        refit_branch(fakes, deltas, "sd2")
    with pytest.raises(ParameterError, match="sdxl UNet engines built refittable"):
        refit_branch({"sd15_unet": Fake()}, deltas, "sdxl")


def test_plan_changes_sees_a_difference_the_sample_misses():
    from xa_runtime.engines.refit import _same

    a = np.arange(100_000, dtype=np.float16).reshape(100, 1000)
    b = a.copy()
    b[0, 1] += 1  # not on the strided sample (step 24)
    assert _same(a, a.copy()) and not _same(a, b) and not _same(a, a.astype(np.float32))
    changed, restore = plan_changes({"w": a, "gone": a}, {"w": b})
    assert list(changed) == ["w"] and restore == ["gone"]
    assert plan_changes({"w": a}, {"w": a.copy()}) == ({}, [])
