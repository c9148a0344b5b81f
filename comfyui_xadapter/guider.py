"""The X-Adapter guider: stage 2 of the method inside ComfyUI's own sampling.

`XAdapterGuider` is a `comfy.samplers.CFGGuider` for the SDXL MODEL that also runs the
SD1.5 MODEL at the same sigma. The sampler sees one tensor, the SDXL latent and the SD1.5
latent packed side by side per batch row (`LatentPacking`), so every ComfyUI sampler and
schedule steps both branches alike. Each model call:

1. SD1.5 runs through ComfyUI's `sampling_function` with its own conds and CFG, so LoRA
   weight patches, ControlNets/T2I-Adapters in its conditioning and `model_options`
   patches (IP-Adapter's attention patches among them) all act as in a plain KSampler.
   An `output_block_patch` and a forward pre-hook on `diffusion_model.out` capture the
   decoder features f0, f1, f2 (diffusers' up_blocks[1..3] outputs) per cond/uncond.
2. The mapping layers (xa_runtime.models.mapping) turn them into residuals r0, r1, r2.
3. SDXL runs through `sampling_function` with an `output_block_patch` that injects the
   residual of the matching cond/uncond (h + scale*r, or the fusion lerp) into the hidden
   state entering output blocks 0 (after the middle block), and the first output blocks
   of its up_blocks[1] and [2] (after up_blocks[0] and [1]).

The SD1.5 MODEL and the mapping layers are registered as additional models of (a clone
of) the SDXL MODEL, so ComfyUI loads, budgets and offloads them like any other model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
from xa_runtime.models.mapping import MappingLayers, fit_features, inject_residual

ADDITIONAL_MODELS_KEY = "xadapter"


class XAdapterInputError(ValueError):
    """A user's mistake in an X-Adapter node's inputs (the message names the input)."""


# ---------------------------------------------------------------------------- block ids
def _output_block_starts(diffusion_model: Any) -> list[int]:
    """Index of the first output block of each diffusers up_block (deepest level first:
    ComfyUI's UNet has num_res_blocks+1 output blocks per level)."""
    per_level = [n + 1 for n in reversed(diffusion_model.num_res_blocks)]
    starts, total = [], 0
    for n in per_level:
        starts.append(total)
        total += n
    return starts


def sd15_capture_blocks(diffusion_model: Any) -> tuple[int, int]:
    """Output blocks whose *input* hidden state is f0 (up_blocks[1]'s output) and f1
    (up_blocks[2]'s output); f2 (up_blocks[3]'s output) is the input of `out`."""
    starts = _output_block_starts(diffusion_model)
    return starts[2], starts[3]


def sdxl_inject_blocks(diffusion_model: Any) -> tuple[int, int, int]:
    """Output blocks whose input hidden state receives r0 (after the middle block),
    r1 (after up_blocks[0]) and r2 (after up_blocks[1])."""
    starts = _output_block_starts(diffusion_model)
    return starts[0], starts[1], starts[2]


def unet_widths(diffusion_model: Any) -> list[int]:
    """diffusers' block_out_channels of a ComfyUI UNet."""
    return [diffusion_model.model_channels * m for m in diffusion_model.channel_mult]


# ---------------------------------------------------------------------------- packing
@dataclass(frozen=True)
class LatentPacking:
    """SDXL latent (B x C x H x W) and SD1.5 latent (B x C x h x w) side by side in one
    B x C x (H*W + h*w) x 1 tensor: samplers only do elementwise work and per-row sigma
    scaling, so both branches step exactly as they would alone."""

    sdxl_shape: tuple[int, ...]
    sd15_shape: tuple[int, ...]

    @property
    def packed_shape(self) -> tuple[int, int, int, int]:
        b, c = self.sdxl_shape[:2]
        return (b, c, math.prod(self.sdxl_shape[2:]) + math.prod(self.sd15_shape[2:]), 1)

    def pack(self, sdxl: torch.Tensor, sd15: torch.Tensor) -> torch.Tensor:
        b, c = sdxl.shape[:2]
        return torch.cat([sdxl.reshape(b, c, -1), sd15.to(sdxl.dtype).reshape(b, c, -1)], dim=2).unsqueeze(-1)

    def unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = math.prod(self.sdxl_shape[2:])
        flat = packed.squeeze(-1)
        b, c = flat.shape[:2]
        return (flat[:, :, :n].reshape(b, c, *self.sdxl_shape[2:]),
                flat[:, :, n:].reshape(b, c, *self.sd15_shape[2:]))

    @classmethod
    def check(cls, sdxl: torch.Tensor, sd15: torch.Tensor) -> "LatentPacking":
        if sdxl.ndim != 4 or sd15.ndim != 4:
            raise XAdapterInputError(
                f"X-Adapter works on image latents (B x C x H x W); got sdxl latent {tuple(sdxl.shape)} "
                f"and sd15_latent {tuple(sd15.shape)}")
        if sdxl.shape[:2] != sd15.shape[:2]:
            raise XAdapterInputError(
                f"sd15_latent has batch x channels {tuple(sd15.shape[:2])} but the SDXL latent has "
                f"{tuple(sdxl.shape[:2])}: both branches denoise the same batch")
        return cls(tuple(sdxl.shape), tuple(sd15.shape))


# ---------------------------------------------------------------------------- features
@dataclass
class FeatureCapture:
    """Collects SD1.5's decoder features of one `sampling_function` call, per model call
    (a call may batch cond and uncond, or run them apart), then averages them per cond
    index (0 positive, 1 negative) as ComfyUI averages several cond entries' outputs."""

    blocks: tuple[int, int]
    calls: list[dict[str, Any]] = field(default_factory=list)

    def output_block_patch(self, h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict) -> tuple:
        block = transformer_options.get("block", (None, None))
        if block[0] == "output" and block[1] in self.blocks:
            if block[1] == self.blocks[0]:
                self.calls.append({"cond_or_uncond": list(transformer_options["cond_or_uncond"]), "f": []})
            self.calls[-1]["f"].append(h)
        return h, hsp

    def out_pre_hook(self, module: torch.nn.Module, args: tuple) -> None:
        if self.calls and len(self.calls[-1]["f"]) == 2:
            self.calls[-1]["f"].append(args[0])

    def per_cond(self) -> dict[int, tuple[torch.Tensor, ...]]:
        sums: dict[int, list[torch.Tensor]] = {}
        counts: dict[int, int] = {}
        for call in self.calls:
            if len(call["f"]) != 3:
                raise RuntimeError("X-Adapter: the SD1.5 model call did not pass all three feature points "
                                   "(is a patch replacing its output blocks?)")
            chunks = len(call["cond_or_uncond"])
            split = [f.chunk(chunks) for f in call["f"]]
            for j, index in enumerate(call["cond_or_uncond"]):
                feats = [s[j] for s in split]
                if index in sums:
                    sums[index] = [a + b for a, b in zip(sums[index], feats)]
                else:
                    sums[index] = feats
                counts[index] = counts.get(index, 0) + 1
        self.calls.clear()
        return {i: tuple(f / counts[i] for f in fs) if counts[i] > 1 else tuple(fs) for i, fs in sums.items()}


@dataclass
class ResidualInjector:
    """SDXL's `output_block_patch`: adds the residual of each chunk's cond index."""

    blocks: tuple[int, int, int]
    scale: float
    fusion: float | None
    residuals: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def output_block_patch(self, h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict) -> tuple:
        block = transformer_options.get("block", (None, None))
        if block[0] != "output" or block[1] not in self.blocks or not self.residuals:
            return h, hsp
        site = self.blocks.index(block[1])
        order = transformer_options["cond_or_uncond"]
        missing = [i for i in order if i not in self.residuals]
        if missing:
            raise RuntimeError(f"X-Adapter: no SD1.5 features for cond index {missing[0]} (0 positive, 1 negative)")
        r = torch.cat([self.residuals[i][site] for i in order])
        if r.shape != h.shape:
            raise XAdapterInputError(
                f"X-Adapter residual {tuple(r.shape)} does not fit the SDXL hidden state {tuple(h.shape)} "
                f"at output block {block[1]}: do the SD1.5 and SDXL latents have the same batch size?")
        return inject_residual(h, r.to(h.device), self.scale, self.fusion), hsp


def mapping_patcher(mapping: MappingLayers) -> Any:
    """The mapping layers as a ModelPatcher, so that ComfyUI loads and offloads them."""
    return comfy.model_patcher.ModelPatcher(mapping, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def _with_output_patch(model_options: dict, patch: Any) -> dict:
    """A copy of `model_options` with one more output_block_patch (the caller's dicts untouched)."""
    options = model_options.copy()
    to = dict(options.get("transformer_options", {}))
    patches = dict(to.get("patches", {}))
    patches["output_block_patch"] = list(patches.get("output_block_patch", [])) + [patch]
    to["patches"] = patches
    options["transformer_options"] = to
    return options


def _refuse_areas(conds: dict[str, list[dict]], side: str) -> None:
    for name, entries in conds.items():
        for entry in entries:
            if entry.get("area") is not None or entry.get("mask") is not None:
                raise XAdapterInputError(
                    f"{side}_{name}: area or mask conditioning is not supported by X-Adapter (its features "
                    "are whole-image); combine full-image conds instead")


# ---------------------------------------------------------------------------- guider
class XAdapterGuider(comfy.samplers.CFGGuider):
    """CFGGuider of the SDXL MODEL that runs the SD1.5 MODEL beside it (module docstring).

    `sample` takes the packed latent and noise of a `LatentPacking` set with `set_packing`
    (the X-Adapter Sampler node does both).
    """

    def __init__(self, sdxl: Any, sd15: Any, mapping_patcher: Any, *, adapter_condition_scale: float = 1.0,
                 fusion_guidance_scale: float | None = None):
        super().__init__(sdxl.clone())  # the clone carries the additional models `sample` registers
        self.sd15_patcher = sd15
        self.mapping_patcher = mapping_patcher
        self.sd15_cfg = 1.0
        self.sd15_original_conds: dict[str, list[dict]] = {}
        self.packing: LatentPacking | None = None
        self.capture = FeatureCapture(sd15_capture_blocks(sd15.model.diffusion_model))
        self.injector = ResidualInjector(sdxl_inject_blocks(sdxl.model.diffusion_model), adapter_condition_scale,
                                         fusion_guidance_scale)

    @property
    def mapping(self) -> MappingLayers:
        return self.mapping_patcher.model

    # -- configuration
    def set_sd15_conds(self, positive: list, negative: list) -> None:
        self.sd15_original_conds = {
            "positive": comfy.sampler_helpers.convert_cond(positive),
            "negative": comfy.sampler_helpers.convert_cond(negative),
        }

    def set_sd15_cfg(self, cfg: float) -> None:
        self.sd15_cfg = cfg

    def set_packing(self, packing: LatentPacking) -> None:
        self.packing = packing

    def _sd15_controlnets(self) -> list:
        return list({id(c["control"]): c["control"] for cs in self.sd15_original_conds.values()
                     for c in cs if "control" in c}.values())

    # -- sampling
    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        if self.packing is None or tuple(latent_image.shape) != self.packing.packed_shape:
            raise XAdapterInputError(
                "guider: the X-Adapter guider samples the packed latents of the 'X-Adapter Sampler' node; "
                "connect it there instead of to SamplerCustomAdvanced")
        if denoise_mask is not None:
            raise XAdapterInputError("latent: X-Adapter does not support a noise mask (inpainting)")
        _refuse_areas(self.original_conds, "sdxl")
        _refuse_areas(self.sd15_original_conds, "sd15")
        # ControlNets of the SD1.5 conds are loaded with the SD1.5 model
        cnet_models = [m for c in self._sd15_controlnets() for m in c.get_models()]
        self.model_patcher.set_additional_models(ADDITIONAL_MODELS_KEY,
                                                 [self.sd15_patcher, self.mapping_patcher] + cnet_models)
        self.sd15_conds = {k: [c.copy() for c in v] for k, v in self.sd15_original_conds.items()}
        comfy.samplers.preprocess_conds_hooks(self.sd15_conds)
        self.sd15_options = comfy.model_patcher.create_model_options_clone(self.sd15_patcher.model_options)
        self.sd15_options.setdefault("transformer_options", {})
        if not math.isclose(self.cfg, 1.0):  # SDXL's uncond needs SD1.5's uncond features
            self.sd15_options["disable_cfg1_optimization"] = True
        comfy.sampler_helpers.prepare_model_patcher(self.sd15_patcher, self.sd15_conds, self.sd15_options)
        comfy.samplers.filter_registered_hooks_on_conds(self.sd15_conds, self.sd15_options)
        try:
            return super().sample(noise, latent_image, sampler, sigmas, None, callback, disable_pbar, seed)
        finally:
            self.sd15_patcher.restore_hook_patches()
            for cnet in self._sd15_controlnets():
                cnet.cleanup()
            self.injector.residuals = {}
            del self.sd15_conds, self.sd15_options

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        out_module = self.sd15_patcher.model.diffusion_model.out
        handle = out_module.register_forward_pre_hook(self.capture.out_pre_hook)
        try:
            self.sd15_patcher.pre_run()
            return super().outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        finally:
            handle.remove()
            self.sd15_patcher.cleanup()
            self.capture.calls.clear()

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        packing = self.packing
        sd15_model = self.sd15_patcher.model
        xl_noise, sd_noise = packing.unpack(noise)
        xl_latent, sd_latent = packing.unpack(latent_image)
        if torch.count_nonzero(xl_latent) > 0:
            xl_latent = self.inner_model.process_latent_in(xl_latent)
        if torch.count_nonzero(sd_latent) > 0:
            sd_latent = sd15_model.process_latent_in(sd_latent)
        self.conds = comfy.samplers.process_conds(self.inner_model, xl_noise, self.conds, device, xl_latent, None, seed)
        self.sd15_conds = comfy.samplers.process_conds(sd15_model, sd_noise, self.sd15_conds, device, sd_latent, None, seed)
        self.sd15_options["transformer_options"]["sample_sigmas"] = sigmas
        self.sd15_run_options = _with_output_patch(self.sd15_options, self.capture.output_block_patch)

        extra_model_options = comfy.model_patcher.create_model_options_clone(self.model_options)
        extra_model_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        extra_model_options = _with_output_patch(extra_model_options, self.injector.output_block_patch)
        extra_args = {"model_options": extra_model_options, "seed": seed}
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
            sampler.sample, sampler,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE,
                                                     extra_args["model_options"], is_model_options=True))
        samples = executor.execute(self, sigmas, extra_args, callback, noise, packing.pack(xl_latent, sd_latent),
                                   None, disable_pbar)
        xl, sd = packing.unpack(samples.to(torch.float32))
        return packing.pack(self.inner_model.process_latent_out(xl), sd15_model.process_latent_out(sd))

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        xl, sd = self.packing.unpack(x)
        sd15_model = self.sd15_patcher.model
        self.capture.calls.clear()
        denoised_sd = comfy.samplers.sampling_function(
            sd15_model, sd, timestep, self.sd15_conds.get("negative"), self.sd15_conds.get("positive"), self.sd15_cfg,
            model_options=self.sd15_run_options, seed=seed)
        self.injector.residuals = self.residuals(self.capture.per_cond(), xl.shape[-2:])
        denoised_xl = comfy.samplers.sampling_function(
            self.inner_model, xl, timestep, self.conds.get("negative"), self.conds.get("positive"), self.cfg,
            model_options=model_options, seed=seed)
        return self.packing.pack(denoised_xl, denoised_sd)

    def residuals(self, features: dict[int, tuple[torch.Tensor, ...]], latent_hw: tuple[int, int]) -> dict:
        """Mapping layers on each cond index's features -> (r0, r1, r2), not yet scaled."""
        weight = next(self.mapping.parameters())
        order = sorted(features)
        rows = [features[i][0].shape[0] for i in order]
        # cond and uncond through the mapping layers in one batch, as the pipeline does
        feats = tuple(torch.cat([features[i][n] for i in order]).to(weight.device, weight.dtype) for n in range(3))
        with torch.no_grad():
            residuals = self.mapping(*fit_features(feats, tuple(latent_hw)))
        split = [r.split(rows) for r in residuals]
        return {index: tuple(s[j] for s in split) for j, index in enumerate(order)}
