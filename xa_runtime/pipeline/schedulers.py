"""The one scheduler wrapper: a fresh diffusers scheduler per branch and per stage.

Multistep solvers keep a step index and a history of model outputs, so no scheduler
object is ever shared between stages or branches (a quirk of the authors' code we fix).
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# name -> (class, config overrides)
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
DEFAULT_SCHEDULER = "dpmpp-2m"

# Fields that define the noise schedule; both branches must agree on them in stage 2.
SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")


def make_scheduler(name: str, base_config: dict[str, Any], **overrides: Any) -> SchedulerMixin:
    """A new scheduler of kind `name` built from a model's scheduler config."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; accepted: {', '.join(SCHEDULERS)}")
    cls, fixed = SCHEDULERS[name]
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config.update(fixed)
    config.update(overrides)
    return cls.from_config(config)


def schedule_mismatch(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of noise-schedule fields on which two scheduler configs differ."""
    return [k for k in SCHEDULE_FIELDS if a.get(k) != b.get(k)]
