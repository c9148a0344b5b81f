"""How an XAdapterPipeline is built and reconfigured: from local paths, from loaded
diffusers pipelines or the built-in tiny models; device and dtype placement; switching the
runtime (RuntimeConfig) or the backend that runs the UNets and mapping layers.

The algorithm itself is in xadapter.py; this base class gives it the models, the runtime
pieces (step executor, stage-2 scheduler, residency) and the kernel hooks the runtime hands
over (xa_runtime.runtime.kernel_hooks).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Self

import torch

from ..errors import ParameterError
from ..models.branches import SD15Branch, SDXLBranch
from ..models.components import SD15Components, SDXLComponents, quiet_casts
from ..models.mapping import MappingConfig, MappingLayers
from ..runtime.config import RuntimeConfig
from ..runtime.executor import StepExecutor, prepare_models
from ..runtime.kernel_hooks import kernel_hooks, sync_kernel_modules
from ..runtime.memory import Residency
from ..runtime.stage2 import Stage2Scheduler
from .params import SizeRules
from .schedulers import schedule_mismatch


def vae_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent along each side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def as_dtype(value: Any, name: str, auto: torch.dtype = torch.float32) -> torch.dtype:
    """A dtype as diffusers takes it: a torch.dtype, its name ("float16", "torch.float16",
    "fp16", ...) or "auto" (`auto`: the dtype the weights were saved in where that is known,
    else float32)."""
    if isinstance(value, str):
        key = value.removeprefix("torch.")
        if key == "auto":
            return auto
        value = DTYPES.get(key, value)
    if value not in (torch.float32, torch.float16, torch.bfloat16):
        raise ParameterError(name, value, 'torch.float32, torch.float16 or torch.bfloat16 (or "float32", '
                             '"float16", "bfloat16", "auto")')
    return value


class _NoSuchComponent:
    """diffusers' single-UNet component names (pipe.unet, pipe.vae, ...): this pipeline has one
    per branch, so reading or setting them says where they are instead of failing obscurely or
    being silently ignored."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def _where(self) -> str:
        return f"pipe.sd15.{self.name} or pipe.sdxl.{self.name} (one per branch; see pipe.components)"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        raise AttributeError(f"X-Adapter pipelines have no single {self.name}: use {self._where()}")

    def __set__(self, obj: Any, value: Any) -> None:
        raise ParameterError(self.name, type(value).__name__, f"set {self._where()}")


def _upcast_vae(vae: torch.nn.Module, dtype: torch.dtype) -> bool:
    # SDXL's VAE overflows in fp16 (force_upcast in its config); the fp16-fix variant does not.
    return dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


class XAdapterPipelineBase:
    """The models of an X-Adapter pipeline, placed on one device in one dtype, and how they
    execute. Build it with `from_pretrained(folder)` (a folder `save_pretrained` wrote),
    `from_pretrained(sd15, sdxl, adapter)` / `from_single_paths(...)` from local paths, from
    already loaded components, `from_diffusers(...)`, or `from_tiny()` for the built-in tiny
    random models."""

    unet, vae, text_encoder = _NoSuchComponent(), _NoSuchComponent(), _NoSuchComponent()
    text_encoder_2, tokenizer, tokenizer_2 = _NoSuchComponent(), _NoSuchComponent(), _NoSuchComponent()

    @property
    def components(self) -> dict[str, Any]:
        """diffusers' `pipe.components`, each branch's under its prefix (sd15_unet, sdxl_vae,
        ..., mapping, controlnet, scheduler): the modules themselves, shared, not copies."""
        out: dict[str, Any] = {}
        for branch in ("sd15", "sdxl"):
            parts = getattr(self, branch)
            for field_ in dataclasses.fields(parts):
                if field_.name not in ("scheduler_config", "family"):
                    out[f"{branch}_{field_.name}"] = getattr(parts, field_.name)
        out["mapping"] = self.mapping
        for name in ("controlnet", "scheduler"):
            if hasattr(type(self), name):
                out[name] = getattr(self, name)
        return out

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
        controlnet: Any = None,
    ):
        dtype = as_dtype(dtype, "dtype")
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
        self.mapping = mapping
        self._init_components(controlnet)
        self._place()
        prepare_models(runtime, self._parts())
        self._sync_kernel_modules()
        self.sd15_branch = SD15Branch(sd15.unet)
        self.sdxl_branch = SDXLBranch(sdxl.unet)

    def _init_components(self, controlnet: Any) -> None:
        """The optional, diffusers-style components (set in loaders.XAdapterLoadersMixin)."""

    def _extra_modules(self) -> list[torch.nn.Module]:
        """Modules besides the models that follow the pipeline's device and dtype (ControlNets,
        the IP-Adapter's image encoder); see loaders.XAdapterLoadersMixin."""
        return []

    def _place(self) -> None:
        """Every module on its home device in the pipeline's dtype (the SDXL VAE in fp32 where
        it overflows in fp16), and the device-bound runtime pieces built for that device."""
        dtype = self.dtype
        self.residency = Residency(self.device, self.runtime.offload_active(self.device))
        with quiet_casts():
            for module in (self.sd15.unet, self.sdxl.unet, self.mapping, *self._extra_modules()):
                module.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
            for module in (self.sd15.vae, self.sd15.text_encoder, self.sdxl.text_encoder, self.sdxl.text_encoder_2):
                module.to(device=self.residency.home(module), dtype=dtype).eval().requires_grad_(False)
            self.vae_xl_dtype = torch.float32 if _upcast_vae(self.sdxl.vae, dtype) else dtype
            self.sdxl.vae.to(device=self.residency.home(self.sdxl.vae), dtype=self.vae_xl_dtype).eval().requires_grad_(False)
        self.kernel_hooks = kernel_hooks(self.runtime, self.device)
        self.executor = StepExecutor(self.runtime, self.device)
        self.stage2_scheduler = Stage2Scheduler(self.device, self.runtime.streams)

    def to(self, *args: Any, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Self:
        """Move every component to `device` and/or cast it to `dtype`, as diffusers'
        DiffusionPipeline.to: `pipe.to("cuda")`, `pipe.to(torch.float16)`, `pipe.to("cuda",
        torch.float16)` or by keyword. The SDXL VAE stays fp32 where it overflows in fp16
        (force_upcast). Returns the pipeline itself."""
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg if dtype is None else dtype
            elif isinstance(arg, (str, torch.device)):
                device = arg if device is None else device
            else:
                raise ParameterError("to", arg, "a device (str or torch.device) and/or a torch.dtype")
        dtype = as_dtype(dtype, "dtype", self.dtype) if dtype is not None else None
        new_device = torch.device(device) if device is not None else self.device
        if new_device.type == "cuda" and new_device.index is None:
            new_device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else new_device
        self.runtime.check_device(new_device)
        if new_device == self.device and (dtype is None or dtype == self.dtype):
            return self
        self.device, self.dtype = new_device, dtype or self.dtype
        self._place()
        self._sync_kernel_modules()
        return self

    def set_progress_bar_config(self, disable: bool = False, **kwargs: Any) -> None:
        """diffusers' switch for the per-stage progress bars (only `disable` is used)."""
        self.progress = not disable

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None) -> Self:
        """diffusers' name for the runtime's offload (RuntimeConfig.offload="encoders_vaes"): the
        text encoders and VAEs wait on the CPU and move to the GPU only while they run; the UNets
        and the mapping layers stay on the GPU (they run every step). `device`/`gpu_id` name the
        GPU (default: the pipeline's device, or cuda when the pipeline is on the CPU and CUDA is
        available). Without a GPU this changes nothing, as offload does on the CPU."""
        target = torch.device(device) if device is not None else self.device
        if device is None and target.type == "cpu" and torch.cuda.is_available():
            target = torch.device("cuda")
        if target.type == "cuda" and gpu_id is not None:
            target = torch.device("cuda", gpu_id)
        if self.runtime.offload != "encoders_vaes":
            self.runtime = dataclasses.replace(self.runtime, offload="encoders_vaes")
            self._place()
        return self.to(target)

    def __getstate__(self) -> dict[str, Any]:
        """For pickle: transformers installs output-capturing forward hooks (local functions, which
        do not pickle) on a text encoder's first call; they are removed here and transformers puts
        them back on the next call (its `_output_capturing_hooks_installed` flag is cleared)."""
        for encoder in (self.sd15.text_encoder, self.sdxl.text_encoder, self.sdxl.text_encoder_2):
            for module in encoder.modules():
                for key, hook in list(module._forward_hooks.items()):
                    if "output_capturing_hook" in getattr(hook, "__qualname__", ""):
                        del module._forward_hooks[key]
                if getattr(module, "_output_capturing_hooks_installed", False):
                    module._output_capturing_hooks_installed = False
        return self.__dict__.copy()

    def enable_vae_slicing(self) -> None:
        """diffusers' VAE slicing, on both VAEs: decode/encode one image of a batch at a time."""
        for vae in (self.sd15.vae, self.sdxl.vae):
            vae.enable_slicing()

    def enable_vae_tiling(self) -> None:
        """diffusers' VAE tiling, on both VAEs: large images decoded/encoded in overlapping tiles."""
        for vae in (self.sd15.vae, self.sdxl.vae):
            vae.enable_tiling()

    def _parts(self) -> dict[str, torch.nn.Module]:
        """The modules RuntimeConfig's model-level switches change, by CHANNELS_LAST_PARTS name."""
        return {"sd15_unet": self.sd15.unet, "mapping": self.mapping, "sdxl_unet": self.sdxl.unet}

    def _sync_kernel_modules(self) -> None:
        """The models' kernel-backed module swaps in line with the runtime (called when it
        is set and at the start of every request: modules may be shared between pipelines)."""
        sync_kernel_modules(self._parts(), self.runtime, self.device)

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
        self.kernel_hooks = kernel_hooks(runtime, self.device)
        self.executor = self.executor.reconfigured(runtime)
        if runtime.streams != old.streams:
            self.stage2_scheduler = Stage2Scheduler(self.device, runtime.streams)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        sdxl: str | os.PathLike | None = None,
        adapter: str | os.PathLike | None = None,
        *,
        torch_dtype: torch.dtype | str | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        **kwargs: Any,
    ) -> Self:
        """diffusers' entry point. With one path: a local X-Adapter pipeline folder written by
        `save_pretrained` (xa_pipeline_index.json, sd15/, sdxl/, the adapter). With three paths
        (sd15, sdxl, adapter): the same as `from_single_paths`. Never a hub id. `torch_dtype`
        (diffusers' name: a torch.dtype, its name such as "float16", or "auto": the dtype the
        folder was saved in, float32 for three paths) or `dtype`; other keywords as
        `from_single_paths` (device, runtime, progress, sdxl_vae, controlnet). variant: None only
        (cast with torch_dtype instead); use_safetensors=True: the files given must be .safetensors."""
        from .saving import read_pipeline_folder, saved_dtype

        if variant is not None:
            raise ParameterError("variant", variant, "None: from_pretrained reads the weight files as they are; "
                                 "load and cast with torch_dtype=torch.float16 instead")
        allowed = {"dtype", "device", "runtime", "progress", "sdxl_vae", "controlnet", "local_files_only"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ParameterError(unknown[0], kwargs[unknown[0]],
                                 f"no such keyword of from_pretrained; it takes torch_dtype, variant, use_safetensors, "
                                 f"{', '.join(sorted(allowed))}")
        folder = sdxl is None and adapter is None
        paths = read_pipeline_folder(pretrained_model_name_or_path) if folder else None
        auto = saved_dtype(pretrained_model_name_or_path) if folder else torch.float32
        if torch_dtype is not None:
            torch_dtype = as_dtype(torch_dtype, "torch_dtype", auto)
            if kwargs.get("dtype") not in (None, torch_dtype):
                raise ParameterError("torch_dtype", torch_dtype, f"the same as dtype={kwargs['dtype']} (give one)")
            kwargs["dtype"] = torch_dtype
        kwargs.pop("local_files_only", None)  # always local
        if use_safetensors:
            given = [paths["adapter"]] if paths else [p for p in (pretrained_model_name_or_path, sdxl, adapter) if p]
            other = [str(f) for f in given if Path(f).is_file() and Path(f).suffix != ".safetensors"]
            if other:
                raise ParameterError("use_safetensors", True, f"False or None: {other[0]} is not a .safetensors file")
        if paths is not None:
            return cls.from_single_paths(paths["sd15"], paths["sdxl"], paths["adapter"], **kwargs)
        if sdxl is None or adapter is None:
            raise ParameterError("from_pretrained", [str(pretrained_model_name_or_path), sdxl, adapter],
                                 "one pipeline folder, or three paths: sd15, sdxl, adapter")
        return cls.from_single_paths(pretrained_model_name_or_path, sdxl, adapter, **kwargs)

    @classmethod
    def from_single_paths(
        cls,
        sd15: str | os.PathLike,
        sdxl: str | os.PathLike,
        adapter: str | os.PathLike,
        *,
        sdxl_vae: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        progress: bool = True,
        runtime: RuntimeConfig = RuntimeConfig(),
        controlnet: Any = None,
    ) -> Self:
        """Load SD1.5 and SDXL (diffusers folders or single .safetensors files) and the
        X-Adapter checkpoint (.bin or .safetensors) from local paths; never from a hub."""
        from ..loading import check_model_path, load_mapping, load_sd15, load_sdxl

        sd15, sdxl, adapter = str(sd15), str(sdxl), str(adapter)
        dtype = as_dtype(dtype, "dtype")
        check_model_path(sd15, "sd15", "sd15")
        check_model_path(sdxl, "sdxl", "sdxl")
        check_model_path(adapter, "adapter", "adapter")
        if sdxl_vae is not None:
            check_model_path(str(sdxl_vae), "vae", "sdxl_vae")
        sd15_c = load_sd15(sd15, dtype=dtype, device=device)
        sdxl_c = load_sdxl(sdxl, dtype=dtype, device=device, vae_path=sdxl_vae)
        config = MappingConfig.from_unet_configs(sd15_c.unet.config, sdxl_c.unet.config)
        mapping = load_mapping(adapter, config, dtype=dtype, device=device)
        return cls(sd15_c, sdxl_c, mapping, device=device, dtype=dtype, progress=progress, runtime=runtime,
                   controlnet=controlnet)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True) -> Path:
        """Write the whole pipeline as one folder that `from_pretrained(folder)` reads:
        sd15/ and sdxl/ (diffusers layouts), the mapping layers (x_adapter.safetensors) and
        xa_pipeline_index.json. Written to a temporary folder beside it, then renamed into
        place: an existing folder is replaced only when the new one is complete. The weights
        are saved as they are now (fused LoRAs included, in the pipeline's dtype)."""
        from .saving import write_pipeline_folder

        if not safe_serialization:
            raise ParameterError("safe_serialization", safe_serialization, "True (the folder holds safetensors only)")
        if self.runtime.fuse_qkv:
            raise ParameterError("runtime.fuse_qkv", True, "False: fused QKV projections change the UNets' weights "
                                 "layout; save from a pipeline built without it")
        return write_pipeline_folder(self, save_directory)

    @classmethod
    def from_diffusers(
        cls,
        sd15_pipeline: Any,
        sdxl_pipeline: Any,
        adapter: str | MappingLayers,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        progress: bool = True,
    ) -> Self:
        """From already loaded diffusers pipelines (StableDiffusionPipeline and
        StableDiffusionXLPipeline, or anything with the same attributes); `adapter` is a
        checkpoint path or a MappingLayers module. The modules are shared, not copied."""
        dtype = as_dtype(dtype, "dtype")
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
        cls, seed: int = 0, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
        progress: bool = True, runtime: RuntimeConfig = RuntimeConfig(), controlnet: Any = None,
        torch_dtype: torch.dtype | str | None = None,
    ) -> Self:
        """The built-in tiny random models (real topology, noise-like images): a smoke run.
        `torch_dtype` (diffusers' name) or `dtype`: a torch.dtype or its name; "auto" is float32."""
        if torch_dtype is not None:
            dtype = as_dtype(torch_dtype, "torch_dtype")
        from ..models.tiny import build_tiny_models

        sd15, sdxl, mapping = build_tiny_models(seed)
        return cls(sd15, sdxl, mapping, device=device, dtype=dtype, progress=progress, runtime=runtime,
                   controlnet=controlnet)

    def with_backend(self, backend: Any) -> Self:
        """A copy of this pipeline whose SD1.5 UNet, mapping layers and SDXL UNet run on
        `backend`: an object with `sd15_branch`, `sdxl_branch` and `mapping` callable like
        SD15Branch, SDXLBranch and MappingLayers (e.g. runtime.backends.onnxruntime's
        OnnxRuntimeBackend). Text encoders, VAEs, schedulers and plugins stay in PyTorch;
        the fused kernels are off (they act inside the torch SDXL UNet). This pipeline is
        left as it was; the modules are shared."""
        pipe = copy.copy(self)
        pipe.sd15_branch, pipe.sdxl_branch, pipe.mapping = backend.sd15_branch, backend.sdxl_branch, backend.mapping
        attach = getattr(pipe.sd15_branch, "attach_torch_unet", None)
        if attach is not None:  # the IP-Adapter's image projection and scales stay on the torch SD1.5 UNet
            pipe.sd15_branch = attach(self.sd15.unet)
        pipe.runtime = dataclasses.replace(self.runtime, triton_kernels=False)
        pipe.kernel_hooks = kernel_hooks(pipe.runtime, pipe.device)
        return pipe

    @property
    def size_rules(self) -> SizeRules:
        f15, fxl = vae_factor(self.sd15.vae), vae_factor(self.sdxl.vae)
        n15 = len(self.sd15.unet.config.block_out_channels) - 1
        nxl = len(self.sdxl.unet.config.block_out_channels) - 1
        return SizeRules(
            sd15_multiple=f15 * 2**n15,
            sdxl_multiple=fxl * 2**nxl,
            sd15_default=self.sd15.unet.config.sample_size * f15,
            sdxl_default=self.sdxl.unet.config.sample_size * fxl,
        )
