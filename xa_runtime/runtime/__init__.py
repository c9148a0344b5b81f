"""Execution of the graphs: runtime switches, timing per stage; later backends, streams, buffers."""

from .config import RuntimeConfig
from .timing import StageTimer

__all__ = ["RuntimeConfig", "StageTimer"]
