"""Where the UNets and the mapping layers run: torch (the pipeline's own modules), onnxruntime
(onnxruntime.py) or TensorRT (tensorrt.py), over the branch adapters they share (adapters.py).

`open_backend(kind, pipe, ...)` is the one way the CLIs, the server and the benchmark put a
pipeline on a backend. It returns a `Backend` handle: `.pipeline` to generate with,
`.set_lora_deltas(...)` to send a LoRA's UNet deltas to the graphs or engines, `.close()` to
remove what it made (the tiny models' graphs exported on the fly, a throw-away engine set).
onnxruntime and tensorrt are imported only when their backend is opened.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...errors import ParameterError
from ...graphs import BACKENDS, check_sdxl_mode, plugin_graphs, required_graphs

# The SDXL mode of graphs exported on the fly when "auto" is asked: split, as xa-generate's
# on-the-fly export has always run it.
ON_THE_FLY_SDXL_MODE = "split"


@dataclass
class Backend:
    """A pipeline on a backend. kind: "torch", "onnxruntime" or "tensorrt"; pipeline: the
    pipeline to generate with; graphs: the OnnxRuntimeBackend / TensorRTBackend it runs on
    (None for torch); onnx_dir / engine_dir: the folders it reads (temporary ones included)."""

    kind: str
    pipeline: Any
    graphs: Any = None
    onnx_dir: Path | None = None
    engine_dir: Path | None = None
    _temporary: list[tempfile.TemporaryDirectory] = field(default_factory=list, repr=False)

    def set_lora_deltas(self, deltas: Mapping[str, Any], branch: str = "sd15") -> dict[str, int]:
        """The UNet weight deltas of a `branch` ("sd15" / "sdxl") LoRA ("unet.*" names, {}:
        back to base) into the graphs or engines; graph -> weights changed. On torch the
        LoRA lives in the modules themselves: nothing to send, {}."""
        if self.graphs is None:
            return {}
        return self.graphs.set_lora_deltas(deltas, branch)

    def close(self) -> None:
        """Remove the temporary folders this handle made (safe to call twice)."""
        while self._temporary:
            self._temporary.pop().cleanup()

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_backend(kind: str, pipe: Any, *, onnx_dir: str | Path | None = None, engine_dir: str | Path | None = None,
                 device: str = "cpu", sdxl_mode: str = "auto", plugin_kinds: Sequence[str] = (),
                 ip_adapter_state: Mapping[str, Any] | None = None, dtype: Any = None,
                 progress: bool = False) -> Backend:
    """`pipe` (an XAdapterPipeline) with its UNets and mapping layers on backend `kind`.

    onnxruntime: the graphs of `onnx_dir` (xa-export's folder, verified by its manifest);
    without one, the graphs `pipe` needs (its SDXL mode's, plus the variants of
    `plugin_kinds`: names of the plugin-kind table, "controlnet", "t2i", "nexus", "ip_adapter"
    or an alias, the last exported with `ip_adapter_state`, an IP-Adapter file's state) are
    exported from pipe's own modules to a temporary folder first (seconds for the tiny models, minutes at full size), in `dtype`
    (None: fp32). device: onnxruntime's provider ("cpu" / "cuda").
    tensorrt: the engines of `engine_dir` (xa-build-engines' folder) with `onnx_dir` their
    source (checked; LoRA refit weights); without engine_dir, pipe's graphs are exported and
    built into throw-away engines (precision from `dtype`). Needs CUDA and TensorRT.
    sdxl_mode: "auto", "split" or "fused" (graphs.SDXL_MODES).
    Close the handle (or use it in a `with`) to remove temporary folders.
    """
    if kind not in BACKENDS:
        raise ParameterError("backend", kind, " or ".join(BACKENDS))
    check_sdxl_mode(sdxl_mode)
    handle = Backend(kind, pipe)
    if kind == "torch":
        return handle
    try:
        if kind == "onnxruntime":
            _open_onnxruntime(handle, onnx_dir, device, sdxl_mode, plugin_kinds, ip_adapter_state, dtype, progress)
        else:
            _open_tensorrt(handle, onnx_dir, engine_dir, sdxl_mode, dtype, progress)
    except BaseException:
        handle.close()
        raise
    handle.pipeline = pipe.with_backend(handle.graphs)
    return handle


def _export_mode(sdxl_mode: str) -> str:
    return ON_THE_FLY_SDXL_MODE if sdxl_mode == "auto" else sdxl_mode


def _export(handle: Backend, names: list[str], ip_adapter_state: Any, dtype: Any, progress: bool, prefix: str) -> Path:
    """pipe's graphs `names` exported to a new temporary folder the handle owns."""
    from ...export import ModuleBundle, export_graphs

    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    handle._temporary.append(tmp)
    pipe = handle.pipeline
    bundle = ModuleBundle(sd15=pipe.sd15, sdxl=pipe.sdxl, mapping=pipe.mapping, ip_adapter=ip_adapter_state)
    extra = {} if dtype is None else {"dtype": dtype}
    export_graphs(names, bundle, tmp.name, progress=progress, **extra)
    return Path(tmp.name)


def _open_onnxruntime(handle: Backend, onnx_dir: Any, device: str, sdxl_mode: str, plugin_kinds: Sequence[str],
                      ip_adapter_state: Any, dtype: Any, progress: bool) -> None:
    from .onnxruntime import OnnxRuntimeBackend

    if onnx_dir is None:
        names = list(dict.fromkeys([*required_graphs(_export_mode(sdxl_mode)), *plugin_graphs(plugin_kinds)]))
        folder = _export(handle, names, ip_adapter_state, dtype, progress, "xa-onnx-")
    else:
        folder = Path(onnx_dir)
    handle.onnx_dir = folder
    handle.graphs = OnnxRuntimeBackend(folder, providers=[device], sdxl_mode=sdxl_mode)


def _open_tensorrt(handle: Backend, onnx_dir: Any, engine_dir: Any, sdxl_mode: str, dtype: Any,
                   progress: bool) -> None:
    from .tensorrt import TensorRTBackend, build_engines_for

    if engine_dir is None:
        names = required_graphs(_export_mode(sdxl_mode))
        folder = _export(handle, names, None, dtype, progress, "xa-trt-")
        engine_dir, onnx_dir = folder / "engines", folder
        precision = {"torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(str(dtype), "fp32")
        build_engines_for(names, folder, engine_dir, precision, progress)
    handle.onnx_dir = None if onnx_dir is None else Path(onnx_dir)
    handle.engine_dir = Path(engine_dir)
    handle.graphs = TensorRTBackend(engine_dir, onnx_dir, sdxl_mode=sdxl_mode)


__all__ = ["BACKENDS", "Backend", "open_backend"]
