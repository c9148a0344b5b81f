"""The X-Adapter nodes: load the mapping checkpoint, build the guider, run stage 2.

A whole X-Adapter generation is a small workflow of ComfyUI's own nodes plus these three:
a KSampler on the SD1.5 MODEL (stage 1, with whatever LoRA, ControlNet or IP-Adapter
nodes act on it), then `XAdapterSampler`, which hands the SD1.5 result over to SDXL
(SD1.5 VAE decode -> resize -> SDXL VAE encode) and runs the last `adapter_guidance_start`
share of the SDXL schedule with the `XAdapterGuider` (both branches in lockstep, SD1.5's
decoder features mapped into SDXL's decoder). Workflows: `example_workflows/` beside this file (ComfyUI lists them as templates).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import comfy.latent_formats
import comfy.model_management
import comfy.utils
import folder_paths
import latent_preview
from xa_runtime.errors import CheckpointError
from xa_runtime.loading.adapter_checkpoint import ADAPTER_SUFFIXES, load_mapping
from xa_runtime.models.mapping import MappingConfig, MappingLayers

from .guider import LatentPacking, XAdapterGuider, XAdapterInputError, mapping_patcher, unet_widths

FOLDER = "xadapter"  # models/xadapter/: X_Adapter_v1.bin or a .safetensors copy
CATEGORY = "sampling/x-adapter"
DTYPES = {"default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def register_model_folder() -> None:
    """models/xadapter/ in ComfyUI's model folders (extra_model_paths.yaml may add more)."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = (
            [os.path.join(folder_paths.models_dir, FOLDER)], set(ADAPTER_SUFFIXES))


class XAdapter:
    """The XADAPTER value: the mapping layers and the name of the file they came from."""

    def __init__(self, mapping: MappingLayers, name: str):
        self.mapping = mapping
        self.name = name
        self.patcher = mapping_patcher(mapping)  # one per loaded file: ComfyUI tracks it while loaded

    @property
    def config(self) -> MappingConfig:
        return self.mapping.config


class XAdapterLoader:
    DESCRIPTION = ("Loads the X-Adapter mapping layers (X_Adapter_v1.bin or a .safetensors copy, unchanged) "
                   "from models/xadapter.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("XADAPTER",)
    RETURN_NAMES = ("xadapter",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "adapter_name": (folder_paths.get_filename_list(FOLDER), {
                "tooltip": "The X-Adapter checkpoint in models/xadapter."}),
            "weight_dtype": (list(DTYPES), {
                "default": "default",
                "tooltip": "default: fp16 where the device runs it well, else fp32 (the features are cast to it)."}),
        }}

    def load(self, adapter_name: str, weight_dtype: str = "default"):
        path = folder_paths.get_full_path_or_raise(FOLDER, adapter_name)
        dtype = DTYPES[weight_dtype]
        if dtype is None:
            dtype = torch.float16 if comfy.model_management.should_use_fp16(prioritize_performance=False) else torch.float32
        try:
            mapping = load_mapping(path, dtype=dtype, device=comfy.model_management.unet_offload_device())
        except CheckpointError as exc:
            raise XAdapterInputError(f"adapter_name: {adapter_name!r} is not a usable X-Adapter checkpoint: {exc}") from None
        return (XAdapter(mapping, adapter_name),)


def _check_family(model, name: str, latent_format: type, levels: int, what: str) -> list[int]:
    base = getattr(model, "model", None)
    diffusion_model = getattr(base, "diffusion_model", None)
    if (diffusion_model is None or not isinstance(getattr(base, "latent_format", None), latent_format)
            or not hasattr(diffusion_model, "output_blocks") or len(diffusion_model.channel_mult) != levels):
        found = type(base).__name__ if base is not None else type(model).__name__
        raise XAdapterInputError(f"{name}: X-Adapter needs {what} here; got model class {found}")
    return unet_widths(diffusion_model)


def check_models(sd15_model, sdxl_model, xadapter: XAdapter) -> None:
    """Each MODEL of the right family, and the adapter's widths those of the two UNets."""
    sd15 = _check_family(sd15_model, "sd15_model", comfy.latent_formats.SD15, 4, "an SD1.5 model (4 UNet levels)")
    sdxl = _check_family(sdxl_model, "sdxl_model", comfy.latent_formats.SDXL, 3, "an SDXL model (3 UNet levels)")
    want = MappingConfig.from_unet_configs({"block_out_channels": sd15}, {"block_out_channels": sdxl})
    have = xadapter.config
    if (have.in_channels, have.out_channels) != (want.in_channels, want.out_channels):
        raise XAdapterInputError(
            f"xadapter: {xadapter.name!r} maps features {have.in_channels} -> {have.out_channels}, but these "
            f"models need {want.in_channels} -> {want.out_channels}")


class XAdapterGuiderNode:
    DESCRIPTION = ("X-Adapter stage 2 as a GUIDER: the SD1.5 model (with its LoRAs, ControlNets, IP-Adapter "
                   "patches) runs beside SDXL at every step and steers SDXL's decoder. Feed it to X-Adapter Sampler.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls):
        cfg = {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}
        return {"required": {
            "sd15_model": ("MODEL", {"tooltip": "The SD1.5 model, with its plugins applied."}),
            "sd15_positive": ("CONDITIONING",),
            "sd15_negative": ("CONDITIONING",),
            "sdxl_model": ("MODEL",),
            "sdxl_positive": ("CONDITIONING",),
            "sdxl_negative": ("CONDITIONING",),
            "xadapter": ("XADAPTER",),
            "adapter_condition_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                                  "tooltip": "Strength of the mapped SD1.5 features (0: SDXL alone)."}),
            "fusion_guidance_scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                                "tooltip": "0: add the residuals (the method's default); s > 0: "
                                                           "h + s * (r - h)."}),
            "sd15_cfg": ("FLOAT", dict(cfg, tooltip="CFG of the SD1.5 branch.")),
            "sdxl_cfg": ("FLOAT", dict(cfg, tooltip="CFG of the SDXL branch.")),
        }}

    def get_guider(self, sd15_model, sd15_positive, sd15_negative, sdxl_model, sdxl_positive, sdxl_negative,
                   xadapter, adapter_condition_scale, fusion_guidance_scale, sd15_cfg, sdxl_cfg):
        check_models(sd15_model, sdxl_model, xadapter)
        guider = XAdapterGuider(sdxl_model, sd15_model, xadapter.patcher,
                                adapter_condition_scale=adapter_condition_scale,
                                fusion_guidance_scale=fusion_guidance_scale if fusion_guidance_scale > 0 else None)
        guider.set_conds(sdxl_positive, sdxl_negative)
        guider.set_cfg(sdxl_cfg)
        guider.set_sd15_conds(sd15_positive, sd15_negative)
        guider.set_sd15_cfg(sd15_cfg)
        return (guider,)


def stage2_sigmas(sigmas: torch.Tensor, adapter_guidance_start: float) -> torch.Tensor:
    """The last k = int(N * adapter_guidance_start) steps of an N-step schedule (N + 1 sigmas),
    as xa_runtime's pipeline counts them."""
    n = sigmas.shape[-1] - 1
    k = int(n * adapter_guidance_start)
    if k < 1:
        raise XAdapterInputError(
            f"adapter_guidance_start: {adapter_guidance_start} of {n} steps gives no X-Adapter step; "
            "raise it or the scheduler's steps so that int(steps * adapter_guidance_start) >= 1")
    return sigmas[n - k:]


def hand_over(sd15_samples: torch.Tensor, sd15_vae, sdxl_vae, width: int, height: int) -> torch.Tensor:
    """SD1.5 VAE decode -> resize to width x height -> SDXL VAE encode: the SDXL LATENT
    samples stage 2 starts from. The resize is the bicubic antialiased one of
    xa_runtime's pipeline, on tensors (no 8-bit round trip)."""
    pixels = sd15_vae.decode(sd15_samples)
    if pixels.ndim == 5:  # a VAE that returns frames
        pixels = pixels.reshape(-1, *pixels.shape[-3:])
    chw = pixels[..., :3].movedim(-1, 1).float()
    chw = F.interpolate(chw, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(0.0, 1.0)
    return sdxl_vae.encode(chw.movedim(1, -1))


class XAdapterSampler:
    DESCRIPTION = ("X-Adapter hand-over and stage 2: decodes the SD1.5 result, resizes it to width x height, "
                   "encodes it for SDXL, then denoises both branches from the stage-2 start of the schedule.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("sdxl_latent", "sd15_latent")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "noise": ("NOISE",),
            "guider": ("GUIDER", {"tooltip": "From X-Adapter Guider."}),
            "sampler": ("SAMPLER",),
            "sigmas": ("SIGMAS", {"tooltip": "The whole N-step schedule of the SDXL model (BasicScheduler)."}),
            "sd15_latent": ("LATENT", {"tooltip": "Stage 1: the SD1.5 KSampler's result."}),
            "sd15_vae": ("VAE",),
            "sdxl_vae": ("VAE",),
            "width": ("INT", {"default": 1024, "min": 64, "max": 8192, "step": 8}),
            "height": ("INT", {"default": 1024, "min": 64, "max": 8192, "step": 8}),
            "adapter_guidance_start": ("FLOAT", {"default": 0.9, "min": 0.01, "max": 1.0, "step": 0.01,
                                                 "tooltip": "Share of the schedule run with X-Adapter (the rest is "
                                                            "skipped: stage 2 starts from the hand-over image)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width=1024, height=1024, adapter_guidance_start=0.9):
        # Defining this replaces ComfyUI's own min/max check of these inputs: all checked here.
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or not 64 <= value <= 8192 or value % 8:
                return f"{name}: {value!r} is not a multiple of 8 in [64, 8192] (latents are 1/8 of the image)"
        if not isinstance(adapter_guidance_start, (int, float)) or not 0.0 < adapter_guidance_start <= 1.0:
            return f"adapter_guidance_start: {adapter_guidance_start!r} is outside (0, 1]"
        return True

    def sample(self, noise, guider, sampler, sigmas, sd15_latent, sd15_vae, sdxl_vae, width, height,
               adapter_guidance_start):
        if not isinstance(guider, XAdapterGuider):
            raise XAdapterInputError(f"guider: needs the X-Adapter Guider's output, got {type(guider).__name__}")
        if "noise_mask" in sd15_latent:
            raise XAdapterInputError("sd15_latent: X-Adapter does not support a noise mask (inpainting)")
        sigmas = stage2_sigmas(sigmas, adapter_guidance_start)
        sd15 = sd15_latent["samples"]
        sdxl = hand_over(sd15, sd15_vae, sdxl_vae, width, height).to(sd15.device)
        packing = LatentPacking.check(sdxl, sd15)
        guider.set_packing(packing)
        packed = packing.pack(sdxl, sd15)
        latent = {k: v for k, v in sd15_latent.items() if k == "batch_index"}
        latent["samples"] = packed
        preview = latent_preview.prepare_callback(guider.model_patcher, sigmas.shape[-1] - 1)

        def callback(step, x0, x, total_steps):  # the preview shows the SDXL half
            preview(step, packing.unpack(x0)[0], packing.unpack(x)[0], total_steps)

        samples = guider.sample(noise.generate_noise(latent), packed, sampler, sigmas, callback=callback,
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=noise.seed)
        out_xl, out_sd = packing.unpack(samples.to(comfy.model_management.intermediate_device()))
        return ({"samples": out_xl}, {"samples": out_sd})


NODE_CLASS_MAPPINGS = {
    "XAdapterLoader": XAdapterLoader,
    "XAdapterGuider": XAdapterGuiderNode,
    "XAdapterSampler": XAdapterSampler,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "XAdapterLoader": "Load X-Adapter",
    "XAdapterGuider": "X-Adapter Guider",
    "XAdapterSampler": "X-Adapter Sampler (hand-over + stage 2)",
}
