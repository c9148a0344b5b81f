"""`xa-generate`: one X-Adapter generation from the command line.

Every input is checked before any model is loaded (parameters, output path, model paths,
device); a bad one exits with code 2 and a one-line `error:` naming the flag, and
writes nothing. Without --sd15/--sdxl/--adapter it runs the built-in tiny random models.
The checks that need nothing but the command line run before torch is imported, so
--help, --version and their errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xa_runtime

from ..errors import AspectWarning, CheckpointError, NonFiniteError, ParameterError
from ..models.presets import get_preset
from ..pipeline.params import PARAMETERS, TEXT, GenerationParams, SizeRules, validate
from .backend_args import add_backend_arguments, check_backend, loras_to_backend, open_cli_backend
from .output_files import image_paths, sidecar_path, write_outputs
from .plugin_args import (
    GENERIC_KINDS,
    add_plugin_arguments,
    check_plugin_arguments,
    check_plugin_files,
    load_init_image,
    plugin_record,
)
from .usage import (
    CheckedParser,
    UsageError,
    add_debug_argument,
    check_output_files,
    debug_requested,
    exit_on_signals,
    parameter_error_line,
    report,
)
from .vocabulary import (DTYPES, MODEL_FLAGS, add_device_argument, add_dtype_argument, add_generation_arguments,
                         add_model_arguments, add_no_progress_argument, add_threads_argument, check_threads,
                         check_tiny_seed, generation_flags, params_from_args, set_threads)

PROG = "xa-generate"
# GenerationParams field -> the flag that sets it, so errors name what the user typed.
FLAGS = {**generation_flags(), "lora": "--lora/--sdxl-lora"}
# Parameter names the plugin loaders and the pipeline use in errors raised after loading
# -> their flags (only for naming the error; accepted texts are not rewritten with these).
PLUGIN_FLAGS = {
    "init_image": "--init-image",
    "controlnet": "--controlnet",
    "control_image": "--control-image",
    "control_type": "--control-type",
    "t2i_adapter": "--t2i-adapter",
    "nexus_adapter": "--nexus-adapter",
    "ip_adapter": "--ip-adapter",
    "ip_image": "--ip-image",
    "ip_scale": "--ip-scale",
    "image_encoder": "--image-encoder",
    "lora_mode": "--lora-mode",
}
# Flags whose values are paths, for naming the flag of a loading error that quotes one.
PATH_FLAGS = (*MODEL_FLAGS, "--sdxl-vae", "--lora", "--sdxl-lora", "--controlnet", "--control-image", "--t2i-adapter",
              "--t2i-image", *(f for row in GENERIC_KINDS for f in row.flags[:2]), "--ip-adapter", "--ip-image",
              "--image-encoder", "--init-image", "--onnx-dir")
# Versions recorded with every output.
VERSIONED = ("torch", "diffusers", "transformers", "safetensors", "numpy", "pillow")

EPILOG = """\
Without --sd15, --sdxl and --adapter the built-in tiny random models run (offline, CPU,
seconds): a smoke run whose images are noise-like. Give all three for real weights:
diffusers folders or single .safetensors files for SD1.5 and SDXL, and the X-Adapter
checkpoint (X_Adapter_v1.bin or a .safetensors copy). Nothing is ever fetched from a hub.

Outputs: with several images (--batch > 1 or several --prompt) the files are out.png,
out-1.png, out-2.png, ... in prompt-major order; each PNG carries its parameters as JSON
in a text chunk "parameters", and out.json (one per run) records every parameter, the
resolved seed and sizes, model paths, versions, device, dtype and seconds per stage.
"""


def build_parser() -> argparse.ArgumentParser:
    ap = CheckedParser(
        prog=PROG,
        description="Generate images with X-Adapter: an SD1.5 branch guiding SDXL through mapping layers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models = ap.add_argument_group("models (all three, or none for the built-in tiny models)")
    add_model_arguments(models)
    models.add_argument("--sdxl-vae", metavar="PATH", help="replacement SDXL VAE (e.g. the fp16-fix VAE): folder or file")

    gen = ap.add_argument_group("generation")
    add_generation_arguments(gen, [p.name for p in PARAMETERS if p.name != "strength"])  # --strength: with --init-image

    run = ap.add_argument_group("run")
    add_device_argument(run)
    add_dtype_argument(run)
    add_threads_argument(run)
    run.add_argument("--output", required=True, metavar="OUT.png",
                     help="PNG to write (+ OUT-1.png ... for several images, OUT.json sidecar)")
    run.add_argument("--runtime", default="", metavar="LIST",
                     help="comma-separated optimisations: " + ", ".join(RUNTIME_SWITCHES) + ", or lean for all "
                          "(default: plain eager PyTorch)")
    run.add_argument("--offload", choices=["none", "encoders-vaes"], default="none",
                     help="keep text encoders and VAEs on the CPU between uses (default %(default)s)")
    add_backend_arguments(run)
    add_no_progress_argument(run)
    add_debug_argument(run)
    run.add_argument("--version", action="version", version=f"%(prog)s {xa_runtime.__version__}")
    add_plugin_arguments(ap)
    return ap


def _flag(name: str) -> str:
    return name if name.startswith("-") else FLAGS.get(name) or PLUGIN_FLAGS.get(name, name)


def _with_flags(text: str) -> str:
    # Accepted-range texts mention other parameters by field name (e.g. num_inference_steps).
    names = [n for n in FLAGS if "_" in n]
    return re.sub(r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b", lambda m: FLAGS[m.group(1)], text)


def describe(error: ParameterError) -> str:
    """One line naming the flag, the value and what is accepted."""
    return parameter_error_line(error, _flag(error.name), _with_flags(error.accepted))


def uses_tiny_models(args: argparse.Namespace) -> bool:
    """True without model paths; UsageError when only some of the three are given."""
    given = {flag: getattr(args, flag[2:]) for flag in MODEL_FLAGS}
    if args.tiny and any(value is not None for value in given.values()):
        raise UsageError("--tiny takes no model paths (got " + ", ".join(f for f, v in given.items() if v) + ")")
    if all(value is None for value in given.values()):
        if args.sdxl_vae is not None:
            raise UsageError("--sdxl-vae needs --sd15, --sdxl and --adapter (the tiny models bring their own VAE)")
        return True
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise UsageError(
            f"{' and '.join(missing)} missing: give all of --sd15, --sdxl and --adapter (real weights), "
            "or none of them (the built-in tiny models)"
        )
    if args.tiny_seed is not None:
        raise UsageError("--tiny-seed only applies to the built-in tiny models (no --sd15/--sdxl/--adapter)")
    return False


def size_rules(tiny: bool) -> SizeRules:
    if not tiny:
        return SizeRules()
    return SizeRules(sd15_default=get_preset("tiny-sd15").default_size, sdxl_default=get_preset("tiny-sdxl").default_size)


def check_output(output: str, count: int = 1) -> Path:
    """The --output path, after checking every file the run writes (`count` images and the
    sidecar): none is a folder, and their folder is writable."""
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise ParameterError("--output", output, "a file name ending in .png")
    folder = path.parent
    if not folder.is_dir():
        raise ParameterError("--output", output, f"a .png path in an existing folder; {str(folder)!r} is not a folder")
    if path.is_dir():
        raise ParameterError("--output", output, "a .png file path; this is a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ParameterError("--output", output, f"a .png path in a writable folder; {str(folder)!r} is not writable")
    check_output_files("--output", output, [*image_paths(path, count), sidecar_path(path)])
    return path


def check_models(args: argparse.Namespace) -> None:
    from ..loading import check_model_path

    check_model_path(args.sd15, "sd15", "--sd15")
    check_model_path(args.sdxl, "sdxl", "--sdxl")
    check_model_path(args.adapter, "adapter", "--adapter")
    if args.sdxl_vae is not None:
        check_model_path(args.sdxl_vae, "vae", "--sdxl-vae")


RUNTIME_SWITCHES = {  # --runtime names -> RuntimeConfig fields
    "kernels": "triton_kernels", "streams": "streams", "cuda-graphs": "cuda_graphs", "compile": "compile",
    "channels-last": "channels_last", "mixed-layout": "channels_last", "fuse-qkv": "fuse_qkv",
}


def runtime_names(args: argparse.Namespace) -> list[str]:
    """The --runtime names (lean expanded), checked against --backend and --device; needs no torch."""
    names = [n.strip() for n in args.runtime.split(",") if n.strip()]
    if "lean" in names:
        names = [n for n in names if n != "lean"] + list(RUNTIME_SWITCHES)
    unknown = [n for n in names if n not in RUNTIME_SWITCHES]
    if unknown:
        raise ParameterError("--runtime", unknown[0], f"comma-separated names from {', '.join(RUNTIME_SWITCHES)}, lean")
    if names and getattr(args, "backend", "torch") != "torch":
        raise ParameterError("--runtime", args.runtime, "nothing with --backend " + args.backend + " (it optimises the torch backend)")
    if args.device != "cuda" and "cuda-graphs" in names:
        raise ParameterError("--runtime", "cuda-graphs", "names without cuda-graphs (or lean) unless --device cuda")
    return names


def runtime_config(args: argparse.Namespace) -> Any:
    """The RuntimeConfig that --runtime and --offload name, checked against --device."""
    from ..runtime import MIXED_LAYOUT, RuntimeConfig

    names = runtime_names(args)
    fields: dict[str, Any] = {RUNTIME_SWITCHES[n]: True for n in names}
    if "mixed-layout" in names and "channels-last" not in names:  # channels-last (all parts) includes it
        fields["channels_last"] = MIXED_LAYOUT
    config = RuntimeConfig(**fields, offload=args.offload.replace("-", "_"))
    config.check_device(args.device)
    return config


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ParameterError("--device", device, f"cpu here: CUDA is not available ({why}, torch {torch.__version__})")


def check_memory(args: argparse.Namespace, tiny: bool, p: GenerationParams, prompts: int) -> None:
    """ParameterError naming --batch (or the sizes) when the run's estimated activation memory
    (runtime.memory.estimate_generation_bytes) exceeds all the memory of the device."""
    from ..runtime.memory import device_memory_bytes, estimate_generation_bytes

    capacity = device_memory_bytes(args.device)
    if capacity is None:
        return
    presets = (get_preset("tiny-sdxl"), get_preset("tiny-sd15")) if tiny else (get_preset("sdxl"), get_preset("sd15"))
    widths = tuple(pr.vae["block_out_channels"][0] for pr in presets)
    dtype_bytes = 4 if args.dtype == "fp32" else 2
    images = prompts * p.num_images_per_prompt

    def need(n: int) -> int:
        return estimate_generation_bytes(n, p.height * p.width, p.height_sd15 * p.width_sd15, widths, dtype_bytes)

    if need(images) <= capacity:
        return
    fits = max((n for n in range(1, images) if need(n) <= capacity), default=0)
    sizes = (f"--height {p.height} --width {p.width} and --height-sd15 {p.height_sd15} --width-sd15 {p.width_sd15}")
    gib = 2**30
    why = (f"{images} images at {sizes} need about {need(images) / gib:.0f} GiB of memory (estimated), more than "
           f"all of this {args.device}'s {capacity / gib:.0f} GiB")
    if fits:
        images_fit = f"at most {fits} image{'s' if fits > 1 else ''}"
        raise ParameterError("--batch", args.batch, f"{images_fit} in all at these sizes: {why}")
    raise ParameterError("--height", p.height, f"smaller sizes: {why}, even for one image")


def _blame(error: Exception, args: argparse.Namespace) -> str:
    """Prefix a loading error with the flag whose path it mentions (the longest match)."""
    from ..plugins.lora import parse_lora_argument

    text = str(error)
    hits: dict[str, int] = {}
    for flag in PATH_FLAGS:
        values = getattr(args, flag[2:].replace("-", "_"), None)
        for value in values if isinstance(values, list) else [values]:
            path = parse_lora_argument(value)[0] if value and flag.endswith("lora") else value
            if path and str(path) in text:
                hits[flag] = max(hits.get(flag, 0), len(str(path)))
    if not hits:
        return text
    longest = max(hits.values())
    return f"{'/'.join(f for f, n in hits.items() if n == longest)}: {text}"


def versions() -> dict[str, str]:
    import importlib.metadata  # here, not at the top: ~0.1 s that --help and bad arguments need not pay

    found = {"xa_runtime": xa_runtime.__version__, "python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    try:  # Linux: the CPU model; elsewhere (or unreadable) the architecture
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _warning_line(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    # Library warnings (e.g. a prompt cut at the token limit) as one `warning: ...` line.
    print(f"warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def _library_output(progress: bool) -> Iterator[None]:
    """Library warnings as `warning:` lines; without progress, the loaders' bars off too
    (restored afterwards, so that main() can be called in-process)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    bars = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        with warnings.catch_warnings():  # restores showwarning on exit
            warnings.simplefilter("default", UserWarning)
            warnings.showwarning = _warning_line
            if not progress:
                for module, _ in bars:
                    module.disable_progress_bar()
            yield
    finally:
        for module, enabled in bars:
            if enabled:
                module.enable_progress_bar()
            else:
                module.disable_progress_bar()


@dataclass(frozen=True)
class CheckedInputs:
    """What check_inputs found: tiny models?, the parameters with sizes left as given, the
    output path, the runtime configuration, the plugin specs and the LoRAs already read (by path)."""

    tiny: bool
    params: GenerationParams
    output: Path
    runtime: Any
    plugins: list[Any]
    loras: dict[str, Any]


def check_inputs(args: argparse.Namespace) -> CheckedInputs:
    """Everything that can be checked without loading a model, cheapest first."""
    tiny = uses_tiny_models(args)
    check_tiny_seed(args)
    args.threads = check_threads(args)
    params = params_from_args(args)
    # A check only: sizes left unset resolve to the loaded models' own defaults in generate (which
    # warns, as one `warning:` line, when the SD1.5 size cannot keep the SDXL aspect).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AspectWarning)
        resolved = validate(params, size_rules(tiny))
    output = check_output(args.output, len(args.prompt) * args.batch)
    runtime_names(args)
    # From here on the checks read files or ask torch (model headers, CUDA, plugin files).
    if not tiny:
        check_models(args)
    check_device(args.device)
    check_memory(args, tiny, resolved, len(args.prompt))
    set_threads(args.threads)
    runtime = runtime_config(args)
    plugins = check_plugin_arguments(args)
    check_backend(args, tiny, plugins, UsageError)
    loras = check_plugin_files(plugins)
    return CheckedInputs(tiny, params, output, runtime, plugins, loras)


def load_pipeline(args: argparse.Namespace, tiny: bool, runtime: Any) -> Any:
    import torch

    from ..pipeline import XAdapterPipeline

    dtype = getattr(torch, DTYPES[args.dtype])
    progress = not args.no_progress
    if tiny:
        print(f"{PROG}: tiny random model: the image is noise-like (built-in random weights, seed "
              f"{args.tiny_seed or 0}; give --sd15, --sdxl and --adapter for real weights)", file=sys.stderr)
        return XAdapterPipeline.from_tiny(args.tiny_seed or 0, device=args.device, dtype=dtype, progress=progress,
                                          runtime=runtime)
    return XAdapterPipeline.from_pretrained(
        args.sd15, args.sdxl, args.adapter, sdxl_vae=args.sdxl_vae, device=args.device, dtype=dtype, progress=progress,
        runtime=runtime,
    )


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()  # as the run used them (--threads / default_threads)


def records(args: argparse.Namespace, tiny: bool, result: Any, seconds: dict[str, float], command: list[str],
            plugins: Sequence[Any] = ()):
    """(the sidecar's record, one PNG text record per image)."""
    p = result.params  # resolved: sizes and the seed as used
    parameters = {k: v for k, v in p.to_dict().items() if k not in ("extra", "output_type")}
    models = (
        {"kind": "tiny", "tiny_seed": args.tiny_seed or 0}
        if tiny
        else {"kind": "pretrained", "sd15": args.sd15, "sdxl": args.sdxl, "adapter": args.adapter, "sdxl_vae": args.sdxl_vae}
    )
    run = {"device": args.device, "device_name": device_name(args.device), "dtype": args.dtype,
           "runtime": args.runtime, "offload": args.offload, "backend": getattr(args, "backend", "torch"),
           "threads": _torch_threads()}
    record = {
        "parameters": parameters,
        "models": models,
        **run,
        "versions": versions(),
        "plugins": plugin_record(list(plugins)),
        "init_image": args.init_image,
        "timings": dict(result.timings),
        "overheads": dict(getattr(result, "overheads", {})),  # compile / graph capture, inside the timings
        "peak_memory_bytes": getattr(result, "peak_memory", None),
        **seconds,
        "command": command,
    }
    from ..infotext import file_hash, plugin_entries

    entries = plugin_entries(plugin_record(list(plugins)))  # file, short hash, scales, window: enough to redo it
    init = ({"path": args.init_image, "file": Path(args.init_image).name, "sha256": file_hash(args.init_image)}
            if args.init_image else None)
    per_image = [
        {**parameters, "image_index": i, "prompt_index": i // p.num_images_per_prompt, "models": models, **run,
         "plugins": entries, "init_image": init, "xa_runtime": xa_runtime.__version__}
        for i in range(len(result.images))
    ]
    return record, per_image


# plugin kind -> {entry key: per-plugin flag}; its path and image flags are the table row's first two
_PLUGIN_SETTINGS = {
    "controlnet": {"control_type": "--control-type", "conditioning_scale": "--controlnet-scale",
                   "guidance_start": "--control-start", "guidance_end": "--control-end"},
    "t2i": {"scale": "--t2i-scale", "conditioning_factor": "--t2i-factor"},
    "nexus": {"scale": "--nexus-scale"},
}


def arguments_from_record(record: dict[str, Any]) -> list[str]:
    """The xa-generate arguments that made an image, from its PNG's JSON chunk (`xa_runtime`)
    alone (without --output): every parameter with a flag, the models, device, dtype, runtime,
    backend, plugins and init image. Each plugin and init-image file is checked against the
    sha256 recorded: ParameterError naming it where the file at that path changed."""
    from ..infotext import file_hash
    from ..plugin_kinds import KINDS, LORA_KINDS

    argv: list[str] = []
    for row in PARAMETERS:
        value = record.get(row.name)
        if not row.flag or value is None or (row.name == "strength" and not record.get("init_image")):
            continue
        for v in value if isinstance(value, list) and row.kind == TEXT else [value]:
            argv += [row.flag, str(v)]
    models = record.get("models") or {}
    if models.get("kind") == "tiny":
        argv += ["--tiny-seed", str(models.get("tiny_seed", 0))]
    else:
        for key in ("sd15", "sdxl", "adapter", "sdxl_vae"):
            if models.get(key):
                argv += [f"--{key.replace('_', '-')}", str(models[key])]
    argv += ["--device", record.get("device", "cpu"), "--dtype", record.get("dtype", "fp32"),
             "--offload", record.get("offload") or "none", "--backend", record.get("backend") or "torch"]
    if record.get("runtime"):
        argv += ["--runtime", record["runtime"]]

    def checked(entry: dict[str, Any], what: str) -> str:
        path, recorded = entry["path"], entry.get("sha256")
        if recorded and file_hash(path, addnet=entry.get("kind") in LORA_KINDS) != recorded:
            raise ParameterError(what, path, f"the file recorded with the image (sha256 {recorded[:10]}...); it changed")
        return path

    for entry in record.get("plugins") or []:
        kind = entry["kind"]
        if kind in LORA_KINDS:
            flag = KINDS[kind].flags[0]
            argv += [flag, f"{checked(entry, flag)}:{entry.get('scale', 1.0)}", "--lora-mode", entry.get("mode", "fused")]
        elif kind in _PLUGIN_SETTINGS:
            flag, image_flag = KINDS[kind].flags[:2]
            argv += [flag, checked(entry, flag), image_flag, entry["image"]]
            for key, setting in _PLUGIN_SETTINGS[kind].items():
                if entry.get(key) is not None:
                    argv += [setting, str(entry[key])]
            if entry.get("guess_mode"):
                argv.append("--guess-mode")
        elif kind == "ip_adapter":
            argv += ["--ip-adapter", checked(entry, "--ip-adapter"), "--ip-scale", str(entry.get("scale", 1.0))]
            for image in entry.get("images", []):
                argv += ["--ip-image", image]
            if entry.get("image_encoder"):
                argv += ["--image-encoder", entry["image_encoder"]]
    init = record.get("init_image")
    if init:
        argv += ["--init-image", checked(init, "--init-image")]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Run `xa-generate`; returns the exit code (0 ok, 2 bad input, nothing written; 130 / 143
    stopped by SIGINT / SIGTERM, nothing written)."""
    return exit_on_signals(PROG, lambda: _main(argv))


def _main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    command = [PROG, *(sys.argv[1:] if argv is None else argv)]
    debug = debug_requested(argv)
    try:
        args = build_parser().parse_args(argv)
        checked = check_inputs(args)
        tiny, params, output = checked.tiny, checked.params, checked.output
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    except UsageError as e:
        return report(str(e), debug)
    except ParameterError as e:
        return report(describe(e), debug)
    except CheckpointError as e:  # a plugin file or folder that cannot be read
        return report(_blame(e, args), debug)

    with _library_output(progress=not args.no_progress):
        backend = None
        try:
            t0 = time.perf_counter()
            pipe = load_pipeline(args, tiny, checked.runtime)
            t1 = time.perf_counter()
            # before the LoRAs: exported / checked graphs are the base weights
            backend = open_cli_backend(args, pipe, tiny, checked.plugins)
            pipe = backend.pipeline
            plugins = pipe.load_plugins(checked.plugins, loras=checked.loras)
            loras_to_backend(backend, pipe)
            result = pipe.generate(params, plugins=plugins, init_image=load_init_image(args.init_image))
            t2 = time.perf_counter()
        except ParameterError as e:
            return report(describe(e), debug)
        except (CheckpointError, OSError) as e:  # a file that passed the cheap checks but does not load
            return report(_blame(e, args), debug)
        except NonFiniteError as e:  # NaN / inf latents or pixels: no image is written
            return report(str(e), debug)
        finally:
            if backend is not None:
                backend.close()

    seconds = {"load_seconds": t1 - t0, "generate_seconds": t2 - t1, "total_seconds": t2 - started}
    record, per_image = records(args, tiny, result, seconds, command, checked.plugins)
    try:
        written = write_outputs(output, result.images, record, per_image)
    except OSError as e:  # all or nothing: no file of this run is left
        return report(f"--output {str(output)!r}: cannot write the outputs ({e})", debug)
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    print(f"{PROG}: wrote {', '.join(str(w) for w in written)} (seed {result.params.seed}; "
          f"load {t1 - t0:.2f}s, {stages})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
