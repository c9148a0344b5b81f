"""SD1.5 / SDXL from one original-layout (.safetensors) checkpoint, offline.

The file carries weights only. Its configs come from the matching preset (chosen by the
UNet width in the file, so tiny and real checkpoints share this path), written once as a
local diffusers config folder; the weights are converted with diffusers' own LDM ->
diffusers functions and loaded strictly.

Why not `from_single_file(config=folder)`: it decides which CLIP weights go to which text
encoder by comparing hidden widths, which cannot tell SDXL's two encoders apart when the
widths are equal (as in the tiny models: bigG would silently get CLIP-L's weights), and it
loads text encoders with strict=False, so missing tensors would stay random. Doing the
same conversion explicitly keeps every tensor accounted for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..errors import CheckpointError
from ..models.components import SD15Components, SDXLComponents
from ..models.original_layout import SDXL_OPENCLIP_PREFIX
from ..models.presets import ModelPreset, get_preset
from ..models.tokenizer import build_clip_tokenizer
from .checkpoint_files import read_state_dict
from .exact_state import assign_exact, build_empty
from .family import FAMILY_NAMES, family_of_checkpoint, preset_for_checkpoint

StateDict = dict[str, torch.Tensor]


def _model_index(preset: ModelPreset) -> dict[str, Any]:
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if preset.family == "sdxl" else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", preset.scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if preset.family == "sdxl":
        index.update(
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
            force_zeros_for_empty_prompt=True,
        )
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    return index


def _write_config_folder(preset: ModelPreset, folder: Path) -> None:
    # Tokenizers are not written: they are built from the CLIP vocabulary shipped in the package
    # (models/tokenizer.py), so model_index.json lists them like the official folders do.
    def dump(rel: str, data: Mapping[str, Any]) -> None:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(dict(data), indent=2, sort_keys=True))

    version = {"_diffusers_version": diffusers.__version__}
    dump("model_index.json", _model_index(preset))
    dump("unet/config.json", {**preset.unet, **version})
    dump("vae/config.json", {**preset.vae, **version})
    dump("scheduler/scheduler_config.json", {**preset.scheduler, **version})
    CLIPTextConfig(**preset.text_encoder, architectures=["CLIPTextModel"]).save_pretrained(folder / "text_encoder")
    if preset.text_encoder_2 is not None:
        CLIPTextConfig(**preset.text_encoder_2, architectures=["CLIPTextModelWithProjection"]).save_pretrained(
            folder / "text_encoder_2"
        )


def single_file_config_folder(preset: str | ModelPreset) -> Path:
    """A local diffusers config folder (model_index.json, unet/, vae/, text_encoder[_2]/,
    scheduler/; no weights) for `preset`, written once to a per-user temp dir, keyed by
    the preset's content and the library versions."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    key = json.dumps(
        [p.unet, p.vae, p.text_encoder, p.text_encoder_2, p.scheduler, diffusers.__version__, transformers.__version__],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    parent = Path(tempfile.gettempdir()) / f"xa-runtime-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / "configs"
    folder = parent / f"{p.name}-{digest}"
    if (folder / "model_index.json").is_file():
        return folder
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}-", dir=parent))
    try:
        _write_config_folder(p, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "model_index.json").is_file():  # not a concurrent writer: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(fn: Any, what: str, path: Path, *args: Any, **kwargs: Any) -> StateDict:
    # diffusers' converters index the tensors they expect directly; a truncated or foreign
    # file surfaces as a KeyError deep inside them.
    try:
        return fn(*args, **kwargs)
    except (KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: the {what} weights are incomplete (missing {e})") from e


def _clip_state(state: StateDict, path: Path, flatten: bool) -> StateDict:
    out = _convert(convert_ldm_clip_checkpoint, "CLIP text encoder", path, state)
    # Old files store the position_ids buffer; transformers rebuilds it.
    out = {k: v for k, v in out.items() if not k.endswith("position_ids")}
    # transformers >= 5.6 flattened CLIPTextModel (no "text_model." level).
    return {k.removeprefix("text_model."): v for k, v in out.items()} if flatten else out


def _load_parts(path: Path, state: StateDict, preset: ModelPreset, dtype: torch.dtype, device: str | torch.device):
    folder = single_file_config_folder(preset)
    unet_config = UNet2DConditionModel.load_config(folder / "unet")
    vae_config = AutoencoderKL.load_config(folder / "vae")

    def place(module: torch.nn.Module, converted: StateDict, what: str) -> Any:
        return assign_exact(module, converted, f"{path} ({what})", strict_unexpected=False, dtype=dtype, device=device)

    unet = place(
        build_empty(lambda: UNet2DConditionModel.from_config(unet_config)),
        _convert(convert_ldm_unet_checkpoint, "UNet", path, state, unet_config),
        "UNet",
    )
    vae = place(
        build_empty(lambda: AutoencoderKL.from_config(vae_config)),
        _convert(convert_ldm_vae_checkpoint, "VAE", path, state, vae_config),
        "VAE",
    )
    te_config = CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True)
    text_encoder = build_empty(lambda: CLIPTextModel(te_config))
    flat = not hasattr(text_encoder, "text_model")
    text_encoder = place(text_encoder, _clip_state(state, path, flat), "CLIP-L text encoder")
    text_encoder_2 = None
    if preset.family == "sdxl":
        te2_config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2", local_files_only=True)
        te2 = build_empty(lambda: CLIPTextModelWithProjection(te2_config))
        converted = _convert(
            convert_open_clip_checkpoint, "OpenCLIP-bigG", path, te2, state, prefix=SDXL_OPENCLIP_PREFIX
        )
        text_encoder_2 = place(te2, converted, "OpenCLIP-bigG text encoder")
    return unet, vae, text_encoder, text_encoder_2


def load_single_file(
    path: str | Path, family: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> SD15Components | SDXLComponents:
    """SD1.5 or SDXL base (`family`) components from an original-layout checkpoint file
    (.safetensors; a pickle only if torch.load(weights_only=True) can read it)."""
    path = Path(path)
    state = read_state_dict(path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        found = family_of_checkpoint(shapes)
        preset = preset_for_checkpoint(shapes, found)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if found != family:
        raise CheckpointError(f"{path} is {FAMILY_NAMES[found]}, not {FAMILY_NAMES[family]}")
    unet, vae, text_encoder, text_encoder_2 = _load_parts(path, state, preset, dtype, device)
    if family == "sd15":
        return SD15Components(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(),
            scheduler_config=dict(preset.scheduler),
        )
    return SDXLComponents(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(pad_token="!"),
        scheduler_config=dict(preset.scheduler),
    )
