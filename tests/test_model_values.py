"""Model and config values checked before they cost anything: NaN / inf weights in an
adapter, ControlNet, T2I-Adapter, IP-Adapter or VAE are refused when the file loads, naming
it; non-finite decoded pixels fail the generation instead of becoming a black PNG; config
values beyond what the architecture can be, and JSON nested past the parser's depth, are one
error naming the file and the key, before any allocation."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from xa_runtime.cli import generate as generate_cli
from xa_runtime.errors import CheckpointError, NonFiniteError, ParameterError
from xa_runtime.loading import check_model_path, load_mapping
from xa_runtime.loading.checkpoint_files import read_folder_config, read_safetensors_shapes
from xa_runtime.models.presets import get_preset


def poison(path, value: float) -> None:
    """Put `value` into the first floating tensor of a .safetensors file."""
    state = load_file(path)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key].view(-1)[1] = value
    save_file(state, path)


def test_an_adapter_with_nan_weights_is_refused_at_load_naming_the_file(tiny_models, tmp_path):
    mapping = tiny_models[2]
    state = {k: v.clone().contiguous() for k, v in mapping.state_dict().items()}
    state["body.0.block1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "adapter.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"adapter\.safetensors.*body\.0\.block1\.weight.*NaN"):
        load_mapping(path, mapping.config)


@pytest.mark.parametrize("form", ["folder", "file"])
def test_a_controlnet_with_inf_weights_is_refused_at_load_naming_the_file(form, tiny_models, tmp_path):
    from xa_runtime.plugins.controlnet import load_controlnet
    from xa_runtime.testing.plugins import write_tiny_controlnet

    folder, file = write_tiny_controlnet(tmp_path, tiny_models[0].unet)
    weights = folder / "diffusion_pytorch_model.safetensors" if form == "folder" else file
    poison(weights, float("inf"))
    path = folder if form == "folder" else file
    with pytest.raises(CheckpointError, match="NaN or infinite") as e:
        load_controlnet(path)
    assert str(path) in str(e.value)


def test_t2i_and_ip_adapters_with_nan_weights_are_refused_at_load(tiny_models, tmp_path):
    from xa_runtime.plugins.ip_adapter_loading import read_ip_adapter_file
    from xa_runtime.plugins.t2i_adapter import load_t2i_adapter
    from xa_runtime.testing.plugins import write_tiny_ip_adapter, write_tiny_t2i_adapter

    t2i = write_tiny_t2i_adapter(tmp_path / "t2i", tiny_models[0].unet)
    poison(t2i / "diffusion_pytorch_model.safetensors", float("nan"))
    with pytest.raises(CheckpointError, match=f"{t2i}.*NaN"):
        load_t2i_adapter(t2i)
    ip = write_tiny_ip_adapter(tmp_path, tiny_models[0].unet)["safetensors"]
    poison(ip, float("-inf"))
    with pytest.raises(CheckpointError, match=f"{ip.name}.*NaN or infinite"):
        read_ip_adapter_file(ip)


def test_a_vae_folder_with_nan_weights_is_refused_at_load(tiny_models, tmp_path):
    from xa_runtime.loading import load_vae

    vae = tiny_models[1].vae
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    poison(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", float("nan"))
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_vae(tmp_path / "vae", vae.config)


def test_non_finite_decoded_pixels_fail_instead_of_a_black_image():
    from xa_runtime import XAdapterPipeline
    from xa_runtime.pipeline.params import GenerationParams

    pipe = XAdapterPipeline.from_tiny(0)
    with torch.no_grad():
        pipe.sdxl.vae.decoder.conv_out.bias.fill_(float("nan"))  # latents stay finite; pixels do not
    params = GenerationParams(prompt="a", num_inference_steps=2, adapter_guidance_start=1.0)
    with pytest.raises(NonFiniteError, match="SDXL VAE decoded non-finite pixels"):
        pipe.generate(params)


def unet_folder(tmp_path, **override):
    config = {"_class_name": "UNet2DConditionModel", **get_preset("tiny-sd15").unet, **override}
    (tmp_path / "m" / "unet").mkdir(parents=True)
    (tmp_path / "m" / "unet" / "config.json").write_text(json.dumps(config))
    return tmp_path / "m"


@pytest.mark.parametrize("key, value, shown", [("layers_per_block", 10**6, "1000000"),
                                               ("sample_size", "1e400", "inf"),
                                               ("block_out_channels", [32, 10**9], "1000000000"),
                                               ("attention_head_dim", 2.5, "2.5")])
def test_unet_config_values_beyond_the_architecture_are_refused_naming_file_and_key(key, value, shown, tmp_path):
    folder = unet_folder(tmp_path, **{key: "__V__"})
    config = folder / "unet" / "config.json"
    config.write_text(config.read_text().replace('"__V__"', json.dumps(value) if value != "1e400" else "1e400"))
    with pytest.raises(ParameterError) as e:
        check_model_path(folder, "sd15", "--sd15")
    text = str(e.value)
    assert e.value.name == "--sd15" and str(config) in text and repr(key) in text and shown in text


def test_a_bad_unet_config_is_one_line_naming_the_flag_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generate_cli, "load_pipeline", lambda *a: pytest.fail("loaded a model"))
    folder = unet_folder(tmp_path, sample_size="__V__")
    config = folder / "unet" / "config.json"
    config.write_text(config.read_text().replace('"__V__"', "1e400"))
    code = generate_cli.main(["--prompt", "a", "--output", str(tmp_path / "o.png"), "--sd15", str(folder),
                              "--sdxl", str(folder), "--adapter", str(tmp_path / "a.bin")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--sd15" in err and "'sample_size'" in err and "--height-sd15" not in err


DEEP = "[" * 100_000 + "]" * 100_000


def test_a_config_nested_100000_deep_is_an_error_not_a_recursion_error(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "ControlNetModel", "x": ' + DEEP + "}")
    with pytest.raises(CheckpointError, match="nests too deeply"):
        read_folder_config(tmp_path, "controlnet", "a ControlNet folder")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(DEEP)
    with pytest.raises(ParameterError, match="nests too deeply"):
        check_model_path(tmp_path, "sd15", "--sd15")


def test_a_safetensors_header_nested_100000_deep_is_an_error_not_a_recursion_error(tmp_path):
    header = ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": ' + DEEP + "}}").encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match="nests too deeply"):
        read_safetensors_shapes(path)


def test_a_text_encoder_config_beyond_clip_is_refused_before_loading(tmp_path):
    folder = unet_folder(tmp_path)
    (folder / "text_encoder").mkdir()
    (folder / "text_encoder" / "config.json").write_text(json.dumps({"num_hidden_layers": 10**6, "hidden_size": 32}))
    with pytest.raises(ParameterError, match=r"text_encoder/config\.json: config key 'num_hidden_layers'"):
        check_model_path(folder, "sd15", "--sd15")
