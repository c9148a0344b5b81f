"""What the kernels hand the pipeline: the runtime decides, from a RuntimeConfig and the
device, which Triton kernels act in a request and gives the pipeline plain functions and
module swaps; the pipeline itself never imports xa_runtime.kernels.

- `kernel_hooks(config, device)`: the remap-inject function for the SDXL injection sites
  and the fused CFG + sampler step (each None when off).
- `sync_kernel_modules(parts, config, device)`: the kernel-backed module swaps of the
  UNets (GroupNorm in channels-last UNets, GEGLU) and of the mapping layers (the residual
  blocks' fused conv epilogues), flags set to the config; called when a pipeline is built,
  when its runtime changes and at the start of every request (modules may be shared).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels.modules import sync_kernel_modules as sync_unet_modules
from ..models.mapping import ResidualBlock
from .config import RuntimeConfig

Inject = Callable[..., torch.Tensor]  # (hidden, *, x, conv, scale, fusion) -> hidden, updated in place


@dataclass(frozen=True)
class KernelHooks:
    """inject: the fused 1x1 zero_out conv + scale + injection at one SDXL site
    (`inject(hidden, x=stage_output, conv=zero_out_k, scale=acs, fusion=f)`), or None for
    the plain mapping + residual injection. guided_step: kernels.guided_step (the fused
    CFG + update, for pipeline.schedulers.Sampler), or None for diffusers' step."""

    inject: Inject | None = None
    guided_step: Callable | None = None


def remap_inject_site(
    hidden: torch.Tensor, *, x: torch.Tensor, conv: nn.Conv2d, scale: float, fusion: float | None
) -> torch.Tensor:
    """One SDXL injection site through the remap-inject kernel (hidden updated in place)."""
    return kernels.remap_inject(x, conv.weight, conv.bias, hidden, scale, fusion)


def kernel_hooks(config: RuntimeConfig, device: torch.device | str) -> KernelHooks:
    """The kernels that act in a request of a pipeline on `device` running `config`: the
    remap-inject only outside compile (traced_kernels_active), the guided step whenever
    the kernels are on (it runs outside the compiled steps)."""
    device = torch.device(device)
    return KernelHooks(
        inject=remap_inject_site if config.traced_kernels_active(device) else None,
        guided_step=kernels.guided_step if config.kernels_active(device) else None,
    )


class FusedEpilogueResidualBlock(ResidualBlock):
    """The mapping's residual block with `use_triton`: the two 3x3 convs without bias,
    each followed by one kernels.conv_epilogue pass (bias + ReLU, then bias + residual
    add). Same parameters, state-dict names and values (installed by swapping the class)."""

    use_triton: bool = False

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if not self.use_triton:
            return super().forward(x, output_size)
        x = self.block_input(x, output_size)
        h = kernels.conv_epilogue(F.conv2d(x, self.block1.weight, None, padding=1), self.block1.bias, relu=True)
        return kernels.conv_epilogue(F.conv2d(h, self.block2.weight, None, padding=1), self.block2.bias, skip=x)


def install_fused_epilogues(mapping: nn.Module, use_triton: bool) -> list[nn.Module]:
    """Swap, in place, every ResidualBlock of `mapping` for FusedEpilogueResidualBlock and
    set its `use_triton`. Returns the swapped blocks."""
    blocks = [m for m in mapping.modules() if isinstance(m, ResidualBlock)]
    for m in blocks:
        m.__class__ = FusedEpilogueResidualBlock
        m.use_triton = use_triton
    return blocks


def sync_kernel_modules(parts: Mapping[str, object], config: RuntimeConfig, device: torch.device | str) -> None:
    """Bring the swaps of `parts` ("sd15_unet", "mapping", "sdxl_unet", as RuntimeConfig's
    CHANNELS_LAST_PARTS) in line with `config` on `device`. Channels-last UNets keep their
    layout through GroupNorm and the transformer blocks; with the traced kernels active,
    GroupNorm (channels-last), GEGLU and the mapping's conv epilogues run Triton kernels.
    A part that is not a torch module (another backend's) is left alone."""
    on = config.traced_kernels_active(torch.device(device))
    channels_last = config.channels_last_parts()
    for name in ("sd15_unet", "sdxl_unet"):
        sync_unet_modules(parts[name], name in channels_last, on)
    mapping = parts.get("mapping")
    if isinstance(mapping, nn.Module) and (on or any(isinstance(m, FusedEpilogueResidualBlock) for m in mapping.modules())):
        install_fused_epilogues(mapping, on)
