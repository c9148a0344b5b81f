"""Which kernel-backed module swaps a UNet carries, and a scope that turns every swapped
module's kernel off.

Two swaps (same parameters, same state-dict names, same values within the kernels'
tolerances): GroupNorm + Transformer2D for channels-last UNets (kernels.group_norm) and
GEGLU (kernels.geglu). Each swapped module carries a `use_triton` flag (a class attribute
of its swapped class; other layers' swaps, e.g. the mapping's fused epilogues installed
by xa_runtime.runtime.kernel_hooks, follow the same rule, so `kernels_off` covers them).
Modules may be shared between pipelines (xa-bench's variants, from_diffusers), so the
runtime sets the flags of a pipeline's UNets at the start of every request.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .geglu import _FUSED, install_fused_geglu
from .geglu import SWAPS as GEGLU_SWAPS
from .group_norm import SWAPS as CHANNELS_LAST_SWAPS
from .group_norm import ChannelsLastGroupNorm, install_channels_last_modules


def _swapped_types() -> tuple[type, ...]:
    return (ChannelsLastGroupNorm, *_FUSED.values())


def _generation() -> int:
    """Changes whenever any module anywhere is swapped (cached lists are then stale)."""
    return CHANNELS_LAST_SWAPS[0] + GEGLU_SWAPS[0]


# unet -> (generation, channels_last, GEGLU installed, its swapped modules): a request
# sets flags on the cached list (~0.05 ms) instead of walking ~2000 modules (~4 ms, SDXL)
_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[int, bool, bool, list[nn.Module]]]" = weakref.WeakKeyDictionary()


def sync_kernel_modules(unet: nn.Module, channels_last: bool, use_triton: bool) -> None:
    """Install the swaps `unet` needs (channels-last ones only when `channels_last`, GEGLU
    only when `use_triton`) and set every swapped module's `use_triton`. Walks the modules
    only when something may have changed since the last call for this UNet."""
    cached = _CACHE.get(unet)
    if cached is not None and cached[0] == _generation() and cached[1] == channels_last and (cached[2] or not use_triton):
        for m in cached[3]:
            m.use_triton = use_triton
        return
    if channels_last:
        install_channels_last_modules(unet, use_triton)
    if use_triton:
        install_fused_geglu(unet, True)
    kinds = _swapped_types()
    swapped = [m for m in unet.modules() if isinstance(m, kinds)]
    for m in swapped:
        m.use_triton = use_triton
    geglu = use_triton or (cached is not None and cached[2])
    _CACHE[unet] = (_generation(), channels_last, geglu, swapped)


def is_swapped(module: nn.Module) -> bool:
    """Whether `module` is a kernel-backed swap: its class declares a `use_triton` flag."""
    return hasattr(type(module), "use_triton")


@contextmanager
def kernels_off(*modules: nn.Module) -> Iterator[None]:
    """Swapped modules under `modules` run torch's ops inside the block (e.g. while the
    ONNX exporter traces them); their `use_triton` flags are restored after it."""
    saved = [(m, m.use_triton) for root in modules for m in root.modules() if is_swapped(m)]
    for m, _ in saved:
        m.use_triton = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.use_triton = flag
