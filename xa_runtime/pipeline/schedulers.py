"""The one scheduler wrapper: a fresh diffusers scheduler per branch and per stage.

Multistep solvers keep a step index and a history of model outputs, so no scheduler
object is ever shared between stages or branches (a quirk of the authors' code we fix).
GuidedSampler replays a prepared Euler or DPM-Solver++ 2M schedule as per-step
coefficients, for a fused CFG + update step that the runtime hands in (kernels.guided_step).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, NamedTuple

import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .params import SCHEDULERS

# Fields that define the noise schedule; both branches must agree on them in stage 2.
SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")


# Fields a model's scheduler config owns (the noise schedule and what the UNet was trained to
# predict); a scheduler object given by the user contributes its class and everything else.
MODEL_FIELDS = SCHEDULE_FIELDS + ("trained_betas", "prediction_type", "timestep_spacing", "steps_offset")

# A sampler as a diffusers scheduler class and the config entries it sets on top of a model's
# scheduler config: what a SCHEDULERS name or a scheduler object given to the pipeline means.
SchedulerSpec = tuple[type, dict[str, Any]]


def karras_capable(cls: type) -> bool:
    """Whether a diffusers scheduler class takes `use_karras_sigmas`."""
    return "use_karras_sigmas" in inspect.signature(cls.__init__).parameters


def scheduler_spec(scheduler: "str | SchedulerMixin | SchedulerSpec", use_karras_sigmas: bool | None = None) -> SchedulerSpec:
    """A SCHEDULERS name or a diffusers scheduler object (its class and its sampler settings,
    i.e. its config less MODEL_FIELDS) as a SchedulerSpec; `use_karras_sigmas` set where the
    class has it (ParameterError where it does not)."""
    from ..errors import ParameterError

    if isinstance(scheduler, tuple):
        cls, fixed = scheduler[0], dict(scheduler[1])
    elif isinstance(scheduler, str):
        if scheduler not in SCHEDULERS:
            raise ParameterError("scheduler", scheduler, f"one of {', '.join(SCHEDULERS)} or a diffusers scheduler object")
        class_name, fixed = SCHEDULERS[scheduler]
        cls, fixed = getattr(diffusers, class_name), dict(fixed)
    elif isinstance(scheduler, SchedulerMixin):
        cls = type(scheduler)
        fixed = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_") and k not in MODEL_FIELDS}
    else:
        raise ParameterError("scheduler", type(scheduler).__name__,
                             f"one of {', '.join(SCHEDULERS)} or a diffusers scheduler object (SchedulerMixin)")
    if use_karras_sigmas is not None:
        if not karras_capable(cls):
            capable = [n for n, (c, _) in SCHEDULERS.items() if karras_capable(getattr(diffusers, c))]
            raise ParameterError("use_karras_sigmas", use_karras_sigmas,
                                 f"None for {cls.__name__} (it has no Karras sigmas); schedulers that have them: "
                                 f"{', '.join(capable)}")
        fixed["use_karras_sigmas"] = bool(use_karras_sigmas)
    return cls, fixed


def make_scheduler(name: "str | SchedulerSpec", base_config: dict[str, Any], **overrides: Any) -> SchedulerMixin:
    """A new scheduler of kind `name` (a SCHEDULERS name or a SchedulerSpec) built from a
    model's scheduler config."""
    if isinstance(name, str) and name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; accepted: {', '.join(SCHEDULERS)}")
    cls, fixed = scheduler_spec(name)
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config.update(fixed)
    config.update(overrides)
    return cls.from_config(config)


def schedule_mismatch(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of noise-schedule fields on which two scheduler configs differ."""
    return [k for k in SCHEDULE_FIELDS if a.get(k) != b.get(k)]


def stage2_schedulers(
    name: "str | SchedulerSpec", sd15_config: dict[str, Any], sdxl_config: dict[str, Any], steps: int, k: int, device: torch.device
) -> tuple[SchedulerMixin, SchedulerMixin]:
    """Fresh stage-2 schedulers for SD1.5 and SDXL on SDXL's schedule, starting at index N - k.

    Both come from SDXL's scheduler config (same timesteps by construction); SD1.5's
    keeps its own prediction type.
    """
    cfg15 = {"prediction_type": sd15_config.get("prediction_type", "epsilon")}
    out = []
    for overrides in (cfg15, {}):
        s = make_scheduler(name, sdxl_config, **overrides)
        s.set_timesteps(steps, device=device)
        if hasattr(s, "set_begin_index"):
            s.set_begin_index((steps - k) * s.order)
        out.append(s)
    return out[0], out[1]


class StepCoefficients(NamedTuple):
    """One guided step as five numbers (fp32 math; p = 0 for first-order steps):
    eps = u + g*(c - u);  x0 = (x - sig*eps) * inv_alpha;  x' = a*x + b*x0 + p*x0_prev."""

    sig: float
    inv_alpha: float
    a: float
    b: float
    p: float = 0.0


# (eps, x, x0_prev, guidance, coefficients) -> (x' in x's dtype, x0 in fp32): kernels.guided_step's contract
GuidedStep = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", "float | None", StepCoefficients],
                      tuple[torch.Tensor, torch.Tensor]]


def _vp(sigma: float) -> tuple[float, float]:
    """VP (alpha_t, sigma_t) of a VE sigma, as diffusers' DPM-Solver converts them."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


class GuidedSampler:
    """Replays a prepared diffusers Euler or DPM-Solver++ 2M schedule with a fused step.

    Euler (epsilon prediction): sig = sigma, inv_alpha = 1, a = sigma_next / sigma, b = 1 - a.
    DPM-Solver++ 2M (midpoint): VP alpha/sigma from the scheduler's sigmas (`coefficients`).
    Build it from a scheduler after `set_timesteps` (and `set_begin_index`): it reads the
    sigmas and starts, like a fresh diffusers scheduler, with a first-order step. `step`
    takes the raw UNet output ([uncond; cond] when guidance is not None) and runs `step_fn`.
    """

    def __init__(self, scheduler: SchedulerMixin, step_fn: GuidedStep):
        if not self.supports(scheduler):
            raise ValueError(f"no fused step for {type(scheduler).__name__} with this config")
        self.kind = "euler" if type(scheduler).__name__ == "EulerDiscreteScheduler" else "dpmpp-2m"
        self.sigmas = [float(s) for s in scheduler.sigmas.double().cpu()]
        self.num_timesteps = len(scheduler.timesteps)
        self.index = scheduler.begin_index or 0
        self.steps_done = 0
        self.x0_prev: torch.Tensor | None = None
        self.step_fn = step_fn

    @staticmethod
    def supports(scheduler: SchedulerMixin) -> bool:
        c = scheduler.config
        name = type(scheduler).__name__
        if c.get("prediction_type", "epsilon") != "epsilon":
            return False
        if name == "EulerDiscreteScheduler":
            return True  # any sigma spacing: the sigmas are read, not recomputed
        if name == "DPMSolverMultistepScheduler":
            return (
                c.algorithm_type == "dpmsolver++" and c.solver_order == 2 and c.solver_type == "midpoint"
                and not c.thresholding and c.final_sigmas_type == "zero" and not c.euler_at_final
            )
        return False

    def scale_model_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "euler":
            return x / math.sqrt(self.sigmas[self.index] ** 2 + 1.0)
        return x

    def coefficients(self) -> StepCoefficients:
        i = self.index
        s0, t = self.sigmas[i], self.sigmas[i + 1]
        if self.kind == "euler":
            a = t / s0
            return StepCoefficients(sig=s0, inv_alpha=1.0, a=a, b=1.0 - a)
        alpha_s0, sig_s0 = _vp(s0)
        alpha_t, sig_t = _vp(t)
        if t == 0.0:  # final step to sigma 0: the update returns x0
            return StepCoefficients(sig=sig_s0, inv_alpha=1.0 / alpha_s0, a=0.0, b=1.0)
        lam = lambda al, si: math.log(al) - math.log(si)  # noqa: E731
        h = lam(alpha_t, sig_t) - lam(alpha_s0, sig_s0)
        phi = alpha_t * (math.exp(-h) - 1.0)
        a = sig_t / sig_s0
        first_order = self.steps_done == 0 or i == self.num_timesteps - 1
        if first_order:
            return StepCoefficients(sig=sig_s0, inv_alpha=1.0 / alpha_s0, a=a, b=-phi)
        alpha_s1, sig_s1 = _vp(self.sigmas[i - 1])
        r0 = (lam(alpha_s0, sig_s0) - lam(alpha_s1, sig_s1)) / h
        return StepCoefficients(sig=sig_s0, inv_alpha=1.0 / alpha_s0, a=a, b=-phi * (1 + 0.5 / r0), p=0.5 * phi / r0)

    def step(self, eps: torch.Tensor, x: torch.Tensor, guidance: float | None) -> torch.Tensor:
        out, x0 = self.step_fn(eps, x, self.x0_prev, guidance, self.coefficients())
        self.x0_prev, self.index, self.steps_done = x0, self.index + 1, self.steps_done + 1
        return out


class Sampler:
    """One branch's denoising state for one stage: a fresh diffusers scheduler whose
    `step` gets the CFG-combined prediction, or, given `guided_step` (a fused CFG + update
    function the runtime hands in, kernels.guided_step), a GuidedSampler replaying the
    same schedule with it where the scheduler allows."""

    def __init__(self, scheduler: SchedulerMixin, generator: torch.Generator, guided_step: GuidedStep | None = None,
                 guidance_rescale: float = 0.0):
        self.scheduler, self.guidance_rescale = scheduler, guidance_rescale
        self._kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        self._fused = None
        if guided_step is not None and not guidance_rescale and GuidedSampler.supports(scheduler):
            self._fused = GuidedSampler(scheduler, guided_step)

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
            if self.guidance_rescale:
                from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

                eps = rescale_noise_cfg(eps, cond, guidance_rescale=self.guidance_rescale)
        return self.scheduler.step(eps, t, x, return_dict=False, **self._kwargs)[0]
