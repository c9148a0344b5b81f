"""The X-Adapter two-stage algorithm (xadapter.md, "Inference: two-stage denoising").

Stage 1: SD1.5 alone over the whole schedule. Hand-over, on tensors on the device:
SD1.5 VAE decode -> resize -> SDXL VAE encode -> noise to t0; the SD1.5 result is
re-noised to t0 too. Stage 2: k steps where SD1.5's decoder features go through the
mapping layers into SDXL's decoder, both branches at the same timestep, each with its
own fresh scheduler. Finally SDXL VAE decode.

How the steps execute (eager, compiled, CUDA graphs, two streams in stage 2, offload)
is the runtime's business (xa_runtime.runtime): the branch steps are named functions of
tensors handed to a StepExecutor, and stage 2's loop is a Stage2Scheduler.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..models.branches import Injection, ResidualInjection, SD15Branch, SDXLBranch
from ..models.components import SD15Components, SDXLComponents
from ..models.mapping import MappingConfig, MappingLayers
from ..plugins.base import PluginContext, SD15StepPlugin, StepInfo, merge_unet_kwargs
from ..plugins.ip_adapter import IPAdapterPlugin
from ..runtime.config import RuntimeConfig
from ..runtime.executor import StepExecutor, prepare_models
from ..runtime.memory import Residency, peak_memory_bytes, reset_peak_memory
from ..runtime.stage2 import Stage2Scheduler
from ..runtime.timing import StageTimer
from ..errors import NonFiniteError, ParameterError
from .images import image_to_tensor
from .params import GenerationParams, SizeRules, validate
from .schedulers import Sampler, make_scheduler, schedule_mismatch
from .text import encode_sd15, encode_sdxl, sdxl_time_ids

StepCallback = Callable[[str, int, int], None]  # (stage name, step index, steps in stage)


@dataclass
class XAdapterOutput:
    """images: list of PIL images, N x H x W x 3 float array in [0, 1], or SDXL latents.

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


def _vae_factor(vae: torch.nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _upcast_vae(vae: torch.nn.Module, dtype: torch.dtype) -> bool:
    # SDXL's VAE overflows in fp16 (force_upcast in its config); the fp16-fix variant does not.
    return dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


def _fused(hidden: torch.Tensor, *, x: torch.Tensor, conv: torch.nn.Conv2d, scale: float, fusion: float | None):
    from ..kernels import remap_inject

    return remap_inject(x, conv.weight, conv.bias, hidden, scale, fusion)


class XAdapterPipeline:
    """SD1.5 plugins on SDXL through X-Adapter, in plain PyTorch (the reference backend).

    Build it with `from_pretrained(sd15, sdxl, adapter)` from local paths, from already
    loaded components, or `from_tiny()` for the built-in tiny random models; call it with
    the generation parameters (see GenerationParams) and get an XAdapterOutput.
    """

    def __init__(
        self,
        sd15: SD15Components,
        sdxl: SDXLComponents,
        mapping: MappingLayers,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        progress: bool = True,
        runtime: RuntimeConfig = RuntimeConfig(),
    ):
        self.device, self.dtype, self.progress, self.runtime = torch.device(device), dtype, progress, runtime
        runtime.check_device(self.device)
        self.sd15, self.sdxl = sd15, sdxl
        mismatch = schedule_mismatch(sd15.scheduler_config, sdxl.scheduler_config)
        if mismatch:
            raise ValueError(
                f"SD1.5 and SDXL scheduler configs differ on {mismatch}; X-Adapter runs both branches on one "
                "noise schedule in stage 2"
            )
        expected = MappingConfig.from_unet_configs(sd15.unet.config, sdxl.unet.config)
        if mapping.config != expected:
            raise ValueError(f"mapping layers are built for {mapping.config}, but these UNets need {expected}")
        self.residency = Residency(self.device, runtime.offload_active(self.device))
        for module in (sd15.unet, sdxl.unet, mapping):
            module.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        for module in (sd15.vae, sd15.text_encoder, sdxl.text_encoder, sdxl.text_encoder_2):
            module.to(device=self.residency.home(module), dtype=dtype).eval().requires_grad_(False)
        self.vae_xl_dtype = torch.float32 if _upcast_vae(sdxl.vae, dtype) else dtype
        sdxl.vae.to(device=self.residency.home(sdxl.vae), dtype=self.vae_xl_dtype).eval().requires_grad_(False)
        self.mapping = mapping
        prepare_models(runtime, self._parts())
        self._sync_kernel_modules()
        self.sd15_branch = SD15Branch(sd15.unet)
        self.sdxl_branch = SDXLBranch(sdxl.unet)
        self.executor = StepExecutor(runtime, self.device)
        self.stage2_scheduler = Stage2Scheduler(self.device, runtime.streams)

    def _parts(self) -> dict[str, torch.nn.Module]:
        """The modules RuntimeConfig's model-level switches change, by CHANNELS_LAST_PARTS name."""
        return {"sd15_unet": self.sd15.unet, "mapping": self.mapping, "sdxl_unet": self.sdxl.unet}

    def _sync_kernel_modules(self) -> None:
        """The UNets' kernel-backed module swaps in line with the runtime (called when it
        is set and at the start of every request: modules may be shared between pipelines).
        Channels-last UNets keep their layout through GroupNorm and the transformer blocks;
        with the kernels active, GroupNorm (channels-last) and GEGLU run Triton kernels."""
        from ..kernels.modules import sync_kernel_modules

        parts, on = self._parts(), self.runtime.traced_kernels_active(self.device)
        for name in ("sd15_unet", "sdxl_unet"):
            sync_kernel_modules(parts[name], name in self.runtime.channels_last_parts(), on)

    def set_runtime(self, runtime: RuntimeConfig) -> None:
        """Switch how this pipeline executes without rebuilding it. Compiled steps are kept
        when the compile settings are unchanged (so a benchmark adding graphs or streams on
        top of compile does not compile again); captured graphs are dropped. channels_last
        (per part) and fuse_qkv can only be turned on (they changed the models); offload
        cannot change."""
        runtime.check_device(self.device)
        old = self.runtime
        if runtime.offload != old.offload:
            raise ParameterError("offload", runtime.offload, f"{old.offload!r} (fixed when the pipeline was built)")
        if old.fuse_qkv and not runtime.fuse_qkv:
            raise ParameterError("fuse_qkv", False, "True: it changed the models when it was turned on; build a new pipeline")
        dropped = set(old.channels_last_parts()) - set(runtime.channels_last_parts())
        if dropped:
            raise ParameterError("channels_last", runtime.channels_last,
                                 f"parts including {', '.join(sorted(dropped))}: they changed when it was turned on; "
                                 "build a new pipeline")
        added = RuntimeConfig(channels_last=tuple(set(runtime.channels_last_parts()) - set(old.channels_last_parts())),
                              fuse_qkv=runtime.fuse_qkv and not old.fuse_qkv)
        prepare_models(added, self._parts())
        self.runtime = runtime
        self._sync_kernel_modules()
        self.executor = self.executor.reconfigured(runtime)
        if runtime.streams != old.streams:
            self.stage2_scheduler = Stage2Scheduler(self.device, runtime.streams)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        sd15: str,
        sdxl: str,
        adapter: str,
        *,
        sdxl_vae: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        progress: bool = True,
        runtime: RuntimeConfig = RuntimeConfig(),
    ) -> "XAdapterPipeline":
        """Load SD1.5 and SDXL (diffusers folders or single .safetensors files) and the
        X-Adapter checkpoint (.bin or .safetensors) from local paths; never from a hub."""
        from ..loading import check_model_path, load_mapping, load_sd15, load_sdxl

        check_model_path(sd15, "sd15", "sd15")
        check_model_path(sdxl, "sdxl", "sdxl")
        check_model_path(adapter, "adapter", "adapter")
        if sdxl_vae is not None:
            check_model_path(sdxl_vae, "vae", "sdxl_vae")
        sd15_c = load_sd15(sd15, dtype=dtype, device=device)
        sdxl_c = load_sdxl(sdxl, dtype=dtype, device=device, vae_path=sdxl_vae)
        config = MappingConfig.from_unet_configs(sd15_c.unet.config, sdxl_c.unet.config)
        mapping = load_mapping(adapter, config, dtype=dtype, device=device)
        return cls(sd15_c, sdxl_c, mapping, device=device, dtype=dtype, progress=progress, runtime=runtime)

    @classmethod
    def from_diffusers(
        cls,
        sd15_pipeline: Any,
        sdxl_pipeline: Any,
        adapter: str | MappingLayers,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        progress: bool = True,
    ) -> "XAdapterPipeline":
        """From already loaded diffusers pipelines (StableDiffusionPipeline and
        StableDiffusionXLPipeline, or anything with the same attributes); `adapter` is a
        checkpoint path or a MappingLayers module. The modules are shared, not copied."""
        sd15 = SD15Components(
            unet=sd15_pipeline.unet, vae=sd15_pipeline.vae, text_encoder=sd15_pipeline.text_encoder,
            tokenizer=sd15_pipeline.tokenizer, scheduler_config=dict(sd15_pipeline.scheduler.config),
        )
        sdxl = SDXLComponents(
            unet=sdxl_pipeline.unet, vae=sdxl_pipeline.vae, text_encoder=sdxl_pipeline.text_encoder,
            text_encoder_2=sdxl_pipeline.text_encoder_2, tokenizer=sdxl_pipeline.tokenizer,
            tokenizer_2=sdxl_pipeline.tokenizer_2, scheduler_config=dict(sdxl_pipeline.scheduler.config),
        )
        if isinstance(adapter, MappingLayers):
            mapping = adapter
        else:
            from ..loading import load_mapping

            config = MappingConfig.from_unet_configs(sd15.unet.config, sdxl.unet.config)
            mapping = load_mapping(adapter, config, dtype=dtype, device=device)
        return cls(sd15, sdxl, mapping, device=device, dtype=dtype, progress=progress)

    @classmethod
    def from_tiny(
        cls, seed: int = 0, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True,
        runtime: RuntimeConfig = RuntimeConfig(),
    ) -> "XAdapterPipeline":
        """The built-in tiny random models (real topology, noise-like images): a smoke run."""
        from ..models.tiny import build_tiny_models

        sd15, sdxl, mapping = build_tiny_models(seed)
        return cls(sd15, sdxl, mapping, device=device, dtype=dtype, progress=progress, runtime=runtime)

    def with_backend(self, backend: Any) -> "XAdapterPipeline":
        """A copy of this pipeline whose SD1.5 UNet, mapping layers and SDXL UNet run on
        `backend`: an object with `sd15_branch`, `sdxl_branch` and `mapping` callable like
        SD15Branch, SDXLBranch and MappingLayers (e.g. runtime.onnxruntime_backend's
        OnnxRuntimeBackend). Text encoders, VAEs, schedulers and plugins stay in PyTorch;
        the fused kernels are off (they act inside the torch SDXL UNet). This pipeline is
        left as it was; the modules are shared."""
        pipe = copy.copy(self)
        pipe.sd15_branch, pipe.sdxl_branch, pipe.mapping = backend.sd15_branch, backend.sdxl_branch, backend.mapping
        attach = getattr(pipe.sd15_branch, "attach_torch_unet", None)
        if attach is not None:  # the IP-Adapter's image projection and scales stay on the torch SD1.5 UNet
            pipe.sd15_branch = attach(self.sd15.unet)
        pipe.runtime = dataclasses.replace(self.runtime, triton_kernels=False)
        return pipe

    @property
    def size_rules(self) -> SizeRules:
        f15, fxl = _vae_factor(self.sd15.vae), _vae_factor(self.sdxl.vae)
        n15 = len(self.sd15.unet.config.block_out_channels) - 1
        nxl = len(self.sdxl.unet.config.block_out_channels) - 1
        return SizeRules(
            sd15_multiple=f15 * 2**n15,
            sdxl_multiple=fxl * 2**nxl,
            sd15_default=self.sd15.unet.config.sample_size * f15,
            sdxl_default=self.sdxl.unet.config.sample_size * fxl,
        )

    # ------------------------------------------------------------------ generation
    def __call__(
        self,
        prompt: str | list[str],
        *,
        plugins: Sequence[SD15StepPlugin] = (),
        step_callback: StepCallback | None = None,
        init_image: Any = None,
        **kwargs: Any,
    ) -> XAdapterOutput:
        """Generate; keyword arguments are GenerationParams fields (the CLI's names)."""
        params = GenerationParams(prompt=prompt, **kwargs)
        return self.generate(params, plugins=plugins, step_callback=step_callback, init_image=init_image)

    @torch.no_grad()
    def generate(
        self,
        params: GenerationParams,
        plugins: Sequence[SD15StepPlugin] = (),
        step_callback: StepCallback | None = None,
        init_image: Any = None,
    ) -> XAdapterOutput:
        """Run one request. `plugins` act on the SD1.5 branch in both stages; `step_callback`
        is called after every step (and may raise to cancel between steps); `init_image`
        (PIL image, H x W x 3 array or B x 3 x H x W tensor in [0, 1]) makes stage 1 an
        img2img run of `params.strength` (as diffusers' img2img and the authors' tile example)."""
        p = validate(params, self.size_rules)
        if init_image is None and p.strength != 1.0:
            raise ParameterError("strength", p.strength, "1.0 unless an init image is given")
        if getattr(self.sd15.unet.config, "encoder_hid_dim_type", None) == "ip_image_proj" and not any(
            isinstance(pl, IPAdapterPlugin) for pl in plugins
        ):
            raise ParameterError(
                "plugins", [getattr(pl, "name", type(pl).__name__) for pl in plugins],
                "an IPAdapterPlugin (an IP-Adapter is installed on the SD1.5 UNet: give an image, or unload it)",
            )
        if p.seed is None:
            p.seed = random.SystemRandom().randrange(2**63)
        generator = torch.Generator("cpu").manual_seed(p.seed)
        reset_peak_memory(self.device)
        self._sync_kernel_modules()
        self.executor.begin_request((self.sd15.unet, self.sdxl.unet, self.mapping))
        timer = StageTimer(self.device)
        dev, dt = self.device, self.dtype
        cfg = p.guidance_scale > 1.0
        guidance = p.guidance_scale if cfg else None
        prompts = p.prompts
        n_prompts, repeat = len(prompts), p.num_images_per_prompt
        batch = n_prompts * repeat

        def per_prompt(value: str | list[str] | None, default: list[str] | None) -> list[str] | None:
            if value is None:
                return default
            return [value] * n_prompts if isinstance(value, str) else list(value)

        prompts15 = per_prompt(p.prompt_sd15, prompts)
        negatives = per_prompt(p.negative_prompt, None)
        assert prompts15 is not None

        def noise(shape: tuple[int, ...]) -> torch.Tensor:
            # Drawn on a CPU generator: the same seed gives the same noise on any device.
            return torch.randn(shape, generator=generator, dtype=torch.float32).to(dev, dt)

        with timer.stage("text_encoders"), self.residency.use(
            self.sd15.text_encoder, self.sdxl.text_encoder, self.sdxl.text_encoder_2
        ):
            emb15 = encode_sd15(self.sd15, prompts15, negatives or [""] * n_prompts, repeat, cfg, dev).to(dt)
            embxl, pooled = encode_sdxl(self.sdxl, prompts, negatives, repeat, cfg, dev)
            rows = embxl.shape[0]
            xl_cond = {"text_embeds": pooled.to(dt), "time_ids": sdxl_time_ids(p.height, p.width, rows, dt, dev)}
            embxl = embxl.to(dt)

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

        def sd15(stage: str, i: int, steps: int, t: torch.Tensor, x: torch.Tensor):
            eps, *feats = self.executor.run("sd15", self._sd15_forward, (x, t, emb15, unet_kwargs(stage, i, steps, t, x)))
            return eps, tuple(feats)

        f15, fxl = _vae_factor(self.sd15.vae), _vae_factor(self.sdxl.vae)
        shape15 = (batch, self.sd15.unet.config.in_channels, p.height_sd15 // f15, p.width_sd15 // f15)
        shapexl = (batch, self.sdxl.unet.config.in_channels, p.height // fxl, p.width // fxl)

        with timer.stage("stage1"):
            sched1 = make_scheduler(p.scheduler, self.sd15.scheduler_config)
            sched1.set_timesteps(p.num_inference_steps, device=dev)
            if init_image is None:
                steps1 = sched1.timesteps
                lat15 = noise(shape15) * sched1.init_noise_sigma
            else:  # img2img: start from the init image noised to the strength's timestep
                n1 = int(p.num_inference_steps * p.strength)
                start = (p.num_inference_steps - n1) * sched1.order
                steps1 = sched1.timesteps[start:]
                if hasattr(sched1, "set_begin_index"):
                    sched1.set_begin_index(start)
                pixels = image_to_tensor(init_image, p.height_sd15, p.width_sd15, batch, "init_image").to(dev, dt) * 2 - 1
                with self.residency.use(self.sd15.vae):
                    init15 = self._vae_sample(self.sd15.vae, pixels, generator).to(dt)
                lat15 = sched1.add_noise(init15, noise(shape15), steps1[:1].repeat(batch))
            sampler1 = self._sampler(sched1, generator)
            for i, t in enumerate(self._bar(steps1, "stage 1 (SD1.5)")):
                eps, _ = sd15("stage1", i, len(steps1), t, sampler1.scale_model_input(self._cfg_batch(lat15, cfg), t))
                lat15 = sampler1.step(eps, t, lat15, guidance)
                if step_callback:
                    step_callback("stage1", i, len(steps1))

        k = p.stage2_steps
        with timer.stage("handover"), self.residency.use(self.sd15.vae, self.sdxl.vae):
            sched15, schedxl = self._stage2_schedulers(p.scheduler, p.num_inference_steps, k)
            t0 = schedxl.timesteps[-k:][:1].repeat(batch)
            image = self.sd15.vae.decode(lat15 / self.sd15.vae.config.scaling_factor).sample
            image = F.interpolate(image.float(), size=(p.height, p.width), mode="bicubic", antialias=True, align_corners=False)
            image = image.clamp(-1.0, 1.0).to(self.vae_xl_dtype)
            init_xl = self._vae_sample(self.sdxl.vae, image, generator)
            latxl = schedxl.add_noise(init_xl.to(dt), noise(shapexl), t0)
            lat15 = sched15.add_noise(lat15, noise(shape15), t0)

        with timer.stage("stage2"):
            st = _Stage2(
                timesteps=schedxl.timesteps[-k:], lat15=lat15, latxl=latxl,
                sampler15=self._sampler(sched15, generator), samplerxl=self._sampler(schedxl, generator),
                emb15=emb15, embxl=embxl, xl_cond=xl_cond, guidance=guidance, cfg=cfg, latent_hw=shapexl[-2:],
                unet_kwargs=unet_kwargs, step_callback=step_callback,
            )
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

    def _stage2(self, st: _Stage2, p: GenerationParams) -> torch.Tensor:
        """k steps of both branches; the Stage2Scheduler decides the order on the device.
        Returns SDXL's final latents."""
        k, cfg, guidance = len(st.timesteps), st.cfg, st.guidance
        lat = {"sd15": st.lat15, "sdxl": st.latxl}
        bar = tqdm(total=k, desc="stage 2 (SD1.5 + SDXL)", disable=not self.progress, leave=False)

        def sd15_step(i: int, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
            x = st.sampler15.scale_model_input(self._cfg_batch(lat["sd15"], cfg), t)
            extra = st.unet_kwargs("stage2", i, k, t, x)
            eps, *feats = self.executor.run("sd15", self._sd15_forward, (x, t, st.emb15, extra))
            lat["sd15"] = st.sampler15.step(eps, t, lat["sd15"], guidance)
            return tuple(feats)

        def sdxl_step(i: int, t: torch.Tensor, feats: tuple[torch.Tensor, ...]) -> None:
            x = st.samplerxl.scale_model_input(self._cfg_batch(lat["sdxl"], cfg), t)
            args = (x, t, st.embxl, st.xl_cond["text_embeds"], st.xl_cond["time_ids"], tuple(feats),
                    p.adapter_condition_scale, p.fusion_guidance_scale)
            eps = self.executor.run("sdxl", self._sdxl_forward, args)
            lat["sdxl"] = st.samplerxl.step(eps, t, lat["sdxl"], guidance)

        def step_done(i: int) -> None:
            bar.update(1)
            if st.step_callback:
                st.step_callback("stage2", i, k)

        try:
            self.stage2_scheduler.run(st.timesteps, sd15_step, sdxl_step, step_done)
        finally:
            bar.close()
        return lat["sdxl"]

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
        injections = self._injections(self._fit_features(feats, x.shape[-2:]), acs, fusion)
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.sdxl_branch(x, t, emb, cond, injections=injections).contiguous()

    # ------------------------------------------------------------------ pieces
    def _bar(self, timesteps: torch.Tensor, desc: str):
        return tqdm(timesteps, desc=desc, disable=not self.progress, leave=False)

    @staticmethod
    def _cfg_batch(latents: torch.Tensor, cfg: bool) -> torch.Tensor:
        return torch.cat([latents, latents]) if cfg else latents

    def _sampler(self, scheduler: Any, generator: torch.Generator) -> Sampler:
        """A prepared scheduler, stepped by the fused CFG + update kernel when it is on."""
        fused = self.runtime.kernels_active(self.device)
        return Sampler(scheduler, generator, fused=fused, use_triton=fused)

    def _stage2_schedulers(self, name: str, steps: int, k: int) -> tuple[Any, Any]:
        """Fresh stage-2 schedulers for SD1.5 and SDXL on SDXL's schedule, starting at index N - k.

        Both come from SDXL's scheduler config (same timesteps by construction); SD1.5's
        keeps its own prediction type.
        """
        cfg15 = {"prediction_type": self.sd15.scheduler_config.get("prediction_type", "epsilon")}
        out = []
        for overrides in (cfg15, {}):
            s = make_scheduler(name, self.sdxl.scheduler_config, **overrides)
            s.set_timesteps(steps, device=self.device)
            if hasattr(s, "set_begin_index"):
                s.set_begin_index((steps - k) * s.order)
            out.append(s)
        return out[0], out[1]

    def _injections(self, feats: tuple[torch.Tensor, ...], acs: float, fusion: float | None) -> list[Injection]:
        """One callable per SDXL injection site: mapping -> r -> h + acs*r (or the lerp), or
        with the kernels: the residual blocks with fused conv epilogues, then the fused
        Triton remap-inject on the stage outputs before their zero_out conv."""
        if self.runtime.traced_kernels_active(self.device):
            pre = self.mapping.features(*feats, fused_epilogues=True)
            return [
                functools.partial(_fused, x=x, conv=conv, scale=acs, fusion=fusion)
                for x, conv in zip(pre, self.mapping.zero_out)
            ]
        return [ResidualInjection(r, acs, fusion) for r in self.mapping(*feats)]

    @staticmethod
    def _vae_sample(vae: torch.nn.Module, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents sampled from the VAE posterior (noise from the CPU generator)."""
        posterior = vae.encode(pixels).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean.device, posterior.mean.dtype)
        return (posterior.mean + posterior.std * eps) * vae.config.scaling_factor

    @staticmethod
    def _fit_features(feats: tuple[torch.Tensor, ...], latent_hw: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """Resize f0 to 1/4 and f1, f2 to 1/2 of SDXL's latent grid when SD1.5 is not exactly
        half the SDXL size (bilinear); a no-op at the released 2x ratio."""
        h, w = latent_hw
        targets = ((h // 4, w // 4), (h // 2, w // 2), (h // 2, w // 2))
        return tuple(
            f if tuple(f.shape[-2:]) == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            for f, size in zip(feats, targets)
        )

    def _decode(self, latents: torch.Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return latents
        vae = self.sdxl.vae
        image = vae.decode(latents.to(self.vae_xl_dtype) / vae.config.scaling_factor).sample
        array = (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return array
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
