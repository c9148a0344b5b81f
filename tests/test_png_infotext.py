"""PNG metadata that image tools read: xa-generate's and xa-serve's PNGs carry A1111 infotext
in `parameters` and the full JSON record in `xa_runtime`.

Two independent readers check the infotext: sd-parsers (a PyPI library that reads A1111,
ComfyUI, InvokeAI, ... metadata the way image browsers do) and a transcription of A1111's
own parser (stable-diffusion-webui modules/infotext_utils.py, parse_generation_parameters:
its key/value regex, last-line rule, quoting and WxH size split), written here from that
code's documented behaviour."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from xa_runtime import infotext
from xa_runtime.errors import ParameterError
from xa_runtime.cli.generate import main

sd_parsers = pytest.importorskip("sd_parsers")

# A1111: modules/infotext_utils.py
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_parse(text: str) -> dict[str, str]:
    res: dict[str, str] = {}
    prompt, negative, done_with_prompt = "", "", False
    *lines, lastline = text.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in RE_PARAM.findall(lastline):
        if v[:1] == '"' and v[-1:] == '"':
            v = json.loads(v)
        m = RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    res["Prompt"], res["Negative prompt"] = prompt, negative
    return res


FAST = ["--steps", "4", "--height", "128", "--width", "96", "--no-progress", "--seed", "7"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("png") / "cat.png"
    assert main(["--prompt", "a cat, on a mat", "--negative-prompt", "blurry", "--scheduler", "euler-a",
                 "--adapter-condition-scale", "0.8", "--output", str(out), *FAST]) == 0
    with Image.open(out) as image:
        return dict(image.text), np.asarray(image)


def test_a1111_reads_the_generate_png(generated):
    text, _ = generated
    parsed = a1111_parse(text["parameters"])
    assert parsed["Prompt"] == "a cat, on a mat" and parsed["Negative prompt"] == "blurry"
    assert parsed["Steps"] == "4" and parsed["Sampler"] == "Euler a" and parsed["CFG scale"] == "7.5"
    assert parsed["Seed"] == "7" and (parsed["Size-1"], parsed["Size-2"]) == ("96", "128")  # A1111: WxH
    assert parsed["X-Adapter start"] == "0.9" and parsed["X-Adapter condition scale"] == "0.8"
    assert (parsed["X-Adapter base size-1"], parsed["X-Adapter base size-2"]) == ("64", "64")
    assert parsed["Model"] == "xa-runtime tiny (seed 0)" and parsed["Version"].startswith("xa-runtime ")
    assert "Denoising strength" not in parsed  # txt2img


def test_sd_parsers_reads_the_generate_png(generated, tmp_path):
    text, pixels = generated
    path = tmp_path / "again.png"
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    Image.fromarray(pixels).save(path, pnginfo=info)
    with Image.open(path) as image:
        prompt_info = sd_parsers.ParserManager().parse(image)
    assert prompt_info is not None and prompt_info.generator == sd_parsers.data.Generators.AUTOMATIC1111
    sampler = prompt_info.samplers[0]
    assert sampler.name == "Euler a"
    assert sampler.parameters["steps"] == "4" and sampler.parameters["cfg_scale"] == "7.5" and sampler.parameters["seed"] == "7"
    assert [p.value for p in sampler.prompts] == ["a cat, on a mat"]
    assert [p.value for p in sampler.negative_prompts] == ["blurry"]
    assert prompt_info.metadata["Size"] == "96x128" and prompt_info.metadata["X-Adapter start"] == "0.9"


def test_the_json_chunk_is_the_full_record(generated):
    text, _ = generated
    record = json.loads(text["xa_runtime"])
    assert record["prompt"] == "a cat, on a mat" and record["seed"] == 7 and record["scheduler"] == "euler-a"
    assert record["models"] == {"kind": "tiny", "tiny_seed": 0} and record["image_index"] == 0


def test_quoting_and_per_prompt_lists():
    params = {"prompt": ["one", "two"], "negative_prompt": None, "num_inference_steps": 3, "scheduler": "dpmpp-2m",
              "guidance_scale": 5.0, "seed": 1, "width": 64, "height": 32, "width_sd15": 64, "height_sd15": 64,
              "adapter_guidance_start": 0.5, "adapter_condition_scale": 1.0, "prompt_sd15": ["a, b: c", "d"],
              "strength": 0.6}
    parsed = a1111_parse(infotext.infotext(params, prompt_index=0, model="sd_xl_base_1.0"))
    assert parsed["Prompt"] == "one" and parsed["Negative prompt"] == ""
    assert parsed["Sampler"] == "DPM++ 2M" and parsed["Model"] == "sd_xl_base_1.0"
    assert parsed["X-Adapter base prompt"] == "a, b: c"  # quoted by A1111's rule, read back whole
    assert parsed["Denoising strength"] == "0.6"  # img2img
    assert a1111_parse(infotext.infotext(params, prompt_index=1))["Prompt"] == "two"
    assert infotext.quote("plain") == "plain" and infotext.quote("a,b") == '"a,b"'


def test_serve_png_carries_both_chunks():
    pytest.importorskip("fastapi")
    from xa_runtime.serve.app import _png

    params = {"prompt": "a dog", "negative_prompt": "ugly", "num_inference_steps": 2, "scheduler": "ddim",
              "guidance_scale": 7.0, "seed": 3, "width": 64, "height": 64, "width_sd15": 64, "height_sd15": 64,
              "adapter_guidance_start": 1.0, "adapter_condition_scale": 1.0, "num_images_per_prompt": 2,
              "strength": 1.0, "fusion_guidance_scale": float("nan")}
    image = Image.new("RGB", (64, 64), (10, 20, 30))
    import io

    with Image.open(io.BytesIO(_png(image, params, 1, ["canny"]))) as png:
        text, pixels = dict(png.text), np.asarray(png)
    assert np.array_equal(pixels, np.asarray(image))
    parsed = a1111_parse(text["parameters"])
    assert parsed["Prompt"] == "a dog" and parsed["Negative prompt"] == "ugly" and parsed["Sampler"] == "DDIM"
    assert parsed["Seed"] == "3" and parsed["Version"].startswith("xa-serve ")
    record = json.loads(text["xa_runtime"])
    assert record["image_index"] == 1 and record["prompt_index"] == 0 and record["plugins"] == ["canny"]
    assert record["fusion_guidance_scale"] == "nan"  # non-finite floats as text (valid JSON)


@pytest.fixture(scope="module")
def with_plugins(tmp_path_factory, tiny_models):
    """A PNG made with an SD1.5 LoRA, an SDXL LoRA, a ControlNet and an init image."""
    from xa_runtime.testing import write_random_lora
    from xa_runtime.testing.plugins import write_tiny_controlnet

    root = tmp_path_factory.mktemp("plugins")
    sd15, sdxl = tiny_models[0], tiny_models[1]
    lora = write_random_lora(root / "cat_style.safetensors", sd15.unet, sd15.text_encoder, std=0.2)
    xl_lora = write_random_lora(root / "xl_detail.safetensors", sdxl.unet, sdxl.text_encoder,
                                text_encoder_2=sdxl.text_encoder_2, std=0.2)
    _, controlnet = write_tiny_controlnet(root / "cn", sd15.unet)
    image = root / "edges.png"
    Image.fromarray((np.indices((64, 64)).sum(0) % 16 * 16).astype(np.uint8)).save(image)
    out = root / "made.png"
    argv = ["--prompt", "a cat", "--steps", "3", "--adapter-guidance-start", "0.67", "--no-progress", "--seed", "5",
            "--lora", f"{lora}:0.7", "--sdxl-lora", f"{xl_lora}:0.5", "--controlnet", str(controlnet),
            "--control-image", str(image), "--controlnet-scale", "0.8", "--control-start", "0.1", "--control-end",
            "0.9", "--init-image", str(image), "--strength", "0.67", "--clip-skip", "1"]
    assert main([*argv, "--output", str(out)]) == 0
    with Image.open(out) as png:
        return dict(png.text), np.asarray(png), out, {"lora": lora, "xl_lora": xl_lora, "controlnet": controlnet}


def test_plugins_in_the_infotext_as_a1111_and_controlnet_write_them(with_plugins):
    from xa_runtime.infotext import file_hash

    text, _, _, files = with_plugins
    parsed = a1111_parse(text["parameters"])
    assert parsed["Prompt"] == "a cat <lora:cat_style:0.7> <lora:xl_detail:0.5>"
    lora_hash, xl_hash = file_hash(files["lora"], addnet=True)[:12], file_hash(files["xl_lora"], addnet=True)[:12]
    assert parsed["Lora hashes"] == f"cat_style: {lora_hash}, xl_detail: {xl_hash}"
    control = dict(item.split(": ", 1) for item in parsed["ControlNet 0"].split(", "))
    assert control["Model"] == f"control_tiny_sd15 [{file_hash(files['controlnet'])[:8]}]"
    assert (control["Weight"], control["Guidance Start"], control["Guidance End"]) == ("0.8", "0.1", "0.9")
    assert parsed["Clip skip"] == "2" and parsed["Denoising strength"] == "0.67"
    # the addnet hash is the sha256 of the tensor data after the safetensors header (independently computed)
    import hashlib
    raw = files["lora"].read_bytes()
    assert lora_hash == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()[:12]


def test_sd_parsers_reads_the_plugin_entries(with_plugins):
    text, _, path, _ = with_plugins
    with Image.open(path) as image:
        info = sd_parsers.ParserManager().parse(image)
    assert info is not None and info.generator == sd_parsers.data.Generators.AUTOMATIC1111
    assert [p.value for p in info.samplers[0].prompts] == ["a cat <lora:cat_style:0.7> <lora:xl_detail:0.5>"]
    # sd-parsers 0.6 splits A1111's quoted values at their commas (it does not unquote them): it still
    # sees the ControlNet's model with its hash, and the LoRAs through the prompt's tags
    assert any(m.name.startswith("control_tiny_sd15 [") for m in info.models)
    assert info.metadata["Clip skip"] == "2" and info.metadata["Guidance Start"] == "0.1"


def test_the_json_chunk_alone_reproduces_the_image(with_plugins, tmp_path):
    from xa_runtime.cli.generate import arguments_from_record

    text, pixels, _, files = with_plugins
    record = json.loads(text["xa_runtime"])
    kinds = {e["kind"]: e for e in record["plugins"]}
    assert set(kinds) == {"lora", "sdxl_lora", "controlnet"}
    assert kinds["lora"]["file"] == "cat_style.safetensors" and kinds["lora"]["scale"] == 0.7
    assert kinds["controlnet"]["guidance_start"] == 0.1 and len(kinds["controlnet"]["hash"]) == 10
    again = tmp_path / "again.png"
    assert main([*arguments_from_record(record), "--output", str(again)]) == 0
    with Image.open(again) as png:
        assert np.array_equal(np.asarray(png), pixels)
        assert png.text["xa_runtime"] == text["xa_runtime"]  # the same record: nothing differs
    # a plugin file that changed since is named, not silently used
    files["lora"].write_bytes(files["lora"].read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ParameterError, match="--lora"):
        arguments_from_record(record)
