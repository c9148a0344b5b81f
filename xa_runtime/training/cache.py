"""The optional cache of VAE latents and text embeddings (`xa-train --cache DIR`).

One pass over the data encodes every usable sample once: both VAEs' posterior (mean and
standard deviation, so that each step still draws its own latent sample) at the sample's
bucket, and the old model's caption embeddings. They are stored in safetensors shards
(`cache-NNNNN.safetensors`, CACHE_SHARD samples each) beside `index.json` (per sample: key,
caption, bucket, SDXL's size/crop conditioning, shard), written under a temporary name and
renamed when complete. Training from the cache runs no VAE and no old text encoder; the
new model's text is the null text (captions are encoded on the fly only for the
1 - null_text_share rows that get them).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ParameterError
from .data import Bucket, DataSource, DataStats, iter_samples, nearest_bucket, prepare_row

CACHE_SHARD = 256
INDEX = "index.json"
FORMAT = "xa-train cache 1"


@dataclass
class CachedRow:
    """One cached sample: posterior mean / std of both latents, the old model's caption
    embeddings (77 x D), and what BatchRow carries besides pixels."""

    key: str
    caption: str
    time_ids: tuple[int, int, int, int, int, int]
    mean_new: torch.Tensor
    std_new: torch.Tensor
    mean_old: torch.Tensor
    std_old: torch.Tensor
    emb_old: torch.Tensor


@dataclass
class Cache:
    """A complete cache: its folder and index entries (each with "bucket" and "shard")."""

    folder: Path
    entries: list[dict[str, Any]]
    stats: DataStats
    _shard: tuple[int, dict[str, torch.Tensor]] | None = None

    def row(self, i: int) -> CachedRow:
        e = self.entries[i]
        if self._shard is None or self._shard[0] != e["shard"]:
            self._shard = (e["shard"], load_file(self.folder / f"cache-{e['shard']:05d}.safetensors"))
        t = self._shard[1]
        n = e["slot"]
        return CachedRow(e["key"], e["caption"], tuple(e["time_ids"]), t[f"{n}.mean_new"], t[f"{n}.std_new"],
                         t[f"{n}.mean_old"], t[f"{n}.std_old"], t[f"{n}.emb_old"])


def _encode(step: Any, rows: list, bucket: Bucket) -> dict[str, torch.Tensor]:
    import numpy as np

    from ..pipeline.text import encode_sd15

    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, vae, px in (("new", step.sdxl.vae, [r.pixels_new for r in rows]),
                              ("old", step.sd15.vae, [r.pixels_old for r in rows])):
            post = vae.encode(torch.from_numpy(np.stack(px)).to(step.device, next(vae.parameters()).dtype)).latent_dist
            out[f"mean_{name}"], out[f"std_{name}"] = post.mean.cpu(), post.std.cpu()
        out["emb_old"] = encode_sd15(step.sd15, [r.caption for r in rows], [], 1, False, step.device).cpu()
    return out


def build_cache(folder: Path, source: DataSource, buckets: list[Bucket], step: Any, fingerprint: dict[str, Any],
                max_bad_share: float, progress: bool = False) -> None:
    """Encode every usable sample of `source` into `folder` (replaced only when complete)."""
    from tqdm.auto import tqdm

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    stats = DataStats()
    entries: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    try:
        samples = iter_samples(source, 0, 0, stats, shuffle_buffer=1, max_bad_share=max_bad_share)
        for sample in tqdm(samples, desc="xa-train cache", unit="sample", disable=not progress):
            bucket = nearest_bucket(buckets, sample.image.height, sample.image.width)
            row = prepare_row(sample, bucket)
            slot = len(entries) % CACHE_SHARD
            for name, value in _encode(step, [row], bucket).items():
                tensors[f"{slot}.{name}"] = value[0].contiguous()
            entries.append({"key": row.key, "caption": row.caption, "time_ids": list(row.time_ids),
                            "bucket": [list(bucket.new_hw), list(bucket.old_hw)], "shard": len(entries) // CACHE_SHARD,
                            "slot": slot})
            if slot == CACHE_SHARD - 1:
                save_file(tensors, tmp / f"cache-{entries[-1]['shard']:05d}.safetensors")
                tensors = {}
        if tensors:
            save_file(tensors, tmp / f"cache-{entries[-1]['shard']:05d}.safetensors")
        (tmp / INDEX).write_text(json.dumps({"format": FORMAT, "fingerprint": fingerprint, "stats": stats.to_dict(),
                                             "entries": entries}) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_cache(folder: Path, fingerprint: dict[str, Any]) -> Cache | None:
    """The cache in `folder`, None when there is none; ParameterError naming --cache when it
    was built for other models, data, sizes or dtype."""
    index = folder / INDEX
    if not index.is_file():
        if folder.exists() and any(folder.iterdir()):
            raise ParameterError("--cache", str(folder), "an empty or missing folder, or a complete xa-train cache")
        return None
    data = json.loads(index.read_text())
    if data.get("format") != FORMAT or data.get("fingerprint") != fingerprint:
        raise ParameterError("--cache", str(folder), "a cache built for these models, data, buckets and --dtype "
                             "(it was built for others: give another folder)")
    return Cache(folder, data["entries"], DataStats(**data["stats"]))


def iter_cached_batches(cache: Cache, seed: int, epoch: int, batch: int) -> Iterator[tuple[Bucket, list[int]]]:
    """Global batches of entry indices from one bucket each, in a seeded order per epoch."""
    order = list(range(len(cache.entries)))
    random.Random(f"{seed}:{epoch}:cache").shuffle(order)
    pending: dict[Bucket, list[int]] = {}
    for i in order:
        new, old = cache.entries[i]["bucket"]
        bucket = Bucket(tuple(new), tuple(old))
        rows = pending.setdefault(bucket, [])
        rows.append(i)
        if len(rows) == batch:
            del pending[bucket]
            yield bucket, rows
