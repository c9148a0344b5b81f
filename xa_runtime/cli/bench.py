"""`xa-bench`: latency, throughput and per-component time of the X-Adapter pipeline, in
several variants in one run (interleaved), with baselines, FLOPs and efficiency.

    xa-bench                                   # tiny models on CPU (runs anywhere)
    xa-bench --random-weights --device cuda --dtype fp16 --compare eager,kernels \\
        --baseline sdxl-alone,mapping --output benchmarks/results/latency-h100.json --plots benchmarks/results
    xa-bench --mode components ...             # text encoders, stage 1, hand-over, stage 2 split, VAE decode
    xa-bench --mode throughput --batches 1,2,4 --concurrency 1,2 ...

Writes a table to the terminal and, with --output, a JSON file with everything (device,
driver, versions, command line, git commit, threads, raw samples), a Markdown summary and
PNG plots beside it (plots: --plots DIR elsewhere, --no-plots none; need matplotlib, the
`bench` extra). On CPU, torch runs --threads threads (default: the cores not busy, at most
4); a run-to-run spread over 10% (coefficient of variation) is warned about.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xa_runtime

from ..errors import ParameterError
from ..models.presets import get_preset
from ..pipeline.params import MAX_BATCH, SCHEDULERS, SizeRules, validate
from ..plugin_kinds import BACKENDS, PluginSpec, check_backend
from .usage import add_debug_argument
from .vocabulary import DTYPES, add_device_argument, add_dtype_argument, add_model_arguments, add_threads_argument
from .vocabulary import add_generation_arguments, check_threads, check_tiny_seed, generation_flags, set_threads

if TYPE_CHECKING:  # torch is imported once the arguments parse (--help and argparse errors answer at once)
    import torch

MODES = ("latency", "throughput", "components")
BASELINE_NAMES = ("sdxl-alone", "mapping")
MAX_CONCURRENCY = 16
BENCH_PLUGINS = ("lora", "controlnet", "t2i")  # --plugins: built with random weights
# The generation parameters a benchmark workload sets (their flags as xa-generate spells them).
BENCH_PARAMETERS = ("num_inference_steps", "adapter_guidance_start", "guidance_scale", "num_images_per_prompt", "height",
                    "width", "height_sd15", "width_sd15", "scheduler")
# The package each variant needs (checked before loading; named in the error).
# variant -> the package it needs (tensorrt: availability.tensorrt_installed, below, which tells
# the real library from tensorrt-stubs)
VARIANT_PACKAGES = {"kernels": "triton", "onnxruntime": "onnxruntime"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="xa-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="latency", help=f"one of {', '.join(MODES)}, or several comma-separated "
                    "(one build of the models; one output file per mode) (default %(default)s)")
    models = ap.add_argument_group("models (none given: the built-in tiny models)")
    add_model_arguments(models)
    models.add_argument("--random-weights", action="store_true",
                        help="the real SD1.5 / SDXL / mapping architectures with random weights (full size: speed "
                             "does not depend on the values; use with --device cuda)")
    models.add_argument("--models", choices=["tiny", "random", "paths"], default=None,
                        help="the older spelling: tiny (= no model paths), random (= --random-weights), paths "
                             "(= --sd15/--sdxl/--adapter)")
    work = ap.add_argument_group("workload")
    work.add_argument("--compare", default="eager", help="comma-separated variants; the first is the reference "
                      "(default %(default)s)")
    work.add_argument("--baseline", default="", help="comma-separated: sdxl-alone (latency/components), mapping "
                      "(default none)")
    # the recorded benchmark workload: 30 steps (the pipeline's default is 50)
    add_generation_arguments(work, BENCH_PARAMETERS, defaults={"num_inference_steps": 30})
    work.add_argument("--batches", default=None, help="throughput: comma-separated batch sizes (default: --batch)")
    work.add_argument("--concurrency", default=None, help="throughput: comma-separated numbers of concurrent requests")
    work.add_argument("--plugins", default="", help=f"comma-separated plugins on for every request, built with random "
                      f"weights to fit the SD1.5 UNet: {', '.join(BENCH_PLUGINS)} (default none; lora: rank 8, unfused, "
                      "the side path a per-request LoRA costs; fused costs nothing per step)")
    run = ap.add_argument_group("run")
    run.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs first, 0..1000 (default %(default)s)")
    run.add_argument("--runs", type=int, default=5, metavar="N",
                     help="timed runs per variant, 1..1000 (default %(default)s; p99 is reported from 100 samples on)")
    run.add_argument("--no-flops", action="store_true", help="skip the FLOP-counter run (analytic FLOPs only)")
    run.add_argument("--onnx-dir", metavar="DIR", help="onnxruntime variant: this xa-export folder's graphs (of the "
                     "benchmarked models) instead of exporting them; tensorrt variant: its engines' source")
    run.add_argument("--engine-dir", metavar="DIR", help="tensorrt variant: this xa-build-engines folder's engines "
                     "instead of exporting and building throw-away ones")
    add_device_argument(run)
    add_dtype_argument(run)
    add_threads_argument(run)
    run.add_argument("--output", metavar="FILE.json", help="JSON file to write (a .md summary is written beside it, and "
                     "the plots unless --no-plots)")
    run.add_argument("--plots", metavar="DIR", help="folder for PNG plots (created if missing; default: the --output "
                     "folder; needs matplotlib, the bench extra)")
    run.add_argument("--no-plots", action="store_true", help="write no plots")
    add_debug_argument(run)
    run.add_argument("--version", action="version", version=f"%(prog)s {xa_runtime.__version__}")
    return ap


def _int_list(flag: str, text: str, lo: int, hi: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not lo <= v <= hi for v in values) or len(set(values)) != len(values):
        raise ParameterError(flag, text, f"distinct comma-separated integers in [{lo}, {hi}]")
    return values


def _names(flag: str, text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if len(set(names)) != len(names):
        raise ParameterError(flag, text, "distinct names, comma-separated")
    return names


def _check_variants(args: argparse.Namespace) -> list[str]:
    from ..bench import PLANNED, VARIANTS

    variants = _names("--compare", args.compare)
    if not variants:
        raise ParameterError("--compare", args.compare, "distinct variant names, comma-separated")
    for v in variants:
        package = VARIANT_PACKAGES.get(v)
        missing = package is not None and importlib.util.find_spec(package) is None
        if v in PLANNED:
            need = f"; it will need the package {package}, which is not installed" if missing else ""
            raise ParameterError("--compare", v, f"a variant that exists now ({', '.join(VARIANTS)}); {v} comes with "
                                 f"{PLANNED[v]}{need}")
        if v not in VARIANTS:
            raise ParameterError("--compare", v, f"one of {', '.join(VARIANTS)}")
        if missing:
            raise ParameterError("--compare", v, f"the package {package} installed (pip install {package})")
        if v == "tensorrt":
            from ..availability import NOT_INSTALLED, tensorrt_installed

            if not tensorrt_installed():  # tensorrt-stubs alone installs a package without the library
                raise ParameterError("--compare", v, f"the other variants: {NOT_INSTALLED}")
            if args.device != "cuda":
                raise ParameterError("--compare", v, "a CUDA device (TensorRT engines run on NVIDIA GPUs)")
        if VARIANTS[v].cuda_graphs and args.device != "cuda":
            raise ParameterError("--compare", v, "a CUDA device (it captures CUDA graphs); on CPU: eager, kernels, mixed-layout, compiled, streams")
        if v == "kernels":
            from ..kernels import triton_usable

            if not triton_usable(args.device):
                raise ParameterError("--compare", v, "a CUDA device with triton installed (or TRITON_INTERPRET=1 on CPU)")
    _check_backend_folders(args, variants)
    return variants


def _check_backend_folders(args: argparse.Namespace, variants: list[str]) -> None:
    """--onnx-dir / --engine-dir: given only with the variants that read them, each a usable set
    (graphs.folder_problem, as xa-generate and xa-serve check them)."""
    from ..graphs import folder_problem

    for flag, folder, kind, readers in (("--engine-dir", args.engine_dir, "engine", ("tensorrt",)),
                                        ("--onnx-dir", args.onnx_dir, "onnx", ("onnxruntime", "tensorrt"))):
        if folder is None:
            continue
        if not any(v in variants for v in readers):
            raise ParameterError(flag, folder, f"no {flag} without the {' or '.join(readers)} variant (--compare)")
        if kind == "onnx" and "onnxruntime" not in variants:
            continue  # the engines' source: read by the tensorrt backend's own checks
        problem = folder_problem(folder, kind)
        if problem:
            raise ParameterError(flag, folder, problem)


def _model_kind(args: argparse.Namespace) -> str:
    """tiny (no model paths: the default), random (--random-weights) or paths; --tiny and
    --models are the older spellings, accepted where they agree."""
    paths = {f: getattr(args, f[2:]) for f in ("--sd15", "--sdxl", "--adapter")}
    chosen = {kind for kind, on in (("tiny", args.tiny), ("random", args.random_weights),
                                    ("paths", any(paths.values()))) if on}
    if args.models is not None:
        chosen.add(args.models)
    if len(chosen) > 1:
        raise ParameterError("--models", args.models or "/".join(sorted(chosen)),
                             "one model choice: no paths (tiny), --random-weights, or --sd15/--sdxl/--adapter")
    kind = chosen.pop() if chosen else "tiny"
    if kind == "paths" and not all(paths.values()):
        missing = [f for f, v in paths.items() if not v]
        raise ParameterError(missing[0], None, "all of --sd15, --sdxl and --adapter")
    if kind != "tiny" and args.tiny_seed is not None:
        raise ParameterError("--tiny-seed", args.tiny_seed, "only with the built-in tiny models (no paths, no --random-weights)")
    return kind


def _check_plugins(args: argparse.Namespace, variants: list[str], concurrency: Any) -> list[str]:
    """--plugins: names among BENCH_PLUGINS, no --concurrency, and on the backend variants the
    table's backend check (plugin_kinds.check_backend: the benchmark's graphs have no plugin inputs)."""
    plugins = _names("--plugins", args.plugins)
    for name in plugins:
        if name not in BENCH_PLUGINS:
            raise ParameterError("--plugins", name, f"comma-separated names among {', '.join(BENCH_PLUGINS)}")
    if plugins and concurrency:
        raise ParameterError("--plugins", args.plugins, "no --concurrency with it (plugin objects hold per-request "
                             "state; concurrent replicas would share it)")
    specs = [PluginSpec(name, name, "(random weights)") for name in plugins]
    for backend in [v for v in variants if v in BACKENDS[1:]]:
        problem = check_backend(specs, backend, lambda s: f"--plugins {s.name}", plugin_graphs=False)
        if problem:
            raise ParameterError("--plugins", args.plugins, f"no {backend} variant with it: {problem}")
    return plugins


def _check(args: argparse.Namespace):
    """Every argument checked before anything is loaded; returns (variants, workload, device, dtype,
    options per mode)."""
    modes = _names("--mode", args.mode)
    for m in modes:
        if m not in MODES:
            raise ParameterError("--mode", m, f"one of {', '.join(MODES)}, or several comma-separated")
    if not modes:
        raise ParameterError("--mode", args.mode, f"one of {', '.join(MODES)}, or several comma-separated")
    import torch

    from ..bench import Workload
    from ..bench.suite import SuiteOptions

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise ParameterError("--device", "cuda", "cpu on this machine (no CUDA device is visible)")
    args.models = _model_kind(args)
    args.tiny_seed = check_tiny_seed(args)
    args.threads = check_threads(args)
    variants = _check_variants(args)
    baselines = _names("--baseline", args.baseline)
    for b in baselines:
        if b not in BASELINE_NAMES:
            raise ParameterError("--baseline", b, f"one of {', '.join(BASELINE_NAMES)}")
    for backend in ("onnxruntime", "tensorrt"):
        if backend in variants and "components" in modes:
            raise ParameterError("--mode", "components", f"latency or throughput with the {backend} variant (its "
                                 f"UNets run inside {backend}, where the component hooks cannot see them)")
    if "sdxl-alone" in baselines and modes == ["throughput"]:
        raise ParameterError("--baseline", "sdxl-alone", "--mode latency or components (it is a latency baseline)")
    if args.scheduler not in SCHEDULERS:
        raise ParameterError("--scheduler", args.scheduler, f"one of {', '.join(SCHEDULERS)}")
    for flag, value, lo in (("--warmup", args.warmup, 0), ("--runs", args.runs, 1)):
        if not lo <= value <= 1000:
            raise ParameterError(flag, value, f"an integer in [{lo}, 1000]")
    if "throughput" not in modes:
        for flag in ("batches", "concurrency"):
            if getattr(args, flag) is not None:
                raise ParameterError(f"--{flag}", getattr(args, flag), "only with --mode throughput")
    batches = _int_list("--batches", args.batches, 1, MAX_BATCH) if args.batches else [args.batch]
    concurrency = _int_list("--concurrency", args.concurrency, 1, MAX_CONCURRENCY) if args.concurrency else []
    if args.output:
        from .usage import check_output_files

        out = Path(args.output)
        extra = [out.with_name(f"{out.stem}-{m}{out.suffix or '.json'}") for m in modes] if len(modes) > 1 else [out]
        check_output_files("--output", args.output, [p for o in extra for p in (o, o.with_suffix(".md"))])
    if args.models == "paths":
        from ..loading import check_model_path

        for flag, family in (("--sd15", "sd15"), ("--sdxl", "sdxl"), ("--adapter", "adapter")):
            check_model_path(getattr(args, flag[2:]), family, flag)
    if args.plots and args.no_plots:
        raise ParameterError("--plots", args.plots, "no --plots with --no-plots")
    if args.plots:
        folder = Path(args.plots).resolve()
        if folder.exists() and not folder.is_dir() or not folder.exists() and not folder.parent.is_dir():
            raise ParameterError("--plots", args.plots, "a folder, or a new folder in an existing one")
        if importlib.util.find_spec("matplotlib") is None:
            raise ParameterError("--plots", args.plots, "the package matplotlib installed (pip install 'xa-runtime[bench]')")
    elif args.output and not args.no_plots:  # by default beside the JSON, when matplotlib is there
        if importlib.util.find_spec("matplotlib") is None:
            print("warning: no plots: matplotlib is not installed (pip install 'xa-runtime[bench]'; --no-plots "
                  "silences this)", file=sys.stderr)
        else:
            args.plots = str(Path(args.output).resolve().parent)
    plugins = _check_plugins(args, variants, concurrency)
    workload = Workload(
        steps=args.steps, adapter_guidance_start=args.adapter_guidance_start, guidance_scale=args.guidance_scale,
        batch=args.batch, height=args.height, width=args.width, height_sd15=args.height_sd15,
        width_sd15=args.width_sd15, scheduler=args.scheduler, plugins=tuple(plugins),
    )
    tiny = args.models == "tiny"
    rules = SizeRules(
        sd15_default=get_preset("tiny-sd15" if tiny else "sd15").default_size,
        sdxl_default=get_preset("tiny-sdxl" if tiny else "sdxl").default_size,
    )
    try:
        validate(workload.params(seed=0), rules)
    except ParameterError as e:
        raise ParameterError(generation_flags().get(e.name, e.name), e.value, e.accepted) from None
    options = []
    for m in modes:  # each baseline runs once, in the first mode that takes it
        taken = [b for b in baselines if not (b == "sdxl-alone" and m == "throughput")
                 and not any(b in o.baselines for o in options)]
        options.append(SuiteOptions(mode=m, warmup=args.warmup, runs=args.runs, batches=batches,
                                    concurrency=concurrency, baselines=taken, flops=not args.no_flops))
    return variants, workload, torch.device(args.device), getattr(torch, DTYPES[args.dtype]), options


def _backend_pipeline(args: argparse.Namespace, variant: str, models: tuple, device: torch.device,
                      dtype: torch.dtype):
    """The models on the onnxruntime or tensorrt backend (runtime.backends.open_backend): the
    graphs of --onnx-dir / the engines of --engine-dir, or the SD1.5 UNet, mapping and SDXL
    UNet exported (and for tensorrt built into engines: graph table profiles, the run's dtype
    as precision, no refit) to a temporary folder removed at exit. Full-size models export
    several GB (fp32 SDXL: ~10 GB with external data) and take minutes; the rest of the
    pipeline stays in PyTorch."""
    import atexit

    from ..pipeline import XAdapterPipeline
    from ..runtime.backends import open_backend

    pipe = XAdapterPipeline(*models, device=device, dtype=dtype, progress=False)
    backend = open_backend(variant, pipe, onnx_dir=args.onnx_dir, engine_dir=args.engine_dir, device=device.type,
                           dtype=dtype, progress=True)
    atexit.register(backend.close)
    return backend.pipeline


def _build(args: argparse.Namespace, variants: list[str], device: torch.device, dtype: torch.dtype):
    import torch

    from ..bench import VARIANTS
    from ..bench.runner import BACKEND_VARIANTS
    from ..models.components import build_random_components
    from ..models.mapping import MappingConfig, MappingLayers
    from ..models.tiny import build_tiny_models
    from ..pipeline import XAdapterPipeline

    if args.models == "tiny":
        models = build_tiny_models(args.tiny_seed)
    elif args.models == "random":
        # Built on the target device: random init of ~4.6 G parameters is seconds on a GPU, a
        # minute or more on the host (the values do not matter for speed).
        with torch.device(device):
            sd15 = build_random_components("sd15", 0, device=device, dtype=dtype)
            sdxl = build_random_components("sdxl", 1, device=device, dtype=dtype)
            mapping = MappingLayers(MappingConfig.from_unet_configs(sd15.unet.config, sdxl.unet.config))
        models = (sd15, sdxl, mapping)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the fp32 copies made before the cast
    else:
        first = XAdapterPipeline.from_pretrained(args.sd15, args.sdxl, args.adapter, device=device, dtype=dtype, progress=False)
        models = (first.sd15, first.sdxl, first.mapping)
    pipes = {}
    for v in variants:
        if v in BACKEND_VARIANTS:
            pipes[v] = _backend_pipeline(args, v, models, device, dtype)
            continue
        config = VARIANTS[v]
        # channels-last and fused QKV change the modules in place: such a variant gets its own
        # copy, so that the variants beside it still run the models they name.
        own = (config.channels_last or config.fuse_qkv) and len(variants) > 1
        pipes[v] = XAdapterPipeline(*(copy.deepcopy(models) if own else models), device=device, dtype=dtype,
                                    progress=False, runtime=config)
    return pipes


def _with_plugins(workload: Any, pipes: dict[str, Any]) -> Any:
    """The workload with its plugins built: random weights fitting the SD1.5 UNet, a random
    control image; an unfused LoRA is installed on every distinct SD1.5 model set in `pipes`."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from ..plugins.controlnet import ControlNetPlugin, build_tiny_controlnet
    from ..plugins.t2i_adapter import T2IAdapterPlugin, build_tiny_t2i_adapter

    if not workload.plugins:
        return workload
    first = next(iter(pipes.values()))
    unet = first.sd15.unet
    side = workload.params(0).height_sd15 or first.size_rules.sd15_default
    image = Image.fromarray((np.random.RandomState(0).rand(side, side, 3) * 255).astype(np.uint8))
    objects: list[Any] = []
    if "lora" in workload.plugins:
        _install_random_lora({id(p.sd15): p for p in pipes.values()}.values())
    if "controlnet" in workload.plugins:
        objects.append(ControlNetPlugin(build_tiny_controlnet(unet), image))
    if "t2i" in workload.plugins:
        objects.append(T2IAdapterPlugin(build_tiny_t2i_adapter(unet), image))
    return dataclasses.replace(workload, plugin_objects=tuple(objects))


def _install_random_lora(pipes: Any) -> None:
    """A random rank-8 LoRA, unfused, by the pipeline's own loading path (one pipeline per
    distinct SD1.5 model set)."""
    import tempfile

    from ..testing import write_random_lora

    for pipe in pipes:
        with tempfile.TemporaryDirectory(prefix="xa-bench-lora-") as tmp:
            path = write_random_lora(Path(tmp) / "lora.safetensors", pipe.sd15.unet, pipe.sd15.text_encoder, rank=8)
            pipe.load_plugins([PluginSpec("bench", "lora", str(path), 1.0)])


def _write_atomic(files: dict[Path, str]) -> None:
    """The JSON and its Markdown summary as one set: both or neither (atomic_files)."""
    from ..atomic_files import write_all_or_nothing

    write_all_or_nothing({path: text.encode() for path, text in files.items()})


def main(argv: list[str] | None = None) -> int:
    """Run `xa-bench`; returns the exit code (0 ok, 2 bad input or outputs not written,
    130 / 143 stopped by SIGINT / SIGTERM)."""
    from .usage import exit_on_signals

    return exit_on_signals("xa-bench", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from ..errors import CheckpointError
    from .usage import debug_requested, report

    args = build_parser().parse_args(argv)
    debug = debug_requested(argv)
    try:
        variants, workload, device, dtype, options = _check(args)
    except ParameterError as e:
        return report(str(e), debug)
    try:
        return _run(args, argv, variants, workload, device, dtype, options)
    except (ParameterError, CheckpointError) as e:  # a model file that passed the checks but does not load
        return report(str(e), debug)
    except OSError as e:  # a full disk, a folder at the output's name: the old outputs stay as they were
        return report(f"--output {args.output!r}: cannot write the results ({e})", debug)


def _run(args: argparse.Namespace, argv: list[str] | None, variants, workload, device, dtype, options) -> int:
    import torch

    from ..bench.plots import write_plots
    from ..bench.report import markdown, table
    from ..bench.suite import run_suite

    set_threads(args.threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # random tiny weights leave denormals that make CPU math erratic
    pipes = _build(args, variants, device, dtype)
    workload = _with_plugins(workload, pipes)
    command = " ".join([Path(sys.argv[0]).name if argv is None else "xa-bench"] + (argv if argv is not None else sys.argv[1:]))
    for opts in options:
        print(f"xa-bench {opts.mode}: {args.models} models, {device} {args.dtype}, variants {', '.join(variants)}",
              file=sys.stderr)
        result = run_suite(pipes, workload, opts, models=args.models, dtype_name=args.dtype, command=command,
                           progress=lambda m: print(m, file=sys.stderr))
        text = table(result)
        print(text)
        for line in result["warnings"]:
            print(f"warning: {line}", file=sys.stderr)
        out = Path(args.output) if args.output else None
        if out is not None and len(options) > 1:
            out = out.with_name(f"{out.stem}-{opts.mode}{out.suffix or '.json'}")
        plots = []
        if args.plots:
            plots = write_plots(result, Path(args.plots), Path(args.output).stem if args.output else "xa-bench")
            result["plots"] = [str(p) for p in plots]
            print("plots: " + ", ".join(str(p) for p in plots), file=sys.stderr)
        if out is not None:
            _write_atomic({out: json.dumps(result, indent=2),
                           out.with_suffix(".md"): markdown(result, text, plots, out.resolve().parent)})
            print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
