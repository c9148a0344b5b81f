"""The tiny random X-Adapter models (`build_tiny_models`) written in every format the
loaders accept (diffusers folders, original-layout single files, a separate SDXL VAE, the
released adapter checkpoint), so that the loaders are tested on the same bytes a user would
hand them."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from ..models.components import SD15Components, SDXLComponents
from ..models.mapping import MappingLayers
from ..models.original_layout import sd15_to_original, sdxl_to_original, vae_to_original
from ..models.tiny import build_tiny_models


@dataclass(frozen=True)
class TinyModelPaths:
    """Where `save_tiny_models` put each format (all under `root`)."""

    root: Path
    sd15_dir: Path  # diffusers folder (StableDiffusionPipeline)
    sdxl_dir: Path  # diffusers folder (StableDiffusionXLPipeline)
    sd15_file: Path  # original-layout single file
    sdxl_file: Path
    sdxl_vae_dir: Path  # diffusers AutoencoderKL folder
    sdxl_vae_file: Path  # original-layout VAE, no "first_stage_model." prefix
    adapter_bin: Path  # released format: torch.save(state_dict)
    adapter_safetensors: Path


def _scheduler(config: dict):
    return getattr(diffusers, config["_class_name"]).from_config(config)


def _write_all(tmp: Path, sd15: SD15Components, sdxl: SDXLComponents, mapping: MappingLayers) -> None:
    StableDiffusionPipeline(
        vae=sd15.vae, text_encoder=sd15.text_encoder, tokenizer=sd15.tokenizer, unet=sd15.unet,
        scheduler=_scheduler(sd15.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(tmp / "sd15", safe_serialization=True)
    StableDiffusionXLPipeline(
        vae=sdxl.vae, text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2,
        tokenizer=sdxl.tokenizer, tokenizer_2=sdxl.tokenizer_2, unet=sdxl.unet,
        scheduler=_scheduler(sdxl.scheduler_config),
    ).save_pretrained(tmp / "sdxl", safe_serialization=True)
    save_file(sd15_to_original(sd15), tmp / "sd15.safetensors")
    save_file(sdxl_to_original(sdxl), tmp / "sdxl.safetensors")
    sdxl.vae.save_pretrained(tmp / "sdxl-vae", safe_serialization=True)
    vae_state = {k: v.contiguous() for k, v in sdxl.vae.state_dict().items()}
    save_file(vae_to_original(vae_state, sdxl.vae.config), tmp / "sdxl_vae.safetensors")
    adapter = {k: v.contiguous() for k, v in mapping.state_dict().items()}
    torch.save(adapter, tmp / "X_Adapter_v1.bin")
    save_file(adapter, tmp / "X_Adapter_v1.safetensors")


def save_tiny_models(root: str | os.PathLike, seed: int = 0) -> TinyModelPaths:
    """Write `build_tiny_models(seed)` in every format the loaders read, under `root`.

    Everything is written to a temporary folder inside `root` first and moved into place
    when complete, so an interrupted run never leaves a half-written model behind.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sd15, sdxl, mapping = build_tiny_models(seed)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        _write_all(tmp, sd15, sdxl, mapping)
        for entry in sorted(tmp.iterdir()):
            target = root / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TinyModelPaths(
        root=root,
        sd15_dir=root / "sd15",
        sdxl_dir=root / "sdxl",
        sd15_file=root / "sd15.safetensors",
        sdxl_file=root / "sdxl.safetensors",
        sdxl_vae_dir=root / "sdxl-vae",
        sdxl_vae_file=root / "sdxl_vae.safetensors",
        adapter_bin=root / "X_Adapter_v1.bin",
        adapter_safetensors=root / "X_Adapter_v1.safetensors",
    )
