"""xa-bench on the tiny models: each mode runs and writes JSON that validates against the
schema, a Markdown summary and PNG plots; bad arguments are refused before loading."""

import json

import pytest

from xa_runtime.bench.schema import validation_errors
from xa_runtime.cli.bench import build_parser, main

FAST = ["--steps", "2", "--adapter-guidance-start", "1.0", "--runs", "2", "--warmup", "0"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_latency_run_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "lat.json"
    assert main([*FAST, "--compare", "eager,kernels,mixed-layout", "--baseline", "sdxl-alone,mapping",
                 "--output", str(out), "--plots", str(tmp_path / "plots")]) == 0
    data = json.loads(out.read_text())
    assert validation_errors(data) == []
    assert data["mode"] == "latency" and data["models"] == "tiny"
    assert list(data["variants"]) == ["eager", "kernels", "mixed-layout"]
    for v in data["variants"].values():
        assert {"median", "p90", "min", "max", "mean", "cv", "n"} <= set(v["total"]) and "p99" not in v["total"]  # 2 runs
        assert len(v["raw_seconds"]) == 2 and v["total"]["n"] == 2
        assert {"text_encoders", "stage1", "handover", "stage2", "vae_decode"} == set(v["stages"])
        assert v["memory"]["peak_allocated_bytes"] is None and v["memory"]["reason"]
    assert data["variants"]["eager"]["ratio_to_first"] == 1.0
    base = data["baselines"]["sdxl-alone"]
    assert set(base["stages"]) == {"text_encoders", "denoise", "vae_decode"}
    assert base["xadapter_ratio"] == pytest.approx(data["variants"]["eager"]["total"]["median"] / base["total"]["median"])
    assert data["baselines"]["mapping"]["stage2_steps"] == 2
    flops = data["efficiency"]["flops"]
    assert flops["total"] == flops["stage1"] + flops["stage2"] > 0
    assert all(c["rel_diff"] == 0 for c in data["efficiency"]["counted"]["vs_analytic"].values())
    assert data["memory"]["peak_allocated_bytes"] is None and "cpu" in data["memory"]["reason"]
    assert data["device_info"]["type"] == "cpu" and data["git_commit"]
    md = (tmp_path / "lat.md").read_text()
    assert md.startswith("# xa-bench latency") and "(plots/lat-latency.png)" in md
    _assert_png(tmp_path / "plots" / "lat-latency.png")
    assert "median s" in capsys.readouterr().out


def test_components_mode_splits_stage2_and_plots_a_breakdown(tmp_path):
    out = tmp_path / "comp.json"
    assert main([*FAST, "--mode", "components", "--output", str(out), "--plots", str(tmp_path)]) == 0
    data = json.loads(out.read_text())
    assert validation_errors(data) == []
    parts = data["variants"]["eager"]["parts"]
    for key in ("text_encoders", "stage1", "handover", "stage2/sd15_unet", "stage2/mapping", "stage2/sdxl_unet",
                "stage2/scheduler", "stage2/other", "vae_decode", "stage1/sd15_unet", "handover/sdxl_vae_encode"):
        assert key in parts, key
    stages = data["variants"]["eager"]["raw_stage_seconds"]["stage2"]
    raw = data["variants"]["eager"]["raw_part_seconds"]
    for i, stage2 in enumerate(stages):  # the split adds up to the stage, run by run
        split = sum(raw[f"stage2/{p}"][i] for p in ("sd15_unet", "mapping", "sdxl_unet", "scheduler", "other"))
        assert split == pytest.approx(stage2)
    comp = data["efficiency"]["components"]["eager"]
    assert comp["stage2/sdxl_unet"]["flops"] == 2 * data["efficiency"]["flops"]["sdxl_unet"]
    for png in ("comp-components-latency.png", "comp-components.png"):
        _assert_png(tmp_path / png)


def test_throughput_mode_batches_and_concurrency_in_a_multi_mode_run(tmp_path):
    out = tmp_path / "tp.json"
    assert main([*FAST, "--mode", "throughput,latency", "--batches", "1,2", "--concurrency", "1,2",
                 "--baseline", "sdxl-alone,mapping", "--output", str(out), "--plots", str(tmp_path)]) == 0
    latency = json.loads((tmp_path / "tp-latency.json").read_text())
    assert validation_errors(latency) == [] and set(latency["baselines"]) == {"sdxl-alone"}
    data = json.loads((tmp_path / "tp-throughput.json").read_text())
    assert validation_errors(data) == [] and set(data["baselines"]) == {"mapping"}  # each baseline once
    assert (tmp_path / "tp-throughput.md").exists() and (tmp_path / "tp-latency.md").exists()
    v = data["variants"]["eager"]
    assert set(v["batches"]) == {"1", "2"} and set(v["concurrency"]) == {"1", "2"}
    b2 = v["batches"]["2"]
    assert b2["images_per_s"] == pytest.approx(2 / b2["median_seconds"])
    c2 = v["concurrency"]["2"]
    assert c2["requests"] == 4 and c2["images"] == 4 and len(c2["raw_request_seconds"]) == 2
    assert c2["images_per_s"] == pytest.approx(4 / c2["wall_seconds"])
    assert "thread" in data["concurrency_note"] and data["efficiency"] is None
    _assert_png(tmp_path / "tp-throughput.png")
    _assert_png(tmp_path / "tp-latency.png")


def test_random_weights_is_models_random(monkeypatch, capsys):
    import xa_runtime.cli.bench as bench

    seen = {}

    def fake_build(args, *rest):
        seen["models"] = args.models
        raise SystemExit(0)

    monkeypatch.setattr(bench, "_build", fake_build)
    with pytest.raises(SystemExit):
        main(["--random-weights"])
    assert seen["models"] == "random"


def test_onnxruntime_variant_runs_the_exported_graphs(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "ort.json"
    assert main([*FAST, "--compare", "eager,onnxruntime", "--no-flops", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert validation_errors(data) == [] and list(data["variants"]) == ["eager", "onnxruntime"]
    ort = data["variants"]["onnxruntime"]
    assert ort["ratio_to_first"] == pytest.approx(ort["total"]["median"] / data["variants"]["eager"]["total"]["median"])


def test_plugins_workload_runs_them_and_records_them(tmp_path, monkeypatch):
    """--plugins: every request of every variant gets the plugins (seen by the pipeline), the
    unfused LoRA is on the SD1.5 UNet, and the JSON's workload names them."""
    from xa_runtime.pipeline import XAdapterPipeline

    seen = []
    real = XAdapterPipeline.generate

    def spy(self, params, plugins=(), **kw):
        hooked = any(m._forward_hooks for m in self.sd15.unet.modules())  # the unfused LoRA's side path
        seen.append(sorted(type(p).__name__ for p in plugins) + (["lora"] if hooked else []))
        return real(self, params, plugins=plugins, **kw)

    monkeypatch.setattr(XAdapterPipeline, "generate", spy)
    out = tmp_path / "plugins.json"
    assert main([*FAST, "--plugins", "lora,controlnet,t2i", "--baseline", "sdxl-alone", "--no-flops",
                 "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert validation_errors(data) == [] and data["workload"]["plugins"] == ["lora", "controlnet", "t2i"]
    assert len(seen) == 2 and all(s == ["ControlNetPlugin", "T2IAdapterPlugin", "lora"] for s in seen)  # --runs 2


@pytest.mark.parametrize("argv, flag", [
    (["--compare", "eager,warp"], "--compare"),
    (["--compare", "tensorrt"], "--compare"),
    (["--compare", "eager,onnxruntime", "--mode", "components"], "--mode"),
    (["--compare", "eager,eager"], "--compare"),
    (["--mode", "fast"], "--mode"),
    (["--mode", "latency,latency"], "--mode"),
    (["--steps", "0"], "--steps"),
    (["--steps", "5000"], "--steps"),
    (["--adapter-guidance-start", "0"], "--adapter-guidance-start"),
    (["--batch", "0"], "--batch"),
    (["--height", "100"], "--height"),
    (["--width-sd15", "100000"], "--width-sd15"),
    (["--runs", "0"], "--runs"),
    (["--mode", "throughput", "--batches", "1,0"], "--batches"),
    (["--mode", "throughput", "--batches", "1,x"], "--batches"),
    (["--mode", "throughput", "--concurrency", "99"], "--concurrency"),
    (["--batches", "1,2"], "--batches"),
    (["--baseline", "sd3"], "--baseline"),
    (["--mode", "throughput", "--baseline", "sdxl-alone"], "--baseline"),
    (["--random-weights", "--models", "tiny"], "--random-weights"),
    (["--models", "paths", "--sd15", "x"], "--sdxl"),
    (["--output", "/nonexistent/dir/x.json"], "--output"),
    (["--plots", "/nonexistent/dir/plots"], "--plots"),
    (["--plugins", "lora,ip"], "--plugins"),
    (["--plugins", "lora,lora"], "--plugins"),
    (["--plugins", "controlnet", "--mode", "throughput", "--concurrency", "2"], "--plugins"),
    (["--plugins", "t2i", "--compare", "eager,onnxruntime"], "--plugins"),
])
def test_bad_arguments_exit_2_naming_the_flag(argv, flag, capsys, monkeypatch):
    import xa_runtime.cli.bench as bench

    monkeypatch.setattr(bench, "_build", lambda *a: pytest.fail("models were loaded before validation"))
    assert main(argv) == 2
    assert flag in capsys.readouterr().err


def test_missing_packages_and_gpu_only_requests_are_named(capsys, monkeypatch):
    import importlib.util

    import torch

    import xa_runtime.cli.bench as bench

    monkeypatch.setattr(bench, "_build", lambda *a: pytest.fail("models were loaded before validation"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("matplotlib", "onnxruntime")
                        else real(name, *a))
    assert main(["--plots", "plots-dir"]) == 2
    assert "matplotlib" in capsys.readouterr().err
    assert main(["--compare", "onnxruntime"]) == 2
    assert "package onnxruntime" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_every_flag_is_documented_in_the_docs():
    from pathlib import Path

    section = (Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md").read_text()
    flags = [s for a in build_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    assert [f for f in flags if f"`{f}" not in section] == []
