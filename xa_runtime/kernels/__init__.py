"""Triton kernels, each beside its plain-torch reference. One dispatch style: every kernel
is a function `kernels.X(...)` that runs Triton where it can (availability.triton_usable:
CUDA, or the CPU interpreter) and its reference otherwise; the module swaps (GroupNorm,
GEGLU) and the guided sampler only call those functions."""

from __future__ import annotations

# The submodules first: the functions below then take the package attributes that share
# their names (kernels.group_norm is the function; its module stays importable by path).
from .availability import interpreted, launch, recording_launches, triton_usable
from .conv_epilogue import conv_epilogue, conv_epilogue_reference, conv_epilogue_triton
from .geglu import geglu, geglu_reference, geglu_triton
from .group_norm import group_norm, group_norm_reference, group_norm_triton
from .guided_step import guided_step, guided_step_reference, guided_step_triton
from .remap_inject import remap_inject, remap_inject_reference, remap_inject_triton

__all__ = [
    "conv_epilogue", "conv_epilogue_reference", "conv_epilogue_triton",
    "geglu", "geglu_reference", "geglu_triton",
    "group_norm", "group_norm_reference", "group_norm_triton",
    "guided_step", "guided_step_reference", "guided_step_triton",
    "interpreted", "launch", "recording_launches",
    "remap_inject", "remap_inject_reference", "remap_inject_triton", "triton_usable",
]
