"""Exceptions for bad input: each names the parameter, the value and what is accepted."""

from __future__ import annotations

from typing import Any


class ParameterError(ValueError):
    """A user-supplied parameter is out of range or of the wrong kind."""

    def __init__(self, name: str, value: Any, accepted: str):
        self.name, self.value, self.accepted = name, value, accepted
        super().__init__(f"invalid {name}={value!r}: {accepted}")


class CheckpointError(ValueError):
    """A file on disk is not the model it claims to be (wrong keys, shapes or family)."""


class NonFiniteError(RuntimeError):
    """A generation produced NaN or infinite values (the request fails; the process is fine)."""


class AspectWarning(UserWarning):
    """A given SD1.5 size whose aspect differs from the SDXL size's: the SD1.5 image is
    stretched when it is resized to the SDXL size at the hand-over."""
