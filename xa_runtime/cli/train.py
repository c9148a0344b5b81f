"""`xa-train`: train the X-Adapter mapping layers for a model pair, as the paper did.

Every input is checked before any training step (options before torch is imported, then
output folder, model paths, data, resume checkpoint); a bad one exits with code 2 and a
one-line `error:` naming the flag. Without --sd15/--sdxl it trains on the built-in tiny
random models. Run it under `accelerate launch` for several processes (docs/training.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import xa_runtime

from ..errors import CheckpointError, ParameterError
from ..training.options import BY_NAME, CHOICE, FLOAT, INT, OPTIONS, PATH, SWITCH, TEXTS, TrainOptions, check_options
from .usage import CheckedParser, UsageError, add_debug_argument, debug_requested, parameter_error_line, report
from .vocabulary import (add_device_argument, add_dtype_argument, add_model_arguments, add_no_progress_argument,
                         add_threads_argument, check_threads, check_tiny_seed, set_threads)

PROG = "xa-train"
EXIT_INTERRUPTED = {"SIGTERM": 143, "SIGINT": 130}  # the shells' 128 + signal number, after the checkpoint

EPILOG = """\
Without --sd15 and --sdxl the built-in tiny random models train (CPU, seconds a step): a
smoke run. --adapter starts from an existing checkpoint instead of fresh mapping layers
(zero_out at zero, so that step 0 is the new model alone). --data is webdataset .tar
shards (img2dataset's jpg/png + txt) or an image folder with metadata.jsonl.

Writes OUTPUT/x_adapter.safetensors (+ .bin with --save-bin) and x_adapter.json (widths,
settings), checkpoints under OUTPUT/checkpoints/ (every --checkpoint-every steps and on
SIGTERM/SIGINT; --resume OUTPUT continues from the newest), TensorBoard logs under
OUTPUT/xa-train, validation images under OUTPUT/validation. Several GPUs or machines:
accelerate launch --multi_gpu --num_processes N -m xa_runtime.cli.train ... (docs/training.md).
"""


GROUPS = {"data": "data", "optimisation": "optimisation (defaults: the paper's)",
          "method": "the method's open choices (docs/training.md)", "run": "run"}


def _add_option(group: Any, row: Any) -> None:
    """The flag of one training option row (training/options.py OPTIONS)."""
    if row.kind == SWITCH:
        group.add_argument(row.cli_flag, dest=row.name, action="store_false" if row.default else "store_true",
                           help=row.help)
    elif row.kind == TEXTS:
        group.add_argument(row.cli_flag, dest=row.name, action="append", metavar=row.metavar, help=row.help)
    elif row.kind == CHOICE:
        group.add_argument(row.cli_flag, dest=row.name, choices=list(row.choices), default=row.default,
                           help=f"{row.help} (default %(default)s)")
    else:
        kind = {INT: int, FLOAT: float, PATH: str}[row.kind]
        default = "" if row.default is None else " (default %(default)s)"
        group.add_argument(row.cli_flag, dest=row.name, type=kind, default=row.default,
                           metavar=row.metavar or ("N" if row.kind == INT else "F"), help=row.help + default)


def build_parser() -> argparse.ArgumentParser:
    ap = CheckedParser(prog=PROG, description="Train X-Adapter mapping layers for an SD1.5-like and SDXL-like pair.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = ap.add_argument_group("models (--sd15 and --sdxl, or none for the built-in tiny models)")
    add_model_arguments(models)
    for action in models._group_actions:
        if action.dest == "adapter":
            action.help = "X-Adapter checkpoint to start from (default: fresh mapping layers, zero_out at zero)"
    models.add_argument("--sdxl-vae", metavar="PATH", help="replacement SDXL VAE (e.g. the fp16-fix VAE): folder or file")
    groups = {key: ap.add_argument_group(title) for key, title in GROUPS.items()}
    groups["data"].add_argument("--data", required=True, metavar="PATH",
                                help="webdataset .tar shards (folder, file, glob or {00000..00009} pattern) or an image "
                                     "folder with metadata.jsonl")
    for row in OPTIONS:
        if row.cli_flag:
            _add_option(groups[row.group], row)
    run = groups["run"]
    add_device_argument(run)
    add_dtype_argument(run, what=BY_NAME["dtype"].help)
    add_threads_argument(run)
    run.add_argument("--output", required=True, metavar="DIR", help="folder for the adapter, checkpoints and logs")
    run.add_argument("--resume", metavar="PATH", help="continue from a checkpoint folder, or the newest under an output folder")
    add_no_progress_argument(run)
    add_debug_argument(run)
    run.add_argument("--version", action="version", version=f"%(prog)s {xa_runtime.__version__}")
    return ap


def options_from_args(args: argparse.Namespace) -> Any:
    fields = {row.name: getattr(args, row.name) for row in OPTIONS if hasattr(args, row.name)}  # rows without a flag: defaults
    if fields.get("validation_prompts") is None:
        fields["validation_prompts"] = BY_NAME["validation_prompts"].default
    else:
        fields["validation_prompts"] = tuple(fields["validation_prompts"])
    return TrainOptions(**fields)


def uses_tiny_models(args: argparse.Namespace) -> bool:
    if args.sd15 is None and args.sdxl is None:
        if args.sdxl_vae is not None:
            raise UsageError("--sdxl-vae needs --sd15 and --sdxl (the tiny models bring their own VAE)")
        return True
    if args.tiny or args.sd15 is None or args.sdxl is None:
        raise UsageError("give both --sd15 and --sdxl (real weights), or neither (the built-in tiny models)")
    if args.tiny_seed is not None:
        raise UsageError("--tiny-seed only applies to the built-in tiny models (no --sd15/--sdxl)")
    return False


def check_output(output: str) -> Path:
    """--output: a folder (created) that can be written: a probe file is written and removed."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ParameterError("--output", output, "a folder (it is created); this is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".xa-train-probe.", dir=path)
        os.write(fd, b"\0" * 4096)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ParameterError("--output", output, f"a writable folder ({e.strerror or e})") from None
    return path


def check_free_space(output: Path, parameters: int) -> None:
    """A checkpoint holds the mapping layers and AdamW's two moments in fp32 (12 bytes a
    parameter) and the old one stays until the new is complete: room for two is required."""
    need = 2 * 12 * parameters + (64 << 20)
    free = shutil.disk_usage(output).free
    if free < need:
        raise ParameterError("--output", str(output), f"a folder with at least {need >> 20} MiB free for checkpoints; "
                             f"{free >> 20} MiB free")


def load_models(args: argparse.Namespace, tiny: bool, dtype_name: str) -> Any:
    import torch

    from ..loading import check_model_path, load_mapping, load_sd15, load_sdxl
    from ..models.mapping import MappingConfig
    from ..training import TrainModels

    if tiny:
        from ..models.tiny import build_tiny_models

        seed = check_tiny_seed(args)
        sd15, sdxl, _ = build_tiny_models(seed)
        identity: dict[str, Any] = {"kind": "tiny", "tiny_seed": seed}
    else:
        check_model_path(args.sd15, "sd15", "--sd15")
        check_model_path(args.sdxl, "sdxl", "--sdxl")
        if args.sdxl_vae is not None:
            check_model_path(args.sdxl_vae, "vae", "--sdxl-vae")
        sd15 = load_sd15(args.sd15)
        sdxl = load_sdxl(args.sdxl, vae_path=args.sdxl_vae)
        identity = {"kind": "paths", "sd15": str(Path(args.sd15).resolve()), "sdxl": str(Path(args.sdxl).resolve()),
                    "sdxl_vae": str(Path(args.sdxl_vae).resolve()) if args.sdxl_vae else None}
    try:
        config = MappingConfig.from_unet_configs(sd15.unet.config, sdxl.unet.config)
    except ValueError as e:
        raise ParameterError("--sd15/--sdxl", "", f"an SD1.5-like and an SDXL-like UNet whose widths pair: {e}") from None
    init = None
    if args.adapter is not None:
        check_model_path(args.adapter, "adapter", "--adapter")
        init = load_mapping(args.adapter, config, dtype=torch.float32)
        identity = {**identity, "init_adapter": str(Path(args.adapter).resolve())}
    return TrainModels(sd15, sdxl, init, identity), config


def _flag_line(e: ParameterError) -> str:
    name = e.name if e.name.startswith("-") else "--" + e.name.replace("_", "-")
    return parameter_error_line(e, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `xa-train`; returns the exit code (0 done, 2 bad input, 143/130 stopped by SIGTERM/SIGINT
    after writing a checkpoint)."""
    debug = debug_requested(argv)
    try:
        args = build_parser().parse_args(argv)
        tiny = uses_tiny_models(args)
        check_tiny_seed(args)
        threads = check_threads(args)
        options = check_options(options_from_args(args))
        if args.device == "cpu" and options.dtype == "fp16":
            raise ParameterError("--dtype", "fp16", "fp32 or bf16 with --device cpu (fp16 mixed precision needs a GPU)")
        output = check_output(args.output)
        from ..training.data import open_source

        open_source(args.data)
        if args.resume is not None:
            from ..training.checkpoint import resolve_resume

            resolve_resume(args.resume)
        from .generate import check_device

        check_device(args.device)
        set_threads(threads)
        models, config = load_models(args, tiny, options.dtype)
        from ..models.mapping import MappingLayers

        check_free_space(output, sum(p.numel() for p in MappingLayers(config).parameters()))
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    except UsageError as e:
        return report(str(e), debug)
    except ParameterError as e:
        return report(_flag_line(e), debug)
    except CheckpointError as e:
        return report(str(e), debug)

    from ..training import DataError, train

    try:
        result = train(models, args.data, output, options, device=args.device, resume=args.resume,
                       progress=not args.no_progress)
    except ParameterError as e:  # data, resume and process-count checks run inside, before the first step
        return report(_flag_line(e), debug)
    except DataError as e:
        return report(f"--data {args.data!r}: {e}", debug)
    if result.stopped_by is not None:
        print(f"{PROG}: stopped by {result.stopped_by} after step {result.step}; checkpoint {result.checkpoint} "
              f"(continue with --resume {output})", file=sys.stderr)
        return EXIT_INTERRUPTED.get(result.stopped_by, 1)
    if result.adapter:
        print(f"{PROG}: {result.step} steps; wrote {', '.join(str(p) for p in result.adapter)} "
              f"(samples: {result.stats.describe()})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
