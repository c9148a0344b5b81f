"""What an export accepts, checked without torch: the ONNX opsets, the dtype names and the
graph names. xa-export checks its flags with these before it imports torch; the exporter
(onnx_export.py) applies the same checks to library calls."""

from __future__ import annotations

from typing import Iterable

from ..errors import ParameterError
from ..graphs import GRAPHS

MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 17, 20, 17  # 17: LayerNormalization; 20: TorchScript exporter's last
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16"}  # export dtype -> torch dtype name
DTYPES_ACCEPTED = "fp32 or fp16 (torch.float32 / torch.float16)"


def check_opset(opset: object) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ParameterError("opset", opset, f"an integer {MIN_OPSET}..{MAX_OPSET} (the TorchScript exporter's range)")
    return opset


def check_dtype_name(dtype: object) -> str:
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return dtype
    raise ParameterError("dtype", dtype, DTYPES_ACCEPTED)


def check_graph_names(names: Iterable[str]) -> list[str]:
    names = list(names)
    bad = [n for n in names if n not in GRAPHS]
    if bad or not names:
        raise ParameterError("graphs", ",".join(bad) if bad else "", f"graph names among {', '.join(GRAPHS)}")
    return names
