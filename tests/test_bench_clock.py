"""Ratios and per-component sums computed from recorded samples, on a fake clock: every
read of the host clock advances it by a fixed step that differs per variant, so each
timed interval is an exact multiple of that step and the ratios are exact."""

from types import SimpleNamespace

import pytest

from xa_runtime.bench import SuiteOptions, Workload, run_latency, run_suite
from xa_runtime.bench.components import timed_components
from xa_runtime.bench.throughput import run_batches
from xa_runtime.pipeline import XAdapterPipeline
from xa_runtime.runtime import timing

WORKLOAD = Workload(steps=2, adapter_guidance_start=1.0)  # 2 stage-1 and 2 stage-2 steps


class FakeClock:
    def __init__(self):
        self.t, self.step = 0.0, 1.0

    def perf_counter(self) -> float:
        self.t += self.step
        return self.t


class Paced:
    """A pipeline whose runs tick the fake clock by `step` per read."""

    def __init__(self, pipe, clock, step):
        self.pipe, self.clock, self.step = pipe, clock, step

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, params):
        self.clock.step = self.step
        return self.pipe.generate(params)


@pytest.fixture
def paced(tiny_models, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    pipe = XAdapterPipeline(*tiny_models, progress=False)
    return {"a": Paced(pipe, clock, 1.0), "b": Paced(pipe, clock, 2.5)}


def test_latency_ratios_from_samples(paced):
    r = run_latency(paced, WORKLOAD, warmup=0, runs=3)
    # 5 stages, each one clock step long (the timer reads the clock at both ends)
    assert r["a"]["raw_seconds"] == [5.0] * 3 and r["b"]["raw_seconds"] == [12.5] * 3
    assert r["a"]["ratio_to_first"] == 1.0 and r["b"]["ratio_to_first"] == 2.5
    assert r["b"]["stages"]["stage2"]["median"] == 2.5


def test_component_times_are_sums_of_calls(paced):
    r = run_latency(paced, WORKLOAD, warmup=0, runs=2, observe=timed_components)
    for name, step in (("a", 1.0), ("b", 2.5)):
        parts = r[name]["parts"]
        # one step per call: 2 UNet calls per stage, 9 blocks + 3 zero_out convs per mapping call,
        # scale_model_input + step per branch per step
        assert parts["stage1/sd15_unet"]["median"] == 2 * step
        assert parts["stage2/sd15_unet"]["median"] == 2 * step
        assert parts["stage2/sdxl_unet"]["median"] == 2 * step
        assert parts["stage2/mapping"]["median"] == 2 * 12 * step
        assert parts["stage2/scheduler"]["median"] == 2 * 4 * step
        assert parts["vae_decode/sdxl_vae_decode"]["median"] == step
        split = sum(parts[f"stage2/{p}"]["median"] for p in ("sd15_unet", "mapping", "sdxl_unet", "scheduler", "other"))
        assert split == r[name]["stages"]["stage2"]["median"]
    assert r["b"]["ratio_to_first"] == 2.5
    assert r["b"]["parts"]["stage2/mapping"]["median"] / r["a"]["parts"]["stage2/mapping"]["median"] == 2.5


def test_sdxl_alone_ratio(paced):
    result = run_suite({"a": paced["a"]}, WORKLOAD, SuiteOptions(warmup=0, runs=2, baselines=["sdxl-alone"], flops=False),
                       models="tiny", dtype_name="fp32", command="test")
    base = result["baselines"]["sdxl-alone"]
    # SDXL alone times 3 stages (text_encoders, denoise, vae_decode) at the clock's current step
    assert base["raw_seconds"] == [3.0, 3.0]
    assert base["xadapter_ratio"] == 5.0 / 3.0


def test_throughput_images_per_second(paced):
    r = run_batches(paced, WORKLOAD, [1, 2], warmup=0, runs=2)
    # around each request: the start and end reads plus the pipeline's 10 stage reads
    assert r["a"]["2"]["raw_seconds"] == [11.0, 11.0]
    assert r["a"]["2"]["images_per_s"] == 2 / 11.0
    assert r["a"]["1"]["images_per_s"] / r["b"]["1"]["images_per_s"] == 2.5
