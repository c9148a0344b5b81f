"""Random LoRA files in each real layout, for a given model: what the tests, the CLI tests and
the benchmarks load (no LoRA is ever downloaded)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import ParameterError
from ..plugins.lora import ldm_module_names

FORMATS = ("kohya", "kohya-ldm", "peft", "diffusers-old", "loha", "lokr")
_UNET_LINEAR = r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.2)$"
_UNET_CONV = r"|resnets\.\d+\.conv1$|proj_in$|(down|up)samplers\.0\.conv$"
_TEXT = r"self_attn\.(q|v)_proj$|mlp\.fc1$"
_OLD_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}


def write_random_lora(
    path: str | Path, unet: nn.Module, text_encoder: nn.Module | None = None, *, text_encoder_2: nn.Module | None = None,
    fmt: str = "kohya", rank: int = 4, seed: int = 0, conv: bool = True, alpha: float | None = 2.0, std: float = 0.05,
) -> Path:
    """Write a random LoRA for `unet` (and text encoders) to `path`; returns the path.

    Layers: UNet attention q/k/v/out and ff.net.2; with conv=True also resnet conv1 (3x3,
    LoCon), proj_in (1x1 conv on SD1.5, linear on SDXL) and the down/upsampler convs; text
    encoders: self-attention q/v and mlp.fc1. A file with text_encoder_2 is an SDXL file.
    fmt: "kohya" (lora_unet_ / lora_te_ or lora_te1_ + lora_te2_, diffusers module names,
    .alpha), "kohya-ldm" (UNet in original naming, as kohya writes SDXL LoRAs), "peft"
    (unet. / text_encoder. / text_encoder_2. with lora_A / lora_B; alpha in diffusers'
    lora_adapter_metadata for .safetensors, as .alpha keys in a pickle), "diffusers-old"
    (unprefixed UNet keys, attention-processor to_q_lora / .lora.down / lora_linear_layer,
    no alpha), "loha" and "lokr" (LyCORIS, kohya prefixes). The suffix picks the container:
    .safetensors, or .bin / .pt (torch.save). Factors are N(0, std) (LoHa / LoKr: scaled so
    the weight change is of similar size).
    """
    if fmt not in FORMATS:
        raise ParameterError("fmt", fmt, f"one of {', '.join(FORMATS)}")
    g = torch.Generator().manual_seed(seed)
    sdxl = text_encoder_2 is not None
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    targets = [("unet", unet, _UNET_LINEAR + (_UNET_CONV if conv else ""))]
    targets += [(t, m, _TEXT) for t, m in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)) if m is not None]
    ldm = {}
    if fmt == "kohya-ldm":
        ldm = ldm_module_names(unet)
    state: dict[str, torch.Tensor] = {}
    metadata: dict[str, object] = {}
    for target, model, pattern in targets:
        names = []
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or not re.search(pattern, name):
                continue
            if target != "unet" and not hasattr(model, "text_model"):
                name = "text_model." + name  # the name files carry (transformers 5 dropped this level)
            names.append(name)
            w = module.weight
            if fmt in ("kohya", "kohya-ldm", "loha", "lokr"):
                flat = (ldm.get(name, name) if target == "unet" else name).replace(".", "_")
                stem = kohya_prefix[target] + flat
                state.update(_factors(fmt, stem, w.shape, rank, std, g))
                if alpha is not None:
                    state[f"{stem}.alpha"] = torch.tensor(float(alpha))
                continue
            down = torch.randn(rank, *w.shape[1:], generator=g) * std
            up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=g) * std
            if fmt == "peft":
                stem = f"{target}.{name}"
                state[f"{stem}.lora_A.weight"], state[f"{stem}.lora_B.weight"] = down, up
                if alpha is not None and Path(path).suffix != ".safetensors":
                    state[f"{stem}.alpha"] = torch.tensor(float(alpha))
            else:  # diffusers-old
                state.update(_old_diffusers_keys(target, name, down, up))
        if fmt == "peft" and alpha is not None:
            metadata.update({f"{target}.r": rank, f"{target}.lora_alpha": alpha, f"{target}.target_modules": names})
    return _save(Path(path), state, metadata)


def _old_diffusers_keys(target: str, name: str, down: torch.Tensor, up: torch.Tensor) -> dict[str, torch.Tensor]:
    if name.endswith(".to_out.0"):
        parent, proj = name.removesuffix(".to_out.0"), "to_out"
    else:
        parent, _, last = name.rpartition(".")
        proj = _OLD_PROJ.get(last)
    if target == "unet":  # the oldest files had no "unet." prefix
        stem = f"{parent}.processor.{proj}_lora" if ".attn" in name and proj else f"{name}.lora"
    else:
        stem = f"{target}.{parent}.{proj}_lora" if proj else f"{target}.{name}.lora_linear_layer"
    return {f"{stem}.down.weight": down, f"{stem}.up.weight": up}


def _factors(fmt: str, stem: str, shape: torch.Size, rank: int, std: float, g: torch.Generator) -> dict[str, torch.Tensor]:
    out_dim, in_flat = shape[0], shape[1:].numel()
    if fmt in ("kohya", "kohya-ldm"):
        return {f"{stem}.lora_down.weight": torch.randn(rank, *shape[1:], generator=g) * std,
                f"{stem}.lora_up.weight": torch.randn(out_dim, rank, *([1, 1] if len(shape) == 4 else []), generator=g) * std}
    if fmt == "loha":
        s = std ** 0.5  # the change is a product of two products: keep it about as large as a LoRA's
        return {f"{stem}.hada_w1_a": torch.randn(out_dim, rank, generator=g) * s,
                f"{stem}.hada_w1_b": torch.randn(rank, in_flat, generator=g) * s,
                f"{stem}.hada_w2_a": torch.randn(out_dim, rank, generator=g) * s,
                f"{stem}.hada_w2_b": torch.randn(rank, in_flat, generator=g) * s}
    # lokr: a full small w1 (a x c) and a decomposed w2 (b x r @ r x d*kh*kw), O = a*b, C = c*d
    a, c = _small_divisor(out_dim), _small_divisor(shape[1])
    return {f"{stem}.lokr_w1": torch.randn(a, c, generator=g),
            f"{stem}.lokr_w2_a": torch.randn(out_dim // a, rank, generator=g) * std,
            f"{stem}.lokr_w2_b": torch.randn(rank, (shape[1] // c) * shape[2:].numel(), generator=g) * std}


def _small_divisor(n: int) -> int:
    return next(d for d in (4, 3, 2, 1) if n % d == 0)


def _save(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, object]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        header = {"format": "pt"}
        if metadata:
            header["lora_adapter_metadata"] = json.dumps(metadata, sort_keys=True)
        save_file(state, str(tmp), metadata=header)
    else:
        torch.save(state, tmp)
    tmp.replace(path)
    return path
