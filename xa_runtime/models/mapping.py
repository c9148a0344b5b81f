"""X-Adapter mapping layers: SD1.5 decoder features f0, f1, f2 -> SDXL residuals r0, r1, r2.

Three stages of three residual blocks (`body.0` .. `body.8`) and a 1x1 "zero" conv per
stage (`zero_out.0..2`); ReLU, no norm, no timestep. Parameter names match the released
checkpoint exactly, so it loads unchanged (see xadapter.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MappingConfig:
    """Channel widths of the three stages.

    in_channels: channels of f0, f1, f2 (SD1.5 up_blocks[1..3] outputs).
    out_channels: channels of r0, r1, r2 (SDXL mid_block, up_blocks[0], up_blocks[1] outputs).
    """

    in_channels: tuple[int, int, int] = (1280, 640, 320)
    out_channels: tuple[int, int, int] = (1280, 1280, 640)
    blocks_per_stage: int = 3

    @classmethod
    def from_unet_configs(cls, sd15_unet: Mapping[str, Any], sdxl_unet: Mapping[str, Any]) -> "MappingConfig":
        """Derive the widths from the two UNets' configs (works for any width, tiny included)."""
        sd15 = list(reversed(sd15_unet["block_out_channels"]))
        sdxl = list(sdxl_unet["block_out_channels"])
        if len(sd15) != 4 or len(sdxl) != 3:
            raise ValueError(
                "X-Adapter needs an SD1.5-like UNet with 4 stages and an SDXL-like UNet with 3; got "
                f"block_out_channels {list(sd15_unet['block_out_channels'])} and {sdxl}"
            )
        sdxl_rev = list(reversed(sdxl))
        return cls(in_channels=(sd15[1], sd15[2], sd15[3]), out_channels=(sdxl[-1], sdxl_rev[0], sdxl_rev[1]))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "MappingConfig":
        """The widths a mapping-layer state dict (released names) was trained for, read off
        its tensor shapes; ValueError when `state` does not look like one."""
        blocks = {int(k.split(".")[1]) for k in state if k.startswith("body.") and k.endswith(".block1.weight")}
        if not blocks or len(blocks) % 3 or blocks != set(range(len(blocks))):
            raise ValueError(
                "not an X-Adapter mapping checkpoint: expected tensors body.0.block1.weight .. "
                f"body.N.block1.weight in three equal stages, found {len(blocks)} such blocks"
            )
        n = len(blocks) // 3
        ins, outs = [], []
        for stage in range(3):
            first = f"body.{stage * n}"
            out_c = int(state[f"{first}.block1.weight"].shape[0])
            conv = state.get(f"{first}.in_conv.weight")
            ins.append(int(conv.shape[1]) if conv is not None else out_c)
            outs.append(out_c)
        return cls(in_channels=tuple(ins), out_channels=tuple(outs), blocks_per_stage=n)


class Upsample2x(nn.Module):
    """Transposed 3x3 conv, stride 2; called with an explicit output size like the release."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        return self.op(x, output_size=list(output_size))


class ResidualBlock(nn.Module):
    """y = x' + block2(relu(block1(x'))), x' = in_conv(up_opt(x)) where those exist."""

    def __init__(self, in_channels: int, out_channels: int, upsample: bool = False):
        super().__init__()
        self.up_opt = Upsample2x(in_channels) if upsample else None
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1) if in_channels != out_channels else None
        self.block1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def block_input(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """x' = in_conv(up_opt(x)) where those exist: what the residual branch and the skip read."""
        if self.up_opt is not None:
            assert output_size is not None
            x = self.up_opt(x, output_size)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        x = self.block_input(x, output_size)
        return x + self.block2(self.act(self.block1(x)))


class MappingLayers(nn.Module):
    """The trainable bridge of X-Adapter.

    forward(f0, f1, f2) with f0: B x C0 x h x w, f1: B x C1 x 2h x 2w, f2: B x C2 x 2h x 2w
    returns (r0, r1, r2): B x R0 x h x w, B x R1 x 2h x 2w, B x R2 x 4h x 4w, not yet scaled
    by the adapter condition scale.
    """

    def __init__(self, config: MappingConfig = MappingConfig()):
        super().__init__()
        self.config = config
        n = config.blocks_per_stage
        body: list[nn.Module] = []
        for stage, (cin, cout) in enumerate(zip(config.in_channels, config.out_channels)):
            for j in range(n):
                body.append(ResidualBlock(cin if j == 0 else cout, cout, upsample=(stage == 2 and j == 0)))
        self.body = nn.ModuleList(body)
        self.zero_out = nn.ModuleList(nn.Conv2d(c, c, 1) for c in config.out_channels)

    def stage(self, index: int, feature: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """The residual blocks of one stage, without its zero_out conv (kernels fuse that part)."""
        n = self.config.blocks_per_stage
        h = feature
        for j in range(n):
            h = self.body[index * n + j](h, output_size if j == 0 else None)
        return h

    def features(self, f0: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The three stages' outputs before their zero_out conv (what a fused
        remap-inject kernel consumes)."""
        # The release sizes the stage-2 upsample as 4x f0's grid (= SDXL's latent grid).
        out_size = (f0.shape[-2] * 4, f0.shape[-1] * 4)
        sizes = (None, None, out_size)
        return tuple(self.stage(i, f, sizes[i]) for i, f in enumerate((f0, f1, f2)))

    def forward(self, f0: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(conv(h) for conv, h in zip(self.zero_out, self.features(f0, f1, f2)))


def inject_residual(
    hidden: torch.Tensor, residual: torch.Tensor, scale: float | torch.Tensor,
    fusion_guidance_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """h + scale*r ("ADD" fusion) or, with a fusion guidance scale s, h + s*(scale*r - h).

    hidden, residual: B x C x H x W of the same shape. This is the reference the fused
    Triton remap-inject kernel is tested against. Exported graphs pass `scale` and
    `fusion_guidance_scale` as 1-element tensors, the latter encoded as graphs.encode_fusion
    does (negative: None, the plain add), chosen inside the graph by torch.where.
    """
    if residual.shape != hidden.shape:
        raise ValueError(
            f"residual of shape {tuple(residual.shape)} cannot be added to an SDXL hidden state of shape "
            f"{tuple(hidden.shape)}"
        )
    if isinstance(scale, torch.Tensor):
        scale = scale.to(hidden.dtype)
    r = residual.to(hidden.dtype) * scale
    if isinstance(fusion_guidance_scale, torch.Tensor):
        return torch.where(fusion_guidance_scale < 0, hidden + r,
                           hidden + fusion_guidance_scale.to(hidden.dtype) * (r - hidden))
    if fusion_guidance_scale is None:
        return hidden + r
    return hidden + fusion_guidance_scale * (r - hidden)


def fit_features(feats: tuple[torch.Tensor, ...], latent_hw: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Resize f0 to 1/4 and f1, f2 to 1/2 of SDXL's latent grid `latent_hw` when SD1.5 is
    not exactly half the SDXL size (bilinear); a no-op at the released 2x ratio."""
    h, w = latent_hw
    targets = ((h // 4, w // 4), (h // 2, w // 2), (h // 2, w // 2))
    return tuple(
        f if tuple(f.shape[-2:]) == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        for f, size in zip(feats, targets)
    )
