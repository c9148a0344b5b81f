"""The two X-Adapter branches as thin wrappers around stock diffusers UNets.

No UNet code is copied: forward hooks on the blocks capture SD1.5's decoder features
(outputs of up_blocks[1], [2], [3] = f0, f1, f2) and add the mapped residuals to SDXL's
decoder (outputs of mid_block, up_blocks[0], up_blocks[1] += r0, r1, r2). Outside a
branch call the hooks are inert, so the wrapped UNet behaves exactly like the stock one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .mapping import inject_residual

# Where X-Adapter reads and writes (xadapter.md, "Shapes").
SD15_CAPTURE_BLOCKS = (1, 2, 3)  # up_blocks indices whose outputs are f0, f1, f2

__all__ = ["SD15Branch", "SDXLBranch", "ResidualInjection", "inject_residual"]

Injection = Callable[[torch.Tensor], torch.Tensor]  # SDXL hidden state -> hidden state + residual


@dataclass(frozen=True)
class ResidualInjection:
    """The plain injection at one SDXL site as data (residual, scale, fusion), so that a
    backend that cannot call Python inside its UNet (onnxruntime, TensorRT) can read it."""

    residual: torch.Tensor
    scale: float = 1.0
    fusion_guidance_scale: float | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return inject_residual(hidden, self.residual, self.scale, self.fusion_guidance_scale)


class SD15Branch(nn.Module):
    """SD1.5 UNet that also returns its decoder features.

    forward(sample, timestep, encoder_hidden_states, **unet_kwargs) -> (noise_pred, (f0, f1, f2)).
    unet_kwargs are diffusers' own extras (ControlNet `down_block_additional_residuals` /
    `mid_block_additional_residual`, T2I-Adapter `down_intrablock_additional_residuals`,
    `cross_attention_kwargs`, `added_cond_kwargs` with IP-Adapter `image_embeds`, ...).
    """

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        if len(unet.up_blocks) != 4:
            raise ValueError(f"SD1.5 branch needs a UNet with 4 up blocks, this one has {len(unet.up_blocks)}")
        self.unet = unet
        self._features: list[torch.Tensor] | None = None
        self._hooks = [unet.up_blocks[i].register_forward_hook(self._capture) for i in SD15_CAPTURE_BLOCKS]

    def _capture(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self._features is not None:
            self._features.append(output)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor, **unet_kwargs: Any
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self._features = []
        try:
            noise_pred = self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **unet_kwargs)[0]
            f0, f1, f2 = self._features
        finally:
            self._features = None
        return noise_pred, (f0, f1, f2)

    def remove_hooks(self) -> None:
        """Detach from the UNet (it is then exactly the stock module again)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


class SDXLBranch(nn.Module):
    """SDXL UNet that takes X-Adapter residuals into its decoder.

    forward(sample, timestep, encoder_hidden_states, added_cond_kwargs, residuals=(r0, r1, r2),
    adapter_condition_scale=1.0, fusion_guidance_scale=None, **unet_kwargs) -> noise_pred.
    residuals=None (and no injections) runs the stock UNet.
    """

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        if len(unet.up_blocks) != 3 or unet.mid_block is None:
            raise ValueError("SDXL branch needs a UNet with a mid block and 3 up blocks")
        self.unet = unet
        self._pending: tuple[Injection, ...] | None = None
        # The mid-block residual goes in before a ControlNet mid residual would be added by
        # diffusers; the release adds it after. No SDXL ControlNet is ever active here.
        targets = (unet.mid_block, unet.up_blocks[0], unet.up_blocks[1])
        self._hooks = [blk.register_forward_hook(self._make_injector(i)) for i, blk in enumerate(targets)]

    def _make_injector(self, index: int):
        # a partial of a method, not a local function: the UNet (and a pipeline holding it) pickles
        return functools.partial(self._inject, index)

    def _inject(self, index: int, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self._pending is None:
            return None
        return self._pending[index](output)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor],
        residuals: Sequence[torch.Tensor] | None = None,
        adapter_condition_scale: float = 1.0,
        fusion_guidance_scale: float | None = None,
        injections: Sequence[Injection] | None = None,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        """`residuals` (r0, r1, r2) are injected with `inject_residual`; alternatively
        `injections` gives one callable per site (hidden -> new hidden), which is how fused
        kernels plug in. Neither: the stock UNet."""
        if residuals is not None and injections is not None:
            raise ValueError("pass residuals or injections, not both")
        if residuals is not None:
            if len(residuals) != 3:
                raise ValueError(f"expected 3 residuals (r0, r1, r2), got {len(residuals)}")
            injections = [ResidualInjection(r, adapter_condition_scale, fusion_guidance_scale) for r in residuals]
        if injections is not None and len(injections) != 3:
            raise ValueError(f"expected 3 injections, got {len(injections)}")
        self._pending = tuple(injections) if injections is not None else None
        try:
            return self.unet(
                sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, return_dict=False,
                **unet_kwargs,
            )[0]
        finally:
            self._pending = None

    def remove_hooks(self) -> None:
        """Detach from the UNet (it is then exactly the stock module again)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
