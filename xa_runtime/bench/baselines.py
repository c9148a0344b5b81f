"""Baselines timed in the same run as X-Adapter: SDXL alone, and the mapping layers alone.

SDXL alone is what X-Adapter is weighed against (the lean runtime's goal: X-Adapter at
most 1.45x of it): the SDXL text encoders, the SDXL UNet with CFG for the same number of
steps at the SDXL size through the same branch wrapper with no injections, the same
sampler, and the SDXL VAE decode. It reuses the pipeline's modules and sampler settings,
so it runs on the same backend, and it lives here, not in the pipeline.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from ..pipeline.params import validate
from ..pipeline.schedulers import make_scheduler
from ..pipeline.text import encode_sdxl, sdxl_time_ids
from ..pipeline.xadapter import XAdapterOutput
from ..runtime.timing import StageTimer, time_callable

BASELINES = ("sdxl-alone", "mapping")


class SDXLAlone:
    """`generate(params)` like XAdapterPipeline's, for SDXL only; stage timings
    text_encoders, denoise, vae_decode. Output: N x H x W x 3 floats (as output_type "np")."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.device = pipe.device

    @torch.no_grad()
    def generate(self, params: Any, plugins: Any = None) -> XAdapterOutput:
        """`plugins` (the workload's SD1.5 plugins) do not apply to SDXL alone: ignored."""
        pipe, dev, dt = self.pipe, self.pipe.device, self.pipe.dtype
        p = validate(params, pipe.size_rules)
        pipe._sync_kernel_modules()  # the variant's GroupNorm / GEGLU kernels, as its own requests
        generator = torch.Generator("cpu").manual_seed(p.seed or 0)
        timer = StageTimer(dev)
        cfg = p.guidance_scale > 1.0
        guidance = p.guidance_scale if cfg else None
        batch = len(p.prompts) * p.num_images_per_prompt
        with timer.stage("text_encoders"):
            emb, pooled = encode_sdxl(pipe.sdxl, p.prompts, None, p.num_images_per_prompt, cfg, dev)
            cond = {"text_embeds": pooled.to(dt), "time_ids": sdxl_time_ids(p.height, p.width, emb.shape[0], dt, dev)}
            emb = emb.to(dt)
        factor = 2 ** (len(pipe.sdxl.vae.config.block_out_channels) - 1)
        shape = (batch, pipe.sdxl.unet.config.in_channels, p.height // factor, p.width // factor)
        with timer.stage("denoise"):
            sched = make_scheduler(p.scheduler, pipe.sdxl.scheduler_config)
            sched.set_timesteps(p.num_inference_steps, device=dev)
            latents = torch.randn(shape, generator=generator).to(dev, dt) * sched.init_noise_sigma
            sampler = pipe._sampler(sched, generator)  # the variant's sampler (fused kernel or diffusers)
            for t in sched.timesteps:
                x = torch.cat([latents, latents]) if cfg else latents
                eps = pipe.sdxl_branch(sampler.scale_model_input(x, t), t, emb, cond, injections=None)
                latents = sampler.step(eps, t, latents, guidance)
        with timer.stage("vae_decode"):
            images = pipe._decode(latents, "np")
        return XAdapterOutput(images=images, params=p, timings=dict(timer.seconds))


def mapping_alone(pipe: Any, params: Any, warmup: int, runs: int) -> dict[str, Any]:
    """The mapping layers alone on stage-2 feature shapes (UNet batch, CFG doubled): seconds
    per call (CUDA events on a GPU), and per image = per call x stage-2 steps."""
    p = validate(params, pipe.size_rules)
    rows = len(p.prompts) * p.num_images_per_prompt * (2 if p.guidance_scale > 1.0 else 1)
    factor = 2 ** (len(pipe.sdxl.vae.config.block_out_channels) - 1)
    h, w = p.height // factor // 4, p.width // factor // 4
    c0, c1, c2 = pipe.mapping.config.in_channels
    gen = torch.Generator("cpu").manual_seed(0)
    feats = [torch.randn(shape, generator=gen).to(pipe.device, pipe.dtype)
             for shape in ((rows, c0, h, w), (rows, c1, 2 * h, 2 * w), (rows, c2, 2 * h, 2 * w))]
    with torch.no_grad():
        samples = time_callable(lambda: pipe.mapping(*feats), pipe.device, warmup=max(warmup, 1), iters=max(runs, 3))
    per_call = statistics.median(samples)
    return {
        "shapes": [list(f.shape) for f in feats], "stage2_steps": p.stage2_steps,
        "raw_seconds_per_call": samples, "median_seconds_per_call": per_call,
        "seconds_per_image": per_call * p.stage2_steps,
    }
