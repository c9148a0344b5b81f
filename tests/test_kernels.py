"""Triton kernels against their torch references: on CPU under TRITON_INTERPRET=1, and
compiled for real on a CUDA GPU (marked `gpu`, skipped without one)."""

import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 on machines without CUDA, before triton is imported.
pytest.importorskip("triton")

import importlib  # noqa: E402

from xa_runtime.kernels import remap_inject, remap_inject_reference, remap_inject_triton  # noqa: E402
from xa_runtime.models.tiny import build_tiny_models  # noqa: E402
from xa_runtime.pipeline import XAdapterPipeline  # noqa: E402
from xa_runtime.runtime import RuntimeConfig  # noqa: E402

# Kernel vs the fp32 reference. The kernel accumulates in fp32 and rounds twice (residual,
# then the sum), so low-precision errors are a few ulps of the result's magnitude.
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
SHAPES = [  # (B, C_in, C_out, H, W): tails in every dimension, and an exact multiple
    (2, 40, 72, 5, 7),
    (1, 64, 64, 8, 8),
    (3, 17, 33, 3, 11),
]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _reference64(x, weight, bias, hidden, scale, fusion=None):
    """The torch reference in float64 on the CPU: on a GPU, cuDNN would run an fp32
    reference conv in TF32 (errors ~1e-3), less exact than the kernel under test."""
    return remap_inject_reference(*(t.detach().cpu().double() for t in (x, weight, bias, hidden)), scale, fusion)


def _inputs(shape, dtype, channels_last, device, seed=0):
    b, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, 1, 1, generator=g) / cin**0.5
    bias = torch.randn(cout, generator=g)
    hidden = torch.randn(b, cout, h, w, generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [t.to(device=device, dtype=dtype).contiguous(memory_format=fmt) if t.dim() == 4 else t.to(device, dtype)
            for t in (x, weight, bias, hidden)]


@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.gpu) if d == "cuda" else d for d in DEVICES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("fusion", [None, 0.3], ids=["add", "lerp"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_remap_inject_matches_reference(device, dtype, channels_last, fusion, shape):
    x, weight, bias, hidden = _inputs(shape, dtype, channels_last, device)
    want = _reference64(x, weight, bias, hidden, 1.3, fusion)
    out = hidden.clone(memory_format=torch.preserve_format)
    ptr = out.data_ptr()
    got = remap_inject_triton(x, weight, bias, out, 1.3, fusion, block_m=32, block_n=16, block_k=16)
    assert got.data_ptr() == ptr  # written in place
    torch.testing.assert_close(got.cpu().double(), want, **TOLERANCE[dtype])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("fusion", [None, 0.3], ids=["add", "lerp"])
def test_prefetched_hidden_state_gives_the_same_result(channels_last, fusion):
    x, weight, bias, hidden = _inputs(SHAPES[0], torch.float16, channels_last, "cpu", seed=5)
    late = remap_inject_triton(x, weight, bias, hidden.clone(memory_format=torch.preserve_format), 0.7, fusion,
                               block_m=32, block_n=16, block_k=16)
    early = remap_inject_triton(x, weight, bias, hidden.clone(memory_format=torch.preserve_format), 0.7, fusion,
                                block_m=32, block_n=16, block_k=16, prefetch_hidden=True)
    assert torch.equal(early, late)  # the same math; only when the read is issued differs
    torch.testing.assert_close(early.double(), _reference64(x, weight, bias, hidden, 0.7, fusion), **TOLERANCE[torch.float16])


def test_default_block_sizes_cover_tails():
    x, weight, bias, hidden = _inputs((1, 70, 130, 9, 9), torch.float32, False, "cpu")
    want = remap_inject_reference(x, weight, bias, hidden, 0.8)
    torch.testing.assert_close(remap_inject_triton(x, weight, bias, hidden.clone(), 0.8), want, **TOLERANCE[torch.float32])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_autotuned_kernel_matches_reference_on_gpu(dtype, channels_last):
    # The autotuner times several block configs on the in-place output: restore_value must
    # hand each trial (and the final run) the original hidden state.
    x, weight, bias, hidden = _inputs((2, 320, 640, 24, 20), dtype, channels_last, "cuda", seed=3)
    want = _reference64(x, weight, bias, hidden, 0.9)
    got = remap_inject_triton(x, weight, bias, hidden, 0.9)
    assert got.data_ptr() == hidden.data_ptr()
    torch.testing.assert_close(got.cpu().double(), want, **TOLERANCE[dtype])


def test_launcher_rejects_bad_arguments():
    x, weight, bias, hidden = _inputs(SHAPES[0], torch.float32, False, "cpu")
    with pytest.raises(ValueError, match="hidden"):
        remap_inject_triton(x, weight, bias, hidden[:, :10], 1.0)
    with pytest.raises(ValueError, match="dtype"):
        remap_inject_triton(x.half(), weight, bias, hidden, 1.0)
    with pytest.raises(ValueError, match="bias"):
        remap_inject_triton(x, weight, bias[:3], hidden, 1.0)
    with pytest.raises(ValueError, match="flatten"):
        remap_inject_triton(x, weight, bias, hidden.transpose(2, 3).contiguous().transpose(2, 3), 1.0)


def test_dispatch_falls_back_to_reference_without_triton_device(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, weight, bias, hidden = _inputs(SHAPES[0], torch.float32, False, "cpu")
    want = remap_inject_reference(x, weight, bias, hidden, 1.3, 0.3)
    out = hidden.clone()
    assert remap_inject(x, weight, bias, out, 1.3, 0.3) is out
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("fusion", [None, 0.3])
def test_remap_inject_reference_is_the_models_injection(fusion):
    """The kernel's own reference (kernels import no models) equals the mapping's zero_out
    conv followed by models.mapping.inject_residual, the pipeline's plain path."""
    from xa_runtime.models.mapping import inject_residual

    x, weight, bias, hidden = _inputs(SHAPES[0], torch.float32, False, "cpu", seed=3)
    residual = torch.nn.functional.conv2d(x, weight, bias)
    want = inject_residual(hidden, residual, 1.3, fusion)
    torch.testing.assert_close(remap_inject_reference(x, weight, bias, hidden, 1.3, fusion), want, rtol=0, atol=0)


# ---------------------------------------------------------------- conv epilogues (mapping residual blocks)
from xa_runtime.kernels import conv_epilogue, conv_epilogue_reference, conv_epilogue_triton  # noqa: E402
from xa_runtime.models.mapping import ResidualBlock  # noqa: E402
from xa_runtime.runtime.kernel_hooks import FusedEpilogueResidualBlock, install_fused_epilogues  # noqa: E402

EPILOGUE_SHAPES = [(2, 5, 7, 9), (1, 16, 8, 8), (3, 3, 1, 13)]  # (B, C, H, W): 630, 1024, 117 elements
EPILOGUE_MODES = {"relu": dict(relu=True), "skip": dict(skip="same"), "skip-other-layout": dict(skip="other"),
                  "relu+skip": dict(relu=True, skip="same")}


def _epilogue_inputs(shape, dtype, channels_last, skip, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.randn(*shape, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    bias = torch.randn(shape[1], generator=g).to(device, dtype)
    if skip is None:
        return y, bias, None
    other = torch.contiguous_format if channels_last else torch.channels_last
    s = torch.randn(*shape, generator=g).to(device, dtype).contiguous(memory_format=fmt if skip == "same" else other)
    return y, bias, s


@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.gpu) if d == "cuda" else d for d in DEVICES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode", list(EPILOGUE_MODES))
@pytest.mark.parametrize("shape", EPILOGUE_SHAPES, ids=["x".join(map(str, s)) for s in EPILOGUE_SHAPES])
def test_conv_epilogue_matches_reference(device, dtype, channels_last, mode, shape):
    opts = EPILOGUE_MODES[mode]
    y, bias, skip = _epilogue_inputs(shape, dtype, channels_last, opts.get("skip"), device)
    # reference in float64 on the CPU; the kernel rounds once to y's dtype
    want = conv_epilogue_reference(y.cpu().double(), bias.cpu().double(), relu=opts.get("relu", False),
                                   skip=skip.cpu().double() if skip is not None else None)
    ptr, strides = y.data_ptr(), y.stride()
    got = conv_epilogue_triton(y, bias, relu=opts.get("relu", False), skip=skip, block=128)
    assert got.data_ptr() == ptr and got.stride() == strides  # in place, layout kept
    tol = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
           torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}[dtype]  # half an ulp of the result
    torch.testing.assert_close(got.cpu().double(), want, **tol)


def test_conv_epilogue_rejects_bad_arguments():
    y, bias, skip = _epilogue_inputs((2, 4, 6, 5), torch.float32, False, "same", "cpu")
    with pytest.raises(ValueError, match="bias"):
        conv_epilogue_triton(y, bias[:3], relu=True)
    with pytest.raises(ValueError, match="skip"):
        conv_epilogue_triton(y, bias, skip=skip[:, :2])
    with pytest.raises(ValueError, match="skip"):
        conv_epilogue_triton(y, bias, skip=skip.half())
    with pytest.raises(ValueError, match="dense"):
        conv_epilogue_triton(y.transpose(2, 3), bias, relu=True)
    with pytest.raises(ValueError, match="B x C x H x W"):
        conv_epilogue_triton(y[0], bias, relu=True)
    with pytest.raises(ValueError, match="dtype"):
        conv_epilogue_triton(y.double(), bias.double(), relu=True)


def test_conv_epilogue_dispatch_falls_back_to_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    y, bias, skip = _epilogue_inputs((2, 4, 6, 5), torch.float32, False, "other", "cpu")
    want = conv_epilogue_reference(y, bias, skip=skip)
    assert conv_epilogue(y, bias, skip=skip) is y
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.gpu) if d == "cuda" else d for d in DEVICES])
@pytest.mark.parametrize("block", ["plain", "in_conv", "upsample"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nchw-input-nhwc-weights"])
def test_residual_block_with_fused_epilogues_equals_plain(device, block, layout):
    torch.manual_seed(0)
    cin = 6 if block == "in_conv" else 8
    module = ResidualBlock(cin, 8, upsample=block == "upsample").to(device)
    x = torch.randn(2, cin, 5, 7, device=device)
    if layout != "nchw":
        module.to(memory_format=torch.channels_last)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    size = (10, 14) if block == "upsample" else None
    with torch.no_grad():
        want = module(x, size)
        assert install_fused_epilogues(module, use_triton=True) == [module]  # the runtime's module swap
        assert type(module) is FusedEpilogueResidualBlock
        got = module(x, size)
        module.use_triton = False
        off = module(x, size)
    torch.testing.assert_close(off, want, rtol=0, atol=0)
    # fp32: the only difference is where the bias is added (inside cuDNN/oneDNN or after)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- GroupNorm on channels-last activations
gn = importlib.import_module("xa_runtime.kernels.group_norm")  # the module (kernels.group_norm is the function)

GN_CASES = [  # (B, C, H, W, groups): tails in pixels and channels, 1-channel and 40-channel groups
    (2, 12, 5, 7, 4),
    (1, 64, 9, 9, 64),
    (2, 80, 3, 11, 2),
]


def _gn_inputs(case, dtype, device, offset=0.0, seed=0):
    b, c, h, w, _ = case
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, c, h, w, generator=g) * 3 + offset).to(device, dtype).contiguous(memory_format=torch.channels_last)
    return x, torch.randn(c, generator=g).to(device, dtype), torch.randn(c, generator=g).to(device, dtype)


@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.gpu) if d == "cuda" else d for d in DEVICES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GN_CASES, ids=["x".join(map(str, c)) for c in GN_CASES])
@pytest.mark.parametrize("tiles", ["small", "default"])
def test_group_norm_kernel_matches_reference(device, dtype, case, tiles):
    x, weight, bias = _gn_inputs(case, dtype, device)
    # small tiles: several pixel chunks and channel blocks with tails, one group per program
    blocks = dict(block_p=16, block_c=16, groups_per_program=1) if tiles == "small" else {}
    got = gn.group_norm_triton(x, case[-1], weight, bias, 1e-5, **blocks)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == dtype
    want = gn.group_norm_reference(x.cpu().double(), case[-1], weight.cpu().double(), bias.cpu().double(), 1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else TOLERANCE[dtype]
    torch.testing.assert_close(got.cpu().double(), want, **tol)


def test_group_norm_statistics_survive_a_large_mean():
    # mean 1000, std 3: E[x^2] - E[x]^2 in fp32 would lose the variance; centred chunk
    # statistics combined with Chan's formula keep it (fp32 input ulp at 1000 is 6e-5).
    case = (2, 12, 17, 9, 3)
    x, weight, bias = _gn_inputs(case, torch.float32, "cpu", offset=1000.0)
    got = gn.group_norm_triton(x, 3, weight, bias, 1e-5, block_p=16, block_c=8, groups_per_program=2)
    want = gn.group_norm_reference(x.double(), 3, weight.double(), bias.double(), 1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_group_norm_without_affine_and_bad_arguments():
    x, weight, bias = _gn_inputs(GN_CASES[0], torch.float32, "cpu")
    torch.testing.assert_close(gn.group_norm_triton(x, 4, None, None), gn.group_norm_reference(x, 4, None, None, 1e-5),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="channels-last"):
        gn.group_norm_triton(x.contiguous(), 4, weight, bias)
    with pytest.raises(ValueError, match="num_groups"):
        gn.group_norm_triton(x, 5, weight, bias)
    with pytest.raises(ValueError, match="weight"):
        gn.group_norm_triton(x, 4, weight[:3], bias)
    with pytest.raises(ValueError, match="both or neither"):
        gn.group_norm_triton(x, 4, weight, None)


def test_channels_last_unet_swaps_keep_values_and_layout(tiny_models, monkeypatch):
    import copy

    unet = copy.deepcopy(tiny_models[1].unet).eval()
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor(500.0)
    emb = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    cond = {"text_embeds": torch.randn(2, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                                       generator=g),
            "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)}
    calls = []
    real = gn.group_norm_triton
    monkeypatch.setattr(gn, "group_norm_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        want = unet(x, t, emb, added_cond_kwargs=cond).sample
        unet.to(memory_format=torch.channels_last)
        n = gn.install_channels_last_modules(unet, use_triton=False)
        assert n == sum(isinstance(m, torch.nn.GroupNorm) for m in unet.modules()) > 0
        assert all(type(m).__name__.startswith("ChannelsLast") for m in unet.modules()
                   if "Transformer2DModel" in type(m).__name__)
        assert set(unet.state_dict()) == set(tiny_models[1].unet.state_dict())  # same parameter names
        swapped = unet(x, t, emb, added_cond_kwargs=cond).sample  # torch's GroupNorm, layout-keeping blocks
        assert not calls
        gn.install_channels_last_modules(unet, use_triton=True)
        kernel = unet(x, t, emb, added_cond_kwargs=cond).sample
    assert len(calls) >= n  # every GroupNorm ran the kernel (some run more than once per call)
    torch.testing.assert_close(swapped, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel, want, rtol=1e-4, atol=1e-4)  # fp32 statistics in another order


# ---------------------------------------------------------------- GEGLU (transformer feed-forwards)
gg = importlib.import_module("xa_runtime.kernels.geglu")  # the module (kernels.geglu is the function)


@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.gpu) if d == "cuda" else d for d in DEVICES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 2 * 13), (3, 2 * 40), (1, 5, 3, 2 * 9)], ids=["3d", "2d", "4d"])
def test_geglu_kernel_matches_reference(device, dtype, shape):
    h = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 2).to(device, dtype)
    got = gg.geglu_triton(h, block=64)  # block 64: tails in every shape
    assert got.shape == (*shape[:-1], shape[-1] // 2) and got.dtype == dtype
    want = gg.geglu_reference(h.cpu().double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else TOLERANCE[dtype]
    torch.testing.assert_close(got.cpu().double(), want, **tol)


def test_geglu_bad_arguments():
    with pytest.raises(ValueError, match="even last dimension"):
        gg.geglu_triton(torch.randn(2, 7))
    with pytest.raises(ValueError, match="contiguous"):
        gg.geglu_triton(torch.randn(8, 4).t())
    with pytest.raises(ValueError, match="dtype"):
        gg.geglu_triton(torch.randn(2, 8, dtype=torch.float64))


def test_fused_geglu_swap_runs_the_kernel_and_keeps_proj_hooks(tiny_models, monkeypatch):
    import copy

    unet = copy.deepcopy(tiny_models[0].unet).eval()
    calls, hooked = [], []
    real = gg.geglu_triton
    monkeypatch.setattr(gg, "geglu_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor(300.0)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = unet(x, t, emb).sample
        swapped = gg.install_fused_geglu(unet, use_triton=True)
        assert swapped and all(type(m).__name__ == "FusedGEGLU" for m in swapped)
        assert set(unet.state_dict()) == set(tiny_models[0].unet.state_dict())
        swapped[0].proj.register_forward_hook(lambda *a: hooked.append(1))  # e.g. an unfused LoRA
        got = unet(x, t, emb).sample
        assert len(calls) == len(swapped) and hooked
        gg.install_fused_geglu(unet, use_triton=False)
        off = unet(x, t, emb).sample
    assert len(calls) == len(swapped)  # off: torch's split + GELU again
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(off, want, rtol=0, atol=0)


def test_kernels_off_scope_restores_the_flags(tiny_models):
    import copy

    from xa_runtime.kernels.modules import kernels_off, sync_kernel_modules

    unet = copy.deepcopy(tiny_models[1].unet)
    sync_kernel_modules(unet, channels_last=True, use_triton=True)
    flags = lambda: {getattr(m, "use_triton", None) for m in unet.modules() if hasattr(m, "use_triton")}  # noqa: E731
    assert flags() == {True}
    with kernels_off(unet):  # what export_graph wraps torch.onnx.export in
        assert flags() == {False}
    assert flags() == {True}
    sync_kernel_modules(unet, channels_last=True, use_triton=False)  # from the cached module list
    assert flags() == {False}
    other = copy.deepcopy(tiny_models[1].unet)
    sync_kernel_modules(other, channels_last=False, use_triton=True)  # a swap elsewhere: caches go stale
    unet.to(memory_format=torch.contiguous_format)
    before = [type(m) for m in unet.modules()]
    sync_kernel_modules(unet, channels_last=True, use_triton=True)
    assert [type(m) for m in unet.modules()] == before and flags() == {True}


def test_kernels_off_covers_the_runtimes_mapping_swap(tiny_models):
    import copy

    from xa_runtime.kernels.modules import kernels_off

    mapping = copy.deepcopy(tiny_models[2])
    blocks = install_fused_epilogues(mapping, use_triton=True)
    assert len(blocks) == len(mapping.body)
    with kernels_off(mapping):  # export traces torch's ops
        assert not any(b.use_triton for b in blocks)
    assert all(b.use_triton for b in blocks)


def test_pipelines_sharing_models_each_get_their_own_kernel_setting():
    # xa-bench runs eager and kernels variants on the same modules: the kernels pipeline's
    # swaps must not leak into the eager pipeline's requests.
    models = build_tiny_models(0)
    kwargs = dict(num_inference_steps=2, adapter_guidance_start=0.5, seed=4, output_type="latent")
    plain = XAdapterPipeline(*models, progress=False)
    before = plain("a cat", **kwargs).images
    kernels = XAdapterPipeline(*models, progress=False, runtime=RuntimeConfig(triton_kernels=True))
    with_kernels = kernels("a cat", **kwargs).images
    assert any(type(m).__name__ == "FusedGEGLU" and m.use_triton for m in models[0].unet.modules())
    assert all(type(m) is FusedEpilogueResidualBlock and m.use_triton for m in models[2].body)  # runtime's swap
    after = plain("a cat", **kwargs).images
    assert not any(getattr(m, "use_triton", False) for m in models[0].unet.modules())
    assert not any(m.use_triton for m in models[2].body)
    assert torch.equal(after, before)
    torch.testing.assert_close(with_kernels, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fusion, scheduler, guidance", [(None, "dpmpp-2m", 7.5), (0.5, "euler", 7.5), (None, "euler", 1.0)])
def test_pipeline_with_kernels_equals_without(tiny_models, fusion, scheduler, guidance):
    kwargs = dict(num_inference_steps=4, adapter_guidance_start=0.5, seed=2, output_type="latent",
                  adapter_condition_scale=1.2, fusion_guidance_scale=fusion, scheduler=scheduler,
                  guidance_scale=guidance)
    plain = XAdapterPipeline(*tiny_models, progress=False)("a cat", **kwargs).images
    # its own models: the kernels pipeline swaps the UNets' GEGLUs (flags stay set between requests)
    fused_pipe = XAdapterPipeline(*build_tiny_models(0), progress=False, runtime=RuntimeConfig(triton_kernels=True))
    assert fused_pipe.runtime.kernels_active(fused_pipe.device)
    fused = fused_pipe("a cat", **kwargs).images
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- guided step (CFG + update)
from xa_runtime.kernels.guided_step import guided_step_reference, guided_step_triton  # noqa: E402
from xa_runtime.models import get_preset  # noqa: E402
from xa_runtime.pipeline.schedulers import GuidedSampler, StepCoefficients, make_scheduler  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("with_prev", [True, False], ids=["order2", "order1"])
def test_guided_step_kernel_matches_reference(dtype, cfg, with_prev):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 7, generator=g).to(dtype)  # 504 elements: a tail for block 128
    eps = torch.randn(4 if cfg else 2, 4, 9, 7, generator=g).to(dtype)
    prev = torch.randn(2, 4, 9, 7, generator=g) if with_prev else None
    k = StepCoefficients(sig=0.7, inv_alpha=1.3, a=0.9, b=0.2, p=-0.1 if with_prev else 0.0)
    guidance = 6.0 if cfg else None
    want_x, want_x0 = guided_step_reference(eps, x, prev, guidance, k)
    got_x, got_x0 = guided_step_triton(eps, x, prev, guidance, k, block=128)
    assert got_x.dtype == dtype and got_x0.dtype == torch.float32
    torch.testing.assert_close(got_x0, want_x0, rtol=1e-6, atol=1e-6)  # same fp32 math
    torch.testing.assert_close(got_x.float(), want_x.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("name", ["euler", "dpmpp-2m"])
@pytest.mark.parametrize("steps, begin", [(10, 0), (20, 0), (20, 9), (30, 3)])
@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_guided_sampler_replays_diffusers_schedule(name, steps, begin, use_triton):
    config = get_preset("sdxl").scheduler
    ref, ours = make_scheduler(name, config), make_scheduler(name, config)
    for s in (ref, ours):
        s.set_timesteps(steps)
        s.set_begin_index(begin)
    fused = GuidedSampler(ours, guided_step_triton if use_triton else guided_step_reference)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * ref.init_noise_sigma
    y = x.clone()
    for t in ref.timesteps[begin:]:
        torch.testing.assert_close(fused.scale_model_input(y), ref.scale_model_input(x, t), rtol=1e-4, atol=1e-4)
        eps = torch.randn(4, 4, 8, 8, generator=g)
        u, c = eps.chunk(2)
        x = ref.step(u + 5.0 * (c - u), t, x).prev_sample
        y = fused.step(eps, y, 5.0)
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)


def test_guided_sampler_refuses_unsupported_configs():
    config = get_preset("sdxl").scheduler
    assert not GuidedSampler.supports(make_scheduler("ddim", config))
    assert not GuidedSampler.supports(make_scheduler("dpmpp-2m", config, prediction_type="v_prediction"))
    assert not GuidedSampler.supports(make_scheduler("dpmpp-2m", config, solver_order=3))
