"""diffusers' loader methods on the X-Adapter pipeline: LoRA (`load_lora_weights`,
`set_adapters`, `fuse_lora`, ...), IP-Adapter (`load_ip_adapter`, `set_ip_adapter_scale`),
ControlNet as a component (`controlnet=`) and the scheduler as a component (`scheduler`).

They are thin: LoRAs go to one plugins.LoraManager per branch (made on first use, here
only), the IP-Adapter and ControlNets become the same step plugins that
`generate(params, plugins=...)` takes, so both ways give the same results bit for bit.
`load_plugins(specs)` is the one way every entry point (xa-generate, xa-serve, the Python
API) loads plugin_kinds.PluginSpec values: LoRA kinds through `load_lora_weights` (then
`fuse_lora` when a spec says fused), the others by their table row's loader, so
`get_active_adapters()` sees every LoRA whichever door it came through.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch

from ..errors import ParameterError
from ..plugin_kinds import PluginSpec
from ..plugins.controlnet import ControlNetPlugin, check_controlnet_fits
from ..plugins.lora import LoraManager, LoraWeights, load_lora, parse_lora
from .schedulers import SchedulerSpec, make_scheduler, scheduler_spec

BRANCHES = ("sd15", "sdxl")


class XAdapterLoadersMixin:
    """The diffusers-named component and loader methods (see the module doc)."""

    # ------------------------------------------------------------------ components
    def _init_components(self, controlnet: Any) -> None:
        self._lora: dict[str, LoraManager] = {}
        self._lora_loaded: dict[str, dict[str, LoraWeights]] = {b: {} for b in BRANCHES}
        self._lora_fuse_scale: float | None = None
        self._lora_disabled: dict[str, float] = {}  # disable_lora(): name -> weight, for enable_lora()
        self._ip_adapter: Any = None
        self._ip_encoder: Any = None
        self._ip_scale: float | dict = 1.0
        self._scheduler_spec: SchedulerSpec | None = None
        self._controlnets: list[Any] = []
        self.controlnet = controlnet

    def _extra_modules(self) -> list[torch.nn.Module]:
        encoder = getattr(self._ip_encoder, "model", self._ip_encoder)
        return [*self._controlnets, *([encoder] if isinstance(encoder, torch.nn.Module) else [])]

    @property
    def controlnet(self) -> Any:
        """The SD1.5 ControlNet(s) used when a call gives `image=` / `control_image=`: None, a
        diffusers ControlNetModel, or a list of them (as diffusers' MultiControlNet)."""
        if not self._controlnets:
            return None
        return self._controlnets[0] if len(self._controlnets) == 1 else list(self._controlnets)

    @controlnet.setter
    def controlnet(self, value: Any) -> None:
        models = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
        for i, model in enumerate(models):
            if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
                raise ParameterError("controlnet", type(model).__name__, "a diffusers ControlNetModel or a list of them")
            check_controlnet_fits(model, self.sd15.unet, f"controlnet[{i}]")
            model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self._controlnets = models

    @property
    def scheduler(self) -> Any:
        """The sampler used when a call names none, as a diffusers scheduler on SDXL's config
        (the default: SCHEDULERS[DEFAULT_SCHEDULER]). Set it as in diffusers:
        `pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)`; its class
        and sampler settings are used, the noise schedule stays the models'."""
        from .params import DEFAULT_SCHEDULER

        return make_scheduler(self._scheduler_spec or DEFAULT_SCHEDULER, self.sdxl.scheduler_config)

    @scheduler.setter
    def scheduler(self, value: Any) -> None:
        self._scheduler_spec = None if value is None else scheduler_spec(value)

    def scheduler_component(self) -> SchedulerSpec | None:
        """The scheduler set as a component (`pipe.scheduler = ...`), or None (call.CallComponents)."""
        return self._scheduler_spec

    def call_plugins(self, control_image: Any, conditioning_scale: Any, guidance_start: Any, guidance_end: Any,
                     guess_mode: bool, ip_adapter_image: Any) -> list[Any]:
        """The step plugins of a call's image= (one per ControlNet set) and ip_adapter_image= (the
        loaded IP-Adapter) (call.CallComponents)."""
        plugins: list[Any] = []
        if control_image is not None or self._controlnets:
            if control_image is None:
                raise ParameterError("image", None, "a control image: a ControlNet is set (pipe.controlnet)")
            plugins += self._control_plugins(control_image, conditioning_scale, guidance_start, guidance_end,
                                             guess_mode)
        if ip_adapter_image is not None:
            plugins.append(self._ip_plugin(ip_adapter_image))
        return plugins

    def _control_plugins(self, image: Any, scale: float | Sequence[float], start: float | Sequence[float],
                         end: float | Sequence[float], guess_mode: bool) -> list[ControlNetPlugin]:
        """One ControlNetPlugin per ControlNet for a call's `image=` (one image, or one per ControlNet)."""
        nets = self._controlnets
        if not nets:
            raise ParameterError("image", "an image", "no image unless a ControlNet is set (controlnet=)")

        def per_net(name: str, value: Any) -> list[Any]:
            if isinstance(value, (list, tuple)):
                if len(value) != len(nets):
                    raise ParameterError(name, list(value), f"one value, or a list of {len(nets)} (one per ControlNet)")
                return list(value)
            return [value] * len(nets)

        images = per_net("image", image) if len(nets) > 1 else [image]
        return [ControlNetPlugin(net, img, conditioning_scale=s, guidance_start=a, guidance_end=b, guess_mode=guess_mode)
                for net, img, s, a, b in zip(nets, images, per_net("controlnet_conditioning_scale", scale),
                                             per_net("control_guidance_start", start),
                                             per_net("control_guidance_end", end))]

    # ------------------------------------------------------------------ LoRA
    def _branch(self, branch: str) -> str:
        if branch not in BRANCHES:
            raise ParameterError("branch", branch, f"one of {', '.join(BRANCHES)}")
        return branch

    def _lora_manager(self, branch: str) -> LoraManager:
        if branch not in self._lora:
            components = self.sd15 if branch == "sd15" else self.sdxl
            self._lora[branch] = LoraManager.for_branch(components, mode="unfused")
        return self._lora[branch]

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping[str, torch.Tensor] | LoraWeights,
        adapter_name: str | None = None,
        *,
        branch: str | None = None,
        adapter_weight: float = 1.0,
    ) -> None:
        """Load a LoRA file (or state dict) onto one branch and activate it at weight
        `adapter_weight` (1.0), as diffusers does. `branch`: "sd15" or "sdxl"; by default the
        base the file is recognised as, else "sd15" (SD1.5 LoRAs are X-Adapter's point).
        `adapter_name` defaults to "default_<n>". Loaded LoRAs run unfused (a side path per
        layer, weights unchanged) until `fuse_lora()`."""
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, LoraWeights):  # already read (and checked), e.g. by xa-generate's checks
            lora = source
        elif isinstance(source, Mapping):
            lora = parse_lora(dict(source))
        else:
            if not os.path.isfile(source):
                raise ParameterError("pretrained_model_name_or_path_or_dict", str(source),
                                     "a local LoRA file (.safetensors, .bin, .pt, .ckpt) or a state dict")
            lora = load_lora(source)
        branch = self._branch(branch or (lora.base if lora.base in BRANCHES else "sd15"))
        names = {n for loaded in self._lora_loaded.values() for n in loaded}
        if adapter_name is None:
            adapter_name = next(f"default_{i}" for i in range(len(names) + 1) if f"default_{i}" not in names)
        elif adapter_name in names:
            raise ParameterError("adapter_name", adapter_name, f"a name not in use ({sorted(names)}); "
                                 "unload_lora_weights() or delete_adapters() first")
        self._lora_manager(branch).add(adapter_name, lora, adapter_weight)
        self._lora_loaded[branch][adapter_name] = lora

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Make exactly `adapter_names` active (on whichever branch each was loaded), each at its
        weight (default 1.0); the other loaded LoRAs stay loaded but inactive, as diffusers."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float)):
            weights = [float(adapter_weights)] * len(names)
        else:
            weights = list(adapter_weights)
            if len(weights) != len(names):
                raise ParameterError("adapter_weights", weights, f"one number or {len(names)} numbers, one per name")
        loaded = {n: b for b, d in self._lora_loaded.items() for n in d}
        unknown = [n for n in names if n not in loaded]
        if unknown:
            raise ParameterError("adapter_names", unknown, f"names of loaded LoRAs: {sorted(loaded) or 'none'}")
        wanted = dict(zip(names, weights))
        for branch, manager in self._lora.items():
            for name in manager.names:
                if name not in wanted:
                    manager.remove(name)
            for name, lora in self._lora_loaded[branch].items():
                if name in wanted:
                    if name in manager.names:
                        manager.set_scale(name, wanted[name])
                    else:
                        manager.add(name, lora, wanted[name])

    def get_active_adapters(self) -> list[str]:
        """Names of the active LoRAs, both branches, in the order they were activated."""
        return [n for b in BRANCHES if b in self._lora for n in self._lora[b].names]

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Loaded LoRA names per branch ("sd15", "sdxl")."""
        return {b: list(d) for b, d in self._lora_loaded.items() if d}

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Forget these LoRAs (deactivated first)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for branch, loaded in self._lora_loaded.items():
            for name in names:
                if name in loaded:
                    if name in self._lora[branch].names:
                        self._lora[branch].remove(name)
                    del loaded[name]

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        """Write the active LoRAs into the weights (fastest per step), each at its weight x
        `lora_scale`; `unfuse_lora()` takes them out again. `adapter_names`: activate exactly
        these first (as set_adapters)."""
        if adapter_names is not None:
            self.set_adapters(adapter_names)
        if not isinstance(lora_scale, (int, float)) or isinstance(lora_scale, bool):
            raise ParameterError("lora_scale", lora_scale, "a finite number")
        if self._lora_fuse_scale is not None:
            self.unfuse_lora()
        for manager in self._lora.values():
            for name, scale in manager.scales.items():
                manager.set_scale(name, scale * lora_scale)
            manager.fuse()
        self._lora_fuse_scale = float(lora_scale)

    def unfuse_lora(self) -> None:
        """Take fused LoRAs out of the weights again (the originals back bit for bit); they stay
        active, unfused, at the weights they had before `fuse_lora`."""
        scale = self._lora_fuse_scale
        for manager in self._lora.values():
            manager.unfuse()
            if scale:
                for name, s in manager.scales.items():
                    manager.set_scale(name, s / scale)
        self._lora_fuse_scale = None

    def unload_lora_weights(self) -> None:
        """Remove every LoRA from both branches: the original weights, no hook left."""
        for manager in self._lora.values():
            manager.clear()
        self._lora_loaded = {b: {} for b in BRANCHES}
        self._lora_fuse_scale = None

    def disable_lora(self) -> None:
        """Turn every active LoRA off, both branches, keeping them loaded (diffusers'
        disable_lora); `enable_lora()` turns the same ones back on at their weights. Fused
        LoRAs are in the weights: unfuse_lora() first."""
        if self._lora_fuse_scale is not None:
            raise ParameterError("disable_lora", "fused LoRAs", "unfused LoRAs: call unfuse_lora() first")
        active = {n: s for m in self._lora.values() for n, s in m.scales.items()}
        if active:
            self._lora_disabled = active
            self.set_adapters([], [])

    def enable_lora(self) -> None:
        """Turn the LoRAs that disable_lora() turned off back on, at the weights they had."""
        disabled = self._lora_disabled
        loaded = {n for d in self._lora_loaded.values() for n in d}
        names = [n for n in disabled if n in loaded]  # deleted since: gone
        if names:
            self.set_adapters(names, [disabled[n] for n in names])
        self._lora_disabled = {}

    def installed_in(self, branch: str) -> list[str]:
        """What the loaders installed in a branch's UNet ("LoRAs", "the IP-Adapter"): a UNet
        swapped in for it would lack them."""
        out = ["LoRAs"] if self._lora_loaded.get(branch) else []
        return out + (["the IP-Adapter"] if branch == "sd15" and self._ip_adapter is not None else [])

    def lora_weight_deltas(self) -> dict[str, dict[str, torch.Tensor]]:
        """branch -> its active LoRAs' UNet weight changes ("unet.<module>.weight" -> fp32
        delta), for a backend's engines / graphs (LoraManager.weight_deltas)."""
        return {b: {k: v for k, v in m.weight_deltas().items() if k.startswith("unet.")}
                for b, m in self._lora.items() if m.names}

    # ------------------------------------------------------------------ any plugin kind
    def load_plugins(self, specs: Sequence[PluginSpec], loras: Mapping[str, LoraWeights] | None = None) -> list[Any]:
        """Load plugin_kinds.PluginSpec values, the one path of every entry point: LoRA kinds
        by load_lora_weights (adapter name spec.name, the kind's branch, weight spec.scale;
        `loras`: LoraWeights already read, by path), then fuse_lora() when any LoRA spec is
        fused; every other kind by its table row's loader, fitted to the SD1.5 UNet. Returns
        the step plugins, in the order of `specs`, for generate(params, plugins=...)."""
        step_plugins = []
        fuse = False
        for spec in specs:
            if spec.row.branch is not None:
                source = (loras or {}).get(spec.path) or spec.path
                self.load_lora_weights(source, adapter_name=spec.name, branch=spec.row.branch,
                                       adapter_weight=spec.scale)
                fuse = fuse or spec.fused
            else:
                step_plugins.append(spec.row.load()(self.sd15.unet, spec))
        if fuse:
            self.fuse_lora()
        return step_plugins

    # ------------------------------------------------------------------ IP-Adapter
    def load_ip_adapter(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike,
        image_encoder_folder: str | os.PathLike | None = None,
        *,
        scale: float | dict = 1.0,
    ) -> None:
        """Install an SD1.5 IP-Adapter file (ip-adapter_sd15 / -plus) on the SD1.5 UNet and load
        its CLIP vision encoder (`image_encoder_folder`, by default `image_encoder/` beside the
        file or one level up). Calls then need `ip_adapter_image=`."""
        from ..plugins.ip_adapter import check_scale, default_image_encoder_path, load_ip_adapter
        from ..plugins.ip_adapter_image import load_image_encoder

        path = str(pretrained_model_name_or_path_or_dict)
        if not os.path.isfile(path):
            raise ParameterError("pretrained_model_name_or_path_or_dict", path, "a local IP-Adapter file (.bin or .safetensors)")
        check_scale(scale, "scale")
        encoder_path = image_encoder_folder or default_image_encoder_path(path)
        if encoder_path is None:
            raise ParameterError("image_encoder_folder", None, f"a local CLIP vision folder; none found beside {path}")
        if self._ip_adapter is not None:
            self.unload_ip_adapter()
        self._ip_encoder = load_image_encoder(encoder_path, device=self.device, dtype=self.dtype)
        self._ip_adapter = load_ip_adapter(path, self.sd15.unet)
        self._ip_scale = scale

    def set_ip_adapter_scale(self, scale: float | dict) -> None:
        """The image prompt's weight (0 disables it), or a per-block dict as diffusers takes."""
        from ..plugins.ip_adapter import check_scale

        check_scale(scale, "scale")
        self._ip_scale = scale

    def unload_ip_adapter(self) -> None:
        """Take the IP-Adapter off the SD1.5 UNet (its original attention processors back)."""
        if self._ip_adapter is not None:
            self._ip_adapter.unload()
        self._ip_adapter = self._ip_encoder = None

    def _ip_plugin(self, image: Any) -> Any:
        from ..plugins.ip_adapter import IPAdapterPlugin

        if self._ip_adapter is None:
            raise ParameterError("ip_adapter_image", "an image", "no image unless load_ip_adapter() was called")
        return IPAdapterPlugin(self._ip_adapter, self._ip_encoder, image, self._ip_scale)
