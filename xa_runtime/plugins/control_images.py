"""Control images for ControlNet, T2I-Adapter and Nexus Adapter: read, resize to the SD1.5
size, and optionally turn into a canny edge map (built in, numpy/torch only, no OpenCV).

`canny` follows OpenCV's `cv2.Canny` conventions (thresholds on the L1 magnitude of 3x3
Sobel gradients of the 8-bit grey image, non-maximum suppression in 4 directions, double
threshold with hysteresis), with a Gaussian blur in front as the usual preprocessors do.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ParameterError
from ..loading.images import image_to_tensor, read_image

CONTROL_TYPES = ("none", "canny")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, what PIL's "L" mode and OpenCV's grey conversion use


def open_image(image: Any, name: str = "control_image") -> Any:
    """A path (str / PathLike) read as an RGB PIL image (loading.images.read_image: size
    bounded, EXIF orientation applied, 16-bit grey scaled); anything else returned unchanged."""
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise ParameterError(name, str(image), "an existing image file (PNG, JPEG, ...)")
        return read_image(image, name)
    return image


def _native_size(image: Any, name: str) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray) and image.ndim >= 2:  # H x W [x C]
        return int(image.shape[0]), int(image.shape[1])
    if isinstance(image, torch.Tensor) and image.dim() >= 3:  # [B x] C x H x W
        return int(image.shape[-2]), int(image.shape[-1])
    raise ParameterError(name, type(image).__name__, "a path, a PIL image, a numpy array or a torch tensor")


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    # x: N x 1 x H x W; kernel: kh x kw; reflect-101 borders (OpenCV's default)
    kh, kw = kernel.shape
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    return F.conv2d(x, kernel[None, None].to(x))


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[y, x] = x[y + dy, x + dx], zero outside the image."""
    padded = F.pad(x, (1, 1, 1, 1))
    h, w = x.shape[-2:]
    return padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def canny_edges(pixels: torch.Tensor, low: float = 100.0, high: float = 200.0, sigma: float = 1.0) -> torch.Tensor:
    """Edge map of B x C x H x W pixels in [0, 1] (C = 1 or 3) as a B x 1 x H x W bool tensor.

    low/high: hysteresis thresholds on |Sobel_x| + |Sobel_y| of the 0..255 grey image (OpenCV
    units); sigma: Gaussian blur in pixels before the gradients (0 = none).
    """
    if not (0 <= low <= high):
        raise ParameterError("canny thresholds", (low, high), "0 <= low <= high")
    x = pixels.float()
    if x.shape[1] == 3:
        x = sum(w * x[:, i : i + 1] for i, w in enumerate(_LUMA))
    x = x[:, :1] * 255.0
    if sigma > 0:
        k = _gaussian_kernel(sigma)
        x = _conv(_conv(x, k[None, :]), k[:, None])
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx, gy = _conv(x, sobel), _conv(x, sobel.T)
    mag = gx.abs() + gy.abs()

    # Gradient direction in 4 sectors (y grows downwards); compare with the two neighbours
    # along it. ">" on one side and ">=" on the other keeps one pixel of a two-pixel plateau.
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    sectors = (
        ((angle < 22.5) | (angle >= 157.5), (0, -1), (0, 1)),  # horizontal gradient: left / right
        ((angle >= 22.5) & (angle < 67.5), (-1, -1), (1, 1)),  # down-right diagonal
        ((angle >= 67.5) & (angle < 112.5), (-1, 0), (1, 0)),  # vertical gradient: up / down
        ((angle >= 112.5) & (angle < 157.5), (-1, 1), (1, -1)),  # down-left diagonal
    )
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for sector, before, after in sectors:
        keep |= sector & (mag > _shift(mag, *before)) & (mag >= _shift(mag, *after))
    mag = torch.where(keep, mag, torch.zeros_like(mag))

    strong, weak = mag > high, mag > low
    edges = strong
    while True:  # hysteresis: grow strong edges through 8-connected weak pixels
        grown = weak & (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            return edges
        edges = grown


def canny(image: Any, low: float = 100.0, high: float = 200.0, sigma: float = 1.0) -> torch.Tensor:
    """Canny edge map of one image (path, PIL, H x W x C array, C x H x W or B x C x H x W tensor
    in [0, 1]) at its own size: a float32 B x 3 x H x W tensor, 1 on edges, 0 elsewhere."""
    image = open_image(image, "control_image")
    h, w = _native_size(image, "control_image")
    batch = image.shape[0] if isinstance(image, torch.Tensor) and image.dim() == 4 else 1
    pixels = image_to_tensor(image, h, w, batch, name="control_image")
    return canny_edges(pixels, low, high, sigma).float().expand(-1, 3, -1, -1).contiguous()


def control_image_tensor(
    image: Any, control_type: str, height: int, width: int, batch: int, name: str = "control_image"
) -> torch.Tensor:
    """The control image as the SD1.5 plugins take it: float32 B x 3 x height x width in [0, 1].

    image: path, PIL image, array or tensor (any size: resized with a log line by
    `image_to_tensor`); control_type: "none" (used as is) or "canny" (edges detected after
    resizing, so they stay one pixel wide at the SD1.5 size).
    """
    if control_type not in CONTROL_TYPES:
        raise ParameterError("control_type", control_type, f"one of {', '.join(CONTROL_TYPES)}")
    pixels = image_to_tensor(open_image(image, name), height, width, batch, name=name)
    if control_type == "canny":
        pixels = canny_edges(pixels).float().expand(-1, 3, -1, -1).contiguous()
    return pixels


def to_grey(pixels: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W -> B x 1 x H x W luminance (for adapters trained on 1-channel maps)."""
    return sum(w * pixels[:, i : i + 1] for i, w in enumerate(_LUMA))
