"""IP-Adapter files: read the released layout, tell the variant, check it fits an SD1.5 UNet.

The released files (h94/IP-Adapter) hold two state dicts: `image_proj` (the image
projection: a linear layer + LayerNorm for `ip-adapter_sd15`, a Perceiver Resampler for
`ip-adapter-plus_sd15`) and `ip_adapter` (`{n}.to_k_ip.weight` / `{n}.to_v_ip.weight` for
every cross-attention layer, n = its index among all of the UNet's attention processors).
A `.bin` is one pickled dict (read with weights_only=True); a `.safetensors` copy is flat,
with `image_proj.` / `ip_adapter.` prefixes. `tiny_ip_adapter_state` builds random weights in
this layout for a given UNet (the tiny ONNX export uses it; xa_runtime.testing writes them as files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ParameterError
from ..loading.checkpoint_files import check_finite

Tensors = dict[str, torch.Tensor]
IP_ADAPTER_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
# The variants diffusers' converters build without extra inputs (FaceID needs insightface
# embeddings and LoRA weights, which this runtime does not provide).
VARIANTS = ("plain", "plus", "full")
RESAMPLER_DEPTH = 4  # diffusers' IPAdapterPlusImageProjection is built with its default depth
RESAMPLER_DIM_HEAD = 64
RESAMPLER_FF_MULT = 4


def read_ip_adapter_file(path: str | Path) -> dict[str, Tensors]:
    """{"image_proj": {...}, "ip_adapter": {...}} from a .bin/.pt/.pth or .safetensors file (CPU tensors)."""
    p = Path(path)
    if p.suffix not in IP_ADAPTER_SUFFIXES:
        raise ParameterError("ip_adapter", str(path), f"a file ending in {', '.join(IP_ADAPTER_SUFFIXES)}")
    if not p.is_file():
        raise ParameterError("ip_adapter", str(path), "an existing IP-Adapter file (e.g. ip-adapter_sd15.bin)")
    if p.suffix == ".safetensors":
        flat = load_file(str(p), device="cpu")
        state: dict[str, Any] = {"image_proj": {}, "ip_adapter": {}}
        stray = []
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            if head in state and rest:
                state[head][rest] = value
            else:
                stray.append(key)
        if stray or not flat:
            raise CheckpointError(
                f"{p}: not an IP-Adapter file: every key must start with 'image_proj.' or 'ip_adapter.'; "
                f"found {len(stray)} other keys, e.g. {stray[:3]}"
            )
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses arbitrary pickles: report, never retry unsafely
            raise CheckpointError(f"{p}: cannot be read as a weights-only torch file: {exc}") from exc
    if not isinstance(state, dict) or set(state) != {"image_proj", "ip_adapter"}:
        found = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{p}: not the IP-Adapter layout: expected exactly the state dicts 'image_proj' and 'ip_adapter', found {found}"
        )
    for part in ("image_proj", "ip_adapter"):
        if not isinstance(state[part], dict) or not all(isinstance(v, torch.Tensor) for v in state[part].values()):
            raise CheckpointError(f"{p}: '{part}' must be a state dict of tensors")
        check_finite(((f"{part}.{k}", v) for k, v in state[part].items()), f"{p} (IP-Adapter)")
    return state


def detect_variant(image_proj: Tensors, source: str = "ip_adapter") -> str:
    """"plain" (ip-adapter_sd15), "plus" (Resampler, ip-adapter-plus_sd15) or "full"
    (ip-adapter-full-face_sd15), from the image projection's keys."""
    keys = set(image_proj)
    if "perceiver_resampler.proj_in.weight" in keys or ("norm.weight" in keys and "proj.0.weight" in keys):
        raise CheckpointError(f"{source}: an IP-Adapter FaceID file (needs insightface face embeddings); not supported")
    if {"proj.weight", "proj.bias", "norm.weight", "norm.bias"} <= keys:
        return "plain"
    if {"proj.0.weight", "proj.2.weight", "proj.3.weight"} <= keys:
        return "full"
    if {"latents", "proj_in.weight", "proj_out.weight", "norm_out.weight"} <= keys:
        return "plus"
    raise CheckpointError(
        f"{source}: unknown image projection layout: keys {sorted(keys)[:6]}; expected proj/norm (ip-adapter_sd15), "
        "latents/proj_in/layers.N/proj_out/norm_out (ip-adapter-plus_sd15) or proj.0/proj.2/proj.3 (full-face)"
    )


def image_proj_dims(image_proj: Tensors, variant: str) -> tuple[int, int | None, int]:
    """(image embedding width the projection takes, tokens it makes per image (None for "full":
    one per CLIP hidden-state token), cross-attention width it outputs)."""
    if variant == "plain":
        out = image_proj["norm.weight"].shape[0]
        return image_proj["proj.weight"].shape[1], image_proj["proj.weight"].shape[0] // out, out
    if variant == "full":
        return image_proj["proj.0.weight"].shape[1], None, image_proj["proj.3.weight"].shape[0]
    return image_proj["proj_in.weight"].shape[1], image_proj["latents"].shape[1], image_proj["proj_out.weight"].shape[0]


def cross_attention_layers(unet: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The UNet's cross-attention modules keyed by the index the IP-Adapter file uses for them
    (their position among all attention processors, so 1, 3, 5, ... for SD1.5)."""
    out = {}
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            out[index] = unet.get_submodule(name[: -len(".processor")])
    return out


def check_fits_unet(state: dict[str, Tensors], unet: torch.nn.Module, source: str = "ip_adapter") -> str:
    """Raise CheckpointError unless the file's layers match this UNet's cross-attention layers
    one for one (count, widths); returns the variant. Catches SDXL files given to SD1.5."""
    variant = detect_variant(state["image_proj"], source)
    width = unet.config.cross_attention_dim
    layers = cross_attention_layers(unet)
    ip = state["ip_adapter"]
    file_width = {v.shape[1] for k, v in ip.items() if k.endswith("to_k_ip.weight") and v.dim() == 2}
    _, _, proj_out = image_proj_dims(state["image_proj"], variant)
    if (file_width and file_width != {width}) or proj_out != width:
        found = sorted(file_width | {proj_out})
        hint = " (2048 is SDXL: use an SD1.5 IP-Adapter on the SD1.5 branch)" if 2048 in found else ""
        raise CheckpointError(
            f"{source}: made for cross-attention width {found}{hint}, but the SD1.5 UNet's cross_attention_dim is "
            f"{width} ({len(layers)} cross-attention layers)"
        )
    expected = {f"{i}.to_{kv}_ip.weight": (attn.to_k.out_features, width) for i, attn in layers.items() for kv in "kv"}
    missing = sorted(set(expected) - set(ip), key=lambda k: (int(k.split(".")[0]), k))
    unexpected = sorted(set(ip) - set(expected))
    if missing or unexpected:
        n_file = len({k.split(".")[0] for k in ip})
        raise CheckpointError(
            f"{source}: 'ip_adapter' has {n_file} layers, the UNet has {len(layers)} cross-attention layers; "
            f"missing {len(missing)} keys (e.g. {missing[:3]}), unexpected {len(unexpected)} (e.g. {unexpected[:3]})"
        )
    for key, shape in expected.items():
        if tuple(ip[key].shape) != shape:
            raise CheckpointError(f"{source}: ip_adapter.{key} has shape {tuple(ip[key].shape)}, the UNet needs {shape}")
    if variant == "plus":
        _check_resampler(state["image_proj"], source)
    return variant


def _check_resampler(proj: Tensors, source: str) -> None:
    depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
    dim = proj["latents"].shape[-1]
    if depth != RESAMPLER_DEPTH:
        raise CheckpointError(f"{source}: the Resampler has {depth} layers; diffusers builds it with {RESAMPLER_DEPTH}")
    q = proj.get("layers.0.0.to_q.weight")
    ff = proj.get("layers.0.1.1.weight")
    if q is None or q.shape[0] % RESAMPLER_DIM_HEAD or ff is None or ff.shape[0] != RESAMPLER_FF_MULT * dim:
        raise CheckpointError(
            f"{source}: the Resampler needs heads of {RESAMPLER_DIM_HEAD} channels and a feed-forward of "
            f"{RESAMPLER_FF_MULT} x {dim}; found to_q {None if q is None else tuple(q.shape)}, "
            f"feed-forward {None if ff is None else tuple(ff.shape)}"
        )


# ---------------------------------------------------------------------- tiny files
def tiny_ip_adapter_state(
    sd15_unet: torch.nn.Module, variant: str = "plain", *, image_embed_dim: int = 32, num_tokens: int | None = None,
    resampler_heads: int = 1, seed: int = 0,
) -> dict[str, Tensors]:
    """Random weights in the released layout that fit `sd15_unet` (any width). Linear weights
    use nn.Linear's init scale, so the image prompt visibly changes the output at scale 1."""
    if variant not in VARIANTS:
        raise ParameterError("variant", variant, f"one of {VARIANTS}")
    g = torch.Generator().manual_seed(seed)
    width = sd15_unet.config.cross_attention_dim

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return (torch.rand(out_f, in_f, generator=g) * 2 - 1) / in_f**0.5

    def norm(prefix: str, n: int) -> Tensors:
        return {f"{prefix}.weight": 1 + 0.1 * torch.randn(n, generator=g), f"{prefix}.bias": 0.1 * torch.randn(n, generator=g)}

    if variant == "plain":
        tokens = num_tokens or 4
        proj = {"proj.weight": linear(tokens * width, image_embed_dim), "proj.bias": 0.1 * torch.randn(tokens * width, generator=g)}
        proj.update(norm("norm", width))
    elif variant == "full":  # MLP over every CLIP token: Linear(E, E), GELU, Linear(E, width), LayerNorm
        proj = {"proj.0.weight": linear(image_embed_dim, image_embed_dim), "proj.0.bias": 0.1 * torch.randn(image_embed_dim, generator=g),
                "proj.2.weight": linear(width, image_embed_dim), "proj.2.bias": 0.1 * torch.randn(width, generator=g)}
        proj.update(norm("proj.3", width))
    else:
        tokens, dim = num_tokens or 4, width
        inner = RESAMPLER_DIM_HEAD * resampler_heads
        proj = {"latents": torch.randn(1, tokens, dim, generator=g) / dim**0.5,
                "proj_in.weight": linear(dim, image_embed_dim), "proj_in.bias": 0.1 * torch.randn(dim, generator=g),
                "proj_out.weight": linear(width, dim), "proj_out.bias": 0.1 * torch.randn(width, generator=g)}
        proj.update(norm("norm_out", width))
        for n in range(RESAMPLER_DEPTH):
            a, f = f"layers.{n}.0", f"layers.{n}.1"
            proj.update(norm(f"{a}.norm1", dim) | norm(f"{a}.norm2", dim) | norm(f"{f}.0", dim))
            proj[f"{a}.to_q.weight"] = linear(inner, dim)
            proj[f"{a}.to_kv.weight"] = linear(2 * inner, dim)
            proj[f"{a}.to_out.weight"] = linear(dim, inner)
            proj[f"{f}.1.weight"] = linear(RESAMPLER_FF_MULT * dim, dim)
            proj[f"{f}.3.weight"] = linear(dim, RESAMPLER_FF_MULT * dim)
    ip = {}
    for i, attn in cross_attention_layers(sd15_unet).items():
        for kv in "kv":
            ip[f"{i}.to_{kv}_ip.weight"] = linear(attn.to_k.out_features, width)
    return {"image_proj": proj, "ip_adapter": ip}


def save_ip_adapter(state: dict[str, Tensors], path: str | Path) -> Path:
    """Write the released layout: nested dict for .bin, prefixed flat keys for .safetensors."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".safetensors":
        save_file({f"{part}.{k}": v.contiguous() for part, sd in state.items() for k, v in sd.items()}, str(p))
    else:
        torch.save(state, str(p))
    return p
