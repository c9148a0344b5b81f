"""PyTorch -> ONNX for each graph of the table (xa_runtime.graphs).

`export_graph(name, bundle, path, dtype, opset)` writes one graph; `export_graphs` several
with a progress bar; `ModuleBundle` holds the modules; `xa-export` is the CLI;
`apply_weight_deltas` adds LoRA weight deltas to an exported graph's initializers.
"""

from __future__ import annotations

import lazy_loader

from .options import DEFAULT_OPSET

# public name -> the module that defines it, imported on first use: these need torch, and
# xa-export checks its flags (export/options.py) before importing it
__getattr__, _, _ = lazy_loader.attach(__name__, submod_attrs={
    "onnx_export": ["available_graphs", "export_graph", "export_graphs"],
    "refit": ["RefitReport", "apply_weight_deltas", "build_name_map", "names_path", "read_name_map"],
    "wrappers": ["ModuleBundle", "build_graph_module", "example_inputs", "model_dims"],
})

__all__ = [
    "DEFAULT_OPSET", "ModuleBundle", "available_graphs", "build_graph_module", "example_inputs", "export_graph",
    "export_graphs", "model_dims", "RefitReport", "apply_weight_deltas", "build_name_map", "names_path", "read_name_map",
]
