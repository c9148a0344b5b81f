"""Where a full-size stage-2 step spends its time: SD1.5 UNet, mapping (residual blocks and
zero_out + injection), SDXL UNet, per op, on a CUDA GPU with random weights.

One step of stage 2 at the standard workload (SDXL 1024 px, SD1.5 512 px, CFG: batch 2),
timed with CUDA events per region (median of --iters), in NCHW, channels-last and the mixed
layout (SD1.5 UNet + mapping channels-last, SDXL NCHW), with the kernels off and on (the
fused remap-inject alone, then with the mapping's fused conv epilogues, the UNets' GEGLU
kernel and the GroupNorm kernel in the channels-last UNets too); then torch.profiler over a few steps, grouped by op.
Channels-last UNets get the pipeline's layout-keeping module swaps.
It shows where the step time goes, to pick the next optimisation.

    python benchmarks/profile_stage2.py --output benchmarks/results/stage2-profile-<gpu>-<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from xa_runtime.bench.report import write_atomic
from xa_runtime.kernels import remap_inject
from xa_runtime.kernels.modules import sync_kernel_modules
from xa_runtime.runtime.kernel_hooks import install_fused_epilogues
from xa_runtime.models import MappingConfig, MappingLayers, build_random_components, get_preset
from xa_runtime.models.branches import SD15Branch, SDXLBranch, inject_residual
from xa_runtime.runtime import CHANNELS_LAST_PARTS, MIXED_LAYOUT
from xa_runtime.runtime.timing import synchronize, time_callable, time_cuda_graph


def build(dtype: torch.dtype, device: str, prefix: str):
    sd15 = build_random_components(prefix + "sd15", 0, device=device, dtype=dtype)
    sdxl = build_random_components(prefix + "sdxl", 1, device=device, dtype=dtype)
    mapping = MappingLayers(MappingConfig.from_unet_configs(sd15.unet.config, sdxl.unet.config))
    for conv in mapping.zero_out:  # the released init is zero; random values for honest timing
        torch.nn.init.normal_(conv.weight, std=0.02)
    mapping.to(device, dtype).eval().requires_grad_(False)
    return SD15Branch(sd15.unet), SDXLBranch(sdxl.unet), mapping, (sd15, sdxl)


def inputs(dtype: torch.dtype, batch: int, device: str, prefix: str):
    """Random step inputs at the presets' default sizes (SD1.5 512 / SDXL 1024 for the full ones)."""
    g = torch.Generator(device).manual_seed(0)
    p15, pxl = get_preset(prefix + "sd15"), get_preset(prefix + "sdxl")
    s15, sxl = p15.default_size // 8, pxl.default_size // 8
    text_dim = pxl.unet["projection_class_embeddings_input_dim"] - 6 * pxl.unet["addition_time_embed_dim"]

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    size = float(pxl.default_size)
    t = torch.tensor(500.0, device=device)
    cond = {"text_embeds": r(batch, text_dim),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype)}
    return {"x15": r(batch, 4, s15, s15), "emb15": r(batch, 77, p15.unet["cross_attention_dim"]),
            "xxl": r(batch, 4, sxl, sxl), "embxl": r(batch, 77, pxl.unet["cross_attention_dim"]), "cond": cond, "t": t}


# layout -> the parts in channels-last (RuntimeConfig.channels_last names)
LAYOUTS = {"nchw": (), "channels_last": CHANNELS_LAST_PARTS, "mixed": MIXED_LAYOUT}


def parts_of(sd15, mapping, sdxl, parts) -> list:
    return [m for name, m in (("sd15_unet", sd15), ("mapping", mapping), ("sdxl_unet", sdxl)) if name in parts]


def to_layout(module: torch.nn.Module, channels_last: bool) -> None:
    module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "aten::_local_scalar_dense",
            "aten::item", "cudaEventSynchronize")


def profile_pipeline(components, mapping, device: str, dtype: torch.dtype, steps: int) -> dict:
    """Host time of one whole generate() and where it goes: the top ops by self CPU time and
    every host synchronisation (they stall the launch queue)."""
    from xa_runtime.pipeline import GenerationParams, XAdapterPipeline

    pipe = XAdapterPipeline(*components, mapping, device=device, dtype=dtype, progress=False)
    params = GenerationParams(prompt="a cat", num_inference_steps=steps, adapter_guidance_start=0.5, seed=0,
                              output_type="latent")
    pipe.generate(params)
    synchronize(device)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        out = pipe.generate(params)
        synchronize(device)
    events = prof.key_averages()
    cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]
    syncs = {e.key: e.count for e in events if e.key.startswith(SYNC_OPS)}
    print(f"\nwhole generate(), {steps} steps ({params.stage2_steps} in stage 2): timings {out.timings}")
    print("host synchronisations:", syncs)
    for e in cpu:
        print(f"  cpu {e.self_cpu_time_total / 1e3:9.2f} ms  x{e.count:<6} {e.key[:80]}")
    return {"steps": steps, "timings": out.timings, "syncs": syncs,
            "top_cpu_ops": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in cpu]}


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--batch", type=int, default=2, help="UNet rows (2 = one image with CFG)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per region before --iters timed ones")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--pipeline-steps", type=int, default=10,
                    help="also profile one whole generate() of this many steps (half in stage 2); 0: skip")
    ap.add_argument("--output")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU in fp32: a smoke run of this script")
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("error: profile_stage2 needs a CUDA GPU (or --tiny for a CPU smoke run)", file=sys.stderr)
        return 2
    device, prefix = ("cpu", "tiny-") if args.tiny else ("cuda", "")
    dtype = torch.float32 if args.tiny else {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    sd15, sdxl, mapping, components = build(dtype, device, prefix)
    inp = inputs(dtype, args.batch, device, prefix)
    acs = 1.0
    rows = []

    unets = {"sd15_unet": components[0].unet, "sdxl_unet": components[1].unet}

    def unet_kernels(on: bool) -> None:  # the UNets' GEGLU and (channels-last) GroupNorm kernels, as triton_kernels
        for name, unet in unets.items():
            sync_kernel_modules(unet, name in parts, on)

    blocks = install_fused_epilogues(mapping, use_triton=False)  # the runtime's swap, off until asked for

    def fused_epilogues(f: tuple) -> tuple:  # the mapping's blocks with the epilogue kernels, as triton_kernels
        for b in blocks:
            b.use_triton = True
        try:
            return mapping.features(*f)
        finally:
            for b in blocks:
                b.use_triton = False

    for layout, parts in LAYOUTS.items():
        for m in (sd15, mapping, sdxl):
            to_layout(m, m in (parts_of(sd15, mapping, sdxl, parts)))
        unet_kernels(False)  # what the pipeline does for channels-last UNets: layout-keeping swaps
        fmt15 = torch.channels_last if "sd15_unet" in parts else torch.contiguous_format
        fmtxl = torch.channels_last if "sdxl_unet" in parts else torch.contiguous_format
        x15, xxl = inp["x15"].contiguous(memory_format=fmt15), inp["xxl"].contiguous(memory_format=fmtxl)
        _, feats = sd15(x15, inp["t"], inp["emb15"])
        pre = mapping.features(*feats)
        res = mapping(*feats)

        def sd15_step():
            return sd15(x15, inp["t"], inp["emb15"])

        def mapping_blocks():
            return mapping.features(*feats)

        def mapping_blocks_epilogues():
            return fused_epilogues(feats)

        def mapping_all():
            return mapping(*feats)

        def sdxl_plain():
            inj = [functools.partial(inject_residual, residual=r, scale=acs, fusion_guidance_scale=None) for r in res]
            return sdxl(xxl, inp["t"], inp["embxl"], inp["cond"], injections=inj)

        def sdxl_alone():
            return sdxl(xxl, inp["t"], inp["embxl"], inp["cond"])

        def fused_injections(p):
            return [functools.partial(lambda h, x, conv: remap_inject(x, conv.weight, conv.bias, h, acs), x=x, conv=c)
                    for x, c in zip(p, mapping.zero_out)]

        def sdxl_fused():
            return sdxl(xxl, inp["t"], inp["embxl"], inp["cond"], injections=fused_injections(pre))

        def step_plain():
            _, f = sd15_step()
            r = mapping(*f)
            inj = [functools.partial(inject_residual, residual=x, scale=acs, fusion_guidance_scale=None) for x in r]
            return sdxl(xxl, inp["t"], inp["embxl"], inp["cond"], injections=inj)

        def step_fused():
            _, f = sd15_step()
            return sdxl(xxl, inp["t"], inp["embxl"], inp["cond"], injections=fused_injections(mapping.features(*f)))

        def step_kernels():  # what the pipeline runs with triton_kernels=True: epilogues, remap-inject,
            unet_kernels(True)  # GEGLU, and GroupNorm in the channels-last UNets
            _, f = sd15_step()
            p = fused_epilogues(f)
            out = sdxl(xxl, inp["t"], inp["embxl"], inp["cond"], injections=fused_injections(p))
            unet_kernels(False)
            return out

        def with_unet_kernels(fn):
            def run():
                unet_kernels(True)
                out = fn()
                unet_kernels(False)
                return out
            return run

        regions = {"sd15_unet": sd15_step, "mapping_blocks": mapping_blocks,
                   "mapping_blocks+fused_epilogues": mapping_blocks_epilogues, "mapping_all": mapping_all,
                   "sdxl_unet_alone": sdxl_alone, "sdxl_unet+inject": sdxl_plain, "sdxl_unet+fused_inject": sdxl_fused,
                   "stage2_step_plain": step_plain, "stage2_step_fused": step_fused, "stage2_step_kernels": step_kernels}
        regions["sd15_unet+unet_kernels"] = with_unet_kernels(sd15_step)
        regions["sdxl_unet_alone+unet_kernels"] = with_unet_kernels(sdxl_alone)
        for name, fn in regions.items():
            if layout == "mixed" and name in ("mapping_all", "sdxl_unet_alone", "sdxl_unet+inject",
                                              "sdxl_unet_alone+unet_kernels"):
                continue  # the same modules in the same layout as a run above
            samples = time_callable(fn, device, warmup=args.warmup, iters=args.iters)
            row = {"layout": layout, "region": name, "median_ms": statistics.median(samples) * 1e3,
                   "min_ms": min(samples) * 1e3}
            if device == "cuda":  # GPU time alone: the region captured as a CUDA graph
                row["gpu_ms"] = statistics.median(time_cuda_graph(fn, reps=2, iters=5)) * 1e3
            rows.append(row)
            print(f"{layout:<13} {name:<30} eager {row['median_ms']:8.2f} ms  gpu {row.get('gpu_ms', float('nan')):8.2f} ms",
                  flush=True)

    # torch.profiler over a few plain NCHW steps, grouped by op.
    for m in (sd15, sdxl, mapping):
        to_layout(m, False)
    x15, xxl = inp["x15"], inp["xxl"]

    def region_step():
        with torch.profiler.record_function("sd15_unet"):
            _, f = sd15(x15, inp["t"], inp["emb15"])
        with torch.profiler.record_function("mapping"):
            r = mapping(*f)
        inj = [functools.partial(inject_residual, residual=x, scale=acs, fusion_guidance_scale=None) for x in r]
        with torch.profiler.record_function("sdxl_unet"):
            return sdxl(xxl, inp["t"], inp["embxl"], inp["cond"], injections=inj)

    for _ in range(2):
        region_step()
    synchronize(device)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.profile_steps):
            region_step()
        synchronize(device)
    events = prof.key_averages()
    attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    if device == "cpu":
        attr = "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    ops = sorted(({"op": e.key, "self_cuda_ms_per_step": getattr(e, attr) / 1e3 / args.profile_steps,
                   "share": getattr(e, attr) / total, "calls_per_step": e.count / args.profile_steps}
                  for e in events if getattr(e, attr) > 0), key=lambda d: -d["self_cuda_ms_per_step"])
    print("\ntop ops by self CUDA time per stage-2 step (NCHW, plain torch):")
    for o in ops[:25]:
        print(f"  {o['self_cuda_ms_per_step']:8.3f} ms  {o['share']:6.1%}  x{o['calls_per_step']:<6.0f} {o['op'][:90]}")
    launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel"))) / args.profile_steps
    print(f"kernel launches per step: {launches:.0f}")
    pipeline = profile_pipeline(components, mapping, device, dtype, args.pipeline_steps) if args.pipeline_steps else None
    result = {"benchmark": "stage2-profile", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (tiny smoke run)", "torch": torch.__version__, "python": platform.python_version(),
              "command": " ".join(sys.argv), "dtype": args.dtype, "batch": args.batch, "regions": rows,
              "top_ops": ops[:60], "kernel_launches_per_step": launches,
              "pipeline": pipeline}
    if args.output:
        write_atomic(Path(args.output), json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
