"""`xa-build-engines`: TensorRT engines from exported ONNX (xa-export's folder), or from model
paths (exported first into --onnx-dir); without model paths and without an exported
--onnx-dir, the built-in tiny models are exported there first (as with --tiny). Every flag is checked before any work (no export,
no TensorRT import): a bad one exits with code 2 and an `error:` line naming the flag and
what it accepts. Without TensorRT, exit 2 saying how to install it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import xa_runtime

from ..errors import CheckpointError, ParameterError
from ..graphs import GRAPHS, SDXL_MODE_ROLES, DimRange, check_sdxl_mode, default_build_graphs, has_graph
from .usage import CheckedParser, UsageError, add_debug_argument, debug_requested, parameter_error_line, report
from .vocabulary import MODEL_HELP, add_dtype_argument, add_no_progress_argument, check_tiny_seed

PROG = "xa-build-engines"
# split by default: the set xa-build-engines has always built; --sdxl-mode fused builds sdxl_unet_fused
DEFAULT_SDXL_MODE = "split"
MODEL_FLAGS = ("--sd15", "--sdxl", "--adapter", "--controlnet")


def build_parser() -> argparse.ArgumentParser:
    from ..engines.manifest import PRESETS, REFIT_MODES

    p = CheckedParser(prog=PROG, description="Build TensorRT engines (NAME.plan + NAME.engine.json) from exported ONNX graphs")
    p.add_argument("--onnx-dir", required=True, metavar="DIR",
                   help="xa-export folder to read (or, with model paths or --tiny, to export into)")
    p.add_argument("--output", required=True, metavar="DIR", help="engine cache folder (created if its parent exists)")
    for flag in MODEL_FLAGS:
        what = MODEL_HELP.get(flag, "SD1.5 ControlNet folder or file")
        p.add_argument(flag, metavar="PATH", help=f"{what}: exported into --onnx-dir first (as xa-export {flag})")
    p.add_argument("--tiny", action="store_true",
                   help="export the built-in tiny random models into --onnx-dir first (without model paths and "
                        "without an exported --onnx-dir this is what runs)")
    p.add_argument("--tiny-seed", type=int, default=None, metavar="N",
                   help="seed of the built-in tiny random models, >= 0 (default 0)")
    p.add_argument("--graphs", help="comma-separated graph names (default: those of --sdxl-mode, plus the ControlNet "
                   "variant sd15_unet_control when exported)")
    p.add_argument("--sdxl-mode", default=DEFAULT_SDXL_MODE, help=f"{' or '.join(SDXL_MODE_ROLES)}: the SDXL graphs "
                   f"built without --graphs (split: {','.join(default_build_graphs('split'))}; fused: "
                   f"{','.join(default_build_graphs('fused'))}; default %(default)s)")
    add_dtype_argument(p, "--precision", default="fp16",
                       what="engine precision (--precision: the older spelling); fp16 by default: engines are for the GPU")
    p.add_argument("--preset", help=f"profile preset in pixels: {', '.join(PRESETS)} ('1024 only', '512-1536')")
    for which in ("min", "opt", "max"):
        p.add_argument(f"--{which}", help=f"{which} profile shape ROWS,HEIGHT,WIDTH in pixels (e.g. 2,1024,1024)")
    p.add_argument("--static", action="store_true", help="static shapes: min = max = opt")
    p.add_argument("--refit", default="refit", help=f"{' / '.join(REFIT_MODES)}: refit (default): LoRA target "
                   "weights refittable; strip: also left out of the plan, refitted from the ONNX weights at load")
    p.add_argument("--timing-cache", help="timing cache file, read and updated (default OUTPUT/timing.cache)")
    p.add_argument("--no-timing-cache", action="store_true", help="use no persistent timing cache")
    add_no_progress_argument(p)
    add_debug_argument(p)
    p.add_argument("--version", action="version", version=f"%(prog)s {xa_runtime.__version__}")
    return p


def check_inputs(args: argparse.Namespace) -> tuple[list[str], Path, Path, dict[str, dict[str, DimRange]]]:
    """Graph names, ONNX folder, engine folder and per-graph profiles; raises ParameterError / UsageError."""
    from ..engines import manifest as mf

    mf.check_choice("--dtype", args.dtype, mf.PRECISIONS)
    mf.check_choice("--refit", args.refit, mf.REFIT_MODES)
    check_sdxl_mode(args.sdxl_mode, "--sdxl-mode", auto=False)
    if args.static and args.min is not None or args.static and args.max is not None:
        raise UsageError("--static takes --opt only (min = max = opt)")
    if args.no_timing_cache and args.timing_cache:
        raise UsageError("--timing-cache and --no-timing-cache exclude each other")
    given = [f for f in MODEL_FLAGS if getattr(args, f[2:]) is not None]
    if args.tiny and given:
        raise UsageError(f"--tiny takes no model paths (got {', '.join(given)})")
    if given and args.tiny_seed is not None:
        raise UsageError("--tiny-seed only applies to the built-in tiny models (no model paths)")
    check_tiny_seed(args)
    # No model paths and no exported graphs to read (no NAME.onnx in --onnx-dir): the built-in
    # tiny models are exported into --onnx-dir first, as with --tiny.
    if not given and not (Path(args.onnx_dir).is_dir() and any(Path(args.onnx_dir).glob("*.onnx"))):
        args.tiny = True
    exporting = args.tiny or bool(given)
    onnx_dir, out = Path(args.onnx_dir), Path(args.output)
    if args.graphs is None:
        names = default_build_graphs(args.sdxl_mode, has_graph(onnx_dir, "onnx") if not exporting else lambda g: False)
    else:
        names = [n.strip() for n in args.graphs.split(",") if n.strip()]
        bad = [n for n in names if n not in GRAPHS]
        if bad or not names:
            raise ParameterError("--graphs", args.graphs, f"comma-separated names among {', '.join(GRAPHS)}")
    profiles = {n: mf.resolve_profiles(GRAPHS[n], args.preset, args.min, args.opt, args.max, args.static) for n in names}
    for flag, folder in (("--output", out), ("--onnx-dir", onnx_dir)):
        if folder.exists() and not folder.is_dir():
            raise ParameterError(flag, str(folder), "a folder; this is a file")
        if not folder.exists() and not (exporting or flag == "--output") or not folder.parent.is_dir():
            raise ParameterError(flag, str(folder), "an existing folder" if flag == "--onnx-dir" and not exporting
                                 else "a folder whose parent exists")
    for flag, folder in (("--output", out), ("--onnx-dir", onnx_dir)):
        writes_in = folder if folder.exists() else folder.parent
        if (flag == "--output" or exporting) and not os.access(writes_in, os.W_OK | os.X_OK):
            raise ParameterError(flag, str(folder), f"a writable folder; {str(writes_in)!r} is not writable")
    if not exporting:
        missing = [n for n in names if not (onnx_dir / f"{n}.onnx").is_file() or not (onnx_dir / f"{n}.names.json").is_file()]
        if missing:
            raise ParameterError("--onnx-dir", str(onnx_dir), f"an xa-export folder with {', '.join(missing)} "
                                 "(.onnx and .names.json); export them, or give model paths")
    return names, onnx_dir, out, profiles


def _export_argv(args: argparse.Namespace, names: list[str]) -> list[str]:
    argv = ["--output", args.onnx_dir, "--graphs", ",".join(names)]
    if args.tiny:
        argv += ["--tiny-seed", str(args.tiny_seed), "--tiny"] if args.tiny_seed is not None else ["--tiny"]
    else:
        argv += [x for f in MODEL_FLAGS if getattr(args, f[2:]) for x in (f, getattr(args, f[2:]))]
    return argv + (["--no-progress"] if args.no_progress else []) + (["--debug"] if args.debug else [])


def main(argv: Sequence[str] | None = None) -> int:
    """Run `xa-build-engines`; returns the exit code (0 ok, 2 bad input or no TensorRT)."""
    debug = debug_requested(argv)
    try:
        args = build_parser().parse_args(argv)
        names, onnx_dir, out, profiles = check_inputs(args)
    except SystemExit as e:
        return int(e.code or 0)
    except UsageError as e:
        return report(str(e), debug)
    except ParameterError as e:
        return report(parameter_error_line(e, e.name), debug)
    from ..availability import NOT_INSTALLED, tensorrt_installed

    if not tensorrt_installed():  # neither the library nor only tensorrt-stubs can build
        return report(NOT_INSTALLED, debug)
    from ..engines import build
    if args.tiny or any(getattr(args, f[2:]) for f in MODEL_FLAGS):
        from .export import main as export_main

        if args.tiny:
            print(f"{PROG}: the built-in tiny random models (no model paths): exporting them into {onnx_dir} first",
                  file=sys.stderr)

        code = export_main(_export_argv(args, names))
        if code:
            return code
    cache = None if args.no_timing_cache else Path(args.timing_cache or out / build.TIMING_CACHE)
    try:
        paths = build.build_engines(names, onnx_dir, out, args.dtype, profiles, args.refit, cache,
                                    progress=not args.no_progress)
    except (CheckpointError, OSError) as e:
        return report(str(e), debug)
    print(f"{PROG}: wrote {len(paths)} engines to {out} ({args.dtype}, refit {args.refit})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
