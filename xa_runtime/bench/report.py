"""What xa-bench writes: the environment block of the JSON, the terminal table, the Markdown
summary, and atomic file writes."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from ..atomic_files import write_all_or_nothing
from .components import BREAKDOWN
from .runner import P99_MIN_SAMPLES

SDXL_ALONE_GOAL = 1.45  # the lean runtime's goal: X-Adapter / SDXL alone


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write one file all or nothing (atomic_files.write_all_or_nothing)."""
    write_all_or_nothing({path: data.encode() if isinstance(data, str) else data})


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    return _run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent)


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, CUDA runtime and driver versions (nvidia-smi where present), capability, memory."""
    info: dict[str, Any] = {"type": device.type, "cuda_runtime": torch.version.cuda, "driver": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_bytes=props.total_memory)
        if shutil.which("nvidia-smi"):
            index = device.index if device.index is not None else torch.cuda.current_device()
            info["driver"] = _run(["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"])
    else:
        info.update(name=platform.processor() or platform.machine() or "cpu", cores=os.cpu_count())
    return info


def versions() -> dict[str, str | None]:
    import diffusers
    import transformers

    from .. import __version__

    out: dict[str, str | None] = {"xa_runtime": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                                  "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def _latency_lines(variants: dict[str, Any]) -> list[str]:
    lines = [f"{'variant':<11} {'median s':>9} {'p90 s':>8} {'p99 s':>8} {'min s':>8} {'x first':>8}  stage medians (s)"]
    for name, r in variants.items():
        stages = "  ".join(f"{k}={v['median']:.3f}" for k, v in r["stages"].items())
        t = r["total"]
        p99 = f"{t['p99']:8.3f}" if "p99" in t else f"{'-':>8}"  # from 100 samples on
        lines.append(f"{name:<11} {t['median']:9.3f} {t['p90']:8.3f} {p99} {t['min']:8.3f} "
                     f"{r['ratio_to_first']:8.3f}  {stages}")
    lines.append(f"(p99 from {P99_MIN_SAMPLES} runs on; spread: "
                 + ", ".join(f"{n} cv {r['total'].get('cv', 0):.1%}" for n, r in variants.items()) + ")")
    return lines


def _component_lines(variants: dict[str, Any]) -> list[str]:
    rows = [k for k in BREAKDOWN if any(k in r.get("parts", {}) for r in variants.values())]
    rows += sorted({k for r in variants.values() for k in r.get("parts", {}) if "/" not in k and k not in rows})
    lines = [f"{'component (median s)':<22}" + "".join(f"{n:>12}" for n in variants)]
    for k in rows:
        cells = "".join(f"{variants[n]['parts'][k]['median']:12.4f}" if k in variants[n].get("parts", {}) else f"{'-':>12}"
                        for n in variants)
        lines.append(f"{k:<22}{cells}")
    return lines


def _throughput_lines(variants: dict[str, Any]) -> list[str]:
    lines = []
    for name, r in variants.items():
        b = "  ".join(f"b{k}={v['images_per_s']:.3f}" for k, v in r.get("batches", {}).items())
        c = "  ".join(f"c{k}={v['images_per_s']:.3f}" for k, v in r.get("concurrency", {}).items())
        lines.append(f"{name:<11} images/s  batch: {b}" + (f"   concurrent: {c}" if c else ""))
    return lines


def table(result: dict[str, Any]) -> str:
    """The terminal table of any mode, with baselines and efficiency lines."""
    mode, variants = result["mode"], result["variants"]
    lines = _throughput_lines(variants) if mode == "throughput" else _latency_lines(variants)
    if mode == "components":
        lines += [""] + _component_lines(variants)
    base = result.get("baselines", {})
    if "sdxl-alone" in base:
        b = base["sdxl-alone"]
        lines.append(f"sdxl-alone  median {b['total']['median']:.3f} s; X-Adapter ({next(iter(variants))}) / SDXL alone = "
                     f"{b['xadapter_ratio']:.3f} (goal <= {SDXL_ALONE_GOAL})")
    if "mapping" in base:
        m = base["mapping"]
        lines.append(f"mapping     {m['median_seconds_per_call'] * 1e3:.3f} ms per call, "
                     f"{m['seconds_per_image']:.3f} s per image ({m['stage2_steps']} stage-2 steps)")
    eff = result.get("efficiency") or {}
    if eff.get("flops"):
        peak = eff.get("peak_tflops")
        lines.append(f"UNet+mapping work per image: {eff['flops']['total'] / 1e12:.4f} TFLOP"
                     + (f"; peak measured: {peak:.1f} TFLOP/s" if peak else ""))
        for s in ("stage1", "stage2"):
            if f"{s}_tflops" in eff:
                share = eff.get(f"{s}_share_of_peak")
                lines.append(f"  {s}: {eff[f'{s}_tflops']:.3g} TFLOP/s" + (f" ({share:.0%} of peak)" if share else ""))
    mem = result.get("memory") or {}
    if mem.get("peak_allocated_bytes"):
        lines.append(f"peak memory allocated: {mem['peak_allocated_bytes'] / 2**30:.2f} GiB")
    return "\n".join(lines)


def markdown(result: dict[str, Any], text_table: str, plots: list[Path], md_dir: Path) -> str:
    """The summary beside the JSON; plots linked relative to `md_dir`."""
    dev = result["device_info"]
    md = [f"# xa-bench {result['mode']}, {result['date'][:10]}", "",
          f"`{result['command']}`", "",
          f"- device: {result['device']} ({result['dtype']}), CUDA runtime {dev.get('cuda_runtime')}, driver {dev.get('driver')}",
          f"- models: {result['models']}; workload: {result['workload']}",
          f"- commit: {result['git_commit']}; torch {result['versions']['torch']}", "",
          "```", text_table, "```"]
    if result.get("warnings"):
        md += ["", "**Warning: large run-to-run spread**", ""] + [f"- {w}" for w in result["warnings"]]
    if result["mode"] == "throughput" and result.get("concurrency_note"):
        md += ["", f"Concurrency: {result['concurrency_note']}"]
    if plots:
        md += [""] + [f"![{Path(p).stem}]({Path(os.path.relpath(p, md_dir)).as_posix()})" for p in plots]
    return "\n".join(md) + "\n"
