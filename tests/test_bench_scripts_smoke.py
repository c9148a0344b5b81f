"""The GPU benchmark scripts end to end on the CPU (--smoke / --tiny): bench_kernels.py at
toy sizes on Triton's interpreter, bench_runtime.py and profile_stage2.py on the tiny models. Every row is produced and
the JSON written; the figures mean nothing. This keeps a GPU session from being spent on
a Python error in a script that only a GPU runs for real."""

import json

import pytest
from bench_scripts import load_script

pytest.importorskip("triton")


def test_smoke_run_writes_every_row_kind(tmp_path, monkeypatch):
    from xa_runtime.kernels.remap_inject import interpreted

    if not interpreted():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py on machines without CUDA)")
    out = tmp_path / "kernels.json"
    assert load_script("bench_kernels").main(["--smoke", "--iters", "10", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    kinds = {r["kernel"] for r in data["rows"]}
    assert kinds == {"remap_inject", "residual_block", "conv_epilogue", "group_norm", "geglu", "guided_step"}
    assert data["device"].startswith("cpu") and all(r["triton_ms"] > 0 for r in data["rows"])


def test_smoke_needs_the_interpreter(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert load_script("bench_kernels").main(["--smoke"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


def test_bench_runtime_smoke_runs_every_cpu_row(tmp_path):
    out = tmp_path / "runtime.json"
    assert load_script("bench_runtime").main(["--smoke", "--steps", "2", "--runs", "1", "--warmup", "0",
                                         "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    # every row but +compile (skipped: inductor) and +graphs (CUDA only)
    assert list(data["results"]) == ["sdxl-alone", "eager", "+mixed-layout", "+streams", "+kernels", "sdxl-alone-lean"]
    assert data["device"].startswith("cpu") and data["ratios"]["eager_xadapter_over_sdxl_alone"] > 0
    assert "('sd15_unet', 'mapping')" in data["results"]["+kernels"]["runtime"]


def test_profile_stage2_tiny_times_every_region_and_layout(tmp_path):
    from xa_runtime.kernels.remap_inject import interpreted

    if not interpreted():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py on machines without CUDA)")
    out = tmp_path / "profile.json"
    assert load_script("profile_stage2").main(["--tiny", "--iters", "1", "--warmup", "0", "--profile-steps", "1",
                                          "--pipeline-steps", "2", "--output", str(out)]) == 0
    regions = {(r["layout"], r["region"]) for r in json.loads(out.read_text())["regions"]}
    assert {layout for layout, _ in regions} == {"nchw", "channels_last", "mixed"}
    for region in ("stage2_step_plain", "stage2_step_fused", "stage2_step_kernels", "sd15_unet+unet_kernels",
                   "mapping_blocks+fused_epilogues"):
        assert all((layout, region) in regions for layout in ("nchw", "channels_last", "mixed")), region
