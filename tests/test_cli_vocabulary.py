"""One vocabulary across the five CLIs: every parser (each module's build_parser) is walked;
every flag has help, every CLI has --version, the flags two CLIs share are spelled, typed
and offered the same (choices, defaults; the few deliberate default differences are listed
with their reason), and --dtype is fp32/fp16/bf16 wherever it exists, as in xa-serve's config."""

import argparse

import pytest

from xa_runtime.cli import bench, build_engines, export, generate, vocabulary
from xa_runtime.cli import serve as serve_cli
from xa_runtime.serve import config as serve_config

PARSERS = {"xa-generate": generate.build_parser, "xa-export": export.build_parser,
           "xa-build-engines": build_engines.build_parser, "xa-bench": bench.build_parser,
           "xa-serve": serve_cli.build_parser}
# (cli, flag) -> why its default differs from the other CLIs'
DEFAULT_EXCEPTIONS = {
    ("xa-build-engines", "--dtype"): "TensorRT engines are built for the GPU: fp16",
    ("xa-bench", "--steps"): "the recorded benchmark workload is 30 steps",
}
# flags whose kind differs on purpose -> why
KIND_EXCEPTIONS = {
    "--controlnet": "xa-generate runs several ControlNets (repeat the flag); xa-export/xa-build-engines make one graph of one",
    "--t2i-adapter": "xa-generate runs several T2I-Adapters (repeat the flag); xa-export makes one graph of one",
}


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}


@pytest.fixture(scope="module")
def parsers():
    return {name: build() for name, build in PARSERS.items()}


def test_every_flag_has_help(parsers):
    missing = [f"{name} {flag}" for name, p in parsers.items() for flag, a in _flags(p).items()
               if flag != "--help" and (not a.help or a.help == argparse.SUPPRESS or a.help.lstrip("(").startswith("default"))]
    assert not missing


def test_every_cli_has_version(parsers):
    for name, p in parsers.items():
        action = _flags(p).get("--version")
        assert isinstance(action, argparse._VersionAction), name


def test_shared_flags_agree(parsers):
    seen: dict[str, tuple[str, argparse.Action]] = {}
    differ = []
    for name, p in parsers.items():
        for flag, a in _flags(p).items():
            if flag in ("--help", "--version"):
                continue
            if flag not in seen:
                seen[flag] = (name, a)
                continue
            first_name, first = seen[flag]
            if flag in KIND_EXCEPTIONS:
                continue
            if type(a) is not type(first) or a.type is not first.type or a.dest != first.dest:
                differ.append(f"{flag}: kind/type/dest {first_name} vs {name}")
            if (list(a.choices) if a.choices else None) != (list(first.choices) if first.choices else None):
                differ.append(f"{flag}: choices {first.choices} ({first_name}) vs {a.choices} ({name})")
            exempt = (name, flag) in DEFAULT_EXCEPTIONS or (first_name, flag) in DEFAULT_EXCEPTIONS
            if a.default != first.default and not exempt:
                differ.append(f"{flag}: default {first.default!r} ({first_name}) vs {a.default!r} ({name})")
    assert not differ


def test_dtype_choices_everywhere(parsers):
    having = {name: _flags(p)["--dtype"] for name, p in parsers.items() if "--dtype" in _flags(p)}
    assert set(having) == {"xa-generate", "xa-export", "xa-build-engines", "xa-bench"}
    for name, action in having.items():
        assert list(action.choices) == ["fp32", "fp16", "bf16"], name
    assert list(serve_config.DTYPES) == ["fp32", "fp16", "bf16"] and serve_config.DTYPES == vocabulary.DTYPES


def test_no_paths_means_tiny_everywhere(tmp_path):
    # every CLI with model flags has --tiny (accepted) and --tiny-seed, and needs neither
    args = generate.build_parser().parse_args(["--prompt", "x", "--output", str(tmp_path / "a.png")])
    assert generate.uses_tiny_models(args)
    args = export.build_parser().parse_args(["--output", str(tmp_path / "onnx")])
    export.check_inputs(args)
    assert args.tiny and args.tiny_seed == 0
    args = bench.build_parser().parse_args([])
    assert bench._model_kind(args) == "tiny"
    assert bench._model_kind(bench.build_parser().parse_args(["--random-weights"])) == "random"
    assert bench._model_kind(bench.build_parser().parse_args(["--models", "random"])) == "random"  # older spelling
    args = build_engines.build_parser().parse_args(["--onnx-dir", str(tmp_path / "onnx2"), "--output", str(tmp_path / "e")])
    build_engines.check_inputs(args)
    assert args.tiny


def test_precision_is_an_alias_of_dtype():
    p = build_engines.build_parser()
    assert p.parse_args(["--onnx-dir", "a", "--output", "b", "--precision", "bf16"]).dtype == "bf16"
    assert p.parse_args(["--onnx-dir", "a", "--output", "b", "--dtype", "fp32"]).dtype == "fp32"


@pytest.mark.parametrize("prog", list(PARSERS))
def test_version_prints(prog, capsys):
    with pytest.raises(SystemExit) as e:
        PARSERS[prog]().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(prog + " ")
