"""TensorRT engines on a GPU: tiny engines build, run like PyTorch within fp16 tolerance, and
a LoRA refit then unload returns the base output. Skips cleanly without CUDA or without the
real TensorRT (tensorrt-stubs alone give an empty `tensorrt` namespace package).

Tolerance (fp16 engines from fp32 graphs vs fp32 torch): rtol 2e-2, atol 2e-2 x max|torch|."""

import copy

import pytest
import torch

pytestmark = pytest.mark.gpu


def _tensorrt():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    try:
        import tensorrt
    except ImportError:
        pytest.skip("TensorRT is not installed")
    if not hasattr(tensorrt, "Builder"):
        pytest.skip("TensorRT is not installed (only tensorrt-stubs)")
    return tensorrt


GRAPH_NAMES = ("sd15_unet", "mapping", "sdxl_unet")
DIMS = {"B": 2, "H": 16, "W": 16, "T": 77}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    _tensorrt()
    from xa_runtime.engines import build
    from xa_runtime.engines import manifest as mf
    from xa_runtime.export import ModuleBundle, export_graphs
    from xa_runtime.graphs import GRAPHS

    bundle = ModuleBundle.tiny(0)
    onnx_dir, folder = tmp_path_factory.mktemp("onnx"), tmp_path_factory.mktemp("engines")
    export_graphs(list(GRAPH_NAMES), bundle, onnx_dir, progress=False)
    profiles = {n: mf.resolve_profiles(GRAPHS[n], min="1,64,64", opt="2,128,128", max="2,256,256") for n in GRAPH_NAMES}
    build.build_engines(list(GRAPH_NAMES), onnx_dir, folder, "fp16", profiles, "refit", folder / build.TIMING_CACHE,
                        progress=False)
    return bundle, onnx_dir, folder


def _reference(name, bundle, seed=3):
    from xa_runtime.export import build_graph_module, example_inputs, model_dims
    from xa_runtime.graphs import GRAPHS

    spec = GRAPHS[name]
    dims = {**model_dims(spec, bundle), **DIMS}
    if name == "mapping":
        dims = {**dims, "H": 32, "W": 32}
    x = example_inputs(spec, dims, torch.float32, torch.device("cuda"), seed=seed)
    module = build_graph_module(spec, bundle).cuda()
    try:
        with torch.no_grad():
            ref = module(*x)
    finally:
        getattr(module, "release", lambda: None)()
        module.cpu()
    return x, (ref,) if isinstance(ref, torch.Tensor) else tuple(ref)


def _close(out, ref):
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o.float(), r.float(), rtol=2e-2, atol=2e-2 * float(r.abs().max()))


def test_engines_match_torch(engines):
    from xa_runtime.runtime.backends.tensorrt import TensorRTBackend

    bundle, onnx_dir, folder = engines
    assert (folder / "timing.cache").is_file()
    backend = TensorRTBackend(folder, onnx_dir)
    for name in GRAPH_NAMES:
        x, ref = _reference(name, bundle)
        out = backend.sessions[name](*x)
        torch.cuda.synchronize()
        _close(out, ref)


def test_cuda_graph_replays_equal_plain_execution(engines):
    """Each session captures its execution once per shape and replays it: the replay sees new
    input values (same shape) and equals a backend without graphs."""
    from xa_runtime.runtime.backends.tensorrt import TensorRTBackend

    bundle, onnx_dir, folder = engines
    graphs, plain = TensorRTBackend(folder, onnx_dir), TensorRTBackend(folder, onnx_dir, cuda_graphs=False)
    x, _ = _reference("sd15_unet", bundle)
    first = graphs.sessions["sd15_unet"](*x)  # plain run + capture
    assert graphs.sessions["sd15_unet"].graph is not None
    y = tuple(t * 0.5 if t.is_floating_point() else t for t in x)
    replayed = graphs.sessions["sd15_unet"](*y)
    want = plain.sessions["sd15_unet"](*y)
    torch.cuda.synchronize()
    for a, b in zip(replayed, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not all(torch.equal(a, b) for a, b in zip(first, replayed))


def test_lora_refit_then_unload(engines, tmp_path):
    from xa_runtime.runtime.backends.tensorrt import TensorRTBackend
    from xa_runtime.export import ModuleBundle
    from xa_runtime.plugins.lora import LoraManager, load_lora
    from xa_runtime.testing import write_random_lora

    bundle, onnx_dir, folder = engines
    backend = TensorRTBackend(folder, onnx_dir)
    x, base_ref = _reference("sd15_unet", bundle)
    session = backend.sessions["sd15_unet"]
    base = session(*x)
    comps = copy.deepcopy(bundle.sd15)
    write_random_lora(tmp_path / "lora.safetensors", comps.unet, comps.text_encoder, fmt="kohya", std=0.2)
    manager = LoraManager.for_branch(comps, "fused")
    manager.add("style", load_lora(tmp_path / "lora.safetensors"), scale=0.7)
    counts = backend.set_lora_deltas({k: v for k, v in manager.weight_deltas().items() if k.startswith("unet.")})
    assert counts["sd15_unet"] > 0
    _, fused_ref = _reference("sd15_unet", ModuleBundle(**{**vars(bundle), "sd15": comps}))
    _close(session(*x), fused_ref)
    assert backend.set_lora_deltas({}) == {"sd15_unet": 0}
    restored = session(*x)
    torch.cuda.synchronize()
    for r, b in zip(restored, base, strict=True):
        torch.testing.assert_close(r, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
    _close(restored, base_ref)
