"""IP-Adapter's image side: a CLIP vision encoder from a local folder and CLIP's preprocessing
(resize the short side, center-crop, scale to [0, 1], mean/std), in PIL + torch.

The preprocessing follows transformers' CLIPImageProcessor (PIL backend) step for step; its
settings come from the folder's preprocessor_config.json when there is one, otherwise from
the encoder's image size with CLIP's mean and std (what diffusers' pipelines default to).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import CheckpointError, ParameterError
from ..loading.checkpoint_files import check_finite
from ..loading.images import check_image_size, read_image, to_rgb


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIPImageProcessor's settings. `shortest_edge`: resize the short side to it (keeping the
    aspect ratio), or `resize_to` (height, width) exactly; then crop (height, width) at the centre."""

    shortest_edge: int | None
    crop: tuple[int, int] | None
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resize_to: tuple[int, int] | None = None
    normalize: bool = True
    rescale_factor: float = 1 / 255

    @classmethod
    def for_image_size(cls, size: int) -> "ClipPreprocess":
        return cls(shortest_edge=size, crop=(size, size))

    @classmethod
    def from_config(cls, config: dict[str, Any], image_size: int) -> "ClipPreprocess":
        """From a preprocessor_config.json dict (CLIPImageProcessor keys)."""
        size = config.get("size", image_size) if config.get("do_resize", True) else None
        shortest, resize_to = None, None
        if isinstance(size, int):
            shortest = size
        elif isinstance(size, dict) and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        elif isinstance(size, dict):
            resize_to = (int(size["height"]), int(size["width"]))
        crop = config.get("crop_size", image_size) if config.get("do_center_crop", True) else None
        if isinstance(crop, int):
            crop = (crop, crop)
        elif isinstance(crop, dict):
            crop = (int(crop["height"]), int(crop["width"]))
        return cls(
            shortest_edge=shortest, crop=crop, resize_to=resize_to,
            mean=tuple(config.get("image_mean", CLIP_MEAN)), std=tuple(config.get("image_std", CLIP_STD)),
            normalize=bool(config.get("do_normalize", True)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0,
        )


def to_pil(image: Any, name: str = "ip_image") -> Image.Image:
    """A path, PIL image, H x W x C array (uint8, or float in [0, 1]) or C x H x W tensor in [0, 1], as RGB PIL."""
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise ParameterError(name, str(image), "an existing image file")
        return read_image(image, name)
    if isinstance(image, Image.Image):
        check_image_size(name, image.width, image.height)
        return to_rgb(image, orient=False)
    if isinstance(image, torch.Tensor):
        t = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
        if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
            raise ParameterError(name, tuple(image.shape), "a C x H x W tensor in [0, 1] with 1, 3 or 4 channels")
        image = t.detach().float().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        a = image if image.dtype == np.uint8 else (np.clip(image.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
        a = a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a
        if a.ndim not in (2, 3):
            raise ParameterError(name, image.shape, "an H x W or H x W x C array")
        check_image_size(name, a.shape[1], a.shape[0])
        return Image.fromarray(a).convert("RGB")
    raise ParameterError(name, type(image).__name__, "an image path, a PIL image, a numpy array or a torch tensor")


def preprocess_clip_images(images: Sequence[Any], spec: ClipPreprocess) -> torch.Tensor:
    """N images -> N x 3 x crop_h x crop_w float32 pixel values for a CLIP vision encoder."""
    out = []
    for image in images:
        pil = to_pil(image)
        if spec.shortest_edge is not None:
            w, h = pil.size
            s = spec.shortest_edge
            size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)  # transformers' rounding
            check_image_size("ip_image", *size, value=f"<{w}x{h} image, resized to {size[0]}x{size[1]} for CLIP>")
            pil = pil.resize(size, Image.BICUBIC)
        elif spec.resize_to is not None:
            check_image_size("ip_image", *spec.resize_to[::-1], value=f"<resized to {spec.resize_to} for CLIP>")
            pil = pil.resize(spec.resize_to[::-1], Image.BICUBIC)
        if spec.crop is not None:
            (ch, cw), (w, h) = spec.crop, pil.size
            top, left = (h - ch) // 2, (w - cw) // 2
            pil = pil.crop((left, top, left + cw, top + ch))  # pads with black if the crop is larger
        t = torch.from_numpy(np.asarray(pil, dtype=np.float32) * spec.rescale_factor).permute(2, 0, 1)
        if spec.normalize:
            t = (t - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1)
        out.append(t)
    return torch.stack(out)


class CLIPImageEncoder:
    """A CLIPVisionModelWithProjection with its preprocessing.

    encode(images, hidden_states, device, dtype) -> (cond, uncond): with hidden_states=False the
    projected image embeddings (N x projection_dim) and zeros as the negative; with True the
    penultimate hidden states (N x tokens x hidden_size) of the images and of a zero image,
    as diffusers' pipelines compute them for the plain and plus IP-Adapters.
    """

    def __init__(self, model: torch.nn.Module, preprocess: ClipPreprocess | None = None):
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess or ClipPreprocess.for_image_size(model.config.image_size)

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def encode(
        self, images: Sequence[Any], *, hidden_states: bool, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.to(device=device, dtype=dtype)
        pixels = preprocess_clip_images(images, self.preprocess).to(device=device, dtype=dtype)
        if not hidden_states:
            embeds = self.model(pixel_values=pixels).image_embeds
            return embeds, torch.zeros_like(embeds)
        both = self.model(pixel_values=torch.cat([pixels, torch.zeros_like(pixels)]), output_hidden_states=True)
        return both.hidden_states[-2].chunk(2)


def load_image_encoder(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> CLIPImageEncoder:
    """The CLIP vision encoder from a local folder (config.json + weights, e.g. h94/IP-Adapter's
    models/image_encoder); never from a hub. Uses the folder's preprocessor_config.json if any."""
    from transformers import CLIPVisionModelWithProjection

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ParameterError("image_encoder", str(path), "a local folder with a CLIP vision config.json and weights")
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"image_encoder {p}: not a CLIP vision model folder: {exc}") from exc
    check_finite(model.named_parameters(), f"image_encoder {p}", "weight")
    model.to(device=device, dtype=dtype)
    pre = p / "preprocessor_config.json"
    spec = ClipPreprocess.from_config(json.loads(pre.read_text()), model.config.image_size) if pre.is_file() else None
    return CLIPImageEncoder(model, spec)
