"""IP-Adapter on the SD1.5 branch: an image prompt through decoupled cross-attention.

Installing uses diffusers' own converters (UNet2DConditionModel's
`_convert_ip_adapter_attn_to_diffusers` / `_convert_ip_adapter_image_proj_to_diffusers`):
every cross-attention layer gets an IPAdapterAttnProcessor2_0, which computes
softmax(Q K^T) V + scale * softmax(Q K_ip^T) V_ip, and the UNet's `encoder_hid_proj` turns
`added_cond_kwargs["image_embeds"]` into image tokens at every call. Self-attention
processors are left as they are, and `IPAdapter.unload()` puts back the original processor
objects and projection, so the UNet is then exactly the stock one again. The X-Adapter
branch hooks sit on the up blocks, outside the attention modules, and are not touched.

The plugin encodes the image prompt once per generation (cached while device and dtype
stay the same) and hands the embeddings to every SD1.5 UNet call in [uncond; cond] order.
"""

from __future__ import annotations

import copy

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales
from diffusers.models.attention_processor import (
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)
from diffusers.models.embeddings import MultiIPAdapterImageProjection

from ..errors import CheckpointError, ParameterError
from .base import PluginContext, StepInfo, requires_plugin
from .ip_adapter_image import CLIPImageEncoder, load_image_encoder
from .ip_adapter_loading import Tensors, check_fits_unet, image_proj_dims, read_ip_adapter_file

# Cross-attention processors the IP-Adapter processor can stand in for (same attention math).
_STOCK_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor")


class IPAdapter:
    """One IP-Adapter installed on an SD1.5 UNet (built by `load_ip_adapter`).

    variant: "plain" (image embeddings -> 4 tokens), "plus" (Resampler over the CLIP
    penultimate hidden states -> 16 tokens) or "full" (an MLP on every penultimate hidden-state
    token); image_embed_dim: the CLIP width its projection takes; num_tokens: image tokens per
    image (None for "full"). `set_scale` and `unload` act on the UNet.
    """

    def __init__(self, unet: torch.nn.Module, state: dict[str, Tensors], source: str = "ip_adapter"):
        if unet.encoder_hid_proj is not None or unet.config.encoder_hid_dim_type is not None:
            raise ValueError(
                f"the SD1.5 UNet already has an encoder_hid_proj ({unet.config.encoder_hid_dim_type!r}): unload the "
                "IP-Adapter installed on it first (one IP-Adapter per UNet at a time)"
            )
        self.variant = check_fits_unet(state, unet, source)
        self.image_embed_dim, self.num_tokens, _ = image_proj_dims(state["image_proj"], self.variant)
        self.source = source
        original = dict(unet.attn_processors)
        for name, proc in original.items():
            if name.endswith("attn2.processor") and type(proc).__name__ not in _STOCK_PROCESSORS:
                raise ValueError(
                    f"cross-attention layer {name} has a custom processor {type(proc).__name__}; the IP-Adapter would "
                    f"replace it (only {', '.join(_STOCK_PROCESSORS)} can be replaced)"
                )
        try:
            ip_procs = unet._convert_ip_adapter_attn_to_diffusers([state], low_cpu_mem_usage=False)
            projection = unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False)
        except (RuntimeError, KeyError) as exc:  # strict load_state_dict: a layout the checks above let through
            raise CheckpointError(f"{source}: does not load into diffusers' IP-Adapter modules: {exc}") from exc
        where = dict(device=unet.device, dtype=unet.dtype)
        installed = {}
        for name, proc in original.items():
            if name.endswith("attn2.processor"):
                installed[name] = ip_procs[name].to(**where)
            else:
                installed[name] = proc
        self.unet = unet
        self._saved = (original, unet.encoder_hid_proj, unet.config.encoder_hid_dim_type)
        self._installed = (installed, MultiIPAdapterImageProjection([projection.to(**where)]))
        self._active = False
        self.resume()

    @property
    def active(self) -> bool:
        """True while the UNet runs with this IP-Adapter's processors (loaded and not suspended)."""
        return self._active

    def resume(self) -> None:
        """Put this IP-Adapter's processors and projection (back) on the UNet; no-op when active.
        Refused while another IP-Adapter is active on the same UNet."""
        self._require_loaded()
        if self._active:
            return
        if self.unet.encoder_hid_proj is not None or self.unet.config.encoder_hid_dim_type is not None:
            raise ValueError("another IP-Adapter is active on this UNet: suspend it first (one at a time)")
        processors, projection = self._installed
        self.unet.set_attn_processor(dict(processors))  # set_attn_processor pops from the dict it gets
        self.unet.encoder_hid_proj = projection
        self.unet.config.encoder_hid_dim_type = "ip_image_proj"  # what diffusers' loader sets (attribute of the config)
        self._active = True

    def suspend(self) -> None:
        """Take the processors off (the UNet is the stock one again) but keep them for `resume`:
        switching an IP-Adapter on and off per request costs no weight conversion."""
        self._require_loaded()
        if self._active:
            self._restore()
            self._active = False

    @property
    def uses_hidden_states(self) -> bool:
        """True when the projection takes CLIP's penultimate hidden states instead of image_embeds."""
        return self.variant != "plain"

    @property
    def loaded(self) -> bool:
        return self._saved is not None

    def set_scale(self, scale: float | dict) -> None:
        """diffusers' `set_ip_adapter_scale` semantics: a float for every layer, or a per-block
        dict such as {"up": {"block_0": [0.0, 1.0, 0.0]}} (InstantStyle; unnamed blocks get 0),
        expanded by diffusers' own helper to layer names."""
        self._require_loaded()
        check_scale(scale)
        # (diffusers' IPAdapterMixin is not used: importing it pulls in transformers' image processors)
        if isinstance(scale, dict):
            self._check_block_scale(scale)
        try:
            expanded = _maybe_expand_lora_scales(self.unet, [scale], default_scale=0.0)[0]
        except ValueError as exc:
            raise ParameterError("ip_scale", scale, f"blocks of this UNet ({exc})") from exc
        for name, proc in self.unet.attn_processors.items():
            if not isinstance(proc, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor)):
                continue
            if isinstance(expanded, dict):
                matches = [s for layer, s in expanded.items() if name.startswith(layer + ".")]
                proc.scale = [matches[-1] if matches else 0.0]
            else:
                proc.scale = [float(expanded)]

    def _check_block_scale(self, scale: dict) -> None:
        # diffusers' expansion silently ignores block names it does not know
        blocks = {part: {f"block_{i}" for i, b in enumerate(getattr(self.unet, f"{part}_blocks")) if hasattr(b, "attentions")}
                  for part in ("down", "up")}
        for part, value in scale.items():
            if part not in ("down", "mid", "up"):
                raise ParameterError("ip_scale", scale, "a dict with keys 'down', 'mid', 'up'")
            if part != "mid" and isinstance(value, dict) and not set(value) <= blocks[part]:
                raise ParameterError("ip_scale", scale, f"'{part}' blocks with attention: {sorted(blocks[part])}")

    def unload(self) -> None:
        """Put back the UNet's original attention processors and encoder_hid_proj."""
        self.suspend()
        self._saved = None
        self._installed = None

    def _restore(self) -> None:
        processors, projection, hid_type = self._saved
        self.unet.encoder_hid_proj = projection  # first: the Resampler's own processors leave attn_processors
        self.unet.config.encoder_hid_dim_type = hid_type
        self.unet.set_attn_processor(dict(processors))  # set_attn_processor pops from the dict it gets

    def _require_loaded(self) -> None:
        if self._saved is None:
            raise RuntimeError(f"the IP-Adapter {self.source} was unloaded")


def _image_list(image: Any) -> tuple[Any, ...]:
    """One image or a list of them (their tokens side by side) as a non-empty tuple."""
    images = tuple(image) if isinstance(image, (list, tuple)) else (image,)
    if not images:
        raise ParameterError("ip_image", image, "at least one image")
    return images


def ip_processors(unet: torch.nn.Module) -> list[Any]:
    """The IP-Adapter attention processors installed on `unet`, in attn_processors order."""
    return [p for n, p in unet.attn_processors.items() if n.endswith("attn2.processor")
            and isinstance(p, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor))]


def ip_tokens(unet: torch.nn.Module, image_embeds: Sequence[torch.Tensor]) -> torch.Tensor:
    """What the SD1.5 UNet's active IP-Adapter makes of `added_cond_kwargs["image_embeds"]`
    (IPAdapterPlugin's [embeds]): its projection's image tokens, all images side by side,
    rows x N x cross_attention_dim. The input of the exported sd15_unet_ip graph, which runs
    the attention but not the projection (whose input rank differs between variants)."""
    projection = unet.encoder_hid_proj
    if not isinstance(projection, MultiIPAdapterImageProjection) or unet.config.encoder_hid_dim_type != "ip_image_proj":
        raise ValueError("image_embeds given, but no IP-Adapter is active on the SD1.5 UNet (load_ip_adapter / resume)")
    if len(image_embeds) != 1 or projection.num_ip_adapters != 1:
        raise ValueError(f"one IP-Adapter at a time (image_embeds for {len(image_embeds)})")
    with torch.no_grad():
        (tokens,) = projection(list(image_embeds))  # rows x images x tokens x width
    return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])


def ip_layer_scales(unet: torch.nn.Module) -> torch.Tensor:
    """The active IP-Adapter's scale of every cross-attention layer, in attn_processors order
    (what `set_scale` set: a float everywhere, or InstantStyle's per-block dict expanded,
    unnamed layers 0): the sd15_unet_ip graph's ip_scale input, float32."""
    scales = []
    for proc in ip_processors(unet):
        scale = proc.scale
        if not isinstance(scale, list) or len(scale) != 1 or not isinstance(scale[0], (int, float)):
            raise ValueError(f"the sd15_unet_ip graph takes one float scale per layer, the IP-Adapter has {scale!r}")
        scales.append(float(scale[0]))
    if not scales:
        raise ValueError("no IP-Adapter is active on the SD1.5 UNet")
    return torch.tensor(scales, dtype=torch.float32)


def check_scale(scale: Any, name: str = "ip_scale") -> None:
    if isinstance(scale, dict):
        return  # checked against the UNet's blocks by IPAdapter.set_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ParameterError(name, scale, "a finite number >= 0 (0 disables the image prompt), or a per-block dict")


def load_ip_adapter(path: str | Path, unet: torch.nn.Module) -> IPAdapter:
    """Read an ip-adapter_sd15 / ip-adapter-plus_sd15 file (.bin or .safetensors) and install it
    on `unet` (the SD1.5 UNet, already on its device and dtype). Errors name the file and what
    does not fit (an SDXL file shows up as a cross-attention width mismatch)."""
    return IPAdapter(unet, read_ip_adapter_file(path), source=str(path))


def default_image_encoder_path(ip_adapter_path: str | Path) -> Path | None:
    """The h94/IP-Adapter layout keeps the encoder in `image_encoder/` beside the file or one
    level up (models/ip-adapter_sd15.bin + models/image_encoder); None if neither exists."""
    here = Path(ip_adapter_path).parent
    for folder in (here / "image_encoder", here.parent / "image_encoder"):
        if (folder / "config.json").is_file():
            return folder
    return None


@requires_plugin
class IPAdapterPlugin:
    """The image prompt as an SD1.5 step plugin (see plugins/base.py).

    adapter: an installed IPAdapter; image_encoder: CLIPImageEncoder (or a bare
    CLIPVisionModelWithProjection); image: one image or a list of images (path, PIL, array,
    tensor; several images give their tokens side by side); scale: float or per-block dict.
    """

    name = "ip-adapter"

    def __init__(self, adapter: IPAdapter, image_encoder: Any, image: Any, scale: float | dict = 1.0):
        check_scale(scale)
        self.adapter, self.scale = adapter, scale
        self.encoder = image_encoder if isinstance(image_encoder, CLIPImageEncoder) else CLIPImageEncoder(image_encoder)
        width = self.encoder.hidden_size if adapter.uses_hidden_states else self.encoder.embed_dim
        if width != adapter.image_embed_dim:
            what = "hidden_size" if adapter.uses_hidden_states else "projection_dim"
            raise ParameterError(
                "image_encoder", f"{what}={width}",
                f"{what}={adapter.image_embed_dim}, the width the {adapter.variant} IP-Adapter {adapter.source} takes",
            )
        self._images: Sequence[Any] = _image_list(image)
        self._encoded: tuple[Any, torch.Tensor, torch.Tensor] | None = None
        self._embeds: torch.Tensor | None = None

    @classmethod
    def required_for(cls, unet: torch.nn.Module) -> str | None:
        """An IP-Adapter installed on `unet` changes its inputs: a request needs the image."""
        if getattr(unet.config, "encoder_hid_dim_type", None) == "ip_image_proj":
            return "an IPAdapterPlugin (an IP-Adapter is installed on the SD1.5 UNet: give an image, or unload it)"
        return None

    def with_image(self, image: Any) -> "IPAdapterPlugin":
        """The same adapter, encoder and scale on another image prompt (a per-request image)."""
        clone = copy.copy(self)
        clone._images, clone._encoded, clone._embeds = _image_list(image), None, None
        return clone

    def encode_images(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond), each 1 x num_images x D (plain) or 1 x num_images x T x H (plus, full)."""
        key = (device, dtype)
        if self._encoded is None or self._encoded[0] != key:
            cond, uncond = self.encoder.encode(
                self._images, hidden_states=self.adapter.uses_hidden_states, device=device, dtype=dtype
            )
            self._encoded = (key, cond[None], uncond[None])
        return self._encoded[1], self._encoded[2]

    def prepare(self, ctx: PluginContext) -> None:
        if not self.adapter.active:
            raise RuntimeError(f"the IP-Adapter {self.adapter.source} is suspended or unloaded: resume() it first")
        self.adapter.set_scale(self.scale)
        cond, uncond = self.encode_images(ctx.device, ctx.dtype)
        rows = [cond] * ctx.batch
        self._embeds = torch.cat(([uncond] * ctx.batch if ctx.cfg else []) + rows)

    def unet_kwargs(self, ctx: PluginContext, step: StepInfo, sample: torch.Tensor) -> dict[str, Any]:
        if self._embeds is None:
            raise RuntimeError("IPAdapterPlugin.prepare must run before unet_kwargs")
        if sample.shape[0] != self._embeds.shape[0]:
            raise ValueError(f"SD1.5 UNet batch of {sample.shape[0]} rows, image embeddings prepared for {self._embeds.shape[0]}")
        return {"added_cond_kwargs": {"image_embeds": [self._embeds]}}


def load_ip_adapter_plugin(
    unet: torch.nn.Module,
    path: str | Path,
    image: Any,
    *,
    scale: float | dict = 1.0,
    image_encoder: str | Path | None = None,
) -> IPAdapterPlugin:
    """What `--ip-adapter PATH --ip-image IMG --ip-scale F [--image-encoder DIR]` means: install
    the file on `unet` (the SD1.5 UNet), load the CLIP vision encoder (by default the
    `image_encoder/` folder beside the file or one level up) on the UNet's device and dtype,
    and return the plugin; `plugin.adapter.unload()` takes the IP-Adapter off again."""
    check_scale(scale)
    encoder_path = image_encoder or default_image_encoder_path(path)
    if encoder_path is None:
        raise ParameterError(
            "image_encoder", None, f"a local CLIP vision folder; none found beside {path} (image_encoder/)"
        )
    encoder = load_image_encoder(encoder_path, device=unet.device, dtype=unet.dtype)
    adapter = load_ip_adapter(path, unet)
    try:
        return IPAdapterPlugin(adapter, encoder, image, scale)
    except Exception:
        adapter.unload()
        raise


def plugin_from_spec(unet: torch.nn.Module, spec: Any) -> IPAdapterPlugin:
    """The table's loader (plugin_kinds, kind "ip_adapter"): a PluginSpec's IP-Adapter (its
    image, or several images as a tuple)."""
    image = list(spec.image) if isinstance(spec.image, tuple) else spec.image
    return load_ip_adapter_plugin(unet, spec.path, image, scale=spec.scale, image_encoder=spec.image_encoder)
