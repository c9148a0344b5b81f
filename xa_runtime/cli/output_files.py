"""The files one `xa-generate` run writes: PNGs that carry their parameters in a text
chunk, and one JSON sidecar with everything about the run.

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

PNG_TEXT_KEY = "parameters"


def image_paths(output: Path, count: int) -> list[Path]:
    """out.png, out-1.png, ..., out-{count-1}.png: the first image keeps the given name."""
    return [output] + [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(1, count)]


def sidecar_path(output: Path) -> Path:
    """out.png -> out.json (one sidecar per run, listing every image)."""
    return output.with_suffix(".json")


def png_bytes(image: Image.Image, text: dict[str, Any]) -> bytes:
    """The image as PNG with `text` as JSON in a tEXt chunk under PNG_TEXT_KEY."""
    info = PngInfo()
    info.add_text(PNG_TEXT_KEY, json.dumps(text, sort_keys=False))
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
