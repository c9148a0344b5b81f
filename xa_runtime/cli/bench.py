"""`xa-bench`: latency of the X-Adapter pipeline, per stage, in several variants in one run.

    xa-bench                                   # tiny models on CPU (runs anywhere)
    xa-bench --models random --device cuda --dtype fp16 --compare eager,kernels \\
        --output benchmarks/results/latency-h100.json      # full-size random weights

Writes a table to the terminal and, with --output, a JSON file with everything (device,
versions, command line, git commit, raw samples) and a Markdown summary beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import ParameterError
from ..models.presets import get_preset
from ..pipeline.params import SizeRules, validate
from ..pipeline.schedulers import SCHEDULERS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="xa-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", choices=["tiny", "random", "paths"], default=None,
                    help="tiny random models (default without CUDA), full-size random weights (default with CUDA), "
                         "or --sd15/--sdxl/--adapter paths")
    ap.add_argument("--sd15"), ap.add_argument("--sdxl"), ap.add_argument("--adapter")
    ap.add_argument("--compare", default="eager", help="comma-separated variants; first is the baseline")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--adapter-guidance-start", type=float, default=0.9)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--height", type=int), ap.add_argument("--width", type=int)
    ap.add_argument("--height-sd15", type=int), ap.add_argument("--width-sd15", type=int)
    ap.add_argument("--scheduler", default="dpmpp-2m")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--output", help="JSON file to write (a .md summary is written beside it)")
    return ap


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _check(args: argparse.Namespace):
    """Every argument checked before anything is loaded; returns (variants, workload, device, dtype)."""
    from ..bench import PLANNED, VARIANTS, Workload

    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda else "cpu")
    if args.device == "cuda" and not cuda:
        raise ParameterError("--device", "cuda", "cpu on this machine (no CUDA device is visible)")
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    paths = [args.sd15, args.sdxl, args.adapter]
    if args.models is None:
        args.models = "paths" if any(paths) else ("random" if args.device == "cuda" else "tiny")
    if args.models == "paths" and not all(paths):
        missing = [f for f, v in zip(("--sd15", "--sdxl", "--adapter"), paths) if not v]
        raise ParameterError(missing[0], None, "all of --sd15, --sdxl and --adapter with --models paths")
    variants = [v.strip() for v in args.compare.split(",") if v.strip()]
    for v in variants:
        if v in PLANNED:
            raise ParameterError("--compare", v, f"a variant that exists now ({', '.join(VARIANTS)}); {v} comes with {PLANNED[v]}")
        if v not in VARIANTS:
            raise ParameterError("--compare", v, f"one of {', '.join(VARIANTS)}")
        if v == "kernels":
            from ..kernels import triton_usable

            if not triton_usable(args.device):
                raise ParameterError("--compare", v, "a CUDA device with triton installed (or TRITON_INTERPRET=1 on CPU)")
    if not variants or len(set(variants)) != len(variants):
        raise ParameterError("--compare", args.compare, "distinct variant names, comma-separated")
    if args.scheduler not in SCHEDULERS:
        raise ParameterError("--scheduler", args.scheduler, f"one of {', '.join(SCHEDULERS)}")
    for flag, value, lo in (("--warmup", args.warmup, 0), ("--runs", args.runs, 1)):
        if not lo <= value <= 1000:
            raise ParameterError(flag, value, f"an integer in [{lo}, 1000]")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise ParameterError("--output", args.output, "a path in an existing folder")
    workload = Workload(
        steps=args.steps, adapter_guidance_start=args.adapter_guidance_start, guidance_scale=args.guidance_scale,
        batch=args.batch, height=args.height, width=args.width, height_sd15=args.height_sd15,
        width_sd15=args.width_sd15, scheduler=args.scheduler,
    )
    tiny = args.models == "tiny"
    rules = SizeRules(
        sd15_default=get_preset("tiny-sd15" if tiny else "sd15").default_size,
        sdxl_default=get_preset("tiny-sdxl" if tiny else "sdxl").default_size,
    )
    try:
        validate(workload.params(seed=0), rules)
    except ParameterError as e:
        flag = {"num_inference_steps": "--steps", "num_images_per_prompt": "--batch"}.get(e.name, "--" + e.name.replace("_", "-"))
        raise ParameterError(flag, e.value, e.accepted) from None
    return variants, workload, torch.device(args.device), DTYPES[args.dtype]


def _build(args: argparse.Namespace, variants: list[str], device: torch.device, dtype: torch.dtype):
    from ..bench import VARIANTS
    from ..models.components import build_random_components
    from ..models.mapping import MappingConfig, MappingLayers
    from ..models.tiny import build_tiny_models
    from ..pipeline import XAdapterPipeline

    if args.models == "tiny":
        models = build_tiny_models(0)
    elif args.models == "random":
        sd15 = build_random_components("sd15", 0, device=device, dtype=dtype)
        sdxl = build_random_components("sdxl", 1, device=device, dtype=dtype)
        models = (sd15, sdxl, MappingLayers(MappingConfig.from_unet_configs(sd15.unet.config, sdxl.unet.config)))
    else:
        first = XAdapterPipeline.from_pretrained(args.sd15, args.sdxl, args.adapter, device=device, dtype=dtype, progress=False)
        models = (first.sd15, first.sdxl, first.mapping)
    return {v: XAdapterPipeline(*models, device=device, dtype=dtype, progress=False, runtime=VARIANTS[v]) for v in variants}


def _table(result: dict) -> str:
    lines = [f"{'variant':<10} {'median s':>9} {'p90 s':>8} {'min s':>8} {'x first':>8}  stage medians (s)"]
    for name, r in result["variants"].items():
        stages = "  ".join(f"{k}={v['median']:.3f}" for k, v in r["stages"].items())
        t = r["total"]
        lines.append(f"{name:<10} {t['median']:9.3f} {t['p90']:8.3f} {t['min']:8.3f} {r['ratio_to_first']:8.3f}  {stages}")
    eff = result.get("efficiency", {})
    if eff:
        lines.append(f"UNet+mapping work per image: {eff['flops']['total'] / 1e12:.3f} TFLOP; "
                     f"peak measured: {eff['peak_tflops']:.1f} TFLOP/s" if eff.get("peak_tflops") else
                     f"UNet+mapping work per image: {eff['flops']['total'] / 1e12:.4f} TFLOP")
        for s in ("stage1", "stage2"):
            if f"{s}_tflops" in eff:
                share = eff.get(f"{s}_share_of_peak")
                lines.append(f"  {s}: {eff[f'{s}_tflops']:.2f} TFLOP/s" + (f" ({share:.0%} of peak)" if share else ""))
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        variants, workload, device, dtype = _check(args)
    except ParameterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ..bench import efficiency, peak_tflops, run_latency
    from ..bench.runner import workload_dict

    pipes = _build(args, variants, device, dtype)
    print(f"xa-bench: {args.models} models, {device} {args.dtype}, variants {', '.join(variants)}", file=sys.stderr)
    runs = run_latency(pipes, workload, args.warmup, args.runs, progress=lambda m: print(m, file=sys.stderr))
    first = pipes[variants[0]]
    peak = peak_tflops(device, dtype) if device.type == "cuda" else None
    medians = {k: v["median"] for k, v in runs[variants[0]]["stages"].items()}
    import diffusers
    import transformers

    from .. import __version__

    result = {
        "benchmark": "latency", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "git_commit": _git_commit(), "models": args.models, "workload": workload_dict(workload),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype, "threads": torch.get_num_threads(),
        "versions": {"xa_runtime": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "variants": runs, "efficiency": efficiency(first, workload, medians, peak),
    }
    table = _table(result)
    print(table)
    if args.output:
        out = Path(args.output)
        _write_atomic(out, json.dumps(result, indent=2))
        _write_atomic(out.with_suffix(".md"), f"# xa-bench latency, {result['date'][:10]}\n\n"
                      f"`{result['command']}` on {result['device']} ({args.dtype}), commit {result['git_commit']}\n\n"
                      f"```\n{table}\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
