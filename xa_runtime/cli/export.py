"""`xa-export`: the graphs of the table as ONNX files, from local models or the tiny ones.

The folder gets a manifest.json (export/manifest.py), written last; a folder whose manifest
names other source weights is refused unless --force.

Every input is checked before any model is loaded (graph names, dtype, opset, device,
output folder, model paths, which models the chosen graphs need); a bad one exits with
code 2 and a one-line `error:` naming the flag, and writes nothing. The checks that need
nothing but the command line run before torch is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import xa_runtime

from ..errors import CheckpointError, ParameterError
from ..graphs import GRAPHS
from .usage import (CheckedParser, UsageError, add_debug_argument, debug_requested, exit_on_signals,
                    parameter_error_line, report)
from .vocabulary import MODEL_HELP, add_device_argument, add_dtype_argument, add_no_progress_argument, check_tiny_seed

PROG = "xa-export"
# what a graph needs -> the flags that give it
NEEDS_FLAGS = {"sd15": ("--sd15",), "sdxl": ("--sdxl",), "mapping": ("--sd15", "--sdxl", "--adapter"),
               "controlnet": ("--sd15", "--controlnet"), "t2i_adapter": ("--sd15", "--t2i-adapter"),
               "ip_adapter": ("--sd15", "--ip-adapter")}
MODEL_FLAGS = ("--sd15", "--sdxl", "--adapter", "--controlnet", "--t2i-adapter", "--ip-adapter")
PARAM_FLAGS = {"graphs": "--graphs", "dtype": "--dtype", "opset": "--opset", "output_dir": "--output"}


def build_parser() -> argparse.ArgumentParser:
    p = CheckedParser(prog=PROG, description="Export X-Adapter graphs to ONNX (one NAME.onnx per graph, NAME.onnx.data "
                "beside it when over ~1.8 GB). Graphs: " + ", ".join(GRAPHS))
    for flag, text in MODEL_HELP.items():
        p.add_argument(flag, metavar="PATH", help=text)
    p.add_argument("--controlnet", metavar="PATH", help="SD1.5 ControlNet folder or file (for the controlnet graph)")
    p.add_argument("--t2i-adapter", metavar="PATH", help="SD1.5 T2I-Adapter diffusers folder (for the t2i_adapter graph)")
    p.add_argument("--ip-adapter", metavar="PATH", help="SD1.5 IP-Adapter file (ip-adapter_sd15.bin, -plus, -full-face; "
                   ".bin or .safetensors) for the sd15_unet_ip graph (its weights are baked in: one graph per file)")
    p.add_argument("--tiny", action="store_true",
                   help="the built-in tiny random models (and a tiny ControlNet, T2I-Adapter and IP-Adapter): the "
                        "default without model paths (the flag is accepted for explicitness)")
    p.add_argument("--tiny-seed", type=int, default=None, metavar="N",
                   help="seed of the built-in tiny random models, >= 0 (default 0)")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder (created if its parent exists)")
    p.add_argument("--graphs", help="comma-separated graph names (default: all the given models allow)")
    add_dtype_argument(p, what="dtype of the exported graphs (ONNX export: fp32 or fp16; bf16 is refused)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    add_device_argument(p, what="where the modules trace")
    p.add_argument("--force", action="store_true",
                   help="export into a folder whose manifest.json names other source weights (replacing it)")
    add_no_progress_argument(p)
    add_debug_argument(p)
    p.add_argument("--version", action="version", version=f"%(prog)s {xa_runtime.__version__}")
    return p


def _given(args: argparse.Namespace) -> set[str]:
    return {f for f in MODEL_FLAGS if _flag_value(args, f) is not None}


def _flag_value(args: argparse.Namespace, flag: str):
    return getattr(args, flag[2:].replace("-", "_"))


def check_inputs(args: argparse.Namespace) -> tuple[list[str], Path]:
    """Validated graph names and output folder; raises ParameterError / UsageError."""
    from ..export.options import DEFAULT_OPSET, check_dtype_name, check_graph_names, check_opset

    given = _given(args)
    if args.tiny and given:
        raise UsageError(f"--tiny takes no model paths (got {', '.join(sorted(given))})")
    if given and args.tiny_seed is not None:
        raise UsageError("--tiny-seed only applies to the built-in tiny models (no model paths)")
    args.tiny = not given  # no model paths: the built-in tiny models
    args.tiny_seed = check_tiny_seed(args)
    check_dtype_name(args.dtype)
    args.opset = check_opset(DEFAULT_OPSET if args.opset is None else args.opset)
    if args.device not in ("cpu", "cuda"):
        raise ParameterError("--device", args.device, "cpu or cuda")
    if args.device == "cuda":
        from .generate import check_device

        check_device("cuda")
    have = set(NEEDS_FLAGS) if args.tiny else {k for k, flags in NEEDS_FLAGS.items() if set(flags) <= given}
    if args.graphs is None:
        names = [n for n, s in GRAPHS.items() if set(s.needs) <= have]
        if not names:
            raise UsageError("these model paths allow no graph: --sd15 or --sdxl, and --adapter with both for mapping")
    else:
        names = check_graph_names([n.strip() for n in args.graphs.split(",") if n.strip()])
        for n in names:
            lacking = sorted({f for part in GRAPHS[n].needs if part not in have for f in NEEDS_FLAGS[part]} - given)
            if lacking:
                raise UsageError(f"graph {n} needs {', '.join(lacking)}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ParameterError("--output", args.output, "a folder; this is a file")
    if not out.exists() and not out.parent.is_dir():
        raise ParameterError("--output", args.output, f"a folder whose parent exists; {str(out.parent)!r} does not")
    import os

    writes_in = out if out.exists() else out.parent
    if not os.access(writes_in, os.W_OK | os.X_OK):
        raise ParameterError("--output", args.output, f"a writable folder; {str(writes_in)!r} is not writable")
    if not args.tiny:
        from ..loading import check_model_path

        for flag, family in (("--sd15", "sd15"), ("--sdxl", "sdxl"), ("--adapter", "adapter")):
            if flag in given:
                check_model_path(getattr(args, flag[2:]), family, flag)
        if "--controlnet" in given and not Path(args.controlnet).exists():
            raise ParameterError("--controlnet", args.controlnet, "an SD1.5 ControlNet folder or file; nothing is there")
        if "--t2i-adapter" in given and not Path(args.t2i_adapter).is_dir():
            raise ParameterError("--t2i-adapter", args.t2i_adapter, "an SD1.5 T2I-Adapter diffusers folder")
        if "--ip-adapter" in given:
            from ..plugins.ip_adapter_loading import IP_ADAPTER_SUFFIXES

            if Path(args.ip_adapter).suffix not in IP_ADAPTER_SUFFIXES or not Path(args.ip_adapter).is_file():
                raise ParameterError("--ip-adapter", args.ip_adapter,
                                     f"an SD1.5 IP-Adapter file ({', '.join(IP_ADAPTER_SUFFIXES)})")
    return names, out


def load_bundle(args: argparse.Namespace, names: list[str]):
    import torch

    from ..export.onnx_export import check_dtype
    from ..export.wrappers import ModuleBundle

    dtype, device = check_dtype(args.dtype), torch.device(args.device)
    needed = {part for n in names for part in GRAPHS[n].needs}
    if args.tiny:
        bundle = ModuleBundle.tiny(args.tiny_seed)
        for part in ("sd15", "sdxl"):
            comps = getattr(bundle, part)
            for m in (v for v in vars(comps).values() if isinstance(v, torch.nn.Module)):
                m.to(device, dtype)
        for m in (bundle.mapping, bundle.controlnet, bundle.t2i_adapter):
            m.to(device, dtype)
        return bundle
    from ..loading import load_mapping, load_sd15, load_sdxl
    from ..models.mapping import MappingConfig
    from ..plugins.controlnet import load_controlnet
    from ..plugins.ip_adapter_loading import read_ip_adapter_file
    from ..plugins.t2i_adapter import load_t2i_adapter

    sd15_parts = {"sd15", "mapping", "controlnet", "t2i_adapter", "ip_adapter"}
    sd15 = load_sd15(args.sd15, dtype=dtype, device=device) if args.sd15 and needed & sd15_parts else None
    sdxl = load_sdxl(args.sdxl, dtype=dtype, device=device) if args.sdxl and needed & {"sdxl", "mapping"} else None
    mapping = None
    if "mapping" in needed:
        config = MappingConfig.from_unet_configs(sd15.unet.config, sdxl.unet.config)
        mapping = load_mapping(args.adapter, config, dtype=dtype, device=device)
    controlnet = load_controlnet(args.controlnet, dtype=dtype, device=device) if "controlnet" in needed else None
    t2i = load_t2i_adapter(args.t2i_adapter, dtype=dtype, device=device) if "t2i_adapter" in needed else None
    ip = read_ip_adapter_file(args.ip_adapter) if "ip_adapter" in needed else None  # installed while exported
    return ModuleBundle(sd15, sdxl, mapping, controlnet, t2i, ip)


@contextlib.contextmanager
def _new_folder(out: Path) -> Iterator[None]:
    """`out`, created if it is not there; removed again if the body fails or is stopped while
    it holds nothing else (a full disk or a signal leaves no folder this run made)."""
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: the staging folder is gone by now
        raise


def describe(error: ParameterError) -> str:
    return parameter_error_line(error, PARAM_FLAGS.get(error.name, error.name))


def main(argv: Sequence[str] | None = None) -> int:
    """Run `xa-export`; returns the exit code (0 ok, 2 bad input, nothing written; 130 / 143
    stopped by SIGINT / SIGTERM, nothing written)."""
    return exit_on_signals(PROG, lambda: _main(argv))


def _main(argv: Sequence[str] | None = None) -> int:
    debug = debug_requested(argv)
    try:
        args = build_parser().parse_args(argv)
        names, out = check_inputs(args)
    except SystemExit as e:
        return int(e.code or 0)
    except UsageError as e:
        return report(str(e), debug)
    except ParameterError as e:
        return report(describe(e), debug)
    from ..export import manifest as mf
    from ..export.onnx_export import export_graphs

    started = time.perf_counter()
    try:
        source = None
        if not args.tiny:  # hash the model files and check the folder before loading anything
            source = mf.source_from_paths({f: _flag_value(args, f) for f in sorted(_given(args))})
            if out.is_dir():
                mf.check_source(out, source, args.force)
        bundle = load_bundle(args, names)
        if args.tiny:
            source = {**mf.source_from_bundle(bundle), "tiny_seed": args.tiny_seed}
        with _new_folder(out):
            paths = export_graphs(names, bundle, out, args.dtype, args.opset, progress=not args.no_progress,
                                  source=source, force=args.force)
    except ParameterError as e:
        return report(describe(e), debug)
    except (CheckpointError, OSError) as e:
        return report(str(e), debug)
    print(f"{PROG}: wrote {len(paths)} graphs to {out} ({args.dtype}, opset {args.opset}) in "
          f"{time.perf_counter() - started:.1f}s: {', '.join(paths)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
