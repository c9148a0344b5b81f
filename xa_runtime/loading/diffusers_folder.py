"""SD1.5 / SDXL from a local diffusers folder, one component at a time from its subfolder
(the safety checker and feature extractor of official SD1.5 folders are not needed)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, PreTrainedModel

from ..errors import CheckpointError
from .checkpoint_files import check_finite, read_json_config
from ..models.components import SD15Components, SDXLComponents


def _check_loading_info(info: dict[str, Any], what: str) -> None:
    # Both libraries fill missing weights with random values and only log it; a model with
    # random layers must not pass silently.
    missing = list(info.get("missing_keys") or [])
    mismatched = [str(m) for m in info.get("mismatched_keys") or []]
    if missing or mismatched:
        raise CheckpointError(
            f"{what} does not match its config: missing keys {missing[:20]}, shape mismatches {mismatched[:20]}"
        )


def _first_line(e: Exception) -> str:
    # torch's and diffusers' messages run over many lines; the first says what went wrong.
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "Error(s) in loading state_dict for X:" + the first error
        return f"{lines[0]} {lines[1]}"[:300]
    return lines[0][:300] if lines else type(e).__name__


def load_pretrained(
    cls: Any, folder: Path, subfolder: str | None, dtype: torch.dtype, device: str | torch.device
) -> Any:
    """One diffusers/transformers model from `folder`/`subfolder`, local files only, checked
    for missing weights; eval mode, no gradients, on `device` in `dtype`."""
    what = f"{cls.__name__} in {folder / (subfolder or '')}"
    kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True}
    if subfolder:
        kwargs["subfolder"] = subfolder
    # transformers 5 calls the argument dtype, diffusers still torch_dtype.
    kwargs["dtype" if issubclass(cls, PreTrainedModel) else "torch_dtype"] = dtype
    try:
        try:
            with warnings.catch_warnings():  # torch's pickle-protocol note; a refusal is reported below
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                model, info = cls.from_pretrained(folder, **kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            # diffusers wraps torch's refusal in an OSError (a few exceptions deep); report the refusal itself
            cause: BaseException | None = e
            for _ in range(8):
                if cause is None or isinstance(cause, pickle.UnpicklingError):
                    break
                cause = cause.__cause__ or cause.__context__
            if isinstance(cause, pickle.UnpicklingError):
                raise cause from e
            raise
    except pickle.UnpicklingError as e:
        pickles = sorted(str(p) for p in (folder / (subfolder or "")).glob("*.bin"))
        raise CheckpointError(
            f"cannot load {what}: {', '.join(pickles) or 'its weights'} cannot be read with "
            f"torch.load(weights_only=True) ({_first_line(e)}); this runtime never unpickles arbitrary Python "
            "objects: convert it to .safetensors with a tool you trust"
        ) from e
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"cannot load {what}: {_first_line(e)}") from e
    _check_loading_info(info, what)
    check_finite(model.named_parameters(), what, "weight")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _tokenizer(folder: Path, subfolder: str) -> CLIPTokenizer:
    try:
        return CLIPTokenizer.from_pretrained(folder, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {folder / subfolder}: {e}") from e


def _scheduler_config(folder: Path) -> dict[str, Any]:
    return read_json_config(folder / "scheduler" / "scheduler_config.json")


def load_sd15_folder(folder: Path, *, dtype: torch.dtype, device: str | torch.device) -> SD15Components:
    """SD1.5 components from a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    return SD15Components(
        unet=load_pretrained(UNet2DConditionModel, folder, "unet", dtype, device),
        vae=load_pretrained(AutoencoderKL, folder, "vae", dtype, device),
        text_encoder=load_pretrained(CLIPTextModel, folder, "text_encoder", dtype, device),
        tokenizer=_tokenizer(folder, "tokenizer"),
        scheduler_config=_scheduler_config(folder),
    )


def load_sdxl_folder(folder: Path, *, dtype: torch.dtype, device: str | torch.device) -> SDXLComponents:
    """SDXL components from a diffusers folder (adds text_encoder_2/ and tokenizer_2/)."""
    return SDXLComponents(
        unet=load_pretrained(UNet2DConditionModel, folder, "unet", dtype, device),
        vae=load_pretrained(AutoencoderKL, folder, "vae", dtype, device),
        text_encoder=load_pretrained(CLIPTextModel, folder, "text_encoder", dtype, device),
        text_encoder_2=load_pretrained(CLIPTextModelWithProjection, folder, "text_encoder_2", dtype, device),
        tokenizer=_tokenizer(folder, "tokenizer"),
        tokenizer_2=_tokenizer(folder, "tokenizer_2"),
        scheduler_config=_scheduler_config(folder),
    )
