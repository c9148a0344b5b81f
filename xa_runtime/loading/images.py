"""Images a user hands in (PIL, numpy, torch) as tensors: B x 3 x H x W in [0, 1], resized."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ParameterError

log = logging.getLogger("xa_runtime")
# Largest image a user may hand in, decoded (xa-serve's default max_image_pixels too): checked
# from the header before decoding, so a small file that expands to gigabytes is refused.
MAX_IMAGE_PIXELS = 4096 * 4096


def image_to_tensor(image: Any, height: int, width: int, batch: int, name: str = "image") -> torch.Tensor:
    """One image (PIL, H x W x C uint8/float array, or C x H x W / B x C x H x W tensor in [0, 1])
    as a float32 B x 3 x height x width tensor in [0, 1]; a single image is repeated to `batch`.
    Other sizes are resized (bicubic, antialiased) with a log line; grey/RGBA become RGB."""
    if isinstance(image, Image.Image):
        t = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    elif isinstance(image, np.ndarray):
        a = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        a = a[..., None] if a.ndim == 2 else a
        t = torch.from_numpy(a[..., :3] if a.shape[-1] >= 3 else np.repeat(a, 3, -1)).permute(2, 0, 1)[None]
    elif isinstance(image, torch.Tensor):
        t = image.float()[None] if image.dim() == 3 else image.float()
        if t.dim() != 4 or t.shape[1] not in (1, 3, 4):
            raise ParameterError(name, tuple(image.shape), "a C x H x W or B x C x H x W tensor with 1, 3 or 4 channels")
        t = t[:, :3] if t.shape[1] >= 3 else t.expand(-1, 3, -1, -1)
    else:
        raise ParameterError(name, type(image).__name__, "a PIL image, a numpy array or a torch tensor")
    if t.shape[0] not in (1, batch):
        raise ParameterError(name, t.shape[0], f"1 image or {batch} (one per generated image)")
    if tuple(t.shape[-2:]) != (height, width):
        log.info("%s: resizing %dx%d to %dx%d", name, t.shape[-1], t.shape[-2], width, height)
        t = F.interpolate(t, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return t.clamp(0, 1).expand(batch, -1, -1, -1).contiguous()
