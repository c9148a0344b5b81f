"""The flags every CLI spells the same way: model selection (none = the built-in tiny models),
--device, --dtype, --threads, --no-progress, and the generation parameters' flags (from the
rows of pipeline/params.py PARAMETERS), each added by one function so that the five tools
cannot drift apart (tests/test_cli_vocabulary.py walks their parsers to check)."""

from __future__ import annotations

import argparse
import os
from typing import Any

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --dtype -> torch dtype name
DEVICES = ("cpu", "cuda")
MODEL_FLAGS = ("--sd15", "--sdxl", "--adapter")
MAX_DEFAULT_THREADS = 4
MAX_THREADS = 1024  # torch allocates per-thread state up front: 10^9 threads is a MemoryError, not a run
MAX_TINY_SEED = 2**63 - 1  # the tiny models' seed goes to torch.manual_seed (a C int64)
MODEL_HELP = {
    "--sd15": "SD1.5 diffusers folder or single .safetensors file",
    "--sdxl": "SDXL base diffusers folder or single .safetensors file",
    "--adapter": "X-Adapter checkpoint (X_Adapter_v1.bin or .safetensors)",
}


def add_model_arguments(group: Any, *, extra: str = "") -> None:
    """--sd15 / --sdxl / --adapter (paths), --tiny (the default without paths), --tiny-seed."""
    for flag, text in MODEL_HELP.items():
        group.add_argument(flag, metavar="PATH", help=text + extra)
    group.add_argument("--tiny", action="store_true",
                       help="the built-in tiny random models: the default without --sd15/--sdxl/--adapter "
                            "(the flag is accepted for explicitness)")
    group.add_argument("--tiny-seed", type=int, default=None, metavar="N",
                       help=f"seed of the built-in tiny random models, 0..{MAX_TINY_SEED} (default 0)")


def generation_flags() -> dict[str, str]:
    """GenerationParams field -> the xa-generate flag that sets it (so errors name what the user typed)."""
    from ..pipeline.params import PARAMETERS

    return {p.name: p.flag for p in PARAMETERS if p.flag}


def _words_or(kind: type, words: dict[str, Any], name: str) -> Any:
    def parse(text: str) -> Any:
        if text in words:
            return words[text]
        try:
            return kind(text)
        except ValueError:
            accepted = f"{'an integer' if kind is int else 'a number'}" + "".join(f" or {w!r}" for w in words)
            raise argparse.ArgumentTypeError(f"invalid {name} {text!r}: {accepted}") from None
    return parse


def add_generation_arguments(group: Any, names: Any = None, defaults: dict[str, Any] | None = None) -> None:
    """One flag per generation parameter that has one (PARAMETERS' `flag`), `names` only if
    given; its help, range and default come from the row (`defaults` overrides a default,
    e.g. xa-bench's recorded workload). The dest is the flag's name (--steps -> args.steps)."""
    from ..pipeline.params import CHOICE, INT, PARAMETERS, REQUIRED, SAME, SIDE, TEXT

    defaults = defaults or {}
    for p in PARAMETERS:
        if not p.flag or (names is not None and p.name not in names):
            continue
        default = defaults.get(p.name, p.default if p.cli_default is SAME else p.cli_default)
        kwargs: dict[str, Any] = {"metavar": p.metavar}
        help_text = p.describe()
        if p.kind == TEXT:  # one per --prompt: the flag repeats
            kwargs["action"] = "append"
            if default is REQUIRED:
                kwargs["required"] = True
        else:
            kind = int if p.kind in (INT, SIDE) else float
            kwargs["type"] = _words_or(kind, dict(p.cli_words), p.name.split("_")[-1]) if p.cli_words else kind
            kwargs["default"] = default
            if p.kind == CHOICE:
                kwargs.update(type=str, choices=list(p.choices), metavar=None)
            if default is not None:
                help_text += " (default %(default)s)"
        group.add_argument(p.flag, help=help_text, **kwargs)


def params_from_args(args: argparse.Namespace, **fixed: Any) -> Any:
    """GenerationParams from the flags add_generation_arguments added (a repeated text flag
    given once is a string); `fixed` sets the fields that have no flag here."""
    from ..pipeline.params import PARAMETERS, TEXT, GenerationParams

    values: dict[str, Any] = {}
    for p in PARAMETERS:
        dest = (p.flag or "").lstrip("-").replace("-", "_")
        if not p.flag or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        values[p.name] = value[0] if p.kind == TEXT and value and len(value) == 1 else value
    return GenerationParams(**values, **fixed)


def add_device_argument(group: Any, what: str = "where the models run") -> None:
    group.add_argument("--device", choices=list(DEVICES), default="cpu", help=f"{what} (default %(default)s)")


def add_dtype_argument(group: Any, *aliases: str, default: str = "fp32", what: str = "weights and activations") -> None:
    group.add_argument("--dtype", *aliases, dest="dtype", choices=list(DTYPES), default=default,
                       help=f"{what} (default %(default)s)")


def add_threads_argument(group: Any) -> None:
    group.add_argument("--threads", type=int, default=None, metavar="N",
                       help=f"CPU threads of torch, 1..{MAX_THREADS} (default: OMP_NUM_THREADS if set, else the cores not busy "
                            f"with other work, at most {MAX_DEFAULT_THREADS}; see default_threads)")


def add_no_progress_argument(group: Any) -> None:
    group.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def check_tiny_seed(args: argparse.Namespace) -> int:
    """The tiny models' seed (0 unless --tiny-seed); ParameterError outside 0..MAX_TINY_SEED."""
    from ..errors import ParameterError

    if args.tiny_seed is not None and not 0 <= args.tiny_seed <= MAX_TINY_SEED:
        raise ParameterError("--tiny-seed", args.tiny_seed, f"an integer in 0..{MAX_TINY_SEED}")
    return args.tiny_seed or 0


def default_threads() -> int:
    """torch's CPU thread count when --threads is not given.

    OMP_NUM_THREADS when the user set it. Otherwise the CPUs this process may use, less the
    ones other processes keep busy (the 1-minute load average), at least 1 and at most 4.
    torch's own default (every core) collapses on a shared machine: OpenMP threads wait for
    each other at every op, so one thread descheduled by another process stalls them all
    (28 s median, 83 s worst measured on a busy 2-core machine against 3.4 s with one thread);
    past ~4 threads the small convolutions of a UNet step gain little.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(MAX_DEFAULT_THREADS, cpus - busy))


def check_threads(args: argparse.Namespace) -> int:
    """--threads, or default_threads(); ParameterError outside 1..MAX_THREADS."""
    from ..errors import ParameterError

    if args.threads is None:
        return default_threads()
    if not 1 <= args.threads <= MAX_THREADS:
        raise ParameterError("--threads", args.threads, f"an integer in 1..{MAX_THREADS}")
    return args.threads


def set_threads(n: int) -> None:
    """torch's intra-op CPU threads for this process."""
    import torch

    torch.set_num_threads(n)
