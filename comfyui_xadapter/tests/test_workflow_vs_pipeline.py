"""The whole two-stage workflow in ComfyUI against xa_runtime's pipeline, same tiny weights.

Closest match: diffusers' EulerDiscreteScheduler ("euler", leading spacing) in the pipeline,
ComfyUI's `euler` sampler. What must be equal, and is asserted:
- stage 1, given the pipeline's own sigmas and initial noise: ComfyUI's SD1.5 sampling
  equals the pipeline's stage 1. The only convention to line up: diffusers scales the
  initial noise by init_noise_sigma = sqrt(sigma_0^2 + 1) with leading spacing, ComfyUI by
  sigma_0 (it uses sqrt(sigma^2 + 1) only when sigma_0 is the model's largest sigma).
- stage 2, from the pipeline's hand-over latents (both noised to t0) with the same sigmas:
  the X-Adapter guider equals the pipeline's stage 2 (same timesteps: ComfyUI maps each
  of these sigmas back to the very integer timestep diffusers used).
What differs, and is reported (not asserted) for the workflow as a user wires it:
ComfyUI's "normal" schedule spaces sigmas in continuous time (timesteps between
diffusers' integers), its RandomNoise draws other numbers than the pipeline's generator,
its VAEEncode takes the posterior mean where the pipeline samples it, and its VAEDecode
clamps to [0, 1] before the resize where the pipeline clamps after.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import comfy.samplers
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
from xa_runtime.pipeline import XAdapterPipeline
from xa_runtime.pipeline.schedulers import make_scheduler

import comfy_tiny
from comfyui_xadapter.guider import LatentPacking
from comfyui_xadapter.nodes import XAdapter, XAdapterGuiderNode, XAdapterSampler

N, AGS, CFG, SEED = 10, 0.8, 5.0, 11
SD, XL = 64, 128
MATCH = {"atol": 2e-4, "rtol": 1e-4}  # fp32 drift over 10 steps of two UNets (measured ~1e-5)


class _Noise:
    """A NOISE input that returns a given tensor (the pipeline's own noise)."""

    seed = 0

    def __init__(self, tensor):
        self.tensor = tensor

    def generate_noise(self, latent):
        return self.tensor


@pytest.fixture(scope="module")
def setup():
    tiny = comfy_tiny.build(0)
    emb = comfy_tiny.random_embeddings(tiny, batch=1, seed=2)
    pipe = XAdapterPipeline(tiny.sd15, tiny.sdxl, tiny.mapping, progress=False)
    record = {}
    stage1, handover = pipe._stage1, pipe._handover

    def rec_stage1(r, init):
        lat = stage1(r, init)
        record["stage1"] = lat.clone()
        return lat

    def rec_handover(r, lat15, **kwargs):  # kwargs: the pipeline's own (noised=)
        out = handover(r, lat15, **kwargs)
        record["handover"] = (out[0].clone(), out[1].clone())
        return out

    pipe._stage1, pipe._handover = rec_stage1, rec_handover
    final = pipe(prompt=None, **emb, num_inference_steps=N, guidance_scale=CFG, adapter_guidance_start=AGS,
                 height=XL, width=XL, height_sd15=SD, width_sd15=SD, scheduler="euler", seed=SEED,
                 output_type="latent").images
    record["final"] = final
    sched = make_scheduler("euler", tiny.sd15.scheduler_config)
    sched.set_timesteps(N)
    record["sigmas"] = sched.sigmas.float()
    record["init_noise_sigma"] = float(sched.init_noise_sigma)
    # the pipeline's first draw from its generator is stage 1's noise
    record["noise15"] = torch.randn((1, 4, SD // 8, SD // 8), generator=torch.Generator().manual_seed(SEED))
    adapter = XAdapter(tiny.mapping, "tiny")
    cond = comfy_tiny.conditioning(emb, XL, XL)
    return tiny, cond, adapter, record


def _guider(tiny, cond, adapter):
    (guider,) = XAdapterGuiderNode().get_guider(
        tiny.sd15_model, cond["sd15_positive"], cond["sd15_negative"], tiny.sdxl_model, cond["sdxl_positive"],
        cond["sdxl_negative"], adapter, 1.0, 0.0, CFG, CFG)
    return guider


def _report(name: str, got: torch.Tensor, want: torch.Tensor) -> dict:
    diff = (got - want).abs()
    row = {"what": name, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
           "ref_std": float(want.std())}
    path = os.environ.get("XA_COMFYUI_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(row)
    return row


def test_stage1_equals_pipeline(setup):
    tiny, cond, _, rec = setup
    sigmas = rec["sigmas"]
    guider = comfy.samplers.CFGGuider(tiny.sd15_model)
    guider.set_conds(cond["sd15_positive"], cond["sd15_negative"])
    guider.set_cfg(CFG)
    noise = rec["noise15"] * (rec["init_noise_sigma"] / float(sigmas[0]))  # diffusers' init_noise_sigma
    out = guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas.clone(),
                        disable_pbar=True, seed=0)
    scale = tiny.sd15_model.model.latent_format.scale_factor
    _report("stage 1 (SD1.5 latents), matched noise and sigmas", out * scale, rec["stage1"])
    torch.testing.assert_close(out * scale, rec["stage1"], **MATCH)


def test_stage2_equals_pipeline(setup):
    tiny, cond, adapter, rec = setup
    sigmas = rec["sigmas"][N - int(N * AGS):]
    lat15, latxl = rec["handover"]  # scaled latents, already noised to t0
    s15 = tiny.sd15_model.model.latent_format.scale_factor
    sxl = tiny.sdxl_model.model.latent_format.scale_factor
    guider = _guider(tiny, cond, adapter)
    packing = LatentPacking.check(latxl, lat15)
    guider.set_packing(packing)
    out = guider.sample(packing.pack(torch.zeros_like(latxl), torch.zeros_like(lat15)),
                        packing.pack(latxl / sxl, lat15 / s15), comfy.samplers.sampler_object("euler"),
                        sigmas.clone(), disable_pbar=True, seed=0)
    xl, _ = packing.unpack(out)
    _report("stage 2 (SDXL latents), from the pipeline's hand-over", xl * sxl, rec["final"])
    torch.testing.assert_close(xl * sxl, rec["final"], **MATCH)


def test_nodes_with_the_pipelines_noise_and_sigmas_report_the_hand_over_difference(setup):
    """The nodes (stage 1 as KSampler would run it, then the X-Adapter Sampler with its
    hand-over) fed the pipeline's sigmas and noise: what is left is the hand-over's
    conventions (VAE posterior mean vs sample, clamp before vs after the resize). Reported."""
    tiny, cond, adapter, rec = setup
    sigmas = rec["sigmas"]
    g = torch.Generator().manual_seed(SEED)  # the pipeline's draws, in its order
    n15, _vae_eps = torch.randn(1, 4, SD // 8, SD // 8, generator=g), torch.randn(1, 4, XL // 8, XL // 8, generator=g)
    nxl, n15_stage2 = torch.randn(1, 4, XL // 8, XL // 8, generator=g), torch.randn(1, 4, SD // 8, SD // 8, generator=g)
    stage1 = comfy.samplers.CFGGuider(tiny.sd15_model)
    stage1.set_conds(cond["sd15_positive"], cond["sd15_negative"])
    stage1.set_cfg(CFG)
    noise = n15 * (rec["init_noise_sigma"] / float(sigmas[0]))
    lat15 = stage1.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas.clone(),
                          disable_pbar=True, seed=0)
    packing = LatentPacking((1, 4, XL // 8, XL // 8), (1, 4, SD // 8, SD // 8))
    xl, _ = XAdapterSampler().sample(_Noise(packing.pack(nxl, n15_stage2)), _guider(tiny, cond, adapter),
                                     comfy.samplers.sampler_object("euler"), sigmas, {"samples": lat15},
                                     tiny.sd15_vae, tiny.sdxl_vae, XL, XL, AGS)
    samples = xl["samples"] * tiny.sdxl_model.model.latent_format.scale_factor
    row = _report("nodes with the pipeline's sigmas and noise (hand-over conventions differ)", samples, rec["final"])
    assert math.isfinite(row["max_abs"]) and row["mean_abs"] < row["ref_std"]


def test_whole_workflow_as_wired_reports_its_difference(setup):
    """The nodes as a user wires them (KSampler-style stage 1 with ComfyUI's own
    "normal" schedule and RandomNoise, then the X-Adapter Sampler): not equal to the
    pipeline by construction (module docstring); the difference is reported, and the
    result must be a finite SDXL latent of the right size that the adapter moved."""
    tiny, cond, adapter, rec = setup
    sampling = tiny.sdxl_model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", N)
    stage1 = comfy.samplers.CFGGuider(tiny.sd15_model)
    stage1.set_conds(cond["sd15_positive"], cond["sd15_negative"])
    stage1.set_cfg(CFG)
    empty = torch.zeros(1, 4, SD // 8, SD // 8)
    lat15 = stage1.sample(Noise_RandomNoise(SEED).generate_noise({"samples": empty}), empty,
                          comfy.samplers.sampler_object("euler"), sigmas.clone(), disable_pbar=True, seed=SEED)
    args = (Noise_RandomNoise(SEED), None, comfy.samplers.sampler_object("euler"), sigmas, {"samples": lat15},
            tiny.sd15_vae, tiny.sdxl_vae, XL, XL, AGS)
    xl, _ = XAdapterSampler().sample(args[0], _guider(tiny, cond, adapter), *args[2:])
    samples = xl["samples"] * tiny.sdxl_model.model.latent_format.scale_factor
    row = _report("whole workflow, ComfyUI's own schedule/noise/VAE conventions", samples, rec["final"])
    assert samples.shape == rec["final"].shape and math.isfinite(row["max_abs"])
    (plain_guider,) = XAdapterGuiderNode().get_guider(
        tiny.sd15_model, cond["sd15_positive"], cond["sd15_negative"], tiny.sdxl_model, cond["sdxl_positive"],
        cond["sdxl_negative"], adapter, 0.0, 0.0, CFG, CFG)
    plain, _ = XAdapterSampler().sample(args[0], plain_guider, *args[2:])
    assert (plain["samples"] - xl["samples"]).abs().max() > 1e-3
