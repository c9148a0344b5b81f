"""Every Triton kernel compiled for real for sm_90 (H100, H200) on this machine, GPU or not:
Triton's NVIDIA backend and the ptxas in the triton wheel, at the full-size shapes, every
launch variant and every autotune config (benchmarks/kernels_aot.py). Catches what the
interpreter cannot: code the compiler rejects, register spills, shared memory beyond the
GPU. The compiling runs in a child process without TRITON_INTERPRET=1 (this one has it);
cold, the fp16 sweep takes about 80 s, Triton's cache makes reruns fast."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from bench_scripts import BENCHMARKS, load_script

triton = pytest.importorskip("triton")

import kernels_aot as aot  # noqa: E402  (benchmarks/, on sys.path through bench_scripts)
from xa_runtime.kernels.remap_inject import _remap_inject_tuned  # noqa: E402

ROOT = BENCHMARKS.parent


def _nvidia_tools() -> bool:
    try:
        from triton import knobs

        return all(os.access(t.path, os.X_OK) for t in (knobs.nvidia.ptxas, knobs.nvidia.cuobjdump))
    except Exception:  # noqa: BLE001 - no NVIDIA backend in this triton build
        return False


needs_ptxas = pytest.mark.skipif(not _nvidia_tools(), reason="this triton has no ptxas / cuobjdump (NVIDIA backend)")


def _compiling_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(BENCHMARKS), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    return env


def run_static(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "static.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "kernels_static.py"), *args, "--output", str(out)],
                          capture_output=True, text=True, env=_compiling_env(), timeout=1200)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


KERNELS = {"remap_inject_kernel", "conv_epilogue_kernel", "gn_partials_kernel", "gn_stats_kernel", "gn_apply_kernel",
           "geglu_kernel", "guided_step_kernel"}
H100 = aot.GPUS["h100"]
VECTOR_STORES = KERNELS - {"gn_partials_kernel", "gn_stats_kernel"}  # those two write per-channel / per-group stats
VECTOR_LOADS = KERNELS - {"gn_stats_kernel"}  # which gathers the partial statistics of its group


@pytest.fixture(scope="module")
def fp16_sm90(tmp_path_factory):
    """kernels_static.py --arch 90 --gpus h100,h200: (its process, its JSON rows, its table)."""
    folder = tmp_path_factory.mktemp("static")
    proc, data = run_static(folder, "--arch", "90", "--gpus", "h100,h200")
    assert data is not None, proc.stderr[-3000:]
    return proc, data["rows"], (folder / "static.md").read_text()


@needs_ptxas
def test_every_kernel_and_autotune_config_compiles_for_sm90_fp16(fp16_sm90):
    proc, rows, _ = fp16_sm90
    assert proc.returncode == 0, proc.stderr[-3000:]  # 1 if any compile failed or spilled
    assert {r["kernel"] for r in rows} == KERNELS
    assert not [(r["kernel"], r["site"], r["variant"], r["config"], r["error"]) for r in rows if r["error"]]
    tuned = [r for r in rows if r["kernel"] == "remap_inject_kernel"]
    n_configs = len(_remap_inject_tuned().configs)
    assert n_configs >= 16
    assert len(tuned) == n_configs * 3 * 6  # 3 sites x (3 layouts x add / lerp)
    assert len({json.dumps(r["config"], sort_keys=True) for r in tuned}) == n_configs
    for r in rows:
        assert r["regs"] <= 255, (r["kernel"], r["config"])
        assert r["local_bytes"] == 0, f"{r['kernel']} {r['variant']} {r['config']} spills {r['local_bytes']} B"
        assert r["shared_bytes"] <= H100.smem_per_cta, (r["kernel"], r["config"])
        assert r["occupancy"]["h100"]["ctas_per_sm"] >= 1
        assert r["occupancy"]["h200"] == r["occupancy"]["h100"]  # same SM, same count
        # speed properties visible in the PTX: Hopper tensor cores for the GEMM, 16-byte
        # vector accesses for every stream a kernel reads or writes in bulk
        if r["kernel"] == "remap_inject_kernel":
            assert r["tensor_cores"] == "wgmma", (r["variant"], r["config"])
        if r["kernel"] in VECTOR_LOADS:
            assert r["global_ops"].get("ld.global.v4.b32", 0) >= 1, (r["kernel"], r["variant"], r["global_ops"])
        if r["kernel"] in VECTOR_STORES:
            assert r["global_ops"].get("st.global.v4.b32", 0) >= 1, (r["kernel"], r["variant"], r["global_ops"])


@needs_ptxas
def test_launches_take_the_gpu_path(fp16_sm90):
    """Recorded with interpreted() false: GPU tiles and grids, not the interpreter's."""
    _, rows, table = fp16_sm90
    gn = next(r for r in rows if r["kernel"] == "gn_apply_kernel" and r["site"] == "sdxl 1280ch 32^2")
    assert gn["grid"] == [1280 // 64, 32 * 32 // 64, 2]  # 64 x 64 tiles on a GPU (interpreter: 128 x 256)
    stats = next(r for r in rows if r["kernel"] == "gn_stats_kernel" and r["site"] == "sdxl 1280ch 32^2")
    assert stats["grid"] == [32, 2, 1]  # one group per program on a GPU
    mid = [r for r in rows if r["kernel"] == "remap_inject_kernel" and r["site"] == "r0 mid"]
    for r in mid:  # the autotuner's grid for each config
        assert r["grid"] == [math.ceil(1280 / r["config"]["BLOCK_M"]), math.ceil(32 * 32 / r["config"]["BLOCK_N"]), 2]
    # the integer specialisation follows the tensors, as the JIT's does: channels-last x has
    # pixel stride C (an argument), NCHW has 1 (a constant): three different kernels
    same = [r for r in mid if r["config"] == mid[0]["config"] and "lerp" not in r["variant"]]
    assert len({r["ptx_sha1"] for r in same}) == 3
    assert "| 128x128x64 w8 s3 |" in table and "gn_apply_kernel" in table


@needs_ptxas
def test_bf16_and_fp32_compile_for_sm90(tmp_path):
    """bf16 and fp32: every launch, the remap-inject kernel in its first autotune config
    (the fp16 test covers the configs); fp32 takes the IEEE dot."""
    proc, data = run_static(tmp_path, "--arch", "90", "--gpus", "h100", "--dtypes", "bf16,fp32", "--configs", "first")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = data["rows"]
    assert {r["dtype"] for r in rows} == {"bf16", "fp32"} and {r["kernel"] for r in rows} == KERNELS
    assert len([r for r in rows if r["kernel"] == "remap_inject_kernel"]) == 2 * 3 * 6
    assert not [r for r in rows if r["error"] or r["local_bytes"]]
    for r in rows:
        if r["kernel"] == "remap_inject_kernel":  # fp32 takes the IEEE dot: FMA on CUDA cores, not TF32
            assert r["tensor_cores"] == ("wgmma" if r["dtype"] == "bf16" else ""), (r["dtype"], r["variant"])


def test_recording_patches_nothing_and_ends_with_its_scope():
    """The launchers hand their launches to the library's recorder hook: no module of the
    library is changed, and after the scope kernels run (here: on the interpreter) again."""
    import importlib

    from xa_runtime.kernels import availability, geglu_reference, geglu_triton

    names = ("availability", "conv_epilogue", "geglu", "group_norm", "guided_step", "remap_inject")
    modules = [importlib.import_module(f"xa_runtime.kernels.{m}") for m in names]
    before = [dict(vars(m)) for m in modules]
    interpreted = availability.interpreted()
    with aot.recording() as launches:
        assert geglu_triton(torch.zeros(2, 8, 64)).shape == (2, 8, 32)  # allocated, not computed
        assert not availability.interpreted()
    assert [launch.kernel for launch in launches] == ["geglu_kernel"]
    assert launches[0].grid == (1,)  # 2 * 8 * 32 outputs in one block of 1024
    for m, saved in zip(modules, before):
        assert vars(m) == saved
    assert availability.interpreted() == interpreted
    if interpreted:  # the kernel runs for real again
        h = torch.randn(2, 8, 64)
        torch.testing.assert_close(geglu_triton(h), geglu_reference(h))


@needs_ptxas
def test_a_kernel_that_does_not_compile_is_reported(tmp_path):
    """The tool can fail: a kernel with a non-power-of-two arange compiles to an error
    (recorded, not raised); the same kernel with a power of two compiles."""
    (tmp_path / "bad.py").write_text(textwrap.dedent('''
        import json, torch, triton, triton.language as tl
        import kernels_aot as aot

        @triton.jit
        def bad_kernel(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)

        out = [aot.compile_launch(aot.Launch("bad", bad_kernel, (1,), (torch.empty(16),), {"BLOCK": b}), 90)
               for b in (12, 16)]
        print(json.dumps([(r.error, r.regs) for r in out]))
    '''))
    proc = subprocess.run([sys.executable, str(tmp_path / "bad.py")], capture_output=True, text=True,
                          env=_compiling_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (bad_error, _), (good_error, good_regs) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any(word in bad_error.lower() for word in ("power of 2", "arange")), bad_error
    assert good_error == "" and good_regs > 0


def test_compiling_refuses_an_interpreted_process():
    """This process imported triton with TRITON_INTERPRET=1: a clear error, not a compiler crash."""
    if aot.compilable():
        pytest.skip("triton was imported without TRITON_INTERPRET=1 here (a GPU machine)")
    launch = aot.Launch("x", None, (1,), (), {})
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        aot.compile_launch(launch, 90)


def test_occupancy_model_by_hand():
    """106 registers x 256 threads: 3584 registers per warp -> 18 warps -> 2 CTAs of 8 warps;
    97 KiB + 1 KiB reserved of 228 KiB -> 2 CTAs; 160 CTAs on 132 SMs: the busiest SMs
    run 2, the mean SM 160/132."""
    c = aot.Compiled("k", "", "", "fp16", 90, {}, (10, 8, 2), num_warps=8, num_stages=3, regs=106, shared_bytes=99328)
    o = aot.occupancy(c, H100)
    assert (o["ctas_per_sm"], o["limit"]) == (2, "registers")
    assert o["waves"] == pytest.approx(160 / 264)
    assert o["balance"] == pytest.approx(160 / 264)
    assert o["occupancy"] == pytest.approx(2 * 256 / 2048)
    big = aot.Compiled("k", "", "", "fp32", 80, {}, (4, 1, 1), num_warps=4, regs=64, shared_bytes=200 * 1024)
    assert aot.occupancy(big, aot.GPUS["a100"])["ctas_per_sm"] == 0  # 200 KiB > A100's 163 KiB per CTA
    assert aot.occupancy(big, H100)["ctas_per_sm"] == 1
    small = aot.Compiled("k", "", "", "fp16", 90, {}, (2560, 1, 1), num_warps=4, regs=23)
    o = aot.occupancy(small, H100)
    assert (o["ctas_per_sm"], o["limit"]) == (16, "threads")
    assert o["balance"] == pytest.approx(2560 / (132 * 20))


def test_compile_all_checks_its_gpus():
    with pytest.raises(ValueError, match="gpus: a100 is sm_80"):
        aot.compile_all([], 90, ("a100",))
    with pytest.raises(ValueError, match="gpus: each one of"):
        aot.compile_all([], 90, ("h900",))
    with pytest.raises(ValueError, match="dtype must be one of"):
        aot.full_size_launches("fp8")


def test_kernels_static_checks_its_arguments_first(capsys):
    script = load_script("kernels_static")
    for argv, message in ((["--gpus", "a100"], "--gpus: GPUs of sm_90"), (["--arch", "75"], "no GPU of that architecture"),
                          (["--dtypes", "fp8"], "--dtypes: each one of"), (["--output", "/no/such/dir/x.json"], "not in an existing folder")):
        with pytest.raises(SystemExit):
            script.main(argv)
        assert message in capsys.readouterr().err
    if not aot.compilable():  # this process: TRITON_INTERPRET=1
        assert script.main(["--arch", "90"]) == 2
        assert "TRITON_INTERPRET=1" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_aot_compiles_what_the_jit_compiles():
    """On a GPU: the PTX compiled here ahead of time equals the JIT's for the same launch
    (same specialisation and options), so the static figures are the GPU's kernels'."""
    import hashlib
    import importlib

    ce = importlib.import_module("xa_runtime.kernels.conv_epilogue")
    major, minor = torch.cuda.get_device_capability()
    y = torch.randn(2, 1280, 32, 32, device="cuda", dtype=torch.float16)
    bias = torch.randn(1280, device="cuda", dtype=torch.float16)
    ce.conv_epilogue_triton(y, bias, relu=True)
    jit_ptx = {k.asm["ptx"] for k in ce._conv_epilogue_kernel.device_caches[torch.cuda.current_device()][0].values()}
    with aot.recording() as launches:
        ce.conv_epilogue_triton(torch.empty(2, 1280, 32, 32, dtype=torch.float16), torch.empty(1280, dtype=torch.float16),
                                relu=True)
    result = aot.compile_launch(launches[0], 10 * major + minor)
    assert not result.error
    assert result.ptx_sha1 in {hashlib.sha1(p.encode()).hexdigest() for p in jit_ptx}

