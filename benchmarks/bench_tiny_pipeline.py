"""Seconds per stage of the X-Adapter pipeline on the built-in tiny random models, on CPU.

A smoke benchmark of the machinery (text encoders, stage 1, hand-over, stage 2, VAE
decode), not of real models: it runs anywhere in seconds. Warm-up runs (not timed), then
--runs timed runs of the standard workload's schedule (N = 30, ags 0.9, CFG) through
xa_runtime.bench.run_latency; prints median, min and max per stage and writes them as
JSON with the device, thread count, versions and the exact command. For full-size models,
variants and GPUs use `xa-bench`.

    python benchmarks/bench_tiny_pipeline.py --runs 5 --output benchmarks/results/tiny-cpu-<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from xa_runtime.bench import Workload, run_latency
from xa_runtime.cli.generate import device_name, versions
from xa_runtime.errors import ParameterError
from xa_runtime.models.presets import get_preset
from xa_runtime.pipeline import SCHEDULERS, SizeRules, XAdapterPipeline, validate


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="N (default %(default)s, as the standard workload)")
    ap.add_argument("--adapter-guidance-start", type=float, default=0.9, help="(default %(default)s)")
    ap.add_argument("--guidance-scale", type=float, default=7.5, help="(default %(default)s: CFG on)")
    ap.add_argument("--scheduler", choices=list(SCHEDULERS), default="dpmpp-2m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (default %(default)s)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs (default %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--output", default=None, help="JSON file (default: a new file in the system temp folder)")
    return ap.parse_args(argv)


def check(args: argparse.Namespace, workload: Workload) -> None:
    tiny = SizeRules(sd15_default=get_preset("tiny-sd15").default_size, sdxl_default=get_preset("tiny-sdxl").default_size)
    validate(workload.params(seed=0), tiny)
    for flag, value, lo in (("--warmup", args.warmup, 0), ("--runs", args.runs, 1), ("--threads", args.threads or 1, 1)):
        if not lo <= value <= 1000:
            raise ParameterError(flag, value, f"an integer in [{lo}, 1000]")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise ParameterError("--output", args.output, "a path in an existing folder")


def write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    workload = Workload(
        steps=args.steps, adapter_guidance_start=args.adapter_guidance_start, guidance_scale=args.guidance_scale,
        batch=args.batch, scheduler=args.scheduler,
    )
    try:
        check(args, workload)
    except ParameterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    pipe = XAdapterPipeline.from_tiny(0, device="cpu", dtype=torch.float32, progress=False)
    build_seconds = time.perf_counter() - t0
    measured = run_latency({"eager": pipe}, workload, args.warmup, args.runs)["eager"]
    rows = {**measured["stages"], "total": measured["total"]}

    print(f"{'stage':<14} {'median ms':>10} {'min ms':>9} {'max ms':>9}")
    for name, s in rows.items():
        print(f"{name:<14} {s['median'] * 1e3:10.1f} {s['min'] * 1e3:9.1f} {s['max'] * 1e3:9.1f}")

    resolved = validate(workload.params(seed=0), pipe.size_rules)
    command = [Path(sys.executable).name, *sys.argv] if argv is None else ["benchmarks/bench_tiny_pipeline.py", *argv]
    result = {
        "benchmark": "tiny_pipeline",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": " ".join(command),
        "models": "tiny",
        "device": "cpu",
        "device_name": device_name("cpu"),
        "dtype": "fp32",
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "workload": {k: v for k, v in resolved.to_dict().items() if k not in ("extra", "seed")},
        "stage2_steps": resolved.stage2_steps,
        "warmup": args.warmup,
        "runs": args.runs,
        "build_seconds": build_seconds,
        "stages": rows,  # seconds: median, p90, p99, min, max, mean, n
        "raw_total_seconds": measured["raw_seconds"],
    }
    if args.output:
        path = Path(args.output)
    else:
        fd, name = tempfile.mkstemp(prefix="xa-bench-tiny-", suffix=".json")
        os.close(fd)
        path = Path(name)
    write_json(path, result)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
