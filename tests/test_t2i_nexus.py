"""T2I-Adapter (full, light) and Nexus Adapter (HetConv, plain) on the SD1.5 branch: scale 0 =
the plain pipeline, scale > 0 changes the SD1.5 features and the SDXL output, features
computed once per generation, the conditioning factor per stage, the loaders round-trip the
tiny files, and one Nexus stage against LayerNorm + cross-attention written out by hand."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import T2IAdapter

from xa_runtime.errors import CheckpointError, ParameterError
from xa_runtime.pipeline import XAdapterPipeline
from xa_runtime.plugins import PluginContext, StepInfo
from xa_runtime.plugins.controlnet import ControlNetPlugin, build_tiny_controlnet
from xa_runtime.plugins.nexus import (
    NexusAdapterPlugin,
    build_tiny_nexus,
    load_nexus_adapter,
    load_nexus_adapter_plugin,
)
from xa_runtime.plugins.t2i_adapter import (
    T2IAdapterPlugin,
    build_tiny_t2i_adapter,
    load_t2i_adapter,
    load_t2i_adapter_plugin,
)
from xa_runtime.testing import write_tiny_nexus, write_tiny_t2i_adapter

EXACT = dict(rtol=0, atol=0)
GEN = dict(num_inference_steps=4, adapter_guidance_start=0.5, seed=3, output_type="latent")
IMAGE = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return XAdapterPipeline(*tiny_models, progress=False)


def _run(pipe, plugins):
    """SDXL latents and the last SD1.5 decoder feature f2 (output of up_blocks[3]) seen in stage 2."""
    seen = []
    hook = pipe.sd15.unet.up_blocks[3].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        images = pipe("a cat", plugins=plugins, **GEN).images
    finally:
        hook.remove()
    return images, seen[-1]


@pytest.fixture(scope="module")
def plain(pipe):
    return _run(pipe, [])


def test_controlnet_t2i_and_nexus_together(pipe, plain, tiny_models):
    # ControlNet residuals (down_block_additional_residuals + mid) and adapter features
    # (down_intrablock_additional_residuals, summed over T2I and Nexus) reach one UNet call.
    unet = tiny_models[0].unet
    controlnet, t2i, nexus = build_tiny_controlnet(unet), build_tiny_t2i_adapter(unet), build_tiny_nexus(unet)

    def plugins(scale):
        return [ControlNetPlugin(controlnet, IMAGE, conditioning_scale=scale), T2IAdapterPlugin(t2i, IMAGE, scale),
                NexusAdapterPlugin(nexus, IMAGE, scale)]

    images, f2 = _run(pipe, plugins(0.0))
    torch.testing.assert_close(images, plain[0], **EXACT)
    torch.testing.assert_close(f2, plain[1], **EXACT)
    together = _run(pipe, plugins(1.0))[0]
    for alone in plugins(1.0):
        assert (together - _run(pipe, [alone])[0]).abs().max() > 1e-3


def _adapters(unet):
    return {
        "t2i-full": lambda s: T2IAdapterPlugin(build_tiny_t2i_adapter(unet, "full_adapter"), IMAGE, s),
        "t2i-light": lambda s: T2IAdapterPlugin(build_tiny_t2i_adapter(unet, "light_adapter"), IMAGE, s),
        "nexus-hetconv": lambda s: NexusAdapterPlugin(build_tiny_nexus(unet, hetconv=True), IMAGE, s),
        "nexus-plain": lambda s: NexusAdapterPlugin(build_tiny_nexus(unet, hetconv=False), IMAGE, s),
    }


@pytest.mark.parametrize("kind", ["t2i-full", "t2i-light", "nexus-hetconv", "nexus-plain"])
def test_scale_zero_is_plain_and_scale_changes_features_and_output(pipe, plain, tiny_models, kind):
    make = _adapters(tiny_models[0].unet)[kind]
    zero_images, zero_f2 = _run(pipe, [make(0.0)])
    torch.testing.assert_close(zero_images, plain[0], **EXACT)
    torch.testing.assert_close(zero_f2, plain[1], **EXACT)
    images, f2 = _run(pipe, [make(1.0)])
    assert (f2 - plain[1]).abs().max() > 1e-3
    assert (images - plain[0]).abs().max() > 1e-3


class Counting:
    """Counts adapter forwards (they must happen once per generation, in prepare)."""

    def __init__(self, inner):
        self.inner, self.name, self.calls, self.given = inner, inner.name, [], 0
        forward = inner.adapter.forward

        def counted(*args, **kwargs):
            self.given += 1
            return forward(*args, **kwargs)

        inner.adapter.forward = counted

    def prepare(self, ctx):
        self.inner.prepare(ctx)

    def unet_kwargs(self, ctx, step, sample):
        out = self.inner.unet_kwargs(ctx, step, sample)
        self.calls.append((step.stage, step.index, bool(out)))
        return out


def test_features_once_per_generation_and_conditioning_factor(pipe, tiny_models):
    adapter = build_tiny_t2i_adapter(tiny_models[0].unet)
    rec = Counting(T2IAdapterPlugin(adapter, IMAGE, 1.0, adapter_conditioning_factor=0.5))
    pipe("a cat", plugins=[rec], **{**GEN, "adapter_guidance_start": 0.75})  # 4 + 3 steps
    assert rec.given == 1
    # diffusers: active while i < int(n * factor), n = this stage's steps
    assert rec.calls == [("stage1", i, i < 2) for i in range(4)] + [("stage2", i, i < 1) for i in range(3)]


def _ctx(cfg, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PluginContext(batch=batch, cfg=cfg, device=torch.device("cpu"), dtype=torch.float32, height=64, width=64,
                         prompt_embeds=torch.randn(batch * (2 if cfg else 1), 77, 32, generator=g), generator=g)


def test_features_scaled_and_duplicated_for_cfg(tiny_models):
    unet = tiny_models[0].unet
    t2i = build_tiny_t2i_adapter(unet, "light_adapter")
    plugin = T2IAdapterPlugin(t2i, IMAGE, adapter_conditioning_scale=0.6)
    plugin.prepare(_ctx(cfg=True, batch=2))
    got = plugin.unet_kwargs(_ctx(True, 2), StepInfo("stage1", 0, 4, torch.tensor(1)), torch.zeros(4, 4, 8, 8))
    want = [f * 0.6 for f in t2i(IMAGE.expand(2, -1, -1, -1))]
    for g, w in zip(got["down_intrablock_additional_residuals"], want, strict=True):
        torch.testing.assert_close(g, torch.cat([w, w]), rtol=1e-6, atol=1e-6)
    # a 1-channel adapter (sketch/canny T2I-Adapters) gets the luminance
    grey = T2IAdapter(in_channels=1, channels=[32, 64, 128, 128], num_res_blocks=1)
    plugin = T2IAdapterPlugin(grey, IMAGE)
    plugin.prepare(_ctx(cfg=False))
    luma = 0.299 * IMAGE[:, :1] + 0.587 * IMAGE[:, 1:2] + 0.114 * IMAGE[:, 2:]
    torch.testing.assert_close(plugin._features[0], grey(luma)[0], rtol=1e-5, atol=1e-5)
    # Nexus: the positive (second) half of the prompt embeddings only
    nexus = build_tiny_nexus(unet)
    ctx = _ctx(cfg=True)
    plugin = NexusAdapterPlugin(nexus, IMAGE, scale=2.0)
    plugin.prepare(ctx)
    got = plugin.unet_kwargs(ctx, StepInfo("stage2", 0, 2, torch.tensor(1)), torch.zeros(2, 4, 8, 8))
    want = [f * 2.0 for f in nexus(IMAGE, ctx.prompt_embeds[1:])]
    for g, w in zip(got["down_intrablock_additional_residuals"], want, strict=True):
        torch.testing.assert_close(g, torch.cat([w, w]), rtol=1e-6, atol=1e-6)


def test_with_image_equals_a_plugin_built_on_that_image(tiny_models):
    """xa-serve's per-request images: with_image keeps the model and settings, drops the cached
    features of the old image, and leaves the original plugin as it was."""
    unet = tiny_models[0].unet
    other = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    t2i = build_tiny_t2i_adapter(unet, "full_adapter")
    controlnet = build_tiny_controlnet(unet)
    step = StepInfo("stage1", 0, 4, torch.tensor(1))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for make in (lambda im: T2IAdapterPlugin(t2i, im, 0.7), lambda im: ControlNetPlugin(controlnet, im, 0.8)):
        base = make(IMAGE)
        base.prepare(_ctx(cfg=True))
        before = base.unet_kwargs(_ctx(True), step, x)
        swapped, direct = base.with_image(other), make(other)
        for p in (swapped, direct):
            p.prepare(_ctx(cfg=True))
        got, want = swapped.unet_kwargs(_ctx(True), step, x), direct.unet_kwargs(_ctx(True), step, x)
        for key in want:
            for g, w in zip(torch.utils._pytree.tree_leaves(got[key]), torch.utils._pytree.tree_leaves(want[key])):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
        again = base.unet_kwargs(_ctx(True), step, x)
        for key in before:
            for a, b in zip(torch.utils._pytree.tree_leaves(again[key]), torch.utils._pytree.tree_leaves(before[key])):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert swapped.image is other and base.image is IMAGE


@pytest.mark.parametrize("hetconv", [True, False])
def test_nexus_stage_against_written_out_reference(tiny_models, hetconv):
    nexus = build_tiny_nexus(tiny_models[0].unet, hetconv=hetconv, seed=4)
    image, text = IMAGE.repeat(2, 1, 1, 1) * torch.tensor([1.0, 0.5])[:, None, None, None], torch.randn(2, 7, 32)
    got = nexus(image, text)[0]
    stage = nexus.body[0]
    x = F.conv2d(F.pixel_unshuffle(image, 8), nexus.conv_in.weight, nexus.conv_in.bias, padding=1)
    for block in stage.resnets:
        if hetconv:
            conv = block.block1
            h = (F.conv2d(x, conv.gwc.weight, conv.gwc.bias, padding=1, groups=nexus.config.groups)
                 + F.conv2d(x, conv.pwc.weight, conv.pwc.bias))
        else:
            h = F.conv2d(x, block.block1.weight, block.block1.bias, padding=1)
        x = x + F.conv2d(torch.relu(h), block.block2.weight, block.block2.bias)
    b, c, hh, ww = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    mean, var = tokens.mean(-1, keepdim=True), tokens.var(-1, unbiased=False, keepdim=True)
    normed = (tokens - mean) / torch.sqrt(var + 1e-5) * stage.norm.weight + stage.norm.bias
    attn, heads = stage.attn, nexus.config.attention_heads
    q, k, v = normed @ attn.to_q.weight.T, text @ attn.to_k.weight.T, text @ attn.to_v.weight.T

    def split(t):  # B x n x (heads * d) -> B x heads x n x d
        return t.reshape(b, t.shape[1], heads, -1).transpose(1, 2)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / nexus.config.attention_head_dim**0.5, dim=-1)
    mixed = (weights @ split(v)).transpose(1, 2).reshape(b, hh * ww, -1)
    out = tokens + mixed @ attn.to_out[0].weight.T + attn.to_out[0].bias
    torch.testing.assert_close(got, out.transpose(1, 2).reshape(b, c, hh, ww), rtol=1e-5, atol=1e-5)


def test_t2i_loaders_round_trip(tmp_path, tiny_models, pipe):
    unet = tiny_models[0].unet
    for kind in ("full_adapter", "light_adapter"):
        folder = write_tiny_t2i_adapter(tmp_path / kind, unet, kind, seed=2)
        loaded, ref = load_t2i_adapter(folder).state_dict(), build_tiny_t2i_adapter(unet, kind, seed=2).state_dict()
        assert loaded.keys() == ref.keys() and all(torch.equal(loaded[k], v) for k, v in ref.items())
        plugin = load_t2i_adapter_plugin(pipe.sd15.unet, folder, IMAGE, scale=0.5)
        assert plugin.scale == 0.5
    config = json.loads((tmp_path / "full_adapter" / "config.json").read_text())
    (tmp_path / "xl").mkdir()
    (tmp_path / "xl" / "config.json").write_text(json.dumps({**config, "adapter_type": "full_adapter_xl"}))
    with pytest.raises(CheckpointError, match="full_adapter_xl"):
        load_t2i_adapter(tmp_path / "xl")
    with pytest.raises(ParameterError, match="t2i_adapter"):
        load_t2i_adapter(tmp_path / "missing")


@pytest.mark.parametrize("hetconv, bias, fmt", [(True, False, "safetensors"), (True, True, "bin"), (False, False, "bin")])
def test_nexus_loader_round_trip_and_layout_by_keys(tmp_path, tiny_models, pipe, hetconv, bias, fmt):
    unet = tiny_models[0].unet
    folder = write_tiny_nexus(tmp_path / "nexus", unet, hetconv=hetconv, groups=4, seed=3, weights_format=fmt,
                              hetconv_bias=bias)
    loaded = load_nexus_adapter(folder)
    ref = build_tiny_nexus(unet, hetconv=hetconv, groups=4, seed=3, hetconv_bias=bias)
    assert loaded.config == ref.config and loaded.config.hetconv is hetconv and loaded.config.hetconv_bias is bias
    assert loaded.state_dict().keys() == ref.state_dict().keys()
    assert ("body.0.resnets.0.block1.gwc.bias" in ref.state_dict()) is bias
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.state_dict().items())
    # the plain layout's config still says groups=4 (HetConv configured, plain convs saved)
    assert json.loads((folder / "config.json").read_text())["groups"] == 4
    plugin = load_nexus_adapter_plugin(pipe.sd15.unet, folder, IMAGE, scale=0.3)
    assert plugin.scale == 0.3 and plugin.adapter.config.hetconv is hetconv


def test_nexus_attention_sizes_from_weights(tmp_path, tiny_models):
    folder = write_tiny_nexus(tmp_path / "n", tiny_models[0].unet)
    config = json.loads((folder / "config.json").read_text())
    want = load_nexus_adapter(folder).config

    def load_with(**changes):
        raw = {k: v for k, v in {**config, **changes}.items() if v is not None}
        (folder / "config.json").write_text(json.dumps(raw))
        return load_nexus_adapter(folder).config

    # text width read from to_k, head size (or count) from to_q and the other
    assert load_with(cross_attention_dim=None, attention_head_dim=None) == want
    assert load_with(attention_heads=None) == want
    with pytest.raises(CheckpointError, match="multiple of 64"):  # 2 x 16 = 32 wide: the head size is ambiguous
        load_with(attention_heads=None, attention_head_dim=None)
    with pytest.raises(CheckpointError, match="attention_heads=4"):
        load_with(attention_heads=4)


def test_nexus_loader_errors(tmp_path, tiny_models):
    folder = write_tiny_nexus(tmp_path / "het", tiny_models[0].unet, hetconv=True, groups=4)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "groups": 2}))
    with pytest.raises(CheckpointError, match="groups=2"):
        load_nexus_adapter(folder)
    (folder / "config.json").write_text(json.dumps({**config, "channels": [32, 64, 128, 256]}))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_nexus_adapter(folder)
    (folder / "config.json").write_text(json.dumps({**config, "adapter_type": "light_adapter"}))
    with pytest.raises(CheckpointError, match="adapter_type"):
        load_nexus_adapter(folder)
    with pytest.raises(ParameterError, match="nexus_adapter"):
        load_nexus_adapter(tmp_path / "missing")
    with pytest.raises(ParameterError, match="nexus_scale"):
        NexusAdapterPlugin(build_tiny_nexus(tiny_models[0].unet), IMAGE, scale=float("nan"))
