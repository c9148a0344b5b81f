"""LoRA for both branches: SD1.5 LoRAs on the SD1.5 UNet + text encoder, SDXL LoRAs on the
SDXL UNet + both text encoders; several at once, each with a scale, fused into the weights
or unfused (a side path per layer), with exact unload.

File layouts are parsed in lora_formats.py; here layers are resolved against the actual
modules (so tiny and full-size models work alike) and applied. The weight change of a layer
is computed by `lora_delta` (LoHa: `loha_delta`, LoKr: `lokr_delta`; `layer_delta` picks), pure
functions that the TensorRT refit reuses.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ParameterError
from ..loading.checkpoint_files import check_finite
from .lora_formats import LoraLayer, guess_base, parse_lora_state, read_lora_file

__all__ = ["MODES", "LoraLayer", "LoraManager", "LoraWeights", "layer_delta", "ldm_module_names", "load_lora",
           "loha_delta", "lokr_delta", "lora_delta", "module_index", "parse_lora", "parse_lora_argument"]

MODES = ("fused", "unfused")
_EXAMPLES = 5  # keys named in warnings and errors


def _factor(alpha: float | None, rank: int | None, scale: float) -> float:
    return scale * (alpha / rank if alpha is not None and rank else 1.0)


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None, scale: float,
               target_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """scale * (alpha / r) * up @ down, shaped `target_shape`, in fp32 (cast it to the weight's dtype).

    Linear: down r x C, up O x r -> O x C. Conv: down r x C x kh x kw (3x3 LoCon or 1x1), up
    O x r x 1 x 1 -> O x C x kh x kw. alpha None means alpha = r (factor `scale`). Pure: reads
    its inputs only, computes on down's device.
    """
    rank = down.shape[0]
    delta = up.reshape(up.shape[0], -1).float() @ down.reshape(rank, -1).float()
    return (_factor(alpha, rank, scale) * delta).reshape(target_shape)


def loha_delta(w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, alpha: float | None,
               scale: float, target_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """LoHa: scale * (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b) (elementwise), r = w1_b's rows, fp32.

    w1_a O x r, w1_b r x C*kh*kw, w2_a O x r2, w2_b r2 x C*kh*kw -> `target_shape` (O x C[ x kh x kw]).
    """
    rank = w1_b.shape[0]
    product = (w1_a.float() @ w1_b.reshape(rank, -1).float()) * (w2_a.float() @ w2_b.reshape(w2_b.shape[0], -1).float())
    return (_factor(alpha, rank, scale) * product).reshape(target_shape)


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, alpha: float | None, rank: int | None, scale: float,
               target_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """LoKr: scale * (alpha / rank) * kron(w1, w2), fp32; rank None (both factors full) means factor `scale`.

    w1 a x c, w2 b x d (linear) or b x d x kh x kw / b x d*kh*kw (conv) -> `target_shape`
    O x C[ x kh x kw] with O = a*b, C = c*d. A decomposed factor is passed as its product
    (w1_a @ w1_b); `rank` is then that decomposition's rank.
    """
    delta = torch.kron(w1.float(), w2.reshape(w2.shape[0], -1).float())  # (a*b) x (c * d*kh*kw)
    return (_factor(alpha, rank, scale) * delta).reshape(target_shape)


def layer_delta(layer: LoraLayer, scale: float, target_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The fp32 weight change of one parsed layer at `scale` (dispatches on its kind)."""
    f = layer.factors
    if layer.kind == "lora":
        return lora_delta(f["down"], f["up"], layer.alpha, scale, target_shape)
    if layer.kind == "loha":
        return loha_delta(f["w1_a"], f["w1_b"], f["w2_a"], f["w2_b"], layer.alpha, scale, target_shape)
    w1 = f["w1"] if "w1" in f else f["w1_a"].float() @ f["w1_b"].float()
    w2 = f["w2"] if "w2" in f else f["w2_a"].float() @ f["w2_b"].reshape(f["w2_b"].shape[0], -1).float()
    return lokr_delta(w1, w2, layer.alpha, layer.rank, scale, target_shape)


@dataclass
class LoraWeights:
    """A parsed LoRA file. base: "sd15", "sdxl", "sd2" or None when no key or width tells (then
    the shapes decide when it is added); base_evidence: what told it; unmatched: keys that are
    no LoRA key (found at load), then keys matching no module (added by LoraManager.add)."""

    source: str
    layers: list[LoraLayer]
    base: str | None
    base_evidence: str
    unmatched: list[str] = field(default_factory=list)


def parse_lora(state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
               source: str = "<state dict>") -> LoraWeights:
    """A LoRA state dict (any supported layout) -> LoraWeights; `config`: a PEFT LoraConfig
    as a dict with target-prefixed keys ("unet.lora_alpha", ...) or None."""
    layers, unknown = parse_lora_state(state, config, source)
    if not layers:
        raise CheckpointError(f"{source}: no LoRA keys found (kohya lora_unet_*/lora_te*_* or diffusers/PEFT "
                              f"unet.*/text_encoder*.* with lora_A/lora_B); first keys: {sorted(state)[:3]}")
    base, evidence = guess_base(layers)
    lora = LoraWeights(source, layers, base, evidence, list(unknown))
    if unknown:
        warnings.warn(f"{source}: {len(unknown)} keys are no LoRA weights and are ignored, e.g. {unknown[:_EXAMPLES]}",
                      UserWarning, stacklevel=3)
    return lora


def load_lora(path: str | Path) -> LoraWeights:
    """Parse a LoRA file (.safetensors, or .bin/.pt/.pth/.ckpt via torch.load(weights_only=True)).
    No model is needed; the tensors stay on the CPU in the file's dtype."""
    state, config = read_lora_file(path)
    check_finite_factors(state, str(path))
    return parse_lora(state, config, str(path))


MAX_FACTOR_ABS = 1e4  # LoRA factors are O(1) or far smaller; beyond this the weight changes overflow


def check_finite_factors(state: Mapping[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming `source` and the first bad key when a tensor holds NaN, inf or a
    magnitude over MAX_FACTOR_ABS: found when the file loads, not as NaN images after a run."""
    check_finite(state.items(), source, "LoRA tensor")
    for key, value in state.items():
        if not value.is_floating_point() or value.numel() == 0:
            continue
        peak = float(value.float().abs().max())
        if peak > MAX_FACTOR_ABS:
            raise CheckpointError(f"{source}: LoRA tensor {key} holds a value of magnitude {peak:.3g}; "
                                  f"accepted: at most {MAX_FACTOR_ABS:g}")


def module_index(model: nn.Module, optional_prefix: str = "") -> dict[str, nn.Module]:
    """Linear and Conv2d submodules by every name a LoRA file may use: the dotted name, kohya's
    underscore-flattened name, for a diffusers UNet the flattened original (LDM) name, and each
    of these with and without `optional_prefix` (for text encoders: "text_model.")."""
    index: dict[str, nn.Module] = {}
    ambiguous: set[str] = set()
    config = getattr(model, "config", None)  # a diffusers UNet's is a dict; a CLIP model's is not
    ldm = ldm_module_names(model) if isinstance(config, Mapping) and "layers_per_block" in config else {}
    for name, sub in model.named_modules():
        if not isinstance(sub, (nn.Linear, nn.Conv2d)):
            continue
        names = {name, ldm.get(name, name)}
        if optional_prefix:
            names |= {n.removeprefix(optional_prefix) if n.startswith(optional_prefix) else optional_prefix + n for n in names}
        for alias in names | {n.replace(".", "_") for n in names}:
            if index.get(alias, sub) is not sub:
                ambiguous.add(alias)  # two modules flatten to one name: a LoRA key cannot tell which
            index[alias] = sub
    for alias in ambiguous:
        del index[alias]
    return index


def ldm_module_names(unet: nn.Module) -> dict[str, str]:
    """Dotted diffusers name -> dotted original (LDM) name of each Linear / Conv2d of a diffusers
    UNet (e.g. down_blocks.0.resnets.0.conv1 -> input_blocks.1.0.in_layers.2)."""
    # The project's one diffusers -> original-layout naming (also used to write single files);
    # kohya trains SDXL on the original UNet, so SDXL kohya LoRAs carry these names.
    from ..models.original_layout import unet_to_original

    config = unet.config
    out = {}
    for name, sub in unet.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            try:
                (ldm,) = unet_to_original({name + ".weight": sub.weight}, config)
            except KeyError:
                continue
            out[name] = ldm.removesuffix(".weight")
    return out


@dataclass
class _Applied:
    """One layer of one LoRA on one module; `ready` caches the tensors the unfused path uses
    (per device and dtype: the model may move after the LoRA was added)."""

    name: str
    layer: LoraLayer
    ready: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = field(default_factory=dict)


# Which manager holds LoRAs on a model: two managers fusing into one weight would each take the
# other's deltas for the original, and removing from one would drop the other's LoRA.
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[LoraManager]] = weakref.WeakKeyDictionary()


class LoraManager:
    """The LoRAs active on one branch (its UNet and text encoders), in one explicit mode.

    "fused": every touched weight is recomputed as original + the sum of its deltas (fp32, cast
    to the weight dtype); the original of every touched layer is kept (on the CPU) and copied
    back when its last LoRA goes, so the base is restored bit for bit. Fastest per step.
    "unfused": forward hooks add scale * up(down(x)) (LoHa/LoKr: x through the delta) to the
    layer output; weights never change, and set_scale is free. Fastest to switch.
    `fuse()` / `unfuse()` switch modes with the LoRAs in place.
    """

    def __init__(self, modules: Mapping[str, nn.Module], base: str, mode: str = "fused"):
        if mode not in MODES:
            raise ParameterError("lora_mode", mode, f"one of {', '.join(MODES)}")
        self.base, self._mode = base, mode
        self.modules = dict(modules)
        self._claim()
        self._indexes: dict[str, dict[str, nn.Module]] = {}
        self._scales: dict[str, float] = {}
        self._loras: dict[str, list[tuple[nn.Module, _Applied]]] = {}
        self._per_module: dict[nn.Module, list[_Applied]] = {}
        self._originals: dict[nn.Module, torch.Tensor] = {}
        self._hooks: dict[nn.Module, Any] = {}

    @classmethod
    def for_branch(cls, components: Any, mode: str = "fused") -> LoraManager:
        """For SD15Components (UNet + text encoder) or SDXLComponents (UNet + both encoders)."""
        modules = {"unet": components.unet, "text_encoder": components.text_encoder}
        if components.family == "sdxl":
            modules["text_encoder_2"] = components.text_encoder_2
        return cls(modules, components.family, mode)

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def names(self) -> list[str]:
        """Names of the active LoRAs, in the order they were added."""
        return list(self._loras)

    @property
    def scales(self) -> dict[str, float]:
        return dict(self._scales)

    def add(self, name: str, lora: LoraWeights, scale: float = 1.0) -> list[str]:
        """Activate `lora` under `name` with `scale` (replacing a LoRA of that name).

        Returns the keys that were not applied (no LoRA key, or no such module in this model),
        which are also warned about and appended to `lora.unmatched`. Raises ParameterError for
        a LoRA of another base, layer shapes that do not fit, or no layer that matches.
        """
        scale = self._check_scale(scale)
        self._claim()
        pairs, missing = self._resolve(lora)
        if name in self._loras:
            self.remove(name)
        self._scales[name] = scale
        self._loras[name] = [(m, _Applied(name, layer)) for m, layer in pairs]
        for module, applied in self._loras[name]:
            self._per_module.setdefault(module, []).append(applied)
        self._refresh({m for m, _ in pairs})
        new = [k for k in missing if k not in lora.unmatched]
        lora.unmatched.extend(new)
        if missing:
            warnings.warn(f"{lora.source}: {len(missing)} LoRA layers match no module of the {self.base} model "
                          f"and are not applied, e.g. {missing[:_EXAMPLES]}", UserWarning, stacklevel=2)
        return list(lora.unmatched)

    def set_scale(self, name: str, scale: float) -> None:
        """Change one LoRA's scale (unfused: free; fused: its layers are recomputed from the originals)."""
        self._get(name)
        self._scales[name] = self._check_scale(scale)
        if self._mode == "fused":
            self._refresh({m for m, _ in self._loras[name]})

    def remove(self, name: str) -> None:
        """Deactivate one LoRA; layers no other LoRA touches get their original weights back."""
        pairs = self._get(name)
        del self._loras[name], self._scales[name]
        for module, applied in pairs:
            self._per_module[module] = [a for a in self._per_module[module] if a is not applied]
            if not self._per_module[module]:
                del self._per_module[module]
        self._refresh({m for m, _ in pairs})

    def clear(self) -> None:
        """Remove every LoRA: all weights are the originals again, no hook is left."""
        for name in list(self._loras):
            self.remove(name)

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """"<target>.<module>.weight" (e.g. "unet.down_blocks.0.resnets.0.conv1.weight") -> the fp32
        sum of the active LoRAs' changes at their scales, shaped like the weight: what "fused" adds
        to the original, for refitting an engine built from the original weights."""
        names = {m: f"{t}.{n}.weight" for t, model in self.modules.items() for n, m in model.named_modules()}
        out = {}
        for module, applied in self._per_module.items():
            w = module.weight
            out[names[module]] = sum(layer_delta(_on(a.layer, w.device), self._scales[a.name], w.shape) for a in applied)
        return out

    def fuse(self) -> None:
        """Switch to "fused" with the active LoRAs (hooks removed, deltas written into the weights)."""
        self._switch("fused")

    def unfuse(self) -> None:
        """Switch to "unfused" with the active LoRAs (original weights back, hooks added)."""
        self._switch("unfused")

    def _switch(self, mode: str) -> None:
        if mode == self._mode:
            return
        touched = set(self._per_module)
        for module in touched:  # leave the old mode completely, as if no LoRA were active
            self._apply(module, [])
        self._mode = mode
        self._refresh(touched)

    def _claim(self) -> None:
        for target, model in self.modules.items():
            owner = _OWNERS.get(model)
            other = owner() if owner is not None else None
            if other is not None and other is not self and other.names:
                raise ParameterError("lora", target, f"one LoraManager per model; this {target} has LoRAs "
                                     f"{other.names} of another manager: use that one, or clear() it first")
        for model in self.modules.values():
            _OWNERS[model] = weakref.ref(self)

    def _get(self, name: str) -> list[tuple[nn.Module, _Applied]]:
        if name not in self._loras:
            raise ParameterError("lora", name, f"one of the active LoRAs: {self.names or 'none'}")
        return self._loras[name]

    @staticmethod
    def _check_scale(scale: float) -> float:
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ParameterError("lora scale", scale, "a finite number")
        return float(scale)

    def _resolve(self, lora: LoraWeights) -> tuple[list[tuple[nn.Module, LoraLayer]], list[str]]:
        if lora.base is not None and lora.base != self.base:
            raise ParameterError("lora", lora.source, f"a LoRA for {self.base} (this branch); it is a {lora.base} "
                                 f"LoRA: {lora.base_evidence}")
        pairs, missing = [], []
        for layer in lora.layers:
            model = self.modules.get(layer.target)
            if model is None:
                missing.append(layer.stem)
                continue
            if layer.target not in self._indexes:
                # transformers 5 dropped CLIPTextModel's `text_model.` level; files (and
                # CLIPTextModelWithProjection) keep it: accept names with and without it
                self._indexes[layer.target] = module_index(model, "" if layer.target == "unet" else "text_model.")
            module = self._indexes[layer.target].get(layer.module)
            if module is None:
                missing.append(layer.stem)
                continue
            w = module.weight
            fits = layer.shape == (w.shape[0], w[0].numel())
            if not fits:
                raise ParameterError("lora", lora.source, f"a LoRA for this {self.base} model; {layer.stem} changes a "
                                     f"{layer.shape[0]} x {layer.shape[1]} weight, the model's weight is {tuple(w.shape)}")
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
                raise ParameterError("lora", lora.source, f"LoRA layers on plain convolutions; {layer.stem} targets a "
                                     f"conv with groups={module.groups}, padding_mode={module.padding_mode!r}")
            pairs.append((module, layer))
        if not pairs:
            raise ParameterError("lora", lora.source, f"a LoRA whose layers exist in this {self.base} model; none of "
                                 f"its {len(lora.layers)} layers matched, e.g. {missing[:_EXAMPLES]}")
        return pairs, missing

    def _refresh(self, modules: set[nn.Module]) -> None:
        for module in modules:
            self._apply(module, self._per_module.get(module, []))

    def _apply(self, module: nn.Module, applied: list[_Applied]) -> None:
        """Bring one module to the state `applied` asks for in the current mode."""
        if self._mode == "unfused":
            if applied and module not in self._hooks:
                self._hooks[module] = module.register_forward_hook(self._unfused_hook)
            elif not applied and module in self._hooks:
                self._hooks.pop(module).remove()
            return
        weight = module.weight
        with torch.no_grad():
            if not applied:
                if module in self._originals:
                    weight.copy_(self._originals.pop(module))
                return
            if module not in self._originals:
                self._originals[module] = weight.detach().to("cpu", copy=True)
            total = self._originals[module].to(weight.device, torch.float32, copy=True)  # never alias the original
            for a in applied:
                total += layer_delta(_on(a.layer, weight.device), self._scales[a.name], weight.shape)
            weight.copy_(total.to(weight.dtype))

    def _unfused_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for applied in self._per_module.get(module, ()):
            scale = self._scales[applied.name]
            if scale == 0.0:
                continue
            output = output + scale * _side_path(module, applied, x)
        return output


def _on(layer: LoraLayer, device: torch.device) -> LoraLayer:
    return LoraLayer(layer.target, layer.module, layer.stem, layer.kind,
                     {k: v.to(device) for k, v in layer.factors.items()}, layer.alpha)


def _side_path(module: nn.Module, applied: _Applied, x: torch.Tensor) -> torch.Tensor:
    """What the layer adds at scale 1: (alpha/r) * up(down(x)); LoHa/LoKr: x through their delta."""
    key = (x.device, x.dtype)
    if key not in applied.ready:
        layer, w = applied.layer, module.weight
        if layer.kind == "lora":
            r = layer.rank
            down = layer.factors["down"].reshape(r, *w.shape[1:]) if w.dim() == 4 else layer.factors["down"].reshape(r, -1)
            up = layer.factors["up"].reshape(w.shape[0], r, *([1, 1] if w.dim() == 4 else []))
            # the factor goes into up once, so the per-step path is two small products
            up = up.float() * _factor(layer.alpha, r, 1.0)
            applied.ready[key] = (down.to(*key), up.to(*key))
        else:
            applied.ready[key] = (layer_delta(layer, 1.0, w.shape).to(*key),)
    tensors = applied.ready[key]
    if isinstance(module, nn.Linear):
        h = x
        for t in tensors:
            h = F.linear(h, t)
        return h
    h = F.conv2d(x, tensors[0], None, module.stride, module.padding, module.dilation)
    return F.conv2d(h, tensors[1]) if len(tensors) == 2 else h


def parse_lora_argument(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` -> (path, scale); a trailing `:number` is the scale (default 1.0)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0
