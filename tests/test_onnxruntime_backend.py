"""The pipeline with its SD1.5 UNet, mapping layers and SDXL UNet on onnxruntime (CPU)
against the same pipeline in PyTorch, on the tiny models; the branch objects; errors.

Tolerance: fp32 latents after 4 steps (2 in stage 2, CFG) agree to ~3e-6 of their largest
magnitude; the tests allow atol 1e-4 x max|torch latents| (rtol 1e-4).
"""

import copy
import shutil

import pytest
import torch

from xa_runtime.errors import CheckpointError, ParameterError
from xa_runtime.models.branches import SDXLBranch
from xa_runtime.pipeline import XAdapterPipeline
from xa_runtime.plugins.controlnet import ControlNetPlugin
from xa_runtime.runtime.config import RuntimeConfig
from xa_runtime.runtime.backends.adapters import OrtMapping, OrtSD15Branch, OrtSDXLBranch
from xa_runtime.runtime.backends.onnxruntime import OnnxRuntimeBackend, resolve_providers

GEN = dict(num_inference_steps=4, adapter_guidance_start=0.5, seed=3, output_type="latent")


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.fixture(scope="module")
def pipes(tiny_onnx):
    bundle, folder = tiny_onnx
    pipe = XAdapterPipeline(bundle.sd15, bundle.sdxl, bundle.mapping, progress=False)
    return pipe, pipe.with_backend(OnnxRuntimeBackend(folder, sdxl_mode="split"))


@pytest.fixture(scope="module")
def fused_pipe(pipes, tiny_onnx):
    backend = OnnxRuntimeBackend(tiny_onnx[1], sdxl_mode="fused")
    assert set(backend.sessions) == {"sd15_unet", "sd15_unet_control", "sd15_unet_t2i", "sd15_unet_ip",
                                     "sdxl_unet_fused"}  # no split pair
    return pipes[0].with_backend(backend)


@pytest.mark.parametrize("fusion", [None, 0.5])
def test_pipeline_on_onnxruntime_equals_torch(pipes, fused_pipe, fusion):
    """Split (mapping graph + sdxl_unet) and fused (sdxl_unet_fused) SDXL side, same tolerance."""
    pipe, ort_pipe = pipes
    kw = dict(GEN, fusion_guidance_scale=fusion, adapter_condition_scale=0.8)
    ref = pipe("a cat", **kw).images
    _close(ort_pipe("a cat", **kw).images, ref)
    _close(fused_pipe("a cat", **kw).images, ref)
    assert ref.abs().max() > 0.1


def test_sdxl_mode_choice(tiny_onnx, tmp_path):
    from xa_runtime.graphs import PREFERRED_SDXL_MODE
    from xa_runtime.runtime.backends.adapters import OrtDeferredMapping

    _, folder = tiny_onnx
    auto = OnnxRuntimeBackend(folder, verify=False)
    assert auto.sdxl_mode == PREFERRED_SDXL_MODE  # both present: the measured-faster one
    assert isinstance(auto.mapping, OrtDeferredMapping if PREFERRED_SDXL_MODE == "fused" else OrtMapping)
    for name in ("sd15_unet", "sdxl_unet_fused"):
        shutil.copy(folder / f"{name}.onnx", tmp_path / f"{name}.onnx")
    assert OnnxRuntimeBackend(tmp_path, verify=False).sdxl_mode == "fused"  # only fused there
    with pytest.raises(ParameterError) as e:
        OnnxRuntimeBackend(tmp_path, verify=False, sdxl_mode="split")
    assert e.value.name == "folder" and "missing mapping, sdxl_unet" in e.value.accepted
    with pytest.raises(ParameterError) as e:
        OnnxRuntimeBackend(folder, sdxl_mode="both")
    assert e.value.name == "sdxl_mode"
    fused = OnnxRuntimeBackend(tmp_path, verify=False).sdxl_branch
    with pytest.raises(ValueError, match="sdxl_mode='split'"):
        fused(torch.randn(1, 4, 8, 8), 1.0, torch.randn(1, 77, 64), {}, residuals=[torch.zeros(1)] * 3)


def test_controlnet_residuals_reach_the_control_graph(pipes, tiny_onnx):
    pipe, ort_pipe = pipes
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plugin = ControlNetPlugin(tiny_onnx[0].controlnet, image, conditioning_scale=1.5)
    gen = dict(GEN, num_inference_steps=2)  # one step per stage
    ref = pipe("a cat", plugins=[plugin], **gen).images
    _close(ort_pipe("a cat", plugins=[plugin], **gen).images, ref)
    assert (ref - pipe("a cat", **gen).images).abs().max() > 1e-3  # the ControlNet acts


def test_t2i_adapter_features_reach_the_t2i_graph(pipes, tiny_onnx):
    from xa_runtime.plugins.t2i_adapter import T2IAdapterPlugin

    pipe, ort_pipe = pipes
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plugin = T2IAdapterPlugin(tiny_onnx[0].t2i_adapter, image, adapter_conditioning_scale=2.0)
    gen = dict(GEN, num_inference_steps=2)  # one step per stage
    ref = pipe("a cat", plugins=[plugin], **gen).images
    _close(ort_pipe("a cat", plugins=[plugin], **gen).images, ref)
    assert (ref - pipe("a cat", **gen).images).abs().max() > 1e-3  # the adapter acts


def test_sdxl_branch_residuals_and_stock(tiny_onnx):
    bundle, folder = tiny_onnx
    ort_branch = OnnxRuntimeBackend(folder, sdxl_mode="split").sdxl_branch
    fused_branch = OnnxRuntimeBackend(folder, sdxl_mode="fused").sdxl_branch
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 24, generator=g), torch.tensor(421.0)
    text, pooled = torch.randn(2, 77, 64, generator=g), torch.randn(2, 32, generator=g)
    cond = {"text_embeds": pooled, "time_ids": torch.tensor([[128.0, 192, 0, 0, 128, 192]] * 2)}
    res = [torch.randn(2, 128, 4, 6, generator=g), torch.randn(2, 128, 8, 12, generator=g),
           torch.randn(2, 64, 16, 24, generator=g)]
    torch_branch = SDXLBranch(bundle.sdxl.unet)
    try:
        with torch.no_grad():
            for acs, fusion in ((0.7, None), (1.2, 0.3)):
                kw = dict(residuals=res, adapter_condition_scale=acs, fusion_guidance_scale=fusion)
                _close(ort_branch(x, t, text, cond, **kw), torch_branch(x, t, text, cond, **kw))
            stock = bundle.sdxl.unet(x, t, text, added_cond_kwargs=cond).sample
            _close(ort_branch(x, t, text, cond), stock)
            _close(fused_branch(x, t, text, cond), stock)  # zero features, scale 0
    finally:
        torch_branch.remove_hooks()


def test_with_backend_copies_and_turns_kernels_off(pipes):
    pipe, ort_pipe = pipes
    assert isinstance(pipe.sdxl_branch, SDXLBranch) and isinstance(ort_pipe.sdxl_branch, OrtSDXLBranch)
    assert isinstance(ort_pipe.sd15_branch, OrtSD15Branch) and isinstance(ort_pipe.mapping, OrtMapping)
    assert ort_pipe.sd15 is pipe.sd15  # text encoders, VAEs: shared, still torch
    with_kernels = copy.copy(pipe)
    with_kernels.runtime = RuntimeConfig(triton_kernels=True)
    swapped = with_kernels.with_backend(_Backend(ort_pipe))
    assert swapped.runtime.triton_kernels is False and with_kernels.runtime.triton_kernels is True


class _Backend:
    def __init__(self, pipe):
        self.sd15_branch, self.sdxl_branch, self.mapping = pipe.sd15_branch, pipe.sdxl_branch, pipe.mapping


def test_backend_refuses_what_it_cannot_run(tiny_onnx, tmp_path):
    bundle, folder = tiny_onnx
    backend = OnnxRuntimeBackend(folder, sdxl_mode="split")
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        backend.sd15_branch(x, 1.0, text, added_cond_kwargs={"image_embeds": [x]})  # no torch UNet to project with
    with pytest.raises(ValueError, match="no graph takes both"):
        backend.sd15_branch(x, 1.0, text, added_cond_kwargs={"image_embeds": [x]}, down_intrablock_additional_residuals=[x] * 4)
    with pytest.raises(ValueError, match="takes 4 adapter features"):
        backend.sd15_branch(x, 1.0, text, down_intrablock_additional_residuals=[x])
    with pytest.raises(ValueError, match="together"):
        backend.sd15_branch(x, 1.0, text, down_intrablock_additional_residuals=[x] * 4,
                            down_block_additional_residuals=[x] * 12, mid_block_additional_residual=x)
    with pytest.raises(ValueError, match="ResidualInjection"):
        backend.sdxl_branch(x, 1.0, text, {}, injections=[lambda h: h] * 3)
    with pytest.raises(ParameterError) as e:
        OnnxRuntimeBackend(tmp_path)
    assert e.value.name == "folder" and "sd15_unet.onnx" in e.value.accepted
    with pytest.raises(ParameterError) as e:
        OnnxRuntimeBackend(folder, providers=["NoSuchExecutionProvider"])
    assert e.value.name == "providers" and "CPUExecutionProvider" in e.value.accepted
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    for name in ("sd15_unet", "mapping"):
        shutil.copy(folder / f"{name}.onnx", tmp_path / f"{name}.onnx")
    shutil.copy(folder / "mapping.onnx", tmp_path / "sdxl_unet.onnx")  # the wrong graph under the name
    with pytest.raises(CheckpointError, match="manifest.json"):
        OnnxRuntimeBackend(tmp_path)  # files not from one export
    with pytest.raises(CheckpointError, match="sdxl_unet"):
        OnnxRuntimeBackend(tmp_path, verify=False)  # auto: no fused graph there, so split


@pytest.mark.parametrize("name", ["sd15_unet", "sdxl_unet_fused", "t2i_adapter"])
def test_io_binding_equals_plain_run(tiny_onnx, name):
    """The IO-binding path (torch tensors bound by data_ptr, outputs preallocated from the
    table's shapes) gives exactly the plain numpy path's outputs on the CPU provider."""
    from xa_runtime.export import example_inputs, model_dims
    from xa_runtime.graphs import GRAPHS
    from xa_runtime.runtime.backends.onnxruntime import GraphSession

    bundle, folder = tiny_onnx
    spec = GRAPHS[name]
    plain = GraphSession(spec, folder / f"{name}.onnx", threads=1, optimization="all")
    bound = GraphSession(spec, folder / f"{name}.onnx", threads=1, optimization="all", io_binding=True)
    assert not plain.io_binding and bound.io_binding  # default on the CPU provider: plain
    x = example_inputs(spec, {**model_dims(spec, bundle), "B": 3, "H": 16, "W": 24, "T": 9}, torch.float32,
                       torch.device("cpu"), seed=2)
    for a, b in zip(plain(*x), bound(*x), strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


def test_pipeline_with_io_binding_and_options(pipes, tiny_onnx):
    pipe, _ = pipes
    backend = OnnxRuntimeBackend(tiny_onnx[1], threads=1, inter_op_threads=1, optimization="basic", io_binding=True)
    assert all(s.io_binding for s in backend.sessions.values())
    kw = dict(GEN, num_inference_steps=2)
    _close(pipe.with_backend(backend)("a cat", **kw).images, pipe("a cat", **kw).images)
    for bad in (dict(threads=0), dict(threads=True), dict(inter_op_threads=-1), dict(optimization="max")):
        with pytest.raises(ParameterError) as e:
            OnnxRuntimeBackend(tiny_onnx[1], **bad)
        assert e.value.name == next(iter(bad)), bad


def test_set_lora_deltas_switches_and_restores(tiny_onnx):
    """The onnxruntime LoRA switch: deltas change the SD1.5 UNet graphs' output, {} gives the
    base output back bit for bit; SDXL deltas go to the SDXL graph only."""
    import tempfile

    from xa_runtime.export import example_inputs, model_dims
    from xa_runtime.plugins.lora import LoraManager, load_lora
    from xa_runtime.testing import write_random_lora
    from xa_runtime.graphs import get_graph

    bundle, folder = tiny_onnx
    backend = OnnxRuntimeBackend(folder)
    spec = get_graph("sd15_unet")
    x = example_inputs(spec, {**model_dims(spec, bundle), "B": 2, "H": 16, "W": 16, "T": 77}, torch.float32,
                       torch.device("cpu"), seed=3)
    base = backend.sessions["sd15_unet"](*x)[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_lora(f"{tmp}/l.safetensors", bundle.sd15.unet, std=0.3)
        manager = LoraManager.for_branch(bundle.sd15, "unfused")
        manager.add("l", load_lora(path), 1.0)
        deltas = {k: v for k, v in manager.weight_deltas().items() if k.startswith("unet.")}
        manager.remove("l")
    counts = backend.set_lora_deltas(deltas, "sd15")
    assert counts["sd15_unet"] == len(deltas) and "sdxl_unet" not in counts
    assert (backend.sessions["sd15_unet"](*x)[0] - base).abs().max() > 1e-3
    assert backend.set_lora_deltas({}, "sd15")["sd15_unet"] == 0
    torch.testing.assert_close(backend.sessions["sd15_unet"](*x)[0], base, rtol=0, atol=0)


def test_open_backend_handle_owns_its_exported_graphs(pipes, tiny_onnx):
    """open_backend: torch hands the pipeline back as is; onnxruntime over a folder runs it; the
    on-the-fly export goes to a temporary folder the handle removes on close."""
    from xa_runtime.runtime.backends import open_backend

    pipe, ort_pipe = pipes
    with open_backend("torch", pipe) as torch_backend:
        assert torch_backend.pipeline is pipe and torch_backend.set_lora_deltas({"unet.x": 1}) == {}
    given = open_backend("onnxruntime", pipe, onnx_dir=tiny_onnx[1], sdxl_mode="split")
    assert given.onnx_dir == tiny_onnx[1] and given.graphs.sdxl_mode == "split"
    given.close()
    assert tiny_onnx[1].is_dir()  # a given folder is never removed
    with open_backend("onnxruntime", pipe) as made:
        folder = made.onnx_dir
        assert sorted(p.name for p in folder.glob("*.onnx")) == ["mapping.onnx", "sd15_unet.onnx", "sdxl_unet.onnx"]
        _close(made.pipeline("a cat", **GEN).images, ort_pipe("a cat", **GEN).images)
    assert not folder.exists()
    with pytest.raises(ParameterError, match="backend"):
        open_backend("openvino", pipe)
