"""Graph sets come from the one table (xa_runtime.graphs): the folder xa-build-engines writes
by default, in each SDXL mode, is accepted by the checks of xa-generate, xa-bench and
xa-serve; the sets the backends need agree with it; the table imports without torch.

TensorRT cannot run here: the engine files are fakes (the checks read names only) and the
TensorRT probe is faked where a check asks for it."""

import argparse
import subprocess
import sys

import pytest

from xa_runtime import graphs
from xa_runtime.errors import ParameterError
from xa_runtime.cli import build_engines


def _default_build(tmp_path, mode):
    """The engine folder `xa-build-engines --sdxl-mode MODE` writes from an xa-export folder
    holding the graphs the backends run (fake files: NAME.plan + NAME.engine.json)."""
    onnx_dir, out = tmp_path / "onnx", tmp_path / f"engines-{mode}"
    onnx_dir.mkdir()
    for g in graphs.GRAPHS:
        (onnx_dir / f"{g}.onnx").write_bytes(b"x")
        (onnx_dir / f"{g}.names.json").write_text("{}")
    args = build_engines.build_parser().parse_args(["--onnx-dir", str(onnx_dir), "--output", str(out),
                                                    "--sdxl-mode", mode])
    names, _, folder, _ = build_engines.check_inputs(args)
    folder.mkdir()
    for name in names:
        for f in graphs.graph_files(name, "engine"):
            (folder / f).write_text("{}")
    return names, folder


@pytest.fixture
def tensorrt_here(monkeypatch):
    from xa_runtime import availability

    monkeypatch.setattr(availability, "tensorrt_installed", lambda: True)


@pytest.mark.parametrize("mode", ["split", "fused"])
def test_default_build_is_what_the_mode_needs(tmp_path, mode):
    names, _ = _default_build(tmp_path, mode)
    sdxl = ["mapping", "sdxl_unet"] if mode == "split" else ["sdxl_unet_fused"]
    assert names == ["sd15_unet", *sdxl, "sd15_unet_control"]  # the ControlNet variant: exported, and tensorrt runs it
    assert graphs.required_graphs(mode) == ["sd15_unet", *sdxl]


@pytest.mark.parametrize("mode", ["split", "fused"])
def test_generate_accepts_the_default_engine_folder(tmp_path, mode, tensorrt_here):
    from xa_runtime.cli.backend_args import check_backend

    _, folder = _default_build(tmp_path, mode)
    args = argparse.Namespace(backend="tensorrt", engine_dir=str(folder), onnx_dir=None, device="cuda")
    check_backend(args, True, {}, ValueError)  # no error
    # ... while a folder short of the mode's SDXL engine is refused, naming what is missing
    missing = "mapping.plan" if mode == "split" else "sdxl_unet_fused.plan"
    (folder / missing).unlink()
    with pytest.raises(ParameterError, match=missing.replace(".", r"\.")):
        check_backend(args, True, {}, ValueError)


@pytest.mark.parametrize("mode", ["split", "fused"])
def test_bench_accepts_the_default_engine_folder(tmp_path, mode, tensorrt_here, monkeypatch):
    import torch

    from xa_runtime.cli import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _, folder = _default_build(tmp_path, mode)
    argv = ["--compare", "tensorrt", "--device", "cuda", "--engine-dir", str(folder), "--models", "tiny"]
    variants, *_ = bench._check(bench.build_parser().parse_args(argv))
    assert variants == ["tensorrt"]
    (folder / "sd15_unet.engine.json").unlink()
    with pytest.raises(ParameterError, match="--engine-dir"):
        bench._check(bench.build_parser().parse_args(argv))


@pytest.mark.parametrize("mode", ["split", "fused"])
def test_serve_accepts_the_default_engine_folder(tmp_path, mode, tensorrt_here):
    from xa_runtime.serve.config import ConfigError, parse_config

    _, folder = _default_build(tmp_path, mode)
    data = {"models": {"device": "cuda"}, "backend": {"kind": "tensorrt", "engine_dir": str(folder)}}
    cfg = parse_config(data)
    assert (cfg.backend.kind, cfg.backend.engine_dir) == ("tensorrt", str(folder))
    (folder / "sd15_unet.plan").unlink()
    with pytest.raises(ConfigError, match="sd15_unet.plan"):
        parse_config(data)


@pytest.mark.parametrize("mode", ["split", "fused"])
def test_the_backends_select_the_modes_graphs(tmp_path, mode):
    names, folder = _default_build(tmp_path, mode)
    chosen, required, optional = graphs.select_graphs(graphs.has_graph(folder, "engine"), "auto")
    assert chosen == mode and required + optional == names
    assert graphs.missing_files(folder, "engine", mode) == []
    other = "fused" if mode == "split" else "split"
    assert graphs.missing_files(folder, "engine", other)  # the other mode's engines are not there


def test_onnx_folder_needs_its_manifest(tmp_path):
    for g in graphs.required_graphs("fused"):
        (tmp_path / f"{g}.onnx").write_bytes(b"x")
    assert graphs.missing_files(tmp_path, "onnx") == ["manifest.json"]
    (tmp_path / "manifest.json").write_text("{}")
    assert graphs.folder_problem(tmp_path, "onnx") is None
    assert "sd15_unet_ip.onnx" in graphs.folder_problem(tmp_path, "onnx", ["ip"])


def test_sets_derive_from_roles():
    assert graphs.PLUGIN_GRAPHS == {"controlnet": "sd15_unet_control", "t2i": "sd15_unet_t2i",
                                    "nexus": "sd15_unet_t2i", "ip_adapter": "sd15_unet_ip"}
    assert graphs.LORA_GRAPHS == {"sd15": ("sd15_unet", "sd15_unet_control", "sd15_unet_t2i", "sd15_unet_ip"),
                                  "sdxl": ("sdxl_unet", "sdxl_unet_fused")}
    assert graphs.OPTIONAL_GRAPHS == ("sd15_unet_control", "sd15_unet_t2i", "sd15_unet_ip")
    assert graphs.backend_optional_graphs("tensorrt") == ["sd15_unet_control"]
    assert all(g.role in graphs.ROLES for g in graphs.GRAPHS.values())
    assert graphs.encode_fusion(None) == graphs.FUSION_NONE < 0 and graphs.encode_fusion(0.5) == 0.5


def test_graph_table_imports_without_torch():
    code = "import sys, xa_runtime.graphs; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
