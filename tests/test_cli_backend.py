"""xa-generate --backend onnxruntime: the tiny models' image equals the torch backend's (the
graphs exported on the fly, or an xa-export folder via --onnx-dir); bad combinations exit 2."""

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from xa_runtime.cli.generate import main

FAST = ["--steps", "4", "--no-progress", "--prompt", "a cat", "--height", "64", "--width", "96"]


def _run(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_onnxruntime_image_equals_torch(tiny_onnx, tmp_path, capsys):
    _, folder = tiny_onnx
    code, err = _run(capsys, *FAST, "--output", tmp_path / "torch.png")
    assert code == 0, err
    code, err = _run(capsys, *FAST, "--backend", "onnxruntime", "--output", tmp_path / "ort.png")
    assert code == 0, err
    code, err = _run(capsys, *FAST, "--backend", "onnxruntime", "--onnx-dir", folder, "--output", tmp_path / "dir.png")
    assert code == 0, err
    ref = _pixels(tmp_path / "torch.png")
    assert ref.std() > 1  # not a flat image
    for name in ("ort", "dir"):
        # fp32 latents agree to ~1e-6 relative (tests/test_onnxruntime_backend.py); 8-bit pixels to at most 1 step
        assert np.abs(_pixels(tmp_path / f"{name}.png") - ref).max() <= 1, name
        assert json.loads((tmp_path / f"{name}.json").read_text())["backend"] == "onnxruntime"
    assert json.loads((tmp_path / "torch.json").read_text())["backend"] == "torch"


def test_loras_on_onnxruntime_equal_torch(tiny_onnx, tmp_path, capsys):
    """--lora / --sdxl-lora on the onnxruntime backend: text encoders fused in torch, the UNet deltas
    written into the graphs (what TensorRT refit feeds), on the fly and from an xa-export folder
    (its SDXL side the fused graph); the image equals torch's with the LoRAs fused."""
    from xa_runtime.testing import write_random_lora

    bundle, folder = tiny_onnx
    sd15 = write_random_lora(tmp_path / "sd15.safetensors", bundle.sd15.unet, bundle.sd15.text_encoder, std=0.3)
    sdxl = write_random_lora(tmp_path / "sdxl.safetensors", bundle.sdxl.unet, bundle.sdxl.text_encoder,
                             text_encoder_2=bundle.sdxl.text_encoder_2, std=0.3, seed=1)
    loras = ["--lora", f"{sd15}:0.8", "--sdxl-lora", sdxl]
    runs = {"plain": [], "torch": loras, "ort": [*loras, "--backend", "onnxruntime"],
            "dir": [*loras, "--backend", "onnxruntime", "--onnx-dir", folder]}
    for name, extra in runs.items():
        code, err = _run(capsys, *FAST, *extra, "--output", tmp_path / f"{name}.png")
        assert code == 0, err
    ref = _pixels(tmp_path / "torch.png")
    assert np.abs(ref - _pixels(tmp_path / "plain.png")).max() > 10  # the LoRAs change the image
    for name in ("ort", "dir"):
        assert np.abs(_pixels(tmp_path / f"{name}.png") - ref).max() <= 1, name


def test_ip_and_t2i_adapters_on_onnxruntime_equal_torch(tiny_onnx, tmp_path, capsys):
    """--ip-adapter (sd15_unet_ip: exported on the fly from the file, or the xa-export folder of the
    same file) and --t2i-adapter (sd15_unet_t2i, from the folder) on onnxruntime: the image equals
    torch's within one 8-bit step; a folder without the IP graph is refused."""
    from xa_runtime.plugins.ip_adapter_loading import save_ip_adapter
    from xa_runtime.testing import write_tiny_image_encoder, write_tiny_t2i_adapter

    bundle, folder = tiny_onnx
    ip = save_ip_adapter(bundle.ip_adapter, tmp_path / "models" / "ip-adapter_sd15.safetensors")  # the graph's file
    write_tiny_image_encoder(tmp_path / "models" / "image_encoder")  # found beside the file
    img = tmp_path / "img.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype(np.uint8)).save(img)
    t2i = write_tiny_t2i_adapter(tmp_path / "t2i", bundle.sd15.unet, seed=2)
    plugins = {"ip": ["--ip-adapter", ip, "--ip-image", img, "--ip-scale", "0.8"],
               "t2i": ["--t2i-adapter", t2i, "--t2i-image", img, "--t2i-scale", "2"]}
    runs = {"plain": [], "ip_torch": plugins["ip"], "ip_ort": [*plugins["ip"], "--backend", "onnxruntime"],
            "ip_dir": [*plugins["ip"], "--backend", "onnxruntime", "--onnx-dir", folder], "t2i_torch": plugins["t2i"],
            "t2i_dir": [*plugins["t2i"], "--backend", "onnxruntime", "--onnx-dir", folder]}
    for name, extra in runs.items():
        code, err = _run(capsys, *FAST, *extra, "--output", tmp_path / f"{name}.png")
        assert code == 0, (name, err)
    plain = _pixels(tmp_path / "plain.png")
    for kind, others in (("ip", ("ip_ort", "ip_dir")), ("t2i", ("t2i_dir",))):
        ref = _pixels(tmp_path / f"{kind}_torch.png")
        assert np.abs(ref - plain).max() > 10, kind  # the plugin changes the image
        for name in others:
            assert np.abs(_pixels(tmp_path / f"{name}.png") - ref).max() <= 1, name
    partial = tmp_path / "no_ip"
    partial.mkdir()
    for f in folder.iterdir():
        if not f.name.startswith("sd15_unet_ip"):
            (partial / f.name).symlink_to(f)
    code, err = _run(capsys, *FAST, *plugins["ip"], "--backend", "onnxruntime", "--onnx-dir", partial,
                     "--output", tmp_path / "o.png")
    assert code == 2 and "sd15_unet_ip.onnx" in err and "xa-export --ip-adapter" in err, err


@pytest.mark.parametrize("args,needle", [
    (["--onnx-dir", "{tmp}"], "--onnx-dir only applies"),
    (["--backend", "tensorrt"], "--backend"),
    (["--backend", "onnxruntime", "--onnx-dir", "{tmp}/nope"], "--onnx-dir"),
    (["--backend", "onnxruntime", "--onnx-dir", "{tmp}"], "manifest.json"),
    (["--backend", "onnxruntime", "--ip-adapter", "{lora}", "--ip-image", "{img}", "--controlnet", "{lora}",
      "--control-image", "{img}"], "no onnxruntime graph takes both"),
])
def test_bad_backend_arguments(args, needle, tmp_path, capsys):
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"x")
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    args = [a.format(tmp=tmp_path, lora=lora, img=tmp_path / "img.png") for a in args]
    code, err = _run(capsys, *FAST, *args, "--output", tmp_path / "o.png")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "o.png").exists()


def test_missing_onnxruntime_is_named(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    code, err = _run(capsys, *FAST, "--backend", "onnxruntime", "--output", tmp_path / "o.png")
    assert code == 2 and "--backend" in err and "pip install onnxruntime" in err


def test_model_paths_need_onnx_dir(tiny_paths, tmp_path, capsys):
    p = tiny_paths
    code, err = _run(capsys, *FAST, "--backend", "onnxruntime", "--sd15", p.sd15_dir, "--sdxl", p.sdxl_dir,
                     "--adapter", p.adapter_bin, "--output", tmp_path / "o.png")
    assert code == 2 and "needs --onnx-dir" in err


def test_onnx_dir_of_other_weights_is_refused(tiny_onnx, tmp_path, capsys):
    _, folder = tiny_onnx  # seed 0
    code, err = _run(capsys, *FAST, "--backend", "onnxruntime", "--onnx-dir", folder, "--tiny-seed", "1",
                     "--output", tmp_path / "o.png")
    errors = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "--onnx-dir" in errors[0] and "other weights" in errors[0], err
    assert not (tmp_path / "o.png").exists()
