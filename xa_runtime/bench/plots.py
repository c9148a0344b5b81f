"""PNG plots of an xa-bench result: latency per variant, component breakdown, throughput.

matplotlib is optional (the `bench` extra) and imported only here, when plots are asked for.
"""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Any

from .components import BREAKDOWN
from .report import write_atomic

PACKAGE = "matplotlib"


def matplotlib_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec(PACKAGE) is None


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # checked before loading models in the CLI; this is for library callers
        raise ImportError(f"plots need the package {PACKAGE}: pip install 'xa-runtime[bench]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_atomic(path, buf.getvalue())
    return path


def _title(result: dict[str, Any], what: str) -> str:
    return f"xa-bench {what}: {result['models']} models, {result['device']} {result['dtype']}"


def latency_plot(result: dict[str, Any], path: Path) -> Path:
    """Box plot of the raw total seconds per variant (and the SDXL-alone baseline)."""
    plt = _pyplot()
    series = {n: r["raw_seconds"] for n, r in result["variants"].items()}
    if "sdxl-alone" in result.get("baselines", {}):
        series["sdxl-alone"] = result["baselines"]["sdxl-alone"]["raw_seconds"]
    fig, ax = plt.subplots(figsize=(1.6 * len(series) + 3, 4))
    ax.boxplot(list(series.values()), tick_labels=list(series), showfliers=True)
    for i, s in enumerate(series.values(), start=1):
        ax.scatter([i] * len(s), s, s=8, alpha=0.5)
    ax.set_ylabel("seconds per generation")
    ax.set_title(_title(result, "latency"))
    ax.set_ylim(bottom=0)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def components_plot(result: dict[str, Any], path: Path) -> Path:
    """Stacked bars of the median component times per variant (rows of BREAKDOWN)."""
    plt = _pyplot()
    names = list(result["variants"])
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 5, 4.5))
    bottom = [0.0] * len(names)
    extra = sorted({k for r in result["variants"].values() for k in r.get("parts", {}) if "/" not in k} - set(BREAKDOWN))
    for key in list(BREAKDOWN) + extra:
        values = [max(0.0, result["variants"][n].get("parts", {}).get(key, {}).get("median", 0.0)) for n in names]
        if not any(values):
            continue
        ax.bar(names, values, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds per generation (medians)")
    ax.set_title(_title(result, "components"))
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def throughput_spread(entry: dict[str, Any]) -> tuple[float, float]:
    """(low, high) images/s of one throughput point over its runs: the images/s its slowest and
    fastest run would give (a batch point: batch / each run's seconds; a concurrency point:
    its images/s scaled by median / slowest and median / fastest request)."""
    ips = entry["images_per_s"]
    raw = entry.get("raw_seconds") or [x for row in entry.get("raw_request_seconds", []) for x in row]
    if not raw or min(raw) <= 0:
        return ips, ips
    med = entry.get("median_seconds") or entry.get("request_seconds") or statistics.median(raw)
    return ips * med / max(raw), ips * med / min(raw)


def throughput_plot(result: dict[str, Any], path: Path) -> Path:
    """Images/s against batch size, and against concurrent requests, one line per variant,
    with error bars from the slowest to the fastest run (throughput_spread)."""
    plt = _pyplot()
    fig, (ax_b, ax_c) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in result["variants"].items():
        for ax, key in ((ax_b, "batches"), (ax_c, "concurrency")):
            points = sorted((int(k), v) for k, v in r.get(key, {}).items())
            if points:
                xs = [x for x, _ in points]
                ys = [v["images_per_s"] for _, v in points]
                spread = [throughput_spread(v) for _, v in points]
                yerr = [[y - lo for y, (lo, _) in zip(ys, spread)], [hi - y for y, (_, hi) in zip(ys, spread)]]
                ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=4, label=f"{name} (bars: slowest-fastest run)")
    for ax, label in ((ax_b, "batch size"), (ax_c, "concurrent requests (threads)")):
        ax.set_xlabel(label)
        ax.set_ylabel("images / s")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
    fig.suptitle(_title(result, "throughput"))
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def write_plots(result: dict[str, Any], folder: Path, stem: str = "xa-bench") -> list[Path]:
    """The plots that this result's mode has data for: `stem-latency.png`, `stem-throughput.png`,
    or `stem-components.png` and `stem-components-latency.png` (so modes never share a name)."""
    folder.mkdir(parents=True, exist_ok=True)
    mode = result["mode"]
    if mode == "throughput":
        return [throughput_plot(result, folder / f"{stem}-throughput.png")]
    if mode == "components":
        return [components_plot(result, folder / f"{stem}-components.png"),
                latency_plot(result, folder / f"{stem}-components-latency.png")]
    return [latency_plot(result, folder / f"{stem}-latency.png")]
