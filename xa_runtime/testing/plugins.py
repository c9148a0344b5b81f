"""Tiny random plugin files in the layouts users download: ControlNet (diffusers folder and
original-layout single file), T2I-Adapter and Nexus Adapter folders, IP-Adapter files and a
tiny CLIP image encoder, each fitting a given SD1.5 UNet, so that the plugin loaders are
tested on real on-disk formats."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ControlNetModel
from safetensors.torch import save_file

from ..errors import ParameterError
from ..models.original_layout import unet_to_original
from ..plugins.controlnet import build_tiny_controlnet
from ..plugins.ip_adapter_image import CLIP_MEAN, CLIP_STD
from ..plugins.ip_adapter_loading import save_ip_adapter, tiny_ip_adapter_state
from ..plugins.nexus import build_tiny_nexus, config_to_json
from ..plugins.t2i_adapter import build_tiny_t2i_adapter


def controlnet_to_original(controlnet: ControlNetModel) -> dict[str, torch.Tensor]:
    """A ControlNetModel's weights in the original (lllyasviel v1.1) layout, no prefix: the
    inverse of diffusers' `convert_controlnet_checkpoint`, for writing test files."""
    state = {k: v.detach().contiguous() for k, v in controlnet.state_dict().items()}
    shared = ("time_embedding.", "conv_in.", "down_blocks.", "mid_block.")
    out = unet_to_original({k: v for k, v in state.items() if k.startswith(shared)}, dict(controlnet.config))
    emb = "controlnet_cond_embedding."
    n_blocks = len({k.split(".")[2] for k in state if k.startswith(emb + "blocks.")})
    for key, value in state.items():
        if key.startswith(shared):
            continue
        if key.startswith(emb + "conv_in."):
            new = "input_hint_block.0." + key.rsplit(".", 1)[1]
        elif key.startswith(emb + "blocks."):
            _, _, i, leaf = key.split(".")
            new = f"input_hint_block.{2 * (int(i) + 1)}.{leaf}"
        elif key.startswith(emb + "conv_out."):
            new = f"input_hint_block.{2 * (n_blocks + 1)}." + key.rsplit(".", 1)[1]
        elif key.startswith("controlnet_down_blocks."):
            _, i, leaf = key.split(".")
            new = f"zero_convs.{i}.0.{leaf}"
        elif key.startswith("controlnet_mid_block."):
            new = "middle_block_out.0." + key.rsplit(".", 1)[1]
        else:
            raise KeyError(f"no original-layout name for ControlNet parameter {key!r}")
        out[new] = value
    return out


def write_tiny_controlnet(root: str | Path, sd15_unet: torch.nn.Module, seed: int = 0) -> tuple[Path, Path]:
    """Write `build_tiny_controlnet` as a diffusers folder `root/controlnet` and an
    original-layout single file `root/control_tiny_sd15.safetensors`; returns both paths."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    controlnet = build_tiny_controlnet(sd15_unet, seed)
    folder, file = root / "controlnet", root / "control_tiny_sd15.safetensors"
    controlnet.save_pretrained(folder, safe_serialization=True)
    save_file(controlnet_to_original(controlnet), file)
    return folder, file


def write_tiny_t2i_adapter(
    folder: str | Path, sd15_unet: torch.nn.Module, adapter_type: str = "full_adapter", seed: int = 0
) -> Path:
    """Write `build_tiny_t2i_adapter` as a diffusers folder (safetensors); returns the folder."""
    folder = Path(folder)
    build_tiny_t2i_adapter(sd15_unet, adapter_type, seed).save_pretrained(folder, safe_serialization=True)
    return folder


def write_tiny_nexus(
    folder: str | Path, sd15_unet: torch.nn.Module, hetconv: bool = True, groups: int = 4, seed: int = 0,
    weights_format: str = "safetensors", hetconv_bias: bool = False,
) -> Path:
    """Write `build_tiny_nexus` as config.json + diffusion_pytorch_model.{safetensors,bin}."""
    if weights_format not in ("safetensors", "bin"):
        raise ParameterError("weights_format", weights_format, "'safetensors' or 'bin'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    adapter = build_tiny_nexus(sd15_unet, hetconv, groups, seed, hetconv_bias)
    raw = config_to_json(adapter.config)
    if not hetconv:
        raw["groups"] = groups  # as the public code: HetConv configured, plain convs saved
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    state = {k: v.contiguous() for k, v in adapter.state_dict().items()}
    if weights_format == "safetensors":
        save_file(state, folder / "diffusion_pytorch_model.safetensors")
    else:
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    return folder


def write_tiny_ip_adapter(directory: str | Path, sd15_unet: torch.nn.Module, variant: str = "plain", seed: int = 0) -> dict[str, Path]:
    """Tiny random ip-adapter_sd15 ("plain"), ip-adapter-plus_sd15 ("plus") or
    ip-adapter-full-face_sd15 ("full") files fitting `sd15_unet`, with the released names, for
    the tiny image encoder (embeddings of width 32). Returns {"bin": path, "safetensors": path}
    (same weights)."""
    state = tiny_ip_adapter_state(sd15_unet, variant, seed=seed)
    stem = {"plain": "ip-adapter_sd15", "plus": "ip-adapter-plus_sd15", "full": "ip-adapter-full-face_sd15"}[variant]
    d = Path(directory)
    return {ext: save_ip_adapter(state, d / f"{stem}.{ext}") for ext in ("bin", "safetensors")}


TINY_IMAGE_ENCODER = dict(
    hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=3, num_attention_heads=4,
    image_size=32, patch_size=8, hidden_act="quick_gelu",
)


def write_tiny_image_encoder(directory: str | Path, seed: int = 0) -> Path:
    """A tiny random CLIPVisionModelWithProjection (hidden 32, projection 32, 32 px images) saved
    as a local folder with a CLIP preprocessor_config.json; returns the folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    d = Path(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_IMAGE_ENCODER))
    model.save_pretrained(str(d))
    size = TINY_IMAGE_ENCODER["image_size"]
    config = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }
    (d / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    return d
