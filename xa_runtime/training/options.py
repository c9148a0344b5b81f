"""Every setting of an X-Adapter training run, its default and its range, without torch.

Defaults are the paper's where it gives one (AdamW, learning rate 1e-5, batch 8, two
epochs); every choice it leaves open is a named field whose default docs/training.md
explains. `check_options` raises ParameterError naming the field's flag (`--batch-size`
for `batch_size`) before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ParameterError

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")  # diffusers.optimization names
NOISE_CHOICES = ("independent", "shared")
LOSS_WEIGHTINGS = ("none", "min-snr")
DTYPES = ("fp32", "fp16", "bf16")
REPORT_TO = ("tensorboard", "none")
DEFAULT_VALIDATION_PROMPTS = ("a photograph of an astronaut riding a horse", "a red sports car on a mountain road")

# Fields that change what a step computes: a resumed run must agree on all of them
# (checkpoint.fingerprint); the rest (run length, checkpoint and validation cadence, logging) may change.
MATH_FIELDS = (
    "learning_rate", "batch_size", "gradient_accumulation_steps", "lr_scheduler", "warmup_steps", "adam_beta1",
    "adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm", "dtype", "seed", "null_text_share", "noise",
    "loss_weighting", "snr_gamma", "resolution", "resolution_sd15", "bucketing", "max_aspect_ratio",
    "shuffle_buffer", "gradient_checkpointing", "cache",
)


def flag(name: str) -> str:
    """The command-line flag of an option field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainOptions:
    """One training run's settings (see docs/training.md for each default's reason)."""

    # optimisation (the paper: AdamW, lr 1e-5, batch 8, 2 epochs)
    learning_rate: float = 1e-5
    batch_size: int = 8  # global: split over the processes, so the same command trains the same on any count
    gradient_accumulation_steps: int = 1
    epochs: int = 2
    max_steps: int | None = None  # optimizer steps; stops before the epochs are done when given
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # 0: no clipping
    dtype: str = "fp32"  # frozen models' weights and the autocast dtype; the mapping layers keep fp32 masters
    seed: int = 0
    # the method's open choices
    null_text_share: float = 1.0  # share of rows whose new-model text is the empty prompt
    noise: str = "independent"
    loss_weighting: str = "none"
    snr_gamma: float = 5.0
    gradient_checkpointing: bool = True
    # data
    resolution: int | None = None  # new model's bucket area side; None: the model's default (1024 for SDXL)
    resolution_sd15: int | None = None  # old model's; None: the model's default (512 for SD1.5)
    bucketing: bool = True
    max_aspect_ratio: float = 2.0
    shuffle_buffer: int = 1000
    max_bad_share: float = 0.05
    cache: str | None = None  # folder of the latent/embedding cache (built on first use); None: encode every step
    # run
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 1000  # 0: never
    validation_prompts: tuple[str, ...] = DEFAULT_VALIDATION_PROMPTS
    validation_steps: int = 30
    log_every: int = 10
    report_to: str = "tensorboard"
    save_bin: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["validation_prompts"] = list(self.validation_prompts)
        return out


def _int(o: TrainOptions, name: str, low: int, high: int | None = None) -> None:
    value = getattr(o, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ParameterError(flag(name), value, f"an integer >= {low}" + (f" and <= {high}" if high is not None else ""))


def _float(o: TrainOptions, name: str, low: float, high: float, low_open: bool = False) -> None:
    value = getattr(o, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ParameterError(flag(name), value, f"a number {'>' if low_open else '>='} {low} and <= {high}")


def _choice(o: TrainOptions, name: str, choices: tuple[str, ...]) -> None:
    if getattr(o, name) not in choices:
        raise ParameterError(flag(name), getattr(o, name), "one of " + ", ".join(choices))


def check_options(o: TrainOptions) -> TrainOptions:
    """ParameterError (named by flag) for the first setting out of range; `o` otherwise."""
    _float(o, "learning_rate", 0.0, 1.0, low_open=True)
    _int(o, "batch_size", 1, 4096)
    _int(o, "gradient_accumulation_steps", 1, 4096)
    _int(o, "epochs", 1, 10_000)
    if o.max_steps is not None:
        _int(o, "max_steps", 1)
    _choice(o, "lr_scheduler", LR_SCHEDULERS)
    _int(o, "warmup_steps", 0)
    _float(o, "adam_beta1", 0.0, 1.0)
    _float(o, "adam_beta2", 0.0, 1.0)
    _float(o, "adam_epsilon", 0.0, 1.0, low_open=True)
    _float(o, "weight_decay", 0.0, 1.0)
    _float(o, "max_grad_norm", 0.0, 1e6)
    _choice(o, "dtype", DTYPES)
    _int(o, "seed", 0, 2**63 - 1)
    _float(o, "null_text_share", 0.0, 1.0)
    _choice(o, "noise", NOISE_CHOICES)
    _choice(o, "loss_weighting", LOSS_WEIGHTINGS)
    _float(o, "snr_gamma", 0.0, 1e6, low_open=True)
    for name in ("resolution", "resolution_sd15"):
        if getattr(o, name) is not None:
            _int(o, name, 64, 8192)
    _float(o, "max_aspect_ratio", 1.0, 8.0)
    _int(o, "shuffle_buffer", 1, 1_000_000)
    _float(o, "max_bad_share", 0.0, 1.0)
    _int(o, "checkpoint_every", 0)
    _int(o, "keep_checkpoints", 1)
    _int(o, "validate_every", 0)
    _int(o, "validation_steps", 1, 1000)
    _int(o, "log_every", 1)
    _choice(o, "report_to", REPORT_TO)
    if not o.validation_prompts or not all(isinstance(p, str) and p.strip() for p in o.validation_prompts):
        raise ParameterError("--validation-prompt", list(o.validation_prompts), "one or more non-empty prompts")
    return o
