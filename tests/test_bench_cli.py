"""xa-bench on the tiny models: runs, writes JSON + Markdown with the documented fields,
and refuses bad arguments before loading anything."""

import json

import pytest

from xa_runtime.cli.bench import main


def test_latency_run_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "lat.json"
    assert main(["--steps", "3", "--adapter-guidance-start", "1.0", "--runs", "2", "--warmup", "0",
                 "--compare", "eager,kernels", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"benchmark", "date", "command", "git_commit", "models", "workload", "device", "dtype", "versions",
            "variants", "efficiency"} <= set(data)
    assert data["models"] == "tiny" and list(data["variants"]) == ["eager", "kernels"]
    for v in data["variants"].values():
        assert {"median", "p90", "p99", "min", "max", "mean", "n"} <= set(v["total"])
        assert len(v["raw_seconds"]) == 2 and v["total"]["n"] == 2
        assert {"text_encoders", "stage1", "handover", "stage2", "vae_decode"} == set(v["stages"])
    assert data["variants"]["eager"]["ratio_to_first"] == 1.0
    flops = data["efficiency"]["flops"]
    assert flops["total"] == flops["stage1"] + flops["stage2"] > 0
    assert (tmp_path / "lat.md").read_text().startswith("# xa-bench latency")
    assert "median s" in capsys.readouterr().out


@pytest.mark.parametrize("argv, flag", [
    (["--compare", "eager,warp"], "--compare"),
    (["--compare", "tensorrt"], "--compare"),
    (["--compare", "eager,eager"], "--compare"),
    (["--steps", "0"], "--steps"),
    (["--adapter-guidance-start", "0"], "--adapter-guidance-start"),
    (["--batch", "0"], "--batch"),
    (["--height", "100"], "--height"),
    (["--runs", "0"], "--runs"),
    (["--models", "paths", "--sd15", "x"], "--sdxl"),
    (["--output", "/nonexistent/dir/x.json"], "--output"),
])
def test_bad_arguments_exit_2_naming_the_flag(argv, flag, capsys, monkeypatch):
    import xa_runtime.cli.bench as bench

    monkeypatch.setattr(bench, "_build", lambda *a: pytest.fail("models were loaded before validation"))
    assert main(argv) == 2
    assert flag in capsys.readouterr().err
