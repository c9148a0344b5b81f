"""Execution of the graphs: timing (per stage), and later backends, streams and buffers."""

from .timing import StageTimer

__all__ = ["StageTimer"]
