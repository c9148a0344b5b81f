"""xa-generate with SD1.5 plugins and an init image, end to end on tiny plugin files, and
the plugin flags' bad inputs (refused before any model is loaded)."""

import json

import numpy as np
import pytest
from PIL import Image

from xa_runtime.cli.generate import main
from xa_runtime.pipeline import XAdapterPipeline
from xa_runtime.testing import (
    write_random_lora,
    write_tiny_controlnet,
    write_tiny_image_encoder,
    write_tiny_ip_adapter,
    write_tiny_nexus,
    write_tiny_t2i_adapter,
)

FAST = ["--steps", "3", "--adapter-guidance-start", "1.0", "--no-progress", "--seed", "1"]


@pytest.fixture(scope="module")
def plugin_files(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("plugins")
    unet = tiny_models[0].unet
    image = root / "photo.png"
    yy, xx = np.mgrid[0:96, 0:80]
    Image.fromarray(((xx // 16 + yy // 16) % 2 * 255).astype(np.uint8)).save(image)  # checkerboard: edges
    folder, single = write_tiny_controlnet(root / "cn", unet)
    t2i = write_tiny_t2i_adapter(root / "t2i", unet, "full_adapter")
    nexus = write_tiny_nexus(root / "nexus", unet)
    ip = write_tiny_ip_adapter(root / "ip", unet)
    write_tiny_image_encoder(root / "ip" / "image_encoder")
    sd15, sdxl = tiny_models[0], tiny_models[1]
    lora = write_random_lora(root / "lora.safetensors", unet, sd15.text_encoder, std=0.2)
    sdxl_lora = write_random_lora(root / "xl_lora.safetensors", sdxl.unet, sdxl.text_encoder,
                                  text_encoder_2=sdxl.text_encoder_2, std=0.2)
    return {"image": image, "cn": folder, "cn_file": single, "t2i": t2i, "nexus": nexus, "ip": ip["safetensors"],
            "lora": lora, "sdxl_lora": sdxl_lora}


def _latents_of(tmp_path, capsys, name, *args):
    out = tmp_path / f"{name}.png"
    code = main(["--prompt", "a cat", *FAST, "--output", str(out), *map(str, args)])
    err = capsys.readouterr().err
    assert code == 0, err
    return np.asarray(Image.open(out)), json.loads(out.with_suffix(".json").read_text())


def test_each_plugin_runs_and_changes_the_image(plugin_files, tmp_path, capsys):
    f = plugin_files
    base, _ = _latents_of(tmp_path, capsys, "base")
    runs = {
        "controlnet": ["--controlnet", f["cn"], "--control-image", f["image"], "--control-type", "canny"],
        "controlnet-file": ["--controlnet", f["cn_file"], "--control-image", f["image"], "--controlnet-scale", "2"],
        "t2i": ["--t2i-adapter", f["t2i"], "--t2i-image", f["image"], "--t2i-scale", "3"],
        "nexus": ["--nexus-adapter", f["nexus"], "--adapter-image", f["image"], "--nexus-scale", "3"],
        "ip": ["--ip-adapter", f["ip"], "--ip-image", f["image"], "--ip-scale", "3"],
        "init": ["--init-image", f["image"], "--strength", "0.6"],
        "lora": ["--lora", f"{f['lora']}:0.8"],
        "sdxl-lora": ["--sdxl-lora", f["sdxl_lora"], "--lora-mode", "unfused"],
        "lora+controlnet": ["--lora", f["lora"], "--sdxl-lora", f["sdxl_lora"], "--controlnet", f["cn"],
                            "--control-image", f["image"]],
    }
    for name, args in runs.items():
        image, sidecar = _latents_of(tmp_path, capsys, name, *args)
        assert image.shape == base.shape
        assert np.abs(image.astype(int) - base.astype(int)).max() > 0, name
        if name.startswith(("lora", "sdxl-lora")):
            assert sidecar["plugins"]["lora" if name != "sdxl-lora" else "sdxl_lora"][0]["scale"] in (0.8, 1.0)
        elif name == "init":
            assert sidecar["parameters"]["strength"] == 0.6 and sidecar["init_image"] == str(f["image"])
        else:
            assert any(sidecar["plugins"].values()), name


def test_zero_scale_controlnet_equals_no_plugin(plugin_files, tmp_path, capsys):
    base, _ = _latents_of(tmp_path, capsys, "base")
    zero, _ = _latents_of(tmp_path, capsys, "zero", "--controlnet", plugin_files["cn"], "--control-image",
                          plugin_files["image"], "--controlnet-scale", "0")
    assert np.array_equal(base, zero)


BAD = {
    "control image missing": (["--controlnet", "{cn}"], "--control-image"),
    "control image without controlnet": (["--control-image", "{image}"], "--control-image"),
    "controlnet path missing": (["--controlnet", "{tmp}/nope", "--control-image", "{image}"], "--controlnet"),
    "control image path missing": (["--controlnet", "{cn}", "--control-image", "{tmp}/nope.png"], "--control-image"),
    "controlnet scale nan": (["--controlnet", "{cn}", "--control-image", "{image}", "--controlnet-scale", "nan"],
                             "--controlnet-scale"),
    "window reversed": (["--controlnet", "{cn}", "--control-image", "{image}", "--control-start", "0.8",
                         "--control-end", "0.2"], "--control-start"),
    "two scales for one controlnet": (["--controlnet", "{cn}", "--control-image", "{image}", "--controlnet-scale", "1",
                                       "--controlnet-scale", "2"], "--controlnet-scale"),
    "unknown control type": (["--controlnet", "{cn}", "--control-image", "{image}", "--control-type", "depthmap"],
                             "--control-type"),
    "t2i factor 2": (["--t2i-adapter", "{t2i}", "--t2i-image", "{image}", "--t2i-factor", "2"], "--t2i-factor"),
    "nexus without image": (["--nexus-adapter", "{nexus}"], "--adapter-image"),
    "ip without image": (["--ip-adapter", "{ip}"], "--ip-image"),
    "ip scale -1": (["--ip-adapter", "{ip}", "--ip-image", "{image}", "--ip-scale", "-1"], "--ip-scale"),
    "encoder without ip": (["--image-encoder", "{tmp}"], "--image-encoder"),
    "strength without init image": (["--strength", "0.5"], "--strength"),
    "strength 0": (["--init-image", "{image}", "--strength", "0"], "--strength"),
    "init image missing": (["--init-image", "{tmp}/nope.png"], "--init-image"),
    "lora missing": (["--lora", "{tmp}/nope.safetensors:0.5"], "--lora"),
    "lora scale nan": (["--lora", "{lora}:nan"], "--lora"),
    "lora mode": (["--lora", "{lora}", "--lora-mode", "merged"], "--lora-mode"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_plugin_input_exits_2_before_loading(case, plugin_files, tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded for a bad input")

    monkeypatch.setattr(XAdapterPipeline, "from_tiny", refuse)
    args, flag = BAD[case]
    out = tmp_path / "out"
    out.mkdir()
    values = {k: str(v) for k, v in plugin_files.items()} | {"tmp": str(out)}
    code = main(["--prompt", "a cat", *FAST, "--output", str(out / "o.png"), *(a.format(**values) for a in args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and flag in err[0], err
    assert list(out.iterdir()) == []


def test_sdxl_lora_given_as_sd15_lora_exits_2(plugin_files, tmp_path, capsys):
    out = tmp_path / "o.png"
    code = main(["--prompt", "a cat", *FAST, "--output", str(out), "--lora", str(plugin_files["sdxl_lora"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--lora" in err[-1] and "sdxl" in err[-1], err
    assert not out.exists()
