"""The lean runtime (streams, CUDA graphs, compile, offload) computes what the plain
pipeline computes.

CPU: the Stage2Scheduler's sequential path equals the pipeline's former stage-2 loop
(kept below, verbatim, as `ReferenceLoopPipeline`) exactly, for several schedulers, CFG
on/off, fusion on/off, batch 2 and a ControlNet plugin; streams=True on CPU is the same
path; compile with the "aot_eager" backend (inductor on CPU would take minutes on the
2-core CI machine) is within a stated tolerance; config errors name the parameter.
GPU (marked `gpu`, skipped without CUDA): streams + graphs give bit-identical latents to
the sequential, uncaptured run, a shape change recaptures, consecutive different requests
(and a LoRA switched in between) do not leak state, inductor within tolerance, offload.
"""

from __future__ import annotations

import pytest
import torch

from xa_runtime.errors import ParameterError
from xa_runtime.models.mapping import fit_features
from xa_runtime.pipeline import XAdapterPipeline
from xa_runtime.plugins.controlnet import ControlNetPlugin, build_tiny_controlnet
from xa_runtime.runtime import MIXED_LAYOUT, RuntimeConfig, Stage2Scheduler
from xa_runtime.runtime.executor import model_fingerprint
from xa_runtime.runtime.graphs import graph_key

EXACT = dict(rtol=0, atol=0)
# aot_eager runs the same aten ops through AOTAutograd's decompositions: fp32 on CPU,
# differences are reassociation-level after a few steps through two UNets.
COMPILED_TOL = dict(rtol=1e-4, atol=1e-4)
GEN = dict(num_inference_steps=4, adapter_guidance_start=0.5, seed=3, output_type="latent")
CUDA = torch.cuda.is_available()


class ReferenceLoopPipeline(XAdapterPipeline):
    """The stage-2 loop as it was before the Stage2Scheduler and StepExecutor existed."""

    def _stage2(self, st, p):
        lat15, latxl, cfg, guidance, k = st.lat15, st.latxl, st.cfg, st.guidance, len(st.timesteps)
        for i, t in enumerate(st.timesteps):
            x15 = st.sampler15.scale_model_input(self._cfg_batch(lat15, cfg), t)
            eps15, feats = self.sd15_branch(x15, t, st.emb15, **st.unet_kwargs("stage2", i, k, t, x15))
            lat15 = st.sampler15.step(eps15, t, lat15, guidance)
            injections = self._injections(fit_features(feats, st.latent_hw), p.adapter_condition_scale,
                                          p.fusion_guidance_scale)
            epsxl = self.sdxl_branch(st.samplerxl.scale_model_input(self._cfg_batch(latxl, cfg), t), t, st.embxl,
                                     st.xl_cond, injections=injections)
            latxl = st.samplerxl.step(epsxl, t, latxl, guidance)
            if st.step_callback:
                st.step_callback("stage2", i, k)
        return latxl


@pytest.fixture(scope="module")
def reference(tiny_models):
    return ReferenceLoopPipeline(*tiny_models, progress=False)


@pytest.fixture(scope="module")
def controlnet(tiny_models):
    return build_tiny_controlnet(tiny_models[0].unet, seed=0)


CONTROL_IMAGE = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
CASES = {
    "dpm-cfg": dict(scheduler="dpmpp-2m"),
    "euler-nocfg": dict(scheduler="euler", guidance_scale=1.0),
    "euler-a-fusion": dict(scheduler="euler-a", fusion_guidance_scale=0.5, adapter_condition_scale=1.3),
    "ddim-batch2": dict(scheduler="ddim", num_images_per_prompt=2),
    "unipc-ags1": dict(scheduler="unipc", adapter_guidance_start=1.0),
    "dpm-controlnet": dict(scheduler="dpmpp-2m", controlnet=True),
}


def _run(pipe, case, controlnet, **extra):
    case = dict(case)
    plugins = [ControlNetPlugin(controlnet, CONTROL_IMAGE, conditioning_scale=1.0)] if case.pop("controlnet", False) else []
    calls = []
    out = pipe("a cat", plugins=plugins, step_callback=lambda *a: calls.append(a), **(GEN | case | extra))
    return out, calls


_REFERENCE_RUNS: dict[str, tuple] = {}


@pytest.mark.parametrize(
    "name, streams", [(name, False) for name in CASES] + [("dpm-controlnet", True)],
    ids=list(CASES) + ["dpm-controlnet-streams-on-cpu"],
)
def test_scheduler_path_equals_the_former_loop_exactly(tiny_models, reference, controlnet, name, streams):
    pipe = XAdapterPipeline(*tiny_models, progress=False, runtime=RuntimeConfig(streams=streams))
    assert not pipe.stage2_scheduler.overlap
    got, calls = _run(pipe, CASES[name], controlnet)
    if name not in _REFERENCE_RUNS:
        _REFERENCE_RUNS[name] = _run(reference, CASES[name], controlnet)
    want, want_calls = _REFERENCE_RUNS[name]
    assert torch.equal(got.images, want.images)
    assert calls == want_calls and calls[-1][0] == "stage2"
    assert got.overheads == {"compile": 0.0, "graph_capture": 0.0} and got.peak_memory is None


def test_sequential_scheduler_order_and_callbacks():
    order = []
    sched = Stage2Scheduler("cpu", streams=True)
    sched.run(
        [torch.tensor(t) for t in (900, 800, 700)],
        lambda i, t: order.append(("sd15", i)) or (torch.zeros(1),) * 3,
        lambda i, t, feats: order.append(("sdxl", i)),
        lambda i: order.append(("done", i)),
    )
    assert order == [(kind, i) for i in range(3) for kind in ("sd15", "sdxl", "done")]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(offload="gpu"), "offload"),
        (dict(compile_backend="cudagraphs"), "compile_backend"),
        (dict(compile=True, compile_mode="reduce-overhead"), "compile_mode"),
        (dict(compile_mode="default"), "compile_mode"),
        (dict(streams="yes"), "streams"),
        (dict(channels_last="sd15_unet"), "channels_last"),
        (dict(channels_last=("sd15_unet", "vae")), "channels_last"),
    ],
)
def test_config_errors_name_the_parameter(kwargs, name):
    with pytest.raises(ParameterError) as err:
        RuntimeConfig(**kwargs)
    assert err.value.name == name and str(kwargs[name]) in str(err.value)


def test_cuda_graphs_refused_off_cuda(tiny_models):
    with pytest.raises(ParameterError, match="cuda_graphs") as err:
        XAdapterPipeline(*tiny_models, progress=False, runtime=RuntimeConfig(cuda_graphs=True))
    assert err.value.name == "cuda_graphs"


def test_offload_on_cpu_is_a_no_op(tiny_models, reference):
    pipe = XAdapterPipeline(*tiny_models, progress=False, runtime=RuntimeConfig(offload="encoders_vaes"))
    assert not pipe.residency.offload
    assert torch.equal(pipe("a cat", **GEN).images, reference("a cat", **GEN).images)


def test_graph_key_separates_shapes_and_baked_constants():
    x = torch.zeros(2, 4, 8, 8)
    base = graph_key("sdxl", (x, 1.0, None))[0]
    assert graph_key("sdxl", (torch.ones(2, 4, 8, 8), 1.0, None))[0] == base  # values are inputs
    assert graph_key("sdxl", (torch.zeros(2, 4, 8, 16), 1.0, None))[0] != base
    assert graph_key("sdxl", (x.half(), 1.0, None))[0] != base
    assert graph_key("sdxl", (x.to(memory_format=torch.channels_last), 1.0, None))[0] != base
    assert graph_key("sdxl", (x, 1.3, None))[0] != base
    assert graph_key("sdxl", (x, 1.0, 0.5))[0] != base
    assert graph_key("sd15", (x, 1.0, None))[0] != base
    assert graph_key("sd15", (x, {"a": [x]}))[0] != graph_key("sd15", (x, {"a": [x, x]}))[0]


def test_model_fingerprint_sees_hooks_processors_and_hook_owner_scales(tiny_models):
    unet = tiny_models[0].unet
    before = model_fingerprint([unet])
    assert model_fingerprint([unet]) == before

    class Owner:
        scales = {"style": 1.0}

        def hook(self, module, args, output):
            return output

    owner = Owner()
    handle = unet.up_blocks[0].register_forward_hook(owner.hook)
    try:
        with_hook = model_fingerprint([unet])
        assert with_hook != before
        owner.scales = {"style": 0.5}
        assert model_fingerprint([unet]) != with_hook
    finally:
        handle.remove()
    assert model_fingerprint([unet]) == before


def test_channels_last_and_fused_qkv_within_tolerance(reference):
    from xa_runtime.models.tiny import build_tiny_models

    pipe = XAdapterPipeline(*build_tiny_models(0), progress=False,  # own models: both switches edit them
                            runtime=RuntimeConfig(channels_last=True, fuse_qkv=True))
    assert pipe.sdxl.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert any(type(p).__name__.startswith("Fused") for p in pipe.sd15.unet.attn_processors.values())
    kwargs = GEN | dict(num_inference_steps=3)
    torch.testing.assert_close(pipe("a cat", **kwargs).images, reference("a cat", **kwargs).images, **COMPILED_TOL)

    with pytest.raises(ParameterError, match="fuse_qkv"):
        pipe.set_runtime(RuntimeConfig(channels_last=True))
    with pytest.raises(ParameterError, match="offload"):
        pipe.set_runtime(RuntimeConfig(channels_last=True, fuse_qkv=True, offload="encoders_vaes"))
    pipe.set_runtime(RuntimeConfig(channels_last=True, fuse_qkv=True, streams=True))
    assert pipe.runtime.streams and not pipe.stage2_scheduler.overlap  # CPU: sequential


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "kernels"])
def test_mixed_layout_within_tolerance_and_only_grows(reference, kernels):
    from xa_runtime.models.tiny import build_tiny_models

    pipe = XAdapterPipeline(*build_tiny_models(0), progress=False,  # own models: channels-last edits them
                            runtime=RuntimeConfig(channels_last=MIXED_LAYOUT, triton_kernels=kernels))
    assert pipe.runtime.channels_last == ("sd15_unet", "mapping")
    assert pipe.sd15.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.mapping.body[0].block1.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.sdxl.unet.conv_in.weight.is_contiguous()  # SDXL stays NCHW
    # the channels-last UNet's GroupNorms swapped (the Triton kernel with the kernels on), SDXL's not
    assert type(pipe.sd15.unet.conv_norm_out).__name__ == "ChannelsLastGroupNorm"
    assert pipe.sd15.unet.conv_norm_out.use_triton == kernels
    assert type(pipe.sdxl.unet.conv_norm_out) is torch.nn.GroupNorm
    kwargs = GEN | dict(num_inference_steps=3, fusion_guidance_scale=0.4)
    # channels-last only reorders the convolutions' sums (and with the kernels, where the
    # bias is added): fp32 differences at the reassociation level
    torch.testing.assert_close(pipe("a cat", **kwargs).images, reference("a cat", **kwargs).images, **COMPILED_TOL)

    pipe.set_runtime(RuntimeConfig(channels_last=True, triton_kernels=kernels))  # adds the SDXL UNet
    assert pipe.sdxl.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert type(pipe.sdxl.unet.conv_norm_out).__name__ == "ChannelsLastGroupNorm"
    pipe.set_runtime(RuntimeConfig(channels_last=True))  # kernels off: the swapped GroupNorms run torch's
    assert not pipe.sd15.unet.conv_norm_out.use_triton and not pipe.sdxl.unet.conv_norm_out.use_triton
    with pytest.raises(ParameterError, match="sdxl_unet") as err:
        pipe.set_runtime(RuntimeConfig(channels_last=MIXED_LAYOUT))
    assert err.value.name == "channels_last"


@pytest.mark.slow
def test_compiled_aot_eager_within_tolerance_and_compile_time_reported(tiny_models, reference):
    pipe = XAdapterPipeline(
        *tiny_models, progress=False, runtime=RuntimeConfig(compile=True, compile_backend="aot_eager")
    )
    kwargs = GEN | dict(num_inference_steps=3)
    from torch._dynamo.utils import counters

    counters.clear()
    first = pipe("a cat", **kwargs)
    torch.testing.assert_close(first.images, reference("a cat", **kwargs).images, **COMPILED_TOL)
    assert first.overheads["compile"] > 0
    # what decides speed under inductor and CUDA graphs on a GPU, visible here: each branch
    # step is one graph (no graph break), traced once for all its denoising steps (the
    # timestep and scales are tensors or fixed, not constants baked in per step)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == len(pipe.executor._compiled) >= 2
    again = pipe("a dog", **(kwargs | dict(seed=4, num_inference_steps=5)))  # same shapes: nothing compiled again
    assert again.overheads["compile"] == 0.0 and counters["stats"]["unique_graphs"] == len(pipe.executor._compiled)
    again = pipe("a dog", **(kwargs | dict(seed=4)))
    torch.testing.assert_close(again.images, reference("a dog", **(kwargs | dict(seed=4))).images, **COMPILED_TOL)
    pipe.set_runtime(RuntimeConfig(compile=True, compile_backend="aot_eager", streams=True))
    assert pipe("a dog", **(kwargs | dict(seed=4))).overheads["compile"] == 0.0  # compiled steps kept
    # the branch hooks still work inside the compiled region: the adapter changes the result
    no_adapter = reference("a dog", **(kwargs | dict(seed=4, adapter_condition_scale=0.0))).images
    assert (again.images - no_adapter).abs().max() > 1e-3
    # compile + kernels: inside the compiled steps inductor fuses the ops itself, so only the
    # sampler step uses a kernel; the UNets' module kernels stay off (dynamo never traces Triton)
    pipe.set_runtime(RuntimeConfig(compile=True, compile_backend="aot_eager", triton_kernels=True))
    assert pipe.runtime.kernels_active(pipe.device) and not pipe.runtime.traced_kernels_active(pipe.device)
    with_kernels = pipe("a dog", **(kwargs | dict(seed=4))).images
    assert not any(getattr(m, "use_triton", False) for m in pipe.sdxl.unet.modules())
    torch.testing.assert_close(with_kernels, again.images, **COMPILED_TOL)


# ---------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.float16]


def _cuda_pipe(models, dtype, **runtime):
    return XAdapterPipeline(*models, device="cuda", dtype=dtype, progress=False, runtime=RuntimeConfig(**runtime))


@pytest.fixture(scope="module")
def cuda_models():
    from xa_runtime.models.tiny import build_tiny_models

    return build_tiny_models(0)  # own copies: the pipelines move them to the GPU


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("runtime", [dict(streams=True), dict(cuda_graphs=True), dict(streams=True, cuda_graphs=True),
                                     dict(streams=True, cuda_graphs=True, triton_kernels=True),
                                     dict(streams=True, cuda_graphs=True, triton_kernels=True, channels_last=True)],
                         ids=["streams", "graphs", "streams+graphs", "streams+graphs+kernels",
                              "streams+graphs+kernels+channels-last"])
def test_streams_and_graphs_bit_identical_to_sequential(cuda_models, dtype, runtime):
    # the sequential, uncaptured reference runs the same kernels and layout (channels-last,
    # once on, stays on these shared models: values are the same, only the layout changed)
    same = {k: runtime[k] for k in ("triton_kernels", "channels_last") if k in runtime}
    controlnet = build_tiny_controlnet(cuda_models[0].unet, seed=0).to("cuda", dtype)
    plain = _cuda_pipe(cuda_models, dtype, **same)
    lean = _cuda_pipe(cuda_models, dtype, **runtime)
    assert lean.stage2_scheduler.overlap == runtime.get("streams", False)
    for name in ("dpm-cfg", "euler-a-fusion", "dpm-controlnet"):
        case = CASES[name]
        want, want_calls = _run(plain, case, controlnet)
        got, calls = _run(lean, case, controlnet)
        assert torch.equal(got.images, want.images), name
        assert calls == want_calls, name
        assert got.peak_memory and got.peak_memory > 0


@pytest.mark.gpu
@gpu
def test_shape_change_recaptures_and_same_shape_replays(cuda_models):
    pipe = _cuda_pipe(cuda_models, torch.float16, streams=True, cuda_graphs=True)
    pipe("a cat", **GEN)
    assert pipe.executor.graphs.captures == 2  # SD1.5 step (shared by both stages) + mapping/SDXL step
    pipe("a dog", **(GEN | dict(seed=9)))
    assert pipe.executor.graphs.captures == 2
    out = pipe("a dog", **(GEN | dict(height=96, width=160)))
    assert pipe.executor.graphs.captures == 3  # SDXL size only: the SD1.5 step keeps its graph
    assert out.overheads["graph_capture"] > 0
    pipe("a dog", **(GEN | dict(adapter_condition_scale=1.3)))  # a baked constant
    assert pipe.executor.graphs.captures == 4
    pipe.executor.graphs.clear()
    pipe("a cat", **GEN)
    assert pipe.executor.graphs.captures == 6


@pytest.mark.gpu
@gpu
def test_consecutive_requests_do_not_leak_state(cuda_models, tmp_path):
    from runtime_checks import assert_lora_switches_reach
    from xa_runtime.testing import write_random_lora

    a = dict(GEN, seed=1)
    b = dict(GEN, seed=2, scheduler="euler", fusion_guidance_scale=0.5, num_images_per_prompt=2, height=96, width=160)
    lean = _cuda_pipe(cuda_models, torch.float16, streams=True, cuda_graphs=True)
    in_a_row = [lean("a cat", **a).images, lean("a dog", **b).images, lean("a cat", **a).images]
    alone_a = _cuda_pipe(cuda_models, torch.float16, streams=True, cuda_graphs=True)("a cat", **a).images
    alone_b = _cuda_pipe(cuda_models, torch.float16, streams=True, cuda_graphs=True)("a dog", **b).images
    assert torch.equal(in_a_row[0], alone_a) and torch.equal(in_a_row[2], alone_a) and torch.equal(in_a_row[1], alone_b)

    plain = _cuda_pipe(cuda_models, torch.float16)
    path = write_random_lora(tmp_path / "style.safetensors", cuda_models[0].unet, std=0.3)
    assert_lora_switches_reach(lean, plain, cuda_models[0], path, a, alone_a)


@pytest.mark.gpu
@gpu
def test_inductor_within_tolerance_and_offload_exact(cuda_models):
    plain = _cuda_pipe(cuda_models, torch.float16)
    want = plain("a cat", **GEN)
    compiled = _cuda_pipe(cuda_models, torch.float16, compile=True)
    got = compiled("a cat", **GEN)
    torch.testing.assert_close(got.images, want.images, rtol=2e-2, atol=2e-2)  # fp16, fused/reordered kernels
    assert got.overheads["compile"] > 0 and compiled("a cat", **GEN).overheads["compile"] == 0.0

    from xa_runtime.models.tiny import build_tiny_models

    # own models: offload keeps the VAEs and text encoders of these on the CPU
    offload = _cuda_pipe(build_tiny_models(0), torch.float16, offload="encoders_vaes")
    out = offload("a cat", **GEN)
    assert torch.equal(out.images, want.images)
    assert offload.sdxl.vae.device.type == "cpu" and offload.sdxl.unet.device.type == "cuda"
