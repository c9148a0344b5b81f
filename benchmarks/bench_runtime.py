"""Lean-runtime benchmark (GPU only): the standard workload with full-size random weights,
plain eager, then each optimisation added on top (mixed layout, compile, graphs, streams,
kernels),
and SDXL alone (eager and with the same lean backend), in one process.

    python benchmarks/bench_runtime.py --output benchmarks/results/runtime-h100.json
    python benchmarks/bench_runtime.py --skip-compile --runs 2      # fits a short GPU slot
    python benchmarks/bench_runtime.py --smoke --steps 2 --runs 1   # CPU, tiny models: the script runs

Standard workload: SDXL 1024 px + SD1.5 512 px, 30 steps, adapter guidance start 0.9,
CFG 7.5, batch 1, DPM-Solver++ 2M, fp16, VAE decode included. Each variant: warm-up
(compile and graph capture happen there, their seconds are reported, not hidden), then
--runs timed runs; medians of the total and of each stage, peak memory. Variants run
cumulatively, and compile changes the shared models in place (channels-last, fused QKV),
so the eager rows are measured first. Written before a GPU was available: GPU-untested.
With compile in the rows (no --skip-compile), +kernels adds only the CFG + sampler step
kernel: inside compiled steps inductor fuses those ops itself (RuntimeConfig.
traced_kernels_active); with --skip-compile it adds every kernel.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xa_runtime.models.components import build_random_components  # noqa: E402
from xa_runtime.models.mapping import MappingConfig, MappingLayers  # noqa: E402
from xa_runtime.pipeline import GenerationParams, XAdapterPipeline  # noqa: E402
from xa_runtime.pipeline.params import validate  # noqa: E402
from xa_runtime.pipeline.schedulers import make_scheduler  # noqa: E402
from xa_runtime.pipeline.text import encode_sdxl, sdxl_time_ids  # noqa: E402
from xa_runtime.bench.report import write_atomic  # noqa: E402
from xa_runtime.runtime import MIXED_LAYOUT, RuntimeConfig, StageTimer, peak_memory_bytes, reset_peak_memory  # noqa: E402
from xa_runtime.runtime.timing import synchronize  # noqa: E402

# Cumulative: each row adds one switch to the row before it.
STEPS_ADDED = [
    ("eager", {}),
    # the profile's layout choice for eager kernels (SD1.5 + mapping channels-last, SDXL NCHW);
    # +compile turns channels-last on for all three, where inductor picks its own layouts
    ("+mixed-layout", dict(channels_last=MIXED_LAYOUT)),
    ("+compile", dict(compile=True, channels_last=True, fuse_qkv=True)),
    ("+graphs", dict(cuda_graphs=True)),
    ("+streams", dict(streams=True)),
    ("+kernels", dict(triton_kernels=True)),
]
ALL_VARIANTS = [name for name, _ in STEPS_ADDED] + ["sdxl-alone", "sdxl-alone-lean"]


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per variant (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per variant (compile/capture happen here)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"comma-separated subset of {ALL_VARIANTS}")
    ap.add_argument("--skip-compile", action="store_true", help="no torch.compile in any variant (minutes for SDXL)")
    ap.add_argument("--compile-mode", default=None, choices=["default", "max-autotune-no-cudagraphs"],
                    help="torch.compile mode of the +compile row (default: torch's default)")
    ap.add_argument("--output", help="JSON file to write")
    ap.add_argument("--smoke", action="store_true",
                    help="the tiny models on the CPU, no compile, no CUDA graphs: checks that the script runs "
                         "(its figures mean nothing)")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.smoke:
        args.skip_compile = True
        args.variants = [v for v in args.variants if v != "+graphs"]  # CUDA only
    unknown = [v for v in args.variants if v not in ALL_VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; accepted: {', '.join(ALL_VARIANTS)}")
    if args.skip_compile and "+compile" in args.variants:
        args.variants.remove("+compile")
    if args.runs < 1 or args.warmup < 0 or args.steps < 1:
        ap.error("--runs >= 1, --warmup >= 0, --steps >= 1")
    return args


def params(steps: int, seed: int, smoke: bool = False) -> GenerationParams:
    sizes = {} if smoke else dict(height=1024, width=1024, height_sd15=512, width_sd15=512)  # smoke: model defaults
    return GenerationParams(prompt="a photo of a cat", num_inference_steps=steps, guidance_scale=7.5,
                            adapter_guidance_start=0.9, scheduler="dpmpp-2m", seed=seed, output_type="np", **sizes)


def configs(skip_compile: bool, compile_mode: str | None = None, graphs: bool = True) -> dict[str, RuntimeConfig]:
    out, acc = {}, {}
    for name, added in STEPS_ADDED:
        if name == "+compile" and compile_mode:
            added = added | {"compile_mode": compile_mode}
        if not graphs:
            added = {k: v for k, v in added.items() if k != "cuda_graphs"}
        if not (skip_compile and name == "+compile"):
            acc = acc | added
        out[name] = RuntimeConfig(**acc)
    return out


@torch.no_grad()
def sdxl_alone(pipe: XAdapterPipeline, p: GenerationParams) -> dict:
    """SDXL with CFG over the whole schedule + VAE decode, through the pipeline's executor
    (so compile/graphs apply as for X-Adapter). Returns timings and peak memory."""
    p = validate(p, pipe.size_rules)
    dev, dt = pipe.device, pipe.dtype
    gen = torch.Generator("cpu").manual_seed(p.seed)
    timer = StageTimer(dev)
    reset_peak_memory(dev)
    pipe._sync_kernel_modules()  # the variant's GroupNorm / GEGLU kernels, as its own requests
    pipe.executor.begin_request((pipe.sdxl.unet,))
    if not hasattr(pipe, "_sdxl_only"):
        pipe._sdxl_only = lambda x, t, e, te, ti: pipe.sdxl_branch(x, t, e, {"text_embeds": te, "time_ids": ti}).contiguous()
    with timer.stage("text_encoders"), pipe.residency.use(pipe.sdxl.text_encoder, pipe.sdxl.text_encoder_2):
        emb, pooled = encode_sdxl(pipe.sdxl, p.prompts, None, 1, True, dev)
        emb, pooled = emb.to(dt), pooled.to(dt)
        time_ids = sdxl_time_ids(p.height, p.width, emb.shape[0], dt, dev)
    with timer.stage("denoise"):
        sched = make_scheduler(p.scheduler, pipe.sdxl.scheduler_config)
        sched.set_timesteps(p.num_inference_steps, device=dev)
        sampler = pipe._sampler(sched, gen)  # the variant's sampler (fused kernel or diffusers)
        shape = (1, pipe.sdxl.unet.config.in_channels, p.height // 8, p.width // 8)
        lat = torch.randn(shape, generator=gen).to(dev, dt) * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sampler.scale_model_input(torch.cat([lat, lat]), t)
            eps = pipe.executor.run("sdxl_alone", pipe._sdxl_only, (x, t, emb, pooled, time_ids))
            lat = sampler.step(eps, t, lat, p.guidance_scale)
    with timer.stage("vae_decode"), pipe.residency.use(pipe.sdxl.vae):
        pipe._decode(lat, "np")
    return {"timings": dict(timer.seconds), "overheads": pipe.executor.request_overheads(),
            "peak_memory": peak_memory_bytes(dev)}


def measure(run, warmup: int, runs: int, device: torch.device) -> dict:
    """run(seed) -> {"timings", "overheads", "peak_memory"}; wall seconds around each call."""
    overheads: dict[str, float] = {}
    for i in range(warmup):
        out = run(i)
        for k, v in out["overheads"].items():
            overheads[k] = overheads.get(k, 0.0) + v
    totals, stages, peaks = [], {}, []
    for r in range(runs):
        synchronize(device)
        start = time.perf_counter()
        out = run(1000 + r)
        synchronize(device)
        totals.append(time.perf_counter() - start)
        for k, v in out["timings"].items():
            stages.setdefault(k, []).append(v)
        peaks.append(out["peak_memory"])
        for k, v in out["overheads"].items():  # should be 0 after warm-up; reported if not
            overheads[k] = overheads.get(k, 0.0) + v
    return {"total_median_s": statistics.median(totals), "total_s": totals,
            "stages_median_s": {k: statistics.median(v) for k, v in stages.items()},
            "overheads_s": overheads,
            "peak_memory_gib": max(peaks) / 2**30 if None not in peaks else None}  # None: not on CUDA


def _runner(pipe: XAdapterPipeline, name: str, steps: int, smoke: bool):
    if name.startswith("sdxl-alone"):
        return lambda seed: sdxl_alone(pipe, params(steps, seed, smoke))

    def run(seed: int) -> dict:
        out = pipe.generate(params(steps, seed, smoke))
        return {"timings": out.timings, "overheads": out.overheads, "peak_memory": out.peak_memory}

    return run


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: bench_runtime.py needs a CUDA GPU (none is visible); the CPU latency baseline is xa-bench; "
              "--smoke runs the script on the tiny models", file=sys.stderr)
        return 2
    dev, dt = (torch.device("cpu"), torch.float32) if args.smoke else (torch.device("cuda"), torch.float16)
    prefix = "tiny-" if args.smoke else ""
    t0 = time.perf_counter()
    sd15 = build_random_components(prefix + "sd15", 0, device=dev, dtype=dt)
    sdxl = build_random_components(prefix + "sdxl", 1, device=dev, dtype=dt)
    mapping = MappingLayers(MappingConfig.from_unet_configs(sd15.unet.config, sdxl.unet.config))
    models = (sd15, sdxl, mapping)
    print(f"models built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    cfgs = configs(args.skip_compile, args.compile_mode, graphs=not args.smoke)
    lean_cfg = cfgs["+kernels"]
    plan = [v for v in ["sdxl-alone", "eager", "+mixed-layout", "+compile", "+graphs", "+streams", "+kernels", "sdxl-alone-lean"]
            if v in args.variants]  # eager rows first: compile changes the models in place
    results = {}
    lean = None  # one pipeline for the cumulative rows: set_runtime keeps its compiled steps
    for name in plan:
        runtime = RuntimeConfig() if name == "sdxl-alone" else lean_cfg if name == "sdxl-alone-lean" else cfgs[name]
        print(f"{name}: {runtime}", file=sys.stderr)
        if name in ("sdxl-alone", "eager"):
            pipe = XAdapterPipeline(*models, device=dev, dtype=dt, progress=False, runtime=runtime)
        elif lean is None:
            pipe = lean = XAdapterPipeline(*models, device=dev, dtype=dt, progress=False, runtime=runtime)
        else:
            lean.set_runtime(runtime)  # drops the previous row's graphs
            pipe = lean
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        results[name] = measure(_runner(pipe, name, args.steps, args.smoke), args.warmup, args.runs, dev) | {
            "runtime": repr(runtime)}
        print(f"  median {results[name]['total_median_s']:.3f} s", file=sys.stderr)
        del pipe

    base = results.get("eager", {}).get("total_median_s")
    lines = [f"{'variant':<16} {'median s':>9} {'x eager':>8} {'peak GiB':>9}  overheads (s)  stage medians (s)"]
    for name, r in results.items():
        speed = f"{base / r['total_median_s']:8.2f}" if base else f"{'-':>8}"
        over = " ".join(f"{k}={v:.1f}" for k, v in r["overheads_s"].items() if v)
        stages = "  ".join(f"{k}={v:.3f}" for k, v in r["stages_median_s"].items())
        peak = f"{r['peak_memory_gib']:9.2f}" if r["peak_memory_gib"] is not None else f"{'-':>9}"
        lines.append(f"{name:<16} {r['total_median_s']:9.3f} {speed} {peak}  {over or '-'}  {stages}")
    ratios = {}
    if "eager" in results and "sdxl-alone" in results:
        ratios["eager_xadapter_over_sdxl_alone"] = results["eager"]["total_median_s"] / results["sdxl-alone"]["total_median_s"]
    last = [n for n in ("+kernels", "+streams", "+graphs", "+compile", "+mixed-layout") if n in results]
    if last and base:
        ratios[f"speedup_{last[0]}_over_eager"] = base / results[last[0]]["total_median_s"]
    if last and "sdxl-alone-lean" in results:
        ratios[f"{last[0]}_over_sdxl_alone_lean"] = results[last[0]]["total_median_s"] / results["sdxl-alone-lean"]["total_median_s"]
    lines += [f"{k}: {v:.3f}" for k, v in ratios.items()]
    print("\n".join(lines))

    if args.output:
        import diffusers

        record = {
            "benchmark": "lean-runtime", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": " ".join([sys.executable, *sys.argv]),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke run: no figures)",
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "cuda": torch.version.cuda,
                         "python": platform.python_version()},
            "workload": {"sdxl": "tiny default" if args.smoke else 1024, "sd15": "tiny default" if args.smoke else 512,
                         "steps": args.steps, "adapter_guidance_start": 0.9,
                         "guidance_scale": 7.5, "batch": 1, "scheduler": "dpmpp-2m",
                         "dtype": "fp32" if args.smoke else "fp16",
                         "weights": "tiny random (smoke)" if args.smoke else "random, full size"},
            "warmup": args.warmup, "runs": args.runs, "skip_compile": args.skip_compile,
            "results": results, "ratios": ratios, "table": lines,
        }
        write_atomic(Path(args.output), json.dumps(record, indent=2))
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
