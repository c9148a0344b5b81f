"""Each Triton kernel against the torch ops it replaces, at the full-size shapes.

SDXL 1024 px, batch 2 (CFG rows): the three zero_out + inject sites, the mapping's
residual blocks with fused conv epilogues (one block per stage: two 3x3 convs, bias,
ReLU and the residual add), GroupNorm on channels-last activations and the feed-forwards'
GEGLU at the UNets' shapes, and the CFG + sampler update on 1 x 4 x 128 x 128 latents. Reports the median of many runs, achieved
bandwidth and TFLOP/s, and shares of the peaks measured in the same run (a large matrix
product for compute, a large device copy for bandwidth). Needs a CUDA GPU.

    python benchmarks/bench_kernels.py --output benchmarks/results/kernels-<gpu>-<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from xa_runtime.bench.report import write_atomic
from xa_runtime.kernels import conv_epilogue_triton, remap_inject_reference, remap_inject_triton
from xa_runtime.kernels.geglu import geglu_triton
from xa_runtime.kernels.group_norm import group_norm_triton
from xa_runtime.kernels.availability import interpreted
from xa_runtime.kernels.guided_step import guided_step_reference, guided_step_triton
from xa_runtime.kernels.remap_inject import _remap_inject_tuned
from xa_runtime.kernels.shapes import GEGLU_SHAPES, GROUP_NORM_SHAPES, LATENT, MAPPING_STAGES
from xa_runtime.kernels.shapes import REMAP_SITES as SITES
from xa_runtime.models import get_preset
from xa_runtime.models.mapping import ResidualBlock
from xa_runtime.pipeline.schedulers import StepCoefficients, make_scheduler
from xa_runtime.runtime.kernel_hooks import FusedEpilogueResidualBlock
from xa_runtime.runtime.timing import time_callable, time_cuda_graph

DEV = "cuda"  # "cpu" only for --smoke
PEAK_SIZES = (8192, 1 << 30)  # matmul side, bytes copied


def gpu_time(fn, iters: int) -> list[float]:
    """Seconds of GPU time per call (CUDA graph replays); plain calls on the smoke run."""
    if DEV == "cuda":
        return time_cuda_graph(fn, reps=20, iters=max(1, iters // 10))
    return time_callable(fn, DEV, 1, max(1, iters // 10))


def use_smoke_shapes() -> None:
    """--smoke: every row at toy sizes on the CPU (Triton's interpreter): the script's code
    runs end to end, its numbers mean nothing."""
    global DEV, PEAK_SIZES, LATENT, SITES, MAPPING_STAGES, GROUP_NORM_SHAPES, GEGLU_SHAPES
    DEV, PEAK_SIZES, LATENT = "cpu", (64, 1 << 16), 8
    SITES = [("r0 tiny", 24, 3, 5)]
    MAPPING_STAGES = [("stage tiny", 16, 4, 4)]
    GROUP_NORM_SHAPES = [("gn tiny", 64, 4, 5)]
    GEGLU_SHAPES = [("geglu tiny", 6, 40)]




def peaks(dtype: torch.dtype, iters: int) -> dict[str, float]:
    side, nbytes = PEAK_SIZES
    a = torch.randn(side, side, device=DEV, dtype=dtype)
    mm = statistics.median(time_callable(lambda: a @ a, DEV, 5, iters))
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    cp = statistics.median(time_callable(lambda: dst.copy_(src), DEV, 5, iters))
    return {"tflops": 2 * side**3 / mm / 1e12, "gbps": 2 * src.numel() / cp / 1e9}




def group_norm_rows(args, dtype, elt, peak) -> list[dict]:
    """GroupNorm on channels-last activations: the Triton kernel (channels-last out) vs
    torch's GroupNorm on the same input (which copies to NCHW and returns NCHW), and torch
    on NCHW input for reference. Bytes: x read twice (statistics, then normalise), y written."""
    rows = []
    for name, c, h, w in GROUP_NORM_SHAPES:
        x_cl = torch.randn(args.batch, c, h, w, device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)
        x_nchw = x_cl.contiguous()
        weight, bias = torch.randn(c, device=DEV, dtype=dtype), torch.randn(c, device=DEV, dtype=dtype)
        fns = {
            "torch_cl": lambda: torch.nn.functional.group_norm(x_cl, 32, weight, bias, 1e-5),
            "torch_nchw": lambda: torch.nn.functional.group_norm(x_nchw, 32, weight, bias, 1e-5),
            "triton_cl": lambda: group_norm_triton(x_cl, 32, weight, bias, 1e-5),
        }
        ms = {k: statistics.median(gpu_time(f, args.iters)) * 1e3 for k, f in fns.items()}
        eager = {k: statistics.median(time_callable(f, DEV, 10, args.iters)) * 1e3 for k, f in fns.items()}
        bytes_ = elt * 3 * x_cl.numel()
        rows.append({
            "kernel": "group_norm", "site": name, "layout": "nhwc", "torch_ms": ms["torch_cl"], "triton_ms": ms["triton_cl"],
            "torch_nchw_ms": ms["torch_nchw"], "speedup": ms["torch_cl"] / ms["triton_cl"],
            "torch_eager_ms": eager["torch_cl"], "triton_eager_ms": eager["triton_cl"],
            "roofline_ms": bytes_ / (peak["gbps"] * 1e9) * 1e3, "triton_gbps": bytes_ / ms["triton_cl"] / 1e6,
            "share_of_peak_bandwidth": bytes_ / ms["triton_cl"] / 1e6 / peak["gbps"],
        })
    return rows




def geglu_rows(args, dtype, elt, peak) -> list[dict]:
    """The transformer feed-forward's gated GELU: torch's split + GELU + multiply vs the kernel."""
    rows = []
    for name, tokens, d in GEGLU_SHAPES:
        h = torch.randn(args.batch, tokens, 2 * d, device=DEV, dtype=dtype)

        def plain():
            a, g = h.chunk(2, dim=-1)
            return a * torch.nn.functional.gelu(g)

        def fused():
            return geglu_triton(h)

        ms = {k: statistics.median(gpu_time(f, args.iters)) * 1e3
              for k, f in (("plain", plain), ("fused", fused))}
        eager = {k: statistics.median(time_callable(f, DEV, 10, args.iters)) * 1e3
                 for k, f in (("plain", plain), ("fused", fused))}
        bytes_ = elt * 3 * args.batch * tokens * d  # 2D read, D written per token
        rows.append({
            "kernel": "geglu", "site": name, "layout": "-", "torch_ms": ms["plain"], "triton_ms": ms["fused"],
            "speedup": ms["plain"] / ms["fused"], "torch_eager_ms": eager["plain"], "triton_eager_ms": eager["fused"],
            "roofline_ms": bytes_ / (peak["gbps"] * 1e9) * 1e3, "triton_gbps": bytes_ / ms["fused"] / 1e6,
            "share_of_peak_bandwidth": bytes_ / ms["fused"] / 1e6 / peak["gbps"],
        })
    return rows


def residual_block_rows(args, dtype, elt, fmt, layout, peak) -> list[dict]:
    """One mapping residual block per stage (the block's input has the stage's output
    width: blocks 2 and 3 of each stage), torch path vs fused epilogues, and the
    bias + ReLU epilogue kernel alone against its bandwidth roofline."""
    rows = []
    for name, c, h, w in MAPPING_STAGES:
        block = ResidualBlock(c, c).to(DEV, dtype).eval().requires_grad_(False).to(memory_format=fmt)
        fused_block = FusedEpilogueResidualBlock(c, c).to(DEV, dtype).eval().requires_grad_(False).to(memory_format=fmt)
        fused_block.load_state_dict(block.state_dict())
        fused_block.use_triton = True  # the runtime's swap of the mapping's blocks, with the kernels on
        x = torch.randn(args.batch, c, h, w, device=DEV, dtype=dtype).contiguous(memory_format=fmt)
        y = torch.randn_like(x)

        def plain():
            block(x)

        def fused():
            fused_block(x)

        def epilogue():
            conv_epilogue_triton(y, block.block1.bias, relu=True)

        def torch_epilogue():  # what torch does after the bias-free cuDNN conv: bias add, then ReLU
            torch.relu_(y.add_(block.block1.bias.view(1, -1, 1, 1)))

        with torch.no_grad():
            ms = {k: statistics.median(gpu_time(f, args.iters)) * 1e3
                  for k, f in (("plain", plain), ("fused", fused), ("epilogue", epilogue), ("torch_epilogue", torch_epilogue))}
            eager = {k: statistics.median(time_callable(f, DEV, 10, args.iters)) * 1e3
                     for k, f in (("plain", plain), ("fused", fused))}
        flops = 2 * 2 * args.batch * c * c * 9 * h * w
        bytes_ = elt * 2 * x.numel()  # the epilogue: y read + written
        rows.append({
            "kernel": "residual_block", "site": name, "layout": layout, "torch_ms": ms["plain"], "triton_ms": ms["fused"],
            "speedup": ms["plain"] / ms["fused"], "torch_eager_ms": eager["plain"], "triton_eager_ms": eager["fused"],
            "roofline_ms": flops / (peak["tflops"] * 1e12) * 1e3, "triton_tflops": flops / ms["fused"] / 1e9,
            "triton_gbps": 0.0, "share_of_peak_compute": flops / ms["fused"] / 1e9 / peak["tflops"],
        })
        rows.append({
            "kernel": "conv_epilogue", "site": name + " bias+relu", "layout": layout, "torch_ms": ms["torch_epilogue"],
            "triton_ms": ms["epilogue"], "speedup": ms["torch_epilogue"] / ms["epilogue"],
            "torch_eager_ms": float("nan"), "triton_eager_ms": float("nan"),
            "roofline_ms": bytes_ / (peak["gbps"] * 1e9) * 1e3, "triton_gbps": bytes_ / ms["epilogue"] / 1e6,
            "share_of_peak_bandwidth": bytes_ / ms["epilogue"] / 1e6 / peak["gbps"],
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--output", default=None, help="JSON file to write")
    ap.add_argument("--smoke", action="store_true",
                    help="toy shapes on the CPU under TRITON_INTERPRET=1: checks that the script runs (no figures)")
    args = ap.parse_args(argv)
    if args.smoke:
        if not interpreted():
            print("error: --smoke runs the kernels on Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        use_smoke_shapes()
    elif not torch.cuda.is_available():
        print("error: bench_kernels needs a CUDA GPU (the kernels run compiled there); --smoke runs it on the CPU "
              "at toy sizes", file=sys.stderr)
        return 2
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    elt = torch.finfo(dtype).bits // 8
    peak = peaks(dtype, 20)
    rows = []
    for layout in ("nchw", "nhwc"):
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        for name, c, h, w in SITES:
            x = torch.randn(args.batch, c, h, w, device=DEV, dtype=dtype).contiguous(memory_format=fmt)
            weight = (torch.randn(c, c, 1, 1, device=DEV, dtype=dtype) / c**0.5).contiguous(memory_format=fmt)
            bias = torch.randn(c, device=DEV, dtype=dtype)
            hidden = torch.randn(args.batch, c, h, w, device=DEV, dtype=dtype).contiguous(memory_format=fmt)

            def ref():  # the pipeline's torch path: conv -> residual, then the hook's h + s * r
                remap_inject_reference(x, weight, bias, hidden, 1.0)

            def fused():
                remap_inject_triton(x, weight, bias, hidden, 1.0)

            # GPU time (CUDA graph replays: no launch overhead) decides the kernel's worth;
            # the eager time, launch overhead included, is what an un-captured run pays.
            torch_s, triton_s = (statistics.median(gpu_time(f, args.iters)) for f in (ref, fused))
            torch_eager, triton_eager = (statistics.median(time_callable(f, DEV, 10, args.iters)) for f in (ref, fused))
            flops = 2 * args.batch * c * c * h * w
            bytes_ = elt * (args.batch * c * h * w * 3 + c * c)  # x read, hidden read + write, W
            fused()  # the config the autotuner chose for this site (its last call)
            rows.append({
                "kernel": "remap_inject", "site": name, "layout": layout, "torch_ms": torch_s * 1e3,
                "autotuned_config": str(getattr(_remap_inject_tuned(), "best_config", None)),
                "triton_ms": triton_s * 1e3, "speedup": torch_s / triton_s,
                "torch_eager_ms": torch_eager * 1e3, "triton_eager_ms": triton_eager * 1e3,
                "roofline_ms": max(flops / (peak["tflops"] * 1e12), bytes_ / (peak["gbps"] * 1e9)) * 1e3,
                "triton_tflops": flops / triton_s / 1e12, "triton_gbps": bytes_ / triton_s / 1e9,
                "share_of_peak_compute": flops / triton_s / 1e12 / peak["tflops"],
                "share_of_peak_bandwidth": bytes_ / triton_s / 1e9 / peak["gbps"],
            })
        rows.extend(residual_block_rows(args, dtype, elt, fmt, layout, peak))
    rows.extend(group_norm_rows(args, dtype, elt, peak))
    rows.extend(geglu_rows(args, dtype, elt, peak))
    latents = torch.randn(1, 4, LATENT, LATENT, device=DEV, dtype=dtype)
    eps = torch.randn(2, 4, LATENT, LATENT, device=DEV, dtype=dtype)
    prev = torch.randn(1, 4, LATENT, LATENT, device=DEV)
    k = StepCoefficients(sig=0.5, inv_alpha=1.1, a=0.9, b=0.1, p=0.05)
    def ref_step():
        guided_step_reference(eps, latents, prev, 7.5, k)

    def fused_step():
        guided_step_triton(eps, latents, prev, 7.5, k)

    torch_s, triton_s = (statistics.median(gpu_time(f, args.iters)) for f in (ref_step, fused_step))
    torch_eager, triton_eager = (statistics.median(time_callable(f, DEV, 10, args.iters)) for f in (ref_step, fused_step))
    bytes_ = latents.numel() * (elt * 4 + 4 * 2)  # eps (2x), x, out; prev and x0 in fp32
    rows.append({"kernel": "guided_step", "site": "dpmpp-2m order 2", "layout": "nchw", "torch_ms": torch_s * 1e3,
                 "triton_ms": triton_s * 1e3, "speedup": torch_s / triton_s, "triton_gbps": bytes_ / triton_s / 1e9,
                 "torch_eager_ms": torch_eager * 1e3, "triton_eager_ms": triton_eager * 1e3,
                 "roofline_ms": bytes_ / (peak["gbps"] * 1e9) * 1e3,
                 "share_of_peak_bandwidth": bytes_ / triton_s / 1e9 / peak["gbps"]})

    # What the pipeline runs without the kernel: CFG combine + diffusers' DPM-Solver++ 2M step.
    sched = make_scheduler("dpmpp-2m", get_preset("sdxl").scheduler)
    sched.set_timesteps(30, device=DEV)
    t = sched.timesteps[10]

    def diffusers_step():
        sched._step_index = 10  # stay mid-schedule (second order) on every timed call
        u, c = eps.chunk(2)
        sched.step(u + 7.5 * (c - u), t, latents, return_dict=False)

    diffusers_eager = statistics.median(time_callable(diffusers_step, DEV, 10, args.iters))
    rows[-1]["diffusers_step_eager_ms"] = diffusers_eager * 1e3
    print("GPU time per call (CUDA graph replays), then eager time per call (launch overhead included)")
    print(f"{'kernel':<13} {'site':<17} {'layout':<6} {'torch ms':>9} {'triton ms':>9} {'x':>6} {'roof ms':>8} "
          f"{'%roof':>6} {'TFLOP/s':>8} {'GB/s':>7} {'eager t':>8} {'eager tr':>8}")
    for r in rows:
        print(f"{r['kernel']:<13} {r['site']:<17} {r['layout']:<6} {r['torch_ms']:9.4f} {r['triton_ms']:9.4f} "
              f"{r['speedup']:6.2f} {r['roofline_ms']:8.4f} {r['roofline_ms'] / r['triton_ms']:6.0%} "
              f"{r.get('triton_tflops', 0):8.1f} {r['triton_gbps']:7.0f} {r['torch_eager_ms']:8.4f} {r['triton_eager_ms']:8.4f}")
    for r in rows:
        if "autotuned_config" in r:
            print(f"remap_inject {r['site']} {r['layout']}: autotuned {r['autotuned_config']}")
    print(f"diffusers CFG + DPM-Solver++ 2M step (eager, the un-fused pipeline path): {diffusers_eager * 1e3:.4f} ms")
    print(f"measured peaks: {peak['tflops']:.0f} TFLOP/s ({args.dtype} matmul), {peak['gbps']:.0f} GB/s (copy)")
    result = {
        "benchmark": "kernels", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke run: no figures)", "torch": torch.__version__, "python": platform.python_version(),
        "command": " ".join(sys.argv), "dtype": args.dtype, "batch": args.batch, "iters": args.iters,
        "peaks": peak, "rows": rows,
    }
    if args.output:
        write_atomic(Path(args.output), json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
