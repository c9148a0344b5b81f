"""Tiny captioned image sets for xa-train's tests, docs and benchmark, in the two layouts
it reads: webdataset shards as img2dataset writes them (`KEY.jpg` + `KEY.txt` in `.tar`
files) and an image folder with `metadata.jsonl`. The images carry real signal: each
caption names a colour and a shape, and the image shows exactly that."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def captioned_image(index: int, size: tuple[int, int] = (96, 96)) -> tuple[Image.Image, str]:
    """(image, caption) number `index`: a coloured shape on a grey background."""
    colour = list(COLOURS)[index % len(COLOURS)]
    shape = SHAPES[(index // len(COLOURS)) % len(SHAPES)]
    w, h = size
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return image, f"a {colour} {shape} on a grey background"


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_webdataset(root: str | Path, count: int = 8, *, per_shard: int = 4, size: tuple[int, int] = (96, 96),
                     corrupt: int = 0, captionless: int = 0, sizes: list[tuple[int, int]] | None = None) -> Path:
    """`count` good samples (+ `corrupt` with broken image bytes, + `captionless` without a
    .txt) in shards `root/00000.tar`, ... of `per_shard` samples; returns `root`.
    `sizes` gives each good sample its own (width, height)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, bytes]] = []
    for i in range(count):
        image, caption = captioned_image(i, sizes[i % len(sizes)] if sizes else size)
        records.append({"jpg": _encoded(image, "JPEG"), "txt": caption.encode()})
    for i in range(corrupt):
        records.append({"jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": b"a broken image"})
    for i in range(captionless):
        records.append({"png": _encoded(captioned_image(i, size)[0], "PNG")})
    for shard in range(0, len(records), per_shard):
        with tarfile.open(root / f"{shard // per_shard:05d}.tar", "w") as tar:
            for n, rec in enumerate(records[shard:shard + per_shard], start=shard):
                for ext, data in rec.items():
                    info = tarfile.TarInfo(f"{n:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def write_imagefolder(root: str | Path, count: int = 8, *, size: tuple[int, int] = (96, 96)) -> Path:
    """`count` captioned PNGs and their metadata.jsonl (file_name, text) under `root`; returns `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        image, caption = captioned_image(i, size)
        image.save(root / f"{i:05d}.png")
        lines.append(json.dumps({"file_name": f"{i:05d}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root
