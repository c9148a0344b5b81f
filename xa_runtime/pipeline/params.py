"""Generation parameters (the official names), their defaults and their validation.

Validation needs no model and no torch: it runs before anything is loaded (the CLIs call it
before importing torch), and every error names the parameter, the value and the accepted
range (xa_runtime.errors.ParameterError).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ParameterError

# Sampler name -> (diffusers scheduler class, config overrides): the accepted values of
# `scheduler`. Classes are named, not imported, so that checking a request needs no torch;
# pipeline/schedulers.py builds them.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DEFAULT_SCHEDULER = "dpmpp-2m"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_STEPS = 1000
MAX_BATCH = 64
MAX_SEED = 2**63 - 1
# Image side limits in pixels; the multiples come from the UNet topology (see SizeRules).
MAX_SDXL_SIDE = 4096
MAX_SD15_SIDE = 2048


@dataclass(frozen=True)
class SizeRules:
    """Pixel multiples each UNet can take: VAE factor x 2^(number of downsamplers).

    SD1.5 (3 downsamplers): 8 x 8 = 64 px; SDXL (2 downsamplers): 8 x 4 = 32 px. Tiny
    models keep the topology, so the same rules hold for them.
    """

    sd15_multiple: int = 64
    sdxl_multiple: int = 32
    sd15_default: int = 512
    sdxl_default: int = 1024


@dataclass
class GenerationParams:
    """One request. Sizes left as None take the models' default sizes."""

    prompt: str | list[str]
    prompt_sd15: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    adapter_guidance_start: float = 0.9
    adapter_condition_scale: float = 1.0
    fusion_guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    height_sd15: int | None = None
    width_sd15: int | None = None
    scheduler: str = DEFAULT_SCHEDULER
    # With an init image (img2img / ControlNet-tile): the fraction of stage 1 that runs.
    strength: float = 1.0
    seed: int | None = None
    num_images_per_prompt: int = 1
    output_type: str = "pil"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stage2_steps(self) -> int:
        """k = int(N * adapter_guidance_start): steps run with both branches."""
        return int(self.num_inference_steps * self.adapter_guidance_start)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ParameterError(name, value, f"a finite number in {bracket}{lo}, {hi}]")


def _integer(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ParameterError(name, value, f"an integer in [{lo}, {hi}]")


def _prompt_list(name: str, value: Any, n: int | None) -> int:
    if isinstance(value, str):
        _unicode(name, value)
        return 1 if n is None else n
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(p, str) for p in value):
        raise ParameterError(name, value, "a string or a non-empty list of strings")
    if n is not None and len(value) != n:
        raise ParameterError(name, value, f"a string or a list of {n} strings, one per prompt")
    for text in value:
        _unicode(name, text)
    return len(value)


def _unicode(name: str, text: str) -> None:
    # Lone surrogates reach here from JSON ("\ud800") and from command lines whose bytes are not
    # UTF-8 (Python decodes argv with surrogateescape); no tokenizer, file or terminal takes them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ParameterError(name, text, "text that encodes as UTF-8 (no lone surrogate code points, which "
                                         "bytes that are not UTF-8 on a command line become)") from None


def _side(name: str, value: int, multiple: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value % multiple or not multiple <= value <= hi:
        raise ParameterError(name, value, f"a multiple of {multiple} in [{multiple}, {hi}] pixels")


def validate(params: GenerationParams, rules: SizeRules = SizeRules()) -> GenerationParams:
    """Check every parameter; return a copy with sizes resolved to the defaults."""
    n = _prompt_list("prompt", params.prompt, None)
    if params.prompt_sd15 is not None:
        _prompt_list("prompt_sd15", params.prompt_sd15, n)
    if params.negative_prompt is not None:
        _prompt_list("negative_prompt", params.negative_prompt, n)
    _integer("num_inference_steps", params.num_inference_steps, 1, MAX_STEPS)
    _finite("guidance_scale", params.guidance_scale, 0.0, 100.0)
    _finite("adapter_guidance_start", params.adapter_guidance_start, 0.0, 1.0, lo_open=True)
    if params.stage2_steps < 1:
        raise ParameterError(
            "adapter_guidance_start",
            params.adapter_guidance_start,
            f"a value with int(num_inference_steps * adapter_guidance_start) >= 1 (it gives 0 stage-2 steps "
            f"with num_inference_steps={params.num_inference_steps}); use at least "
            f"{1 / params.num_inference_steps:.4g}",
        )
    _finite("strength", params.strength, 0.0, 1.0, lo_open=True)
    if int(params.num_inference_steps * params.strength) < 1:
        raise ParameterError(
            "strength", params.strength,
            f"a value with int(num_inference_steps * strength) >= 1 (num_inference_steps={params.num_inference_steps})",
        )
    _finite("adapter_condition_scale", params.adapter_condition_scale, 0.0, 10.0)
    if params.fusion_guidance_scale is not None:
        _finite("fusion_guidance_scale", params.fusion_guidance_scale, 0.0, 1.0)
    if params.scheduler not in SCHEDULERS:
        raise ParameterError("scheduler", params.scheduler, f"one of {', '.join(SCHEDULERS)}")
    if params.seed is not None:
        _integer("seed", params.seed, 0, MAX_SEED)
    _integer("num_images_per_prompt", params.num_images_per_prompt, 1, MAX_BATCH)
    if n * params.num_images_per_prompt > MAX_BATCH:
        raise ParameterError(
            "num_images_per_prompt", params.num_images_per_prompt,
            f"at most {MAX_BATCH} images per call in all ({n} prompts x {params.num_images_per_prompt})",
        )
    if params.output_type not in OUTPUT_TYPES:
        raise ParameterError("output_type", params.output_type, f"one of {', '.join(OUTPUT_TYPES)}")

    resolved = GenerationParams(**{**params.to_dict()})
    resolved.height = params.height if params.height is not None else rules.sdxl_default
    resolved.width = params.width if params.width is not None else rules.sdxl_default
    resolved.height_sd15 = params.height_sd15 if params.height_sd15 is not None else rules.sd15_default
    resolved.width_sd15 = params.width_sd15 if params.width_sd15 is not None else rules.sd15_default
    _side("height", resolved.height, rules.sdxl_multiple, MAX_SDXL_SIDE)
    _side("width", resolved.width, rules.sdxl_multiple, MAX_SDXL_SIDE)
    _side("height_sd15", resolved.height_sd15, rules.sd15_multiple, MAX_SD15_SIDE)
    _side("width_sd15", resolved.width_sd15, rules.sd15_multiple, MAX_SD15_SIDE)
    return resolved
