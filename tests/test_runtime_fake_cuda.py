"""The lean runtime's GPU-only code paths (two-stream stage 2, CUDA graph capture and
replay) run on CPU tensors with tests/fake_cuda.py standing in for torch.cuda.

This is not a GPU test (tests/test_runtime_lean.py has those, marked `gpu`): it checks
the Python around the GPU calls, the replay semantics (static inputs and outputs, what is
baked in, when a graph is recaptured), that nothing inside a captured step reads device
memory on the host, and that the overlapped scheduler hands the right buffers over.
"""

from __future__ import annotations

import pytest
import torch

from fake_cuda import FakeCuda
from xa_runtime.pipeline import XAdapterPipeline
from xa_runtime.plugins.controlnet import ControlNetPlugin, build_tiny_controlnet
from xa_runtime.runtime import GraphCache, Stage2Scheduler
from xa_runtime.runtime.stage2 import RING_DEPTH

# 4 of 6 steps in stage 2: more than RING_DEPTH, so the feature slots are reused
GEN = dict(num_inference_steps=6, adapter_guidance_start=0.67, seed=3, output_type="latent")


@pytest.fixture
def fake_cuda(monkeypatch):
    return FakeCuda(monkeypatch)


def test_graph_cache_replays_with_new_inputs_and_recaptures_on_a_new_key(fake_cuda):
    calls = []

    def step(x, scale):
        calls.append(1)
        return (torch.relu(x * scale + 1.0), x.sum(dim=1))

    cache = GraphCache(max_graphs=2)
    x = torch.randn(2, 3)
    out = cache.run("step", step, (x, 2.0))
    assert cache.captures == 1 and len(calls) == 3  # two warm-up calls, then the capture
    torch.testing.assert_close(out[0], torch.relu(x * 2.0 + 1.0), rtol=0, atol=0)

    y = torch.randn(2, 3)
    again = cache.run("step", step, (y, 2.0))
    assert cache.captures == 1 and len(calls) == 3  # replayed: Python not run again
    assert again[0] is out[0]  # the static output, rewritten by the replay
    torch.testing.assert_close(again[0], torch.relu(y * 2.0 + 1.0), rtol=0, atol=0)
    torch.testing.assert_close(again[1], y.sum(dim=1), rtol=0, atol=0)

    cache.run("step", step, (y, 3.0))  # a baked constant changed
    cache.run("step", step, (torch.randn(4, 3), 2.0))  # a shape changed
    assert cache.captures == 3 and len(cache) == 2  # least recently used dropped
    cache.run("step", step, (x, 2.0))  # ... which was the first graph: captured again
    assert cache.captures == 4


def test_a_host_read_inside_a_captured_step_fails(fake_cuda):
    def step(x):
        return x * float(x.max())  # .item(): a host synchronisation a real capture refuses

    with pytest.raises(AssertionError, match="host read"):
        GraphCache().run("step", step, (torch.randn(3),))


def test_overlapped_scheduler_hands_ring_buffers_over_in_order(fake_cuda):
    sched = Stage2Scheduler("cuda", streams=True)  # torch.cuda is the stand-in here
    assert sched.overlap
    order, seen = [], []

    def sd15_step(i, t):
        order.append(("sd15", i))
        return tuple(torch.full((2, c), float(i)) for c in (1, 2, 3))

    def sdxl_step(i, t, feats):
        order.append(("sdxl", i))
        seen.append([f.data_ptr() for f in feats])
        assert all(torch.equal(f, torch.full_like(f, float(i))) for f in feats)  # step i's features

    with fake_cuda.race_check():  # every buffer hand-over ordered by an event
        sched.run([torch.tensor(t) for t in (900, 800, 700, 600, 500)], sd15_step, sdxl_step,
                  lambda i: order.append(("done", i)))
    assert [o for o in order if o[0] != "done"] == [(k, i) for i in range(5) for k in ("sd15", "sdxl")]
    assert [o for o in order if o[0] == "done"] == [("done", i) for i in range(5)]
    # RING_DEPTH slots, each allocated once and reused every RING_DEPTH steps
    assert len({tuple(p) for p in seen}) == RING_DEPTH and seen[0] == seen[RING_DEPTH]


def _toy_steps(state):
    def sd15_step(i, t):
        state["x15"] = state["x15"] * 0.9 + 1.0  # the SD1.5 chain, on its own stream
        return (state["x15"] * 2.0, state["x15"] + 1.0)

    def sdxl_step(i, t, feats):
        state["xxl"] = state["xxl"] + feats[0].mean() + feats[1].mean()

    return sd15_step, sdxl_step


@pytest.mark.parametrize("broken", ["ready", "free"])
def test_race_check_catches_a_missing_hand_over_wait(fake_cuda, monkeypatch, broken):
    # Drop one of the two waits of the overlapped loop: slot filled (ready), slot read (free).
    real_wait = type(fake_cuda.default).wait_event
    sched = Stage2Scheduler("cuda", streams=True)
    skip = sched.sdxl_stream if broken == "ready" else sched.sd15_stream
    monkeypatch.setattr(type(fake_cuda.default), "wait_event",
                        lambda self, event: None if self is skip else real_wait(self, event))
    state = {"x15": torch.zeros(4), "xxl": torch.zeros(4)}
    with pytest.raises(AssertionError, match="not ordered after"), fake_cuda.race_check():
        sched.run([torch.tensor(t) for t in range(5)], *_toy_steps(state))


def test_race_check_passes_the_real_loop(fake_cuda):
    state = {"x15": torch.zeros(4), "xxl": torch.zeros(4)}
    with fake_cuda.race_check():
        Stage2Scheduler("cuda", streams=True).run([torch.tensor(t) for t in range(5)], *_toy_steps(state))
        final = state["xxl"] + 0  # read on the caller's stream after run(): ordered by its wait_stream
    want = {"x15": torch.zeros(4), "xxl": torch.zeros(4)}
    Stage2Scheduler("cpu", streams=False).run([torch.tensor(t) for t in range(5)], *_toy_steps(want))
    assert torch.equal(final, want["xxl"])


@pytest.fixture(scope="module")
def models():
    from xa_runtime.models.tiny import build_tiny_models

    return build_tiny_models(0)


@pytest.fixture(scope="module")
def plain(models):
    return XAdapterPipeline(*models, progress=False)


def _lean(models, fake_cuda, streams=True, graphs=True):
    pipe = XAdapterPipeline(*models, progress=False)
    if streams:
        pipe.stage2_scheduler = Stage2Scheduler("cuda", streams=True)
    if graphs:
        pipe.executor.graphs = GraphCache()
    return pipe


@pytest.mark.parametrize("streams, graphs", [(True, False), (False, True), (True, True)],
                         ids=["streams", "graphs", "streams+graphs"])
@pytest.mark.parametrize("case", [dict(scheduler="dpmpp-2m"),
                                  dict(scheduler="euler-a", fusion_guidance_scale=0.5, adapter_condition_scale=1.3),
                                  dict(scheduler="ddim", num_images_per_prompt=2, guidance_scale=1.0)],
                         ids=["dpm-cfg", "euler-a-fusion", "ddim-batch2-nocfg"])
def test_pipeline_streams_and_graphs_equal_the_plain_pipeline_exactly(models, plain, fake_cuda, streams, graphs, case):
    pipe = _lean(models, fake_cuda, streams, graphs)
    calls, want_calls = [], []
    with fake_cuda.race_check():  # the two streams' accesses, ops replayed from graphs included
        got = pipe("a cat", step_callback=lambda *a: calls.append(a), **(GEN | case)).images
    want = plain("a cat", step_callback=lambda *a: want_calls.append(a), **(GEN | case)).images
    assert torch.equal(got, want)
    assert calls == want_calls
    if graphs:
        assert pipe.executor.graphs.captures == 2  # the SD1.5 step (both stages) and mapping + SDXL
        assert sum(g.replays for g in fake_cuda.graphs) > 0


def test_graphs_replay_across_requests_recapture_on_new_shapes_and_controlnet(models, plain, fake_cuda):
    pipe = _lean(models, fake_cuda)
    pipe("a cat", **GEN)
    second = pipe("a dog", **(GEN | dict(seed=9))).images  # new values, same shapes: replayed
    assert pipe.executor.graphs.captures == 2
    assert torch.equal(second, plain("a dog", **(GEN | dict(seed=9))).images)  # nothing left from request 1
    # A larger square SDXL size: the SD1.5 size (following the SDXL aspect) stays 64x64
    larger = pipe("a dog", **(GEN | dict(height=160, width=160))).images
    assert pipe.executor.graphs.captures == 3  # the SDXL size changed; the SD1.5 step keeps its graph
    assert torch.equal(larger, plain("a dog", **(GEN | dict(height=160, width=160))).images)

    controlnet = build_tiny_controlnet(models[0].unet, seed=0)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plugin = [ControlNetPlugin(controlnet, image, conditioning_scale=0.8)]
    with_cn = pipe("a cat", plugins=plugin, **GEN).images  # other step inputs: new graphs
    assert torch.equal(with_cn, plain("a cat", plugins=plugin, **GEN).images)
    assert pipe.executor.graphs.captures > 3


def test_lora_switches_between_requests_reach_the_captured_graphs(models, plain, fake_cuda, tmp_path):
    from runtime_checks import assert_lora_switches_reach
    from xa_runtime.testing import write_random_lora

    lean = _lean(models, fake_cuda)
    path = write_random_lora(tmp_path / "style.safetensors", models[0].unet, std=0.3)
    assert_lora_switches_reach(lean, plain, models[0], path, GEN, lean("a cat", **GEN).images)


def test_a_replay_refuses_tensors_moved_since_capture(fake_cuda):
    w = torch.randn(3)
    cache = GraphCache()
    cache.run("step", lambda x: x * w, (torch.randn(3),))
    w.data = torch.randn(3)  # new memory under the same tensor: a real graph would read the old
    with pytest.raises(AssertionError, match="moved since capture"):
        cache.run("step", lambda x: x * w, (torch.randn(3),))


def test_cuda_timing_helpers_run_their_event_paths(fake_cuda):
    from xa_runtime.runtime.timing import EventClock, StageTimer, time_callable, time_cuda_graph

    timer = StageTimer("cuda")
    with timer.stage("a"):
        torch.ones(3).sum()
    with timer.stage("a"):
        pass
    assert set(timer.seconds) == {"a"} and timer.total == 0.0  # the stand-in's events measure 0 s
    x, calls = torch.randn(4), []

    def fn():
        calls.append(1)
        return x * 2

    assert len(time_callable(fn, "cuda", warmup=2, iters=3)) == 3 and len(calls) == 5
    samples = time_cuda_graph(fn, reps=2, iters=4, warmup=1)
    assert len(samples) == 4 and len(calls) == 5 + 1 + 2  # warm-up, then the captured reps only
    assert fake_cuda.graphs[-1].replays == 1 + 4
    clock = EventClock("cuda")
    assert clock.seconds(clock.mark(), clock.mark()) == 0.0


def test_callback_on_step_end_with_streams_and_graphs_equals_the_plain_pipeline(models, plain, fake_cuda):
    """A callback that may replace latents turns stage 2's overlap off (one step after the other):
    its replacements reach the next step exactly as on the plain pipeline, graphs replaying."""
    def halve(p, i, t, kw):
        if kw["stage"] == "stage2" and i == 0:
            return {"latents": kw["latents"] * 0.5, "latents_sd15": kw["latents_sd15"] * 0.5}
        return kw

    pipe = _lean(models, fake_cuda)
    args = dict(GEN, callback_on_step_end=halve, callback_on_step_end_tensor_inputs=["latents", "latents_sd15"])
    with fake_cuda.race_check():
        got = pipe("a cat", **args).images
    want = plain("a cat", **args).images
    assert torch.equal(got, want)
    assert not torch.equal(want, plain("a cat", **GEN).images)
