"""Generation parameters: their one definition (`PARAMETERS`), and what derives from it.

Each `Param` row says a parameter's name, kind, accepted range, default, help and which doors
expose it. From the rows come the `GenerationParams` dataclass, `validate`, xa-generate's and
xa-bench's flags (cli/vocabulary.py add_generation_arguments), the JSON schema of xa-serve's
request body and its GET /v1/parameters (serve/app.py), and so the playground's form. A new
parameter is one row here (plus a rule in `validate` only if it depends on another one).

Validation needs no model and no torch: it runs before anything is loaded (the CLIs call it
before importing torch), and every error names the parameter, the value and the accepted
range (xa_runtime.errors.ParameterError).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, make_dataclass
from typing import Any, Mapping

from ..errors import AspectWarning, ParameterError

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


REQUIRED: Any = object()  # the default of a parameter every request must give (the prompt)
SAME: Any = object()  # a door's default that is the pipeline's own
# The kinds of parameter: how it is typed and checked.
TEXT, INT, FLOAT, CHOICE, SIDE, PAIR = "text", "int", "float", "choice", "side", "pair"


@dataclass(frozen=True)
class Param:
    """One generation parameter: the single source of its name, range, default and help.

    `kind`: TEXT (a string or a list of strings, one per prompt unless it is the prompt
    itself), INT / FLOAT (within [minimum, maximum], `exclusive_minimum` for (minimum, maximum]),
    CHOICE (one of `choices`), SIDE (pixels, a multiple of SizeRules' `side` multiple up to
    `maximum`; None takes the model's default), PAIR (two integers in [minimum, maximum], e.g.
    SDXL's (height, width) size conditioning; Python only). `optional`: None is accepted (the default then
    means "decided elsewhere": drawn seed, model size, plain add).
    Doors: every row is a GenerationParams field and a keyword of the pipeline; `flag` names
    its xa-generate flag (None: not on the command line; `cli_default` and `cli_words`, e.g.
    seed's 'random', differ there); `http` puts it in xa-serve's request body; `label` puts it
    on the playground's form (`blank`: what its empty field means).
    """

    name: str
    kind: str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()
    side: str = ""  # SIDE: "sdxl" or "sd15"
    optional: bool = False
    flag: str | None = None
    metavar: str | None = None
    cli_default: Any = SAME
    cli_words: Mapping[str, Any] = field(default_factory=dict)
    http: bool = True
    label: str = ""
    blank: str = ""  # an optional parameter left out: what that means, said on the playground's empty field
    example: Any = None

    @property
    def annotation(self) -> str:
        base = {TEXT: "str | list[str]", INT: "int", FLOAT: "float", CHOICE: "str", SIDE: "int",
                PAIR: "tuple[int, int]"}[self.kind]
        return base + " | None" if self.optional else base

    def bounds(self, rules: SizeRules = SizeRules(), cap: float | None = None) -> tuple[Any, Any]:
        """(minimum, maximum), the maximum lowered to `cap` (a server limit) when given."""
        lo = getattr(rules, f"{self.side}_multiple") if self.kind == SIDE else self.minimum
        hi = self.maximum if cap is None or self.maximum is None else min(self.maximum, cap)
        return lo, hi

    def accepted(self, rules: SizeRules = SizeRules(), cap: float | None = None) -> str:
        """What the row accepts, as ParameterError says it."""
        lo, hi = self.bounds(rules, cap)
        if self.kind == INT:
            return f"an integer in [{lo}, {hi}]"
        if self.kind == FLOAT:
            return f"a finite number in {'(' if self.exclusive_minimum else '['}{lo}, {hi}]"
        if self.kind == CHOICE:
            return f"one of {', '.join(self.choices)}"
        if self.kind == SIDE:
            return f"a multiple of {lo} in [{lo}, {hi}] pixels"
        if self.kind == PAIR:
            return f"two integers in [{lo}, {hi}], (height, width) or (top, left)"
        return "a string or a non-empty list of strings"

    def range_text(self, rules: SizeRules = SizeRules(), cap: float | None = None) -> str:
        """The range in a flag's help: 1..1000, (0, 1], multiple of 32 ..."""
        lo, hi = self.bounds(rules, cap)
        if self.kind == SIDE:
            return f"multiple of {lo}"
        if self.kind in (INT, FLOAT) and self.exclusive_minimum:
            return f"({lo:g}, {hi:g}]"
        if self.kind in (INT, FLOAT):
            return f"{lo:g}..{hi:g}" if self.kind == FLOAT else f"{lo}..{hi}"
        return ""

    def describe(self, rules: SizeRules = SizeRules(), cap: float | None = None) -> str:
        """The help with its range: at `{range}` in `help`, else appended."""
        rng = self.range_text(rules, cap)
        if "{range}" in self.help:
            return self.help.format(range=rng)
        return f"{self.help}, {rng}" if rng else self.help

    def json_schema(self, rules: SizeRules = SizeRules(), cap: float | None = None) -> dict[str, Any]:
        """The JSON-Schema keywords of the value's range (the type comes from `annotation`)."""
        lo, hi = self.bounds(rules, cap)
        out: dict[str, Any] = {"description": self.describe(rules, cap)}
        if self.kind in (INT, FLOAT, SIDE):
            out["exclusiveMinimum" if self.exclusive_minimum else "minimum"] = lo
            out["maximum"] = hi
        if self.kind == SIDE:
            out["multipleOf"] = lo
        if self.kind == CHOICE:
            out["enum"] = list(self.choices)
        if self.example is not None:
            out["examples"] = [self.example]
        return out

    def check(self, value: Any, rules: SizeRules = SizeRules()) -> None:
        """ParameterError unless `value` is in range (TEXT: see _prompt_list)."""
        if value is None and self.optional:
            return
        lo, hi = self.bounds(rules)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind == INT:
            ok = number and isinstance(value, int) and lo <= value <= hi
        elif self.kind == FLOAT:
            ok = number and math.isfinite(value) and (value > lo if self.exclusive_minimum else value >= lo) and value <= hi
        elif self.kind == SIDE:
            ok = number and isinstance(value, int) and not value % lo and lo <= value <= hi
        elif self.kind == CHOICE:
            ok = value in self.choices
        elif self.kind == PAIR:
            ok = (isinstance(value, (tuple, list)) and len(value) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in value))
        else:
            raise ValueError(f"{self.name}: TEXT parameters are checked with the prompt count")
        if not ok:
            raise ParameterError(self.name, value, self.accepted(rules))


def _side(name: str, side: str, flag: str, label: str, what: str, dim: str, default: int) -> Param:
    return Param(name, SIDE, None, f"{what} {dim} in pixels, {{range}} (default: the model's, {default})", side=side,
                 maximum=MAX_SDXL_SIDE if side == "sdxl" else MAX_SD15_SIDE, optional=True, flag=flag, metavar="PX",
                 label=label, blank="model's")


# The definition. Row order is the dataclass' field order and the order of validation.
PARAMETERS: tuple[Param, ...] = (
    Param("prompt", TEXT, REQUIRED, "prompt of the SDXL branch (several prompts: a list, or the flag repeated)",
          flag="--prompt", metavar="TEXT", label="Prompt", example="a cat"),
    Param("prompt_2", TEXT, None, "prompt of SDXL's second text encoder (OpenCLIP-bigG), as diffusers' prompt_2 "
          "(default: the prompt); one per prompt", optional=True, flag="--prompt-2", metavar="TEXT", blank="the prompt"),
    Param("prompt_sd15", TEXT, None, "prompt of the SD1.5 branch (default: the prompt); one per prompt",
          optional=True, flag="--prompt-sd15", metavar="TEXT", blank="the prompt"),
    Param("negative_prompt", TEXT, None, "negative prompt of both branches; one per prompt", optional=True,
          flag="--negative-prompt", metavar="TEXT", label="Negative prompt", blank="none"),
    Param("negative_prompt_2", TEXT, None, "negative prompt of SDXL's second text encoder, as diffusers' "
          "negative_prompt_2 (default: the negative prompt); one per prompt", optional=True,
          flag="--negative-prompt-2", metavar="TEXT", blank="the negative prompt"),
    Param("num_inference_steps", INT, 50, "denoising steps N", minimum=1, maximum=MAX_STEPS, flag="--steps",
          metavar="N", label="Steps"),
    Param("guidance_scale", FLOAT, 7.5, "classifier-free guidance of both branches, {range}; <= 1 turns CFG off",
          minimum=0.0, maximum=100.0, flag="--guidance-scale", metavar="F", label="Guidance"),
    Param("guidance_rescale", FLOAT, 0.0, "rescale of the guided prediction of both branches (Lin et al. 2023, "
          "diffusers' guidance_rescale), {range}; 0 turns it off", minimum=0.0, maximum=1.0, flag="--guidance-rescale",
          metavar="F"),
    Param("clip_skip", INT, None, "text-encoder layers skipped from the end, both branches, as diffusers' clip_skip "
          "(A1111's 'Clip skip' minus 1), {range} (default: none)", minimum=0, maximum=10, optional=True,
          flag="--clip-skip", metavar="N", blank="none"),
    Param("adapter_guidance_start", FLOAT, 0.9, "fraction of the steps run with the adapter, {range}, int(N * F) >= 1",
          minimum=0.0, maximum=1.0, exclusive_minimum=True, flag="--adapter-guidance-start", metavar="F",
          label="Adapter start"),
    Param("adapter_condition_scale", FLOAT, 1.0, "scale of the mapped residuals", minimum=0.0, maximum=10.0,
          flag="--adapter-condition-scale", metavar="F", label="Condition scale"),
    Param("fusion_guidance_scale", FLOAT, None, "inject as a lerp h + F * (r - h), {range} (default: plain add h + r)",
          minimum=0.0, maximum=1.0, optional=True, flag="--fusion-guidance-scale", metavar="F", blank="plain add"),
    _side("height", "sdxl", "--height", "SDXL height", "SDXL image", "height", 1024),
    _side("width", "sdxl", "--width", "SDXL width", "SDXL image", "width", 1024),
    _side("height_sd15", "sd15", "--height-sd15", "SD1.5 height", "SD1.5", "height", 512),
    _side("width_sd15", "sd15", "--width-sd15", "SD1.5 width", "SD1.5", "width", 512),
    Param("original_size", PAIR, None, "SDXL's size conditioning (height, width) of the source image, as diffusers' "
          "original_size (default: the SDXL size)", minimum=1, maximum=MAX_SDXL_SIDE * 4, optional=True, http=False),
    Param("target_size", PAIR, None, "SDXL's target size conditioning (height, width), as diffusers' target_size "
          "(default: the SDXL size)", minimum=1, maximum=MAX_SDXL_SIDE * 4, optional=True, http=False),
    Param("crops_coords_top_left", PAIR, (0, 0), "SDXL's crop conditioning (top, left), as diffusers' "
          "crops_coords_top_left", minimum=0, maximum=MAX_SDXL_SIDE * 4, http=False),
    Param("scheduler", CHOICE, DEFAULT_SCHEDULER, "sampler of both branches", choices=tuple(SCHEDULERS),
          flag="--scheduler", label="Sampler"),
    Param("strength", FLOAT, 1.0, "with an init image: the fraction of stage 1 that runs, {range}, int(N * F) >= 1",
          minimum=0.0, maximum=1.0, exclusive_minimum=True, flag="--strength", metavar="F"),
    Param("seed", INT, None, "seed of the initial noise, {range}; none ('random' on the command line): drawn, and recorded in the outputs", minimum=0, maximum=MAX_SEED,
          optional=True, flag="--seed", metavar="N", cli_default=0, cli_words={"random": None}, label="Seed", blank="random"),
    Param("num_images_per_prompt", INT, 1, "images per prompt, {range} in all", minimum=1,
          maximum=MAX_BATCH, flag="--batch", metavar="B", label="Images"),
    Param("output_type", CHOICE, "pil", "what the pipeline returns", choices=OUTPUT_TYPES, http=False),
)
PARAMETER = {p.name: p for p in PARAMETERS}


class _GenerationParamsMethods:
    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)  # type: ignore[attr-defined]

    @property
    def stage2_steps(self) -> int:
        """k = int(N * adapter_guidance_start): steps run with both branches."""
        return int(self.num_inference_steps * self.adapter_guidance_start)  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


# One request: a dataclass with a field per row of PARAMETERS (their defaults), + `extra`.
# Sizes left as None take the models' default sizes.
GenerationParams: Any = make_dataclass(
    "GenerationParams",
    [(p.name, p.annotation) if p.default is REQUIRED else (p.name, p.annotation, field(default=p.default))
     for p in PARAMETERS] + [("extra", "dict[str, Any]", field(default_factory=dict))],
    bases=(_GenerationParamsMethods,), namespace={"__module__": __name__},
)
GenerationParams.__doc__ = "One request: a field per row of PARAMETERS. Sizes left as None take the models' default sizes."


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


def _steps_of(name: str, params: Any) -> None:
    # adapter_guidance_start and strength are fractions of the steps: each must leave one step
    n, fraction = params.num_inference_steps, getattr(params, name)
    if int(n * fraction) >= 1:
        return
    if name == "adapter_guidance_start":
        raise ParameterError(name, fraction, f"a value with int(num_inference_steps * adapter_guidance_start) >= 1 "
                                             f"(it gives 0 stage-2 steps with num_inference_steps={n}); use at least "
                                             f"{1 / n:.4g}")
    raise ParameterError(name, fraction, f"a value with int(num_inference_steps * {name}) >= 1 (num_inference_steps={n})")


def _batch_total(params: Any, prompts: int) -> None:
    if prompts * params.num_images_per_prompt > MAX_BATCH:
        raise ParameterError(
            "num_images_per_prompt", params.num_images_per_prompt,
            f"at most {MAX_BATCH} images per call in all ({prompts} prompts x {params.num_images_per_prompt})",
        )


ASPECT_TOLERANCE = 0.05  # relative aspect difference between the stages' sizes taken as the same aspect


def _aspect_error(h: int, w: int, height: int, width: int) -> float:
    return abs(math.log((w / h) / (width / height)))


def sd15_size(height: int, width: int, rules: SizeRules = SizeRules(), height_sd15: int | None = None,
              width_sd15: int | None = None) -> tuple[int, int]:
    """The SD1.5 stage's (height, width) for an SDXL image of height x width: the one place
    that picks it (the pipeline, xa-generate and xa-serve all resolve sizes in `validate`).

    Not given: the method's scale (SD1.5's default side / SDXL's: 512 / 1024 = 1:2) on each
    side, rounded to SD1.5's multiple so that the aspect stays within ASPECT_TOLERANCE
    (1216x832 -> 640x448 wide x high); where that grid is too coarse (tiny models:
    192x256 -> 96x128 has no 4:3 size of 64 px multiples) the smallest SD1.5 size, no larger
    than the SDXL image, with that aspect. One side given: the other follows the SDXL aspect.
    Both given with another aspect: kept, with an AspectWarning that says the hand-over
    stretches the SD1.5 image."""
    m, tol = rules.sd15_multiple, math.log1p(ASPECT_TOLERANCE)
    top_h, top_w = min(MAX_SD15_SIDE, max(m, height // m * m)), min(MAX_SD15_SIDE, max(m, width // m * m))

    def fit(side: int, ratio: float, hi: int) -> int:
        return min(hi, max(m, round(side * ratio / m) * m))

    if height_sd15 is not None and width_sd15 is not None:
        if _aspect_error(height_sd15, width_sd15, height, width) > tol:
            follow = sd15_size(height, width, rules)
            warnings.warn(
                f"SD1.5 size {width_sd15}x{height_sd15} (width x height, aspect {width_sd15 / height_sd15:.2f}) differs "
                f"in aspect from the SDXL size {width}x{height} (aspect {width / height:.2f}): at the hand-over the SD1.5 "
                f"image is resized to {width}x{height}, so it is stretched {width / width_sd15 / (height / height_sd15):.2f}x "
                f"horizontally; leave height_sd15 / width_sd15 (--height-sd15 / --width-sd15) unset for "
                f"{follow[1]}x{follow[0]}, which follows the SDXL aspect", AspectWarning, stacklevel=3)
        return height_sd15, width_sd15
    if height_sd15 is not None:
        return height_sd15, fit(height_sd15, width / height, MAX_SD15_SIDE)
    if width_sd15 is not None:
        return fit(width_sd15, height / width, MAX_SD15_SIDE), width_sd15
    scale = rules.sd15_default / rules.sdxl_default
    exact_h, exact_w = height * scale, width * scale
    near = [(h, w) for h in {max(m, math.floor(exact_h / m) * m), max(m, math.ceil(exact_h / m) * m)}
            for w in {max(m, math.floor(exact_w / m) * m), max(m, math.ceil(exact_w / m) * m)}
            if h <= MAX_SD15_SIDE and w <= MAX_SD15_SIDE]
    best = min(near, key=lambda hw: (_aspect_error(*hw, height, width), abs(hw[0] * hw[1] - exact_h * exact_w)))
    if _aspect_error(*best, height, width) <= tol:
        return best
    target = exact_h * exact_w
    same_aspect = [(h, w) for h in range(m, top_h + 1, m) for w in range(m, top_w + 1, m)
                   if _aspect_error(h, w, height, width) <= tol]
    if not same_aspect:
        warnings.warn(f"no SD1.5 size of {m} px multiples up to the SDXL size {width}x{height} (width x height) has its "
                      f"aspect; the SD1.5 stage runs at {best[1]}x{best[0]} and is stretched to {width}x{height} at "
                      "the hand-over; give an SDXL size whose aspect SD1.5's grid can follow", AspectWarning,
                      stacklevel=3)
        return best
    return min(same_aspect, key=lambda hw: (hw[0] * hw[1] < target, abs(hw[0] * hw[1] - target),
                                            _aspect_error(*hw, height, width)))


def validate(params: Any, rules: SizeRules = SizeRules()) -> Any:
    """Check every parameter (each row's range, in PARAMETERS' order, then the rules that tie
    two together right after the later of them); return a copy with sizes resolved to the
    defaults."""
    resolved = GenerationParams(**params.to_dict())
    for name in ("height", "width"):
        if getattr(params, name) is None:
            setattr(resolved, name, rules.sdxl_default)
    n = _prompt_list("prompt", params.prompt, None)
    for p in PARAMETERS:
        value = getattr(resolved, p.name)
        if p.kind == TEXT:
            if value is not None and p.name != "prompt":
                _prompt_list(p.name, value, n)
        else:
            p.check(value, rules)
        if p.name == "width_sd15":  # both stages' sides checked: the SD1.5 size that follows the SDXL one
            resolved.height_sd15, resolved.width_sd15 = sd15_size(resolved.height, resolved.width, rules,
                                                                  params.height_sd15, params.width_sd15)
        if p.name in ("adapter_guidance_start", "strength"):
            _steps_of(p.name, params)
        elif p.name == "num_images_per_prompt":
            _batch_total(params, n)
    return resolved
