"""The TensorRT layer type-checks against tensorrt-stubs (TensorRT cannot be installed here).

The stubs install tensorrt/__init__.pyi and tensorrt_bindings/tensorrt.pyi without py.typed,
so they are copied to a MYPYPATH folder; two syntax slips in them are patched so mypy parses
them (a parameter named `in`; `channel_axis` without a default after defaulted ones).
Errors reported inside the stub files are noise and filtered out. Skips cleanly without mypy
or the stubs."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# The README's test command installs the stubs here (pip --target): outside the environment,
# so that pip check does not count their unmet `tensorrt` requirement.
STUBS_TARGET = ROOT / ".tensorrt-stubs"


def _stub_dirs() -> list[Path]:
    found = []
    for name in ("tensorrt", "tensorrt_bindings"):
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec else []
        locations.append(str(STUBS_TARGET / name))
        folder = next((Path(p) for p in locations if (Path(p) / "__init__.pyi").is_file()), None)
        if folder is None:
            return []
        found.append(folder)
    return found


def _patch(text: str) -> str:
    text = re.sub(r"\bin: ", "in_: ", text)  # `in` is a keyword
    return text.replace("channel_axis: int)", "channel_axis: int = ...)")


@pytest.fixture(scope="module")
def mypypath(tmp_path_factory):
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    dirs = _stub_dirs()
    if not dirs:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps --target .tensorrt-stubs tensorrt-stubs)")
    root = tmp_path_factory.mktemp("stubs")
    for d in dirs:
        target = root / d.name
        shutil.copytree(d, target, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        for f in target.rglob("*.pyi"):
            f.write_text(_patch(f.read_text()))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mypy_cache")  # shared: the stubs are parsed once


# big typed libraries the TensorRT modules only pass tensors to: not analysed (Any), which
# keeps the check to seconds; tensorrt itself is fully checked
_SKIPPED = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "safetensors", "triton", "PIL")


def _mypy(paths, mypypath, cache):
    env = {"MYPYPATH": str(mypypath), "PATH": "/usr/bin:/bin"}
    config = Path(cache) / "mypy.ini"
    config.write_text("[mypy]\nignore_missing_imports = True\nfollow_imports = silent\n\n" + "".join(
        f"[mypy-{m}.*]\nfollow_imports = skip\n[mypy-{m}]\nfollow_imports = skip\n" for m in _SKIPPED))
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(config), "--no-error-summary", "--show-error-codes",
           "--cache-dir", str(cache / "c"), *map(str, paths)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    stub_dir = str(mypypath)
    return [line for line in lines if ": error:" in line and not line.startswith(stub_dir) and ".pyi:" not in line], lines


def test_tensorrt_modules_type_check(mypypath, cache):
    modules = sorted((ROOT / "xa_runtime" / "engines").glob("*.py")) + [
        ROOT / "xa_runtime" / "runtime" / "backends" / "tensorrt.py", ROOT / "benchmarks" / "bench_engines.py"]
    assert {m.name for m in modules} >= {"build.py", "tensorrt.py", "refit.py", "manifest.py", "bench_engines.py"}
    errors, lines = _mypy(modules, mypypath, cache)
    assert not errors, "\n".join(errors)
    assert not any("Cannot find implementation or library stub" in line and "tensorrt" in line for line in lines)


def test_mypy_catches_a_misspelt_builder_method(mypypath, cache, tmp_path):
    bad = tmp_path / "bad_trt.py"
    bad.write_text("import tensorrt as trt\n\n"
                   "def f() -> None:\n"
                   "    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
                   "    builder.create_netwrok(0)\n")
    errors, _ = _mypy([bad], mypypath, cache)
    assert any("create_netwrok" in e and "Builder" in e for e in errors), errors
