"""diffusers' call arguments on the X-Adapter pipeline: `__call__` maps generator, latents,
prompt embeddings, callback_on_step_end, return_dict, scheduler objects, ControlNet's image=
and ip_adapter_image= onto `generate` (the algorithm, xadapter.py), and checks them first."""

from __future__ import annotations

import random
from typing import Any, Callable, Protocol, Sequence, cast

import torch

from ..errors import ParameterError
from ..plugins.base import SD15StepPlugin
from .params import DEFAULT_SCHEDULER, GenerationParams
from .schedulers import SchedulerSpec, scheduler_spec

StepCallback = Callable[[str, int, int], None]  # (stage name, step index, steps in stage)
# diffusers' callback_on_step_end, as the pipeline calls it: (stage, step index, timestep, tensors) ->
# replacements for those tensors
StepEnd = Callable[[str, int, torch.Tensor, dict[str, torch.Tensor]], dict[str, Any]]
# diffusers' StableDiffusionXLPipeline._callback_tensor_inputs (the SDXL branch's, as the current
# stage uses them) + the SD1.5 branch's under the _sd15 suffix
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "latents_sd15",
                          "prompt_embeds_sd15")
# prompt_embeds keyword -> (branch, rank): SDXL keeps diffusers' StableDiffusionXLPipeline names,
# SD1.5 the same names with the _sd15 suffix that prompt_sd15 has
EMBEDS = {
    "prompt_embeds": ("sdxl", 3), "negative_prompt_embeds": ("sdxl", 3),
    "pooled_prompt_embeds": ("sdxl", 2), "negative_pooled_prompt_embeds": ("sdxl", 2),
    "prompt_embeds_sd15": ("sd15", 3), "negative_prompt_embeds_sd15": ("sd15", 3),
}


def request_generator(p: GenerationParams, generator: torch.Generator | list[torch.Generator] | None,
                      tensor_inputs: Sequence[str]) -> torch.Generator | list[torch.Generator]:
    """The request's generator: the caller's (one, or one per image; then no seed), or a CPU generator of `p.seed`
    (drawn and recorded in `p` when None). Also checks the callback's tensor names."""
    unknown = [k for k in tensor_inputs if k not in CALLBACK_TENSOR_INPUTS]
    if unknown:
        raise ParameterError("callback_on_step_end_tensor_inputs", list(tensor_inputs),
                             f"names among {', '.join(CALLBACK_TENSOR_INPUTS)}")
    if generator is not None:
        if isinstance(generator, (list, tuple)):  # diffusers: one generator per image
            images = len(p.prompts) * p.num_images_per_prompt
            if len(generator) != images or not all(isinstance(g, torch.Generator) for g in generator):
                raise ParameterError("generator", [type(g).__name__ for g in generator],
                                     f"one torch.Generator, or a list of {images} (one per image, as diffusers)")
            if len({g.device for g in generator}) != 1:
                raise ParameterError("generator", [str(g.device) for g in generator], "generators on one device")
        elif not isinstance(generator, torch.Generator):
            raise ParameterError("generator", type(generator).__name__, "a torch.Generator or a list of them")
        if p.seed is not None:
            raise ParameterError("seed", p.seed, "None when a generator is given (give one)")
        return generator
    if p.seed is None:
        p.seed = random.SystemRandom().randrange(2**63)
    return torch.Generator("cpu").manual_seed(p.seed)


def step_end_callback(pipe: Any, callback: Callable[..., dict[str, Any] | None] | None,
                      tensor_inputs: Sequence[str]) -> StepEnd | None:
    """diffusers' callback_on_step_end(pipe, step, timestep, callback_kwargs) as the stages
    call it: the named tensors plus "stage"; what it returns replaces those tensors."""
    if callback is None:
        return None
    names = tuple(tensor_inputs)

    def on_step_end(stage: str, i: int, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {k: tensors[k] for k in names}
        kwargs["stage"] = stage
        return callback(pipe, i, t, kwargs) or {}

    return on_step_end


def check_latents(latents: torch.Tensor | None, shape: tuple[int, ...], p: GenerationParams, init_image: Any) -> None:
    """Stage-1 start latents given by the caller: SD1.5 latents of the request's shape, not with img2img."""
    if latents is None:
        return
    if init_image is not None:
        raise ParameterError("latents", "a tensor", "None with init_image (img2img starts from the image)")
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
        raise ParameterError("latents", tuple(getattr(latents, "shape", ())),
                             f"a tensor of shape {shape} (SD1.5 latents at {p.height_sd15}x{p.width_sd15})")


# diffusers call arguments this pipeline does not take -> what to do instead
UNSUPPORTED = {
    "cross_attention_kwargs": "not taken per call: set LoRA weights with set_adapters(names, weights) or "
                              "fuse_lora(lora_scale=...)",
    "denoising_start": "not taken (no refiner hand-over): adapter_guidance_start sets where stage 2 starts",
    "denoising_end": "not taken (no refiner hand-over): adapter_guidance_start sets where stage 2 starts",
    "timesteps": "not taken: num_inference_steps and scheduler= (a name or a diffusers scheduler)",
    "sigmas": "not taken: num_inference_steps and scheduler= (use_karras_sigmas=True for Karras sigmas)",
    "ip_adapter_image_embeds": "not taken: ip_adapter_image= (an image)",
    "eta": "not taken: the scheduler's defaults are used (scheduler= a configured diffusers scheduler)",
}


class CallComponents(Protocol):
    """What `__call__` asks of the pipeline's components (loaders.XAdapterLoadersMixin
    provides it; nothing else of theirs is read here)."""

    def scheduler_component(self) -> SchedulerSpec | None:
        """The scheduler set as a component (`pipe.scheduler = ...`), or None."""
        ...

    def call_plugins(self, control_image: Any, conditioning_scale: Any, guidance_start: Any, guidance_end: Any,
                     guess_mode: bool, ip_adapter_image: Any) -> list[SD15StepPlugin]:
        """The step plugins a call's image= / ip_adapter_image= mean with the components set."""
        ...


class DiffusersCallMixin:
    """`pipe(...)` with diffusers' call arguments (the XAdapterPipeline's __call__)."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        plugins: Sequence[SD15StepPlugin] = (),
        step_callback: StepCallback | None = None,
        init_image: Any = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        scheduler: Any = None,
        use_karras_sigmas: bool | None = None,
        callback_on_step_end: Callable[..., dict[str, Any] | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        return_dict: bool = True,
        image: Any = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        guess_mode: bool = False,
        ip_adapter_image: Any = None,
        **kwargs: Any,
    ) -> Any:  # XAdapterOutput, or (images,) with return_dict=False
        """Generate, with diffusers' call arguments where diffusers has them; other keyword
        arguments are GenerationParams fields (the CLI's names: height, width,
        num_inference_steps, guidance_scale, negative_prompt, output_type ("pil", "np", "pt",
        "latent"), seed, prompt_sd15, adapter_guidance_start, ...).

        generator: a torch.Generator all noise is drawn from, as in diffusers (instead of
        `seed`), or a list of them, one per image (each image's noise from its own); latents: stage-1 start latents (B x 4 x h/8 x w/8 at the SD1.5 size, scaled
        by the scheduler's init_noise_sigma as diffusers does). prompt_embeds,
        negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds: the SDXL
        branch's (StableDiffusionXLPipeline's names and shapes); prompt_embeds_sd15,
        negative_prompt_embeds_sd15: the SD1.5 branch's. scheduler: a SCHEDULERS name or a
        diffusers scheduler object (default: `pipe.scheduler` when set), use_karras_sigmas
        where the scheduler has them. callback_on_step_end(pipe, step, timestep,
        callback_kwargs) after every step of both stages (a function, or diffusers' callback
        objects such as SDXLCFGCutoffCallback and MultiPipelineCallbacks, whose tensor_inputs
        are used): callback_kwargs holds the tensors named in callback_on_step_end_tensor_inputs
        ("latents": the latents of the branch the stage produces, SD1.5 in stage 1 and SDXL in
        stage 2; "latents_sd15": SD1.5's; "prompt_embeds", "add_text_embeds", "add_time_ids":
        SDXL's, as StableDiffusionXLPipeline; "prompt_embeds_sd15": SD1.5's) and "stage"
        ("stage1" / "stage2"); a returned dict with those keys replaces them. The callback sees
        diffusers' pipeline attributes (num_timesteps, guidance_scale / _guidance_scale,
        do_classifier_free_guidance, interrupt / _interrupt; see XAdapterPipeline).
        return_dict=False gives a tuple (images,). image / control_image with
        controlnet_conditioning_scale, control_guidance_start/end, guess_mode: the control
        image(s) of the ControlNet(s) set as `pipe.controlnet` (without one, `image=` with
        `strength=` is img2img's start image, as in diffusers' img2img pipelines, the same as
        `init_image=`); ip_adapter_image: the image
        prompt of the IP-Adapter loaded by `load_ip_adapter`.
        """
        components = cast(CallComponents, self)
        embeds = {k: kwargs.pop(k) for k in list(kwargs) if k in EMBEDS and kwargs[k] is not None}
        embeds = self._check_embeds(prompt, kwargs.get("prompt_sd15"), embeds)
        if prompt is None:
            prompt = [""] * len(next(iter(embeds.values()))) if embeds else prompt
        if isinstance(scheduler, str):
            kwargs["scheduler"] = scheduler
            scheduler = None
        spec = None
        if scheduler is None and "scheduler" not in kwargs:
            scheduler = components.scheduler_component()  # the pipeline's scheduler component, when set
        if scheduler is not None or use_karras_sigmas is not None:
            spec = scheduler_spec(scheduler if scheduler is not None else kwargs.get("scheduler", DEFAULT_SCHEDULER),
                                  use_karras_sigmas)
        if callback_on_step_end is not None:  # diffusers' callback objects name their tensors themselves
            from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

            if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
                callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if image is not None and getattr(self, "controlnet", None) is None and init_image is None and control_image is None:
            if "strength" not in kwargs:  # no ControlNet: image= is img2img's, as diffusers' img2img pipelines
                raise ParameterError("image", "an image", "a control image only when a ControlNet is set "
                                     "(pipe.controlnet); for img2img give strength= with it (or init_image=)")
            image, init_image = None, image
        unknown = sorted(set(kwargs) - set(GenerationParams.__dataclass_fields__))
        if unknown:
            raise ParameterError(unknown[0], kwargs[unknown[0]], UNSUPPORTED.get(unknown[0], "no such keyword: diffusers' "
                                 "call arguments listed in XAdapterPipeline.__call__, or GenerationParams fields"))
        params = GenerationParams(prompt=prompt, **kwargs)  # type: ignore[arg-type]
        if image is not None and control_image is not None:
            raise ParameterError("control_image", "an image", "None when image= is given (they are the same argument)")
        control = image if image is not None else control_image
        extra: list[SD15StepPlugin] = list(plugins) + components.call_plugins(
            control, controlnet_conditioning_scale, control_guidance_start, control_guidance_end, guess_mode,
            ip_adapter_image)
        out = self.generate(
            params, plugins=extra, step_callback=step_callback, init_image=init_image, generator=generator,
            latents=latents, scheduler=spec, embeds=embeds, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        return out if return_dict else (out.images,)

    def _check_embeds(self, prompt: Any, prompt_sd15: Any, embeds: dict[str, Any]) -> dict[str, torch.Tensor]:
        """ParameterError unless the given embeddings are tensors of the branches' widths with one
        row per prompt, and each branch has either text or embeddings (not both)."""
        if not embeds:
            if prompt is None:
                raise ParameterError("prompt", None, "a string or a list of strings, or prompt_embeds")
            return {}
        if prompt is not None and "prompt_embeds" in embeds:
            raise ParameterError("prompt", prompt, "None when prompt_embeds is given (give one)")
        if prompt_sd15 is not None and "prompt_embeds_sd15" in embeds:
            raise ParameterError("prompt_sd15", prompt_sd15, "None when prompt_embeds_sd15 is given (give one)")
        if prompt is None and "prompt_embeds" not in embeds:
            raise ParameterError("prompt_embeds", None, "the SDXL branch's embeddings, or a prompt")
        if prompt is None and prompt_sd15 is None and "prompt_embeds_sd15" not in embeds:
            raise ParameterError("prompt_embeds_sd15", None, "the SD1.5 branch's embeddings, or prompt_sd15 / prompt")
        for cond, pooled in (("prompt_embeds", "pooled_prompt_embeds"),
                             ("negative_prompt_embeds", "negative_pooled_prompt_embeds")):
            if (cond in embeds) != (pooled in embeds):
                raise ParameterError(pooled if cond in embeds else cond, None, f"given together with {cond if cond in embeds else pooled}")
        for name, t in [(n, embeds[n]) for n in ("negative_prompt_embeds", "negative_prompt_embeds_sd15") if n in embeds]:
            positive = name.replace("negative_", "")
            if positive not in embeds:
                raise ParameterError(name, tuple(getattr(t, "shape", ())), f"given together with {positive}")
        rows = None
        for name, t in embeds.items():
            branch, rank = EMBEDS[name]
            unet = self.sd15.unet if branch == "sd15" else self.sdxl.unet
            width = unet.config.cross_attention_dim if rank == 3 else self.sdxl.text_encoder_2.config.projection_dim
            if not isinstance(t, torch.Tensor) or t.dim() != rank or t.shape[-1] != width:
                shape = "rows x tokens x " if rank == 3 else "rows x "
                raise ParameterError(name, tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__,
                                     f"a tensor {shape}{width} (the {branch} branch's width)")
            rows = rows if rows is not None else t.shape[0]
            if t.shape[0] != rows:
                raise ParameterError(name, tuple(t.shape), f"{rows} rows, as the other embeddings")
        if isinstance(prompt, list) and len(prompt) != rows:
            raise ParameterError("prompt", prompt, f"{rows} prompts, one per row of the embeddings")
        return embeds
