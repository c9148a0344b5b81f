"""xa-generate's --backend torch|onnxruntime|tensorrt, --onnx-dir and --engine-dir: the flags, the
checks before loading (graph sets from xa_runtime.graphs, nothing imported that loads torch),
and the call to runtime.backends.open_backend after loading.

onnxruntime runs the SD1.5 UNet, the mapping layers and the SDXL UNet from an xa-export
folder (--onnx-dir, verified against its manifest.json, whose source fingerprints must be
those of the models loaded here); with the tiny models and no --onnx-dir, open_backend
exports the tiny graphs to a temporary folder first (seconds). Plugins: ControlNet (its
residuals feed sd15_unet_control), LoRAs (--lora / --sdxl-lora: the text encoders' part
fused in PyTorch, the UNet's part sent to the backend as weight deltas: TensorRT refits its
engines, onnxruntime reloads refitted graphs); on onnxruntime also T2I-Adapter / Nexus
(features into sd15_unet_t2i) and IP-Adapter (sd15_unet_ip, exported from that --ip-adapter
file: on the fly, or an --onnx-dir exported with xa-export --ip-adapter, checked by the
manifest), one of ControlNet / T2I-Nexus / IP-Adapter per run (no graph takes two).
TensorRT takes ControlNet and LoRAs; the others need --backend torch (plugin_kinds.check_backend,
the one rule set xa-serve and xa-bench use too).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..availability import ONNXRUNTIME_NOT_INSTALLED, onnxruntime_installed
from ..errors import ParameterError
from ..graphs import BACKENDS, PLUGIN_GRAPHS, folder_problem, has_graph, plugin_graphs
from ..plugin_kinds import PluginSpec
from ..plugin_kinds import check_backend as check_backend_plugins


def add_backend_arguments(group: Any) -> None:
    group.add_argument("--backend", choices=list(BACKENDS), default="torch",
                       help="where the UNets and mapping layers run (default %(default)s); onnxruntime needs the "
                            "onnxruntime package and --onnx-dir (xa-export's folder; tiny models: exported on the fly)")
    group.add_argument("--onnx-dir", metavar="DIR", help="xa-export output folder of these models (--backend onnxruntime; "
                       "with tensorrt: the engines' source, checked, and LoRA refit weights)")
    group.add_argument("--engine-dir", metavar="DIR", help="xa-build-engines output folder (--backend tensorrt, --device cuda)")


def _check_tensorrt(args: argparse.Namespace, usage_error: type) -> None:
    """--backend tensorrt: the real TensorRT (not only tensorrt-stubs), CUDA, an engine folder."""
    from ..availability import NOT_INSTALLED, tensorrt_installed

    if not tensorrt_installed():
        raise ParameterError("--backend", args.backend, f"torch or onnxruntime: {NOT_INSTALLED}")
    if getattr(args, "device", "cuda") != "cuda":
        raise usage_error("--backend tensorrt needs --device cuda")
    if args.engine_dir is None:
        raise usage_error("--backend tensorrt needs --engine-dir (xa-build-engines' folder)")
    problem = folder_problem(args.engine_dir, "engine")
    if problem:
        raise ParameterError("--engine-dir", args.engine_dir, problem)


def check_backend(args: argparse.Namespace, tiny: bool, plugin_specs: list[PluginSpec], usage_error: type) -> None:
    """Cheap checks of --backend / --onnx-dir (nothing loaded)."""
    if args.engine_dir is not None and args.backend != "tensorrt":
        raise usage_error("--engine-dir only applies to --backend tensorrt")
    if args.backend == "torch":
        if args.onnx_dir is not None:
            raise usage_error("--onnx-dir only applies to --backend onnxruntime or tensorrt")
        return
    if args.backend == "tensorrt":
        _check_tensorrt(args, usage_error)
    elif not onnxruntime_installed():
        raise ParameterError("--backend", args.backend, f"torch: {ONNXRUNTIME_NOT_INSTALLED}")
    if args.onnx_dir is None and not tiny and args.backend == "onnxruntime":
        raise usage_error("--backend onnxruntime with --sd15/--sdxl/--adapter needs --onnx-dir (xa-export's folder "
                          "of these models)")
    if args.onnx_dir is not None:
        problem = folder_problem(args.onnx_dir, "onnx")
        if problem:
            raise ParameterError("--onnx-dir", args.onnx_dir, problem)
    problem = check_backend_plugins(plugin_specs, args.backend, lambda spec: spec.row.flags[0])
    if problem:
        raise usage_error(problem)
    if args.backend == "tensorrt":
        return
    graphs = plugin_graphs(plugin_kinds(plugin_specs))
    if args.onnx_dir is not None:
        missing = [g for g in graphs if not has_graph(args.onnx_dir, "onnx")(g)]
        if missing:
            baked = [s.row.flags[0] for s in plugin_specs if s.row.installed and PLUGIN_GRAPHS[s.kind] in missing]
            hint = f" (xa-export {baked[0]} FILE)" if baked else ""
            raise ParameterError("--onnx-dir", args.onnx_dir, f"an xa-export folder with {missing[0]}.onnx for these "
                                 f"plugins{hint}")


def plugin_kinds(plugin_specs: list[PluginSpec]) -> list[str]:
    """The plugin kinds given, once each."""
    return list(dict.fromkeys(s.kind for s in plugin_specs))


def open_cli_backend(args: argparse.Namespace, pipe: Any, tiny: bool, plugin_specs: list[PluginSpec]) -> Any:
    """The backend handle (runtime.backends.Backend) of --backend for `pipe`; close it when done.
    An --onnx-dir is first checked to hold graphs of the models loaded here."""
    from ..runtime.backends import open_backend

    ip_state = ip_adapter_state(plugin_specs) if args.backend == "onnxruntime" else None
    if args.backend == "onnxruntime" and args.onnx_dir is not None:
        check_models_match(args, pipe, tiny, ip_state)
    return open_backend(args.backend, pipe, onnx_dir=args.onnx_dir, engine_dir=args.engine_dir, device=args.device,
                        plugin_kinds=plugin_kinds(plugin_specs), ip_adapter_state=ip_state)


def loras_to_backend(backend: Any, pipe: Any) -> dict[str, dict[str, int]]:
    """After pipe.load_plugins on a backend pipeline: each branch's LoRA UNet deltas to the
    backend's engines / graphs of that branch (the text encoder part is already in the torch
    modules). Returns branch -> the backend's report (graph -> weights changed); {} for
    --backend torch."""
    if backend.graphs is None:
        return {}
    return {branch: backend.set_lora_deltas(deltas, branch) for branch, deltas in pipe.lora_weight_deltas().items()}


def check_models_match(args: argparse.Namespace, pipe: Any, tiny: bool, ip_state: Any = None) -> None:
    """The --onnx-dir graphs must come from the models loaded here (manifest fingerprints):
    tiny models by their tensors, model paths by their files' bytes (reads them once more).
    ip_state: the --ip-adapter file's state when the sd15_unet_ip graph must hold it."""
    from ..export import ModuleBundle
    from ..export import manifest as mf

    if tiny:
        bundle = ModuleBundle(sd15=pipe.sd15, sdxl=pipe.sdxl, mapping=pipe.mapping)
        current = {k: v for k, v in mf.source_from_bundle(bundle)["parts"].items() if k != "controlnet"}
        what = f"the tiny models of seed {args.tiny_seed or 0}"
        if ip_state is not None:  # the sd15_unet_ip graph holds this IP-Adapter's weights
            current["ip_adapter"] = mf.source_from_bundle(ModuleBundle(ip_adapter=ip_state))["parts"]["ip_adapter"]
            what += " and --ip-adapter"
    else:
        flags = ("--sd15", "--sdxl", "--adapter") + (("--ip-adapter",) if ip_state is not None else ())
        current = {f: mf.path_fingerprint(getattr(args, f[2:].replace("-", "_"))) for f in flags}
        what = "/".join(flags)
    mf.check_same_models(args.onnx_dir, current, what)


def ip_adapter_state(plugin_specs: list[PluginSpec]) -> Any:
    """The --ip-adapter file's state (read here), or None without --ip-adapter."""
    specs = [s for s in plugin_specs if s.row.installed]
    if not specs:
        return None
    from ..plugins.ip_adapter_loading import read_ip_adapter_file

    return read_ip_adapter_file(specs[0].path)
