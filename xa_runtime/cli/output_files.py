"""The files one `xa-generate` run writes: PNGs that carry their parameters in two text
chunks (`parameters`: A1111 infotext that image tools read; `xa_runtime`: the image's full
record as JSON; xa_runtime/infotext.py), and one JSON sidecar with everything about the run.

The set is written all or nothing (atomic_files.write_all_or_nothing): hidden temporary
names, then moved into place under a lock on the folder; a failed, interrupted or
concurrent run leaves the previous set whole and no temporary file behind.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..atomic_files import write_all_or_nothing
from ..infotext import JSON_KEY, TEXT_KEY, png_text_chunks

PNG_TEXT_KEY = TEXT_KEY
PNG_JSON_KEY = JSON_KEY
__all__ = ["image_paths", "sidecar_path", "png_bytes", "write_all_or_nothing", "write_outputs"]


def image_paths(output: Path, count: int) -> list[Path]:
    """out.png, out-1.png, ..., out-{count-1}.png: the first image keeps the given name."""
    return [output] + [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(1, count)]


def sidecar_path(output: Path) -> Path:
    """out.png -> out.json (one sidecar per run, listing every image)."""
    return output.with_suffix(".json")


def _model_fields(models: dict[str, Any], version: str | None) -> tuple[str | None, dict[str, Any]]:
    """(A1111's `Model`: the SDXL model's name, the X-Adapter extras: the other models, version)."""
    if models.get("kind") == "tiny":
        model, extra = f"xa-runtime tiny (seed {models.get('tiny_seed', 0)})", {}
    else:
        name = lambda key: Path(models[key]).stem if models.get(key) else None  # noqa: E731
        model, extra = name("sdxl"), {"X-Adapter base model": name("sd15"), "X-Adapter model": name("adapter")}
    return model, {**extra, "Version": f"xa-runtime {version}" if version else None}


def png_bytes(image: Image.Image, text: dict[str, Any]) -> bytes:
    """The image as PNG with two tEXt chunks: A1111 infotext of `text` (an image's record:
    its GenerationParams fields, models, run) under PNG_TEXT_KEY, `text` as JSON under PNG_JSON_KEY."""
    model, extra = _model_fields(text.get("models") or {}, text.get("xa_runtime"))
    info = PngInfo()
    for key, value in png_text_chunks(text, text, text.get("prompt_index", 0), model, extra).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_outputs(
    output: Path, images: Sequence[Image.Image], record: dict[str, Any], per_image: Sequence[dict[str, Any]]
) -> list[Path]:
    """Write the images (text chunk: `per_image[i]`) and the sidecar (`record` plus the
    list of image file names); return the paths written, sidecar last."""
    paths = image_paths(output, len(images))
    sidecar = sidecar_path(output)
    contents = {path: png_bytes(image, text) for path, image, text in zip(paths, images, per_image)}
    record = {**record, "images": [p.name for p in paths]}
    contents[sidecar] = (json.dumps(record, indent=2) + "\n").encode()
    write_all_or_nothing(contents)
    return [*paths, sidecar]
