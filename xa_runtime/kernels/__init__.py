"""Triton kernels, each beside its plain-torch reference, with a dispatch that falls back
to the reference where Triton cannot run (CPU without TRITON_INTERPRET=1, no triton)."""

from __future__ import annotations

import torch

from .conv_epilogue import check_conv_epilogue_args, conv_epilogue_reference, conv_epilogue_triton
from .remap_inject import (
    check_remap_inject_args,
    interpreted,
    remap_inject_reference,
    remap_inject_triton,
    triton,
)


def triton_usable(device: torch.device | str) -> bool:
    """Whether Triton kernels can run for tensors on `device`."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or interpreted()


def remap_inject(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hidden: torch.Tensor, scale: float,
    fusion_guidance_scale: float | None = None,
) -> torch.Tensor:
    """hidden <- hidden + s*(W x + b) (or the fusion lerp), in place; returns hidden.

    Triton on CUDA (or under the interpreter), the torch reference otherwise."""
    if triton_usable(hidden.device):
        return remap_inject_triton(x, weight, bias, hidden, scale, fusion_guidance_scale)
    check_remap_inject_args(x, weight, bias, hidden)
    return hidden.copy_(remap_inject_reference(x, weight, bias, hidden, scale, fusion_guidance_scale))


def conv_epilogue(
    y: torch.Tensor, bias: torch.Tensor, *, relu: bool = False, skip: torch.Tensor | None = None
) -> torch.Tensor:
    """y <- relu(y + b) and/or y + b + skip, in place on a bias-free conv output; returns y.

    Triton on CUDA (or under the interpreter), the torch reference otherwise."""
    if triton_usable(y.device):
        return conv_epilogue_triton(y, bias, relu=relu, skip=skip)
    check_conv_epilogue_args(y, bias, skip)
    return y.copy_(conv_epilogue_reference(y, bias, relu=relu, skip=skip))


__all__ = [
    "conv_epilogue", "conv_epilogue_reference", "conv_epilogue_triton",
    "remap_inject", "remap_inject_reference", "remap_inject_triton", "triton_usable",
]
