"""The plugin-kind table (xa_runtime.plugin_kinds): every kind resolves by name and alias, an
unknown kind is refused naming the accepted ones (in the Python API and at xa-serve's config
parse), the table imports without torch, one backend check serves xa-generate, xa-serve and
xa-bench, a LoRA given as xa-generate gives it goes through the pipeline's own loaders, and no
module outside the table, plugins/ and testing/ spells a plugin kind beyond those listed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from xa_runtime import graphs, plugin_kinds
from xa_runtime.errors import ParameterError
from xa_runtime.plugin_kinds import KINDS, PLUGIN_KINDS, PluginSpec, check_backend, get_kind

ROOT = Path(__file__).resolve().parents[1]


def test_every_kind_resolves_by_name_and_alias():
    assert set(KINDS) == {"lora", "sdxl_lora", "controlnet", "t2i", "nexus", "ip_adapter"}
    for row in PLUGIN_KINDS:
        for spelling in (row.name, *row.aliases):
            assert get_kind(spelling) is row
            assert PluginSpec(None, spelling, "p").kind == row.name
        if row.loader is not None:
            assert callable(row.load())  # the dotted path names a function of its module
        assert row.branch is None or row.variant is None  # LoRAs change weights (refitted), no graph variant
        assert row.flags and row.flags[0].startswith("--") and "torch" in row.backends
        assert set(row.served_backends) <= set(row.backends) <= set(plugin_kinds.BACKENDS)
    # today's spellings stay accepted
    assert get_kind("ip").name == get_kind("ip_adapter").name == "ip_adapter"
    assert get_kind("t2i_adapter").name == "t2i"


def test_graph_sets_derive_from_the_table():
    assert graphs.BACKENDS == plugin_kinds.BACKENDS
    assert graphs.BACKEND_PLUGINS == {"onnxruntime": ("controlnet", "t2i", "nexus", "ip_adapter"),
                                      "tensorrt": ("controlnet",)}
    assert graphs.plugin_graphs(["ip", "lora"]) == graphs.plugin_graphs(["ip_adapter"]) == ["sd15_unet_ip"]


@pytest.mark.parametrize("kind", ["vae", "IP", "", None])
def test_unknown_kind_names_the_accepted_ones(kind):
    with pytest.raises(ParameterError) as e:
        PluginSpec("x", kind, "p")
    assert e.value.name == "kind" and e.value.value == kind
    assert all(k in e.value.accepted for k in KINDS) and "ip_adapter (ip)" in e.value.accepted


def test_serve_refuses_an_unknown_kind_at_config_parse():
    from xa_runtime.serve.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as e:
        parse_config({"plugins": {"foo": {"kind": "lycoris", "path": "p"}}})
    message = str(e.value)
    assert message.startswith("plugins.foo.kind: 'lycoris'") and "\n" not in message
    assert all(k in message for k in KINDS)
    cfg = parse_config({"plugins": {"face": {"kind": "ip", "path": "p"}}})  # an alias: canonical kind
    assert cfg.plugins["face"].kind == "ip_adapter"


def test_table_imports_without_torch():
    code = "import sys, xa_runtime.plugin_kinds; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_backend_check_for_cli_serve_and_bench():
    from xa_runtime.cli import backend_args, bench
    from xa_runtime.serve import config

    assert backend_args.check_backend_plugins is config.check_backend is bench.check_backend is check_backend
    t2i, cn, ip, lora = (PluginSpec(k, k, "p") for k in ("t2i", "controlnet", "ip_adapter", "lora"))

    def label(s):
        return s.name

    assert check_backend([t2i, cn, ip, lora], "torch", label) is None
    assert check_backend([lora, cn], "tensorrt", label) is None
    assert check_backend([t2i], "tensorrt", label) == "t2i needs backend torch (tensorrt takes lora, sdxl_lora, controlnet)"
    assert "together" in check_backend([t2i, cn], "onnxruntime", label)
    assert check_backend([t2i, cn], "onnxruntime", label, served=True) is None  # switched per request
    assert check_backend([lora], "onnxruntime", label, served=True).startswith("lora needs backend torch")
    assert "no plugin inputs" in check_backend([lora], "onnxruntime", label, plugin_graphs=False)
    assert "one of torch" in check_backend([], "openvino", label)


def test_backend_check_gives_the_same_answer_through_each_door(tmp_path):
    """The serve config and xa-bench report the table function's own message."""
    from xa_runtime.cli import bench
    from xa_runtime.serve.config import ConfigError, parse_config

    expected = check_backend([PluginSpec("x", "lora", "p")], "onnxruntime", lambda s: f"plugins.{s.name}.kind={s.kind!r}",
                             served=True)
    with pytest.raises(ConfigError) as e:
        parse_config({"backend": {"kind": "onnxruntime"}, "plugins": {"x": {"kind": "lora", "path": "p"}}})
    assert str(e.value) == expected
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed")
    args = bench.build_parser().parse_args(["--compare", "eager,onnxruntime", "--plugins", "lora"])
    with pytest.raises(ParameterError) as e:
        bench._check(args)
    assert check_backend([PluginSpec("lora", "lora", "-")], "onnxruntime", lambda s: f"--plugins {s.name}",
                         plugin_graphs=False) in e.value.accepted


def test_cli_lora_goes_through_the_pipelines_loaders(tmp_path):
    """`xa-generate --lora` specs load with pipe.load_plugins: the pipeline's own LoRA state
    (get_active_adapters, get_list_adapters) sees them, fused by default as --lora-mode says."""
    from xa_runtime.cli.generate import build_parser
    from xa_runtime.cli.plugin_args import check_plugin_arguments, check_plugin_files
    from xa_runtime.pipeline import XAdapterPipeline
    from xa_runtime.testing import write_random_lora

    pipe = XAdapterPipeline.from_tiny(progress=False)
    path = write_random_lora(tmp_path / "a.safetensors", pipe.sd15.unet, pipe.sd15.text_encoder)
    args = build_parser().parse_args(["--prompt", "a", "--output", str(tmp_path / "a.png"), "--lora", f"{path}:0.5"])
    specs = check_plugin_arguments(args)
    assert [(s.kind, s.scale, s.fused) for s in specs] == [("lora", 0.5, True)]
    assert pipe.load_plugins(specs, loras=check_plugin_files(specs)) == []
    assert pipe.get_active_adapters() == [specs[0].name] and pipe.get_list_adapters() == {"sd15": [specs[0].name]}
    assert pipe._lora["sd15"].mode == "fused"
    pipe.unload_lora_weights()
    assert pipe.get_active_adapters() == []


def test_no_module_outside_the_table_spells_new_kinds():
    """The modules that still spell a kind's string (graph variants, bundle parts and flag
    names share the spellings); a new one fails here: read the kind from plugin_kinds."""
    spec = importlib.util.spec_from_file_location("plugin_kind_literals", ROOT / "benchmarks" / "plugin_kind_literals.py")
    counter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(counter)
    found = counter.modules_naming_kinds(ROOT / "xa_runtime")
    assert set(found) <= ALLOWED_SPELLERS, sorted(set(found) - ALLOWED_SPELLERS)


# graph variants ("t2i", "ip") and export bundle parts ("controlnet", "t2i_adapter", "ip_adapter")
# share the kinds' spellings; the CLIs' flag vocabularies name plugin parameters
ALLOWED_SPELLERS = {
    "graphs.py", "export/manifest.py", "export/wrappers.py", "runtime/backends/adapters.py", "cli/export.py",
    "cli/generate.py", "cli/plugin_args.py", "cli/bench.py", "cli/backend_args.py", "pipeline/loaders.py",
}
