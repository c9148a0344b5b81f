"""Host-side cost of a LoRA switch for TensorRT refit, on the full-size SD1.5 UNet (random
weights: the cost does not depend on the values), CPU only, in one run.

TensorRT is not needed: everything up to trt.Refitter is measured, i.e. computing what
EngineRefitter.apply feeds the refitter (engines/refit.py):

1. the full-size SD1.5 UNet (random weights, --dtype, fp16 by default) is exported as the
   sd15_unet graph alone to a temp folder (export_graph; external data when over ~1.8 GB),
   and loaded back with onnx.load (the base graph EngineRefitter keeps);
2. two random LoRAs A and B (kohya layout, --rank, the usual SD1.5 targets: attention
   to_q/k/v/out.0, proj_in/proj_out, ff.net.0.proj and ff.net.2; --locon adds the resnet
   convs and the down/upsampler convs) are added to a LoraManager ("unfused": the torch
   weights stay the base) and their weight deltas ("unet.*") taken;
3. timed, interleaved, --runs times (medians):
   plan_new   refit_plan(LoRA A) from the base: converts only the touched initializers;
   plan_old   the previous refit_plan: copy the whole ModelProto, apply_weight_deltas to the
              copy, read the touched initializers back;
   switch     A -> B: refit_plan(B), plan_changes(current=A, target=B), base_weights of the
              names to restore, contiguous arrays (what apply() hands to set_named_weights);
   unload     B -> base: plan_changes(current=B, {}), base_weights of the names to restore;
   and, once per run, plan_new split into its phases (check, read, merge).

The GPU side (trt.Refitter.refit_cuda_engine, host-to-device copies) is not measured.

    OMP_NUM_THREADS=1 python benchmarks/bench_lora_switch.py --runs 5 \\
        --output benchmarks/results/lora-switch-plan-sd15-cpu-<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xa_runtime.bench.report import versions, write_atomic  # noqa: E402
from xa_runtime.engines.refit import base_weights, plan_changes, refit_plan  # noqa: E402
from xa_runtime.export.onnx_export import DTYPES, export_graph  # noqa: E402
from xa_runtime.export.refit import RefitPlan, apply_weight_deltas, names_path, plan_weight_deltas, read_name_map  # noqa: E402
from xa_runtime.export.wrappers import ModuleBundle  # noqa: E402
from xa_runtime.models.components import build_random_components  # noqa: E402
from xa_runtime.models.presets import PRESETS  # noqa: E402
from xa_runtime.plugins.lora import LoraManager, parse_lora  # noqa: E402

GRAPH = "sd15_unet"
GOAL_S = 1.0  # the goal: a LoRA switch under one second (SD1.5 UNet, full size, changed weights only)
# The layers a typical SD1.5 kohya LoRA trains (diffusers module names), and the LoCon extras.
ATTN_TARGETS = r"(attn[12]\.to_(q|k|v|out\.0)|attentions\.\d+\.proj_(in|out)|ff\.net\.(0\.proj|2))$"
LOCON_TARGETS = r"|resnets\.\d+\.(conv1|conv2|conv_shortcut)$|(down|up)samplers\.0\.conv$"


def _rss_bytes() -> dict[str, int]:
    """Peak (ru_maxrss) and current (statm) resident set of this process, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    current = None
    try:
        current = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return {"peak": peak, "current": current}


def _random_lora(unet: torch.nn.Module, rank: int, seed: int, locon: bool, std: float = 0.05) -> dict[str, torch.Tensor]:
    """A kohya-layout LoRA state dict (lora_unet_*: lora_down / lora_up / alpha) for `unet`."""
    import re

    pattern = re.compile(ATTN_TARGETS + (LOCON_TARGETS if locon else ""))
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not pattern.search(name):
            continue
        shape = module.weight.shape
        stem = "lora_unet_" + name.replace(".", "_")
        state[f"{stem}.lora_down.weight"] = torch.randn(rank, *shape[1:], generator=g) * std
        state[f"{stem}.lora_up.weight"] = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * std
        state[f"{stem}.alpha"] = torch.tensor(float(rank))
    return state


def _deltas(components: Any, state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The "unet.*" weight deltas LoraManager gives for `state` alone (unfused: weights untouched)."""
    manager = LoraManager.for_branch(components, "unfused")
    unmatched = manager.add(name, parse_lora(state, None, name), 1.0)
    if unmatched:
        raise SystemExit(f"error: LoRA {name}: {len(unmatched)} layers match no module, e.g. {unmatched[:3]}")
    deltas = manager.weight_deltas()
    manager.clear()
    return deltas


def _old_refit_plan(base: Any, deltas: Any, name_map: Any) -> RefitPlan:
    """refit_plan before the touched-initializers-only change: a full copy of the graph."""
    from onnx import numpy_helper

    work = type(base)()
    work.CopyFrom(base)
    report = apply_weight_deltas(work, deltas, name_map)
    inits = {t.name: t for t in work.graph.initializer}
    skip = set(report.not_refittable)
    weights = {init: numpy_helper.to_array(inits[init]) for key, init in zip(report.applied, report.initializers)
               if key not in skip}
    report.model = None
    return RefitPlan(weights, report)


def _plan_parts(base: Any, deltas: Any, name_map: Any) -> dict[str, float]:
    """refit_plan(A) split into its phases (seconds, summed over the touched weights): check
    (plan_weight_deltas: name lookup, deltas to fp32 numpy), read (numpy_helper.to_array of the
    touched initializers), merge (export.refit.merged_value: read again, add in fp32, cast back)."""
    from onnx import numpy_helper

    from xa_runtime.export.refit import merged_value

    parts = dict.fromkeys(("check", "read", "merge"), 0.0)
    t0 = time.perf_counter()
    inits = {t.name: t for t in base.graph.initializer}
    _, planned = plan_weight_deltas(inits, deltas, name_map)
    parts["check"] = time.perf_counter() - t0
    for _, init, d in planned:
        t0 = time.perf_counter()
        numpy_helper.to_array(inits[init])
        t1 = time.perf_counter()
        merged_value(inits[init], d)
        parts["read"] += t1 - t0
        parts["merge"] += time.perf_counter() - t1
    return parts


def _feed(changed: dict[str, np.ndarray], restore_values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What EngineRefitter.apply hands to set_named_weights (contiguous arrays)."""
    return {n: np.ascontiguousarray(v) for n, v in {**changed, **restore_values}.items()}


def _nbytes(weights: dict[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in weights.values()))


def _stats(samples: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "samples_s": samples}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each step, interleaved (default 5)")
    ap.add_argument("--preset", default="sd15", help="model preset (default sd15, full size; tiny-sd15 for a smoke run)")
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES), help="export dtype (default fp16)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    ap.add_argument("--locon", action="store_true", help="also target the resnet and down/upsampler convs (LoCon)")
    ap.add_argument("--workdir", help="folder for the temporary export (default: the system temp folder)")
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="date recorded in the JSON")
    ap.add_argument("--output", help="JSON file to write")
    args = ap.parse_args(argv)
    if not 1 <= args.runs <= 100:
        print("error: --runs must be in 1..100", file=sys.stderr)
        return 2
    if not 1 <= args.rank <= 256:
        print("error: --rank must be in 1..256", file=sys.stderr)
        return 2
    if args.preset not in PRESETS or PRESETS[args.preset].family != "sd15":
        sd15 = [n for n, p in PRESETS.items() if p.family == "sd15"]
        print(f"error: --preset: {args.preset!r} is not an SD1.5 preset; one of {', '.join(sd15)}", file=sys.stderr)
        return 2
    if args.workdir and not Path(args.workdir).is_dir():
        print(f"error: --workdir: {args.workdir!r} is not an existing folder", file=sys.stderr)
        return 2
    if args.output and not Path(args.output).resolve().parent.is_dir():
        print(f"error: --output: the folder of {args.output!r} does not exist", file=sys.stderr)
        return 2
    try:
        datetime.date.fromisoformat(args.date)
    except ValueError:
        print(f"error: --date: {args.date!r} is not a YYYY-MM-DD date", file=sys.stderr)
        return 2
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        print("error: bench_lora_switch needs onnx and onnxruntime (pip install -e '.[export]')", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    torch.set_grad_enabled(False)
    rss: dict[str, Any] = {}
    timings: dict[str, Any] = {}

    start = time.perf_counter()
    components = build_random_components(args.preset, 0, dtype=dtype)
    timings["build_model_s"] = time.perf_counter() - start
    n_params = sum(p.numel() for p in components.unet.parameters())
    print(f"{args.preset} UNet: {n_params / 1e6:.1f} M parameters, {args.dtype}, built in {timings['build_model_s']:.1f} s",
          flush=True)
    del components.vae  # only the UNet is exported; LoraManager also holds the text encoder (not targeted)
    components.vae = None
    gc.collect()
    rss["after_build"] = _rss_bytes()

    with tempfile.TemporaryDirectory(prefix="bench-lora-switch-", dir=args.workdir) as tmp:
        path = Path(tmp) / f"{GRAPH}.onnx"
        start = time.perf_counter()
        try:
            export_graph(GRAPH, ModuleBundle(sd15=components), path, dtype)
        except MemoryError:
            print(f"error: the {args.preset} UNet export ran out of memory; try --preset tiny-sd15", file=sys.stderr)
            return 1
        timings["export_s"] = time.perf_counter() - start
        external = path.with_name(path.name + ".data").exists()
        files = sorted(Path(tmp).glob(f"{GRAPH}.*"))
        file_bytes = sum(p.stat().st_size for p in files)
        print(f"export {GRAPH}: {timings['export_s']:.1f} s, {file_bytes / 2**20:.0f} MiB "
              f"({'external data' if external else 'one file'})", flush=True)
        gc.collect()
        rss["after_export"] = _rss_bytes()

        load_samples = []
        base = None
        for _ in range(min(args.runs, 3)):
            base = None
            gc.collect()
            start = time.perf_counter()
            base = onnx.load(str(path))
            load_samples.append(time.perf_counter() - start)
        assert base is not None
        name_map = read_name_map(names_path(path))
        meta = {p.key: p.value for p in base.metadata_props}
        n_inits = len(base.graph.initializer)
        graph_bytes = sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                          for t in base.graph.initializer)
        refittable = [n for n, e in name_map["initializers"].items() if e["refittable"]]
        print(f"onnx.load: {statistics.median(load_samples):.2f} s; {n_inits} initializers, "
              f"{graph_bytes / 2**20:.0f} MiB; {len(refittable)} refittable", flush=True)
        rss["after_load"] = _rss_bytes()

        start = time.perf_counter()
        lora_a = _random_lora(components.unet, args.rank, 1, args.locon)
        lora_b = _random_lora(components.unet, args.rank, 2, args.locon)
        deltas_a = _deltas(components, lora_a, "A")
        deltas_b = _deltas(components, lora_b, "B")
        timings["lora_deltas_s"] = time.perf_counter() - start
        lora_layers = len(deltas_a)
        lora_file_bytes = sum(t.numel() * 2 for t in lora_a.values())  # as an fp16 file would hold them
        del lora_a, lora_b
        print(f"LoRAs: rank {args.rank}, {lora_layers} layers each ({lora_file_bytes / 2**20:.1f} MiB in fp16); "
              f"deltas in {timings['lora_deltas_s']:.1f} s", flush=True)

        # One untimed pass: checks, and the sizes the table reports.
        plan_a = refit_plan(path, deltas_a, name_map, base)
        old_a = _old_refit_plan(base, deltas_a, name_map)
        if plan_a.weights.keys() != old_a.weights.keys() or not all(
                np.array_equal(plan_a.weights[n], old_a.weights[n]) for n in plan_a.weights):
            print("error: the new and the old refit_plan disagree", file=sys.stderr)
            return 1
        del old_a
        plan_b = refit_plan(path, deltas_b, name_map, base)
        changed, restore = plan_changes(plan_a.weights, plan_b.weights)
        switch_feed = _feed(changed, base_weights(base, restore))
        unload_changed, unload_restore = plan_changes(plan_b.weights, {})
        unload_feed = _feed(unload_changed, base_weights(base, unload_restore))
        report = plan_a.report
        counts = {
            "lora_layers": lora_layers, "applied": len(report.applied), "unmapped": len(report.unmapped),
            "shared": len(report.shared), "not_refittable": len(report.not_refittable),
            "plan_weights": len(plan_a.weights), "plan_bytes": _nbytes(plan_a.weights),
            "switch_feed_weights": len(switch_feed), "switch_feed_bytes": _nbytes(switch_feed),
            "switch_restore_weights": len(restore),
            "unload_feed_weights": len(unload_feed), "unload_feed_bytes": _nbytes(unload_feed),
        }
        print(f"plan: {report.summary()}; {counts['plan_weights']} engine weights, {counts['plan_bytes'] / 2**20:.1f} MiB",
              flush=True)
        del changed, restore, switch_feed, unload_changed, unload_restore, unload_feed, plan_b
        gc.collect()

        def step_plan_new() -> None:
            refit_plan(path, deltas_a, name_map, base)

        def step_plan_old() -> None:
            _old_refit_plan(base, deltas_a, name_map)

        def step_switch() -> None:
            plan = refit_plan(path, deltas_b, name_map, base)
            changed, restore = plan_changes(plan_a.weights, plan.weights)
            _feed(changed, base_weights(base, restore))

        current_b = refit_plan(path, deltas_b, name_map, base).weights

        def step_unload() -> None:
            changed, restore = plan_changes(current_b, {})
            _feed(changed, base_weights(base, restore))

        steps: dict[str, Callable[[], None]] = {"plan_new": step_plan_new, "plan_old": step_plan_old,
                                               "switch": step_switch, "unload": step_unload}
        samples: dict[str, list[float]] = {k: [] for k in steps}
        order = list(steps)
        parts: dict[str, list[float]] = {}
        for run in range(args.runs):
            for k in order[run % len(order):] + order[:run % len(order)]:  # rotate: no step always first
                gc.collect()
                start = time.perf_counter()
                steps[k]()
                samples[k].append(time.perf_counter() - start)
            gc.collect()
            for k, v in _plan_parts(base, deltas_a, name_map).items():
                parts.setdefault(k, []).append(v)
            print(f"run {run + 1}/{args.runs}: " + "  ".join(f"{k} {samples[k][-1]:.3f} s" for k in order), flush=True)
        rss["after_timing"] = _rss_bytes()

    results = {k: _stats(v) for k, v in samples.items()}
    results["onnx_load"] = _stats(load_samples)
    results["plan_new_parts"] = {k: _stats(v) for k, v in parts.items()}
    speedup = results["plan_old"]["median_s"] / results["plan_new"]["median_s"]
    rows = [
        ("onnx.load (base graph, once per engine)", results["onnx_load"], None, None),
        ("plan_new: refit_plan(A) from base", results["plan_new"], counts["plan_weights"], counts["plan_bytes"]),
        ("plan_old: copy graph + apply_weight_deltas", results["plan_old"], counts["plan_weights"], counts["plan_bytes"]),
        ("switch A->B: plan + plan_changes + feed", results["switch"], counts["switch_feed_weights"],
         counts["switch_feed_bytes"]),
        ("unload B: base_weights of restored names", results["unload"], counts["unload_feed_weights"],
         counts["unload_feed_bytes"]),
    ]
    lines = [f"{'step':<44} {'median s':>9} {'min s':>8} {'max s':>8} {'weights':>8} {'MiB':>8}"]
    for label, r, n, b in rows:
        lines.append(f"{label:<44} {r['median_s']:9.3f} {r['min_s']:8.3f} {r['max_s']:8.3f} "
                     f"{'-' if n is None else n:>8} {'-' if b is None else f'{b / 2**20:.1f}':>8}")
    lines.append("plan_new phases (median s, summed over the weights): "
                 + "  ".join(f"{k} {v['median_s']:.3f}" for k, v in results["plan_new_parts"].items()))
    lines.append(f"new plan vs old: x{speedup:.1f} faster; switch host-side {results['switch']['median_s']:.3f} s "
                 f"(goal for the whole switch incl. GPU refit: < {GOAL_S:.0f} s)")
    lines.append(f"export {timings['export_s']:.1f} s; peak RSS {rss['after_timing']['peak'] / 2**30:.2f} GiB "
                 f"(export phase {rss['after_export']['peak'] / 2**30:.2f} GiB)")
    print("\n" + "\n".join(lines))

    result = {
        "benchmark": "lora-switch-plan", "date": args.date,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": "cpu", "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": {**versions(), "onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "scope": "host side only: computing the refit plan (what EngineRefitter.apply feeds trt.Refitter); "
                 "the TensorRT refit and host-to-device copies are not measured (no TensorRT on this machine)",
        "goal": f"LoRA switch < {GOAL_S} s for the SD1.5 UNet at full size, changed weights only",
        "model": {"preset": args.preset, "weights": "random", "graph": GRAPH, "dtype": args.dtype,
                  "unet_parameters": n_params, "initializers": n_inits, "initializer_bytes": graph_bytes,
                  "refittable_initializers": len(refittable), "onnx_file_bytes": file_bytes,
                  "external_data": external, "constant_folding": meta.get("xa_runtime.constant_folding")},
        "lora": {"format": "kohya (lora_down/lora_up/alpha), random N(0, 0.05)", "rank": args.rank, "alpha": args.rank,
                 "targets": ATTN_TARGETS + (LOCON_TARGETS if args.locon else ""), "layers": lora_layers,
                 "file_bytes_fp16": lora_file_bytes, "deltas_via": "LoraManager.for_branch(unfused).weight_deltas()"},
        "counts": counts, "timings": timings, "runs": args.runs, "results": results,
        "plan_old_over_new": speedup, "rss_bytes": rss, "table": lines,
    }
    if args.output:
        write_atomic(Path(args.output), json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
