"""LoRA for both branches: SD1.5 LoRAs on the SD1.5 UNet + text encoder, SDXL LoRAs on the
SDXL UNet + both text encoders, several at once, fused into the weights or unfused.

Formats: kohya / A1111 (`lora_unet_*`, `lora_te_*`, SDXL `lora_te1_*` / `lora_te2_*`, with
`lora_down` / `lora_up` / `alpha`, linear and conv layers including 3x3 LoCon) and
diffusers / PEFT (`unet.*`, `text_encoder.*`, `text_encoder_2.*` with `lora_A` / `lora_B`,
or the older `.lora.down` / `.lora.up`). Module names are resolved against the actual
models, so the same code serves tiny and full-size models. LoHa / LoKr are refused by name.
`lora_delta` is the one weight-delta computation (TensorRT refit reuses it).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ParameterError
from ..loading.checkpoint_files import read_state_dict

MODES = ("fused", "unfused")
_KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
_PEFT_PREFIX = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
_UNSUPPORTED = ("hada_w1_a", "hada_w2_a", "lokr_w1", "lokr_w2", "oft_blocks", "diff_b", ".diff")


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None, scale: float,
               weight_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """scale * (alpha / rank) * up @ down, shaped like the weight, in fp32.

    Linear: down r x in, up out x r -> out x in. Conv: down r x C x kh x kw (3x3 LoCon or
    1x1), up O x r x 1 x 1 -> O x C x kh x kw. Without alpha the factor is 1 (alpha = rank).
    """
    rank = down.shape[0]
    factor = scale * ((alpha / rank) if alpha is not None else 1.0)
    delta = up.reshape(up.shape[0], -1).float() @ down.reshape(rank, -1).float()
    return (factor * delta).reshape(weight_shape)


@dataclass
class LoraLayer:
    """One adapted layer: `target` ("unet", "text_encoder", "text_encoder_2"), its module name."""

    target: str
    module: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None


@dataclass
class LoraWeights:
    """A parsed LoRA file; `base` is "sd15", "sdxl" or None when keys and shapes do not tell."""

    source: str
    layers: list[LoraLayer]
    base: str | None
    unmatched: list[str] = field(default_factory=list)


def _group(state: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """(target, flattened-or-dotted module key) -> {"down", "up", "alpha"}."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        kohya = next((p for p in sorted(_KOHYA_PREFIX, key=len, reverse=True) if key.startswith(p)), None)
        if kohya:
            m = re.fullmatch(r"(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)", key[len(kohya):])
            if m:
                part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m.group(2)]
                # kohya's te / te1 prefixes also tell the base (SD1.5 / SDXL): keep them as a tag
                tag = {"lora_te_": "@te", "lora_te1_": "@te1"}.get(kohya, "")
                groups.setdefault((_KOHYA_PREFIX[kohya] + tag, m.group(1)), {})[part] = value
            continue
        peft = next((p for p in sorted(_PEFT_PREFIX, key=len, reverse=True) if key.startswith(p)), None)
        if peft:
            m = re.fullmatch(r"(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|alpha)", key[len(peft):])
            if m:
                part = {"lora_A.weight": "down", "lora.down.weight": "down", "lora_B.weight": "up",
                        "lora.up.weight": "up", "alpha": "alpha"}[m.group(2)]
                groups.setdefault((_PEFT_PREFIX[peft], m.group(1)), {})[part] = value
    return groups


def _guess_base(groups: dict[tuple[str, str], dict[str, torch.Tensor]]) -> str | None:
    for (target, name), parts in groups.items():  # cross-attention context width of attn2.to_k
        if target == "unet" and re.search(r"attn2[._]to_k$", name) and "down" in parts:
            width = parts["down"].shape[1]
            if width in (768, 2048):
                return "sd15" if width == 768 else "sdxl"
    targets = {t for t, _ in groups}
    if "text_encoder_2" in targets or "text_encoder@te1" in targets:
        return "sdxl"
    if "text_encoder@te" in targets:
        return "sd15"
    return None  # e.g. a UNet-only LoRA of a tiny model: the shapes decide when it is applied


def load_lora(path: str | Path, state: Mapping[str, torch.Tensor] | None = None) -> LoraWeights:
    """Parse a LoRA file (.safetensors, or .bin/.pt with weights_only=True); no model needed."""
    state = dict(read_state_dict(path)) if state is None else dict(state)
    odd = sorted({k for k in state if any(u in k for u in _UNSUPPORTED)})
    if odd:
        raise CheckpointError(f"{path}: unsupported LoRA variant (LoHa / LoKr / OFT / full diffs), keys like {odd[:3]}")
    groups = _group(state)
    if not groups:
        raise CheckpointError(f"{path}: no LoRA keys found (kohya lora_unet_*/lora_te*_ or diffusers unet.*/text_encoder*.*); "
                              f"first keys: {sorted(state)[:3]}")
    base = _guess_base(groups)
    layers, broken = [], []
    for (target, name), parts in groups.items():
        if "down" not in parts or "up" not in parts:
            broken.append(f"{target}:{name}")
            continue
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        layers.append(LoraLayer(target.split("@")[0], name, parts["down"], parts["up"], alpha))
    if broken:
        raise CheckpointError(f"{path}: LoRA layers without both down and up weights: {broken[:5]}")
    return LoraWeights(str(path), layers, base)


def _adaptable(module: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv2d submodules by dotted name and by kohya's underscore-flattened name."""
    out: dict[str, nn.Module] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            out[name] = sub
            out[name.replace(".", "_")] = sub
    return out


class LoraManager:
    """The LoRAs active on one branch (its UNet and text encoders), in one explicit mode.

    "fused": deltas are added into the weights (fastest per step); the original weights of
    every touched layer are kept and copied back on removal, so the base is restored bit for
    bit. "unfused": forward hooks add the low-rank path (x -> down -> up) to the layer output,
    the weights never change (fastest to switch scales and LoRAs).
    """

    def __init__(self, modules: Mapping[str, nn.Module], base: str, mode: str = "fused"):
        if mode not in MODES:
            raise ParameterError("lora_mode", mode, f"one of {', '.join(MODES)}")
        self.base, self.mode = base, mode
        self.modules = dict(modules)
        self._index = {t: _adaptable(m) for t, m in self.modules.items()}
        self._active: dict[str, tuple[LoraWeights, float, list[tuple[nn.Module, LoraLayer]]]] = {}
        self._originals: dict[nn.Module, torch.Tensor] = {}
        self._hooks: dict[nn.Module, Any] = {}

    @classmethod
    def for_branch(cls, components: Any, mode: str = "fused") -> "LoraManager":
        """For SD15Components (UNet + text encoder) or SDXLComponents (UNet + both encoders)."""
        modules = {"unet": components.unet, "text_encoder": components.text_encoder}
        if components.family == "sdxl":
            modules["text_encoder_2"] = components.text_encoder_2
        return cls(modules, components.family, mode)

    @property
    def names(self) -> list[str]:
        return list(self._active)

    def _resolve(self, lora: LoraWeights) -> list[tuple[nn.Module, LoraLayer]]:
        if lora.base is not None and lora.base != self.base:
            raise ParameterError("lora", lora.source, f"a LoRA for {self.base}; its keys and shapes are those of a {lora.base} LoRA")
        pairs, unmatched = [], []
        for layer in lora.layers:
            module = self._index.get(layer.target, {}).get(layer.module)
            if module is None:
                unmatched.append(f"{layer.target}:{layer.module}")
                continue
            weight = module.weight
            if layer.up.shape[0] != weight.shape[0] or layer.down.reshape(layer.down.shape[0], -1).shape[1] != weight[0].numel():
                raise ParameterError(
                    "lora", lora.source,
                    f"a LoRA for this {self.base} model; layer {layer.target}.{layer.module} has down {tuple(layer.down.shape)} "
                    f"/ up {tuple(layer.up.shape)}, the model's weight is {tuple(weight.shape)}",
                )
            pairs.append((module, layer))
        if unmatched:
            lora.unmatched = unmatched
            warnings.warn(f"{lora.source}: {len(unmatched)} LoRA layers match no module of the {self.base} model, "
                          f"e.g. {unmatched[:3]}", UserWarning, stacklevel=3)
        if not pairs:
            raise ParameterError("lora", lora.source, f"a LoRA whose layers exist in the {self.base} model (none matched)")
        return pairs

    def add(self, name: str, lora: LoraWeights, scale: float = 1.0) -> None:
        """Activate `lora` under `name` with `scale` (replaces a LoRA of the same name)."""
        pairs = self._resolve(lora)
        self._active[name] = (lora, float(scale), pairs)
        self._refresh({m for m, _ in pairs} | self._touched(name))

    def set_scale(self, name: str, scale: float) -> None:
        lora, _, pairs = self._get(name)
        self._active[name] = (lora, float(scale), pairs)
        self._refresh({m for m, _ in pairs})

    def remove(self, name: str) -> None:
        _, _, pairs = self._get(name)
        del self._active[name]
        self._refresh({m for m, _ in pairs})

    def clear(self) -> None:
        for name in list(self._active):
            self.remove(name)

    def _get(self, name: str):
        if name not in self._active:
            raise ParameterError("lora", name, f"one of the active LoRAs: {self.names or 'none'}")
        return self._active[name]

    def _touched(self, name: str) -> set[nn.Module]:
        return {m for m, _ in self._active[name][2]} if name in self._active else set()

    def _deltas(self, module: nn.Module) -> list[tuple[LoraLayer, float]]:
        return [(layer, scale) for _, scale, pairs in self._active.values() for m, layer in pairs if m is module]

    def _refresh(self, modules: set[nn.Module]) -> None:
        for module in modules:
            deltas = self._deltas(module)
            if self.mode == "fused":
                if module not in self._originals:
                    self._originals[module] = module.weight.detach().clone()
                original = self._originals[module]
                with torch.no_grad():
                    if deltas:
                        total = original.float() + sum(lora_delta(l.down.to(original.device), l.up.to(original.device),
                                                                  l.alpha, s, original.shape) for l, s in deltas)
                        module.weight.copy_(total.to(original.dtype))
                    else:
                        module.weight.copy_(self._originals.pop(module))
            else:
                if deltas and module not in self._hooks:
                    self._hooks[module] = module.register_forward_hook(self._unfused_hook)
                elif not deltas and module in self._hooks:
                    self._hooks.pop(module).remove()

    def _unfused_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for layer, scale in self._deltas(module):
            factor = scale * ((layer.alpha / layer.down.shape[0]) if layer.alpha is not None else 1.0)
            down, up = layer.down.to(x.device, x.dtype), layer.up.to(x.device, x.dtype)
            if isinstance(module, nn.Linear):
                h = F.linear(F.linear(x, down.reshape(down.shape[0], -1)), up.reshape(up.shape[0], -1))
            else:  # the down conv takes the layer's geometry, the up conv is 1x1
                h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)
                h = F.conv2d(h, up)
            output = output + factor * h
        return output


def parse_lora_argument(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` -> (path, scale); a trailing `:number` is the scale (default 1.0)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def write_random_lora(
    path: str | Path, unet: nn.Module, text_encoder: nn.Module | None = None, *, text_encoder_2: nn.Module | None = None,
    fmt: str = "kohya", rank: int = 4, seed: int = 0, conv: bool = True, alpha: float | None = 2.0, std: float = 0.05,
) -> Path:
    """A random LoRA in a real file layout for `unet` (and text encoders): attention q/k/v/out
    and feed-forward linears, plus (conv=True) 3x3 resnet convs (LoCon) and 1x1 proj_in convs.
    SDXL-style files (with text_encoder_2) use kohya's te1/te2 prefixes."""
    from safetensors.torch import save_file

    if fmt not in ("kohya", "peft"):
        raise ParameterError("fmt", fmt, "'kohya' or 'peft'")
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    sdxl = text_encoder_2 is not None
    targets = [("unet", unet, r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.2)$" + (r"|resnets\.\d+\.conv1$|proj_in$" if conv else ""))]
    if text_encoder is not None:
        targets.append(("text_encoder", text_encoder, r"self_attn\.(q|v)_proj$"))
    if text_encoder_2 is not None:
        targets.append(("text_encoder_2", text_encoder_2, r"self_attn\.(q|v)_proj$"))
    for target, model, pattern in targets:
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or not re.search(pattern, name):
                continue
            w = module.weight
            down = torch.randn(rank, *w.shape[1:], generator=g) * std
            up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=g) * std
            if fmt == "kohya":
                prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[target]
                key = prefix + name.replace(".", "_")
                state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
                if alpha is not None:
                    state[f"{key}.alpha"] = torch.tensor(float(alpha))
            else:
                key = f"{target}.{name}"
                state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, up
                if alpha is not None:
                    state[f"{key}.alpha"] = torch.tensor(float(alpha))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    return path
