"""What the command-line tools share about bad input: the exception for a bad command line,
an argparse parser that raises it instead of printing its usage dump, the one-line
message for a ParameterError, --debug (tracebacks only on request), the check of the
output files a run will write (prompts' text is checked by pipeline.params.validate), and
SIGINT / SIGTERM as one line and exit status 130 / 143."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, NoReturn

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


def add_debug_argument(ap: argparse.ArgumentParser) -> None:
    """--debug: print the traceback of an error too (user errors are one line without it)."""
    ap.add_argument("--debug", action="store_true", help="with an error, print its traceback as well")


def debug_requested(argv: Sequence[str] | None) -> bool:
    """--debug on the command line (also when the rest of it does not parse)."""
    return "--debug" in (sys.argv[1:] if argv is None else argv)


def report(line: str, debug: bool) -> int:
    """Print `error: LINE` (the traceback of the exception being handled first with debug); exit status 2."""
    if debug:
        traceback.print_exc()
    print(f"error: {line}", file=sys.stderr)
    return 2


def check_output_files(flag: str, value: str, paths: Sequence[Path]) -> None:
    """ParameterError naming `flag` unless every file a run will write can be written: not a
    folder, and its folder exists and is writable. Run before any work."""
    for path in paths:
        if path.is_dir():
            which = "this path" if str(path) == str(value) else f"{str(path)!r}, which the run also writes,"
            raise ParameterError(flag, value, f"a file path whose outputs are not folders; {which} is a folder")
        folder = path.parent
        if not folder.is_dir():
            raise ParameterError(flag, value, f"a path in an existing folder; {str(folder)!r} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ParameterError(flag, value, f"a path in a writable folder; {str(folder)!r} is not writable")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (as Python raises KeyboardInterrupt for SIGINT), so
    that every `finally` and clean-up on the way out runs: temporaries go, outputs stay whole."""


SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells report it


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def exit_on_signals(prog: str, body: Callable[[], int]) -> int:
    """body()'s exit status; SIGINT and SIGTERM stop it (at the next Python instruction:
    between two torch ops) and give one line `PROG: stopped by SIGNAL` and 130 / 143, no
    traceback. Outputs are written all or nothing, so nothing partial stays behind."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return body()
    except (KeyboardInterrupt, Terminated) as e:
        name = "SIGINT" if isinstance(e, KeyboardInterrupt) else "SIGTERM"
        print(f"{prog}: stopped by {name}", file=sys.stderr)
        return SIGNAL_EXIT_CODES[name]
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
