"""TensorRT engines against PyTorch in one run: build time and engine size per graph, GPU
latency per graph call (and their sum: one stage-2 step) for the engines and the PyTorch
modules on the same inputs, and the LoRA switch time of the SD1.5 UNet engine.

Models: the real architectures with random weights (--models random, the default) or the
tiny ones. The three stage-2 graphs (sd15_unet, mapping, sdxl_unet) are exported to a
temporary folder, built refittable at --precision, and timed at the standard workload's
shapes with CFG (2 rows: SD1.5 64x64 latents, SDXL 128x128) by CUDA events: warm-up,
then --runs calls; medians. LoRA switch: a random LoRA (rank --rank on the attention,
feed-forward and resnet layers) refitted onto the base engine, then a second one, then
unloaded: seconds per set_lora_deltas call (host plan + refit), and the weights fed.

Needs TensorRT and a CUDA GPU: **never run** on the machines this project was written on
(TensorRT cannot be installed there); written against TensorRT 10's Python API and the
project's engines layer (type-checked with tensorrt-stubs).

    python benchmarks/bench_engines.py --output benchmarks/results/engines-<gpu>-<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xa_runtime.bench.report import device_info, git_commit, versions, write_atomic  # noqa: E402

GRAPHS = ("sd15_unet", "mapping", "sdxl_unet")
SHAPES = {"sd15": {"B": 2, "H": 64, "W": 64, "T": 77}, "sdxl": {"B": 2, "H": 128, "W": 128, "T": 77}}
TINY_SHAPES = {"sd15": {"B": 2, "H": 8, "W": 8, "T": 77}, "sdxl": {"B": 2, "H": 16, "W": 16, "T": 77}}


def _check(args: argparse.Namespace) -> str | None:
    if not 1 <= args.runs <= 1000 or not 0 <= args.warmup <= 100:
        return "--runs must be in 1..1000 and --warmup in 0..100"
    if not 1 <= args.rank <= 256:
        return "--rank must be in 1..256"
    from xa_runtime.availability import tensorrt_installed

    if not tensorrt_installed():
        return "bench_engines needs TensorRT (pip install tensorrt, NVIDIA's index; tensorrt-stubs is not enough)"
    if not torch.cuda.is_available():
        return "bench_engines needs a CUDA GPU"
    return None


def _models(kind: str, dtype: torch.dtype):
    from xa_runtime.export import ModuleBundle
    from xa_runtime.models.components import build_random_components
    from xa_runtime.models.mapping import MappingConfig, MappingLayers

    if kind == "tiny":
        return ModuleBundle.tiny(0)
    with torch.device("cuda"):
        sd15: Any = build_random_components("sd15", 0, device="cuda", dtype=dtype)
        sdxl: Any = build_random_components("sdxl", 1, device="cuda", dtype=dtype)
        mapping = MappingLayers(MappingConfig.from_unet_configs(sd15.unet.config, sdxl.unet.config)).to(dtype=dtype)
    return ModuleBundle(sd15=sd15, sdxl=sdxl, mapping=mapping)


def _median_ms(fn, warmup: int, runs: int) -> tuple[float, list[float]]:
    from xa_runtime.runtime.timing import time_callable

    samples = time_callable(fn, "cuda", warmup=warmup, iters=runs)
    return statistics.median(samples) * 1e3, [s * 1e3 for s in samples]


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", choices=["random", "tiny"], default="random")
    ap.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank for the switch timing (default %(default)s)")
    ap.add_argument("--output", help="JSON file to write")
    args = ap.parse_args(argv)
    problem = _check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from xa_runtime.engines import build
    from xa_runtime.runtime.backends.tensorrt import TensorRTBackend
    from xa_runtime.export import build_graph_module, example_inputs, export_graphs, model_dims
    from xa_runtime.plugins.lora import LoraManager, load_lora
    from xa_runtime.testing import write_random_lora
    from xa_runtime.graphs import get_graph

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    bundle = _models(args.models, dtype)
    shapes = TINY_SHAPES if args.models == "tiny" else SHAPES
    result: dict = {"benchmark": "engines", "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
                    "git_commit": git_commit(), "device": device_info(torch.device("cuda")), "versions": versions(),
                    "models": args.models, "precision": args.precision, "graphs": {}}
    with tempfile.TemporaryDirectory(prefix="xa-bench-engines-") as tmp:
        onnx_dir, engine_dir = Path(tmp), Path(tmp) / "engines"
        engine_dir.mkdir()
        export_graphs(list(GRAPHS), bundle, onnx_dir, dtype if dtype != torch.bfloat16 else torch.float16,
                      progress=True)
        facts = build.tensorrt_facts()
        for name in GRAPHS:
            start = time.perf_counter()
            plan = build.build_engine(get_graph(name), onnx_dir / f"{name}.onnx", engine_dir, facts, args.precision,
                                      refit="refit", timing_cache=engine_dir / build.TIMING_CACHE)
            result["graphs"][name] = {"build_seconds": time.perf_counter() - start, "engine_bytes": plan.stat().st_size}
        backend = TensorRTBackend(engine_dir, onnx_dir, sdxl_mode="split")
        for name in GRAPHS:
            spec = get_graph(name)
            dims = {**model_dims(spec, bundle), **shapes["sd15" if name.startswith("sd15") else "sdxl"]}
            x = example_inputs(spec, dims, dtype, torch.device("cuda"))
            module = build_graph_module(spec, bundle).to("cuda")
            session = backend.sessions[name]
            trt_ms, trt_raw = _median_ms(lambda: session(*x), args.warmup, args.runs)
            torch_ms, torch_raw = _median_ms(lambda: module(*x), args.warmup, args.runs)
            result["graphs"][name].update(tensorrt_ms=trt_ms, torch_ms=torch_ms, speedup=torch_ms / trt_ms,
                                          raw_tensorrt_ms=trt_raw, raw_torch_ms=torch_raw)
        step = {k: sum(result["graphs"][g][k] for g in GRAPHS) for k in ("tensorrt_ms", "torch_ms")}
        result["stage2_step"] = {**step, "speedup": step["torch_ms"] / step["tensorrt_ms"]}
        switch = {}
        for label, seed in (("load", 0), ("switch", 1)):
            path = write_random_lora(Path(tmp) / f"lora{seed}.safetensors", bundle.sd15.unet, rank=args.rank, seed=seed)
            manager = LoraManager.for_branch(bundle.sd15, "unfused")
            manager.add("l", load_lora(path), 1.0)
            deltas = {k: v for k, v in manager.weight_deltas().items() if k.startswith("unet.")}
            manager.remove("l")
            torch.cuda.synchronize()
            start = time.perf_counter()
            counts = backend.set_lora_deltas(deltas, "sd15")
            torch.cuda.synchronize()
            switch[label] = {"seconds": time.perf_counter() - start, "weights": counts}
        start = time.perf_counter()
        backend.set_lora_deltas({}, "sd15")
        torch.cuda.synchronize()
        switch["unload"] = {"seconds": time.perf_counter() - start}
        result["lora_switch"] = switch
    print(f"{'graph':>10} {'build s':>8} {'MB':>8} {'TRT ms':>8} {'torch ms':>9} {'speed-up':>8}")
    for name, g in result["graphs"].items():
        print(f"{name:>10} {g['build_seconds']:>8.1f} {g['engine_bytes'] / 1e6:>8.1f} {g['tensorrt_ms']:>8.3f} "
              f"{g['torch_ms']:>9.3f} {g['speedup']:>7.2f}x")
    s = result["stage2_step"]
    print(f"{'step':>10} {'':>8} {'':>8} {s['tensorrt_ms']:>8.3f} {s['torch_ms']:>9.3f} {s['speedup']:>7.2f}x")
    print("LoRA: " + ", ".join(f"{k} {v['seconds']:.3f} s" for k, v in result["lora_switch"].items()))
    if args.output:
        write_atomic(Path(args.output), json.dumps(result, indent=1))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
