"""xa-generate's --backend torch|onnxruntime|tensorrt, --onnx-dir and --engine-dir: checks before loading, and the
pipeline moved onto onnxruntime after loading (export/ and runtime/onnxruntime_backend.py).

onnxruntime runs the SD1.5 UNet, the mapping layers and the SDXL UNet from an xa-export
folder (--onnx-dir, verified against its manifest.json, whose source fingerprints must be
those of the models loaded here); with the tiny models and no
--onnx-dir, the tiny graphs are exported to a temporary folder first (seconds). Plugins:
ControlNet (its residuals feed sd15_unet_control), LoRAs (--lora / --sdxl-lora: the
text encoders' part fused in PyTorch, the UNet's part sent to the backend as weight deltas:
TensorRT refits its engines, onnxruntime reloads refitted graphs); on onnxruntime also
T2I-Adapter / Nexus (features into sd15_unet_t2i) and IP-Adapter (sd15_unet_ip, exported
from that --ip-adapter file: on the fly, or an --onnx-dir exported with xa-export
--ip-adapter, checked by the manifest), one of ControlNet / T2I-Nexus / IP-Adapter per run
(no graph takes two). TensorRT: T2I-Adapter, Nexus and IP-Adapter need --backend torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ParameterError

BACKENDS = ("torch", "onnxruntime", "tensorrt")
ORT_GRAPHS = ("sd15_unet", "sd15_unet_control", "mapping", "sdxl_unet")
_TORCH_ONLY_PLUGINS = {"t2i": "--t2i-adapter", "nexus": "--nexus-adapter", "ip": "--ip-adapter"}  # on tensorrt
# plugin kind -> the onnxruntime graph its step arguments go into
PLUGIN_GRAPHS = {"controlnet": "sd15_unet_control", "t2i": "sd15_unet_t2i", "nexus": "sd15_unet_t2i",
                 "ip": "sd15_unet_ip"}
_PLUGIN_FLAGS = {"controlnet": "--controlnet", "t2i": "--t2i-adapter", "nexus": "--nexus-adapter", "ip": "--ip-adapter"}
LORA_BRANCHES = {"lora": "sd15", "sdxl_lora": "sdxl"}


def add_backend_arguments(group: Any) -> None:
    group.add_argument("--backend", choices=list(BACKENDS), default="torch",
                       help="where the UNets and mapping layers run (default %(default)s); onnxruntime needs the "
                            "onnxruntime package and --onnx-dir (xa-export's folder; tiny models: exported on the fly)")
    group.add_argument("--onnx-dir", metavar="DIR", help="xa-export output folder of these models (--backend onnxruntime; "
                       "with tensorrt: the engines' source, checked, and LoRA refit weights)")
    group.add_argument("--engine-dir", metavar="DIR", help="xa-build-engines output folder (--backend tensorrt, --device cuda)")


def _check_tensorrt(args: argparse.Namespace, usage_error: type) -> None:
    """--backend tensorrt: the real TensorRT (not only tensorrt-stubs), CUDA, an engine folder."""
    from ..engines.manifest import NOT_INSTALLED, tensorrt_installed

    if not tensorrt_installed():
        raise ParameterError("--backend", args.backend, f"torch or onnxruntime: {NOT_INSTALLED}")
    if getattr(args, "device", "cuda") != "cuda":
        raise usage_error("--backend tensorrt needs --device cuda")
    if args.engine_dir is None:
        raise usage_error("--backend tensorrt needs --engine-dir (xa-build-engines' folder)")
    folder = Path(args.engine_dir)
    if not all((folder / f"{g}.engine.json").is_file() for g in ("sd15_unet", "mapping", "sdxl_unet")):
        raise ParameterError("--engine-dir", args.engine_dir, "an xa-build-engines folder with sd15_unet, mapping and "
                             "sdxl_unet engines (NAME.plan + NAME.engine.json)")


def check_backend(args: argparse.Namespace, tiny: bool, plugin_specs: dict[str, list[Any]], usage_error: type) -> None:
    """Cheap checks of --backend / --onnx-dir (nothing loaded)."""
    if args.engine_dir is not None and args.backend != "tensorrt":
        raise usage_error("--engine-dir only applies to --backend tensorrt")
    if args.backend == "torch":
        if args.onnx_dir is not None:
            raise usage_error("--onnx-dir only applies to --backend onnxruntime or tensorrt")
        return
    if args.backend == "tensorrt":
        _check_tensorrt(args, usage_error)
    elif importlib.util.find_spec("onnxruntime") is None:
        raise ParameterError("--backend", args.backend, "torch: onnxruntime is not installed here (pip install "
                             "onnxruntime, or onnxruntime-gpu for CUDA; both in the [export] extra)")
    if args.onnx_dir is None and not tiny and args.backend == "onnxruntime":
        raise usage_error("--backend onnxruntime with --sd15/--sdxl/--adapter needs --onnx-dir (xa-export's folder "
                          "of these models)")
    if args.onnx_dir is not None:
        from ..runtime.onnxruntime_backend import select_graphs

        folder = Path(args.onnx_dir)
        _, required, _ = select_graphs(lambda g: (folder / f"{g}.onnx").is_file(), "auto")  # split pair or fused
        if not all((folder / f"{g}.onnx").is_file() for g in required) or not (folder / "manifest.json").is_file():
            raise ParameterError("--onnx-dir", args.onnx_dir, "an xa-export folder with manifest.json, sd15_unet.onnx, "
                                 "and mapping.onnx + sdxl_unet.onnx or sdxl_unet_fused.onnx")
    if args.backend == "tensorrt":
        used = [flag for kind, flag in _TORCH_ONLY_PLUGINS.items() if plugin_specs.get(kind)]
        if used:
            raise usage_error(f"{', '.join(used)} need --backend torch ({args.backend} takes ControlNet and LoRAs)")
        return
    graphs = plugin_graphs(plugin_specs)
    if len(graphs) > 1:
        flags = [f for kind, f in _PLUGIN_FLAGS.items() if plugin_specs.get(kind)]
        raise usage_error(f"{' and '.join(flags)} together need --backend torch (no onnxruntime graph takes both)")
    if args.onnx_dir is not None:
        missing = [g for g in graphs if not (Path(args.onnx_dir) / f"{g}.onnx").is_file()]
        if missing:
            hint = " (xa-export --ip-adapter FILE)" if "sd15_unet_ip" in missing else ""
            raise ParameterError("--onnx-dir", args.onnx_dir, f"an xa-export folder with {missing[0]}.onnx for these "
                                 f"plugins{hint}")


def plugin_graphs(plugin_specs: dict[str, list[Any]]) -> list[str]:
    """The onnxruntime graphs the given SD1.5 plugins need (none for LoRAs)."""
    return sorted({g for kind, g in PLUGIN_GRAPHS.items() if plugin_specs.get(kind)})


def to_backend(args: argparse.Namespace, pipe: Any, tiny: bool) -> Any:
    """The pipeline with its UNets and mapping layers on onnxruntime, or `pipe` for torch."""
    if args.backend == "torch":
        return pipe
    if args.backend == "tensorrt":  # the only place the TensorRT layer is imported from xa-generate
        from ..engines.run import TensorRTBackend

        args._backend = TensorRTBackend(args.engine_dir, args.onnx_dir)
        return pipe.with_backend(args._backend)
    from ..runtime.onnxruntime_backend import OnnxRuntimeBackend

    folder = args.onnx_dir
    if folder is None:  # tiny models: export the graphs the pipeline runs
        from ..export import ModuleBundle, export_graphs

        args._onnx_tmp = tempfile.TemporaryDirectory(prefix="xa-onnx-")
        folder = args._onnx_tmp.name
        bundle = ModuleBundle(sd15=pipe.sd15, sdxl=pipe.sdxl, mapping=pipe.mapping, ip_adapter=_ip_state(args))
        specs = getattr(args, "plugin_specs", {})
        export_graphs(list(dict.fromkeys([*ORT_GRAPHS, *plugin_graphs(specs)])), bundle, folder, progress=False)
    else:
        check_models_match(args, pipe, tiny)
    args._backend = OnnxRuntimeBackend(folder, providers=[args.device])
    return pipe.with_backend(args._backend)


def loras_to_backend(args: argparse.Namespace, managers: dict[str, Any]) -> dict[str, dict[str, int]]:
    """After apply_loras on a backend pipeline: each manager's UNet deltas to the backend's
    engines / graphs of its branch (its text encoder part is already in the torch modules).
    Returns kind -> the backend's report (graph -> weights changed); {} for --backend torch."""
    backend = getattr(args, "_backend", None)
    if backend is None:
        return {}
    return {kind: backend.set_lora_deltas({k: v for k, v in m.weight_deltas().items() if k.startswith("unet.")},
                                          LORA_BRANCHES[kind])
            for kind, m in managers.items()}


def check_models_match(args: argparse.Namespace, pipe: Any, tiny: bool) -> None:
    """The --onnx-dir graphs must come from the models loaded here (manifest fingerprints):
    tiny models by their tensors, model paths by their files' bytes (reads them once more)."""
    from ..export import ModuleBundle
    from ..export import manifest as mf

    if tiny:
        bundle = ModuleBundle(sd15=pipe.sd15, sdxl=pipe.sdxl, mapping=pipe.mapping)
        current = {k: v for k, v in mf.source_from_bundle(bundle)["parts"].items() if k != "controlnet"}
        what = f"the tiny models of seed {args.tiny_seed or 0}"
        if _ip_state(args) is not None:  # the sd15_unet_ip graph holds this IP-Adapter's weights
            current["ip_adapter"] = mf.source_from_bundle(ModuleBundle(ip_adapter=_ip_state(args)))["parts"]["ip_adapter"]
            what += " and --ip-adapter"
    else:
        flags = ("--sd15", "--sdxl", "--adapter") + (("--ip-adapter",) if _ip_state(args) is not None else ())
        current = {f: mf.path_fingerprint(getattr(args, f[2:].replace("-", "_"))) for f in flags}
        what = "/".join(flags)
    mf.check_same_models(args.onnx_dir, current, what)


def _ip_state(args: argparse.Namespace) -> Any:
    """The --ip-adapter file's state when an IP-Adapter runs on onnxruntime (read once), else None."""
    specs = getattr(args, "plugin_specs", {}).get("ip")
    if not specs:
        return None
    if getattr(args, "_ip_state", None) is None:
        from ..plugins.ip_adapter_loading import read_ip_adapter_file

        args._ip_state = read_ip_adapter_file(specs[0]["path"])
    return args._ip_state


def cleanup(args: argparse.Namespace) -> None:
    tmp = getattr(args, "_onnx_tmp", None)
    if tmp is not None:
        tmp.cleanup()
