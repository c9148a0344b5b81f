"""Export time per graph and latency per graph on onnxruntime vs the PyTorch module, on
the tiny models (CPU), in one run.

Each graph of the table is exported from the tiny models (fp32, default opset), then run
on onnxruntime's CPU provider and as the PyTorch wrapper module on the same seeded inputs
at the trace shapes: warm-up, then --runs timed calls; medians. Prints a table and writes
JSON (device, versions, command, date, raw samples).

    python benchmarks/bench_export.py --output benchmarks/results/export-tiny-cpu-<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xa_runtime.bench.report import write_atomic  # noqa: E402
from xa_runtime.export.onnx_export import available_graphs, export_graph, trace_dims  # noqa: E402
from xa_runtime.export.wrappers import ModuleBundle, build_graph_module, example_inputs  # noqa: E402
from xa_runtime.graphs import GRAPHS  # noqa: E402


def _median_seconds(fn, warmup: int, runs: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--graphs", default="", help="comma-separated subset of the table (default: all the tiny models have)")
    ap.add_argument("--output", help="JSON file to write")
    args = ap.parse_args(argv)
    try:
        import onnxruntime as ort
    except ImportError:
        print("error: bench_export needs onnxruntime (pip install -e '.[export]')", file=sys.stderr)
        return 2
    if not 1 <= args.runs <= 1000 or not 0 <= args.warmup <= 100:
        print("error: --runs must be in 1..1000 and --warmup in 0..100", file=sys.stderr)
        return 2
    torch.set_flush_denormal(True)  # random tiny weights make denormals, which make CPU timings erratic
    bundle = ModuleBundle.tiny(0)
    names = [n.strip() for n in args.graphs.split(",") if n.strip()] or available_graphs(bundle)
    unknown = [n for n in names if n not in GRAPHS]
    if unknown:
        print(f"error: --graphs: unknown graph {unknown[0]!r}; one of {', '.join(GRAPHS)}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            spec = GRAPHS[name]
            path = Path(tmp) / f"{name}.onnx"
            start = time.perf_counter()
            export_graph(name, bundle, path, torch.float32)
            export_s = time.perf_counter() - start
            dims = trace_dims(spec, bundle)
            inputs = example_inputs(spec, dims, torch.float32, torch.device("cpu"))
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {n: x.numpy() for n, x in zip(spec.input_names, inputs)}
            module = build_graph_module(spec, bundle).eval()
            ort_s, ort_samples = _median_seconds(lambda: session.run(None, feed), args.warmup, args.runs)
            torch_s, torch_samples = _median_seconds(lambda: module(*inputs), args.warmup, args.runs)
            size = sum(p.stat().st_size for p in Path(tmp).glob(f"{name}.onnx*"))
            rows.append({"graph": name, "export_s": export_s, "file_mb": size / 2**20, "onnxruntime_ms": ort_s * 1e3,
                         "torch_ms": torch_s * 1e3, "ratio_ort_to_torch": ort_s / torch_s,
                         "onnxruntime_min_ms": min(ort_samples) * 1e3, "torch_min_ms": min(torch_samples) * 1e3,
                         "trace_dims": {k: dims[k] for k in ("B", "H", "W", "T")},
                         "raw_ms": {"onnxruntime": [s * 1e3 for s in ort_samples],
                                    "torch": [s * 1e3 for s in torch_samples]}})
            r = rows[-1]
            print(f"{name:<22} export {r['export_s']:6.2f} s  {r['file_mb']:6.1f} MB  onnxruntime {r['onnxruntime_ms']:8.2f} ms"
                  f"  torch {r['torch_ms']:8.2f} ms  x{r['ratio_ort_to_torch']:.2f}  (min {r['onnxruntime_min_ms']:.2f} / "
                  f"{r['torch_min_ms']:.2f} ms)", flush=True)
    result = {"benchmark": "export", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": platform.processor() or "cpu", "threads": torch.get_num_threads(), "models": "tiny",
              "torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version(),
              "command": " ".join(sys.argv), "warmup": args.warmup, "runs": args.runs, "rows": rows}
    if args.output:
        write_atomic(Path(args.output), json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
