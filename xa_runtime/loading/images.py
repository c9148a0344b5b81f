"""Images a user hands in: read from files or bytes the way image tools do (EXIF orientation
applied, as diffusers' load_image; 16-bit and 32-bit grey scaled by their own range, not
clipped at 255), their declared size bounded before any pixel is decoded (pixel count and
aspect ratio, so that no later resize asks for gigapixels), and as tensors: B x 3 x H x W in
[0, 1], resized. xa-generate, the plugins and xa-serve all read images here."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..errors import ParameterError

log = logging.getLogger("xa_runtime")
# Largest image a user may hand in, decoded (xa-serve's default max_image_pixels too): checked
# from the header before decoding, so a small file that expands to gigabytes is refused.
MAX_IMAGE_PIXELS = 4096 * 4096
# Widest accepted side ratio: 4096 x 64, the most elongated SDXL size, is 64:1. Beyond it a
# resize to a model's size (CLIP's short side of 224: 16,777,216 x 1 asks for 3.7 Gpx) or to
# the generation's size would cost far more than the image's own pixels.
MAX_IMAGE_ASPECT = 64
_HIGH_DEPTH_RANGE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535,
                     "I": 65535}  # "I": how Pillow opens 16-bit PNG / TIFF grey; values above clip
FILE_FORMATS = "an image file PIL can read (PNG, JPEG, WebP, ...)"


def check_image_size(name: str, width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS,
                     value: Any = None) -> None:
    """ParameterError naming `name` unless the image's declared size is 1..max_pixels pixels
    with sides at most MAX_IMAGE_ASPECT to one. `value`: what the error quotes (default W x H)."""
    shown = f"<{width}x{height} image>" if value is None else value
    if width < 1 or height < 1:
        raise ParameterError(name, shown, "an image of at least 1 x 1 pixels")
    if width * height > max_pixels:
        raise ParameterError(name, shown, f"an image of at most {max_pixels} pixels; this one declares "
                                          f"{width}x{height} = {width * height}")
    if max(width, height) > MAX_IMAGE_ASPECT * min(width, height):
        raise ParameterError(name, shown, f"an image whose sides are at most {MAX_IMAGE_ASPECT}:1; this one is "
                                          f"{width}x{height}")


def open_image(source: Any, name: str, max_pixels: int = MAX_IMAGE_PIXELS, value: Any = None) -> Image.Image:
    """A path or binary file object opened lazily (only the header read) with its declared
    size checked (check_image_size); ParameterError naming `name` if PIL cannot open it."""
    shown = str(source) if value is None else value
    try:
        with warnings.catch_warnings():  # PIL warns above its own limit (89 Mpx); ours is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
    except Exception as e:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, ValueError, ... for bad bytes
        raise ParameterError(name, shown, f"{FILE_FORMATS} ({type(e).__name__}: {e})") from None
    try:
        check_image_size(name, im.width, im.height, max_pixels, shown)
    except ParameterError:
        im.close()
        raise
    return im


def to_rgb(image: Image.Image, orient: bool = True) -> Image.Image:
    """An 8-bit RGB copy of a PIL image: 16-bit grey ("I;16", and "I" as Pillow opens 16-bit
    PNG / TIFF grey) scaled by its range (PIL's convert clips it at 255: a 16-bit ramp would
    come out 99.6% white); with `orient`, its EXIF orientation applied first."""
    if orient:
        image = ImageOps.exif_transpose(image)
    top = _HIGH_DEPTH_RANGE.get(image.mode)
    if top is not None:
        grey = np.asarray(image, dtype=np.float64) / top
        image = Image.fromarray((np.clip(grey, 0, 1) * 255).round().astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def read_image(source: Any, name: str, max_pixels: int = MAX_IMAGE_PIXELS, value: Any = None) -> Image.Image:
    """An image file (path or binary file object) as an 8-bit RGB PIL image: size checked from
    the header, then decoded, oriented (EXIF) and scaled (to_rgb); ParameterError naming `name`."""
    with open_image(source, name, max_pixels, value) as im:
        try:
            return to_rgb(im)
        except Exception as e:  # noqa: BLE001 -- a header that opened can still hide a corrupt stream
            shown = str(source) if value is None else value
            raise ParameterError(name, shown, f"{FILE_FORMATS} ({type(e).__name__}: {e})") from None


def image_to_tensor(image: Any, height: int, width: int, batch: int, name: str = "image") -> torch.Tensor:
    """One image (PIL, H x W x C uint8/float array, or C x H x W / B x C x H x W tensor in [0, 1])
    as a float32 B x 3 x height x width tensor in [0, 1]; a single image is repeated to `batch`.
    Other sizes are resized (bicubic, antialiased) with a log line; grey/RGBA become RGB."""
    if isinstance(image, Image.Image):
        t = torch.from_numpy(np.asarray(to_rgb(image, orient=False), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
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
