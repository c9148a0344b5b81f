"""IP-Adapter on onnxruntime: the sd15_unet_ip graph (tiny models, CPU, fp32) against the torch
SD1.5 UNet with the IP-Adapter installed and fed `added_cond_kwargs["image_embeds"]`, the
per-layer scale input against InstantStyle's per-block dict, and the whole pipeline with an
IPAdapterPlugin on the onnxruntime backend against the torch pipeline.

Tolerance: fp32 graph outputs agree with torch to ~1e-6 of their largest magnitude; the tests
allow rtol 1e-4 and atol 1e-4 x max|torch| (as tests/test_export.py and
tests/test_onnxruntime_backend.py do).
"""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from xa_runtime.export import ModuleBundle, export_graph
from xa_runtime.models.branches import SD15Branch
from xa_runtime.pipeline import XAdapterPipeline
from xa_runtime.plugins.controlnet import ControlNetPlugin
from xa_runtime.plugins.ip_adapter import IPAdapter, IPAdapterPlugin, ip_layer_scales, ip_tokens
from xa_runtime.plugins.ip_adapter_image import load_image_encoder
from xa_runtime.plugins.ip_adapter_loading import tiny_ip_adapter_state
from xa_runtime.testing import write_tiny_image_encoder
from xa_runtime.graphs import GRAPHS
from xa_runtime.runtime.backends.onnxruntime import GraphSession, OnnxRuntimeBackend

GEN = dict(num_inference_steps=4, adapter_guidance_start=0.5, seed=3, output_type="latent")


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@contextlib.contextmanager
def installed(unet, state):
    adapter = IPAdapter(unet, state)
    try:
        yield adapter
    finally:
        adapter.unload()


def _inputs(b, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, h, w, generator=g), torch.rand(b, generator=g) * 999, torch.randn(b, 77, 32, generator=g)


def _compare_graph(session, unet, x, t, text, embeds):
    """The graph on the projected tokens and the layer scales vs the torch UNet on the raw embeddings."""
    branch = SD15Branch(unet)
    try:
        with torch.no_grad():
            eps, feats = branch(x, t, text, added_cond_kwargs={"image_embeds": [embeds]})
            stock_eps = unet(x, t, text, added_cond_kwargs={"image_embeds": [embeds * 0]}).sample
    finally:
        branch.remove_hooks()
    tokens, scales = ip_tokens(unet, [embeds]), ip_layer_scales(unet)
    out = session(x, t, text, tokens, scales)
    for o, r in zip(out, (eps, *feats), strict=True):
        _close(o, r)
    return tokens, scales, (eps - stock_eps).abs().max()


def test_ip_graph_equals_torch_unet_plain(tiny_onnx):
    """Plain IP-Adapter (4 tokens per image): 1 image at B=2, 16x16 (N=4) and 2 images at B=3,
    32x16 (N=8), one scale for all layers."""
    bundle, folder = tiny_onnx
    session = GraphSession(GRAPHS["sd15_unet_ip"], folder / "sd15_unet_ip.onnx")
    with installed(bundle.sd15.unet, bundle.ip_adapter) as adapter:
        adapter.set_scale(0.6)
        for b, h, w, images, n in ((2, 16, 16, 1, 4), (3, 32, 16, 2, 8)):
            embeds = torch.randn(b, images, 32, generator=torch.Generator().manual_seed(b))
            tokens, scales, acts = _compare_graph(session, bundle.sd15.unet, *_inputs(b, h, w, b), embeds)
            assert tokens.shape == (b, n, 32) and torch.equal(scales, torch.full((16,), 0.6))
            assert acts > 1e-3  # the image prompt changes eps
    assert bundle.sd15.unet.encoder_hid_proj is None  # unloaded: the stock UNet again


def test_ip_graph_scale_vector_is_instantstyle(tiny_onnx):
    """A per-block dict (InstantStyle: only up_blocks.1.attentions.1) gives a vector with zeros
    for the other 15 layers; the graph with it equals torch with the dict, and differs from
    the same vector all ones."""
    bundle, folder = tiny_onnx
    session = GraphSession(GRAPHS["sd15_unet_ip"], folder / "sd15_unet_ip.onnx")
    unet = bundle.sd15.unet
    with installed(unet, bundle.ip_adapter) as adapter:
        adapter.set_scale({"up": {"block_1": [0.0, 1.5, 0.0]}})
        names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
        want = torch.tensor([1.5 if n.startswith("up_blocks.1.attentions.1.") else 0.0 for n in names])
        x, t, text = _inputs(2, 16, 24, 7)
        embeds = torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(7))
        tokens, scales, _ = _compare_graph(session, unet, x, t, text, embeds)
        assert torch.equal(scales, want) and int((scales == 0).sum()) == 15
        assert (session(x, t, text, tokens, torch.ones(16))[0] - session(x, t, text, tokens, scales)[0]).abs().max() > 1e-3


def test_ip_graph_plus_variant_16_tokens(tiny_onnx, tmp_path):
    """A "plus" IP-Adapter (Resampler, 16 tokens per image; another file, so its own graph):
    the raw CLIP hidden states are projected in torch, N=16 goes into the graph."""
    bundle, _ = tiny_onnx
    state = tiny_ip_adapter_state(bundle.sd15.unet, "plus", num_tokens=16, seed=9)
    path = export_graph("sd15_unet_ip", ModuleBundle(sd15=bundle.sd15, ip_adapter=state), tmp_path / "sd15_unet_ip.onnx")
    session = GraphSession(GRAPHS["sd15_unet_ip"], path)
    with installed(bundle.sd15.unet, state) as adapter:
        adapter.set_scale(0.8)
        embeds = torch.randn(2, 1, 5, 32, generator=torch.Generator().manual_seed(4))  # rows x images x CLIP tokens x width
        tokens, _, acts = _compare_graph(session, bundle.sd15.unet, *_inputs(2, 16, 16, 4), embeds)
        assert tokens.shape == (2, 16, 32) and acts > 1e-3


@pytest.fixture(scope="module")
def ip_plugin(tiny_onnx, tmp_path_factory):
    bundle, _ = tiny_onnx
    encoder = load_image_encoder(write_tiny_image_encoder(tmp_path_factory.mktemp("ip") / "image_encoder"))
    image = Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype(np.uint8))
    adapter = IPAdapter(bundle.sd15.unet, bundle.ip_adapter)
    adapter.suspend()  # on only inside the tests that use it (the bundle's UNet is shared)
    yield IPAdapterPlugin(adapter, encoder, image, scale=0.8)
    adapter.unload()


def test_pipeline_with_ip_adapter_on_onnxruntime_equals_torch(tiny_onnx, ip_plugin):
    bundle, folder = tiny_onnx
    pipe = XAdapterPipeline(bundle.sd15, bundle.sdxl, bundle.mapping, progress=False)
    ort_pipe = pipe.with_backend(OnnxRuntimeBackend(folder))
    plain = pipe("a cat", **GEN).images
    ip_plugin.adapter.resume()
    try:
        ref = pipe("a cat", plugins=[ip_plugin], **GEN).images
        _close(ort_pipe("a cat", plugins=[ip_plugin], **GEN).images, ref)
        assert (ref - plain).abs().max() > 1e-3  # the image prompt acts
        control = ControlNetPlugin(bundle.controlnet, torch.rand(1, 3, 64, 64), conditioning_scale=1.0)
        with pytest.raises(ValueError, match="no graph takes both"):
            ort_pipe("a cat", plugins=[ip_plugin, control], **dict(GEN, num_inference_steps=2))
    finally:
        ip_plugin.adapter.suspend()
    with pytest.raises(ValueError, match="no IP-Adapter is active"):  # suspended: nothing to project with
        ort_pipe.sd15_branch(*_inputs(2, 8, 8, 0), added_cond_kwargs={"image_embeds": [torch.zeros(2, 1, 32)]})
    with pytest.raises(ValueError, match="no torch SD1.5 UNet is attached"):
        OnnxRuntimeBackend(folder).sd15_branch(*_inputs(2, 8, 8, 0), added_cond_kwargs={"image_embeds": [torch.zeros(2, 1, 32)]})
