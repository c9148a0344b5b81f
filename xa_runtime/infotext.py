"""PNG metadata that image tools read: A1111's "infotext" in the `parameters` text chunk,
the full JSON record in a second chunk (`xa_runtime`).

A1111 (stable-diffusion-webui) writes the prompt, a `Negative prompt: ...` line, then one
line of `Key: value` pairs (`Steps: 30, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1, Size:
1024x1024, ...`); its "PNG Info" tab, ComfyUI loaders and parsers such as sd-parsers read
that. Keys follow A1111's pattern (a word character, then words, spaces, `-` and `/`: no
dots, hence "X-Adapter base size" for the SD1.5 branch's size); a value holding `,`, `:` or
a newline is quoted as A1111 quotes it (JSON string). Imports nothing of ours and no torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

TEXT_KEY = "parameters"  # A1111's chunk: infotext
JSON_KEY = "xa_runtime"  # the full record as JSON
# our sampler names -> A1111's (modules/sd_samplers_kdiffusion.py / sd_samplers_timesteps.py)
A1111_SAMPLERS = {"dpmpp-2m": "DPM++ 2M", "euler": "Euler", "euler-a": "Euler a", "ddim": "DDIM", "unipc": "UniPC"}


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
        **(extra or {}),
    }
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None and v != ""))
    return "\n".join(lines)


def png_text_chunks(params: Mapping[str, Any], record: Mapping[str, Any], prompt_index: int = 0,
                    model: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The two text chunks of one PNG: infotext under TEXT_KEY, `record` as JSON under JSON_KEY."""
    return {TEXT_KEY: infotext(params, prompt_index, model, extra), JSON_KEY: json.dumps(record, sort_keys=False)}
