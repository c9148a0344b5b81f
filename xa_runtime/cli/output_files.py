"""The files one `xa-generate` run writes: PNGs that carry their parameters in two text
chunks (`parameters`: A1111 infotext that image tools read; `xa_runtime`: the image's full
record as JSON; xa_runtime/infotext.py), and one JSON sidecar with everything about the run.

All files are written under hidden temporary names in the output folder and moved into
place with os.replace only once every one of them is complete, so a failed or
interrupted run leaves no partial file behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..infotext import JSON_KEY, TEXT_KEY, png_text_chunks

PNG_TEXT_KEY = TEXT_KEY
PNG_JSON_KEY = JSON_KEY


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


def _file_mode() -> int:
    # mkstemp creates 0600 files; the final files get what open() would have given them.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_all_or_nothing(contents: dict[Path, bytes]) -> None:
    """Write every file to a temporary name beside its target, then move them all into
    place. On any error the temporary files are removed and nothing new is left."""
    temps: list[tuple[str, Path]] = []
    placed: list[Path] = []  # targets that did not exist before and now do
    try:
        for target, data in contents.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            temps.append((tmp, target))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, _file_mode())
        for tmp, target in temps:
            existed = os.path.lexists(target)
            os.replace(tmp, target)
            if not existed:
                placed.append(target)
    except BaseException:
        for path in [tmp for tmp, _ in temps] + placed:  # a failed move takes back the files already moved
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise


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
