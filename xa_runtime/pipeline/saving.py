"""One folder for a whole X-Adapter pipeline (`save_pretrained` / `from_pretrained(folder)`):

    xa_pipeline_index.json   class name, versions, where each part is
    sd15/                    SD1.5 as a diffusers StableDiffusionPipeline folder
    sdxl/                    SDXL as a diffusers StableDiffusionXLPipeline folder
    x_adapter.safetensors    the mapping layers, the released checkpoint's names

The folder is written under a temporary name beside its destination and renamed into place
when complete; reading checks the index and that every part it names exists, before any
weights are read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ParameterError

INDEX_NAME = "xa_pipeline_index.json"
PARTS = {"sd15": "sd15", "sdxl": "sdxl", "adapter": "x_adapter.safetensors"}
CLASS_NAME = "XAdapterPipeline"


def _scheduler(config: dict[str, Any]) -> Any:
    import diffusers

    return getattr(diffusers, config.get("_class_name", "EulerDiscreteScheduler")).from_config(config)


def _write(pipe: Any, folder: Path) -> None:
    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from .. import __version__

    sd15, sdxl = pipe.sd15, pipe.sdxl
    StableDiffusionPipeline(
        vae=sd15.vae, text_encoder=sd15.text_encoder, tokenizer=sd15.tokenizer, unet=sd15.unet,
        scheduler=_scheduler(sd15.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder / PARTS["sd15"], safe_serialization=True)
    StableDiffusionXLPipeline(
        vae=sdxl.vae, text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2,
        tokenizer=sdxl.tokenizer, tokenizer_2=sdxl.tokenizer_2, unet=sdxl.unet,
        scheduler=_scheduler(sdxl.scheduler_config),
    ).save_pretrained(folder / PARTS["sdxl"], safe_serialization=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in pipe.mapping.state_dict().items()}
    save_file(state, folder / PARTS["adapter"])
    index = {
        "_class_name": CLASS_NAME,
        "_xa_runtime_version": __version__,
        "_diffusers_version": diffusers.__version__,
        "dtype": str(pipe.dtype).replace("torch.", ""),
        **PARTS,
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_pipeline_folder(pipe: Any, save_directory: str | os.PathLike) -> Path:
    """Write `pipe` to `save_directory` (see the module doc); returns the folder."""
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ParameterError("save_directory", str(target), "a folder path (a file exists there)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        _write(pipe, tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        os.chmod(target, 0o755)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def read_pipeline_folder(path: str | os.PathLike) -> dict[str, Path]:
    """The parts of a pipeline folder ({"sd15", "sdxl", "adapter"} -> path), checked to
    exist; ParameterError naming the path when it is no such folder (never a hub id)."""
    folder = Path(path)
    accepted = (f"a local X-Adapter pipeline folder written by save_pretrained (with {INDEX_NAME}), "
                "or three paths: sd15, sdxl, adapter")
    if not folder.exists():
        raise ParameterError("pretrained_model_name_or_path", str(path), f"{accepted}; nothing exists at this path")
    index_file = folder / INDEX_NAME
    if not folder.is_dir() or not index_file.is_file():
        raise ParameterError("pretrained_model_name_or_path", str(path), f"{accepted}; no {INDEX_NAME} there")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ParameterError("pretrained_model_name_or_path", str(path), f"{accepted}; {INDEX_NAME} unreadable: {e}")
    if not isinstance(index, dict) or index.get("_class_name") != CLASS_NAME:
        raise ParameterError("pretrained_model_name_or_path", str(path),
                             f"{accepted}; {INDEX_NAME} names no {CLASS_NAME}")
    out = {}
    for key in PARTS:
        rel = index.get(key)
        part = (folder / rel).resolve() if isinstance(rel, str) else None
        if part is None or not part.is_relative_to(folder.resolve()) or not part.exists():
            raise ParameterError("pretrained_model_name_or_path", str(path),
                                 f"{accepted}; {INDEX_NAME} entry {key!r} = {rel!r} is not a path inside the folder")
        out[key] = part
    return out


def saved_dtype(path: str | os.PathLike) -> Any:
    """The torch dtype a pipeline folder was saved in (its index's "dtype"; float32 if absent)."""
    import torch

    name = json.loads((Path(path) / INDEX_NAME).read_text()).get("dtype", "float32")
    return getattr(torch, name) if name in ("float32", "float16", "bfloat16") else torch.float32
