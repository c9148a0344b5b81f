"""What the command-line tools share about bad input: the exception for a bad command line,
an argparse parser that raises it instead of printing its usage dump, and the one-line
message for a ParameterError."""

from __future__ import annotations

import argparse
from typing import NoReturn

from ..errors import ParameterError


class UsageError(Exception):
    """A bad command line; the message names the flag."""


class CheckedParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError (one line, exit status 2 in main)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def parameter_error_line(error: ParameterError, flag: str, accepted: str | None = None) -> str:
    """`invalid FLAG VALUE: expected ACCEPTED` (accepted: the error's own text unless given)."""
    return f"invalid {flag} {error.value!r}: expected {error.accepted if accepted is None else accepted}"
