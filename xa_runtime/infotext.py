"""PNG metadata that image tools read: A1111's "infotext" in the `parameters` text chunk,
the full JSON record in a second chunk (`xa_runtime`).

A1111 (stable-diffusion-webui) writes the prompt, a `Negative prompt: ...` line, then one
line of `Key: value` pairs (`Steps: 30, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1, Size:
1024x1024, ...`); its "PNG Info" tab, ComfyUI loaders and parsers such as sd-parsers read
that. Keys follow A1111's pattern (a word character, then words, spaces, `-` and `/`: no
dots, hence "X-Adapter base size" for the SD1.5 branch's size); a value holding `,`, `:` or
a newline is quoted as A1111 quotes it (JSON string). Imports nothing of ours and no torch.

Plugins (a record's "plugins": one entry per plugin, see `plugin_entries`) are written as
A1111 and its extensions write them: LoRAs as `<lora:name:weight>` at the end of the prompt
and a `Lora hashes: "name: hash, ..."` entry (A1111's 12-character short hash: for
.safetensors the sha256 of the tensor data after the header, as kohya's additional-networks
"addnet" hash; else of the file), ControlNets as sd-webui-controlnet's `ControlNet 0: "Module:
..., Model: name [hash], Weight: ..., Guidance Start: ..., Guidance End: ..."` entries (its
8-character sha256 model hash); T2I / Nexus / IP-Adapter under X-Adapter keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TEXT_KEY = "parameters"  # A1111's chunk: infotext
JSON_KEY = "xa_runtime"  # the full record as JSON
# our sampler names -> A1111's (modules/sd_samplers_kdiffusion.py / sd_samplers_timesteps.py)
A1111_SAMPLERS = {"dpmpp-2m": "DPM++ 2M", "euler": "Euler", "euler-a": "Euler a", "ddim": "DDIM", "unipc": "UniPC"}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weights_file(path: str | os.PathLike) -> Path:
    """The file a plugin's weights are in: the path itself, or in a diffusers folder the
    weights file (safetensors first)."""
    path = Path(path)
    if path.is_file():
        return path
    files = sorted((f for f in path.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES),
                   key=lambda f: (f.suffix != ".safetensors", f.name))
    if not files:
        raise FileNotFoundError(f"no weights file ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    return files[0]


def file_hash(path: str | os.PathLike, addnet: bool = False) -> str:
    """sha256 (hex) of a weights file; `addnet`: of a .safetensors file's tensor data only (the
    bytes after its 8-byte length and JSON header), the hash A1111 keeps for LoRAs."""
    digest = hashlib.sha256()
    with open(weights_file(path), "rb") as f:
        if addnet and str(weights_file(path)).endswith(".safetensors"):
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def plugin_entries(specs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One JSON-ready entry per plugin of xa-generate's specs (kind -> list of settings): its
    kind, file name, short hash (LoRA: 12 characters, addnet; others: 10), path as given, and
    every setting (scales, window, images) as given."""
    out = []
    for kind, items in specs.items():
        for spec in items:
            path = spec["path"]
            lora = kind in ("lora", "sdxl_lora")
            full = file_hash(path, addnet=lora)
            out.append({"kind": kind, "name": Path(path).stem if Path(path).is_file() else Path(path).name,
                        "file": Path(path).name, "hash": full[:12] if lora else full[:10], "sha256": full,
                        **{k: v for k, v in spec.items()}})
    return out


def quote(text: Any) -> str:
    """A1111's infotext quoting: as is, unless it holds `,`, `:` or a newline (then JSON)."""
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _pick(value: Any, index: int) -> Any:
    # a per-prompt list (several --prompt) -> this image's entry
    if isinstance(value, (list, tuple)):
        return value[index] if index < len(value) else (value[0] if value else None)
    return value


def infotext(params: Mapping[str, Any], prompt_index: int = 0, model: str | None = None,
             extra: Mapping[str, Any] | None = None) -> str:
    """A1111 infotext of one image from a GenerationParams dict (resolved: seed and sizes as
    used); `model`: the SDXL model's name; `extra`: more `Key: value` pairs at the end."""
    prompt = _pick(params.get("prompt"), prompt_index) or ""
    negative = _pick(params.get("negative_prompt"), prompt_index)
    plugins = list(params.get("plugins") or [])
    loras = [e for e in plugins if e.get("kind") in ("lora", "sdxl_lora")]
    if loras:  # A1111 keeps the extra-network tags in the prompt
        prompt = " ".join([str(prompt), *(f"<lora:{e['name']}:{e.get('scale', 1.0):g}>" for e in loras)])
    lines = [str(prompt)]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    scheduler = params.get("scheduler")
    fields: dict[str, Any] = {
        "Steps": params.get("num_inference_steps"),
        "Sampler": A1111_SAMPLERS.get(scheduler, scheduler),
        "CFG scale": params.get("guidance_scale"),
        "Seed": params.get("seed"),
        "Size": f"{params.get('width')}x{params.get('height')}",
        "Model": model,
        "Denoising strength": params.get("strength") if params.get("strength") != 1 else None,  # img2img only
        "X-Adapter start": params.get("adapter_guidance_start"),
        "X-Adapter condition scale": params.get("adapter_condition_scale"),
        "X-Adapter fusion scale": params.get("fusion_guidance_scale"),
        "X-Adapter base size": f"{params.get('width_sd15')}x{params.get('height_sd15')}",
        "X-Adapter base prompt": _pick(params.get("prompt_sd15"), prompt_index),
        "Clip skip": params["clip_skip"] + 1 if params.get("clip_skip") is not None else None,  # A1111 counts from 1
        **_plugin_fields(plugins),
        **(extra or {}),
    }
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None and v != ""))
    return "\n".join(lines)


def _plugin_fields(plugins: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Infotext entries of the plugins, as A1111 and sd-webui-controlnet write them."""
    fields: dict[str, Any] = {}
    loras = [e for e in plugins if e.get("kind") in ("lora", "sdxl_lora")]
    if loras:
        fields["Lora hashes"] = ", ".join(f"{e['name']}: {e['hash']}" for e in loras)
    controlnets = [e for e in plugins if e.get("kind") == "controlnet"]
    for i, e in enumerate(controlnets):
        fields[f"ControlNet {i}"] = ", ".join([
            f"Module: {e.get('control_type') or 'none'}", f"Model: {e['name']} [{e['sha256'][:8]}]",
            f"Weight: {e.get('conditioning_scale', 1.0):g}", "Resize Mode: Just Resize", "Low Vram: False",
            f"Guidance Start: {e.get('guidance_start', 0.0):g}", f"Guidance End: {e.get('guidance_end', 1.0):g}",
            "Pixel Perfect: False",
            f"Control Mode: {'My prompt is more important' if e.get('guess_mode') else 'Balanced'}"])
    for kind, key in (("t2i", "X-Adapter T2I-Adapter"), ("nexus", "X-Adapter Nexus"), ("ip_adapter", "X-Adapter IP-Adapter")):
        for i, e in enumerate(e for e in plugins if e.get("kind") == kind):
            fields[f"{key} {i}"] = f"{e['name']} [{e['hash']}], scale {e.get('scale', 1.0):g}"
    return fields


def png_text_chunks(params: Mapping[str, Any], record: Mapping[str, Any], prompt_index: int = 0,
                    model: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The two text chunks of one PNG: infotext under TEXT_KEY, `record` as JSON under JSON_KEY."""
    return {TEXT_KEY: infotext(params, prompt_index, model, extra), JSON_KEY: json.dumps(record, sort_keys=False)}
