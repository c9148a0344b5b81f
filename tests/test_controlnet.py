"""ControlNet on the SD1.5 branch: scale 0 = no ControlNet, the guidance window per stage
(stage 2 as the authors' pipeline), several ControlNets = a hand sum, guess mode against
diffusers' definition written out, the loaders (diffusers folder, original-layout single
file, a real-size config derived offline) and the built-in canny."""

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

from xa_runtime.errors import CheckpointError, ParameterError
from xa_runtime.loading.exact_state import build_empty
from xa_runtime.pipeline import XAdapterPipeline
from xa_runtime.plugins import PluginContext, StepInfo, merge_unet_kwargs
from xa_runtime.plugins.control_images import canny, control_image_tensor
from xa_runtime.plugins.controlnet import (
    ControlNetPlugin,
    build_tiny_controlnet,
    control_keep,
    controlnet_config_from_state,
    load_controlnet,
    load_controlnet_plugin,
)
from xa_runtime.testing import controlnet_to_original, write_tiny_controlnet

EXACT = dict(rtol=0, atol=0)
GEN = dict(num_inference_steps=4, adapter_guidance_start=0.5, seed=3, output_type="latent")


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return XAdapterPipeline(*tiny_models, progress=False)


@pytest.fixture(scope="module")
def controlnets(tiny_models):
    unet = tiny_models[0].unet
    return build_tiny_controlnet(unet, seed=0), build_tiny_controlnet(unet, seed=1)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 64, 64, generator=g), torch.rand(1, 3, 48, 80, generator=g)  # the second is resized


@pytest.fixture(scope="module")
def plain(pipe):
    return pipe("a cat", **GEN).images


def _ctx(cfg=True, batch=1, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = batch * (2 if cfg else 1)
    return PluginContext(batch=batch, cfg=cfg, device=torch.device("cpu"), dtype=torch.float32, height=64, width=64,
                         prompt_embeds=torch.randn(rows, 77, width, generator=g), generator=g)


class Recorder:
    """Passes a plugin through and records, per call, (stage, index, whether it returned residuals)."""

    def __init__(self, inner):
        self.inner, self.name, self.calls = inner, inner.name, []

    def prepare(self, ctx):
        self.inner.prepare(ctx)

    def unet_kwargs(self, ctx, step, sample):
        out = self.inner.unet_kwargs(ctx, step, sample)
        if out:
            assert all(r.abs().max() > 0 for r in out["down_block_additional_residuals"])
        self.calls.append((step.stage, step.index, bool(out)))
        return out


def test_scale_zero_equals_no_controlnet_and_scale_one_changes(pipe, controlnets, images, plain):
    zero = ControlNetPlugin(controlnets[0], images[0], conditioning_scale=0.0)
    torch.testing.assert_close(pipe("a cat", plugins=[zero], **GEN).images, plain, **EXACT)
    one = ControlNetPlugin(controlnets[0], images[0], conditioning_scale=1.0)
    assert (pipe("a cat", plugins=[one], **GEN).images - plain).abs().max() > 1e-3


@pytest.mark.parametrize("ags, stage2", [(1.0, [False, False, True, True]), (0.5, [False, True])])
def test_window_inactive_in_first_half_of_each_stage(pipe, controlnets, images, ags, stage2):
    rec = Recorder(ControlNetPlugin(controlnets[0], images[0], guidance_start=0.5, guidance_end=1.0))
    pipe("a cat", plugins=[rec], **{**GEN, "adapter_guidance_start": ags})
    stage1 = [False, False, True, True]
    # Each stage over its own steps: stage 2 has k = 4 * ags steps (the authors divide by n = 4).
    assert rec.calls == [("stage1", i, a) for i, a in enumerate(stage1)] + [("stage2", i, a) for i, a in enumerate(stage2)]
    assert [control_keep(i, 4, 0.5, 1.0) for i in range(4)] == [0.0, 0.0, 1.0, 1.0]
    assert [control_keep(i, 4, 0.0, 0.5) for i in range(4)] == [1.0, 1.0, 0.0, 0.0]


class HandSum:
    """Two ControlNets called directly and their residuals added by hand (diffusers'
    MultiControlNetModel), as one plugin."""

    name = "hand-sum"

    def __init__(self, nets, images, scales):
        self.nets, self.images, self.scales = nets, images, scales

    def prepare(self, ctx):
        self.conds = [control_image_tensor(im, "none", ctx.height, ctx.width, ctx.batch).repeat(2, 1, 1, 1)
                      for im in self.images]

    def unet_kwargs(self, ctx, step, sample):
        down, mid = None, None
        for net, cond, scale in zip(self.nets, self.conds, self.scales):
            d, m = net(sample, step.timestep, encoder_hidden_states=ctx.prompt_embeds, controlnet_cond=cond,
                       conditioning_scale=scale, return_dict=False)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def test_multi_controlnet_sums(pipe, controlnets, images, plain):
    plugins = [ControlNetPlugin(n, im, conditioning_scale=s) for n, im, s in zip(controlnets, images, (0.8, 1.3))]
    ctx = _ctx()
    for p in plugins:
        p.prepare(ctx)
    hand = HandSum(controlnets, images, (0.8, 1.3))
    hand.prepare(ctx)
    step = StepInfo("stage1", 0, 4, torch.tensor(901))
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    merged = merge_unet_kwargs([p.unet_kwargs(ctx, step, sample) for p in plugins])
    expected = hand.unet_kwargs(ctx, step, sample)
    for a, b in zip(merged["down_block_additional_residuals"], expected["down_block_additional_residuals"], strict=True):
        torch.testing.assert_close(a, b, **EXACT)
    torch.testing.assert_close(merged["mid_block_additional_residual"], expected["mid_block_additional_residual"], **EXACT)
    # and through the whole pipeline (both stages)
    both = pipe("a cat", plugins=plugins, **GEN).images
    torch.testing.assert_close(both, pipe("a cat", plugins=[HandSum(controlnets, images, (0.8, 1.3))], **GEN).images, **EXACT)
    assert (both - plain).abs().max() > 1e-3


def test_guess_mode_matches_diffusers_definition(controlnets, images):
    net, scale = controlnets[0], 0.7
    plugin = ControlNetPlugin(net, images[0], conditioning_scale=scale, guess_mode=True)
    ctx = _ctx(cfg=True)
    plugin.prepare(ctx)
    step = StepInfo("stage2", 1, 3, torch.tensor(501))
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    got = plugin.unet_kwargs(ctx, step, sample)
    # diffusers: ControlNet on the conditional half only, residual i x logspace(-1, 0, n+1)[i] x scale
    # (mid: the last factor), zeros for the unconditional half.
    down, mid = net(sample[1:], step.timestep, encoder_hidden_states=ctx.prompt_embeds[1:],
                    controlnet_cond=images[0], conditioning_scale=1.0, return_dict=False)
    factors = torch.logspace(-1, 0, len(down) + 1) * scale
    want_down = [torch.cat([torch.zeros_like(d), d * f]) for d, f in zip(down, factors)]
    want_mid = torch.cat([torch.zeros_like(mid), mid * factors[-1]])
    for a, b in zip(got["down_block_additional_residuals"], want_down, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["mid_block_additional_residual"], want_mid, rtol=1e-6, atol=1e-6)
    # without CFG the ControlNet sees all rows and nothing is zeroed
    ctx = _ctx(cfg=False)
    plugin.prepare(ctx)
    out = plugin.unet_kwargs(ctx, step, sample[1:])
    down, _ = net(sample[1:], step.timestep, encoder_hidden_states=ctx.prompt_embeds, controlnet_cond=images[0],
                  conditioning_scale=scale, guess_mode=True, return_dict=False)
    for a, b in zip(out["down_block_additional_residuals"], down, strict=True):
        torch.testing.assert_close(a, b, **EXACT)


def test_loaders_round_trip(tmp_path, tiny_models, pipe, plain):
    unet = tiny_models[0].unet
    folder, file = write_tiny_controlnet(tmp_path, unet, seed=0)
    reference = build_tiny_controlnet(unet, seed=0).state_dict()
    for loaded in (load_controlnet(folder), load_controlnet(file)):
        state = loaded.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], v) for k, v in reference.items())
    # a ControlNet 1.0 style file (control_model.* beside the SD weights) reads the same
    prefixed = {"control_model." + k: v for k, v in controlnet_to_original(build_tiny_controlnet(unet, 0)).items()}
    prefixed["model.diffusion_model.out.0.weight"] = torch.zeros(3)
    from safetensors.torch import save_file

    save_file(prefixed, tmp_path / "control_full.safetensors")
    assert torch.equal(load_controlnet(tmp_path / "control_full.safetensors").conv_in.weight, reference["conv_in.weight"])
    # end to end as the CLI does it: single file, a PNG path, canny, fitted to the UNet
    png = tmp_path / "control.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(png)
    plugin = load_controlnet_plugin(pipe.sd15.unet, file, str(png), control_type="canny", guidance_end=0.5)
    assert (pipe("a cat", plugins=[plugin], **GEN).images - plain).abs().max() > 1e-4


def test_single_file_config_real_size_offline():
    # A real-size SD1.5 ControlNet (lllyasviel's config), on the meta device: only shapes matter.
    real = build_empty(lambda: ControlNetModel(cross_attention_dim=768))
    config = controlnet_config_from_state(controlnet_to_original(real))
    for key in ("block_out_channels", "cross_attention_dim", "attention_head_dim", "layers_per_block",
                "conditioning_embedding_out_channels", "conditioning_channels", "down_block_types"):
        assert list(np.atleast_1d(config[key])) == list(np.atleast_1d(real.config[key])), key


def test_loader_errors(tmp_path, tiny_models):
    with pytest.raises(ParameterError, match="controlnet"):
        load_controlnet(tmp_path / "missing")
    _, file = write_tiny_controlnet(tmp_path, tiny_models[0].unet)
    from safetensors.torch import load_file, save_file

    state = load_file(file)
    del state["zero_convs.3.0.weight"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="zero_convs|controlnet_down_blocks.3"):
        load_controlnet(tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="no SD1.5 preset"):
        state = load_file(file)
        state["input_blocks.0.0.weight"] = torch.zeros(48, 4, 3, 3)
        save_file(state, tmp_path / "wide.safetensors")
        load_controlnet(tmp_path / "wide.safetensors")
    with pytest.raises(ParameterError, match="control_start"):
        ControlNetPlugin(None, None, guidance_start=0.6, guidance_end=0.5)


def test_canny_marks_only_the_square_border():
    a = np.zeros((64, 64), np.uint8)
    a[16:48, 16:48] = 255
    edges = canny(Image.fromarray(a))
    assert edges.shape == (1, 3, 64, 64) and set(edges.unique().tolist()) == {0.0, 1.0}
    e = edges[0, 0].bool()
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    # distance (in pixels, Chebyshev) to the square's border between rows/cols 15|16 and 47|48
    inside = torch.minimum(torch.minimum(yy - 15.5, 47.5 - yy), torch.minimum(xx - 15.5, 47.5 - xx))
    assert e[inside.abs() > 1].sum() == 0  # nothing away from the border
    for side in (e[14:18, 20:44].any(0), e[46:50, 20:44].any(0), e[20:44, 14:18].any(1), e[20:44, 46:50].any(1)):
        assert side.all()  # every side closed along its length
    assert canny(np.full((32, 32, 3), 200, np.uint8)).sum() == 0  # flat image: no edges
