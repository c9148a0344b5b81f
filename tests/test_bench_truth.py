"""A benchmark that tells the truth: p99 only from 100 samples on, a warning (with what to
do) when the run-to-run spread is over 10%, result files 0644, plots by default (and
--no-plots), throughput error bars, --threads applied to torch in xa-bench and xa-generate,
and a default thread count that does not oversubscribe a busy machine."""

import json
import os
import statistics

import pytest
import torch

from xa_runtime.bench import plots, report, runner
from xa_runtime.bench.schema import validation_errors
from xa_runtime.cli import vocabulary

FAST = ["--steps", "2", "--adapter-guidance-start", "1.0", "--runs", "2", "--warmup", "0", "--no-flops"]
BUSY = [28.2, 14.5, 48.0, 82.8, 3.4]  # issue 19: five runs on a busy 2-core machine, default threads
QUIET = [3.38, 3.41, 3.46, 3.40, 3.43]  # the same with one thread


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_p99_only_from_100_samples():
    assert "p99" not in runner.summarize(list(range(1, 100)))
    s = runner.summarize([float(i) for i in range(1, 101)])
    assert s["p99"] == 99.0 and s["p90"] == 90.0 and s["n"] == 100  # nearest rank
    five = runner.summarize(BUSY)
    assert "p99" not in five and five["median"] == 28.2
    assert five["cv"] == pytest.approx(statistics.stdev(BUSY) / statistics.fmean(BUSY), rel=1e-12)
    assert runner.summarize([2.0])["cv"] == 0.0


def test_spread_warning_on_synthetic_timings():
    busy = {"variants": {"eager": {"raw_seconds": BUSY}}}
    lines = runner.spread_warnings(busy)
    cv = statistics.stdev(BUSY) / statistics.fmean(BUSY)  # 0.88
    assert len(lines) == 1 and lines[0].startswith(f"eager: run-to-run spread {cv:.0%} (coefficient of variation > 10%")
    assert "--threads 1" in lines[0] and "--runs" in lines[0]
    assert runner.spread_warnings({"variants": {"eager": {"raw_seconds": QUIET}}}) == []
    # just over / under the 10% line
    over, under = [1.0, 1.0, 1.3], [1.0, 1.0, 1.15]
    assert statistics.stdev(over) / statistics.fmean(over) > 0.10 > statistics.stdev(under) / statistics.fmean(under)
    assert runner.spread_warnings({"variants": {"a": {"raw_seconds": over}}})
    assert not runner.spread_warnings({"variants": {"a": {"raw_seconds": under}}})
    tp = {"variants": {"eager": {"batches": {"2": {"raw_seconds": BUSY}},
                                 "concurrency": {"2": {"raw_request_seconds": [QUIET, QUIET]}}}}}
    assert [w.split(":")[0] for w in runner.spread_warnings(tp)] == ["eager batch 2"]


def test_schema_omits_p99_and_requires_cv():
    from xa_runtime.bench.schema import load_schema

    summary = load_schema()["$defs"]["summary"]
    assert "p99" not in summary["required"] and "cv" in summary["required"]
    assert validation_errors(runner.summarize(BUSY), {"$defs": load_schema()["$defs"], "$ref": "#/$defs/summary"}) == []


def test_schema_errors_name_the_path_and_the_fault():
    from xa_runtime.bench.schema import load_schema

    summary = {"$defs": load_schema()["$defs"], "$ref": "#/$defs/summary"}
    bad = {**runner.summarize(BUSY), "cv": "high"}
    del bad["median"]
    errors = validation_errors(bad, summary)
    assert any(e.startswith("$: ") and "'median' is a required property" in e for e in errors), errors
    assert any(e.startswith("$.cv: ") and "'high'" in e for e in errors), errors
    assert validation_errors({"mode": "nope"})[-1].startswith("$.mode: 'nope' is not one of"), validation_errors({"mode": "nope"})


def test_write_atomic_makes_0644(tmp_path):
    old = os.umask(0o022)
    try:
        report.write_atomic(tmp_path / "r.json", "{}")
        report.write_atomic(tmp_path / "r.png", b"x")
    finally:
        os.umask(old)
    assert oct((tmp_path / "r.json").stat().st_mode & 0o777) == "0o644"
    assert oct((tmp_path / "r.png").stat().st_mode & 0o777) == "0o644"


def test_throughput_spread_is_slowest_to_fastest():
    entry = {"images_per_s": 2 / 4.0, "median_seconds": 4.0, "raw_seconds": [2.0, 4.0, 8.0]}
    assert plots.throughput_spread(entry) == pytest.approx((2 / 8.0, 2 / 2.0))


def test_default_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert vocabulary.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (3.3, 2.6, 3.5))  # busy 2-core machine
    assert vocabulary.default_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert vocabulary.default_threads() == 4  # idle big machine: capped


@pytest.mark.parametrize("threads", [1, 2])
def test_bench_threads_and_default_plots(tmp_path, threads, capsys):
    pytest.importorskip("matplotlib")
    from xa_runtime.cli.bench import main

    out = tmp_path / "lat.json"
    assert main([*FAST, "--threads", str(threads), "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert validation_errors(data) == [] and data["threads"] == threads
    assert (tmp_path / "lat-latency.png").is_file() and data["plots"] == [str(tmp_path / "lat-latency.png")]
    for f in (out, out.with_suffix(".md"), tmp_path / "lat-latency.png"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_bench_no_plots(tmp_path):
    from xa_runtime.cli.bench import main

    out = tmp_path / "lat.json"
    assert main([*FAST, "--threads", "1", "--no-plots", "--output", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat.json", "lat.md"]
    assert "plots" not in json.loads(out.read_text())


def test_generate_threads_set_torch(tmp_path, monkeypatch):
    from xa_runtime.cli.generate import main
    from xa_runtime.pipeline import XAdapterPipeline

    seen = []
    real = XAdapterPipeline.generate

    def spy(self, *a, **kw):
        seen.append(torch.get_num_threads())
        return real(self, *a, **kw)

    monkeypatch.setattr(XAdapterPipeline, "generate", spy)
    out = tmp_path / "t.png"
    assert main(["--prompt", "x", "--steps", "2", "--no-progress", "--threads", "2", "--output", str(out)]) == 0
    assert seen == [2] and json.loads(out.with_suffix(".json").read_text())["threads"] == 2
    assert main(["--prompt", "x", "--threads", "0", "--output", str(out)]) == 2


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old
