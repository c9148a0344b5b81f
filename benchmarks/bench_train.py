"""Step time and peak memory of one xa-train optimizer step: the naive step (every model
under autograd, every weight requiring a gradient, no checkpointing: what a first
training script does) against ours (frozen parts without autograd, gradient
checkpointing where gradients pass), in one run.

Each variant runs in its own fresh process (so that peak memory is its own): warm-up
steps, then --runs timed steps (median, min, max). Peak memory over all steps, warm-up
included: on CUDA torch.cuda.max_memory_allocated; on the CPU the process's peak RSS above
its RSS before the first step. Prints a table and writes JSON with the device,
date, versions and the exact command.

    python benchmarks/bench_train.py --threads 1 --output benchmarks/results/train-tiny-cpu-<date>.json
    python benchmarks/bench_train.py --models random --device cuda --dtype bf16 --batch-size 1   # full size, GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("naive", "ours")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", choices=["tiny", "random"], default="tiny",
                    help="tiny models, or the full SD1.5 + SDXL architectures with random weights (default %(default)s)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="frozen weights + autocast (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=4, help="rows per step (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default %(default)s)")
    ap.add_argument("--runs", type=int, default=5, help="timed steps (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="fresh processes per variant, alternating naive/ours (on a shared machine the load moves; "
                         "default %(default)s)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS))
    ap.add_argument("--output", default=None, help="JSON file (default: a new file in the system temp folder)")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        torch.set_flush_denormal(True)
    from xa_runtime.models.components import build_random_components
    from xa_runtime.models.mapping import MappingConfig
    from xa_runtime.models.tiny import build_tiny_models
    from xa_runtime.testing.training_data import captioned_image
    from xa_runtime.training.data import Sample, prepare_row
    from xa_runtime.training.loop import TORCH_DTYPES, TrainModels, _place, buckets_for
    from xa_runtime.training.options import TrainOptions
    from xa_runtime.training.step import TrainableMapping, XAdapterTrainingStep, zero_initialised_mapping

    naive = args.worker == "naive"
    dev = torch.device(args.device)
    if args.models == "tiny":
        sd15, sdxl, _ = build_tiny_models(0)
    else:
        sd15, sdxl = build_random_components("sd15", 0, device=dev), build_random_components("sdxl", 1, device=dev)
    models = TrainModels(sd15, sdxl)
    options = TrainOptions(batch_size=args.batch_size, gradient_checkpointing=not naive, dtype=args.dtype)
    dtype = TORCH_DTYPES[args.dtype]
    _place(models, dev, dtype, dtype, options.gradient_checkpointing)
    frozen = [sd15.unet, sd15.vae, sd15.text_encoder, sdxl.unet, sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2]
    if naive:
        for m in frozen:
            m.requires_grad_(True)
    config = MappingConfig.from_unet_configs(sd15.unet.config, sdxl.unet.config)
    mapping = zero_initialised_mapping(config, 0).to(dev).train().requires_grad_(True)
    step = XAdapterTrainingStep(sd15, sdxl, options, dev, dtype, dtype)
    step.naive = naive
    module = TrainableMapping(mapping, options.gradient_checkpointing)
    optimizer = torch.optim.AdamW(mapping.parameters(), lr=1e-5)
    bucket = [b for b in buckets_for(models, options) if b.new_hw[0] == b.new_hw[1]][0]
    rows = []
    for i in range(args.batch_size):
        image, caption = captioned_image(i, (bucket.new_hw[1], bucket.new_hw[0]))
        rows.append(prepare_row(Sample(str(i), image, caption), bucket))
    generator = torch.Generator().manual_seed(0)

    def one_step() -> float:
        draws = step.draw(len(rows), bucket.new_hw, bucket.old_hw, generator)
        x = step.prepare(rows, draws)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = step.loss(x, module)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if naive:
            for m in frozen:
                m.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # Memory from before the first step: the first one allocates what later steps reuse
    # (the naive step's gradient buffers of every frozen weight, the optimizer's moments).
    rss_start = _rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        one_step()
    sync()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        one_step()
        sync()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        memory_kind = "torch.cuda.max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_start
        memory_kind = "peak RSS above the RSS before the first step"
    return {"step_s": times, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "peak_memory_bytes": peak, "memory_kind": memory_kind,
            "bucket": {"new": list(bucket.new_hw), "old": list(bucket.old_hw)},
            "trainable_parameters": sum(p.numel() for p in mapping.parameters())}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        print(f"error: invalid --variants {args.variants!r}: expected names from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    base = ["--models", args.models, "--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
            "--warmup", str(args.warmup), "--runs", str(args.runs), "--threads", str(args.threads)]
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for _ in range(args.rounds):
        for variant in variants:
            proc = subprocess.run([sys.executable, __file__, *base, "--worker", variant], capture_output=True,
                                  text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            merged = results.setdefault(variant, {**run, "step_s": [], "peak_memory_bytes_per_round": []})
            merged["step_s"] += run["step_s"]
            merged["peak_memory_bytes_per_round"].append(run["peak_memory_bytes"])
    for r in results.values():
        r.update(median_s=statistics.median(r["step_s"]), min_s=min(r["step_s"]), max_s=max(r["step_s"]),
                 peak_memory_bytes=max(r["peak_memory_bytes_per_round"]))
    from xa_runtime.cli.generate import device_name, versions

    print(f"xa-train step, {args.models} models, batch {args.batch_size}, {args.dtype}, {args.device} "
          f"({device_name(args.device)}), {args.threads} thread(s), {args.rounds} x {args.runs} timed steps, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'variant':8} {'median s':>9} {'min s':>8} {'max s':>8} {'peak MiB':>9}")
    for name, r in results.items():
        print(f"{name:8} {r['median_s']:9.3f} {r['min_s']:8.3f} {r['max_s']:8.3f} {r['peak_memory_bytes'] / 2**20:9.1f}")
    if "naive" in results and "ours" in results:
        n, o = results["naive"], results["ours"]
        print(f"ours / naive: time {o['median_s'] / n['median_s']:.2f}x, peak memory "
              f"{o['peak_memory_bytes'] / max(1, n['peak_memory_bytes']):.2f}x")
    record = {"benchmark": "bench_train", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": ["python", "benchmarks/bench_train.py", *(argv if argv is not None else sys.argv[1:])],
              "device": args.device, "device_name": device_name(args.device), "threads": args.threads,
              "models": args.models, "dtype": args.dtype, "batch_size": args.batch_size, "warmup": args.warmup,
              "runs": args.runs, "rounds": args.rounds,
              "load_average_1min": os.getloadavg()[0], "versions": versions(), "results": results}
    if args.output:
        path = Path(args.output)
    else:
        fd, name = tempfile.mkstemp(prefix="bench-train-", suffix=".json")
        os.close(fd)
        path = Path(name)
    from xa_runtime.cli.output_files import write_all_or_nothing

    write_all_or_nothing({path: (json.dumps(record, indent=2) + "\n").encode()})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
