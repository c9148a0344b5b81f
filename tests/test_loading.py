"""Loaders read back, bit for bit, the tiny models saved in every on-disk format; the real
presets and the adapter checkpoint have the released architectures and names; wrong paths
fail early, naming the parameter."""

import json
import os
from dataclasses import fields

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from xa_runtime.errors import CheckpointError, ParameterError
from xa_runtime.loading import (
    check_model_path,
    detect_family,
    load_mapping,
    load_sd15,
    load_sdxl,
    load_vae,
    single_file_config_folder,
)
from xa_runtime.loading.family import family_of_checkpoint, preset_for_checkpoint
from xa_runtime.models import MappingConfig, MappingLayers, get_preset
from xa_runtime.models.components import SD15Components, SDXLComponents
from xa_runtime.models.original_layout import sd15_to_original, sdxl_to_original, vae_to_original
from xa_runtime.models.tiny import build_tiny_models
from xa_runtime.pipeline import XAdapterPipeline
from xa_runtime.testing import TinyModelPaths

MODULES = {"sd15": ("unet", "vae", "text_encoder"), "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}
LOADERS = {"sd15": load_sd15, "sdxl": load_sdxl}


@pytest.fixture(scope="module")
def originals():
    # A fresh copy: other test modules may patch the session's tiny_models (plugins).
    return build_tiny_models(0)


def _path(paths: TinyModelPaths, family: str, fmt: str):
    return getattr(paths, f"{family}_{'dir' if fmt == 'folder' else 'file'}")


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module, what: str):
    e, a = expected.state_dict(), actual.state_dict()
    assert e.keys() == a.keys(), f"{what}: key sets differ: {sorted(set(e) ^ set(a))[:10]}"
    different = [k for k in e if e[k].dtype != a[k].dtype or not torch.equal(e[k], a[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:5]}"


# ---------------------------------------------------------------- base models round trip
@pytest.mark.parametrize("fmt", ["folder", "single_file"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_base_model_round_trip(tiny_paths, originals, family, fmt):
    path = _path(tiny_paths, family, fmt)
    assert detect_family(path) == family
    loaded = LOADERS[family](path)
    reference = originals[0] if family == "sd15" else originals[1]
    for name in MODULES[family]:
        module = getattr(loaded, name)
        assert_same_weights(getattr(reference, name), module, f"{family} {fmt} {name}")
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    for name in ("unet", "vae"):
        public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        assert public(getattr(loaded, name).config) == public(getattr(reference, name).config), name

    texts = ["a photo of a cat, oil painting", ""]
    tokenizers = ["tokenizer"] + (["tokenizer_2"] if family == "sdxl" else [])
    for name in tokenizers:
        kw = dict(padding="max_length", max_length=77, truncation=True)
        assert getattr(loaded, name)(texts, **kw).input_ids == getattr(reference, name)(texts, **kw).input_ids, name
    if family == "sdxl":  # SDXL's second tokenizer pads with "!" (id 0), the first with end-of-text
        assert loaded.tokenizer_2("a", padding="max_length", max_length=8).input_ids[-1] == 0
        assert loaded.tokenizer("a", padding="max_length", max_length=8).input_ids[-1] == 49407

    preset = get_preset(f"tiny-{family}").scheduler
    assert {k: loaded.scheduler_config[k] for k in preset} == preset


@pytest.mark.parametrize("which", ["sdxl_vae_dir", "sdxl_vae_file"])
def test_separate_vae_round_trip(tiny_paths, originals, which):
    sdxl_vae = originals[1].vae
    vae = load_vae(getattr(tiny_paths, which), sdxl_vae.config)
    assert_same_weights(sdxl_vae, vae, which)
    assert vae.config.scaling_factor == sdxl_vae.config.scaling_factor


@pytest.mark.parametrize("fmt", ["folder", "original_file", "diffusers_file"])
def test_vae_path_replaces_the_sdxl_vae(tiny_paths, originals, tmp_path, fmt):
    other = AutoencoderKL.from_config(originals[1].vae.config).eval()  # different random weights
    state = {k: v.contiguous() for k, v in other.state_dict().items()}
    if fmt == "folder":
        other.save_pretrained(tmp_path / "vae")
        path = tmp_path / "vae"
    elif fmt == "original_file":  # as sdxl_vae.safetensors ships: original layout, no prefix
        path = tmp_path / "vae.safetensors"
        save_file(vae_to_original(state, other.config), path)
    else:
        path = tmp_path / "diffusion_pytorch_model.safetensors"
        save_file(state, path)
    check_model_path(path, "vae", "sdxl_vae")
    sdxl = load_sdxl(tiny_paths.sdxl_file, vae_path=path)
    assert_same_weights(other, sdxl.vae, fmt)
    assert_same_weights(originals[1].unet, sdxl.unet, "unet untouched")


def test_dtype_and_single_file_loaders_agree(tiny_paths):
    a = load_sd15(tiny_paths.sd15_file, dtype=torch.float16)
    b = load_sd15(tiny_paths.sd15_dir, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in a.unet.parameters())
    assert_same_weights(b.unet, a.unet, "fp16 unet")
    assert_same_weights(b.text_encoder, a.text_encoder, "fp16 text encoder")


def test_tiny_paths_are_complete(tiny_paths):
    for f in fields(TinyModelPaths):
        assert getattr(tiny_paths, f.name).exists(), f.name
    leftovers = [p.name for p in tiny_paths.root.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    index = json.loads((tiny_paths.sd15_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    index = json.loads((tiny_paths.sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_folders_load_in_diffusers_itself(tiny_paths, originals, family):
    # The folders are real diffusers folders, not just readable by our loader.
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(_path(tiny_paths, family, "folder"), local_files_only=True)
    reference = originals[0] if family == "sd15" else originals[1]
    for name in MODULES[family]:
        assert_same_weights(getattr(reference, name), getattr(pipe, name), f"diffusers {family} {name}")


def test_single_file_has_original_layout(tiny_paths):
    sdxl = load_file(tiny_paths.sdxl_file)
    assert "model.diffusion_model.label_emb.0.0.weight" in sdxl
    assert "model.diffusion_model.input_blocks.0.0.weight" in sdxl
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in sdxl
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sdxl
    g = "conditioner.embedders.1.model."
    width, proj = 32, 32
    assert sdxl[g + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert sdxl[g + "text_projection"].shape == (width, proj)
    assert {g + k for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight")} <= sdxl.keys()
    assert not any(k.startswith(("down_blocks", "text_model", "unet.")) for k in sdxl)
    sd15 = load_file(tiny_paths.sd15_file)
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd15
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in sd15  # diffusers' v1 marker
    vae = load_file(tiny_paths.sdxl_vae_file)
    assert "encoder.conv_in.weight" in vae and "decoder.mid.attn_1.q.weight" in vae
    assert vae["decoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convs in the original layout


def test_pickled_checkpoints(tiny_paths, originals, tmp_path):
    # An LDM-style .ckpt that torch.load(weights_only=True) can read is accepted ...
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(tiny_paths.sd15_file), "global_step": 1}, ckpt)
    assert detect_family(ckpt) == "sd15"
    assert_same_weights(originals[0].unet, load_sd15(ckpt).unet, "ckpt unet")
    # ... one that needs arbitrary unpickling is refused, with the way out.
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "callback": Exception("pickled object")}, bad)
    with pytest.raises(ParameterError, match=r"sd15.*convert it to \.safetensors"):
        check_model_path(bad, "sd15", "sd15")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_sd15(bad)


def test_incomplete_single_file_is_refused(tiny_paths, tmp_path):
    state = load_file(tiny_paths.sd15_file)
    del state["model.diffusion_model.out.2.weight"]
    state["model.diffusion_model.out.0.weight"] = torch.zeros(7)
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_sd15(tmp_path / "broken.safetensors")
    assert "conv_out.weight" in str(e.value) and "conv_norm_out.weight: expected (32,), found (7,)" in str(e.value)


def test_loaders_refuse_the_other_family(tiny_paths):
    with pytest.raises(CheckpointError, match="SDXL"):
        load_sd15(tiny_paths.sdxl_file)
    with pytest.raises(CheckpointError, match="SD1.5"):
        load_sdxl(tiny_paths.sd15_dir)


# ---------------------------------------------------------------- mapping checkpoint
RELEASED_MAPPING_SHAPES = {
    **{f"body.{i}.block1.weight": (1280, 1280, 3, 3) for i in range(6)},
    **{f"body.{i}.block1.bias": (1280,) for i in range(6)},
    **{f"body.{i}.block2.weight": (1280, 1280, 3, 3) for i in range(6)},
    **{f"body.{i}.block2.bias": (1280,) for i in range(6)},
    **{f"body.{i}.block1.weight": (640, 640, 3, 3) for i in range(6, 9)},
    **{f"body.{i}.block1.bias": (640,) for i in range(6, 9)},
    **{f"body.{i}.block2.weight": (640, 640, 3, 3) for i in range(6, 9)},
    **{f"body.{i}.block2.bias": (640,) for i in range(6, 9)},
    "body.3.in_conv.weight": (1280, 640, 3, 3),
    "body.3.in_conv.bias": (1280,),
    "body.6.in_conv.weight": (640, 320, 3, 3),
    "body.6.in_conv.bias": (640,),
    "body.6.up_opt.op.weight": (320, 320, 3, 3),  # ConvTranspose2d: in x out x k x k
    "body.6.up_opt.op.bias": (320,),
    "zero_out.0.weight": (1280, 1280, 1, 1),
    "zero_out.0.bias": (1280,),
    "zero_out.1.weight": (1280, 1280, 1, 1),
    "zero_out.1.bias": (1280,),
    "zero_out.2.weight": (640, 640, 1, 1),
    "zero_out.2.bias": (640,),
}


def test_full_size_mapping_has_the_released_names_and_shapes():
    with torch.device("meta"):
        mapping = MappingLayers()
    shapes = {k: tuple(v.shape) for k, v in mapping.state_dict().items()}
    assert len(RELEASED_MAPPING_SHAPES) == 48
    assert shapes == RELEASED_MAPPING_SHAPES
    assert 212e6 < sum(v.numel() for v in mapping.state_dict().values()) < 214e6  # "~213M params"


def test_tiny_mapping_is_seeded_and_does_something(originals):
    # zero_out is zero-initialised for training; the tiny adapter must add a residual.
    mapping = originals[2]
    assert all(p.abs().sum() > 0 for p in mapping.zero_out.parameters())
    again, other = build_tiny_models(0)[2], build_tiny_models(1)[2]
    assert_same_weights(mapping, again, "same seed")
    assert not torch.equal(mapping.zero_out[0].weight, other.zero_out[0].weight)


@pytest.mark.parametrize("which", ["adapter_bin", "adapter_safetensors"])
def test_load_mapping_round_trip(tiny_paths, originals, which):
    mapping = originals[2]
    loaded = load_mapping(getattr(tiny_paths, which), mapping.config)
    assert_same_weights(mapping, loaded, which)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    if which == "adapter_bin":  # the released format: a plain state dict of tensors
        raw = torch.load(tiny_paths.adapter_bin, map_location="cpu", weights_only=True)
        assert type(raw) is dict and set(raw) == set(mapping.state_dict())


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_load_mapping_lists_wrong_keys_and_shapes(originals, tmp_path, suffix):
    mapping = originals[2]
    state = {k: v.clone() for k, v in mapping.state_dict().items()}
    state["zero_out.3.weight"] = state.pop("zero_out.2.weight")
    del state["body.6.up_opt.op.bias"]
    state["body.0.block1.weight"] = torch.zeros(1, 2, 3, 3)
    path = tmp_path / f"adapter{suffix}"
    torch.save(state, path) if suffix == ".bin" else save_file(state, path)
    with pytest.raises(CheckpointError) as e:
        load_mapping(path, mapping.config)
    msg = str(e.value)
    assert "missing keys (2): body.6.up_opt.op.bias, zero_out.2.weight" in msg
    assert "unexpected keys (1): zero_out.3.weight" in msg
    assert "body.0.block1.weight: expected (128, 128, 3, 3), found (1, 2, 3, 3)" in msg


def test_load_mapping_refuses_other_widths(tiny_paths):
    with pytest.raises(CheckpointError, match=r"shape mismatches \(48\)"):
        load_mapping(tiny_paths.adapter_safetensors, MappingConfig())
    with pytest.raises(CheckpointError, match="X-Adapter checkpoint"):
        load_mapping(tiny_paths.sd15_file.with_suffix(".ckpt"), MappingConfig())


# ---------------------------------------------------------------- real architectures
REAL_PARAMS = {
    ("sd15", "unet"): 859_520_964,
    ("sdxl", "unet"): 2_567_463_684,
    ("sd15", "vae"): 83_653_863,
    ("sdxl", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,
}


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_real_presets_and_their_single_file_config_folder(name):
    preset = get_preset(name)
    folder = single_file_config_folder(name)
    assert single_file_config_folder(name) == folder  # written once
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionPipeline")
    unet_config = UNet2DConditionModel.load_config(folder / "unet")
    vae_config = AutoencoderKL.load_config(folder / "vae")
    assert {k: unet_config[k] for k in preset.unet} == preset.unet
    assert {k: vae_config[k] for k in preset.vae} == preset.vae
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in preset.scheduler} == preset.scheduler

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        te2 = None
        if name == "sdxl":
            te2_config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            assert (te2_config.hidden_size, te2_config.num_hidden_layers, te2_config.hidden_act) == (1280, 32, "gelu")
            te2 = CLIPTextModelWithProjection(te2_config)
    assert count(unet) == REAL_PARAMS[name, "unet"]
    assert count(vae) == REAL_PARAMS[name, "vae"]
    assert count(te) == REAL_PARAMS[name, "text_encoder"]
    if te2 is not None:
        assert count(te2) == REAL_PARAMS[name, "text_encoder_2"]

    # A real single file (names and shapes, on the meta device) is recognised as this preset,
    # and diffusers' own LDM -> diffusers converters map every tensor back.
    components = (SDXLComponents(unet, vae, te, te2, None, None) if te2 is not None
                  else SD15Components(unet, vae, te, None))
    original = sdxl_to_original(components) if te2 is not None else sd15_to_original(components)
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    assert family_of_checkpoint(shapes) == name
    assert preset_for_checkpoint(shapes, name).name == name
    back = {
        "unet": convert_ldm_unet_checkpoint(original, unet_config),
        "vae": convert_ldm_vae_checkpoint(original, vae_config),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(original).items()},
    }
    if te2 is not None:
        back["text_encoder_2"] = convert_open_clip_checkpoint(te2, original, prefix="conditioner.embedders.1.model.")
    for part, module in (("unet", unet), ("vae", vae), ("text_encoder", te), ("text_encoder_2", te2)):
        if module is not None:
            expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            assert {k: tuple(v.shape) for k, v in back[part].items()} == expected, part


def test_missing_tensor_in_a_diffusers_folder_is_refused(tiny_paths, tmp_path):
    broken = tmp_path / "sd15"
    broken.mkdir()
    for entry in tiny_paths.sd15_dir.iterdir():
        if entry.name != "unet":
            (broken / entry.name).symlink_to(entry)
    (broken / "unet").mkdir()
    (broken / "unet" / "config.json").symlink_to(tiny_paths.sd15_dir / "unet" / "config.json")
    state = load_file(tiny_paths.sd15_dir / "unet" / "diffusion_pytorch_model.safetensors")
    del state["conv_out.weight"]
    save_file(state, broken / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['conv_out.weight'\]"):
        load_sd15(broken)


# ---------------------------------------------------------------- path checks
def test_check_model_path_accepts_the_right_paths(tiny_paths):
    for family in ("sd15", "sdxl"):
        for fmt in ("folder", "single_file"):
            check_model_path(_path(tiny_paths, family, fmt), family, family)
    check_model_path(tiny_paths.adapter_bin, "adapter", "adapter")
    check_model_path(tiny_paths.adapter_safetensors, "adapter", "adapter")
    check_model_path(tiny_paths.sdxl_vae_dir, "vae", "sdxl_vae")
    check_model_path(tiny_paths.sdxl_vae_file, "vae", "sdxl_vae")


def _refused(path, family, param, *fragments):
    with pytest.raises(ParameterError) as e:
        check_model_path(path, family, param)
    msg = str(e.value)
    assert e.value.name == param and f"invalid {param}=" in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg


@pytest.mark.parametrize("fmt", ["folder", "single_file"])
def test_check_model_path_names_the_other_family(tiny_paths, fmt):
    _refused(_path(tiny_paths, "sdxl", fmt), "sd15", "sd15_model", "found an SDXL base model")
    _refused(_path(tiny_paths, "sd15", fmt), "sdxl", "sdxl_model", "found an SD1.5 model")


def test_check_model_path_refuses_bad_paths(tiny_paths, tmp_path):
    _refused(tmp_path / "nope", "sd15", "sd15", "nothing exists")
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hello")
    _refused(tmp_path / "random", "sdxl", "sdxl", "not a diffusers model folder")
    _refused(tmp_path / "random" / "notes.txt", "sd15", "base", "unknown checkpoint format")
    _refused(tiny_paths.sdxl_vae_dir, "sdxl", "sdxl", "VAE folder")
    _refused(tiny_paths.sdxl_vae_file, "sd15", "sd15", "VAE only")
    _refused(tiny_paths.adapter_safetensors, "sdxl", "sdxl", "no UNet weights")
    _refused(tmp_path / "missing.bin", "adapter", "adapter", "nothing exists")
    _refused(tiny_paths.sdxl_dir, "adapter", "adapter", "folder")
    _refused(tiny_paths.sdxl_dir, "vae", "sdxl_vae", "AutoencoderKL")
    _refused(tiny_paths.adapter_safetensors, "vae", "sdxl_vae", "no VAE encoder")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(64))
    _refused(junk, "adapter", "adapter", "safetensors")
    with pytest.raises(CheckpointError):
        detect_family(tmp_path / "random")


# ---------------------------------------------------------------- end to end
GENERATE = dict(num_inference_steps=2, adapter_guidance_start=1.0, seed=7, output_type="latent")


@pytest.fixture(scope="module")
def reference_latents():
    return XAdapterPipeline(*build_tiny_models(0), progress=False)("a red cube", **GENERATE).images


@pytest.mark.parametrize("formats", ["folders+bin", "files+safetensors"])
def test_from_pretrained_matches_in_memory_models(tiny_paths, reference_latents, formats):
    if formats == "folders+bin":
        args = (tiny_paths.sd15_dir, tiny_paths.sdxl_dir, tiny_paths.adapter_bin)
    else:
        args = (tiny_paths.sd15_file, tiny_paths.sdxl_file, tiny_paths.adapter_safetensors)
    loaded = XAdapterPipeline.from_pretrained(*map(str, args), progress=False)
    latents = loaded("a red cube", **GENERATE).images
    assert latents.shape == reference_latents.shape and torch.isfinite(latents).all()
    # Same weights bit for bit (tested above); tensors read from a file sit at other
    # addresses, and oneDNN's vectorised paths may then sum in another order (seen at one
    # thread: 2e-5 after the whole generation). Hence a tight tolerance, not equality.
    torch.testing.assert_close(latents, reference_latents, rtol=1e-4, atol=1e-4)


def test_check_model_path_reads_adapter_key_names_before_loading(tiny_paths, tmp_path):
    check_model_path(tiny_paths.adapter_bin, "adapter", "adapter")
    check_model_path(tiny_paths.adapter_safetensors, "adapter", "adapter")
    wrong = tmp_path / "other.safetensors"
    save_file({"body.0.block1.weight": torch.zeros(1), "something.else": torch.zeros(1)}, wrong)
    with pytest.raises(ParameterError, match=r"adapter.*missing keys.*unexpected keys \(1\): something.else"):
        check_model_path(wrong, "adapter", "adapter")
