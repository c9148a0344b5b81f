"""Tiny ComfyUI models carrying the weights of xa_runtime's tiny models (test helper).

ComfyUI's model detection refuses widths this small, so the models are built the way its
loaders build them after detection: `supported_models.SD15/SDXL(unet_config)` with the
config detected from the original-layout weights, `get_model`, `load_model_weights`, a
`ModelPatcher`; VAEs through `comfy.sd.VAE` with an explicit config. The heads and the
SDXL size embedding are set to the tiny presets' values, so ComfyUI's UNets compute what
the diffusers UNets of the same weights compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep
from xa_runtime.models.original_layout import unet_to_original, vae_to_original
from xa_runtime.models.tiny import build_tiny_models

UNET_PREFIX = "model.diffusion_model."


def comfy_unet(unet: torch.nn.Module, family: str) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI MODEL with the weights of the diffusers UNet `unet` ("sd15" or "sdxl")."""
    config = dict(unet.config)
    state = {UNET_PREFIX + k: v.detach().clone() for k, v in unet_to_original(unet.state_dict(), config).items()}
    unet_config = comfy.model_detection.detect_unet_config(state, UNET_PREFIX)
    model_config = (comfy.supported_models.SD15 if family == "sd15" else comfy.supported_models.SDXL)(unet_config)
    heads = config["attention_head_dim"]
    if family == "sd15":  # diffusers' SD1.5 attention_head_dim is the number of heads
        model_config.unet_config.update(num_heads=heads if isinstance(heads, int) else heads[0], num_head_channels=-1)
    else:  # SDXL: same channels per head at every attention level
        widths = config["block_out_channels"]
        per_head = {w // h for w, h, t in zip(widths, heads, config["down_block_types"]) if "CrossAttn" in t}
        assert len(per_head) == 1, per_head
        model_config.unet_config.update(num_heads=-1, num_head_channels=per_head.pop())
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(state, "model.", device="cpu")
    if family == "sdxl":
        model.embedder = Timestep(config["addition_time_embed_dim"])
    model.load_model_weights(state, UNET_PREFIX)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def comfy_vae(vae: torch.nn.Module) -> comfy.sd.VAE:
    """A ComfyUI VAE with the weights of a diffusers AutoencoderKL."""
    config = dict(vae.config)
    widths = config["block_out_channels"]
    ddconfig = {"double_z": True, "z_channels": config["latent_channels"], "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": widths[0], "ch_mult": [w // widths[0] for w in widths],
                "num_res_blocks": config["layers_per_block"], "attn_resolutions": [], "dropout": 0.0}
    state = vae_to_original({k: v.detach().clone() for k, v in vae.state_dict().items()}, config)
    out = comfy.sd.VAE(sd=state, config={"params": {"ddconfig": ddconfig, "embed_dim": config["latent_channels"]}},
                       dtype=torch.float32)
    return out


@dataclass
class TinyComfy:
    """xa_runtime's tiny models and their ComfyUI counterparts (same weights)."""

    sd15: Any  # xa_runtime SD15Components
    sdxl: Any
    mapping: Any  # MappingLayers
    sd15_model: comfy.model_patcher.ModelPatcher
    sdxl_model: comfy.model_patcher.ModelPatcher
    sd15_vae: comfy.sd.VAE
    sdxl_vae: comfy.sd.VAE


def build(seed: int = 0) -> TinyComfy:
    sd15, sdxl, mapping = build_tiny_models(seed)
    return TinyComfy(sd15, sdxl, mapping, comfy_unet(sd15.unet, "sd15"), comfy_unet(sdxl.unet, "sdxl"),
                     comfy_vae(sd15.vae), comfy_vae(sdxl.vae))


def random_embeddings(tiny: TinyComfy, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Text-encoder outputs of the right shapes (diffusers' names), seeded."""
    g = torch.Generator().manual_seed(seed)
    ctx15 = tiny.sd15.unet.config["cross_attention_dim"]
    ctxxl = tiny.sdxl.unet.config["cross_attention_dim"]
    pooled = tiny.sdxl.unet.config["projection_class_embeddings_input_dim"] - 6 * tiny.sdxl.unet.config["addition_time_embed_dim"]
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {"prompt_embeds_sd15": r(batch, 77, ctx15), "negative_prompt_embeds_sd15": r(batch, 77, ctx15),
            "prompt_embeds": r(batch, 77, ctxxl), "negative_prompt_embeds": r(batch, 77, ctxxl),
            "pooled_prompt_embeds": r(batch, pooled), "negative_pooled_prompt_embeds": r(batch, pooled)}


def conditioning(emb: dict[str, torch.Tensor], width: int, height: int) -> dict[str, list]:
    """ComfyUI CONDITIONING for both branches from `random_embeddings` (SDXL's size
    conditioning as the pipeline's time_ids: original = target = width x height, no crop)."""
    size = {"width": width, "height": height, "target_width": width, "target_height": height,
            "crop_w": 0, "crop_h": 0}
    return {
        "sd15_positive": [[emb["prompt_embeds_sd15"], {}]],
        "sd15_negative": [[emb["negative_prompt_embeds_sd15"], {}]],
        "sdxl_positive": [[emb["prompt_embeds"], dict(size, pooled_output=emb["pooled_prompt_embeds"])]],
        "sdxl_negative": [[emb["negative_prompt_embeds"], dict(size, pooled_output=emb["negative_pooled_prompt_embeds"])]],
    }
