"""The kernels compiled ahead of time for a GPU architecture, on a machine without a GPU.

Triton's NVIDIA backend lowers a kernel to PTX and assembles it with the ptxas shipped in
the triton wheel; neither step needs a GPU or a CUDA driver. So on a CPU machine every
kernel can be compiled for real, for sm_90 (H100, H200) or any other architecture, and
the cubin's resources read back: registers per thread, local memory (register spills),
shared memory per CTA. What this cannot say: whether the code is correct on the GPU
(the interpreter tests check the math) or how fast it runs (bench_kernels.py on a GPU).

How: in a process that did not import triton with TRITON_INTERPRET=1 (`compilable()`),
each kernel's launcher runs on uninitialised CPU tensors at the full-size shapes
(xa_runtime/kernels/shapes.py) inside the library's `recording_launches` scope: every
launch is handed to a recorder instead of running, and `interpreted()` is false, so the
launcher takes its GPU path (GPU tiles, the autotuned remap-inject). Each recorded launch
is then compiled with the argument specialisation Triton's JIT makes at launch (pointer
dtypes, 16-byte alignment, integers equal to 1 turned into constants), once per autotune
config. Build tooling, not part of the runtime package: benchmarks/kernels_static.py
runs it, tests/test_kernels_aot.py checks it.

From the resources and a GPU's limits (`GPUS`, from the CUDA programming guide's table of
compute capabilities) follow CTAs per SM and the waves a launch's grid takes: a static
model of occupancy and tile quantisation, no timing.
"""

from __future__ import annotations

import hashlib
import math
import re
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from xa_runtime.kernels import shapes
from xa_runtime.kernels.availability import recording_launches, triton

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class GpuSpec:
    """Per-SM limits of a GPU (CUDA C++ Programming Guide, compute capabilities table)."""

    name: str
    arch: int  # compute capability x 10
    sms: int
    smem_per_sm: int  # bytes usable by CTAs
    smem_per_cta: int  # the most one CTA may use
    max_threads_per_sm: int
    max_ctas_per_sm: int
    regs_per_sm: int = 65536
    reserved_smem_per_cta: int = 1024  # the driver's per-CTA reservation (compute capability 8.0 and later)


GPUS = {
    "h100": GpuSpec("H100 SXM", 90, 132, 228 * 1024, 227 * 1024, 2048, 32),
    "h200": GpuSpec("H200", 90, 132, 228 * 1024, 227 * 1024, 2048, 32),
    "a100": GpuSpec("A100", 80, 108, 164 * 1024, 163 * 1024, 2048, 32),
    "l4": GpuSpec("L4", 89, 58, 100 * 1024, 99 * 1024, 1536, 24),
}


@dataclass
class Launch:
    """One recorded kernel launch: what the launcher passed, before compilation."""

    kernel: str
    fn: Any  # JITFunction, InterpretedFunction or Autotuner
    grid: Any  # tuple, or a function of the launch's meta-parameters (autotuned kernels)
    args: tuple
    kwargs: dict
    site: str = ""
    variant: str = ""
    dtype: str = ""


@dataclass
class Compiled:
    """One launch compiled for one architecture (one autotune config of it)."""

    kernel: str
    site: str
    variant: str
    dtype: str
    arch: int
    config: dict
    grid: tuple[int, ...]
    num_warps: int = 0
    num_stages: int = 0
    regs: int = 0
    local_bytes: int = 0  # spills (and stack) per thread
    shared_bytes: int = 0  # per CTA: Triton's dynamic shared memory + the cubin's static
    compile_s: float = 0.0  # 0 when an identical specialisation was compiled before
    error: str = ""
    ptx_sha1: str = ""  # to compare with what the JIT compiles on a GPU
    tensor_cores: str = ""  # "wgmma" (Hopper), "mma" (mma.sync, Ampere and later), "" (none: CUDA cores)
    global_ops: dict[str, int] = field(default_factory=dict)  # ld/st.global instructions in the PTX, by width
    occupancy: dict[str, Any] = field(default_factory=dict)  # gpu key -> occupancy(): ctas_per_sm, limit, waves, balance, ...

    @property
    def ctas(self) -> int:
        return math.prod(self.grid)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ctas": self.ctas}


def _kernel_name(fn: Any) -> str:
    """The jitted function's name without its leading underscore (an autotuned kernel: the
    function it tunes)."""
    base = getattr(fn, "base_fn", None) or getattr(fn, "fn", fn)
    return base.__name__.strip("_")


@contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within: kernel launches are recorded into the yielded list (nothing runs) and the
    launchers take their GPU path (kernels.availability.recording_launches)."""
    launches: list[Launch] = []

    def record(kernel: Any, grid: Any, args: tuple, meta: dict) -> None:
        launches.append(Launch(_kernel_name(kernel), kernel, grid, args, meta))

    with recording_launches(record):
        yield launches


def full_size_launches(dtype: str = "fp16") -> list[Launch]:
    """Every kernel's launches at the full-size shapes, in every layout and variant the
    pipeline uses, in `dtype` (fp16, bf16, fp32)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    from xa_runtime.kernels import (
        conv_epilogue_triton, geglu_triton, group_norm_triton, guided_step_triton, remap_inject_triton,
    )

    dt, b = DTYPES[dtype], shapes.BATCH
    nchw, nhwc = torch.contiguous_format, torch.channels_last

    def empty(*size: int, fmt: torch.memory_format = nchw, of: torch.dtype = dt) -> torch.Tensor:
        return torch.empty(*size, dtype=of).contiguous(memory_format=fmt)

    out: list[Launch] = []

    def run(site: str, variant: str, launcher: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        with recording() as launches:
            launcher(*args, **kwargs)
        for launch in launches:
            launch.site, launch.variant, launch.dtype = site, variant, dtype
        out.extend(launches)

    # x (the mapping's features) and hidden (SDXL) in the pipeline's layouts: both NCHW,
    # both channels-last, and the mixed layout (mapping channels-last, SDXL NCHW)
    layouts = {"nchw": (nchw, nchw), "nhwc": (nhwc, nhwc), "nhwc->nchw": (nhwc, nchw)}
    for name, c, h, w in shapes.REMAP_SITES:
        for layout, (fx, fh) in layouts.items():
            for lerp in (None, 0.5):
                variant = layout + (" lerp" if lerp is not None else "")
                run(name, variant, remap_inject_triton, empty(b, c, h, w, fmt=fx), empty(c, c, 1, 1), empty(c),
                    empty(b, c, h, w, fmt=fh), 1.0, lerp)
    for name, c, h, w in shapes.MAPPING_STAGES:
        for layout, (fy, fskip) in layouts.items():
            y = empty(b, c, h, w, fmt=fy)
            if layout != "nhwc->nchw":  # block1: bias + ReLU (no second input to mix)
                run(name, layout + " relu", conv_epilogue_triton, y, empty(c), relu=True)
            run(name, layout + " skip", conv_epilogue_triton, y, empty(c), skip=empty(b, c, h, w, fmt=fskip))
    for name, c, h, w in shapes.GROUP_NORM_SHAPES:
        run(name, "nhwc affine", group_norm_triton, empty(b, c, h, w, fmt=nhwc), 32, empty(c), empty(c))
    for name, tokens, d in shapes.GEGLU_SHAPES:
        run(name, "", geglu_triton, empty(b, tokens, 2 * d))
    n = shapes.LATENT
    k = (0.5, 1.1, 0.9, 0.1, 0.05)  # (sig, inv_alpha, a, b, p): any numbers, the kernel is the same
    latents, eps = empty(1, 4, n, n), empty(2, 4, n, n)
    run("1x4x128x128", "cfg", guided_step_triton, eps, latents, None, 7.5, (0.5, 1.1, 0.9, 0.1, 0.0))
    run("1x4x128x128", "cfg 2nd order", guided_step_triton, eps, latents, empty(1, 4, n, n, of=torch.float32), 7.5, k)
    return out


def configs(launch: Launch) -> list[dict[str, Any]]:
    """The meta-parameters each compilation of `launch` gets: every autotune config of an
    autotuned kernel (its block sizes, num_warps, num_stages), else the launch's own."""
    from triton.runtime.autotuner import Autotuner

    if isinstance(launch.fn, Autotuner):
        return [c.all_kwargs() for c in launch.fn.configs]
    return [{}]


def _base_fn(fn: Any) -> Any:
    from triton.runtime.autotuner import Autotuner

    return fn.fn if isinstance(fn, Autotuner) else fn


def _cuobjdump() -> str:
    from triton import knobs

    return knobs.nvidia.cuobjdump.path


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's kernel, as cuobjdump reports them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([_cuobjdump(), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in found:
        raise RuntimeError(f"cuobjdump -res-usage gave no register count:\n{text}")
    return {k: int(v) for k, v in found.items()}


def ptx_summary(ptx: str) -> dict[str, Any]:
    """What the PTX says about speed before anything runs: whether the matrix products use
    tensor cores, and how wide each global load and store is (static instruction counts:
    a `.v4.b32` moves 16 bytes per thread, a scalar `.b16` two; scalar loads of a
    contiguous stream mean Triton could not prove it contiguous)."""
    tensor_cores = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else ""
    ops: dict[str, int] = {}
    for op in re.findall(r"\b((?:ld|st)\.global(?:\.[A-Za-z0-9_:]+)*)", ptx):
        op = ".".join(part for part in op.split(".") if "::" not in part)  # without cache hints
        ops[op] = ops.get(op, 0) + 1
    return {"tensor_cores": tensor_cores, "global_ops": dict(sorted(ops.items()))}


def compilable() -> bool:
    """Whether this process can compile kernels: not when it imported triton with
    TRITON_INTERPRET=1 (as the CPU tests do), since triton.language's own jitted helpers
    are then interpreter functions that the compiler cannot inline. Run the compilation
    in a process without it (benchmarks/kernels_static.py does)."""
    if triton is None:
        return False
    from triton.language import standard
    from triton.runtime.jit import JITFunction

    return isinstance(standard.sigmoid, JITFunction)


def compile_launch(launch: Launch, arch: int = 90, config: dict[str, Any] | None = None,
                   cache: dict[Any, Any] | None = None) -> Compiled:
    """Compile one launch (with one autotune config) to a cubin for sm_`arch`. A compile
    error is recorded in `error`, not raised. `cache` shares the compilations of launches
    that specialise identically (e.g. the same kernel at two sites)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    if not compilable():
        raise RuntimeError("this process imported triton with TRITON_INTERPRET=1, so it cannot compile kernels; "
                           "compile in a process without it (e.g. python benchmarks/kernels_static.py)")
    config = dict(config or {})
    kwargs = {**launch.kwargs, **config}
    grid = launch.grid(kwargs) if callable(launch.grid) else launch.grid
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    result = Compiled(launch.kernel, launch.site, launch.variant, launch.dtype, arch,
                      {k: v for k, v in config.items() if v is not None}, grid)
    jit = _base_fn(launch.fn)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    key = (id(jit), arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
    if cache is not None and key in cache:
        done = cache[key]  # compile_s stays 0: the time went to the first launch that compiled it
    else:
        start = time.perf_counter()
        try:
            kernel = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)
            res = cubin_resources(kernel.asm["cubin"])
            done = {"num_warps": kernel.metadata.num_warps, "num_stages": kernel.metadata.num_stages,
                    "regs": res["REG"], "local_bytes": res.get("LOCAL", 0) + res.get("STACK", 0),
                    "shared_bytes": kernel.metadata.shared + res.get("SHARED", 0), "error": "",
                    "ptx_sha1": hashlib.sha1(kernel.asm["ptx"].encode()).hexdigest(), **ptx_summary(kernel.asm["ptx"])}
        except Exception as e:  # noqa: BLE001 - recorded per config; the caller decides
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            where = f"{lines[0]} ... " if len(lines) > 1 else ""  # Triton: "at L:C:", source, message last
            done = {"error": f"{type(e).__name__}: {where}{lines[-1] if lines else ''}"}
        result.compile_s = time.perf_counter() - start
        if cache is not None:
            cache[key] = done
    for name, value in done.items():
        setattr(result, name, value)
    return result


def occupancy(c: Compiled, gpu: GpuSpec) -> dict[str, Any]:
    """What `c`'s launch looks like on `gpu`, by the CUDA occupancy calculator's rules
    (registers allocated per warp in units of 256; shared memory per CTA plus the driver's
    reservation; the threads and CTAs an SM holds):

    ctas_per_sm / limit: the most CTAs an SM holds at once, and the resource that caps it;
    waves: the grid's CTAs over all SMs' slots;
    balance: the mean SM's share of the busiest SM's CTAs, ctas / (sms * ceil(ctas / sms));
        1.0 when every SM gets as many CTAs (tile quantisation: below 1, part of the GPU
        idles while the busiest SMs finish);
    occupancy: the warps resident per SM while the grid runs, over the SM's maximum."""
    threads = 32 * c.num_warps
    regs_per_warp = math.ceil(c.regs * 32 / 256) * 256
    limits = {
        "threads": gpu.max_threads_per_sm // threads,
        "ctas": gpu.max_ctas_per_sm,
        "registers": (gpu.regs_per_sm // regs_per_warp) // c.num_warps if regs_per_warp else gpu.max_ctas_per_sm,
        "shared": gpu.smem_per_sm // (c.shared_bytes + gpu.reserved_smem_per_cta) if c.shared_bytes <= gpu.smem_per_cta else 0,
    }
    per_sm = min(limits.values())
    limit = min(limits, key=lambda k: limits[k])
    if per_sm == 0:  # does not fit: the launch fails (the autotuner skips such a config)
        return {"ctas_per_sm": 0, "limit": limit, "waves": math.inf, "balance": 0.0, "occupancy": 0.0}
    per_sm_busiest = math.ceil(c.ctas / gpu.sms)
    return {
        "ctas_per_sm": per_sm, "limit": limit, "waves": c.ctas / (per_sm * gpu.sms),
        "balance": c.ctas / (gpu.sms * per_sm_busiest),
        "occupancy": min(per_sm, per_sm_busiest) * threads / gpu.max_threads_per_sm,
    }


def compile_all(launches: list[Launch], arch: int = 90, gpus: tuple[str, ...] = ("h100",),
                progress: Callable[[int, int], None] | None = None,
                cache: dict[Any, Any] | None = None, first_config: bool = False) -> list[Compiled]:
    """Every launch in every autotune config (or only the first: `first_config`), compiled
    for sm_`arch`, with occupancy on `gpus` (all of that architecture)."""
    for g in gpus:
        if g not in GPUS:
            raise ValueError(f"gpus: each one of {', '.join(GPUS)}, got {g!r}")
        if GPUS[g].arch != arch:
            raise ValueError(f"gpus: {g} is sm_{GPUS[g].arch}, not the sm_{arch} being compiled for")
    jobs = [(launch, cfg) for launch in launches for cfg in configs(launch)[:1 if first_config else None]]
    cache = {} if cache is None else cache
    results = []
    for i, (launch, cfg) in enumerate(jobs):
        c = compile_launch(launch, arch, cfg, cache)
        if not c.error:
            c.occupancy = {g: occupancy(c, GPUS[g]) for g in gpus}
        results.append(c)
        if progress is not None:
            progress(i + 1, len(jobs))
    return results
