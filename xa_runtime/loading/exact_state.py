"""Putting a state dict into a module exactly: every tensor present with its shape, or an
error listing what differs; modules built without allocating random weights first."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Mapping, TypeVar

import torch
from torch import nn

from ..errors import CheckpointError
from .checkpoint_files import check_finite

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)
_SHOWN = 20  # names listed per kind of mismatch before "... and N more"


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    # Full-size random init costs seconds (SDXL: 2.6 B parameters) and is overwritten at
    # once; parameters go to the meta device while buffers (e.g. CLIP's position_ids,
    # which no checkpoint stores) are built for real.
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_empty(factory: Callable[[], M]) -> M:
    """`factory()` with its parameters on the meta device, to be filled by `assign_exact`."""
    with _parameters_on_meta():
        return factory()


def _listed(items: list[str]) -> str:
    more = f", ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def describe_mismatch(
    expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor], *, ignore_unexpected: bool = False
) -> str | None:
    """None if `found` has exactly the names and shapes of `expected`, else a readable list
    of missing keys, unexpected keys and shape mismatches (expected vs found)."""
    missing = sorted(k for k in expected if k not in found)
    unexpected = [] if ignore_unexpected else sorted(k for k in found if k not in expected)
    mismatched = sorted(
        f"{k}: expected {tuple(expected[k])}, found {tuple(found[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k])
    )
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
    if mismatched:
        parts.append(f"shape mismatches ({len(mismatched)}): {_listed(mismatched)}")
    return "; ".join(parts) or None


def assign_exact(
    module: M,
    state: Mapping[str, torch.Tensor],
    what: str,
    *,
    strict_unexpected: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> M:
    """Load `state` into `module` (typically from `build_empty`), all or nothing.

    Raises CheckpointError naming `what` on missing keys, shape mismatches and, when
    `strict_unexpected`, unexpected keys (otherwise those are logged and dropped). The
    module ends on `device` in `dtype`, in eval mode, without gradients.
    """
    expected = {k: v.shape for k, v in module.state_dict().items()}
    problem = describe_mismatch(expected, state, ignore_unexpected=not strict_unexpected)
    if problem:
        raise CheckpointError(f"{what} does not match the model: {problem}")
    check_finite(((k, state[k]) for k in expected), what)
    extra = sorted(k for k in state if k not in expected)
    if extra:
        logger.warning("%s: ignoring %d tensors the model does not use: %s", what, len(extra), _listed(extra))
    # contiguous: converted tensors may be views (split qkv, transposes); a strided weight
    # would change the summation order of some kernels and so the last bits of outputs.
    module.load_state_dict({k: state[k].contiguous() for k in expected}, strict=True, assign=True)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)
