"""Execution of the graphs: runtime switches, timing per stage, the graph table
(`graphs_table`, pure data) and backends (`onnxruntime_backend`, imported on demand so that
onnxruntime stays optional); later streams and buffers."""

from .config import RuntimeConfig
from .timing import StageTimer

__all__ = ["RuntimeConfig", "StageTimer"]
