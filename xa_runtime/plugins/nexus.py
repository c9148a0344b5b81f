"""Nexus Adapters (Prime and Slim; WACV 2026): a text-aware T2I-Adapter on the SD1.5 branch.

The topology is T2I-Adapter's "full adapter" (pixel-unshuffle by 8, 3x3 conv_in, four
stages; from stage 2 on an average-pool downsampling, a 1x1 in_conv where the width
changes, residual blocks x + conv1x1(relu(conv3x3(x)))), and every stage ends with a
LayerNorm over channels and a cross-attention from the feature map to the prompt's text
embeddings (diffusers `Attention`, no bias on q/k/v, bias on the output projection,
upcast attention). The first conv of a residual block is either a plain 3x3 conv or a
HetConv (groupwise 3x3 + pointwise 1x1, summed; with or without biases); the weights' keys
decide. Prime and Slim are configurations of this one module (widths, blocks, groups).

The authors' code was not found in the reference index, so parameter names are ours and
mirror diffusers' T2IAdapter (`conv_in`, `body.{i}.in_conv`, `body.{i}.resnets.{j}.block1`
/ `.block1.gwc` + `.block1.pwc`, `.block2`) plus `body.{i}.norm` and `body.{i}.attn.{to_q,
to_k,to_v,to_out.0}`; an `adapter.` prefix (diffusers' wrapper) is accepted. The attention is
read as a pre-norm residual, x + attn(LayerNorm(x), text), per position of the feature map.
The widely used HetConv code (Singh et al., CVPR 2019) has no conv biases, so that is the
default here; weights that carry `block1.gwc.bias` / `block1.pwc.bias` load as well. The
attention sizes may be left out of config.json: the text width is read from `to_k`, and the
heads from `to_q` (64-wide heads) unless the config names them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ..errors import CheckpointError, ParameterError
from ..loading.checkpoint_files import read_folder_config, read_state_dict
from ..loading.exact_state import assign_exact, build_empty
from .base import PluginContext
from .t2i_adapter import AdapterFeaturePlugin, check_adapter_fits

log = logging.getLogger("xa_runtime")

NEXUS_ADAPTER_TYPES = ("full_adapter",)
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin", "model.bin")


@dataclass(frozen=True)
class NexusConfig:
    """in_channels: control image channels; channels: width per stage (= the SD1.5 UNet's down
    widths); groups: HetConv groups; hetconv: HetConv (True) or plain 3x3 (False) first convs;
    hetconv_bias: HetConv convs with biases; attention_heads x attention_head_dim: the
    cross-attention; cross_attention_dim: text width. `hetconv` and `hetconv_bias` are told by
    the weights' keys, not written to config.json."""

    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"
    groups: int = 1
    hetconv: bool = False
    hetconv_bias: bool = False
    attention_heads: int = 10
    attention_head_dim: int = 64
    cross_attention_dim: int = 768


NEXUS_PRESETS = {
    "nexus-sd15": NexusConfig(),
    "tiny-nexus-sd15": NexusConfig(channels=(32, 64, 128, 128), attention_heads=2, attention_head_dim=16,
                                   cross_attention_dim=32),
}


class HetConv(nn.Module):
    """Groupwise 3x3 conv + pointwise 1x1 conv of the same input, summed (C -> C)."""

    def __init__(self, channels: int, groups: int, bias: bool = False):
        super().__init__()
        if channels % groups:
            raise ValueError(f"HetConv groups={groups} must divide the {channels} channels")
        self.gwc = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=groups, bias=bias)
        self.pwc = nn.Conv2d(channels, channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gwc(x) + self.pwc(x)


class NexusResBlock(nn.Module):
    def __init__(self, channels: int, config: NexusConfig):
        super().__init__()
        if config.hetconv:
            self.block1: nn.Module = HetConv(channels, config.groups, config.hetconv_bias)
        else:
            self.block1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.act(self.block1(x)))


class NexusStage(nn.Module):
    """[avg-pool] -> [1x1 in_conv] -> residual blocks -> x + attn(LayerNorm(x), text)."""

    def __init__(self, in_channels: int, out_channels: int, down: bool, config: NexusConfig):
        super().__init__()
        self.downsample = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True) if down else None
        self.in_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        self.resnets = nn.Sequential(*[NexusResBlock(out_channels, config) for _ in range(config.num_res_blocks)])
        self.norm = nn.LayerNorm(out_channels)
        self.attn = Attention(
            query_dim=out_channels, cross_attention_dim=config.cross_attention_dim, heads=config.attention_heads,
            dim_head=config.attention_head_dim, bias=False, out_bias=True, upcast_attention=True,
        )

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        x = self.resnets(x)
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # B x hw x C
        tokens = tokens + self.attn(self.norm(tokens), encoder_hidden_states=text)
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class NexusAdapter(nn.Module):
    """forward(image B x in_channels x H x W in [0, 1], text B x T x cross_attention_dim) ->
    4 features B x channels[i] x H/(8*2^i) x W/(8*2^i), for `down_intrablock_additional_residuals`."""

    def __init__(self, config: NexusConfig):
        super().__init__()
        self.config = config
        ch = config.channels
        self.unshuffle = nn.PixelUnshuffle(config.downscale_factor)
        self.conv_in = nn.Conv2d(config.in_channels * config.downscale_factor**2, ch[0], kernel_size=3, padding=1)
        self.body = nn.ModuleList(
            NexusStage(ch[max(i - 1, 0)], ch[i], down=i > 0, config=config) for i in range(len(ch))
        )

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> list[torch.Tensor]:
        if text.shape[0] != image.shape[0]:
            raise ValueError(f"{image.shape[0]} control images but {text.shape[0]} rows of text embeddings")
        x = self.conv_in(self.unshuffle(image))
        features = []
        for stage in self.body:
            x = stage(x, text)
            features.append(x)
        return features


class NexusAdapterPlugin(AdapterFeaturePlugin):
    """A Nexus Adapter as a step plugin: run once per generation on the control image and the
    positive prompt's SD1.5 embeddings; `scale` multiplies the features (0 disables)."""

    name = "nexus-adapter"
    scale_name = "nexus_scale"

    def features(self, pixels: torch.Tensor, ctx: PluginContext) -> list[torch.Tensor]:
        text = ctx.prompt_embeds.chunk(2)[1] if ctx.cfg else ctx.prompt_embeds  # rows are [uncond; cond]
        return self.adapter(pixels, text)


# ---------------------------------------------------------------------------------- files
_CONFIG_KEYS = ("in_channels", "channels", "num_res_blocks", "downscale_factor", "adapter_type", "groups",
                "attention_heads", "attention_head_dim", "cross_attention_dim")


def config_to_json(config: NexusConfig) -> dict[str, Any]:
    """config.json content (the layout, `hetconv`, is told by the weights, not written)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items() if k in _CONFIG_KEYS}


def _weights_file(folder: Path) -> Path:
    named = [folder / n for n in WEIGHT_NAMES if (folder / n).is_file()]
    if named:
        return named[0]  # safetensors first
    other = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if len(other) != 1:
        raise ParameterError("nexus_adapter", str(folder), f"a folder with one weights file ({', '.join(WEIGHT_NAMES)}, "
                             f"or a single *.safetensors / *.bin); found {[q.name for q in other]}")
    return other[0]


def _attention_sizes(values: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> None:
    """Fill the attention sizes config.json leaves out from the first stage's projections."""
    q, k = state.get("body.0.attn.to_q.weight"), state.get("body.0.attn.to_k.weight")
    if k is not None:
        values.setdefault("cross_attention_dim", int(k.shape[1]))
    if q is None:
        return  # assign_exact names what is missing
    inner = int(q.shape[0])
    heads, dim = values.get("attention_heads"), values.get("attention_head_dim")
    if heads is None and dim is None:
        if inner % 64:
            raise CheckpointError(f"{source}: attention width {inner} is not a multiple of 64; give attention_heads "
                                  "and attention_head_dim in config.json")
        heads, dim = inner // 64, 64
    elif heads is None:
        heads = inner // int(dim)
    elif dim is None:
        dim = inner // int(heads)
    if int(heads) * int(dim) != inner:
        raise CheckpointError(f"{source}: config attention_heads={heads} x attention_head_dim={dim}, but "
                              f"body.0.attn.to_q.weight projects to {inner}")
    values["attention_heads"], values["attention_head_dim"] = int(heads), int(dim)


def nexus_config_for(raw: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> NexusConfig:
    """The NexusConfig of a config.json dict, with the first-conv layout (HetConv or plain,
    HetConv biases) and any attention sizes the config leaves out told by the weights."""
    unknown = sorted(k for k in raw if k not in _CONFIG_KEYS and not k.startswith("_"))
    if unknown:
        log.warning("%s: ignoring config keys %s", source, unknown)
    values = {k: raw[k] for k in _CONFIG_KEYS if k in raw}
    if "channels" in values:
        values["channels"] = tuple(values["channels"])
    if values.get("adapter_type", "full_adapter") not in NEXUS_ADAPTER_TYPES:
        raise CheckpointError(f"{source}: adapter_type {values['adapter_type']!r}; accepted: {', '.join(NEXUS_ADAPTER_TYPES)}")
    het = sorted(k for k in state if k.endswith("block1.gwc.weight"))
    plain = [k for k in state if k.endswith("block1.weight")]
    if het and plain:
        raise CheckpointError(f"{source}: mixes HetConv ({het[0]}) and plain ({plain[0]}) first convs")
    groups = int(values.get("groups", 1))
    bias = False
    if het:
        weight = state[het[0]]
        found = weight.shape[0] // weight.shape[1]
        if "groups" in values and groups != found:
            raise CheckpointError(f"{source}: config groups={groups}, but {het[0]} has {found} groups")
        values["groups"] = found
        bias = het[0][: -len("weight")] + "bias" in state  # one layout for all blocks: assign_exact checks the rest
    else:
        if groups > 1:  # the public code configures a HetConv, then overwrites it with a plain 3x3 conv
            log.info("%s: config groups=%d but the weights hold plain 3x3 first convs; loading those", source, groups)
        values["groups"] = 1
    _attention_sizes(values, state, source)
    return NexusConfig(**values, hetconv=bool(het), hetconv_bias=bias)


def load_nexus_adapter(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> NexusAdapter:
    """A Nexus Adapter from a local folder: config.json + one weights file (.safetensors, or
    .bin read with weights_only=True). Every tensor must match the module."""
    p = Path(path)
    raw = read_folder_config(p, "nexus_adapter", "a local Nexus Adapter folder (config.json + weights)")
    weights = _weights_file(p)
    state = read_state_dict(weights)
    if state and all(k.startswith("adapter.") for k in state):
        state = {k[len("adapter."):]: v for k, v in state.items()}
    config = nexus_config_for(raw, state, str(p))
    module = build_empty(lambda: NexusAdapter(config))
    return assign_exact(module, state, f"{weights} (Nexus Adapter)", dtype=dtype, device=device)


def load_nexus_adapter_plugin(
    unet: torch.nn.Module | None, path: str | Path, image: Any, *, scale: float = 1.0,
    control_type: str = "none",
) -> NexusAdapterPlugin:
    """What `--nexus-adapter PATH --adapter-image IMG --nexus-scale F` means; with `unet` (the
    SD1.5 UNet) the adapter is loaded on its device and dtype and checked to fit it."""
    where = {"dtype": unet.dtype, "device": unet.device} if unet is not None else {}
    adapter = load_nexus_adapter(path, **where)
    if unet is not None:
        check_adapter_fits(adapter, unet, str(path))
        text_width = unet.config.cross_attention_dim
        if adapter.config.cross_attention_dim != text_width:
            raise CheckpointError(f"{path}: Nexus Adapter text width {adapter.config.cross_attention_dim}, the SD1.5 "
                                  f"UNet's is {text_width}")
    return NexusAdapterPlugin(adapter, image, scale, control_type=control_type)


def build_tiny_nexus(
    sd15_unet: torch.nn.Module, hetconv: bool = True, groups: int = 4, seed: int = 0, hetconv_bias: bool = False
) -> NexusAdapter:
    """A random Nexus Adapter fitting `sd15_unet` (its widths and text width, 2 heads of 16)."""
    cfg = sd15_unet.config
    config = NexusConfig(channels=tuple(cfg.block_out_channels), attention_heads=2, attention_head_dim=16,
                         cross_attention_dim=cfg.cross_attention_dim, hetconv=hetconv, groups=groups if hetconv else 1,
                         hetconv_bias=hetconv and hetconv_bias)
    torch.manual_seed(seed)
    return NexusAdapter(config).eval().requires_grad_(False)


def plugin_from_spec(unet: torch.nn.Module | None, spec: Any) -> NexusAdapterPlugin:
    """The table's loader (plugin_kinds, kind "nexus"): a PluginSpec's Nexus Adapter."""
    return load_nexus_adapter_plugin(unet, spec.path, spec.image, scale=spec.scale)
