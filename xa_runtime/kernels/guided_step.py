"""Fused classifier-free guidance + sampler update, one pass over the latents.

Every supported step has the form (fp32 math, all coefficients scalars for the step):

    eps  = u + g * (c - u)                 CFG combine of the UNet's [uncond; cond] halves
    x0   = (x - sig * eps) * inv_alpha     data prediction
    x'   = a * x + b * x0 + p * x0_prev    the update (p = 0 for first-order steps)

Euler (epsilon prediction): sig = sigma, inv_alpha = 1, a = sigma_next / sigma, b = 1 - a.
DPM-Solver++ 2M (midpoint): VP alpha/sigma from the scheduler's sigmas, see `GuidedSampler`.
The torch path does the same in 6-8 separate elementwise passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .remap_inject import triton

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


@dataclass(frozen=True)
class StepCoefficients:
    sig: float
    inv_alpha: float
    a: float
    b: float
    p: float = 0.0


def guided_step_reference(
    eps: torch.Tensor, x: torch.Tensor, x0_prev: torch.Tensor | None, guidance: float | None, k: StepCoefficients
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: (x' in x's dtype, x0 in fp32). eps: 2B x ... if guidance is not None, else B x ..."""
    e = eps.float()
    if guidance is not None:
        u, c = e.chunk(2)
        e = u + guidance * (c - u)
    x0 = (x.float() - k.sig * e) * k.inv_alpha
    out = k.a * x.float() + k.b * x0
    if k.p:
        out = out + k.p * x0_prev
    return out.to(x.dtype), x0


def guided_step_triton(
    eps: torch.Tensor, x: torch.Tensor, x0_prev: torch.Tensor | None, guidance: float | None, k: StepCoefficients,
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
    n = x.numel()
    out = torch.empty_like(x)
    x0 = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    has_prev = bool(k.p) and x0_prev is not None
    _guided_step_kernel[(triton.cdiv(n, block),)](
        eps, x, x0_prev if has_prev else x0, out, x0, n,
        float(guidance or 0.0), k.sig, k.inv_alpha, k.a, k.b, k.p,
        CFG=guidance is not None, HAS_PREV=has_prev, BLOCK=block,
    )
    return out, x0


def _vp(sigma: float) -> tuple[float, float]:
    """VP (alpha_t, sigma_t) of a VE sigma, as diffusers' DPM-Solver converts them."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


class GuidedSampler:
    """Replays a prepared diffusers Euler or DPM-Solver++ 2M schedule with the fused step.

    Build it from a scheduler after `set_timesteps` (and `set_begin_index`): it reads the
    sigmas and starts, like a fresh diffusers scheduler, with a first-order step. `step`
    takes the raw UNet output ([uncond; cond] when guidance is not None).
    """

    def __init__(self, scheduler, use_triton: bool):
        if not self.supports(scheduler):
            raise ValueError(f"no fused step for {type(scheduler).__name__} with this config")
        self.kind = "euler" if type(scheduler).__name__ == "EulerDiscreteScheduler" else "dpmpp-2m"
        self.sigmas = [float(s) for s in scheduler.sigmas.double().cpu()]
        self.num_timesteps = len(scheduler.timesteps)
        self.index = scheduler.begin_index or 0
        self.steps_done = 0
        self.x0_prev: torch.Tensor | None = None
        self.step_fn = guided_step_triton if use_triton else guided_step_reference

    @staticmethod
    def supports(scheduler) -> bool:
        c = scheduler.config
        name = type(scheduler).__name__
        if c.get("prediction_type", "epsilon") != "epsilon":
            return False
        if name == "EulerDiscreteScheduler":
            return True  # any sigma spacing: the sigmas are read, not recomputed
        if name == "DPMSolverMultistepScheduler":
            return (
                c.algorithm_type == "dpmsolver++" and c.solver_order == 2 and c.solver_type == "midpoint"
                and not c.thresholding and c.final_sigmas_type == "zero" and not c.euler_at_final
            )
        return False

    def scale_model_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "euler":
            return x / math.sqrt(self.sigmas[self.index] ** 2 + 1.0)
        return x

    def coefficients(self) -> StepCoefficients:
        i = self.index
        s0, t = self.sigmas[i], self.sigmas[i + 1]
        if self.kind == "euler":
            a = t / s0
            return StepCoefficients(sig=s0, inv_alpha=1.0, a=a, b=1.0 - a)
        alpha_s0, sig_s0 = _vp(s0)
        alpha_t, sig_t = _vp(t)
        if t == 0.0:  # final step to sigma 0: the update returns x0
            return StepCoefficients(sig=sig_s0, inv_alpha=1.0 / alpha_s0, a=0.0, b=1.0)
        lam = lambda al, si: math.log(al) - math.log(si)  # noqa: E731
        h = lam(alpha_t, sig_t) - lam(alpha_s0, sig_s0)
        phi = alpha_t * (math.exp(-h) - 1.0)
        a = sig_t / sig_s0
        first_order = self.steps_done == 0 or i == self.num_timesteps - 1
        if first_order:
            return StepCoefficients(sig=sig_s0, inv_alpha=1.0 / alpha_s0, a=a, b=-phi)
        alpha_s1, sig_s1 = _vp(self.sigmas[i - 1])
        r0 = (lam(alpha_s0, sig_s0) - lam(alpha_s1, sig_s1)) / h
        return StepCoefficients(sig=sig_s0, inv_alpha=1.0 / alpha_s0, a=a, b=-phi * (1 + 0.5 / r0), p=0.5 * phi / r0)

    def step(self, eps: torch.Tensor, x: torch.Tensor, guidance: float | None) -> torch.Tensor:
        out, x0 = self.step_fn(eps, x, self.x0_prev, guidance, self.coefficients())
        self.x0_prev, self.index, self.steps_done = x0, self.index + 1, self.steps_done + 1
        return out
