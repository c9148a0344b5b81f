"""benchmarks/bench_kernels.py end to end at toy sizes on the CPU (--smoke, Triton's
interpreter): every row kind is produced and the JSON is written. The figures mean nothing;
this keeps a GPU session from being spent on a Python error in the script."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_kernels_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_every_row_kind(tmp_path, monkeypatch):
    from xa_runtime.kernels.remap_inject import interpreted

    if not interpreted():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py on machines without CUDA)")
    out = tmp_path / "kernels.json"
    assert _load().main(["--smoke", "--iters", "10", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    kinds = {r["kernel"] for r in data["rows"]}
    assert kinds == {"remap_inject", "residual_block", "conv_epilogue", "group_norm", "geglu", "guided_step"}
    assert data["device"].startswith("cpu") and all(r["triton_ms"] > 0 for r in data["rows"])


def test_smoke_needs_the_interpreter(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _load().main(["--smoke"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
