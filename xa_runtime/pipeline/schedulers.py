"""The one scheduler wrapper: a fresh diffusers scheduler per branch and per stage.

Multistep solvers keep a step index and a history of model outputs, so no scheduler
object is ever shared between stages or branches (a quirk of the authors' code we fix).
"""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .params import SCHEDULERS

# Fields that define the noise schedule; both branches must agree on them in stage 2.
SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")


def make_scheduler(name: str, base_config: dict[str, Any], **overrides: Any) -> SchedulerMixin:
    """A new scheduler of kind `name` built from a model's scheduler config."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; accepted: {', '.join(SCHEDULERS)}")
    class_name, fixed = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config.update(fixed)
    config.update(overrides)
    return cls.from_config(config)


def schedule_mismatch(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of noise-schedule fields on which two scheduler configs differ."""
    return [k for k in SCHEDULE_FIELDS if a.get(k) != b.get(k)]


class Sampler:
    """One branch's denoising state for one stage: a fresh diffusers scheduler whose
    `step` gets the CFG-combined prediction, or, with `fused`, the Triton CFG + update
    kernel replaying the same schedule (xa_runtime.kernels.guided_step)."""

    def __init__(self, scheduler: SchedulerMixin, generator: torch.Generator, fused: bool = False, use_triton: bool = False):
        self.scheduler = scheduler
        self._kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        self._fused = None
        if fused:
            from ..kernels.guided_step import GuidedSampler

            if GuidedSampler.supports(scheduler):
                self._fused = GuidedSampler(scheduler, use_triton=use_triton)

    @property
    def is_fused(self) -> bool:
        return self._fused is not None

    def scale_model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._fused.scale_model_input(x) if self._fused else self.scheduler.scale_model_input(x, t)

    def step(self, eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor, guidance: float | None) -> torch.Tensor:
        """Next latents from the raw UNet output (rows [uncond; cond] when guidance is not None)."""
        if self._fused:
            return self._fused.step(eps, x, guidance)
        if guidance is not None:
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        return self.scheduler.step(eps, t, x, return_dict=False, **self._kwargs)[0]
