"""Fused convolution epilogues for the mapping layers' residual blocks.

torch runs `conv2d(x, w, b)` on CUDA as the cuDNN convolution followed by a separate bias
add, and the residual block then makes one more elementwise pass: ReLU after `block1`,
the residual add after `block2`. Here the convolutions run without bias (still cuDNN
through torch) and one pass over the conv output does the rest, in place:

    y <- relu(y + b[c])            (relu=True,  block1)
    y <- y + b[c] + skip           (skip given, block2)

fp32 math, one rounding to y's dtype. y dense in NCHW or channels-last; skip in either
layout (any strides whose spatial dims flatten); fp16, bf16, fp32.

Why not implicit-GEMM 3x3 convolutions: the stage-2 profile on an H100
(benchmarks/results/stage2-profile-h100-2026-11-23.log) had cuDNN running the mapping's
3x3 convs at 58-75% of peak, so only the epilogues are fused.
"""

from __future__ import annotations

import torch

from .availability import launch, triton, triton_usable

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _conv_epilogue_kernel(
        y_ptr, b_ptr, s_ptr, N, C, HW, ss_b, ss_c, ss_p,
        RELU: tl.constexpr, SKIP: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        if CHANNELS_LAST:  # y is B x HW x C in memory
            channel = offs % C
            pixel = (offs // C) % HW
        else:  # B x C x HW
            channel = (offs // HW) % C
            pixel = offs % HW
        v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v += tl.load(b_ptr + channel, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            v = tl.maximum(v, 0.0)
        if SKIP:  # skip in its own layout (e.g. NCHW features into channels-last mapping layers)
            batch = offs // (C * HW)
            v += tl.load(s_ptr + batch * ss_b + channel * ss_c + pixel * ss_p, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


def conv_epilogue_reference(
    y: torch.Tensor, bias: torch.Tensor, *, relu: bool = False, skip: torch.Tensor | None = None
) -> torch.Tensor:
    """The plain torch ops (a new tensor): relu(y + b) and/or + skip, in fp32, rounded once."""
    v = y.float() + bias.float().view(1, -1, 1, 1)
    if relu:
        v = torch.relu(v)
    if skip is not None:
        v = v + skip.float()
    return v.to(y.dtype)


def _dense_layout(t: torch.Tensor) -> str | None:
    if t.is_contiguous():
        return "nchw"
    if t.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return None


def check_conv_epilogue_args(y: torch.Tensor, bias: torch.Tensor, skip: torch.Tensor | None) -> bool:
    """Shapes, dtypes, layouts and devices the kernel accepts (ValueError naming the
    argument); returns whether y is channels-last."""
    if y.dim() != 4:
        raise ValueError(f"y must be B x C x H x W, got {tuple(y.shape)}")
    if y.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"y dtype {y.dtype} not supported (fp16, bf16, fp32)")
    if bias.shape != (y.shape[1],):
        raise ValueError(f"bias must have shape ({y.shape[1]},), got {tuple(bias.shape)}")
    layout = _dense_layout(y)
    if layout is None:
        raise ValueError(f"y must be dense NCHW or channels-last, got strides {y.stride()}")
    if skip is not None:
        if skip.shape != y.shape or skip.dtype != y.dtype:
            raise ValueError(f"skip must match y ({tuple(y.shape)}, {y.dtype}), got {tuple(skip.shape)}, {skip.dtype}")
        if skip.shape[2] > 1 and skip.stride(2) != skip.shape[3] * skip.stride(3):
            raise ValueError(f"skip: spatial dims must flatten (strides {skip.stride()}); use NCHW or channels-last")
    if len({y.device, bias.device} | ({skip.device} if skip is not None else set())) != 1:
        raise ValueError("y, bias and skip must be on one device")
    # A 1 x 1 grid (or C == 1) is both layouts at once; the channel index is the same either way.
    return layout == "nhwc"


def conv_epilogue_triton(
    y: torch.Tensor, bias: torch.Tensor, *, relu: bool = False, skip: torch.Tensor | None = None, block: int = 1024
) -> torch.Tensor:
    """The kernel; updates `y` in place and returns it."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    channels_last = check_conv_epilogue_args(y, bias, skip)
    n = y.numel()
    if n == 0:
        return y
    s = skip if skip is not None else y
    launch(
        _conv_epilogue_kernel, (triton.cdiv(n, block),), y, bias, s, n, y.shape[1], y.shape[2] * y.shape[3], s.stride(0), s.stride(1), s.stride(3),
        RELU=relu, SKIP=skip is not None, CHANNELS_LAST=channels_last, BLOCK=block,
    )
    return y


def conv_epilogue(
    y: torch.Tensor, bias: torch.Tensor, *, relu: bool = False, skip: torch.Tensor | None = None
) -> torch.Tensor:
    """y <- relu(y + b) and/or y + b + skip, in place on a bias-free conv output; returns y.

    Triton on CUDA (or under the interpreter), the torch reference otherwise."""
    if triton_usable(y.device):
        return conv_epilogue_triton(y, bias, relu=relu, skip=skip)
    check_conv_epilogue_args(y, bias, skip)
    return y.copy_(conv_epilogue_reference(y, bias, relu=relu, skip=skip))
