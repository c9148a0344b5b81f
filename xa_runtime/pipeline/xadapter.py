"""The X-Adapter two-stage algorithm (xadapter.md, "Inference: two-stage denoising").

Stage 1: SD1.5 alone over the whole schedule. Hand-over, on tensors on the device:
SD1.5 VAE decode -> resize -> SDXL VAE encode -> noise to t0; the SD1.5 result is
re-noised to t0 too. Stage 2: k steps where SD1.5's decoder features go through the
mapping layers into SDXL's decoder, both branches at the same timestep, each with its
own fresh scheduler. Finally SDXL VAE decode.

How the steps execute (eager, compiled, CUDA graphs, two streams in stage 2, offload,
Triton kernels) is the runtime's business (xa_runtime.runtime): the branch steps are named
functions of tensors handed to a StepExecutor, stage 2's loop is a Stage2Scheduler, and
the kernels come as hooks. Construction and backend switching: construction.py; diffusers' call
arguments: call.py; LoRA, IP-Adapter, ControlNet and scheduler components: loaders.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..errors import NonFiniteError, ParameterError
from ..models.branches import Injection, ResidualInjection, SD15Branch, SDXLBranch
from ..models.mapping import fit_features
from ..plugins.base import PluginContext, SD15StepPlugin, StepInfo, check_required_plugins, merge_unet_kwargs
from ..runtime.memory import peak_memory_bytes, reset_peak_memory
from ..runtime.timing import StageTimer
from .construction import XAdapterPipelineBase, vae_factor
from ..loading.images import image_to_tensor
from .call import (CALLBACK_TENSOR_INPUTS, DiffusersCallMixin, StepCallback, StepEnd, check_latents, request_generator,
                   step_end_callback)
from .loaders import XAdapterLoadersMixin
from .params import GenerationParams, validate
from .schedulers import Sampler, SchedulerSpec, make_scheduler, stage2_schedulers
from .text import encode_prompts



@dataclass
class XAdapterOutput:
    """images: list of PIL images, N x H x W x 3 float array in [0, 1] ("np"), N x 3 x H x W
    float tensor in [0, 1] ("pt"), or SDXL latents ("latent").

    timings: seconds per stage. overheads: seconds of one-off work inside those stage
    times (torch.compile "compile", CUDA "graph_capture"; nonzero on the first request of
    a shape). peak_memory: bytes, torch.cuda.max_memory_allocated over the request (None
    off CUDA).
    """

    images: Any
    params: GenerationParams
    timings: dict[str, float] = field(default_factory=dict)
    overheads: dict[str, float] = field(default_factory=dict)
    peak_memory: int | None = None


def _randn(shape: Sequence[int], generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """fp32 noise drawn where the generator lives; a list (one per image, as diffusers'
    randn_tensor) draws each image's row from its own generator."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32)
                          for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)


@dataclass
class _Request:
    """One request as stage 1 and the hand-over see it."""

    p: GenerationParams
    generator: torch.Generator
    cfg: bool
    guidance: float | None
    emb15: torch.Tensor
    unet_kwargs: Callable[[str, int, int, torch.Tensor, torch.Tensor], dict[str, Any]]
    step_callback: StepCallback | None
    shape15: tuple[int, ...]
    shapexl: tuple[int, ...]
    sampler: str | SchedulerSpec = "dpmpp-2m"
    latents: torch.Tensor | None = None
    on_step_end: StepEnd | None = None
    embxl: torch.Tensor | None = None
    xl_cond: dict[str, torch.Tensor] = field(default_factory=dict)
    plugins: bool = False


@dataclass
class _Stage2:
    """What stage 2 starts from (one request)."""

    timesteps: torch.Tensor
    lat15: torch.Tensor
    latxl: torch.Tensor
    sampler15: Sampler
    samplerxl: Sampler
    emb15: torch.Tensor
    embxl: torch.Tensor
    xl_cond: dict[str, torch.Tensor]
    guidance: float | None
    cfg: bool
    latent_hw: tuple[int, int]
    unet_kwargs: Callable[[str, int, int, torch.Tensor, torch.Tensor], dict[str, Any]]
    step_callback: StepCallback | None
    on_step_end: StepEnd | None = None
    plugins: bool = False


class XAdapterPipeline(DiffusersCallMixin, XAdapterLoadersMixin, XAdapterPipelineBase):
    """SD1.5 plugins on SDXL through X-Adapter, in plain PyTorch (the reference backend).

    Build it with `from_pretrained(folder)` (what `save_pretrained` wrote) or
    `from_pretrained(sd15, sdxl, adapter)` from local paths, from already loaded components,
    or `from_tiny()` for the built-in tiny random models; call it with diffusers' arguments
    or the generation parameters (see GenerationParams) and get an XAdapterOutput.
    """

    @torch.no_grad()
    def generate(
        self,
        params: GenerationParams,
        plugins: Sequence[SD15StepPlugin] = (),
        step_callback: StepCallback | None = None,
        init_image: Any = None,
        *,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        scheduler: SchedulerSpec | None = None,
        embeds: dict[str, torch.Tensor] | None = None,
        callback_on_step_end: Callable[..., dict[str, Any] | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> XAdapterOutput:
        """Run one request. `plugins` act on the SD1.5 branch in both stages; `step_callback`
        is called after every step (and may raise to cancel between steps); `init_image`
        (PIL image, H x W x 3 array or B x 3 x H x W tensor in [0, 1]) makes stage 1 an
        img2img run of `params.strength` (as diffusers' img2img and the authors' tile example).
        The keyword-only arguments are __call__'s (diffusers' names); `scheduler` as a
        SchedulerSpec (schedulers.scheduler_spec), `embeds` the prompt embeddings by keyword."""
        p = validate(params, self.size_rules)
        self._begin_call(p)
        if init_image is None and p.strength != 1.0:
            raise ParameterError("strength", p.strength, "1.0 unless an init image is given")
        check_required_plugins(self.sd15.unet, plugins)
        generator = request_generator(p, generator, callback_on_step_end_tensor_inputs)
        if scheduler is not None:
            p.scheduler, p.extra = scheduler[0].__name__, {**p.extra, "scheduler_config": dict(scheduler[1])}
        reset_peak_memory(self.device)
        self._sync_branches()
        self._sync_kernel_modules()
        self.executor.begin_request((self.sd15.unet, self.sdxl.unet, self.mapping))
        timer = StageTimer(self.device)
        dev, dt = self.device, self.dtype
        cfg = p.guidance_scale > 1.0
        batch = len(p.prompts) * p.num_images_per_prompt

        with timer.stage("text_encoders"), self.residency.use(
            self.sd15.text_encoder, self.sdxl.text_encoder, self.sdxl.text_encoder_2
        ):
            emb15, embxl, xl_cond = encode_prompts(self.sd15, self.sdxl, p, cfg, embeds or {}, dev, dt)

        ctx = PluginContext(
            batch=batch, cfg=cfg, device=dev, dtype=dt, height=p.height_sd15, width=p.width_sd15,
            prompt_embeds=emb15, generator=generator,
        )
        if plugins:
            with timer.stage("plugins"):
                for plugin in plugins:
                    plugin.prepare(ctx)

        def unet_kwargs(stage: str, i: int, steps: int, t: torch.Tensor, x: torch.Tensor) -> dict[str, Any]:
            return merge_unet_kwargs([pl.unet_kwargs(ctx, StepInfo(stage, i, steps, t), x) for pl in plugins])

        on_step_end = step_end_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs)

        f15, fxl = vae_factor(self.sd15.vae), vae_factor(self.sdxl.vae)
        r = _Request(
            p=p, generator=generator, cfg=cfg, guidance=p.guidance_scale if cfg else None, emb15=emb15,
            unet_kwargs=unet_kwargs, step_callback=step_callback,
            shape15=(batch, self.sd15.unet.config.in_channels, p.height_sd15 // f15, p.width_sd15 // f15),
            shapexl=(batch, self.sdxl.unet.config.in_channels, p.height // fxl, p.width // fxl),
            sampler=scheduler if scheduler is not None else p.scheduler, latents=latents, on_step_end=on_step_end,
            embxl=embxl, xl_cond=xl_cond, plugins=bool(plugins),
        )
        check_latents(latents, r.shape15, p, init_image)
        with timer.stage("stage1"):
            lat15 = self._stage1(r, init_image)
        interrupted = self._interrupt  # set by callback_on_step_end in stage 1: no stage 2, as diffusers stops
        with timer.stage("handover"), self.residency.use(self.sd15.vae, self.sdxl.vae):
            lat15, latxl, sched15, schedxl = self._handover(r, lat15, noised=not interrupted)
        with timer.stage("stage2"):
            st = _Stage2(
                timesteps=schedxl.timesteps[-p.stage2_steps:], lat15=lat15, latxl=latxl,
                sampler15=self._sampler(sched15, generator, p.guidance_rescale),
                samplerxl=self._sampler(schedxl, generator, p.guidance_rescale),
                emb15=r.emb15, embxl=r.embxl, xl_cond=r.xl_cond, guidance=r.guidance, cfg=r.cfg,
                latent_hw=r.shapexl[-2:], unet_kwargs=unet_kwargs, step_callback=step_callback,
                on_step_end=on_step_end, plugins=bool(plugins),
            )
            if not interrupted:
                self._num_timesteps = len(st.timesteps)
                latxl = self._stage2(st, p)
            if not bool(torch.isfinite(latxl).all()):  # one device sync per request
                raise NonFiniteError(
                    f"stage 2 produced non-finite SDXL latents (NaN or inf) in {str(self.dtype).replace('torch.', '')}; "
                    "fp16 overflow is the usual cause: try dtype bf16 or fp32"
                )

        with timer.stage("vae_decode"), self.residency.use(self.sdxl.vae):
            images = self._decode(latxl, p.output_type)
        return XAdapterOutput(
            images=images, params=p, timings=dict(timer.seconds), overheads=self.executor.request_overheads(),
            peak_memory=peak_memory_bytes(self.device),
        )

    def _stage1(self, r: _Request, init_image: Any) -> torch.Tensor:
        """SD1.5 alone over the whole schedule (img2img: from the init image noised to the
        strength's timestep). Returns SD1.5's final latents."""
        p, batch = r.p, r.shape15[0]
        sched = make_scheduler(r.sampler, self.sd15.scheduler_config)
        sched.set_timesteps(p.num_inference_steps, device=self.device)
        if init_image is None:
            steps = sched.timesteps
            start = r.latents.to(self.device, self.dtype) if r.latents is not None else self._noise(r, r.shape15)
            lat = start * sched.init_noise_sigma
        else:
            start = (p.num_inference_steps - int(p.num_inference_steps * p.strength)) * sched.order
            steps = sched.timesteps[start:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(start)
            pixels = image_to_tensor(init_image, p.height_sd15, p.width_sd15, batch, "init_image")
            with self.residency.use(self.sd15.vae):
                init = self._vae_sample(self.sd15.vae, pixels.to(self.device, self.dtype) * 2 - 1, r.generator)
            lat = sched.add_noise(init.to(self.dtype), self._noise(r, r.shape15), steps[:1].repeat(batch))
        sampler = self._sampler(sched, r.generator, p.guidance_rescale)
        self._num_timesteps = len(steps)
        for i, t in enumerate(tqdm(steps, desc="stage 1 (SD1.5)", disable=not self.progress, leave=False)):
            if self._interrupt:
                break
            x = sampler.scale_model_input(self._cfg_batch(lat, r.cfg), t)
            eps, *_ = self.executor.run("sd15", self._sd15_forward, (x, t, r.emb15, r.unet_kwargs("stage1", i, len(steps), t, x)))
            lat = sampler.step(eps, t, lat, r.guidance)
            if r.step_callback:
                r.step_callback("stage1", i, len(steps))
            if r.on_step_end is not None:
                out = r.on_step_end("stage1", i, t, {"latents": lat, "latents_sd15": lat, **self._callback_tensors(r)})
                lat = out.get("latents", out.get("latents_sd15", lat))
                self._after_callback(r, out)
        return lat

    def _handover(self, r: _Request, lat15: torch.Tensor, noised: bool = True) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
        """SD1.5 VAE decode -> resize -> SDXL VAE encode -> noise to t0, and SD1.5's latents
        re-noised to t0, with fresh stage-2 schedulers: (lat15, latxl, sched15, schedxl).
        noised=False (stage 1 was interrupted): the encoded SD1.5 image as SDXL latents, no noise."""
        p, k = r.p, r.p.stage2_steps
        sched15, schedxl = stage2_schedulers(r.sampler, self.sd15.scheduler_config, self.sdxl.scheduler_config,
                                             p.num_inference_steps, k, self.device)
        t0 = schedxl.timesteps[-k:][:1].repeat(r.shape15[0])
        image = self.sd15.vae.decode(lat15 / self.sd15.vae.config.scaling_factor).sample
        image = F.interpolate(image.float(), size=(p.height, p.width), mode="bicubic", antialias=True, align_corners=False)
        init_xl = self._vae_sample(self.sdxl.vae, image.clamp(-1.0, 1.0).to(self.vae_xl_dtype), r.generator)
        if not noised:
            return lat15, init_xl.to(self.dtype), sched15, schedxl
        latxl = schedxl.add_noise(init_xl.to(self.dtype), self._noise(r, r.shapexl), t0)
        lat15 = sched15.add_noise(lat15, self._noise(r, r.shape15), t0)
        return lat15, latxl, sched15, schedxl

    def _stage2(self, st: _Stage2, p: GenerationParams) -> torch.Tensor:
        """k steps of both branches; the Stage2Scheduler decides the order on the device.
        Returns SDXL's final latents."""
        k = len(st.timesteps)  # st.cfg and st.guidance are read at each step: a callback may change them
        lat = {"sd15": st.lat15, "sdxl": st.latxl}
        bar = tqdm(total=k, desc="stage 2 (SD1.5 + SDXL)", disable=not self.progress, leave=False)

        def sd15_step(i: int, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
            x = st.sampler15.scale_model_input(self._cfg_batch(lat["sd15"], st.cfg), t)
            extra = st.unet_kwargs("stage2", i, k, t, x)
            eps, *feats = self.executor.run("sd15", self._sd15_forward, (x, t, st.emb15, extra))
            lat["sd15"] = st.sampler15.step(eps, t, lat["sd15"], st.guidance)
            return tuple(feats)

        def sdxl_step(i: int, t: torch.Tensor, feats: tuple[torch.Tensor, ...]) -> None:
            x = st.samplerxl.scale_model_input(self._cfg_batch(lat["sdxl"], st.cfg), t)
            args = (x, t, st.embxl, st.xl_cond["text_embeds"], st.xl_cond["time_ids"], tuple(feats),
                    p.adapter_condition_scale, p.fusion_guidance_scale)
            eps = self.executor.run("sdxl", self._sdxl_forward, args)
            lat["sdxl"] = st.samplerxl.step(eps, t, lat["sdxl"], st.guidance)

        def step_done(i: int) -> None:
            bar.update(1)
            if st.step_callback:
                st.step_callback("stage2", i, k)
            if st.on_step_end is not None:
                out = st.on_step_end("stage2", i, st.timesteps[i], {"latents": lat["sdxl"], "latents_sd15": lat["sd15"],
                                                                    **self._callback_tensors(st)})
                lat["sdxl"], lat["sd15"] = out.get("latents", lat["sdxl"]), out.get("latents_sd15", lat["sd15"])
                self._after_callback(st, out)

        try:
            if st.on_step_end is not None:  # the callback may replace latents: one step after the other
                for i, t in enumerate(st.timesteps):
                    if self._interrupt:
                        break
                    sdxl_step(i, t, sd15_step(i, t))
                    step_done(i)
            else:
                self.stage2_scheduler.run(st.timesteps, sd15_step, sdxl_step, step_done)
        finally:
            bar.close()
        return lat["sdxl"]

    # ------------------------------------------------------------------ diffusers' call state
    # What diffusers' pipelines expose during a call and diffusers' callbacks read or set
    # (diffusers.callbacks.SDXLCFGCutoffCallback, MultiPipelineCallbacks, ...), with their meaning
    # for the two stages.
    _guidance_scale: float = 7.5
    _interrupt: bool = False
    _num_timesteps: int = 0
    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)

    @property
    def guidance_scale(self) -> float:
        """The current call's classifier-free guidance of both branches; a callback may set
        `pipe._guidance_scale` (at most 1: CFG off for the rest of the call, the unconditional
        halves of every embedding dropped, as diffusers' CFG-cutoff callbacks do)."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """guidance_scale > 1, as in diffusers (both branches)."""
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        """Steps of the stage that is running: N in stage 1 (fewer with img2img), k =
        int(N * adapter_guidance_start) in stage 2; callbacks get the step index within the stage."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a callback to stop after that step, as diffusers: in
        stage 1 the SD1.5 result so far becomes the image (resized to the SDXL size through the
        SDXL VAE, no stage 2); in stage 2 the SDXL latents so far are decoded. Reset by every call."""
        return self._interrupt

    @property
    def cross_attention_kwargs(self) -> None:
        """Always None: LoRA scales are set with set_adapters / fuse_lora, not per call."""
        return None

    def _begin_call(self, p: GenerationParams) -> None:
        self._guidance_scale, self._interrupt, self._num_timesteps = p.guidance_scale, False, p.num_inference_steps

    @staticmethod
    def _callback_tensors(state: _Request | _Stage2) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": state.embxl, "add_text_embeds": state.xl_cond["text_embeds"],
                "add_time_ids": state.xl_cond["time_ids"], "prompt_embeds_sd15": state.emb15}

    def _after_callback(self, state: _Request | _Stage2, out: dict[str, Any]) -> None:
        """What a callback returned or set on the pipeline, into the rest of the call: the
        embeddings it replaced; the guidance it set (CFG turned off drops the unconditional rows)."""
        if "prompt_embeds" in out:
            state.embxl = out["prompt_embeds"]
        if "prompt_embeds_sd15" in out:
            state.emb15 = out["prompt_embeds_sd15"]
        for key, name in (("add_text_embeds", "text_embeds"), ("add_time_ids", "time_ids")):
            if key in out:
                state.xl_cond = {**state.xl_cond, name: out[key]}
        g = self._guidance_scale
        if not isinstance(g, (int, float)) or isinstance(g, bool):
            raise ParameterError("_guidance_scale", g, "a number (set by callback_on_step_end)")
        if g > 1 and not state.cfg:
            raise ParameterError("_guidance_scale", g, "at most 1 once classifier-free guidance is off in a call "
                                 "(its unconditional embeddings are gone)")
        if state.cfg and g <= 1:
            if state.plugins:
                raise ParameterError("_guidance_scale", g, "above 1 while SD1.5 plugins run: a callback cannot turn "
                                     "classifier-free guidance off with plugins (their inputs are batched for it)")
            batch = state.lat15.shape[0] if isinstance(state, _Stage2) else state.shape15[0]
            cond = lambda t: t[-batch:] if t.shape[0] == 2 * batch else t  # noqa: E731
            state.emb15, state.embxl = cond(state.emb15), cond(state.embxl)
            state.xl_cond = {k: cond(v) for k, v in state.xl_cond.items()}
            state.cfg = False
        state.guidance = g if state.cfg else None

    def _sync_branches(self) -> None:
        """A UNet swapped in since the last call (`pipe.sdxl.unet = torch.compile(pipe.sdxl.unet)`,
        or another module) is used: its branch is rebuilt on it. Refused where the old UNet held
        LoRAs or the IP-Adapter, which the new one lacks (unless it wraps the old one)."""
        for name, branch_cls in (("sd15", SD15Branch), ("sdxl", SDXLBranch)):
            branch, unet = getattr(self, f"{name}_branch"), getattr(self, name).unet
            if not isinstance(branch, branch_cls) or branch.unet is unet:
                continue  # another backend runs this branch, or nothing changed
            wraps = getattr(unet, "_orig_mod", None) is branch.unet
            held = self.installed_in(name)
            if held and not wraps:
                raise ParameterError(f"{name}.unet", type(unet).__name__,
                                     f"the UNet {' and '.join(held)} were loaded into, or a wrapper of it "
                                     "(torch.compile): unload them before swapping the UNet, then load them again")
            branch.remove_hooks()
            setattr(self, f"{name}_branch", branch_cls(unet))

    # ------------------------------------------------------------------ branch steps
    # Functions of tensors (and baked constants) only, so that the runtime can compile
    # them or capture them as CUDA graphs; outputs are flat tuples of tensors.
    def _sd15_forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, extra: dict[str, Any]):
        """-> (eps, f0, f1, f2)."""
        eps, feats = self.sd15_branch(x, t, emb, **extra)
        return (eps.contiguous(), *feats)

    def _sdxl_forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, text_embeds: torch.Tensor,
                      time_ids: torch.Tensor, feats: tuple[torch.Tensor, ...], acs: float, fusion: float | None):
        """Mapping + SDXL with the residuals injected -> eps."""
        injections = self._injections(fit_features(feats, x.shape[-2:]), acs, fusion)
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.sdxl_branch(x, t, emb, cond, injections=injections).contiguous()

    # ------------------------------------------------------------------ pieces
    def _noise(self, r: _Request, shape: tuple[int, ...]) -> torch.Tensor:
        # Drawn on a CPU generator: the same seed gives the same noise on any device.
        # (a generator on the GPU draws there, as diffusers' randn_tensor does)
        return _randn(shape, r.generator).to(self.device, self.dtype)

    @staticmethod
    def _cfg_batch(latents: torch.Tensor, cfg: bool) -> torch.Tensor:
        return torch.cat([latents, latents]) if cfg else latents

    def _sampler(self, scheduler: Any, generator: torch.Generator, guidance_rescale: float = 0.0) -> Sampler:
        """A prepared scheduler, stepped by the fused CFG + update kernel when the runtime hands one over."""
        return Sampler(scheduler, generator, guided_step=self.kernel_hooks.guided_step, guidance_rescale=guidance_rescale)

    def _injections(self, feats: tuple[torch.Tensor, ...], acs: float, fusion: float | None) -> list[Injection]:
        """One callable per SDXL injection site: mapping -> r -> h + acs*r (or the lerp), or
        with the runtime's remap-inject hook: the residual blocks (their conv epilogues fused
        when the kernels are on), then the hook on the stage outputs before their zero_out conv."""
        inject = self.kernel_hooks.inject
        if inject is not None:
            return [
                functools.partial(inject, x=x, conv=conv, scale=acs, fusion=fusion)
                for x, conv in zip(self.mapping.features(*feats), self.mapping.zero_out)
            ]
        return [ResidualInjection(r, acs, fusion) for r in self.mapping(*feats)]

    @staticmethod
    def _vae_sample(vae: torch.nn.Module, pixels: torch.Tensor, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Scaled latents sampled from the VAE posterior (noise from the CPU generator)."""
        posterior = vae.encode(pixels).latent_dist
        eps = _randn(posterior.mean.shape, generator).to(posterior.mean.device, posterior.mean.dtype)
        return (posterior.mean + posterior.std * eps) * vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return latents
        vae = self.sdxl.vae
        image = vae.decode(latents.to(self.vae_xl_dtype) / vae.config.scaling_factor).sample
        if not bool(torch.isfinite(image).all()):  # clamp would make NaN black: a silent wrong image
            raise NonFiniteError(
                f"the SDXL VAE decoded non-finite pixels (NaN or inf) from finite latents in "
                f"{str(self.vae_xl_dtype).replace('torch.', '')}; fp16 overflow in the SDXL VAE is the usual cause: "
                "use an fp16-fix VAE (sdxl_vae) or dtype fp32"
            )
        pixels = (image.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":  # B x 3 x H x W in [0, 1], fp32, on the device (diffusers' "pt")
            return pixels
        array = pixels.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return array
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
