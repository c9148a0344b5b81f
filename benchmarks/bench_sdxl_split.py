"""The SDXL side of one stage-2 step on onnxruntime: split (mapping graph, then sdxl_unet)
against fused (sdxl_unet_fused, the mapping inside the SDXL UNet graph), in one run.

Per configuration (model widths, rows, SDXL latent size) both ways are exported from the
same seeded modules (fp32, default opset) and run on onnxruntime's CPU provider on the
same inputs: split feeds mapping's r0..r2 (host arrays, as OnnxRuntimeBackend passes
them) to sdxl_unet. Warm-up, then --runs rounds, each timing split and fused once,
alternating which goes first; medians. The fused output is checked against split first.
Prints a table and writes JSON (device, versions, command, raw samples).

    OMP_NUM_THREADS=1 python benchmarks/bench_sdxl_split.py --threads 1 \
        --output benchmarks/results/sdxl-split-vs-fused-cpu-<date>.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xa_runtime.bench.report import write_atomic  # noqa: E402
from xa_runtime.export.onnx_export import export_graph  # noqa: E402
from xa_runtime.export.wrappers import ModuleBundle, example_inputs, model_dims  # noqa: E402
from xa_runtime.graphs import GRAPHS  # noqa: E402

# label -> (model widths: "tiny" or "small", rows B, SDXL latent H = W)
CONFIGS = {
    "tiny-b2-32": ("tiny", 2, 32),  # tiny-sdxl, 256 px, CFG batch
    "tiny-b2-64": ("tiny", 2, 64),  # tiny-sdxl, 512 px
    "small-b2-64": ("small", 2, 64),  # SDXL topology at 1/5 of its widths (64/128/256), 512 px
}


def build_bundle(model: str, seed: int = 0) -> ModuleBundle:
    from xa_runtime.models.components import build_random_components
    from xa_runtime.models.mapping import MappingConfig, MappingLayers
    from xa_runtime.models.presets import _sd15_unet, _sdxl_unet, get_preset

    if model == "tiny":
        return ModuleBundle.tiny(seed)
    xl = dataclasses.replace(get_preset("tiny-sdxl"), name="small-sdxl",
                             unet=_sdxl_unet([64, 128, 256], 128, [2, 4, 8], [1, 1, 2], time_dim=8, pooled_dim=32,
                                             sample_size=32))
    sdxl = build_random_components(xl, seed + 1)
    sd15_unet = _sd15_unet([64, 128, 256, 256], cross_dim=64, heads=4, sample_size=16)
    torch.manual_seed(seed + 2)
    mapping = MappingLayers(MappingConfig.from_unet_configs(sd15_unet, sdxl.unet.config)).eval().requires_grad_(False)
    for p in mapping.zero_out.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return ModuleBundle(sdxl=sdxl, mapping=mapping)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench_config(label: str, model: str, rows: int, latent: int, args, tmp: Path) -> dict:
    bundle = build_bundle(model)
    names = ("mapping", "sdxl_unet", "sdxl_unet_fused")
    sessions = {}
    for n in names:
        path = tmp / f"{label}-{n}.onnx"
        export_graph(n, bundle, path, torch.float32)
        sessions[n] = _session(path, args.threads)
    fused_spec = GRAPHS["sdxl_unet_fused"]
    dims = {**model_dims(fused_spec, bundle), "B": rows, "H": latent, "W": latent, "T": 77}
    x = [t.numpy() for t in example_inputs(fused_spec, dims, torch.float32, torch.device("cpu"), seed=1)]
    x[-2] = np.full((1,), 0.8, np.float32)  # adapter_condition_scale
    feed = dict(zip(fused_spec.input_names, x))
    unet_names = GRAPHS["sdxl_unet"].input_names

    def split():
        r = sessions["mapping"].run(None, {k: feed[k] for k in ("f0", "f1", "f2")})
        unet_feed = {**{k: v for k, v in feed.items() if k in unet_names}, "r0": r[0], "r1": r[1], "r2": r[2]}
        return sessions["sdxl_unet"].run(None, unet_feed)[0]

    def fused():
        return sessions["sdxl_unet_fused"].run(None, feed)[0]

    a, b = split(), fused()
    max_diff = float(np.abs(a - b).max() / np.abs(a).max())
    for _ in range(args.warmup):
        split(), fused()
    samples: dict[str, list[float]] = {"split": [], "fused": []}
    for i in range(args.runs):
        order = (("split", split), ("fused", fused)) if i % 2 == 0 else (("fused", fused), ("split", split))
        for name, fn in order:
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    return {"config": label, "model": model, "B": rows, "H": latent, "W": latent, "split_ms": med["split"],
            "fused_ms": med["fused"], "fused_to_split": med["fused"] / med["split"],
            "split_min_ms": min(samples["split"]) * 1e3, "fused_min_ms": min(samples["fused"]) * 1e3,
            "max_rel_diff_fused_vs_split": max_diff,
            "raw_ms": {k: [s * 1e3 for s in v] for k, v in samples.items()}}


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated among {', '.join(CONFIGS)}")
    ap.add_argument("--date", help="date to record (default: today, UTC)")
    ap.add_argument("--output", help="JSON file to write")
    args = ap.parse_args(argv)
    try:
        import onnxruntime as ort
    except ImportError:
        print("error: bench_sdxl_split needs onnxruntime (pip install -e '.[export]')", file=sys.stderr)
        return 2
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs or not 1 <= args.runs <= 1000 or not 0 <= args.warmup <= 100 or args.threads < 1:
        print(f"error: --configs among {', '.join(CONFIGS)}; --runs 1..1000, --warmup 0..100, --threads >= 1",
              file=sys.stderr)
        return 2
    torch.set_flush_denormal(True)  # random tiny weights make denormals, which make CPU timings erratic
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in configs:
            r = bench_config(label, *CONFIGS[label], args, Path(tmp))
            rows.append(r)
            print(f"{label:<12} B={r['B']} {r['H']}x{r['W']}  split {r['split_ms']:8.2f} ms  fused {r['fused_ms']:8.2f} ms"
                  f"  fused/split {r['fused_to_split']:.3f}  (min {r['split_min_ms']:.2f} / {r['fused_min_ms']:.2f} ms;"
                  f" fused vs split max rel diff {r['max_rel_diff_fused_vs_split']:.1e})", flush=True)
    result = {"benchmark": "sdxl_split_vs_fused", "date": args.date or datetime.date.today().isoformat(),
              "device": "cpu", "processor": platform.processor() or platform.machine(), "provider": "CPUExecutionProvider",
              "threads": args.threads, "torch": torch.__version__, "onnxruntime": ort.__version__,
              "python": platform.python_version(), "command": " ".join(sys.argv), "warmup": args.warmup,
              "runs": args.runs, "rows": rows,
              "not_measured": "CUDA provider and TensorRT (no GPU on the machine that ran this)"}
    if args.output:
        write_atomic(Path(args.output), json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
