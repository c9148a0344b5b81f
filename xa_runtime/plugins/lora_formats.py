"""LoRA file layouts -> one list of adapted layers, and the base model the file is for.

kohya / A1111 / LyCORIS keys are `<prefix><flat module>.<part>` with prefixes lora_unet_,
lora_te_ (SD1.x/2.x) and lora_te1_ / lora_te2_ (SDXL); the module is underscore-flattened,
in diffusers or original (LDM) naming. diffusers / PEFT keys are `unet.<dotted module>.lora_A.weight`
(text_encoder., text_encoder_2.; raw PEFT base_model.model.; older diffusers `.lora.down.weight`,
`.lora_linear_layer.down.weight` and attention-processor `.processor.to_q_lora.down.weight`).
No model is needed here: module names stay as written and are resolved in lora.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

TARGETS = ("unet", "text_encoder", "text_encoder_2")

# (prefix, target); lora_te_ is SD1.x/2.x, lora_te1_/lora_te2_ are SDXL's two encoders.
_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                   ("lora_te_", "text_encoder"))
# part after the module name -> (kind, factor name); kind None: shared by all kinds (alpha).
_KOHYA_PARTS = {
    "lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"),
    "hada_w1_a": ("loha", "w1_a"), "hada_w1_b": ("loha", "w1_b"),
    "hada_w2_a": ("loha", "w2_a"), "hada_w2_b": ("loha", "w2_b"),
    "lokr_w1": ("lokr", "w1"), "lokr_w1_a": ("lokr", "w1_a"), "lokr_w1_b": ("lokr", "w1_b"),
    "lokr_w2": ("lokr", "w2"), "lokr_w2_a": ("lokr", "w2_a"), "lokr_w2_b": ("lokr", "w2_b"),
    "alpha": (None, "alpha"),
}
# Parts of variants whose weight change is not a plain product of the factors above; applying
# the rest of such a file would give a different model, so these are refused, not skipped.
_UNSUPPORTED_PARTS = {
    "lora_mid.weight": "LoCon with a Tucker core (lora_mid)",
    "hada_t1": "LoHa with Tucker cores (hada_t1/hada_t2)", "hada_t2": "LoHa with Tucker cores (hada_t1/hada_t2)",
    "lokr_t2": "LoKr with a Tucker core (lokr_t2)",
    "dora_scale": "DoRA (dora_scale)", "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    "oft_blocks": "OFT", "oft_diag": "OFT", "oft_R.weight": "OFT",
    "diff": "full weight diffs (diff)", "diff_b": "bias diffs (diff_b)",
    "w_norm": "norm-layer diffs (w_norm)", "b_norm": "norm-layer diffs (b_norm)",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
}
_PEFT_UNSUPPORTED = (
    (re.compile(r".+\.lora_magnitude_vector(?:\.[\w-]+)?(?:\.weight)?"), "DoRA (lora_magnitude_vector)"),
    (re.compile(r".+\.lora_B(?:\.[\w-]+)?\.bias"), "LoRA with a bias on lora_B"),
    (re.compile(r".+\.lora_embedding_[AB](?:\.[\w-]+)?"), "LoRA on embeddings"),
)
_REQUIRED = {"lora": ({"down", "up"},), "loha": ({"w1_a", "w1_b", "w2_a", "w2_b"},),
             "lokr": ({"w1", "w2"}, {"w1_a", "w1_b", "w2"}, {"w1", "w2_a", "w2_b"}, {"w1_a", "w1_b", "w2_a", "w2_b"})}

_PEFT_PREFIXES = (("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"),
                  ("base_model.model.", None))  # raw PEFT: the module path tells (text_model.* is a text encoder)
_PEFT_PARTS = (
    (re.compile(r"(.+)\.lora_A(?:\.[\w-]+)?\.weight"), "down", None),  # optional PEFT adapter name
    (re.compile(r"(.+)\.lora_B(?:\.[\w-]+)?\.weight"), "up", None),
    (re.compile(r"(.+)\.lora(?:_linear_layer)?\.down\.weight"), "down", None),
    (re.compile(r"(.+)\.lora(?:_linear_layer)?\.up\.weight"), "up", None),
    # diffusers < 0.21 attention processors: the projection's name is folded into the key
    (re.compile(r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.down\.weight"), "down", "proj"),
    (re.compile(r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.up\.weight"), "up", "proj"),
    (re.compile(r"(.+)\.alpha"), "alpha", None),
)
_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

# Cross-attention context width (in-features of attn2.to_k / to_v) and CLIP hidden width per base.
_CONTEXT_WIDTH = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
_KOHYA_TE_WIDTH = {768: "sd15", 1024: "sd2"}
# UNet blocks that only one layout has (diffusers or LDM names, dotted or flattened; tiny presets
# keep the topology): several transformer layers per block and the added embedding are SDXL's;
# a 4th down/up stage, attention in the first stage and output blocks 9-11 are SD1.x/2.x's.
_SDXL_BLOCKS = re.compile(r"transformer_blocks[._][1-9]|add_embedding|label_emb")
_SD1_BLOCKS = re.compile(r"(down_blocks[._]3|up_blocks[._]3|down_blocks[._]0[._]attentions|input_blocks[._][12][._]1"
                         r"|input_blocks[._]1[01]|output_blocks[._](9|10|11))[._]")


@dataclass
class LoraLayer:
    """One adapted layer as a file gives it.

    target: "unet", "text_encoder" or "text_encoder_2"; module: its name as written (dotted
    diffusers name, or kohya's underscore-flattened name in diffusers or LDM naming);
    stem: the file's key prefix for this layer (for messages); kind: "lora", "loha", "lokr".
    factors (O x C x kh x kw weights; linear: kh = kw = 1 and no trailing dims):
      lora: down r x C[ x kh x kw], up O x r[ x 1 x 1];
      loha: w1_a O x r, w1_b r x C*kh*kw, w2_a O x r2, w2_b r2 x C*kh*kw;
      lokr: w1 a x c (or w1_a a x r @ w1_b r x c), w2 b x d[ x kh x kw] (or w2_a b x r @ w2_b r x d*kh*kw),
            O = a*b, C = c*d.
    alpha: None means alpha = rank (factor 1), as kohya, LyCORIS and PEFT do.
    """

    target: str
    module: str
    stem: str
    kind: str
    factors: dict[str, torch.Tensor]
    alpha: float | None

    @property
    def rank(self) -> int | None:
        """The rank alpha is divided by; None for a LoKr whose both factors are full (factor 1)."""
        f = self.factors
        if self.kind == "lora":
            return f["down"].shape[0]
        if self.kind == "loha":
            return f["w1_b"].shape[0]
        # A1111 and LyCORIS take w2's decomposition rank when both factors are decomposed (they agree)
        return f["w2_b"].shape[0] if "w2_b" in f else f["w1_b"].shape[0] if "w1_b" in f else None

    @property
    def shape(self) -> tuple[int, int]:
        """(O, C*kh*kw): the weight change as a matrix."""
        f = self.factors
        if self.kind == "lora":
            return f["up"].shape[0], f["down"][0].numel()
        if self.kind == "loha":
            return f["w1_a"].shape[0], f["w1_b"][0].numel()
        a, c = (f["w1"].shape if "w1" in f else (f["w1_a"].shape[0], f["w1_b"].shape[1]))
        b, d = (f["w2"].shape[0], f["w2"][0].numel()) if "w2" in f else (f["w2_a"].shape[0], f["w2_b"][0].numel())
        return a * b, c * d


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, PEFT config) of a LoRA file: .safetensors, or .bin/.pt/.pth/.ckpt read with
    torch.load(weights_only=True). The config is diffusers' `lora_adapter_metadata` from the
    safetensors header, or a PEFT `adapter_config.json` beside the file; {} when neither."""
    from ..loading.checkpoint_files import read_state_dict

    path = Path(path)
    state = read_state_dict(path)
    config: dict[str, Any] = {}
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        if raw:
            config = _json(raw, f"{path} (lora_adapter_metadata)")
    sidecar = path.with_name("adapter_config.json")
    if not config and sidecar.is_file() and any(k.startswith("base_model.model.") for k in state):
        config = {f"{t}.{k}": v for t in TARGETS for k, v in _json(sidecar.read_text(), str(sidecar)).items()}
    return state, config


def _json(text: str, where: str) -> dict[str, Any]:
    try:
        out = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(out, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {type(out).__name__}")
    return out


def _split_key(key: str) -> tuple[str, str, str, str] | None:
    """key -> (target, module, stem, part); part is a _KOHYA_PARTS name, "down" / "up" / "alpha"
    for diffusers/PEFT keys, or "unsupported:<variant>". None when the key is no LoRA key."""
    for prefix, target in _KOHYA_PREFIXES:
        if key.startswith(prefix):
            stem, _, part = key.partition(".")  # kohya flattens the module path: no dots before the part
            if part in _UNSUPPORTED_PARTS:
                part = "unsupported:" + _UNSUPPORTED_PARTS[part]
            return target, stem[len(prefix):], stem, part
    for prefix, target in _PEFT_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            break
    else:  # diffusers < 0.14 files (pytorch_lora_weights.bin) had no prefix: UNet only
        prefix, target, rest = "", "unet", key
    for pattern, variant in _PEFT_UNSUPPORTED:
        if pattern.fullmatch(rest):
            return target or "unet", rest, key, "unsupported:" + variant
    for pattern, part, proj in _PEFT_PARTS:
        m = pattern.fullmatch(rest)
        if m is None:
            continue
        if not prefix and not (proj or ".lora." in rest):
            return None  # unprefixed keys are taken only in the old diffusers spellings
        module = m.group(1)
        if target is None:
            target = "text_encoder" if module.startswith("text_model.") else "unet"
        if proj:
            module += "." + (_UNET_PROJ if target == "unet" else _TEXT_PROJ)[m.group(2)]
        return target, module, prefix + module, part
    return None


def parse_lora_state(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None, source: str = "<state dict>"
) -> tuple[list[LoraLayer], list[str]]:
    """(layers, keys that are no LoRA key) of a LoRA state dict; `config` as from read_lora_file.

    Raises CheckpointError for variants that are not supported (naming the keys) and for
    layers that lack a factor.
    """
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    unknown, unsupported = [], {}
    for key, value in state.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        target, module, stem, part = split
        if part.startswith("unsupported:"):
            unsupported.setdefault(part.split(":", 1)[1], []).append(key)
            continue
        if part in ("down", "up"):
            kind, name = "lora", part
        elif part in _KOHYA_PARTS:
            kind, name = _KOHYA_PARTS[part]
        else:
            unknown.append(key)
            continue
        g = groups.setdefault((target, module), {"stem": stem, "kinds": set(), "factors": {}})
        if kind:
            g["kinds"].add(kind)
        g["factors"][name] = value
    if unsupported:
        what = "; ".join(f"{name}: {sorted(keys)[:3]} ({len(keys)} keys)" for name, keys in unsupported.items())
        raise CheckpointError(f"{source}: unsupported LoRA variant: {what}")
    layers, broken = [], []
    for (target, module), g in groups.items():
        factors = dict(g["factors"])
        alpha_tensor = factors.pop("alpha", None)
        kinds = g["kinds"]
        kind = next(iter(kinds)) if len(kinds) == 1 else None
        if kind is None or not any(req <= set(factors) for req in _REQUIRED[kind]):
            broken.append(f"{g['stem']} (has {sorted(factors) or 'only alpha'})")
            continue
        if alpha_tensor is not None and (not isinstance(alpha_tensor, torch.Tensor) or alpha_tensor.numel() != 1
                                         or not torch.isfinite(alpha_tensor.float()).all()):
            shape = tuple(alpha_tensor.shape) if isinstance(alpha_tensor, torch.Tensor) else type(alpha_tensor).__name__
            broken_alpha = f"{source}: {g['stem']}.alpha must be one finite number; found {shape}"
            raise CheckpointError(broken_alpha)
        alpha = float(alpha_tensor) if alpha_tensor is not None else None
        layer = LoraLayer(target, module, g["stem"], kind, factors, alpha or None)  # alpha 0 means rank (kohya)
        if alpha_tensor is None and config:
            layer.alpha = _config_alpha(config, target, module, layer.rank)
        layers.append(layer)
    for layer in layers:
        problem = factor_shape_problem(layer)
        if problem:
            raise CheckpointError(f"{source}: LoRA layer {layer.stem}: {problem}")
    if broken:
        raise CheckpointError(f"{source}: LoRA layers with missing factors: {broken[:5]}"
                              + (f" and {len(broken) - 5} more" if len(broken) > 5 else ""))
    return layers, unknown


def factor_shape_problem(layer: LoraLayer) -> str | None:
    """Why the factors of `layer` cannot multiply (ranks that disagree, wrong dimensions); None if they fit."""
    f = layer.factors
    dims = {k: tuple(v.shape) for k, v in f.items()}
    if any(len(d) not in (2, 4) for d in dims.values()):
        return f"factors must be matrices or conv kernels; shapes {dims}"
    pairs = {"lora": [("down", 0, "up", 1)],
             "loha": [("w1_a", 1, "w1_b", 0), ("w2_a", 1, "w2_b", 0)],
             "lokr": [("w1_a", 1, "w1_b", 0), ("w2_a", 1, "w2_b", 0)]}[layer.kind]
    for a, ai, b, bi in pairs:
        if a in dims and b in dims and dims[a][ai] != dims[b][bi]:
            return f"ranks disagree: {a} {dims[a]} and {b} {dims[b]}"
    if layer.kind == "loha" and f["w1_a"].shape[0] != f["w2_a"].shape[0] or \
            layer.kind == "loha" and f["w1_b"].shape[1] != f["w2_b"].shape[1]:
        return f"the two Hadamard factors differ in shape: {dims}"
    return None


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any:
    # PEFT matches alpha_pattern / rank_pattern keys as regexes against the module path's tail.
    hits = [p for p in patterns if re.fullmatch(rf"(?:.*\.)?(?:{p})", module)]
    return patterns[max(hits, key=len)] if hits else None


def _config_alpha(config: Mapping[str, Any], target: str, module: str, rank: int | None) -> float | None:
    """alpha from a PEFT LoraConfig (lora_alpha, alpha_pattern, use_rslora), keys prefixed by target."""
    alpha = _pattern_value(config.get(f"{target}.alpha_pattern") or {}, module)
    if alpha is None:
        alpha = config.get(f"{target}.lora_alpha")
    if alpha is None or rank is None:
        return None
    if config.get(f"{target}.use_rslora"):
        # rsLoRA scales by alpha / sqrt(r); expressed as an alpha for the alpha / r convention
        return float(alpha) * math.sqrt(rank)
    return float(alpha)


def guess_base(layers: list[LoraLayer]) -> tuple[str | None, str]:
    """("sd15" | "sdxl" | "sd2" | None, what told it) from keys and widths only one base has.

    In order: the UNet's cross-attention context width (in-features of attn2.to_k / to_v: 768
    SD1.x, 1024 SD2.x, 2048 SDXL); SDXL's second text encoder; blocks only SDXL's UNet has; the
    width of a kohya lora_te_ encoder; blocks only the SD1.x/2.x UNet has (reported as "sd15").
    None when nothing tells: the shapes decide when the LoRA is added.
    """
    unet = [layer for layer in layers if layer.target == "unet"]
    for layer in unet:
        if re.search(r"attn2[._]to_[kv]$", layer.module) and layer.shape[1] in _CONTEXT_WIDTH:
            width = layer.shape[1]
            return _CONTEXT_WIDTH[width], f"cross-attention context width {width} ({layer.stem})"
    for layer in layers:
        if layer.target == "text_encoder_2" or layer.stem.startswith("lora_te1_"):
            return "sdxl", f"keys of SDXL's two text encoders ({layer.stem})"
    for layer in unet:
        if _SDXL_BLOCKS.search(layer.module):
            return "sdxl", f"a block only SDXL's UNet has ({layer.stem})"
    for layer in layers:
        if layer.stem.startswith("lora_te_") and re.search(r"self_attn_q_proj$", layer.module):
            width = layer.shape[1]
            if width in _KOHYA_TE_WIDTH:
                return _KOHYA_TE_WIDTH[width], f"lora_te_ text encoder of width {width} ({layer.stem})"
    for layer in unet:
        if _SD1_BLOCKS.match(layer.module):
            return "sd15", f"a block only the SD1.x UNet has ({layer.stem})"
    return None, "no key or width that only one base has"
