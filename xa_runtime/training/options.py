"""Every setting of an X-Adapter training run: its one definition (`OPTIONS`), without torch.

Each `Option` row gives a setting's name, kind, default, accepted range and help; the
`TrainOptions` dataclass, `check_options` and xa-train's flags (cli/train.py) derive from
the rows. Defaults are the paper's where it gives one (AdamW, learning rate 1e-5, batch 8,
two epochs); every choice it leaves open is a row whose default docs/training.md explains.
`check_options` raises ParameterError naming the row's flag (`--batch-size` for
`batch_size`) before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, make_dataclass
from typing import Any

from ..errors import ParameterError

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")  # diffusers.optimization names
NOISE_CHOICES = ("independent", "shared")
LOSS_WEIGHTINGS = ("none", "min-snr")
DTYPES = ("fp32", "fp16", "bf16")
REPORT_TO = ("tensorboard", "none")
DEFAULT_VALIDATION_PROMPTS = ("a photograph of an astronaut riding a horse", "a red sports car on a mountain road")
INT, FLOAT, CHOICE, SWITCH, PATH, TEXTS = "int", "float", "choice", "switch", "path", "texts"


@dataclass(frozen=True)
class Option:
    """One training setting. `kind`: INT / FLOAT within [minimum, maximum] (`exclusive_minimum`:
    (minimum, maximum]), CHOICE (one of `choices`), SWITCH (a bool whose flag turns the
    default off, `--no-...`), PATH (a string), TEXTS (a tuple of non-empty strings, the flag
    repeated). `optional`: None is accepted (meaning what `help` says). `math`: it changes what
    a step computes, so a resumed run must keep it (checkpoint.fingerprint). `flag`: its
    xa-train flag (None: derived from the name; "" for no flag)."""

    name: str
    kind: str
    default: Any
    help: str
    group: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False
    math: bool = False
    metavar: str | None = None
    flag: str | None = None

    @property
    def cli_flag(self) -> str:
        if self.flag is not None:
            return self.flag
        return ("--no-" if self.kind == SWITCH else "--") + self.name.replace("_", "-")

    def accepted(self) -> str:
        if self.kind == INT:
            return f"an integer in [{self.minimum:g}, {self.maximum:g}]"
        if self.kind == FLOAT:
            return f"a finite number in {'(' if self.exclusive_minimum else '['}{self.minimum:g}, {self.maximum:g}]"
        if self.kind == CHOICE:
            return "one of " + ", ".join(self.choices)
        if self.kind == TEXTS:
            return "one or more non-empty texts"
        return "true or false" if self.kind == SWITCH else "a path"

    def check(self, value: Any) -> None:
        """ParameterError naming the flag unless `value` is accepted."""
        if value is None and self.optional:
            return
        if self.kind in (INT, FLOAT):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = number and (isinstance(value, int) if self.kind == INT else math.isfinite(value))
            ok = ok and (value > self.minimum if self.exclusive_minimum else value >= self.minimum)
            ok = ok and value <= self.maximum
        elif self.kind == CHOICE:
            ok = value in self.choices
        elif self.kind == SWITCH:
            ok = isinstance(value, bool)
        elif self.kind == TEXTS:
            ok = isinstance(value, tuple) and bool(value) and all(isinstance(v, str) and v.strip() for v in value)
        else:
            ok = isinstance(value, str) and bool(value)
        if not ok:
            raise ParameterError(self.cli_flag or "--" + self.name.replace("_", "-"),
                                 list(value) if isinstance(value, tuple) else value, self.accepted())


OPT, METHOD, DATA, RUN = "optimisation", "method", "data", "run"
BIG = 10**9
OPTIONS: tuple[Option, ...] = (
    # optimisation (the paper: AdamW, lr 1e-5, batch 8, 2 epochs)
    Option("learning_rate", FLOAT, 1e-5, "AdamW learning rate", OPT, 0.0, 1.0, exclusive_minimum=True, math=True,
           metavar="LR"),
    Option("batch_size", INT, 8, "global batch per micro-step, split over the processes", OPT, 1, 4096, math=True,
           metavar="B"),
    Option("gradient_accumulation_steps", INT, 1, "micro-steps per optimizer step", OPT, 1, 4096, math=True),
    Option("epochs", INT, 2, "passes over the data", OPT, 1, 10_000),
    Option("max_steps", INT, None, "optimizer steps to train (default: --epochs)", OPT, 1, BIG, optional=True),
    Option("lr_scheduler", CHOICE, "constant", "learning-rate schedule", OPT, choices=LR_SCHEDULERS, math=True),
    Option("warmup_steps", INT, 0, "linear warm-up steps of the schedule", OPT, 0, BIG, math=True),
    Option("adam_beta1", FLOAT, 0.9, "AdamW beta1", OPT, 0.0, 1.0, math=True, flag=""),
    Option("adam_beta2", FLOAT, 0.999, "AdamW beta2", OPT, 0.0, 1.0, math=True, flag=""),
    Option("adam_epsilon", FLOAT, 1e-8, "AdamW epsilon", OPT, 0.0, 1.0, exclusive_minimum=True, math=True, flag=""),
    Option("weight_decay", FLOAT, 1e-2, "AdamW weight decay", OPT, 0.0, 1.0, math=True, metavar="F"),
    Option("max_grad_norm", FLOAT, 1.0, "gradient clipping norm, 0 = none", OPT, 0.0, 1e6, math=True, metavar="F"),
    Option("seed", INT, 0, "seed of the mapping layers' init, data order, timesteps and noise", OPT, 0, 2**63 - 1,
           math=True),
    # the method's open choices
    Option("null_text_share", FLOAT, 1.0, "share of rows whose new model sees the empty prompt", METHOD, 0.0, 1.0,
           math=True, metavar="F"),
    Option("noise", CHOICE, "independent", "the two latents' noise: independent draws or one shared draw", METHOD,
           choices=NOISE_CHOICES, math=True),
    Option("loss_weighting", CHOICE, "none", "per-timestep loss weight", METHOD, choices=LOSS_WEIGHTINGS, math=True),
    Option("snr_gamma", FLOAT, 5.0, "gamma of --loss-weighting min-snr", METHOD, 0.0, 1e6, exclusive_minimum=True,
           math=True, metavar="F"),
    Option("gradient_checkpointing", SWITCH, True, "keep every activation where gradients pass (faster, more memory)",
           METHOD, math=True),
    # data
    Option("resolution", INT, None, "new model's bucket side, pixels (area = PX^2) (default: the model's, 1024 for SDXL)",
           DATA, 64, 8192, optional=True, math=True, metavar="PX"),
    Option("resolution_sd15", INT, None, "old model's bucket side, pixels (default: the model's, 512 for SD1.5)", DATA,
           64, 8192, optional=True, math=True, metavar="PX"),
    Option("bucketing", SWITCH, True, "one square bucket instead of aspect-ratio buckets", DATA, math=True),
    Option("max_aspect_ratio", FLOAT, 2.0, "widest bucket", DATA, 1.0, 8.0, math=True, metavar="F"),
    Option("shuffle_buffer", INT, 1000, "samples in the seeded shuffle buffer", DATA, 1, 1_000_000, math=True),
    Option("max_bad_share", FLOAT, 0.05, "stop when more than this share of samples is unreadable or captionless",
           DATA, 0.0, 1.0, metavar="F"),
    Option("cache", PATH, None, "cache of VAE latents and caption embeddings: built here on first use, then read "
           "instead of the images (default: encode every step)", DATA, optional=True, math=True, metavar="DIR"),
    # run
    Option("checkpoint_every", INT, 500, "checkpoint every N steps, 0 = only on signals", RUN, 0, BIG),
    Option("keep_checkpoints", INT, 3, "checkpoints kept, newest first", RUN, 1, BIG, metavar="K"),
    Option("validate_every", INT, 1000, "validation images every N steps, 0 = never", RUN, 0, BIG),
    Option("validation_prompts", TEXTS, DEFAULT_VALIDATION_PROMPTS, "validation prompt, seed = its index (repeat the "
           "flag; default: " + "; ".join(DEFAULT_VALIDATION_PROMPTS) + ")", RUN, flag="--validation-prompt",
           metavar="TEXT"),
    Option("validation_steps", INT, 30, "denoising steps of a validation image", RUN, 1, 1000),
    Option("log_every", INT, 10, "log every N steps", RUN, 1, BIG),
    Option("report_to", CHOICE, "tensorboard", "tracker", RUN, choices=REPORT_TO),
    Option("save_bin", SWITCH, False, "also write x_adapter.bin (torch.save, as the release)", RUN, flag="--save-bin"),
    Option("dtype", CHOICE, "fp32", "frozen models' weights and mixed precision (the mapping layers keep fp32 masters)",
           RUN, choices=DTYPES, math=True, flag=""),  # the flag is the shared --dtype (cli/vocabulary.py)
)
BY_NAME = {o.name: o for o in OPTIONS}
# Rows that change a step's arithmetic: a resumed run must agree on all of them.
MATH_FIELDS = tuple(o.name for o in OPTIONS if o.math)


def _to_dict(self: Any) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["validation_prompts"] = list(self.validation_prompts)
    return out


TrainOptions = make_dataclass(
    "TrainOptions", [(o.name, Any, dataclasses.field(default=o.default)) for o in OPTIONS],
    namespace={"to_dict": _to_dict, "__doc__": "One training run's settings: a field per OPTIONS row "
                                                "(docs/training.md says each default's reason)."},
)
TrainOptions.__module__ = __name__


def check_options(o: Any) -> Any:
    """ParameterError (named by flag) for the first setting out of range; `o` otherwise."""
    for row in OPTIONS:
        row.check(getattr(o, row.name))
    return o
