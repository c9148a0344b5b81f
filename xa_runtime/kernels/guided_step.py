"""Fused classifier-free guidance + sampler update, one pass over the latents.

Every supported step has the form (fp32 math, all coefficients scalars for the step):

    eps  = u + g * (c - u)                 CFG combine of the UNet's [uncond; cond] halves
    x0   = (x - sig * eps) * inv_alpha     data prediction
    x'   = a * x + b * x0 + p * x0_prev    the update (p = 0 for first-order steps)

The coefficients (sig, inv_alpha, a, b, p) come from the schedule (Euler, DPM-Solver++ 2M:
xa_runtime.pipeline.schedulers.GuidedSampler); the kernel only takes the five numbers.
The torch path does the same in 6-8 separate elementwise passes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .availability import launch, triton, triton_usable

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _guided_step_kernel(
        eps_ptr, x_ptr, prev_ptr, out_ptr, x0_ptr, N,
        g, sig, inv_alpha, a, b, p,
        CFG: tl.constexpr, HAS_PREV: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if CFG:  # eps_ptr holds [uncond; cond], each N elements
            u = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            c = tl.load(eps_ptr + N + offs, mask=mask, other=0.0).to(tl.float32)
            eps = u + g * (c - u)
        else:
            eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = (x - sig * eps) * inv_alpha
        out = a * x + b * x0
        if HAS_PREV:
            out += p * tl.load(prev_ptr + offs, mask=mask, other=0.0)
        tl.store(x0_ptr + offs, x0, mask=mask)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


Coefficients = Sequence[float]  # (sig, inv_alpha, a, b, p), e.g. pipeline.schedulers.StepCoefficients


def guided_step_reference(
    eps: torch.Tensor, x: torch.Tensor, x0_prev: torch.Tensor | None, guidance: float | None, k: Coefficients
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: (x' in x's dtype, x0 in fp32). eps: 2B x ... if guidance is not None, else B x ..."""
    sig, inv_alpha, a, b, p = k
    e = eps.float()
    if guidance is not None:
        u, c = e.chunk(2)
        e = u + guidance * (c - u)
    x0 = (x.float() - sig * e) * inv_alpha
    out = a * x.float() + b * x0
    if p:
        out = out + p * x0_prev
    return out.to(x.dtype), x0


def guided_step_triton(
    eps: torch.Tensor, x: torch.Tensor, x0_prev: torch.Tensor | None, guidance: float | None, k: Coefficients,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel; same contract as `guided_step_reference`."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    rows = 2 * x.shape[0] if guidance is not None else x.shape[0]
    if eps.shape[0] != rows or eps.shape[1:] != x.shape[1:]:
        raise ValueError(f"eps {tuple(eps.shape)} does not match latents {tuple(x.shape)} (cfg={guidance is not None})")
    if not (eps.is_contiguous() and x.is_contiguous()):
        raise ValueError("eps and latents must be contiguous")
    if x0_prev is not None and (x0_prev.dtype != torch.float32 or x0_prev.shape != x.shape):
        raise ValueError("x0_prev must be an fp32 tensor shaped like the latents")
    sig, inv_alpha, a, b, p = (float(v) for v in k)
    n = x.numel()
    out = torch.empty_like(x)
    x0 = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    has_prev = bool(p) and x0_prev is not None
    launch(
        _guided_step_kernel, (triton.cdiv(n, block),), eps, x, x0_prev if has_prev else x0, out, x0, n,
        float(guidance or 0.0), sig, inv_alpha, a, b, p,
        CFG=guidance is not None, HAS_PREV=has_prev, BLOCK=block,
    )
    return out, x0


def guided_step(
    eps: torch.Tensor, x: torch.Tensor, x0_prev: torch.Tensor | None, guidance: float | None, k: Coefficients
) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided step: Triton on CUDA (or under the interpreter), the torch reference otherwise."""
    if triton_usable(x.device):
        return guided_step_triton(eps, x, x0_prev, guidance, k)
    return guided_step_reference(eps, x, x0_prev, guidance, k)
