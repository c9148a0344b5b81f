"""Which kernel-backed module swaps a UNet carries, kept in line with a RuntimeConfig.

Two swaps (same parameters, same state-dict names, same values within the kernels'
tolerances): GroupNorm + Transformer2D for channels-last UNets (kernels.group_norm) and
GEGLU (kernels.geglu). Each swapped module carries a `use_triton` flag. Modules may be
shared between pipelines (xa-bench's variants, from_diffusers), so a pipeline sets the
flags of its UNets at the start of every request, not only when it is built.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .geglu import _FUSED, install_fused_geglu
from .group_norm import ChannelsLastGroupNorm, install_channels_last_modules


def _swapped_types() -> tuple[type, ...]:
    return (ChannelsLastGroupNorm, *_FUSED.values())


def sync_kernel_modules(unet: nn.Module, channels_last: bool, use_triton: bool) -> None:
    """Install the swaps `unet` needs (channels-last ones only when `channels_last`, GEGLU
    only when `use_triton`) and set every swapped module's `use_triton`. Without swaps
    anywhere in the process and nothing to install this does not walk the modules."""
    if channels_last:
        install_channels_last_modules(unet, use_triton)
    if use_triton:
        install_fused_geglu(unet, True)
    elif _FUSED or channels_last or ChannelsLastGroupNorm.instances:
        kinds = _swapped_types()
        for m in unet.modules():
            if isinstance(m, kinds):
                m.use_triton = False


@contextmanager
def kernels_off(*modules: nn.Module) -> Iterator[None]:
    """Swapped modules under `modules` run torch's ops inside the block (e.g. while the
    ONNX exporter traces them); their `use_triton` flags are restored after it."""
    kinds = _swapped_types()
    saved = [(m, m.use_triton) for root in modules for m in root.modules() if isinstance(m, kinds)]
    for m, _ in saved:
        m.use_triton = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.use_triton = flag
