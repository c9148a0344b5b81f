"""Fused GEGLU: the gated GELU of the UNets' transformer feed-forwards in one pass.

diffusers' GEGLU projects to 2D features, splits them into (hidden, gate) and returns
`hidden * gelu(gate)`: the GELU reads and writes the gate half, the product reads both
and writes the result (three passes over D-wide tensors after the projection). The
kernel reads the projection once and writes the result once.

Why (what the profile showed): in the H100 stage-2 profile the GELU and
the multiply that follows it are two of the largest elementwise ops (aten::gelu 3.1 ms
and aten::mul 3.1 ms of GPU time per step, 86 calls each;
benchmarks/results/stage2-profile-h100-2026-11-23.log).

Exact (erf) GELU as torch's default; fp32 math, one rounding to the input dtype;
fp16, bf16, fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .availability import launch, triton, triton_usable

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _geglu_kernel(h_ptr, out_ptr, N, D, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        row = offs // D
        col = offs % D
        a = tl.load(h_ptr + row * 2 * D + col, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(h_ptr + row * 2 * D + D + col, mask=mask, other=0.0).to(tl.float32)
        out = a * (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def geglu_reference(h: torch.Tensor) -> torch.Tensor:
    """hidden * gelu(gate) of h = [hidden | gate] along the last dim, in fp32, rounded once."""
    a, g = h.float().chunk(2, dim=-1)
    return (a * F.gelu(g)).to(h.dtype)


def check_geglu_args(h: torch.Tensor) -> None:
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"h must have an even last dimension ([hidden | gate]), got {tuple(h.shape)}")
    if h.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"h dtype {h.dtype} not supported (fp16, bf16, fp32)")
    if not h.is_contiguous():
        raise ValueError(f"h must be contiguous, got strides {h.stride()}")


def geglu_triton(h: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The kernel: a new tensor shaped like h with half the last dimension."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    check_geglu_args(h)
    d = h.shape[-1] // 2
    out = torch.empty((*h.shape[:-1], d), device=h.device, dtype=h.dtype)
    n = out.numel()
    if n:
        launch(_geglu_kernel, (triton.cdiv(n, block),), h, out, n, d, BLOCK=block)
    return out


def geglu(h: torch.Tensor) -> torch.Tensor:
    """hidden * gelu(gate) of h = [hidden | gate]: Triton on CUDA (or under the
    interpreter), the torch reference otherwise."""
    if triton_usable(h.device):
        return geglu_triton(h)
    check_geglu_args(h)
    return geglu_reference(h)


def _fused_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """GEGLU.forward with the split and the gated GELU in `geglu` (the kernel) when `use_triton`."""
    if not self.use_triton:
        return super(type(self), self).forward(hidden_states, *args, **kwargs)
    h = self.proj(hidden_states)  # a module call: hooks on proj (unfused LoRA) still run
    if h.is_contiguous() and h.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return geglu(h)
    a, g = h.chunk(2, dim=-1)
    return a * F.gelu(g)


_FUSED: dict[type, type] = {}
SWAPS = [0]  # how many GEGLU modules were ever swapped (in this process)


def _fused_class(cls: type) -> type:
    if cls not in _FUSED:
        _FUSED[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_forward, "use_triton": False})
    return _FUSED[cls]


def install_fused_geglu(model: nn.Module, use_triton: bool) -> list[nn.Module]:
    """Swap, in place, every diffusers GEGLU of `model` for a subclass that runs the fused
    kernel when `use_triton` (same parameters and values); already swapped ones get the new
    `use_triton`. Returns the swapped modules."""
    swapped = []
    for m in model.modules():
        name = type(m).__name__
        if name == "GEGLU" and isinstance(getattr(m, "proj", None), nn.Linear):
            m.__class__ = _fused_class(type(m))
            SWAPS[0] += 1
        elif not name == "FusedGEGLU":
            continue
        m.use_triton = use_triton
        swapped.append(m)
    return swapped
