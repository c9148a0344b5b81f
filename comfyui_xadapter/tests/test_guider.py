"""Unit level: the node pack's pieces on ComfyUI's own tiny models against xa_runtime.

References: xa_runtime's SD15Branch / SDXLBranch (diffusers UNets with the same weights)
for the features and the injection (<= 1e-5 in fp32); plain ComfyUI sampling of SDXL
(CFGGuider) for adapter scale 0 (bit for bit); the same guider without the plugin for the
plugins (the result must change, and come back when the plugin is removed).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import comfy.controlnet
import comfy.samplers
import comfy.sd
import comfy.supported_models_base
import comfy.utils
import folder_paths
import nodes as comfy_nodes
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
from xa_runtime.models.branches import SD15Branch, SDXLBranch
from xa_runtime.testing.lora import write_random_lora
from xa_runtime.testing.plugins import write_tiny_controlnet

import comfy_tiny
from comfyui_xadapter.guider import (FeatureCapture, LatentPacking, ResidualInjector, XAdapterGuider,
                                     XAdapterInputError, sd15_capture_blocks, sdxl_inject_blocks)
from comfyui_xadapter.nodes import XAdapter, XAdapterGuiderNode, XAdapterLoader, XAdapterSampler, check_models

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def tiny():
    return comfy_tiny.build(0)


@pytest.fixture(scope="module")
def emb(tiny):
    return comfy_tiny.random_embeddings(tiny, batch=1)


def _xl_y(tiny, pooled: torch.Tensor, size: int) -> torch.Tensor:
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(pooled.shape[0], 1)
    emb = tiny.sdxl_model.model.embedder(time_ids.flatten()).reshape(pooled.shape[0], -1)
    return torch.cat([pooled, emb], dim=1), time_ids


# ------------------------------------------------------------------ features and injection
@torch.no_grad()
def test_features_equal_xa_runtime_sd15_branch(tiny, emb):
    dm = tiny.sd15_model.model.diffusion_model
    capture = FeatureCapture(sd15_capture_blocks(dm))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([321.0, 321.0])
    ctx = torch.cat([emb["prompt_embeds_sd15"], emb["negative_prompt_embeds_sd15"]])
    opts = {"patches": {"output_block_patch": [capture.output_block_patch]}, "cond_or_uncond": [0, 1]}
    handle = dm.out.register_forward_pre_hook(capture.out_pre_hook)
    try:
        eps = dm(x, timesteps=t, context=ctx, transformer_options=opts)
    finally:
        handle.remove()
    feats = capture.per_cond()
    branch = SD15Branch(tiny.sd15.unet)
    try:
        want_eps, want = branch(x, t, ctx)
    finally:
        branch.remove_hooks()
    torch.testing.assert_close(eps, want_eps, **TOL)
    for index in (0, 1):
        for got, ref in zip(feats[index], want):
            torch.testing.assert_close(got, ref[index:index + 1], **TOL)


@pytest.mark.parametrize("fusion", [None, 0.3])
@torch.no_grad()
def test_injection_equals_xa_runtime_sdxl_branch(tiny, emb, fusion):
    dm = tiny.sdxl_model.model.diffusion_model
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([654.0])
    widths = tiny.mapping.config.out_channels
    residuals = (torch.randn(1, widths[0], 4, 4), torch.randn(1, widths[1], 8, 8), torch.randn(1, widths[2], 16, 16))
    injector = ResidualInjector(sdxl_inject_blocks(dm), 0.7, fusion, {0: residuals})
    y, time_ids = _xl_y(tiny, emb["pooled_prompt_embeds"], 128)
    opts = {"patches": {"output_block_patch": [injector.output_block_patch]}, "cond_or_uncond": [0]}
    got = dm(x, timesteps=t, context=emb["prompt_embeds"], y=y, transformer_options=opts)
    branch = SDXLBranch(tiny.sdxl.unet)
    try:
        want = branch(x, t, emb["prompt_embeds"], {"text_embeds": emb["pooled_prompt_embeds"], "time_ids": time_ids},
                      residuals=residuals, adapter_condition_scale=0.7, fusion_guidance_scale=fusion)
    finally:
        branch.remove_hooks()
    torch.testing.assert_close(got, want, **TOL)
    plain = dm(x, timesteps=t, context=emb["prompt_embeds"], y=y, transformer_options={})
    assert (got - plain).abs().max() > 1e-3  # the injection did something


# ------------------------------------------------------------------ guider runs
_ADAPTERS: dict = {}


def _adapter(tiny) -> XAdapter:
    if id(tiny) not in _ADAPTERS:
        _ADAPTERS[id(tiny)] = XAdapter(tiny.mapping, "tiny")
    return _ADAPTERS[id(tiny)]


def _guider(tiny, emb, *, scale=1.0, fusion=0.0, sd15_model=None, sd15_cond=None, cfg=(5.0, 5.0), size=128):
    cond = comfy_tiny.conditioning(emb, size, size)
    if sd15_cond is not None:
        cond.update(sd15_cond)
    (guider,) = XAdapterGuiderNode().get_guider(
        sd15_model or tiny.sd15_model, cond["sd15_positive"], cond["sd15_negative"], tiny.sdxl_model,
        cond["sdxl_positive"], cond["sdxl_negative"], _adapter(tiny), scale, fusion, *cfg)
    return guider


def _sigmas(tiny, steps=6, start=0.5):
    sigmas = comfy.samplers.calculate_sigmas(tiny.sdxl_model.get_model_object("model_sampling"), "normal", steps)
    return sigmas[steps - int(steps * start):].clone()


def _latents(batch=1, xl=16, sd=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g) for s in [(batch, 4, xl, xl), (batch, 4, sd, sd),
                                                         (batch, 4, xl, xl), (batch, 4, sd, sd)])


def _run(guider, sampler="euler", sigmas=None, latents=None):
    lat_xl, lat_sd, noise_xl, noise_sd = latents
    packing = LatentPacking.check(lat_xl, lat_sd)
    guider.set_packing(packing)
    out = guider.sample(packing.pack(noise_xl, noise_sd), packing.pack(lat_xl, lat_sd),
                        comfy.samplers.sampler_object(sampler), sigmas.clone(), disable_pbar=True, seed=0)
    return packing.unpack(out)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
def test_adapter_scale_zero_is_plain_sdxl_bit_for_bit(tiny, emb, sampler):
    sigmas, latents = _sigmas(tiny), _latents()
    xl, _ = _run(_guider(tiny, emb, scale=0.0), sampler, sigmas, latents)
    cond = comfy_tiny.conditioning(emb, 128, 128)
    plain = comfy.samplers.CFGGuider(tiny.sdxl_model)
    plain.set_conds(cond["sdxl_positive"], cond["sdxl_negative"])
    plain.set_cfg(5.0)
    want = plain.sample(latents[2], latents[0], comfy.samplers.sampler_object(sampler), sigmas.clone(),
                        disable_pbar=True, seed=0)
    assert torch.equal(xl, want)
    with_adapter, _ = _run(_guider(tiny, emb, scale=1.0), sampler, sigmas, latents)
    assert (with_adapter - want).abs().max() > 1e-3


def _lora_model(tiny, tmp_path):
    path = write_random_lora(tmp_path / "lora.safetensors", tiny.sd15.unet, fmt="kohya", std=0.2)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    model, _ = comfy.sd.load_lora_for_models(tiny.sd15_model, None, lora, 1.0, 0.0)
    return model


def _controlnet_conds(tiny, emb, tmp_path, monkeypatch):
    _, file = write_tiny_controlnet(tmp_path / "cn", tiny.sd15.unet, seed=3)
    # ComfyUI's loader, with the tiny model's heads where it assumes SD's 64 channels per head
    monkeypatch.setattr(comfy.supported_models_base.BASE, "unet_extra_config", {"num_heads": 4, "num_head_channels": -1})
    control = comfy.controlnet.load_controlnet(str(file))
    assert isinstance(control, comfy.controlnet.ControlNet)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    cond = comfy_tiny.conditioning(emb, 128, 128)
    pos, neg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        cond["sd15_positive"], cond["sd15_negative"], control, image, 1.0, 0.0, 1.0)
    return {"sd15_positive": pos, "sd15_negative": neg}


def _attn2_patched(tiny):
    """An IP-Adapter-style patch: IP-Adapter nodes add image attention to attn2's output."""
    model = tiny.sd15_model.clone()
    model.set_model_attn2_output_patch(lambda out, extra: out + 0.5 * out.roll(1, dims=1))
    return model


@pytest.mark.parametrize("plugin", ["lora", "controlnet", "attn2_patch"])
def test_sd15_plugins_reach_sdxl_and_go_away(tiny, emb, tmp_path, monkeypatch, plugin):
    sigmas, latents = _sigmas(tiny, steps=4, start=0.75), _latents()
    base, base_sd = _run(_guider(tiny, emb), "euler", sigmas, latents)
    kwargs = {"lora": lambda: {"sd15_model": _lora_model(tiny, tmp_path)},
              "controlnet": lambda: {"sd15_cond": _controlnet_conds(tiny, emb, tmp_path, monkeypatch)},
              "attn2_patch": lambda: {"sd15_model": _attn2_patched(tiny)}}[plugin]()
    xl, sd = _run(_guider(tiny, emb, **kwargs), "euler", sigmas, latents)
    assert (sd - base_sd).abs().max() > 1e-3, "the plugin did not act on SD1.5"
    assert (xl - base).abs().max() > 1e-4, "the plugin on SD1.5 did not reach SDXL"
    again, again_sd = _run(_guider(tiny, emb), "euler", sigmas, latents)
    assert torch.equal(again, base) and torch.equal(again_sd, base_sd), "the plugin outlived its removal"


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "ddim", "lcm"])
def test_samplers_run_with_batch_and_odd_sizes(tiny, sampler):
    emb = comfy_tiny.random_embeddings(tiny, batch=2, seed=5)
    sigmas = _sigmas(tiny, steps=4, start=0.75)
    xl, sd = _run(_guider(tiny, emb, fusion=0.5), sampler, sigmas, _latents(batch=2, xl=16, sd=6))
    assert xl.shape == (2, 4, 16, 16) and sd.shape == (2, 4, 6, 6)
    assert torch.isfinite(xl).all() and torch.isfinite(sd).all()


def test_sampler_node_hand_over_and_sdxl_cfg_one(tiny, emb):
    guider = _guider(tiny, emb, cfg=(4.0, 1.0))
    sd15_latent = {"samples": torch.randn(1, 4, 8, 8)}
    sigmas = comfy.samplers.calculate_sigmas(tiny.sdxl_model.get_model_object("model_sampling"), "normal", 5)
    xl, sd = XAdapterSampler().sample(Noise_RandomNoise(7), guider, comfy.samplers.sampler_object("euler"), sigmas,
                                      sd15_latent, tiny.sd15_vae, tiny.sdxl_vae, 96, 128, 0.6)
    assert xl["samples"].shape == (1, 4, 16, 12) and sd["samples"].shape == (1, 4, 8, 8)
    assert torch.isfinite(xl["samples"]).all()


# ------------------------------------------------------------------ errors
def test_loader_reads_the_released_names_and_refuses_other_files(tiny, tmp_path, monkeypatch):
    folder = tmp_path / "xadapter"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tiny.mapping.state_dict().items()}, folder / "X_Adapter_v1.safetensors")
    torch.save(tiny.sd15.unet.state_dict(), folder / "not_an_adapter.bin")
    (folder / "broken.safetensors").write_bytes(b"\x00garbage")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "xadapter", ([str(folder)], {".bin", ".safetensors"}))
    (adapter,) = XAdapterLoader().load("X_Adapter_v1.safetensors", "fp32")
    for got, want in zip(adapter.mapping.state_dict().values(), tiny.mapping.state_dict().values()):
        assert torch.equal(got, want)
    for name in ("not_an_adapter.bin", "broken.safetensors"):
        with pytest.raises(XAdapterInputError, match=f"adapter_name: '{name}'"):
            XAdapterLoader().load(name, "fp32")


def test_models_of_the_wrong_family_are_named(tiny):
    adapter = _adapter(tiny)
    with pytest.raises(XAdapterInputError, match="sd15_model: .*SDXL"):
        check_models(tiny.sdxl_model, tiny.sdxl_model, adapter)
    with pytest.raises(XAdapterInputError, match="sdxl_model: X-Adapter needs an SDXL model"):
        check_models(tiny.sd15_model, tiny.sd15_model, adapter)
    from xa_runtime.models.mapping import MappingConfig, MappingLayers

    wide = XAdapter(MappingLayers(MappingConfig()), "X_Adapter_v1.bin")
    with pytest.raises(XAdapterInputError, match=r"xadapter: 'X_Adapter_v1.bin' maps features \(1280, 640, 320\)"):
        check_models(tiny.sd15_model, tiny.sdxl_model, wide)


def test_guider_refuses_unpacked_latents_and_bad_inputs(tiny, emb):
    guider = _guider(tiny, emb)
    with pytest.raises(XAdapterInputError, match="guider: .*X-Adapter Sampler"):
        guider.sample(torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16), comfy.samplers.sampler_object("euler"),
                      _sigmas(tiny), disable_pbar=True, seed=0)
    with pytest.raises(XAdapterInputError, match="sd15_latent has batch"):
        LatentPacking.check(torch.zeros(2, 4, 16, 16), torch.zeros(1, 4, 8, 8))
    assert XAdapterSampler.VALIDATE_INPUTS(width=1016) is True
    assert XAdapterSampler.VALIDATE_INPUTS(width=1020).startswith("width: 1020 is not a multiple of 8")
    assert XAdapterSampler.VALIDATE_INPUTS(height=16).startswith("height: 16")
    assert XAdapterSampler.VALIDATE_INPUTS(adapter_guidance_start=0.0).startswith("adapter_guidance_start: 0.0")
    with pytest.raises(XAdapterInputError, match="adapter_guidance_start"):
        XAdapterSampler().sample(Noise_RandomNoise(0), guider, comfy.samplers.sampler_object("euler"),
                                 _sigmas(tiny, steps=4, start=1.0), {"samples": torch.zeros(1, 4, 8, 8)},
                                 tiny.sd15_vae, tiny.sdxl_vae, 128, 128, 0.1)
    assert isinstance(guider, XAdapterGuider)
