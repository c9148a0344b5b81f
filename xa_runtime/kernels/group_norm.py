"""GroupNorm on channels-last activations, and the module swaps that keep diffusers' UNets
channels-last end to end.

Why (what the profile showed): torch's CUDA GroupNorm makes its input
contiguous (NCHW) and returns NCHW (pytorch/pytorch#111824), and diffusers' Transformer2D
blocks end with `.permute(0, 3, 1, 2).contiguous()`. In a channels-last UNet every
GroupNorm and every transformer block therefore transposes the activations to NCHW, and the
next cuDNN convolution transposes them back; on the H100 the SDXL UNet got slower in
channels-last (43.2 -> 45.4 ms per step) while cuDNN's NCHW->NHWC conversions cost 7.1 ms
per step in NCHW (benchmarks/results/stage2-profile-h100-2026-11-23.log).

The kernel: x is B x C x H x W stored channels-last, i.e. a B x P x C matrix (P = H*W),
G groups of C/G adjacent channels. Three launches, every load coalesced along C:
  1. per (batch, chunk of BLOCK_P pixels, block of channels): per-channel mean and M2 of
     the chunk (fp32, centred: no E[x^2] - E[x]^2 cancellation);
  2. per (batch, group) (or several groups per program): Chan's parallel combination of
     its chunks -> mean, 1/std;
  3. per tile: y = (x - mean) * rstd * weight + bias, written channels-last.
fp16, bf16, fp32 inputs; fp32 statistics; one rounding to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .availability import interpreted, launch, triton, triton_usable

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gn_partials_kernel(
        x_ptr, mean_ptr, m2_ptr, P, C, S, sx_b,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid_c, s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = s * BLOCK_P + tl.arange(0, BLOCK_P)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        rmask = rows < P
        mask = rmask[:, None] & (cols[None, :] < C)
        x = tl.load(x_ptr + b.to(tl.int64) * sx_b + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        n = tl.minimum(P - s * BLOCK_P, BLOCK_P).to(tl.float32)
        mean = tl.sum(x, axis=0) / n
        d = tl.where(mask, x - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        out = (b * S + s) * C + cols
        tl.store(mean_ptr + out, mean, mask=cols < C)
        tl.store(m2_ptr + out, m2, mask=cols < C)

    @triton.jit
    def _gn_stats_kernel(
        mean_ptr, m2_ptr, gmean_ptr, grstd_ptr, P, C, S, CG, G, eps,
        BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr,
    ):
        # BLOCK_G groups per program: 1 on a GPU (G x B programs), all of them under the
        # interpreter (whose cost is per program). Tiles are [chunks, groups, channels].
        pid_g, b = tl.program_id(0), tl.program_id(1)
        groups = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
        j = tl.arange(0, BLOCK_CG)
        cols = groups[:, None] * CG + j[None, :]
        gcmask = (groups[:, None] < G) & (j[None, :] < CG)
        total = (P * CG).to(tl.float32)
        acc = tl.zeros((BLOCK_S, BLOCK_G, BLOCK_CG), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):  # the group mean: chunk means weighted by their pixel counts
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (s[:, None, None] < S) & gcmask[None, :, :]
            n = tl.minimum(P - s * BLOCK_P, BLOCK_P).to(tl.float32)
            m = tl.load(mean_ptr + (b * S + s[:, None, None]) * C + cols[None, :, :], mask=mask, other=0.0)
            acc += tl.where(mask, m * n[:, None, None], 0.0)
        mean = tl.sum(tl.sum(acc, axis=0), axis=1) / total
        acc = tl.zeros((BLOCK_S, BLOCK_G, BLOCK_CG), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):  # Chan: the sum of M2_i + n_i * (mean_i - mean)^2
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (s[:, None, None] < S) & gcmask[None, :, :]
            n = tl.minimum(P - s * BLOCK_P, BLOCK_P).to(tl.float32)
            idx = (b * S + s[:, None, None]) * C + cols[None, :, :]
            m = tl.load(mean_ptr + idx, mask=mask, other=0.0)
            q = tl.load(m2_ptr + idx, mask=mask, other=0.0)
            d = m - mean[None, :, None]
            acc += tl.where(mask, q + n[:, None, None] * d * d, 0.0)
        var = tl.sum(tl.sum(acc, axis=0), axis=1) / total
        gmask = groups < G
        tl.store(gmean_ptr + b * G + groups, mean, mask=gmask)
        tl.store(grstd_ptr + b * G + groups, 1.0 / tl.sqrt(var + eps), mask=gmask)

    @triton.jit
    def _gn_apply_kernel(
        x_ptr, y_ptr, w_ptr, b_ptr, gmean_ptr, grstd_ptr, P, C, CG, G, sx_b,
        AFFINE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid_c, pid_p, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = (rows[:, None] < P) & cmask[None, :]
        offs = b.to(tl.int64) * sx_b + rows[:, None].to(tl.int64) * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        group = cols // CG
        mean = tl.load(gmean_ptr + b * G + group, mask=cmask, other=0.0)
        rstd = tl.load(grstd_ptr + b * G + group, mask=cmask, other=0.0)
        # (x - mean) first: folding the mean into a shift (x * scale + shift) would cancel
        # catastrophically in fp32 when |mean| >> std
        if AFFINE:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            bb = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            y = (x - mean[None, :]) * (rstd * w)[None, :] + bb[None, :]
        else:
            y = (x - mean[None, :]) * rstd[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def group_norm_reference(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """torch's GroupNorm in fp32 (float64 stays float64), rounded to x's dtype, in x's
    memory format. Computed on an NCHW copy: torch 2.13's CPU GroupNorm on channels-last
    input loses the variance at large means (0.07 off at mean 1000, std 3, even in float64)."""
    up = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.to(up) if weight is not None else None
    b = bias.to(up) if bias is not None else None
    y = F.group_norm(x.to(up).contiguous(), num_groups, w, b, eps).to(x.dtype)
    return y.contiguous(memory_format=torch.channels_last) if _channels_last(x) else y


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def check_group_norm_args(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> None:
    """What the kernel accepts; ValueError naming the argument otherwise."""
    if x.dim() != 4:
        raise ValueError(f"x must be B x C x H x W, got {tuple(x.shape)}")
    if not _channels_last(x):
        raise ValueError(f"x must be dense channels-last (the kernel is for NHWC), got strides {x.stride()}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x dtype {x.dtype} not supported (fp16, bf16, fp32)")
    c = x.shape[1]
    if num_groups < 1 or c % num_groups:
        raise ValueError(f"num_groups must divide the {c} channels, got {num_groups}")
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias: both or neither")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (c,) or t.device != x.device):
            raise ValueError(f"{name} must have shape ({c},) on {x.device}, got {tuple(t.shape)} on {t.device}")


def group_norm_triton(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
    *, block_p: int | None = None, block_c: int | None = None, groups_per_program: int | None = None,
) -> torch.Tensor:
    """The kernels; returns a new channels-last tensor. Tiles: `block_p` pixels x `block_c`
    channels (default 64 x 64 on a GPU), `groups_per_program` in the statistics kernel
    (default 1 on a GPU). Under the interpreter, whose cost is per program, the defaults
    are large tiles and all groups in one program."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    check_group_norm_args(x, num_groups, weight, bias)
    b, c, h, w = x.shape
    p, cg = h * w, c // num_groups
    slow = interpreted()
    block_p = block_p or (256 if slow else 64)
    block_c = block_c or (128 if slow else 64)
    y = torch.empty_like(x, memory_format=torch.channels_last)
    if x.numel() == 0:
        return y
    s = triton.cdiv(p, block_p)
    part_mean = torch.empty(b, s, c, device=x.device, dtype=torch.float32)
    part_m2 = torch.empty_like(part_mean)
    gmean = torch.empty(b, num_groups, device=x.device, dtype=torch.float32)
    grstd = torch.empty_like(gmean)
    launch(
        _gn_partials_kernel, (triton.cdiv(c, block_c), s, b), x, part_mean, part_m2, p, c, s, x.stride(0), BLOCK_P=block_p, BLOCK_C=block_c,
    )
    block_cg = triton.next_power_of_2(cg)
    if groups_per_program is None:
        groups_per_program = num_groups if slow else 1
    block_g = triton.next_power_of_2(groups_per_program)
    launch(
        _gn_stats_kernel, (triton.cdiv(num_groups, block_g), b), part_mean, part_m2, gmean, grstd, p, c, s, cg, num_groups, float(eps), BLOCK_P=block_p,
        BLOCK_S=max(1, min(triton.next_power_of_2(s), 4096 // (block_g * block_cg))), BLOCK_G=block_g,
        BLOCK_CG=block_cg,
    )
    affine = weight is not None
    launch(
        _gn_apply_kernel, (triton.cdiv(c, block_c), triton.cdiv(p, block_p), b), x, y, weight if affine else x, bias if affine else x, gmean, grstd, p, c, cg, num_groups, x.stride(0),
        AFFINE=affine, BLOCK_P=block_p, BLOCK_C=block_c,
    )
    return y


def group_norm(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """GroupNorm of a channels-last x (a new channels-last tensor): Triton on CUDA (or
    under the interpreter), the torch reference otherwise."""
    if triton_usable(x.device):
        return group_norm_triton(x, num_groups, weight, bias, eps)
    check_group_norm_args(x, num_groups, weight, bias)
    return group_norm_reference(x, num_groups, weight, bias, eps)


# ---------------------------------------------------------------- module swaps
class ChannelsLastGroupNorm(nn.GroupNorm):
    """nn.GroupNorm that runs `group_norm` (the kernel) on channels-last input when
    `use_triton` is set; torch's GroupNorm otherwise. Same parameters and state-dict names
    (installed by swapping the class in place)."""

    use_triton: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.use_triton and x.dim() == 4 and not x.is_contiguous() and _channels_last(x)
                and x.dtype in (torch.float16, torch.bfloat16, torch.float32)):
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def _keep_layout_output(self, hidden_states, residual, batch_size, height, width, inner_dim):
    """Transformer2DModel._get_output_for_continuous_inputs without the NCHW copy: when the
    block's input was channels-last, the output stays channels-last (same values)."""
    if not _channels_last(residual) or residual.is_contiguous():
        return super(type(self), self)._get_output_for_continuous_inputs(
            hidden_states, residual, batch_size, height, width, inner_dim)
    if not self.use_linear_projection:
        hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        hidden_states = self.proj_out(hidden_states)
    else:
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
    return hidden_states + residual


_LAYOUT_KEEPING: dict[type, type] = {}
SWAPS = [0]  # GroupNorm and Transformer2D modules ever swapped by install_channels_last_modules (this process)


def _layout_keeping_class(cls: type) -> type:
    """A subclass of a diffusers Transformer2DModel class whose output keeps the layout."""
    if cls not in _LAYOUT_KEEPING:
        _LAYOUT_KEEPING[cls] = type(f"ChannelsLast{cls.__name__}", (cls,),
                                    {"_get_output_for_continuous_inputs": _keep_layout_output})
    return _LAYOUT_KEEPING[cls]


def install_channels_last_modules(model: nn.Module, use_triton: bool) -> int:
    """Swap, in place, every nn.GroupNorm of `model` for ChannelsLastGroupNorm (with
    `use_triton`) and every diffusers Transformer2DModel for its layout-keeping subclass;
    already swapped modules get the new `use_triton`. Returns the number of GroupNorms."""
    count = 0
    for m in model.modules():
        if type(m) is nn.GroupNorm or isinstance(m, ChannelsLastGroupNorm):
            if type(m) is nn.GroupNorm:
                m.__class__ = ChannelsLastGroupNorm
                SWAPS[0] += 1
            m.use_triton = use_triton
            count += 1
        elif type(m).__name__ == "Transformer2DModel" and hasattr(m, "_get_output_for_continuous_inputs"):
            m.__class__ = _layout_keeping_class(type(m))
            SWAPS[0] += 1
    return count
