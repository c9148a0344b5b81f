"""manifest.json of an export folder: contents, the source check (changed weights refused,
--force), the backend's hash check (a tampered graph refused), CLI errors."""

import copy
import json
import shutil

import onnx
import pytest
import torch
from onnx import numpy_helper

from xa_runtime.cli.export import main
from xa_runtime.errors import CheckpointError, ParameterError
from xa_runtime.export import ModuleBundle, export_graphs
from xa_runtime.export.manifest import MANIFEST, file_sha256, modules_fingerprint, read_manifest
from xa_runtime.runtime.backends.onnxruntime import OnnxRuntimeBackend


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_manifest_contents_source_check_and_force(tmp_path, capsys):
    out = tmp_path / "graphs"
    assert main(["--tiny", "--output", str(out), "--graphs", "mapping", "--no-progress"]) == 0
    m = read_manifest(out)
    assert set(m["versions"]) >= {"torch", "onnx", "diffusers"} and m["versions"]["onnx"] == onnx.__version__
    assert m["source"]["kind"] == "modules" and m["source"]["tiny_seed"] == 0 and len(m["source"]["fingerprint"]) == 64
    g = m["graphs"]["mapping"]
    assert g["dtype"] == "float32" and g["opset"] == 17 and g["profiles"]["H"] == [64, 128, 192]
    assert list(g["inputs"]) == ["f0", "f1", "f2"] and g["outputs"]["r2"][0] == "float"
    assert g["files"] == {f: file_sha256(out / f) for f in ("mapping.onnx", "mapping.names.json")}
    assert not list(out.glob(".*"))  # no temp files left

    # the same source again: another graph is added, the first stays listed
    assert main(["--tiny", "--output", str(out), "--graphs", "sd15_text_encoder", "--no-progress"]) == 0
    assert sorted(read_manifest(out)["graphs"]) == ["mapping", "sd15_text_encoder"]

    # other weights: refused before any file changes, then --force replaces the manifest
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["--tiny", "--tiny-seed", "1", "--output", str(out), "--graphs", "mapping", "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "--output" in line and "--force" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["--tiny", "--tiny-seed", "1", "--output", str(out), "--graphs", "mapping", "--no-progress",
                 "--force"]) == 0
    m2 = read_manifest(out)
    assert m2["source"]["fingerprint"] != m["source"]["fingerprint"] and list(m2["graphs"]) == ["mapping"]


def test_changed_source_files_are_detected(tiny_paths, tmp_path, capsys):
    sd15 = tmp_path / "sd15"
    shutil.copytree(tiny_paths.sd15_dir, sd15)
    out = tmp_path / "graphs"
    argv = ["--sd15", str(sd15), "--output", str(out), "--graphs", "sd15_text_encoder", "--no-progress"]
    assert main(argv) == 0
    source = read_manifest(out)["source"]
    assert source["kind"] == "files" and source["files"]["--sd15"]["path"] == str(sd15.resolve())
    assert main(argv) == 0  # unchanged: fine
    weights = next(p for p in sorted(sd15.rglob("*.safetensors")) if "text_encoder" in str(p))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(argv) == 2
    assert "names source" in _one_error_line(capsys)
    assert main(argv + ["--force"]) == 0
    assert read_manifest(out)["source"]["fingerprint"] != source["fingerprint"]


def test_library_export_refuses_changed_modules(tmp_path):
    bundle = ModuleBundle(mapping=ModuleBundle.tiny(0).mapping)
    export_graphs(["mapping"], bundle, tmp_path, progress=False)
    export_graphs(["mapping"], ModuleBundle(mapping=copy.deepcopy(bundle.mapping)), tmp_path, progress=False)  # same
    changed = ModuleBundle(mapping=copy.deepcopy(bundle.mapping))
    assert modules_fingerprint({"mapping": changed.mapping}) == modules_fingerprint({"mapping": bundle.mapping})
    with torch.no_grad():
        next(changed.mapping.parameters()).view(-1)[-1] += 1e-3  # one element
    assert modules_fingerprint({"mapping": changed.mapping}) != modules_fingerprint({"mapping": bundle.mapping})
    with pytest.raises(ParameterError) as e:
        export_graphs(["mapping"], changed, tmp_path, progress=False)
    assert e.value.name == "output_dir"
    export_graphs(["mapping"], changed, tmp_path, progress=False, force=True)


def test_backend_refuses_a_changed_graph(tiny_onnx, tmp_path):
    _, folder = tiny_onnx
    for g in ("sd15_unet", "mapping", "sdxl_unet"):
        for suffix in (".onnx", ".names.json"):
            shutil.copy(folder / f"{g}{suffix}", tmp_path / f"{g}{suffix}")
    shutil.copy(folder / MANIFEST, tmp_path / MANIFEST)
    OnnxRuntimeBackend(tmp_path)  # verified

    model = onnx.load(str(tmp_path / "mapping.onnx"))
    t = model.graph.initializer[0]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.01, t.name))
    onnx.save_model(model, str(tmp_path / "mapping.onnx"))
    with pytest.raises(CheckpointError, match="mapping.onnx: changed since export"):
        OnnxRuntimeBackend(tmp_path)
    OnnxRuntimeBackend(tmp_path, verify=False)  # the caller's choice
    shutil.copy(folder / "mapping.onnx", tmp_path / "mapping.onnx")

    (tmp_path / "sdxl_unet.names.json").unlink()
    with pytest.raises(CheckpointError, match="sdxl_unet has files"):
        OnnxRuntimeBackend(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(CheckpointError, match="not a readable manifest"):
        OnnxRuntimeBackend(tmp_path)
    del manifest["graphs"]["sd15_unet"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="sd15_unet.onnx: not in manifest.json"):
        OnnxRuntimeBackend(tmp_path)
    (tmp_path / MANIFEST).unlink()  # an interrupted export has none
    with pytest.raises(CheckpointError, match="no manifest.json"):
        OnnxRuntimeBackend(tmp_path)


def test_cli_bad_args(tmp_path, capsys):
    capsys.readouterr()
    for argv in (["--tiny", "--output", str(tmp_path / "a"), "--force", "yes"],
                 ["--tiny", "--output", str(tmp_path / "a"), "--tiny-seed", "x"]):
        assert main(argv) == 2, argv
        _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []
