"""LoRA: fused and unfused equal an independent weight edit W + scale * (alpha/rank) * up @ down;
several LoRAs add; removal restores the base bit for bit; wrong base and unmatched keys."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from xa_runtime.errors import CheckpointError, ParameterError
from xa_runtime.models.tiny import build_tiny_models
from xa_runtime.pipeline import XAdapterPipeline
from xa_runtime.plugins.lora import LoraManager, load_lora, parse_lora_argument, write_random_lora

CLOSE = dict(rtol=1e-5, atol=1e-5)  # fp32: one weight edit vs a low-rank side path
EXACT = dict(rtol=0, atol=0)


@pytest.fixture(scope="module")
def models():
    return build_tiny_models(7)


def _unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = unet.config.sample_size
    x = torch.randn(2, 4, n, n, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.ones(2, 6)}
    return (x, torch.tensor(400), ctx), kwargs


def _edited_by_hand(unet, state, scale, target="unet"):
    """The reference: a copy of the UNet with W += scale * alpha/rank * up @ down written out."""
    ref = copy.deepcopy(unet)
    modules = dict(ref.named_modules())
    for key in state:
        if not key.endswith(("lora_down.weight", "lora_A.weight")):
            continue
        stem = key.rsplit(".", 2)[0]
        up = state[stem + (".lora_up.weight" if "lora_down" in key else ".lora_B.weight")]
        down = state[key]
        alpha = float(state[stem + ".alpha"]) if stem + ".alpha" in state else down.shape[0]
        if stem.startswith("lora_unet_"):
            flat = stem[len("lora_unet_"):]
            name = next(n for n in modules if n.replace(".", "_") == flat)
        elif stem.startswith(target + "."):
            name = stem[len(target) + 1:]
        else:
            continue
        w = modules[name].weight
        with torch.no_grad():
            if w.dim() == 2:
                w += scale * alpha / down.shape[0] * (up @ down)
            else:
                w += scale * alpha / down.shape[0] * torch.einsum("or,rchw->ochw", up[:, :, 0, 0], down)
    return ref


@pytest.mark.parametrize("mode", ["fused", "unfused"])
@pytest.mark.parametrize("fmt, conv", [("kohya", True), ("kohya", False), ("peft", True)])
def test_lora_equals_hand_edited_weights_and_unloads_exactly(models, tmp_path, mode, fmt, conv):
    sd15 = models[0]
    path = write_random_lora(tmp_path / "l.safetensors", sd15.unet, sd15.text_encoder, fmt=fmt, conv=conv)
    state = load_file(path)
    if conv:  # the file really holds 3x3 LoCon and 1x1 conv layers
        shapes = {tuple(v.shape[-2:]) for k, v in state.items() if ("down" in k or "lora_A" in k) and v.dim() == 4}
        assert shapes == {(3, 3), (1, 1)}
    args, kwargs = _unet_inputs(sd15.unet)
    base = sd15.unet(*args, **kwargs).sample
    want = _edited_by_hand(sd15.unet, state, 0.8)(*args, **kwargs).sample  # copied before the LoRA is added
    manager = LoraManager.for_branch(sd15, mode)
    manager.add("style", load_lora(path), scale=0.8)
    got = sd15.unet(*args, **kwargs).sample
    torch.testing.assert_close(got, want, **CLOSE)
    assert (got - base).abs().max() > 1e-4
    manager.remove("style")
    torch.testing.assert_close(sd15.unet(*args, **kwargs).sample, base, **EXACT)


def test_two_loras_add_and_scales_change(models, tmp_path):
    sd15 = models[0]
    a = write_random_lora(tmp_path / "a.safetensors", sd15.unet, seed=1)
    b = write_random_lora(tmp_path / "b.safetensors", sd15.unet, seed=2, fmt="peft")
    args, kwargs = _unet_inputs(sd15.unet)
    base = sd15.unet(*args, **kwargs).sample
    both = _edited_by_hand(_edited_by_hand(sd15.unet, load_file(a), 0.5), load_file(b), 1.5)(*args, **kwargs).sample
    for mode in ("fused", "unfused"):
        m = LoraManager.for_branch(sd15, mode)
        m.add("a", load_lora(a), 1.0)
        m.add("b", load_lora(b), 1.5)
        m.set_scale("a", 0.5)
        torch.testing.assert_close(sd15.unet(*args, **kwargs).sample, both, **CLOSE)
        m.clear()
        torch.testing.assert_close(sd15.unet(*args, **kwargs).sample, base, **EXACT)


def test_text_encoder_lora_changes_embeddings(models, tmp_path):
    sd15 = models[0]
    path = write_random_lora(tmp_path / "te.safetensors", sd15.unet, sd15.text_encoder, std=0.3)
    ids = sd15.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    base = sd15.text_encoder(ids)[0]
    m = LoraManager.for_branch(sd15, "unfused")
    m.add("x", load_lora(path))
    assert (sd15.text_encoder(ids)[0] - base).abs().max() > 1e-4
    m.remove("x")
    torch.testing.assert_close(sd15.text_encoder(ids)[0], base, **EXACT)


def test_wrong_branch_unmatched_keys_and_variants(models, tmp_path):
    sd15, sdxl, _ = models
    xl = write_random_lora(tmp_path / "xl.safetensors", sdxl.unet, sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2)
    assert load_lora(xl).base == "sdxl"
    with pytest.raises(ParameterError, match="sdxl LoRA"):
        LoraManager.for_branch(sd15).add("x", load_lora(xl))
    unet_only = write_random_lora(tmp_path / "xlu.safetensors", sdxl.unet)  # tiny: no width tells the base
    with pytest.raises(ParameterError, match="the model's weight is"):
        LoraManager.for_branch(sd15).add("x", load_lora(unet_only))
    state = load_file(write_random_lora(tmp_path / "s.safetensors", sd15.unet))
    state["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(4, 8)
    state["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(8, 4)
    save_file(state, tmp_path / "extra.safetensors")
    lora = load_lora(tmp_path / "extra.safetensors")
    m = LoraManager.for_branch(sd15)
    with pytest.warns(UserWarning, match="1 LoRA layers match no module"):
        m.add("x", lora)
    assert lora.unmatched == ["unet:no_such_block_to_q"]
    m.clear()
    save_file({"lora_unet_a.hada_w1_a": torch.zeros(1)}, tmp_path / "loha.safetensors")
    with pytest.raises(CheckpointError, match="unsupported LoRA variant"):
        load_lora(tmp_path / "loha.safetensors")
    with pytest.raises(ParameterError, match="lora_mode"):
        LoraManager.for_branch(sd15, "merged")


def test_parse_lora_argument():
    assert parse_lora_argument("a/b.safetensors:0.7") == ("a/b.safetensors", 0.7)
    assert parse_lora_argument("c:/x/b.safetensors") == ("c:/x/b.safetensors", 1.0)
    assert parse_lora_argument("b.safetensors") == ("b.safetensors", 1.0)


@pytest.mark.parametrize("mode", ["fused", "unfused"])
def test_generation_changes_with_each_branch_lora_and_returns_exactly(models, tmp_path, mode):
    sd15, sdxl, mapping = models
    pipe = XAdapterPipeline(sd15, sdxl, mapping, progress=False)
    kw = dict(num_inference_steps=3, adapter_guidance_start=1.0, seed=4, output_type="latent")
    base = pipe("a cat", **kw).images
    l15 = write_random_lora(tmp_path / "a.safetensors", sd15.unet, sd15.text_encoder, std=0.2)
    lxl = write_random_lora(tmp_path / "b.safetensors", sdxl.unet, sdxl.text_encoder,
                            text_encoder_2=sdxl.text_encoder_2, std=0.2)
    m15, mxl = LoraManager.for_branch(sd15, mode), LoraManager.for_branch(sdxl, mode)
    m15.add("a", load_lora(l15))
    with_sd15 = pipe("a cat", **kw).images
    mxl.add("b", load_lora(lxl))
    with_both = pipe("a cat", **kw).images
    assert (with_sd15 - base).abs().max() > 1e-3 and (with_both - with_sd15).abs().max() > 1e-3
    m15.clear()
    mxl.clear()
    torch.testing.assert_close(pipe("a cat", **kw).images, base, **EXACT)


def test_each_plugin_family_with_an_sdxl_lora(models, tmp_path):
    from xa_runtime.plugins import (
        ControlNetPlugin,
        IPAdapterPlugin,
        T2IAdapterPlugin,
        load_image_encoder,
        load_ip_adapter,
    )
    from xa_runtime.plugins.controlnet import build_tiny_controlnet
    from xa_runtime.plugins.ip_adapter_loading import write_tiny_image_encoder, write_tiny_ip_adapter
    from xa_runtime.plugins.nexus import NexusAdapterPlugin, build_tiny_nexus
    from xa_runtime.plugins.t2i_adapter import build_tiny_t2i_adapter

    sd15, sdxl, mapping = models
    pipe = XAdapterPipeline(sd15, sdxl, mapping, progress=False)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    controlnet = build_tiny_controlnet(sd15.unet)  # from the plain UNet, before the IP-Adapter is installed
    t2i, nexus = build_tiny_t2i_adapter(sd15.unet, "full_adapter", 0), build_tiny_nexus(sd15.unet)
    ip = load_ip_adapter(write_tiny_ip_adapter(tmp_path, sd15.unet)["safetensors"], sd15.unet)
    encoder = load_image_encoder(write_tiny_image_encoder(tmp_path / "enc"))
    families = {
        "controlnet": lambda: ControlNetPlugin(controlnet, image),
        "t2i": lambda: T2IAdapterPlugin(t2i, image),
        "nexus": lambda: NexusAdapterPlugin(nexus, image),
        "ip-adapter": lambda: IPAdapterPlugin(ip, encoder, image),
    }
    lxl = load_lora(write_random_lora(tmp_path / "xl.safetensors", sdxl.unet, std=0.2))
    kw = dict(num_inference_steps=3, adapter_guidance_start=1.0, seed=4, output_type="latent")
    try:
        for name, make in families.items():
            # the installed IP-Adapter needs its plugin in every call; at scale 0 it adds nothing
            plugins = [make()] + ([IPAdapterPlugin(ip, encoder, image, scale=0.0)] if name != "ip-adapter" else [])
            plain = pipe("a cat", plugins=plugins, **kw).images
            m = LoraManager.for_branch(sdxl, "fused")
            m.add("xl", lxl)
            with_lora = pipe("a cat", plugins=plugins, **kw).images
            m.clear()
            assert (with_lora - plain).abs().max() > 1e-3, name
    finally:
        ip.unload()
