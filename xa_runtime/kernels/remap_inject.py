"""Fused remap-inject: a mapping stage's last 1x1 conv (`zero_out.k`) + bias + adapter
condition scale + injection into the SDXL hidden state, in one GEMM-with-epilogue pass.

    hidden <- hidden + s * (W @ x + b)                    ("ADD" fusion)
    hidden <- hidden + f * (s * (W @ x + b) - hidden)     (fusion_guidance_scale f)

x: B x C_in x H x W, W: C_out x C_in (1x1 kernel), hidden: B x C_out x H x W, written in
place. NCHW and channels-last layouts (any strides whose two spatial dims flatten into
one); fp16, bf16, fp32 with fp32 accumulation. Without the conv, the separate torch path
reads/writes the residual three times (conv out, scale, add); here it never exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .availability import interpreted, launch, triton, triton_usable


def remap_inject_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hidden: torch.Tensor, scale: float,
    fusion_guidance_scale: float | None = None,
) -> torch.Tensor:
    """The plain torch ops the kernel replaces (returns a new tensor): the 1x1 conv, then
    the injection of models.mapping.inject_residual (tests keep the two equal)."""
    residual = F.conv2d(x, weight.reshape(weight.shape[0], -1, 1, 1), bias)
    r = residual.to(hidden.dtype) * scale
    if fusion_guidance_scale is None:
        return hidden + r
    return hidden + fusion_guidance_scale * (r - hidden)


if triton is not None:
    import triton.language as tl


    @triton.jit
    def _remap_inject_kernel(
        x_ptr, w_ptr, b_ptr, h_ptr,
        C_OUT, C_IN, P,
        sx_b, sx_c, sx_p, sh_b, sh_c, sh_p, sw_o, sw_i,
        scale, fusion,
        USE_LERP: tl.constexpr, UPCAST_DOT: tl.constexpr, IEEE_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH_H: tl.constexpr = False,
    ):
        pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output channels
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # flattened pixels
        offs_k = tl.arange(0, BLOCK_K)
        mask = (offs_m[:, None] < C_OUT) & (offs_n[None, :] < P)
        h_ptrs = h_ptr + b * sh_b + offs_m[:, None] * sh_c + offs_n[None, :] * sh_p
        if PREFETCH_H:  # issue the hidden-state read before the K loop: its latency hides behind the GEMM
            h = tl.load(h_ptrs, mask=mask, other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_base = x_ptr + b * sx_b
        for k0 in range(0, C_IN, BLOCK_K):
            k = k0 + offs_k
            w = tl.load(w_ptr + offs_m[:, None] * sw_o + k[None, :] * sw_i,
                        mask=(offs_m[:, None] < C_OUT) & (k[None, :] < C_IN), other=0.0)
            xv = tl.load(x_base + k[:, None] * sx_c + offs_n[None, :] * sx_p,
                         mask=(k[:, None] < C_IN) & (offs_n[None, :] < P), other=0.0)
            if UPCAST_DOT:  # the CPU interpreter mis-multiplies bf16 operands (numpy has no bf16)
                w, xv = w.to(tl.float32), xv.to(tl.float32)
            if IEEE_DOT:  # fp32 inputs: true fp32 products, not tf32 (which errs ~1e-3)
                acc += tl.dot(w, xv, input_precision="ieee", out_dtype=tl.float32)
            else:
                acc += tl.dot(w, xv, out_dtype=tl.float32)
        bias = tl.load(b_ptr + offs_m, mask=offs_m < C_OUT, other=0.0).to(tl.float32)
        r = (acc + bias[:, None]) * scale
        if not PREFETCH_H:
            h = tl.load(h_ptrs, mask=mask, other=0.0)
        # Round r to the hidden dtype first, as the torch path (residual tensor) does.
        r = r.to(h.dtype).to(tl.float32)
        hf = h.to(tl.float32)
        out = hf + fusion * (r - hf) if USE_LERP else hf + r
        tl.store(h_ptrs, out.to(h.dtype), mask=mask)


def _spatial_stride(t: torch.Tensor, name: str) -> int:
    _, _, hgt, wid = t.shape
    if hgt > 1 and t.stride(2) != wid * t.stride(3):
        raise ValueError(f"{name}: spatial dims must flatten (stride {t.stride()}); use NCHW or channels-last")
    return t.stride(3)


def check_remap_inject_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hidden: torch.Tensor) -> None:
    """Shapes, dtypes and devices the kernel accepts; raises ValueError naming the argument."""
    if x.dim() != 4 or hidden.dim() != 4:
        raise ValueError(f"x and hidden must be B x C x H x W, got {tuple(x.shape)} and {tuple(hidden.shape)}")
    c_out = weight.shape[0]
    if weight.reshape(c_out, -1).shape[1] != x.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not take x with {x.shape[1]} channels")
    if tuple(hidden.shape) != (x.shape[0], c_out, *x.shape[2:]):
        raise ValueError(f"hidden {tuple(hidden.shape)} must be {(x.shape[0], c_out, *x.shape[2:])}")
    if bias.shape != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"hidden dtype {hidden.dtype} not supported (fp16, bf16, fp32)")
    if len({x.dtype, weight.dtype, hidden.dtype}) != 1:
        raise ValueError(f"x, weight and hidden must share a dtype, got {x.dtype}, {weight.dtype}, {hidden.dtype}")
    if len({x.device, weight.device, bias.device, hidden.device}) != 1:
        raise ValueError("x, weight, bias and hidden must be on one device")


def remap_inject_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hidden: torch.Tensor, scale: float,
    fusion_guidance_scale: float | None = None, *, block_m: int | None = None, block_n: int | None = None,
    block_k: int | None = None, prefetch_hidden: bool = False,
) -> torch.Tensor:
    """The Triton kernel; updates `hidden` in place and returns it.

    Block sizes (and whether the hidden state is read before or after the GEMM): given,
    or autotuned per (C_out, C_in, pixels, layouts) on a GPU; the interpreter uses
    64 x 64 x 32 (autotuning there would only cost time)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    check_remap_inject_args(x, weight, bias, hidden)
    b, c_in, hgt, wid = x.shape
    c_out = hidden.shape[1]
    w2 = weight.reshape(c_out, c_in)
    p = hgt * wid
    args = (
        x, w2, bias, hidden, c_out, c_in, p,
        x.stride(0), x.stride(1), _spatial_stride(x, "x"),
        hidden.stride(0), hidden.stride(1), _spatial_stride(hidden, "hidden"),
        w2.stride(0), w2.stride(1),
        float(scale), float(fusion_guidance_scale or 0.0),
    )
    flags = dict(
        USE_LERP=fusion_guidance_scale is not None, UPCAST_DOT=interpreted() and x.dtype == torch.bfloat16,
        IEEE_DOT=x.dtype == torch.float32,
    )
    fixed = (block_m, block_n, block_k)
    if any(v is not None for v in fixed) or interpreted():
        bm, bn, bk = (v if v is not None else d for v, d in zip(fixed, (64, 64, 32)))
        grid = (triton.cdiv(c_out, bm), triton.cdiv(p, bn), b)
        launch(_remap_inject_kernel, grid, *args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PREFETCH_H=prefetch_hidden)
    else:
        def grid(meta):
            return (triton.cdiv(c_out, meta["BLOCK_M"]), triton.cdiv(p, meta["BLOCK_N"]), b)

        launch(_remap_inject_tuned(), grid, *args, **flags)
    return hidden



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


_TUNED = None


def _remap_inject_tuned():
    """The kernel under triton.autotune (built on first GPU use). `restore_value` puts
    `hidden` back between timing trials, since the kernel updates it in place."""
    global _TUNED
    if _TUNED is None:
        blocks = (
            (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
            (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 128, 64, 4, 3),
            # long K (1280 channels) and few pixels (the mid block's 32 x 32): deeper K tiles
            (128, 128, 128, 8, 3), (128, 64, 128, 4, 3), (64, 128, 128, 4, 3), (64, 256, 64, 8, 3),
        )
        # The hidden-state read early (PREFETCH_H, its latency hidden behind the GEMM, at the
        # cost of registers) is tried with the tiles that leave room for it (for the sites
        # furthest from the memory roofline).
        prefetch = {(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)}
        configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "PREFETCH_H": pre}, num_warps=w, num_stages=st)
            for m, n, k, w, st in blocks for pre in ((False, True) if (m, n, k, w, st) in prefetch else (False,))
        ]
        _TUNED = triton.autotune(configs=configs, key=["C_OUT", "C_IN", "P", "sx_p", "sh_p"], restore_value=["h_ptr"])(
            _remap_inject_kernel
        )
    return _TUNED
