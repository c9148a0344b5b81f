"""The pipeline used as a diffusers user would (save_pretrained / from_pretrained(folder), .to,
generator, callback_on_step_end, LoRA load / switch / fuse / unload, ControlNet as a component,
IP-Adapter, prompt embeddings, scheduler objects, output_type "pt") gives exactly what the
existing API (from_tiny + generate(GenerationParams(seed=...), plugins=[...])) gives, bit for
bit; where diffusers has the same feature, the result is compared with diffusers' own code
(randn_tensor for the generator, VaeImageProcessor for "pt"). Importing xa_runtime leaves the
environment alone, and loading reads local files only."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from xa_runtime.errors import ParameterError
from xa_runtime.pipeline import GenerationParams, XAdapterPipeline
from xa_runtime.pipeline.text import encode_sd15, encode_sdxl
from xa_runtime.plugins import ControlNetPlugin, LoraManager, load_ip_adapter_plugin, load_lora
from xa_runtime.plugins.controlnet import build_tiny_controlnet
from xa_runtime.testing.lora import write_random_lora
from xa_runtime.testing.plugins import write_tiny_image_encoder, write_tiny_ip_adapter

SEED = 3
RUN = dict(num_inference_steps=4, adapter_guidance_start=0.5)  # 4 stage-1 steps, 2 stage-2 steps
CONTROL = np.random.default_rng(0).random((40, 40, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def ref():
    """The existing API: the tiny models in memory."""
    return XAdapterPipeline.from_tiny(0, progress=False)


@pytest.fixture(scope="module")
def saved(ref, tmp_path_factory):
    return ref.save_pretrained(tmp_path_factory.mktemp("saved") / "xa-tiny")


@pytest.fixture(scope="module")
def pipe(saved):
    """The diffusers way: the saved folder, loaded and placed with .to."""
    p = XAdapterPipeline.from_pretrained(saved).to("cpu", torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def old(ref, plugins=(), **kw):
    """The existing API's images as a B x 3 x H x W tensor ("np" output, transposed)."""
    params = GenerationParams(prompt="a cat", seed=SEED, output_type="np", **{**RUN, **kw})
    return torch.from_numpy(ref.generate(params, plugins=plugins).images).permute(0, 3, 1, 2)


def new(pipe, **kw):
    return pipe("a cat", generator=torch.Generator().manual_seed(SEED), output_type="pt", **{**RUN, **kw}).images


def test_diffusers_user_gets_the_existing_api_results_bit_for_bit(ref, pipe, saved, tmp_path):
    assert sorted(os.listdir(saved.parent)) == [saved.name]  # written under a temp name, renamed: nothing left over
    index = json.loads((saved / "xa_pipeline_index.json").read_text())
    assert index["_class_name"] == "XAdapterPipeline" and index["sd15"] == "sd15" and index["sdxl"] == "sdxl"

    steps = []

    def record(p, step, timestep, kwargs):
        assert p is pipe and set(kwargs) == {"latents", "stage"}
        steps.append((kwargs["stage"], step, int(timestep), tuple(kwargs["latents"].shape)))
        return kwargs

    plain = new(pipe, callback_on_step_end=record)
    assert plain.shape == (1, 3, 128, 128) and plain.dtype == torch.float32
    assert torch.equal(plain, old(ref))
    assert [s[:2] for s in steps] == [("stage1", i) for i in range(4)] + [("stage2", i) for i in range(2)]
    assert steps[0][3] == (1, 4, 8, 8) and steps[-1][3] == (1, 4, 16, 16)  # SD1.5 latents, then SDXL's
    out = pipe("a cat", generator=torch.Generator().manual_seed(SEED), output_type="pt", return_dict=False, **RUN)
    assert isinstance(out, tuple) and len(out) == 1 and torch.equal(out[0], plain)

    # LoRA: load two, switch between them, fuse, unload (existing API: a LoraManager per branch)
    files = [write_random_lora(tmp_path / f"l{i}.safetensors", ref.sd15.unet, ref.sd15.text_encoder, seed=i, std=0.2)
             for i in range(2)]
    pipe.load_lora_weights(files[0], adapter_name="a", branch="sd15")
    pipe.load_lora_weights(files[1], adapter_name="b")
    assert pipe.get_active_adapters() == ["a", "b"]
    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.0])
    manager = LoraManager.for_branch(ref.sd15, "unfused")
    try:
        manager.add("a", load_lora(files[0]), 0.5)
        manager.add("b", load_lora(files[1]), 1.0)
        both = old(ref)
        assert torch.equal(new(pipe), both) and not torch.equal(both, plain)
        pipe.set_adapters("b", adapter_weights=0.8)
        manager.remove("a")
        manager.set_scale("b", 0.8)
        assert pipe.get_active_adapters() == ["b"] and torch.equal(new(pipe), old(ref))
        pipe.fuse_lora(lora_scale=0.5)
        manager.set_scale("b", 0.4)
        manager.fuse()
        assert torch.equal(new(pipe), old(ref))
        pipe.unfuse_lora()
        manager.unfuse()
        manager.set_scale("b", 0.8)
        assert torch.equal(new(pipe), old(ref))
    finally:
        manager.clear()
    pipe.unload_lora_weights()
    assert pipe.get_active_adapters() == [] and torch.equal(new(pipe), plain)

    # ControlNet as a component with image= (existing API: a ControlNetPlugin)
    controlnet = build_tiny_controlnet(ref.sd15.unet, seed=1)
    pipe.controlnet = controlnet
    try:
        controlled = new(pipe, image=CONTROL, controlnet_conditioning_scale=0.7)
        expected = old(ref, plugins=[ControlNetPlugin(controlnet, CONTROL, conditioning_scale=0.7)])
        assert torch.equal(controlled, expected) and not torch.equal(controlled, plain)
        with pytest.raises(ParameterError, match="image"):
            new(pipe)  # a ControlNet is set: the call needs its image
    finally:
        pipe.controlnet = None


def test_generator_draws_the_stage1_latents_as_diffusers_prepare_latents(pipe):
    """diffusers' prepare_latents: randn_tensor(shape, generator) x init_noise_sigma; given
    `latents=`, nothing is drawn for them. So drawing them with diffusers' randn_tensor and
    handing them in with the same (advanced) generator gives the same image."""
    g = torch.Generator().manual_seed(SEED)
    latents = randn_tensor((1, 4, 8, 8), generator=g, device=torch.device("cpu"), dtype=torch.float32)
    handed = pipe("a cat", generator=g, latents=latents, output_type="latent", **RUN).images
    drawn = pipe("a cat", generator=torch.Generator().manual_seed(SEED), output_type="latent", **RUN).images
    assert torch.equal(handed, drawn)
    other = pipe("a cat", generator=torch.Generator().manual_seed(SEED), latents=latents * 0.5, output_type="latent",
                 **RUN).images
    assert not torch.equal(other, drawn)
    with pytest.raises(ParameterError, match="latents"):
        pipe("a cat", latents=torch.zeros(1, 4, 16, 16), **RUN)
    with pytest.raises(ParameterError, match="seed"):
        pipe("a cat", seed=1, generator=torch.Generator(), **RUN)


def test_output_type_pt_is_diffusers_image_processor_layout(pipe):
    latents = pipe("a cat", generator=torch.Generator().manual_seed(SEED), output_type="latent", **RUN).images
    pt = pipe("a cat", generator=torch.Generator().manual_seed(SEED), output_type="pt", **RUN).images
    vae = pipe.sdxl.vae
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    expected = VaeImageProcessor(vae_scale_factor=8).postprocess(decoded, output_type="pt")
    assert pt.shape == (1, 3, 128, 128) and 0 <= pt.min() and pt.max() <= 1
    torch.testing.assert_close(pt, expected, rtol=0, atol=0)


def test_callback_on_step_end_replaces_latents(pipe):
    def zero_last(p, step, timestep, kwargs):
        if kwargs["stage"] == "stage2" and step == 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return {}

    out = pipe("a cat", generator=torch.Generator().manual_seed(SEED), output_type="latent",
               callback_on_step_end=zero_last, **RUN).images
    assert torch.equal(out, torch.zeros(1, 4, 16, 16))
    seen = []
    pipe("a cat", seed=SEED, output_type="latent", callback_on_step_end=lambda p, i, t, k: seen.append(sorted(k)),
         callback_on_step_end_tensor_inputs=["latents", "latents_sd15"], **RUN)
    assert seen == [["latents", "latents_sd15", "stage"]] * 6
    with pytest.raises(ParameterError, match="callback_on_step_end_tensor_inputs"):
        pipe("a cat", callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"], **RUN)


def test_prompt_embeds_equal_the_prompt(pipe):
    with torch.no_grad():
        e15 = encode_sd15(pipe.sd15, ["a cat"], [""], 1, True, pipe.device)
        exl, pooled = encode_sdxl(pipe.sdxl, ["a cat"], None, 1, True, pipe.device)
    (n15, c15), (nxl, cxl), (npool, cpool) = e15.chunk(2), exl.chunk(2), pooled.chunk(2)
    by_embeds = pipe(prompt_embeds=cxl, negative_prompt_embeds=nxl, pooled_prompt_embeds=cpool,
                     negative_pooled_prompt_embeds=npool, prompt_embeds_sd15=c15, negative_prompt_embeds_sd15=n15,
                     generator=torch.Generator().manual_seed(SEED), output_type="latent", **RUN).images
    by_text = pipe("a cat", generator=torch.Generator().manual_seed(SEED), output_type="latent", **RUN).images
    assert torch.equal(by_embeds, by_text)
    with pytest.raises(ParameterError, match="prompt"):
        pipe("a cat", prompt_embeds=cxl, pooled_prompt_embeds=cpool, **RUN)
    with pytest.raises(ParameterError, match="pooled_prompt_embeds"):
        pipe(prompt_embeds=cxl, prompt_embeds_sd15=c15, **RUN)
    with pytest.raises(ParameterError, match="prompt_embeds_sd15"):
        pipe(prompt_embeds=cxl, pooled_prompt_embeds=cpool, prompt_embeds_sd15=cxl, **RUN)


def test_scheduler_objects_and_karras_sigmas(pipe):
    def run(**kw):
        return pipe("a cat", seed=SEED, output_type="latent", **RUN, **kw).images

    euler = run(scheduler="euler")
    assert torch.equal(run(scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config)), euler)
    assert torch.equal(run(scheduler=EulerDiscreteScheduler()), euler)  # the models' noise schedule, the object's sampler
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    try:
        assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler" and torch.equal(run(), euler)
        karras = run(use_karras_sigmas=True)
        assert not torch.equal(karras, euler)
        assert torch.equal(run(scheduler=EulerDiscreteScheduler(use_karras_sigmas=True)), karras)
    finally:
        pipe.scheduler = None
    with pytest.raises(ParameterError, match="use_karras_sigmas"):
        run(scheduler=DDIMScheduler(), use_karras_sigmas=True)


def test_ip_adapter_methods_equal_the_plugin(ref, pipe, tmp_path):
    encoder = write_tiny_image_encoder(tmp_path / "image_encoder")
    file = write_tiny_ip_adapter(tmp_path, ref.sd15.unet)["safetensors"]
    face = np.random.default_rng(1).random((48, 48, 3)).astype(np.float32)
    plugin = load_ip_adapter_plugin(ref.sd15.unet, file, face, scale=0.6, image_encoder=encoder)
    try:
        expected = old(ref, plugins=[plugin])
    finally:
        plugin.adapter.unload()
    pipe.load_ip_adapter(file, image_encoder_folder=encoder)
    try:
        pipe.set_ip_adapter_scale(0.6)
        assert torch.equal(new(pipe, ip_adapter_image=face), expected)
        with pytest.raises(ParameterError, match="plugins"):
            new(pipe)  # installed: the call needs the image prompt
    finally:
        pipe.unload_ip_adapter()
    assert torch.equal(new(pipe), old(ref))


def test_to_and_offload_keep_the_placement_rules(saved):
    """.to(dtype) casts as loading in that dtype does (same latents); the VAE upcast rule holds."""
    p = XAdapterPipeline.from_pretrained(saved, torch_dtype=torch.float32, progress=False)
    assert p.to(torch.bfloat16) is p and p.dtype == torch.bfloat16
    assert p.sd15.unet.dtype == p.sdxl.text_encoder_2.dtype == p.mapping.zero_out[0].weight.dtype == torch.bfloat16
    loaded = XAdapterPipeline.from_pretrained(saved, torch_dtype=torch.bfloat16, progress=False)
    a = p("a cat", seed=SEED, output_type="latent", **RUN).images
    assert a.dtype == torch.bfloat16 and torch.equal(a, loaded("a cat", seed=SEED, output_type="latent", **RUN).images)
    assert p.enable_model_cpu_offload() is p and p.device.type == "cpu"  # no GPU: nothing moves
    assert torch.equal(p("a cat", seed=SEED, output_type="latent", **RUN).images, a)
    p.to(device="cpu", dtype=torch.float16)
    assert p.sdxl.unet.dtype == torch.float16 and p.sdxl.vae.dtype == torch.float32  # force_upcast VAE stays fp32
    with pytest.raises(ParameterError, match="dtype"):
        p.to(torch.float64)


def test_from_pretrained_forms(tiny_paths, saved, tmp_path):
    three = XAdapterPipeline.from_pretrained(tiny_paths.sd15_dir, tiny_paths.sdxl_dir, tiny_paths.adapter_safetensors,
                                             progress=False)
    folder = XAdapterPipeline.from_pretrained(saved, progress=False)
    for a, b in ((three.sdxl.unet, folder.sdxl.unet), (three.mapping, folder.mapping)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sd15 = StableDiffusionPipeline.from_pretrained(saved / "sd15", local_files_only=True)  # diffusers reads the parts
    sdxl = StableDiffusionXLPipeline.from_pretrained(saved / "sdxl", local_files_only=True)
    assert all(torch.equal(x, y) for x, y in zip(sd15.unet.state_dict().values(), folder.sd15.unet.state_dict().values()))
    assert all(torch.equal(x, y) for x, y in zip(sdxl.vae.state_dict().values(), folder.sdxl.vae.state_dict().values()))
    with pytest.raises(ParameterError, match="nothing exists"):
        XAdapterPipeline.from_pretrained("stabilityai/x-adapter")  # a hub id is no local path
    with pytest.raises(ParameterError, match="xa_pipeline_index.json"):
        XAdapterPipeline.from_pretrained(tiny_paths.sd15_dir)
    with pytest.raises(ParameterError, match="three paths"):
        XAdapterPipeline.from_pretrained(tiny_paths.sd15_dir, tiny_paths.sdxl_dir)
    # save over an existing folder: replaced whole, only when the new one is complete
    target = tmp_path / "again"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    folder.save_pretrained(target)
    assert not (target / "stale.txt").exists() and (target / "xa_pipeline_index.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["again"]


def test_import_leaves_the_environment_alone():
    code = ("import os, sys, json; before = dict(os.environ); import xa_runtime; "
            "light = 'torch' not in sys.modules; after_import = dict(os.environ); "
            "from xa_runtime import XAdapterPipeline; "
            "keys = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}; "
            "print(json.dumps([after_import == before, light, sorted(keys)]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "DIFFUSERS_"))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    unchanged, light, keys = json.loads(done.stdout.strip().splitlines()[-1])
    assert unchanged and light
    assert [k for k in keys if k.startswith(("HF_", "TRANSFORMERS_", "DIFFUSERS_"))] == []


def test_loaders_read_local_files_only(tiny_paths, monkeypatch):
    """Every from_pretrained call the loaders make passes local_files_only=True (spied on the
    diffusers / transformers base classes), and no socket connects, with HF_HUB_OFFLINE unset."""
    import diffusers
    import transformers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def spy(owner):
        original = owner.__dict__["from_pretrained"].__func__

        def from_pretrained(cls, *args, **kwargs):
            calls.append((cls.__name__, kwargs.get("local_files_only")))
            return original(cls, *args, **kwargs)

        monkeypatch.setattr(owner, "from_pretrained", classmethod(from_pretrained))

    for owner in (diffusers.ModelMixin, transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase,
                  transformers.PretrainedConfig):
        spy(owner)

    def no_network(self, *args, **kwargs):
        raise AssertionError(f"network connect {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    XAdapterPipeline.from_pretrained(tiny_paths.sd15_dir, tiny_paths.sdxl_dir, tiny_paths.adapter_bin, progress=False)
    XAdapterPipeline.from_pretrained(tiny_paths.sd15_file, tiny_paths.sdxl_file, tiny_paths.adapter_bin, progress=False)
    assert calls and all(local is True for _, local in calls), calls
    assert {"UNet2DConditionModel", "CLIPTextConfig"} <= {name for name, _ in calls}
