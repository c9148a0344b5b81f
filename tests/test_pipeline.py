"""The pipeline on tiny models equals a plain, written-out loop of the X-Adapter algorithm
(stage 1, tensor hand-over, stage 2 with both branches at the same timestep)."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from xa_runtime.pipeline import XAdapterPipeline
from xa_reference import manual_unet_forward

REFERENCE_SCHEDULERS = {
    "dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
}
LATENT_TOL = dict(rtol=1e-4, atol=1e-4)  # fp32, CPU; the written-out forward reorders no math


@pytest.fixture(scope="module")
def pipe(tiny_models):
    sd15, sdxl, mapping = tiny_models
    return XAdapterPipeline(sd15, sdxl, mapping, progress=False)


def _encode(tokenizer, encoder, texts, hidden_index=None):
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[hidden_index] if hidden_index is not None else out[0], out[0]


@torch.no_grad()
def reference_xadapter(sd15, sdxl, mapping, *, prompts, negative, steps, guidance, ags, acs, fusion, scheduler, seed,
                       size, size_sd15, per_prompt, init_image=None, strength=1.0):
    """X-Adapter written out from xadapter.md, with stock diffusers pieces only."""
    cls, extra = REFERENCE_SCHEDULERS[scheduler]
    gen = torch.Generator().manual_seed(seed)
    cfg = guidance > 1
    batch = len(prompts) * per_prompt
    negatives = [negative] * len(prompts) if negative is not None else None

    def guide(eps):
        if not cfg:
            return eps
        u, c = eps.chunk(2)
        return u + guidance * (c - u)

    def double(x):
        return torch.cat([x, x]) if cfg else x

    # text: SD1.5 last hidden state; SDXL penultimate states of both encoders + pooled of the second
    e15 = _encode(sd15.tokenizer, sd15.text_encoder, (negatives or [""] * len(prompts)) + prompts if cfg else prompts)[0]
    texts = prompts
    a, _ = _encode(sdxl.tokenizer, sdxl.text_encoder, texts, -2)
    b, pooled = _encode(sdxl.tokenizer_2, sdxl.text_encoder_2, texts, -2)
    exl = torch.cat([a, b], -1)
    if cfg:
        if negatives is None:
            exl, pooled = torch.cat([torch.zeros_like(exl), exl]), torch.cat([torch.zeros_like(pooled), pooled])
        else:
            na, _ = _encode(sdxl.tokenizer, sdxl.text_encoder, negatives, -2)
            nb, npooled = _encode(sdxl.tokenizer_2, sdxl.text_encoder_2, negatives, -2)
            exl, pooled = torch.cat([torch.cat([na, nb], -1), exl]), torch.cat([npooled, pooled])
    e15, exl, pooled = (t.repeat_interleave(per_prompt, 0) for t in (e15, exl, pooled))
    H, W = size
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[H, W, 0, 0, H, W]] * exl.shape[0], dtype=torch.float32)}

    shape15 = (batch, 4, size_sd15[0] // 8, size_sd15[1] // 8)
    shapexl = (batch, 4, H // 8, W // 8)

    # stage 1: SD1.5 alone, whole schedule
    s1 = cls.from_config({**sd15.scheduler_config, **extra})
    s1.set_timesteps(steps)
    timesteps1 = s1.timesteps
    if init_image is None:
        x15 = torch.randn(shape15, generator=gen) * s1.init_noise_sigma
    else:  # img2img: diffusers' definition, init image B x 3 x h x w in [0, 1]
        start = steps - int(steps * strength)
        timesteps1 = s1.timesteps[start:]
        s1.set_begin_index(start)
        post = sd15.vae.encode(init_image * 2 - 1).latent_dist
        z = (post.mean + post.std * torch.randn(post.mean.shape, generator=gen)) * sd15.vae.config.scaling_factor
        x15 = s1.add_noise(z, torch.randn(shape15, generator=gen), timesteps1[:1].repeat(batch))
    for t in timesteps1:
        eps = sd15.unet(s1.scale_model_input(double(x15), t), t, e15).sample
        x15 = s1.step(guide(eps), t, x15).prev_sample

    # hand-over at t0 = SDXL timesteps[N - k]
    k = int(steps * ags)
    sxl, s15 = (cls.from_config({**sdxl.scheduler_config, **extra}) for _ in range(2))
    for s in (sxl, s15):
        s.set_timesteps(steps)
        s.set_begin_index(steps - k)
    timesteps = sxl.timesteps[steps - k :]
    image = sd15.vae.decode(x15 / sd15.vae.config.scaling_factor).sample
    image = F.interpolate(image, size=(H, W), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    posterior = sdxl.vae.encode(image).latent_dist
    z = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)) * sdxl.vae.config.scaling_factor
    t0 = timesteps[:1].repeat(batch)
    xxl = sxl.add_noise(z, torch.randn(shapexl, generator=gen), t0)
    x15 = s15.add_noise(x15, torch.randn(shape15, generator=gen), t0)

    # stage 2: both branches, same t
    for t in timesteps:
        feats = {}
        eps = manual_unet_forward(sd15.unet, s15.scale_model_input(double(x15), t), t, e15,
                                  at=lambda name, h: feats.setdefault(name, h))
        x15 = s15.step(guide(eps), t, x15).prev_sample
        hl, wl = shapexl[-2:]
        targets = {"up1": (hl // 4, wl // 4), "up2": (hl // 2, wl // 2), "up3": (hl // 2, wl // 2)}
        f = [F.interpolate(feats[n], size=s, mode="bilinear", align_corners=False) if feats[n].shape[-2:] != s
             else feats[n] for n, s in targets.items()]
        r = dict(zip(("mid", "up0", "up1"), mapping(*f)))

        def inject(name, h):
            if name not in r:
                return h
            return h + acs * r[name] if fusion is None else h + fusion * (acs * r[name] - h)

        eps = manual_unet_forward(sdxl.unet, sxl.scale_model_input(double(xxl), t), t, exl, added, at=inject)
        xxl = sxl.step(guide(eps), t, xxl).prev_sample
    return xxl


CASES = [
    # name, kwargs
    ("cfg-dpm-ags0.5", dict(guidance=7.5, ags=0.5, scheduler="dpmpp-2m", prompts=["a cat"], per_prompt=1)),
    ("cfg-euler-ags1-batch2", dict(guidance=5.0, ags=1.0, scheduler="euler", prompts=["a cat", "a dog"], per_prompt=1)),
    ("nocfg-dpm-ags1-repeat2", dict(guidance=1.0, ags=1.0, scheduler="dpmpp-2m", prompts=["a cat"], per_prompt=2)),
    ("nocfg-euler-ags0.5", dict(guidance=1.0, ags=0.5, scheduler="euler", prompts=["a cat"], per_prompt=1)),
    ("cfg-negative-fusion", dict(guidance=3.0, ags=0.5, scheduler="dpmpp-2m", prompts=["a cat"], per_prompt=1,
                                 negative="blurry", fusion=0.5, acs=1.3)),
    ("cfg-img2img-strength0.5", dict(guidance=7.5, ags=0.5, scheduler="dpmpp-2m", prompts=["a cat"], per_prompt=2,
                                     init_image=torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9)).expand(2, -1, -1, -1),
                                     strength=0.5)),
    ("cfg-not-half-size", dict(guidance=7.5, ags=0.5, scheduler="euler", prompts=["a cat"], per_prompt=1,
                               size_sd15=(128, 64))),
]


@pytest.mark.parametrize("name, case", CASES, ids=[c[0] for c in CASES])
def test_pipeline_equals_written_out_algorithm(pipe, tiny_models, name, case):
    args = dict(negative=None, steps=6, acs=1.0, fusion=None, seed=1234, size=(128, 128), size_sd15=(64, 64)) | case
    out = pipe(
        args["prompts"], init_image=args.get("init_image"), strength=args.get("strength", 1.0), negative_prompt=args["negative"], num_inference_steps=args["steps"],
        guidance_scale=args["guidance"], adapter_guidance_start=args["ags"], adapter_condition_scale=args["acs"],
        fusion_guidance_scale=args["fusion"], scheduler=args["scheduler"], seed=args["seed"],
        height=args["size"][0], width=args["size"][1], height_sd15=args["size_sd15"][0],
        width_sd15=args["size_sd15"][1], num_images_per_prompt=args["per_prompt"], output_type="latent",
    )
    sd15, sdxl, mapping = tiny_models
    want = reference_xadapter(sd15, sdxl, mapping, **args)
    assert out.images.shape == want.shape
    torch.testing.assert_close(out.images, want, **LATENT_TOL)
    assert want.abs().max() > 0.1


def test_both_branches_see_the_same_timesteps(pipe):
    seen = {"sd15": [], "sdxl": []}
    hooks = [
        unet.register_forward_pre_hook(lambda m, args, key=key: seen[key].append(float(args[1])))
        for key, unet in (("sd15", pipe.sd15.unet), ("sdxl", pipe.sdxl.unet))
    ]
    try:
        pipe("a cat", num_inference_steps=10, adapter_guidance_start=0.7, seed=0, output_type="latent")
    finally:
        for h in hooks:
            h.remove()
    k = 7
    assert len(seen["sd15"]) == 10 + k and len(seen["sdxl"]) == k
    assert seen["sd15"][10:] == seen["sdxl"]
    cls, extra = REFERENCE_SCHEDULERS["dpmpp-2m"]  # the default scheduler
    schedule = cls.from_config({**pipe.sdxl.scheduler_config, **extra})
    schedule.set_timesteps(10)
    assert seen["sdxl"] == [float(t) for t in schedule.timesteps[10 - k :]]


def test_adapter_changes_the_result(pipe):
    kwargs = dict(num_inference_steps=4, adapter_guidance_start=1.0, seed=5, output_type="latent")
    with_adapter = pipe("a cat", adapter_condition_scale=1.0, **kwargs).images
    without = pipe("a cat", adapter_condition_scale=0.0, **kwargs).images
    assert (with_adapter - without).abs().max() > 1e-3


@pytest.mark.parametrize("scheduler", ["dpmpp-2m", "euler-a", "ddim", "unipc"])
def test_deterministic_for_a_seed(pipe, scheduler):
    kwargs = dict(num_inference_steps=4, scheduler=scheduler, output_type="latent")
    a = pipe("a cat", seed=7, **kwargs).images
    b = pipe("a cat", seed=7, **kwargs).images
    c = pipe("a cat", seed=8, **kwargs).images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3


def test_output_types_and_timings(pipe):
    out = pipe("a cat", num_inference_steps=2, seed=0, height=96, width=160, output_type="pil")
    assert [im.size for im in out.images] == [(160, 96)]
    assert set(out.timings) == {"text_encoders", "stage1", "handover", "stage2", "vae_decode"}
    arr = pipe("a cat", num_inference_steps=2, seed=0, output_type="np").images
    assert arr.shape == (1, 128, 128, 3) and 0.0 <= arr.min() and arr.max() <= 1.0
    assert out.params.seed == 0 and out.params.height == 96


def test_seed_is_drawn_and_reported_when_absent(pipe):
    out = pipe("a cat", num_inference_steps=2, output_type="latent")
    again = pipe("a cat", num_inference_steps=2, output_type="latent", seed=out.params.seed)
    torch.testing.assert_close(out.images, again.images, rtol=0, atol=0)


def test_long_prompt_warns_with_the_cut_text(pipe):
    prompt = "a cat " * 60 + "sitting on a purple elephant"
    with pytest.warns(UserWarning, match="purple elephant"):
        pipe(prompt, num_inference_steps=1, adapter_guidance_start=1.0, seed=0, output_type="latent")


def test_strength_needs_an_init_image(pipe):
    from xa_runtime.errors import ParameterError

    with pytest.raises(ParameterError, match="strength"):
        pipe("a cat", num_inference_steps=2, strength=0.5, output_type="latent")


def test_from_diffusers_pipelines_matches(tiny_models, pipe):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    sd15, sdxl, mapping = tiny_models
    sd15_pipe = StableDiffusionPipeline(
        vae=sd15.vae, text_encoder=sd15.text_encoder, tokenizer=sd15.tokenizer, unet=sd15.unet,
        scheduler=EulerDiscreteScheduler.from_config(sd15.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    sdxl_pipe = StableDiffusionXLPipeline(
        vae=sdxl.vae, text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2, tokenizer=sdxl.tokenizer,
        tokenizer_2=sdxl.tokenizer_2, unet=sdxl.unet, scheduler=EulerDiscreteScheduler.from_config(sdxl.scheduler_config),
    )
    other = XAdapterPipeline.from_diffusers(sd15_pipe, sdxl_pipe, mapping, progress=False)
    kwargs = dict(num_inference_steps=3, adapter_guidance_start=1.0, seed=11, output_type="latent")
    torch.testing.assert_close(other("a cat", **kwargs).images, pipe("a cat", **kwargs).images, rtol=0, atol=0)
