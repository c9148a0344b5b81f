"""Training data: captioned images from webdataset shards (as img2dataset writes them:
`KEY.jpg`/`.png`/`.webp` + `KEY.txt` in `.tar` files) or an image folder with a
`metadata.jsonl` (the Hugging Face imagefolder convention: `file_name` + `text` or
`caption`), in one deterministic order per (seed, epoch), grouped into aspect-ratio buckets.

Each sample is cropped once at its new-model bucket and resized from that crop to the old
model's bucket, so both models see the same picture; SDXL's size/crop conditioning
(original size, crop top-left, target size) is recorded per sample. Every process reads the
same stream and forms the same global batches (a process takes its rows), so the data
position is just (epoch, batches taken) and a resumed run replays to it exactly.
Unreadable images and samples without a caption are skipped and counted (DataStats).
"""

from __future__ import annotations

import glob
import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ParameterError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("text", "caption")
MIN_SEEN_FOR_SHARE = 100  # the bad-sample share is judged once this many samples were read (or at an epoch's end)


class DataError(RuntimeError):
    """The data stopped being usable mid-run (too many bad samples); the message has the counts."""


@dataclass
class DataStats:
    """Samples read, used, and skipped (by reason) since the start of the run."""

    seen: int = 0
    used: int = 0
    corrupt: int = 0
    captionless: int = 0

    @property
    def bad(self) -> int:
        return self.corrupt + self.captionless

    def describe(self) -> str:
        return f"{self.seen} read, {self.corrupt} unreadable, {self.captionless} without a caption"

    def to_dict(self) -> dict[str, int]:
        return {"seen": self.seen, "used": self.used, "corrupt": self.corrupt, "captionless": self.captionless}


@dataclass(frozen=True)
class Bucket:
    """One aspect-ratio bucket: the new model's and the old model's (height, width) in pixels."""

    new_hw: tuple[int, int]
    old_hw: tuple[int, int]


@dataclass
class Sample:
    """One decoded training sample (before bucketing)."""

    key: str
    image: Image.Image  # RGB, loaded
    caption: str


@dataclass
class BatchRow:
    """One row of a batch: pixels for both models in [-1, 1] (3 x H x W float32 arrays) and
    SDXL's conditioning (original H, W, crop top, left, target H, W)."""

    key: str
    caption: str
    pixels_new: np.ndarray
    pixels_old: np.ndarray
    time_ids: tuple[int, int, int, int, int, int]


@dataclass
class DataSource:
    """Where the samples are: `kind` "webdataset" (tar shards) or "imagefolder" (entries of metadata.jsonl)."""

    path: str
    kind: str
    shards: list[str] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)


def open_source(path: str) -> DataSource:
    """The samples at `path`: a folder of .tar shards, one .tar, a glob or brace pattern of
    shards, or a folder with metadata.jsonl. ParameterError naming --data otherwise."""
    p = Path(path)
    if p.is_dir() and (p / "metadata.jsonl").is_file():
        entries = []
        for n, line in enumerate((p / "metadata.jsonl").read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = {"_bad_line": n}
            entries.append(entry if isinstance(entry, dict) else {"_bad_line": n})
        return DataSource(path, "imagefolder", entries=entries)
    if p.is_dir():
        shards = sorted(str(s) for s in p.glob("*.tar"))
    elif p.is_file() and p.suffix == ".tar":
        shards = [str(p)]
    elif "{" in path:
        import braceexpand  # a webdataset dependency

        shards = sorted(s for s in braceexpand.braceexpand(path) if Path(s).is_file())
    else:
        shards = sorted(glob.glob(path))
    if not shards:
        raise ParameterError("--data", path, "webdataset .tar shards (a folder of them, one file, or a glob/brace "
                             "pattern) or an image folder with metadata.jsonl; found neither")
    return DataSource(path, "webdataset", shards=shards)


def _decode(data: bytes) -> Image.Image | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except Exception:  # noqa: BLE001 -- any decoder failure means an unreadable image, counted
        return None


def _raw_webdataset(source: DataSource, order: list[str]) -> Iterator[tuple[str, bytes | None, str | None]]:
    import webdataset as wds

    # Every process reads every shard (the global batch is formed identically everywhere):
    # no node or worker splitting, shard order chosen by the caller.
    ds = wds.WebDataset(order, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False,
                        handler=wds.warn_and_continue)
    for rec in ds:
        image = next((rec[e] for e in IMAGE_EXTENSIONS if e in rec), None)
        text = rec.get("txt")
        caption = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else None
        yield str(rec.get("__key__", "")), image, caption


def _raw_imagefolder(source: DataSource, order: list[int]) -> Iterator[tuple[str, bytes | None, str | None]]:
    root = Path(source.path)
    for i in order:
        entry = source.entries[i]
        name = entry.get("file_name")
        caption = next((entry[f] for f in CAPTION_FIELDS if isinstance(entry.get(f), str)), None)
        data = None
        if isinstance(name, str):
            try:
                data = (root / name).read_bytes()
            except OSError:
                data = None
        yield str(name), data, caption


def iter_samples(source: DataSource, seed: int, epoch: int, stats: DataStats, shuffle_buffer: int,
                 max_bad_share: float = 1.0) -> Iterator[Sample]:
    """The usable samples of one epoch in a deterministic order (shards shuffled by
    (seed, epoch), then a seeded shuffle buffer; image folders fully shuffled). Bad samples
    are counted in `stats`; DataError once their share passes `max_bad_share`."""
    rng = random.Random(f"{seed}:{epoch}")
    if source.kind == "imagefolder":
        order = list(range(len(source.entries)))
        rng.shuffle(order)
        raw = _raw_imagefolder(source, order)
    else:
        shards = list(source.shards)
        rng.shuffle(shards)
        raw = _raw_webdataset(source, shards)

    def decoded() -> Iterator[Sample]:
        for key, data, caption in raw:
            stats.seen += 1
            if caption is None or not caption.strip():
                stats.captionless += 1
            else:
                image = _decode(data) if data is not None else None
                if image is None:
                    stats.corrupt += 1
                else:
                    stats.used += 1
                    yield Sample(key, image, caption.strip())
            if stats.seen >= MIN_SEEN_FOR_SHARE:
                check_bad_share(stats, max_bad_share)

    buffer: list[Sample] = []
    for sample in decoded():
        buffer.append(sample)
        if len(buffer) >= shuffle_buffer:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def check_bad_share(stats: DataStats, max_bad_share: float) -> None:
    """DataError when more than `max_bad_share` of the samples read were unusable."""
    if stats.seen and stats.bad / stats.seen > max_bad_share:
        raise DataError(f"{stats.bad} of {stats.seen} samples were unusable ({stats.describe()}), more than the "
                        f"--max-bad-share {max_bad_share}; fix the data or raise the share")


def make_buckets(new_res: int, old_res: int, new_multiple: int, old_multiple: int, max_aspect: float,
                 bucketing: bool = True) -> list[Bucket]:
    """Buckets of about new_res**2 pixels for the new model (sides multiples of a step that
    keeps the old model's side a multiple of its own), aspect at most `max_aspect`; the old
    model's size is the new one scaled by old_res / new_res (exactly half at 512/1024)."""
    ratio = new_res / old_res
    old_step = old_multiple * ratio
    step = math.lcm(new_multiple, int(old_step)) if old_step == int(old_step) else new_multiple

    def old_of(n: int) -> int:
        return max(old_multiple, round(n / ratio / old_multiple) * old_multiple)

    side = max(step, new_res // step * step)
    square = Bucket((side, side), (old_of(side), old_of(side)))
    if not bucketing:
        return [square]
    area = new_res * new_res
    found = {square}
    w = step
    while w <= area // step:
        h = area // w // step * step
        if h >= step and max(w / h, h / w) <= max_aspect:
            found.add(Bucket((h, w), (old_of(h), old_of(w))))
        w += step
    return sorted(found, key=lambda b: b.new_hw[1] / b.new_hw[0])


def nearest_bucket(buckets: list[Bucket], height: int, width: int) -> Bucket:
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b.new_hw[1] / b.new_hw[0]) - aspect))


def iter_batches(samples: Iterator[Sample], buckets: list[Bucket], batch: int) -> Iterator[tuple[Bucket, list[Sample]]]:
    """Global batches of `batch` samples from one bucket each, in the order they fill; an
    epoch's last incomplete batches are dropped."""
    pending: dict[Bucket, list[Sample]] = {}
    for sample in samples:
        bucket = nearest_bucket(buckets, sample.image.height, sample.image.width)
        rows = pending.setdefault(bucket, [])
        rows.append(sample)
        if len(rows) == batch:
            del pending[bucket]
            yield bucket, rows


def _to_array(image: Image.Image) -> np.ndarray:
    return (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0).copy()


def prepare_row(sample: Sample, bucket: Bucket) -> BatchRow:
    """Resize `sample` to cover the new model's bucket, centre-crop it, and resize that crop
    to the old model's bucket; SDXL's conditioning records the original size and the crop."""
    (bh, bw), (oh, ow) = bucket.new_hw, bucket.old_hw
    im = sample.image
    scale = max(bw / im.width, bh / im.height)
    rw, rh = max(bw, round(im.width * scale)), max(bh, round(im.height * scale))
    resized = im.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=None)
    top, left = (rh - bh) // 2, (rw - bw) // 2
    new = resized.crop((left, top, left + bw, top + bh))
    old = new.resize((ow, oh), Image.Resampling.BICUBIC)
    return BatchRow(sample.key, sample.caption, _to_array(new), _to_array(old), (im.height, im.width, top, left, bh, bw))
