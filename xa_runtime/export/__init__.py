"""PyTorch -> ONNX for each graph of the table (xa_runtime.graphs).

`export_graph(name, bundle, path, dtype, opset)` writes one graph; `export_graphs` several
with a progress bar; `ModuleBundle` holds the modules; `xa-export` is the CLI;
`apply_weight_deltas` adds LoRA weight deltas to an exported graph's initializers.
"""

from __future__ import annotations

import importlib
from typing import Any

from .options import DEFAULT_OPSET

# public name -> the module that defines it, imported on first use: these need torch, and
# xa-export checks its flags (export/options.py) before importing it
_LAZY = {
    "available_graphs": ".onnx_export", "export_graph": ".onnx_export", "export_graphs": ".onnx_export",
    "RefitReport": ".refit", "apply_weight_deltas": ".refit", "build_name_map": ".refit", "names_path": ".refit",
    "read_name_map": ".refit", "ModuleBundle": ".wrappers", "build_graph_module": ".wrappers",
    "example_inputs": ".wrappers", "model_dims": ".wrappers",
}

__all__ = [
    "DEFAULT_OPSET", "ModuleBundle", "available_graphs", "build_graph_module", "example_inputs", "export_graph",
    "export_graphs", "model_dims", "RefitReport", "apply_weight_deltas", "build_name_map", "names_path", "read_name_map",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
