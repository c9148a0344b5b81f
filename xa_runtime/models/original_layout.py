"""diffusers -> original (CompVis/LDM, "single-file") state-dict layout.

The inverse of diffusers' own LDM -> diffusers converters (loaders/single_file_utils.py),
so that the tiny models can be written as the single files users download
(`v1-5-pruned-emaonly.safetensors`, `sd_xl_base_1.0.safetensors`, `sdxl_vae.safetensors`)
and the loaders read them through the same path as the real ones. Layer counts come
from the module configs, so the same code serves tiny and full-size models.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .components import SD15Components, SDXLComponents

StateDict = dict[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    # SDXL's added (pooled text + size/crop) embedding is "label_emb" in the original code.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP_LEVEL = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "conv_norm_out": "norm_out",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _split(key: str, depth: int) -> tuple[str, str]:
    """("a.b.c.d.weight", 2) -> ("a.b", "c.d.weight")."""
    parts = key.split(".")
    return ".".join(parts[:depth]), ".".join(parts[depth:])


def _rename_head(rest: str, table: Mapping[str, str]) -> str:
    # Module names within a block: the longest diffusers name that prefixes `rest` wins.
    for old in sorted(table, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return table[old] + rest[len(old):]
    return rest


def unet_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """A diffusers UNet2DConditionModel state dict in the LDM `openaimodel` layout (no prefix).

    input_blocks: 0 is conv_in, then per down stage `layers_per_block` (resnet[, attention])
    entries and one downsampler; output_blocks: per up stage `layers_per_block + 1` entries
    of (resnet[, attention][, upsampler]); middle_block: resnet, attention, resnet.
    """
    per_down = config["layers_per_block"] + 1  # resnets plus the downsampler slot
    per_up = config["layers_per_block"] + 1
    out: StateDict = {}
    for key, value in state.items():
        top = _rename_head(key, _UNET_TOP_LEVEL)
        if top != key:
            new = top
        elif key.startswith("down_blocks."):
            _, block, kind, idx, rest = key.split(".", 4)
            slot = 1 + int(block) * per_down + int(idx)
            if kind == "resnets":
                new = f"input_blocks.{slot}.0.{_rename_head(rest, _UNET_RESNET)}"
            elif kind == "attentions":
                new = f"input_blocks.{slot}.1.{rest}"
            elif kind == "downsamplers":  # downsamplers.0.conv.* -> the stage's last slot, ".op"
                new = f"input_blocks.{(int(block) + 1) * per_down}.0.op.{rest.removeprefix('conv.')}"
            else:
                raise KeyError(key)
        elif key.startswith("mid_block."):
            _, kind, idx, rest = key.split(".", 3)
            if kind == "resnets":
                new = f"middle_block.{2 * int(idx)}.{_rename_head(rest, _UNET_RESNET)}"
            else:
                new = f"middle_block.{2 * int(idx) + 1}.{rest}"
        elif key.startswith("up_blocks."):
            _, block_str, kind, idx, rest = key.split(".", 4)
            block = int(block_str)
            if kind == "resnets":
                new = f"output_blocks.{block * per_up + int(idx)}.0.{_rename_head(rest, _UNET_RESNET)}"
            elif kind == "attentions":
                new = f"output_blocks.{block * per_up + int(idx)}.1.{rest}"
            elif kind == "upsamplers":
                # The upsampler follows the last resnet, after its attention if the stage has one.
                has_attention = "CrossAttn" in config["up_block_types"][block]
                slot = 2 if has_attention else 1
                new = f"output_blocks.{block * per_up + per_up - 1}.{slot}.{rest}"
            else:
                raise KeyError(key)
        else:
            raise KeyError(f"no original-layout name for UNet parameter {key!r}")
        out[new] = value
    return out


def vae_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """A diffusers AutoencoderKL state dict in the LDM autoencoder layout (no prefix).

    Decoder stages are numbered the other way round (diffusers up_blocks.0 is LDM up.{n-1}),
    and the mid attention's linear projections are 1x1 convs there.
    """
    n = len(config["up_block_types"])
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            out[key] = value
            continue
        coder, rest = key.split(".", 1)  # "encoder" / "decoder"
        parts = rest.split(".")
        if parts[0] in ("down_blocks", "up_blocks"):
            stage = int(parts[1])
            name = "down" if parts[0] == "down_blocks" else "up"
            ldm_stage = stage if name == "down" else n - 1 - stage
            inner = ".".join(parts[4:])
            if parts[2] == "resnets":
                inner = _rename_head(inner, {"conv_shortcut": "nin_shortcut"})
                new = f"{name}.{ldm_stage}.block.{parts[3]}.{inner}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = f"{name}.{ldm_stage}.{'downsample' if name == 'down' else 'upsample'}.{inner}"
        elif parts[0] == "mid_block":
            inner = ".".join(parts[3:])
            if parts[1] == "resnets":
                new = f"mid.block_{int(parts[2]) + 1}.{_rename_head(inner, {'conv_shortcut': 'nin_shortcut'})}"
            else:
                new = f"mid.attn_{int(parts[2]) + 1}.{_rename_head(inner, _VAE_ATTENTION)}"
                if value.ndim == 2:  # linear -> 1x1 conv
                    value = value[:, :, None, None]
        else:
            new = _rename_head(rest, _VAE_TOP_LEVEL)
        out[f"{coder}.{new}"] = value
    return out


def clip_to_original(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """A transformers CLIPTextModel state dict in the HF layout the single files carry,
    under `prefix` (e.g. "cond_stage_model.transformer.").

    transformers >= 5.6 flattened CLIPTextModel (no "text_model." level); the files keep it.
    """
    out: StateDict = {}
    for key, value in state.items():
        inner = key if key.startswith("text_model.") else f"text_model.{key}"
        out[prefix + inner] = value
    return out


def openclip_to_original(state: Mapping[str, torch.Tensor], prefix: str = SDXL_OPENCLIP_PREFIX) -> StateDict:
    """A transformers CLIPTextModelWithProjection (OpenCLIP-bigG) state dict in open_clip's
    layout under `prefix`: fused q,k,v `in_proj`, `resblocks`, and `text_projection` as a
    plain (hidden x projection) matrix, i.e. transposed relative to the HF linear weight."""
    s = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: StateDict = {
        "token_embedding.weight": s.pop("embeddings.token_embedding.weight"),
        "positional_embedding": s.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": s.pop("final_layer_norm.weight"),
        "ln_final.bias": s.pop("final_layer_norm.bias"),
        "text_projection": s.pop("text_projection.weight").T.contiguous(),
    }
    layers = sorted({int(k.split(".")[2]) for k in s if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [s.pop(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
        for key in [k for k in s if k.startswith(src)]:
            out[dst + _rename_head(key[len(src):], _OPENCLIP_LAYER)] = s.pop(key)
    if s:
        raise KeyError(f"no open_clip name for {sorted(s)}")
    return {prefix + k: v for k, v in out.items()}


def _prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {prefix + k: v for k, v in state.items()}


def _detached(module: torch.nn.Module) -> StateDict:
    # safetensors refuses strided tensors; parameters never share storage, so no copy is needed.
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def sd15_to_original(sd15: SD15Components) -> StateDict:
    """Everything of an SD1.5 model as one original-layout state dict (UNet, VAE, CLIP-L)."""
    out = _prefixed(unet_to_original(_detached(sd15.unet), sd15.unet.config), UNET_PREFIX)
    out.update(_prefixed(vae_to_original(_detached(sd15.vae), sd15.vae.config), VAE_PREFIX))
    out.update(clip_to_original(_detached(sd15.text_encoder), SD15_CLIP_PREFIX))
    return out


def sdxl_to_original(sdxl: SDXLComponents) -> StateDict:
    """Everything of an SDXL base model as one original-layout state dict
    (UNet incl. label_emb, VAE, CLIP-L as embedders.0, OpenCLIP-bigG as embedders.1)."""
    out = _prefixed(unet_to_original(_detached(sdxl.unet), sdxl.unet.config), UNET_PREFIX)
    out.update(_prefixed(vae_to_original(_detached(sdxl.vae), sdxl.vae.config), VAE_PREFIX))
    out.update(clip_to_original(_detached(sdxl.text_encoder), SDXL_CLIP_PREFIX))
    out.update(openclip_to_original(_detached(sdxl.text_encoder_2), SDXL_OPENCLIP_PREFIX))
    return out
