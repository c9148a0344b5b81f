"""`xa-generate` end to end on the tiny models, in-process: files, metadata, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from xa_runtime.cli.generate import main
from xa_runtime.pipeline import XAdapterPipeline

FAST = ["--steps", "4", "--no-progress"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def png_parameters(path):
    with Image.open(path) as image:
        return image.size, json.loads(image.text["xa_runtime"])  # the full record (parameters: A1111 infotext)


def test_tiny_run_writes_png_of_requested_size_with_metadata(tmp_path, capsys):
    out = tmp_path / "cat.png"
    code, err = run(capsys, "--prompt", "a cat", "--height", 128, "--width", 96, "--output", out, *FAST)
    assert code == 0, err
    assert "tiny random model: the image is noise-like" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.json", "cat.png"]  # no temporary files left

    size, text = png_parameters(out)
    assert size == (96, 128)  # PIL: (width, height)
    assert text["prompt"] == "a cat" and text["seed"] == 0 and text["image_index"] == 0
    assert (text["height"], text["width"], text["height_sd15"], text["width_sd15"]) == (128, 96, 64, 64)

    sidecar = json.loads((tmp_path / "cat.json").read_text())
    p = sidecar["parameters"]
    assert p["seed"] == 0 and p["num_inference_steps"] == 4 and p["adapter_guidance_start"] == 0.9
    assert (p["height"], p["width"], p["height_sd15"], p["width_sd15"]) == (128, 96, 64, 64)
    assert sidecar["images"] == ["cat.png"]
    assert sidecar["models"] == {"kind": "tiny", "tiny_seed": 0}
    assert sidecar["device"] == "cpu" and sidecar["dtype"] == "fp32"
    assert set(sidecar["timings"]) == {"text_encoders", "stage1", "handover", "stage2", "vae_decode"}
    assert all(v >= 0 for v in sidecar["timings"].values())
    assert sidecar["total_seconds"] >= sum(sidecar["timings"].values())
    assert {"xa_runtime", "torch", "diffusers", "transformers"} <= set(sidecar["versions"])
    assert sidecar["command"][0] == "xa-generate" and "--prompt" in sidecar["command"]


def test_batch_writes_numbered_files_and_one_sidecar(tmp_path, capsys):
    out = tmp_path / "out.png"
    code, err = run(capsys, "--prompt", "a cat", "--batch", 2, "--seed", 7, "--output", out, *FAST)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-1.png", "out.json", "out.png"]
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["images"] == ["out.png", "out-1.png"]
    assert sidecar["parameters"]["num_images_per_prompt"] == 2 and sidecar["parameters"]["seed"] == 7
    for index, name in enumerate(sidecar["images"]):
        size, text = png_parameters(tmp_path / name)
        assert size == (128, 128)  # the tiny models' default size
        assert text["image_index"] == index and text["seed"] == 7


def test_same_seed_same_image_and_random_seed_is_recorded(tmp_path, capsys):
    for name in ("a.png", "b.png"):
        assert run(capsys, "--prompt", "a cat", "--seed", 3, "--output", tmp_path / name, *FAST)[0] == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert run(capsys, "--prompt", "a cat", "--seed", "random", "--output", tmp_path / "r.png", *FAST)[0] == 0
    seed = json.loads((tmp_path / "r.json").read_text())["parameters"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**63


def test_runtime_streams_on_cpu_gives_the_same_image_and_is_recorded(tmp_path, capsys):
    # On CPU the two-stream scheduler runs the plain sequential order: the same PNG bytes.
    for name, extra in (("plain.png", []), ("streams.png", ["--runtime", "streams"])):
        assert run(capsys, "--prompt", "a cat", "--seed", 3, "--output", tmp_path / name, *FAST, *extra)[0] == 0
    pixels = [np.asarray(Image.open(tmp_path / name)) for name in ("plain.png", "streams.png")]
    assert np.array_equal(*pixels)  # the files differ only in their recorded parameters
    assert json.loads((tmp_path / "streams.json").read_text())["runtime"] == "streams"


@pytest.mark.parametrize("names, parts", [
    ("mixed-layout", ("sd15_unet", "mapping")),
    ("mixed-layout,channels-last", ("sd15_unet", "mapping", "sdxl_unet")),
    ("channels-last", ("sd15_unet", "mapping", "sdxl_unet")),
    ("kernels", ()),
])
def test_runtime_names_give_the_channels_last_parts(names, parts):
    import argparse

    from xa_runtime.cli.generate import runtime_config

    config = runtime_config(argparse.Namespace(runtime=names, offload="none", device="cpu"))
    assert config.channels_last == parts


def test_model_paths_run_with_the_models_default_sizes(tiny_paths, tmp_path, capsys):
    out = tmp_path / "o.png"
    code, err = run(
        capsys, "--sd15", tiny_paths.sd15_file, "--sdxl", tiny_paths.sdxl_dir, "--adapter", tiny_paths.adapter_bin,
        "--sdxl-vae", tiny_paths.sdxl_vae_file, "--prompt", "a cat", "--output", out, *FAST,
    )
    assert code == 0, err
    assert "tiny random model" not in err
    assert png_parameters(out)[0] == (128, 128)  # from the loaded UNet/VAE configs, not 1024
    models = json.loads((tmp_path / "o.json").read_text())["models"]
    assert models["kind"] == "pretrained" and models["adapter"] == str(tiny_paths.adapter_bin)


def test_long_prompt_warns_on_one_line_and_still_runs(tmp_path, capsys):
    code, err = run(capsys, "--prompt", "a cat " * 60, "--steps", 2, "--adapter-guidance-start", 1.0,
                    "--no-progress", "--output", tmp_path / "o.png")
    assert code == 0, err
    assert any(line.startswith("warning: prompt") and "cut" in line for line in err.splitlines()), err


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "--adapter-guidance-start" in capsys.readouterr().out


# (arguments, flag the error must name); "{x}" placeholders are filled from tiny_paths / tmp_path.
BAD = {
    "steps 0": (["--steps", "0"], "--steps"),
    "steps 1001": (["--steps", "1001"], "--steps"),
    "steps not a number": (["--steps", "four"], "--steps"),
    "guidance nan": (["--guidance-scale", "nan"], "--guidance-scale"),
    "guidance 101": (["--guidance-scale", "101"], "--guidance-scale"),
    "ags 0": (["--adapter-guidance-start", "0"], "--adapter-guidance-start"),
    "ags 1.5": (["--adapter-guidance-start", "1.5"], "--adapter-guidance-start"),
    "ags no stage-2 step": (["--steps", "2", "--adapter-guidance-start", "0.4"], "--adapter-guidance-start"),
    "acs -1": (["--adapter-condition-scale", "-1"], "--adapter-condition-scale"),
    "acs inf": (["--adapter-condition-scale", "inf"], "--adapter-condition-scale"),
    "fusion 2": (["--fusion-guidance-scale", "2"], "--fusion-guidance-scale"),
    "height 100": (["--height", "100"], "--height"),
    "width-sd15 100": (["--width-sd15", "100"], "--width-sd15"),
    "batch 0": (["--batch", "0"], "--batch"),
    "batch 65": (["--batch", "65"], "--batch"),
    "unknown scheduler": (["--scheduler", "plms"], "--scheduler"),
    "seed -1": (["--seed", "-1"], "--seed"),
    "seed 2^63": (["--seed", str(2**63)], "--seed"),
    "negative prompts mismatched": (["--negative-prompt", "a", "--negative-prompt", "b"], "--negative-prompt"),
    "tiny seed -1": (["--tiny-seed", "-1"], "--tiny-seed"),
    "missing output folder": (["--output", "{tmp}/missing/o.png"], "--output"),
    "output not .png": (["--output", "{tmp}/o.jpg"], "--output"),
    "output is a folder": (["--output", "{tmp}"], "--output"),
    "only --sd15": (["--sd15", "{sd15_dir}"], "--sdxl and --adapter"),
    "--sdxl-vae without models": (["--sdxl-vae", "{sdxl_vae_dir}"], "--sdxl-vae"),
    "nonexistent --sd15": (["--sd15", "{tmp}/nope", "--sdxl", "{sdxl_dir}", "--adapter", "{adapter_bin}"], "--sd15"),
    "SDXL given as --sd15": (["--sd15", "{sdxl_dir}", "--sdxl", "{sdxl_dir}", "--adapter", "{adapter_bin}"], "--sd15"),
    "SD1.5 given as --sdxl": (["--sd15", "{sd15_file}", "--sdxl", "{sd15_file}", "--adapter", "{adapter_bin}"], "--sdxl"),
    "adapter not a checkpoint file": (["--sd15", "{sd15_dir}", "--sdxl", "{sdxl_dir}", "--adapter", "{sdxl_dir}"], "--adapter"),
    "nonexistent --sdxl-vae": (
        ["--sd15", "{sd15_dir}", "--sdxl", "{sdxl_dir}", "--adapter", "{adapter_bin}", "--sdxl-vae", "{tmp}/vae"],
        "--sdxl-vae",
    ),
    "--device cuda without CUDA": (["--device", "cuda"], "--device"),
    "unknown --runtime name": (["--runtime", "kernels,turbo"], "--runtime"),
    "--runtime cuda-graphs on CPU": (["--runtime", "cuda-graphs"], "--runtime"),
    "--runtime lean on CPU": (["--runtime", "lean"], "--runtime"),
    "unknown --offload": (["--offload", "gpu"], "--offload"),
    "--runtime with onnxruntime": (["--runtime", "streams", "--backend", "onnxruntime"], "--runtime"),
}


@pytest.fixture
def no_model_loading(monkeypatch):
    """Bad input must be refused before any model is built or loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for a bad input")

    monkeypatch.setattr(XAdapterPipeline, "from_tiny", refuse)
    monkeypatch.setattr(XAdapterPipeline, "from_pretrained", refuse)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_naming_the_flag_and_writes_nothing(case, request, tmp_path, capsys, no_model_loading):
    args, flag = BAD[case]
    if case.startswith("--device cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    values = {"tmp": out_dir}
    if any("{" in a and "{tmp}" not in a for a in args):
        paths = request.getfixturevalue("tiny_paths")
        values.update({k: getattr(paths, k) for k in ("sd15_dir", "sdxl_dir", "sd15_file", "sdxl_vae_dir", "adapter_bin")})
    args = [a.format(**values) for a in args]
    if "--output" not in args:
        args += ["--output", str(out_dir / "o.png")]
    code, err = run(capsys, "--prompt", "a cat", *FAST, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert flag in lines[0]
    assert list(out_dir.iterdir()) == []


def test_checkpoint_with_wrong_keys_exits_2_and_writes_nothing(tiny_paths, tmp_path, capsys):
    # A .safetensors file passes the cheap path check; its keys are checked on load.
    code, err = run(
        capsys, "--sd15", tiny_paths.sd15_dir, "--sdxl", tiny_paths.sdxl_dir, "--adapter", tiny_paths.sdxl_file,
        "--prompt", "a cat", "--output", tmp_path / "o.png", *FAST,
    )
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ") and "--adapter" in err and "missing keys" in err
    assert list(tmp_path.iterdir()) == []



def _files_for_bad_plugin_inputs(root):
    """Plugin paths that pass or fail only the cheap checks (config.json, suffix, image header)."""
    good = root / "good.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    (root / "text.png").write_text("not an image\n")
    (root / "truncated.png").write_bytes(good.read_bytes()[:60])
    for name, class_name in (("cn", "ControlNetModel"), ("t2i", "T2IAdapter")):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({"_class_name": class_name}))
    (root / "empty").mkdir()
    (root / "ip.bin").write_bytes(b"")
    (root / "ip.txt").write_bytes(b"")


# Images and plugin model paths are checked from headers and configs before loading.
BAD_FILES = {
    "init image not an image": (["--init-image", "{f}/text.png", "--strength", "0.5"], "--init-image"),
    "init image truncated": (["--init-image", "{f}/truncated.png", "--strength", "0.5"], "--init-image"),
    "init image is a folder": (["--init-image", "{f}", "--strength", "0.5"], "--init-image"),
    "control image not an image": (["--controlnet", "{f}/cn", "--control-image", "{f}/text.png"], "--control-image"),
    "controlnet folder without config": (["--controlnet", "{f}/empty", "--control-image", "{f}/good.png"],
                                         "--controlnet"),
    "T2I-Adapter given as --controlnet": (["--controlnet", "{f}/t2i", "--control-image", "{f}/good.png"],
                                          "--controlnet"),
    "controlnet file of unknown kind": (["--controlnet", "{f}/ip.txt", "--control-image", "{f}/good.png"],
                                        "--controlnet"),
    "ControlNet given as --t2i-adapter": (["--t2i-adapter", "{f}/cn", "--t2i-image", "{f}/good.png"], "--t2i-adapter"),
    "t2i image is a folder": (["--t2i-adapter", "{f}/t2i", "--t2i-image", "{f}"], "--t2i-image"),
    "nexus folder without config": (["--nexus-adapter", "{f}/empty", "--adapter-image", "{f}/good.png"],
                                    "--nexus-adapter"),
    "ip-adapter of unknown suffix": (["--ip-adapter", "{f}/ip.txt", "--ip-image", "{f}/good.png"], "--ip-adapter"),
    "ip image not an image": (["--ip-adapter", "{f}/ip.bin", "--ip-image", "{f}/text.png"], "--ip-image"),
    "image encoder without config": (["--ip-adapter", "{f}/ip.bin", "--ip-image", "{f}/good.png",
                                      "--image-encoder", "{f}/empty"], "--image-encoder"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_image_or_plugin_file_exits_2_before_loading(case, tmp_path, capsys, no_model_loading):
    files, out_dir = tmp_path / "files", tmp_path / "out"
    files.mkdir()
    out_dir.mkdir()
    _files_for_bad_plugin_inputs(files)
    args, flag = BAD_FILES[case]
    code, err = run(capsys, "--prompt", "a cat", *FAST, "--output", out_dir / "o.png", *(a.format(f=files) for a in args))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], err
    assert list(out_dir.iterdir()) == []
