"""Which optional inference libraries this machine has, asked without importing torch:
TensorRT (the real library; `tensorrt-stubs` alone installs an empty namespace package)
and onnxruntime. The CLIs and the server ask here before they accept a backend."""

from __future__ import annotations

import importlib.util
from typing import Any

NOT_INSTALLED = "TensorRT is not installed: pip install tensorrt (NVIDIA's index)"
ONNXRUNTIME_NOT_INSTALLED = ("onnxruntime is not installed here (pip install onnxruntime, or onnxruntime-gpu for "
                             "CUDA; both in the [export] extra)")


def tensorrt_installed() -> bool:
    """Whether the real TensorRT library imports here (tensorrt-stubs alone does not count)."""
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder")


def require_tensorrt(module: Any) -> Any:
    """The real tensorrt module, or ImportError. With only tensorrt-stubs installed, `import
    tensorrt` gives an empty namespace package (a folder of .pyi files): no Builder."""
    if not hasattr(module, "Builder"):
        raise ImportError(NOT_INSTALLED)
    return module


def onnxruntime_installed() -> bool:
    """Whether onnxruntime (CPU or GPU build) is installed; found without importing it."""
    return importlib.util.find_spec("onnxruntime") is not None
