"""IP-Adapter on the SD1.5 branch: file layouts (.bin/.safetensors, plain/plus), the installed
attention against a written-out decoupled cross-attention computed from the raw file tensors,
CLIP preprocessing against transformers' CLIPImageProcessor, the pipeline (scale 0 = plain,
scale > 0 changes SD1.5 features and SDXL output, unload = bit-identical) and the errors."""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xa_runtime.errors import CheckpointError, ParameterError
from xa_runtime.models import MappingConfig, MappingLayers, build_random_components
from xa_runtime.pipeline import XAdapterPipeline
from xa_runtime.plugins import PluginContext, StepInfo
from xa_runtime.plugins.ip_adapter import (
    IPAdapterPlugin,
    default_image_encoder_path,
    load_ip_adapter,
    load_ip_adapter_plugin,
)
from xa_runtime.plugins.ip_adapter_image import load_image_encoder, preprocess_clip_images
from xa_runtime.plugins.ip_adapter_loading import (
    read_ip_adapter_file,
    save_ip_adapter,
    tiny_ip_adapter_state,
)
from xa_runtime.testing import write_tiny_image_encoder, write_tiny_ip_adapter

EXACT = dict(rtol=0, atol=0)
CLOSE = dict(rtol=1e-5, atol=1e-5)
GEN = dict(num_inference_steps=4, adapter_guidance_start=0.5, seed=5, output_type="latent")


@pytest.fixture(scope="module")
def models():
    sd15, sdxl = build_random_components("tiny-sd15", 10), build_random_components("tiny-sdxl", 11)
    torch.manual_seed(12)
    mapping = MappingLayers(MappingConfig.from_unet_configs(sd15.unet.config, sdxl.unet.config))
    for p in mapping.zero_out.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return sd15, sdxl, mapping.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ip")
    encoder_dir = write_tiny_image_encoder(root / "image_encoder")
    paths = {v: write_tiny_ip_adapter(root / "models", models[0].unet, v) for v in ("plain", "plus", "full")}
    return root, encoder_dir, paths


@pytest.fixture(scope="module")
def encoder(files):
    return load_image_encoder(files[1])


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype(np.uint8))


@contextlib.contextmanager
def installed(path, unet):
    adapter = load_ip_adapter(path, unet)
    try:
        yield adapter
    finally:
        if adapter.loaded:
            adapter.unload()


def _ctx(batch, cfg, emb):
    return PluginContext(batch=batch, cfg=cfg, device=torch.device("cpu"), dtype=torch.float32, height=64, width=64,
                         prompt_embeds=emb, generator=torch.Generator())


# ---------------------------------------------------------------- written-out references
def _ln(t, sd, p):
    return F.layer_norm(t, t.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"])


def reference_image_tokens(sd, embeds, variant):
    """The released projections, from the file's own tensors: plain = LayerNorm(linear) into 4
    tokens; full = Linear, GELU, Linear, LayerNorm per CLIP token; plus = the Perceiver
    Resampler (dim_head 64, attention over [image; latents])."""
    if variant == "plain":
        width = sd["norm.weight"].shape[0]
        return _ln((embeds @ sd["proj.weight"].T + sd["proj.bias"]).unflatten(-1, (-1, width)), sd, "norm")
    if variant == "full":
        h = F.gelu(embeds @ sd["proj.0.weight"].T + sd["proj.0.bias"])
        return _ln(h @ sd["proj.2.weight"].T + sd["proj.2.bias"], sd, "proj.3")
    x = embeds @ sd["proj_in.weight"].T + sd["proj_in.bias"]
    lat = sd["latents"].expand(x.shape[0], -1, -1)
    for n in range(4):
        a, f = f"layers.{n}.0", f"layers.{n}.1"
        xn, ln = _ln(x, sd, f"{a}.norm1"), _ln(lat, sd, f"{a}.norm2")
        q = ln @ sd[f"{a}.to_q.weight"].T
        k, v = (torch.cat([xn, ln], 1) @ sd[f"{a}.to_kv.weight"].T).chunk(2, -1)
        heads = q.shape[-1] // 64
        q, k, v = (t.unflatten(-1, (heads, 64)).transpose(1, 2) for t in (q, k, v))
        out = torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1) @ v
        lat = out.transpose(1, 2).flatten(2) @ sd[f"{a}.to_out.weight"].T + lat
        lat = F.gelu(_ln(lat, sd, f"{f}.0") @ sd[f"{f}.1.weight"].T) @ sd[f"{f}.3.weight"].T + lat
    return _ln(lat @ sd["proj_out.weight"].T + sd["proj_out.bias"], sd, "norm_out")


def reference_attention(attn, x, text, tokens, w_k_ip, w_v_ip, scale):
    """softmax(Q K^T / sqrt(d)) V + scale * softmax(Q K_ip^T / sqrt(d)) V_ip, then the output projection."""
    heads = attn.heads

    def split(t):
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)

    q = split(x @ attn.to_q.weight.T)
    k, v = split(text @ attn.to_k.weight.T), split(text @ attn.to_v.weight.T)
    k_ip, v_ip = split(tokens @ w_k_ip.T), split(tokens @ w_v_ip.T)
    d = q.shape[-1] ** 0.5
    out = torch.softmax(q @ k.transpose(-1, -2) / d, -1) @ v + scale * torch.softmax(q @ k_ip.transpose(-1, -2) / d, -1) @ v_ip
    return out.transpose(1, 2).flatten(2) @ attn.to_out[0].weight.T + attn.to_out[0].bias


# ---------------------------------------------------------------- files
@pytest.mark.parametrize("variant", ["plain", "plus", "full"])
def test_layouts_load_from_bin_and_safetensors(models, files, variant):
    unet = models[0].unet
    paths = files[2][variant]
    stem = {"plain": "ip-adapter_sd15", "plus": "ip-adapter-plus_sd15", "full": "ip-adapter-full-face_sd15"}[variant]
    assert [p.name for p in paths.values()] == [f"{stem}.bin", f"{stem}.safetensors"]
    from_bin, from_st = read_ip_adapter_file(paths["bin"]), read_ip_adapter_file(paths["safetensors"])
    assert set(from_bin["ip_adapter"]) == {f"{i}.to_{kv}_ip.weight" for i in range(1, 32, 2) for kv in "kv"}
    for part in ("image_proj", "ip_adapter"):
        assert from_bin[part].keys() == from_st[part].keys()
        for key in from_bin[part]:
            torch.testing.assert_close(from_bin[part][key], from_st[part][key], **EXACT)
    before = dict(unet.attn_processors)
    for path in paths.values():
        with installed(path, unet) as adapter:
            tokens = None if variant == "full" else 4
            assert (adapter.variant, adapter.image_embed_dim, adapter.num_tokens) == (variant, 32, tokens)
            procs = unet.attn_processors
            assert all(procs[n] is p for n, p in before.items() if "attn1" in n)  # self-attention untouched
            assert all(type(procs[n]).__name__ == "IPAdapterAttnProcessor2_0" for n in before if "attn2" in n)
        assert unet.attn_processors == before and unet.encoder_hid_proj is None
        assert unet.config.encoder_hid_dim_type is None


@pytest.mark.parametrize("variant", ["plain", "plus", "full"])
def test_attention_equals_written_out_decoupled_cross_attention(models, files, encoder, image, variant):
    unet = models[0].unet
    path = files[2][variant]["safetensors"]
    raw = read_ip_adapter_file(path)
    names = list(unet.attn_processors)
    layer = "up_blocks.3.attentions.1.transformer_blocks.0.attn2"
    key = names.index(f"{layer}.processor")  # the file's layer index: position among all processors
    g = torch.Generator().manual_seed(1)
    cond, _ = encoder.encode([image], hidden_states=variant != "plain", device=torch.device("cpu"), dtype=torch.float32)
    embeds = torch.cat([cond, cond * 0.5])[:, None]  # 2 rows x 1 image x ...
    with installed(path, unet) as adapter, torch.no_grad():
        tokens = unet.encoder_hid_proj([embeds])[0]  # 2 x 1 x tokens x 32
        expected_tokens = reference_image_tokens(raw["image_proj"], embeds[:, 0], variant)
        torch.testing.assert_close(tokens[:, 0], expected_tokens, **CLOSE)
        adapter.set_scale(0.7)
        attn = unet.get_submodule(layer)
        x, text = torch.randn(2, 16, attn.to_q.in_features, generator=g), torch.randn(2, 77, 32, generator=g)
        got = attn(x, encoder_hidden_states=(text, [tokens]))
        ip = raw["ip_adapter"]
        want = reference_attention(attn, x, text, expected_tokens, ip[f"{key}.to_k_ip.weight"], ip[f"{key}.to_v_ip.weight"], 0.7)
        torch.testing.assert_close(got, want, **CLOSE)
        adapter.set_scale({"up": {"block_3": [0.0, 0.3, 0.0]}})  # InstantStyle-style per-block dict
        scales = {n: p.scale for n, p in unet.attn_processors.items() if "attn2" in n}
        assert scales[f"{layer}.processor"] == [0.3]
        assert sum(s != [0.0] for s in scales.values()) == 1


def test_preprocessing_matches_clip_image_processor(files):
    from transformers import CLIPImageProcessorPil

    reference = CLIPImageProcessorPil.from_pretrained(str(files[1]), local_files_only=True)
    spec = load_image_encoder(files[1]).preprocess
    rng = np.random.RandomState(3)
    images = [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in ((40, 57), (75, 33), (32, 32), (20, 24))]
    for im in images:
        want = torch.from_numpy(np.asarray(reference(im, return_tensors="np").pixel_values))
        torch.testing.assert_close(preprocess_clip_images([im], spec), want.float(), **CLOSE)


def test_embeddings_once_per_generation_in_uncond_cond_order(models, files, encoder, image):
    from transformers import CLIPImageProcessorPil

    unet = models[0].unet
    pixels = torch.from_numpy(CLIPImageProcessorPil.from_pretrained(str(files[1]))(image, return_tensors="np").pixel_values)
    for variant in ("plain", "plus"):
        with installed(files[2][variant]["bin"], unet) as adapter, torch.no_grad():
            plugin = IPAdapterPlugin(adapter, encoder.model, image, scale=0.5)  # a bare CLIP model works too
            calls = []
            hook = plugin.encoder.model.register_forward_hook(lambda *a, calls=calls: calls.append(1))
            try:
                ctx = _ctx(batch=2, cfg=True, emb=torch.zeros(4, 77, 32))
                plugin.prepare(ctx)
                got = plugin.unet_kwargs(ctx, StepInfo("stage1", 0, 4, torch.tensor(1)), torch.zeros(4, 4, 8, 8))
                plugin.prepare(_ctx(batch=1, cfg=False, emb=torch.zeros(1, 77, 32)))
            finally:
                hook.remove()
            assert len(calls) == 1  # one encoder forward (image and zero image batched), cached after
            (embeds,) = got["added_cond_kwargs"]["image_embeds"]
            if variant == "plain":
                cond = encoder.model(pixel_values=pixels).image_embeds
                uncond = torch.zeros_like(cond)
            else:
                hidden = [encoder.model(pixel_values=p, output_hidden_states=True).hidden_states[-2] for p in (pixels, pixels * 0)]
                cond, uncond = hidden
            assert embeds.shape == (4, 1) + tuple(cond.shape[1:])
            for row, want in enumerate((uncond, uncond, cond, cond)):
                torch.testing.assert_close(embeds[row], want, **CLOSE)
            assert all(p.scale == [0.5] for n, p in unet.attn_processors.items() if "attn2" in n)


# ---------------------------------------------------------------- the pipeline
@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_pipeline_scale_zero_equals_plain_and_unload_restores(models, files, encoder, image, variant):
    sd15, sdxl, mapping = models
    pipe = XAdapterPipeline(sd15, sdxl, mapping, progress=False)
    prompts = ["a cat", "a dog"]
    plain = pipe(prompts, **GEN).images
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, emb = torch.tensor(700), torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, base_feats = pipe.sd15_branch(x, t, emb)
    with installed(files[2][variant]["bin"], sd15.unet) as adapter:
        zero = pipe(prompts, plugins=[IPAdapterPlugin(adapter, encoder, image, scale=0.0)], **GEN).images
        torch.testing.assert_close(zero, plain, **EXACT)
        plugin = IPAdapterPlugin(adapter, encoder, image, scale=1.0)
        changed = pipe(prompts, plugins=[plugin], **GEN).images
        assert (changed - plain).abs().max() > 1e-3
        # The branch hooks still capture f0..f2 through the IP-Adapter processors, and they change.
        ctx = _ctx(batch=2, cfg=True, emb=emb)
        plugin.prepare(ctx)
        with torch.no_grad():
            _, feats = pipe.sd15_branch(x, t, emb, **plugin.unet_kwargs(ctx, StepInfo("stage2", 0, 2, t), x))
        for f, b in zip(feats, base_feats, strict=True):
            assert f.shape == b.shape and (f - b).abs().max() > 1e-4
    assert not adapter.loaded
    torch.testing.assert_close(pipe(prompts, **GEN).images, plain, **EXACT)
    with torch.no_grad():
        for f, b in zip(pipe.sd15_branch(x, t, emb)[1], base_feats):
            torch.testing.assert_close(f, b, **EXACT)
    with pytest.raises(RuntimeError, match="unloaded"):
        plugin.prepare(ctx)


def test_suspend_resume_and_with_image(models, files, encoder, image):
    """Serving switches IP-Adapters per request: suspended = the stock UNet bit for bit, resumed =
    the same output as before; a second adapter can be installed while the first is suspended;
    with_image gives the same result as a plugin built on that image."""
    sd15, sdxl, mapping = models
    pipe = XAdapterPipeline(sd15, sdxl, mapping, progress=False)
    plain = pipe("a cat", **GEN).images
    other = Image.fromarray((np.random.RandomState(1).rand(32, 32, 3) * 255).astype(np.uint8))
    with installed(files[2]["plain"]["bin"], sd15.unet) as adapter:
        plugin = IPAdapterPlugin(adapter, encoder, image, scale=1.0)
        with_ip = pipe("a cat", plugins=[plugin], **GEN).images
        adapter.suspend()
        assert not adapter.active and adapter.loaded
        torch.testing.assert_close(pipe("a cat", **GEN).images, plain, **EXACT)
        with pytest.raises(RuntimeError, match="suspended"):
            pipe("a cat", plugins=[plugin], **GEN)
        with installed(files[2]["plus"]["bin"], sd15.unet) as second:
            with pytest.raises(ValueError, match="another IP-Adapter is active"):
                adapter.resume()
            second.suspend()
            adapter.resume()
            torch.testing.assert_close(pipe("a cat", plugins=[plugin], **GEN).images, with_ip, **EXACT)
            swapped = pipe("a cat", plugins=[plugin.with_image(other)], **GEN).images
            direct = pipe("a cat", plugins=[IPAdapterPlugin(adapter, encoder, other, scale=1.0)], **GEN).images
            torch.testing.assert_close(swapped, direct, **EXACT)
            assert (swapped - with_ip).abs().max() > 1e-4
            adapter.suspend()
        torch.testing.assert_close(pipe("a cat", **GEN).images, plain, **EXACT)
    assert sd15.unet.encoder_hid_proj is None


# ---------------------------------------------------------------- errors
def test_wrong_files_and_parameters_are_named(models, files, encoder, tmp_path, image):
    sd15_unet, sdxl_unet = models[0].unet, models[1].unet
    state = tiny_ip_adapter_state(sd15_unet, "plain")

    sdxl_file = save_ip_adapter(tiny_ip_adapter_state(sdxl_unet, "plus"), tmp_path / "ip-adapter-plus_sdxl.bin")
    with pytest.raises(CheckpointError, match=r"cross-attention width \[64\].*cross_attention_dim is 32"):
        load_ip_adapter(sdxl_file, sd15_unet)

    torch.save({"image_proj": state["image_proj"]}, tmp_path / "half.bin")
    with pytest.raises(CheckpointError, match="'image_proj' and 'ip_adapter'"):
        load_ip_adapter(tmp_path / "half.bin", sd15_unet)

    from safetensors.torch import save_file

    save_file({"proj.weight": state["image_proj"]["proj.weight"]}, str(tmp_path / "flat.safetensors"))
    with pytest.raises(CheckpointError, match="'image_proj.' or 'ip_adapter.'"):
        load_ip_adapter(tmp_path / "flat.safetensors", sd15_unet)

    dropped = {"image_proj": state["image_proj"], "ip_adapter": {k: v for k, v in state["ip_adapter"].items() if not k.startswith("31.")}}
    with pytest.raises(CheckpointError, match=r"missing 2 keys \(e.g. \['31.to_k_ip.weight'"):
        load_ip_adapter(save_ip_adapter(dropped, tmp_path / "dropped.bin"), sd15_unet)

    faceid = {"image_proj": {"proj.0.weight": torch.zeros(4, 4), "proj.2.weight": torch.zeros(4, 4), "norm.weight": torch.zeros(4)},
              "ip_adapter": state["ip_adapter"]}
    with pytest.raises(CheckpointError, match="FaceID"):
        load_ip_adapter(save_ip_adapter(faceid, tmp_path / "faceid.bin"), sd15_unet)

    with pytest.raises(ParameterError, match="ip_adapter"):
        load_ip_adapter(tmp_path / "model.ckpt", sd15_unet)
    with pytest.raises(ParameterError, match="image_encoder"):
        load_image_encoder(tmp_path)

    with installed(files[2]["plus"]["safetensors"], sd15_unet) as adapter:
        with pytest.raises(ValueError, match="already has an encoder_hid_proj"):
            load_ip_adapter(files[2]["plain"]["bin"], sd15_unet)
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        wide = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=48, intermediate_size=64, projection_dim=32,
                                                              num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8))
        with pytest.raises(ParameterError, match="image_encoder.*hidden_size=32"):
            IPAdapterPlugin(adapter, wide, image)
        with pytest.raises(ParameterError, match="ip_scale"):
            IPAdapterPlugin(adapter, encoder, image, scale=-1.0)
        with pytest.raises(ParameterError, match="ip_image"):
            IPAdapterPlugin(adapter, encoder, files[0] / "missing.png").prepare(_ctx(1, False, torch.zeros(1, 77, 32)))
        with pytest.raises(ParameterError, match="ip_scale"):
            adapter.set_scale({"up": {"block_7": 1.0}})
    assert sd15_unet.encoder_hid_proj is None

    # The CLI's path: files on disk, the encoder found beside the adapter (h94 layout), an image path.
    assert default_image_encoder_path(files[2]["plain"]["bin"]) == files[1]
    image.save(tmp_path / "face.png")
    plugin = load_ip_adapter_plugin(sd15_unet, files[2]["plain"]["bin"], str(tmp_path / "face.png"), scale=0.5)
    try:
        plugin.prepare(_ctx(1, True, torch.zeros(2, 77, 32)))
        assert plugin.unet_kwargs(None, None, torch.zeros(2, 4, 8, 8))["added_cond_kwargs"]["image_embeds"][0].shape == (2, 1, 32)
    finally:
        plugin.adapter.unload()
    with pytest.raises(ParameterError, match="image_encoder"):
        load_ip_adapter_plugin(sd15_unet, save_ip_adapter(state, tmp_path / "alone" / "ip-adapter_sd15.bin"), image)
    assert sd15_unet.encoder_hid_proj is None


def test_pipeline_refuses_a_call_without_the_installed_ip_adapter(tmp_path):
    from xa_runtime.errors import ParameterError
    from xa_runtime.models.tiny import build_tiny_models
    from xa_runtime.pipeline import XAdapterPipeline
    from xa_runtime.plugins import load_ip_adapter
    from xa_runtime.testing import write_tiny_ip_adapter

    sd15, sdxl, mapping = build_tiny_models(5)
    paths = write_tiny_ip_adapter(tmp_path, sd15.unet)
    adapter = load_ip_adapter(paths["safetensors"], sd15.unet)
    pipe = XAdapterPipeline(sd15, sdxl, mapping, progress=False)
    with pytest.raises(ParameterError, match="IPAdapterPlugin") as refused:
        pipe("a cat", num_inference_steps=2, adapter_guidance_start=1.0, output_type="latent")
    assert str(refused.value) == ("invalid plugins=[]: an IPAdapterPlugin (an IP-Adapter is installed on the SD1.5 "
                                  "UNet: give an image, or unload it)")
    adapter.unload()
    pipe("a cat", num_inference_steps=2, adapter_guidance_start=1.0, output_type="latent")
