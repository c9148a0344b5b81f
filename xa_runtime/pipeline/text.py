"""Prompt encoding for both branches (SD1.5: CLIP-L; SDXL: CLIP-L + OpenCLIP-bigG, pooled)."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from transformers import CLIPTokenizer

from ..errors import ParameterError
from ..models.components import SD15Components, SDXLComponents
from .params import GenerationParams


def _token_ids(tokenizer: CLIPTokenizer, texts: list[str], which: str) -> torch.Tensor:
    limit = tokenizer.model_max_length
    for row in tokenizer(texts, truncation=False, verbose=False).input_ids:
        if len(row) > limit:  # row = [bos, ..., eos]; the encoder keeps bos + limit-2 tokens + eos
            cut = tokenizer.decode(row[limit - 1 : -1])
            warnings.warn(
                f"{which}: longer than the text encoder's {limit} tokens; this part was cut: {cut!r}",
                UserWarning,
                stacklevel=4,
            )
    return tokenizer(texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids


def _skipped(out: Any, clip_skip: int | None, default: int) -> torch.Tensor:
    """The hidden state `clip_skip` layers before the encoder's `default` one (-1 for SD1.5,
    -2 for SDXL), as diffusers reads it; ParameterError where the encoder has fewer layers."""
    if clip_skip is None:
        return out.hidden_states[default]
    if clip_skip - default > len(out.hidden_states):
        raise ParameterError("clip_skip", clip_skip, f"at most {len(out.hidden_states) + default} for these text "
                             "encoders")
    return out.hidden_states[default - clip_skip]


@torch.no_grad()
def encode_sd15(
    c: SD15Components, prompts: list[str], negatives: list[str], repeat: int, cfg: bool, device: torch.device,
    clip_skip: int | None = None,
) -> torch.Tensor:
    """Token embeddings, (2 if cfg else 1) * len(prompts) * repeat x 77 x D, [uncond; cond];
    with clip_skip, the hidden state that many layers earlier through the final layer norm (as diffusers)."""
    texts = (negatives + prompts) if cfg else prompts
    ids = _token_ids(c.tokenizer, texts, "prompt_sd15").to(device)
    if clip_skip is None:
        emb = c.text_encoder(ids)[0]
    else:
        out = c.text_encoder(ids, output_hidden_states=True)
        model = getattr(c.text_encoder, "text_model", c.text_encoder)  # transformers moved it
        emb = model.final_layer_norm(_skipped(out, clip_skip, -1))
    return emb.repeat_interleave(repeat, dim=0)


@torch.no_grad()
def encode_sdxl(
    c: SDXLComponents,
    prompts: list[str],
    negatives: list[str] | None,
    repeat: int,
    cfg: bool,
    device: torch.device,
    prompts_2: list[str] | None = None,
    negatives_2: list[str] | None = None,
    clip_skip: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token embeddings B' x 77 x (D1 + D2), pooled B' x P), B' as in encode_sd15.

    Both encoders give their penultimate hidden state (clip_skip more layers earlier, as
    diffusers); the pooled vector is the projected end-of-text embedding of the second, which
    reads `prompts_2` (diffusers' prompt_2; default: the prompts). Without a negative prompt
    the unconditional embeddings are zeros, as SDXL base does (force_zeros_for_empty_prompt).
    """

    def encode(texts: list[str], texts_2: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts, pooled = [], None
        for tok, enc, words in ((c.tokenizer, c.text_encoder, texts), (c.tokenizer_2, c.text_encoder_2, texts_2)):
            out = enc(_token_ids(tok, words, "prompt").to(device), output_hidden_states=True)
            parts.append(_skipped(out, clip_skip, -2))
            pooled = out[0]  # text_embeds of the projection model (second encoder)
        assert pooled is not None
        return torch.cat(parts, dim=-1), pooled

    emb, pooled = encode(prompts, prompts_2 or prompts)
    if cfg:
        if negatives is None and negatives_2 is None:
            neg_emb, neg_pooled = torch.zeros_like(emb), torch.zeros_like(pooled)
        else:
            negatives = negatives or [""] * len(prompts)
            neg_emb, neg_pooled = encode(negatives, negatives_2 or negatives)
        emb, pooled = torch.cat([neg_emb, emb]), torch.cat([neg_pooled, pooled])
    return emb.repeat_interleave(repeat, dim=0), pooled.repeat_interleave(repeat, dim=0)


def sdxl_time_ids(height: int, width: int, rows: int, dtype: torch.dtype, device: torch.device,
                  original_size: Sequence[int] | None = None, crops_coords_top_left: Sequence[int] = (0, 0),
                  target_size: Sequence[int] | None = None) -> torch.Tensor:
    """SDXL size/crop conditioning: (original H, W, crop top, left, target H, W), rows x 6;
    original and target size default to the image size, as in diffusers."""
    row = [*(original_size or (height, width)), *crops_coords_top_left, *(target_size or (height, width))]
    return torch.tensor([row], dtype=dtype, device=device).repeat(rows, 1)


def encode_prompts(
sd15: SD15Components, sdxl: SDXLComponents, p: GenerationParams, cfg: bool, embeds: dict[str, torch.Tensor],
dev: torch.device, dt: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """SD1.5's CLIP-L embeddings, SDXL's CLIP-L + OpenCLIP-bigG embeddings and its added
    conditions (pooled text embeddings, size time ids), rows [uncond; cond] with CFG.
    `embeds` (see EMBEDS) replace the encoders for the branch they belong to."""
    n_prompts, repeat = len(p.prompts), p.num_images_per_prompt

    def per_prompt(value: str | list[str] | None, default: list[str] | None) -> list[str] | None:
        if value is None:
            return default
        return [value] * n_prompts if isinstance(value, str) else list(value)

    def rows(neg: torch.Tensor | None, cond: torch.Tensor) -> torch.Tensor:
        both = torch.cat([neg.to(dev), cond.to(dev)]) if cfg and neg is not None else cond.to(dev)
        return both.repeat_interleave(repeat, dim=0)

    prompts15 = per_prompt(p.prompt_sd15, p.prompts)
    negatives = per_prompt(p.negative_prompt, None)
    if "prompt_embeds_sd15" in embeds:
        neg = embeds.get("negative_prompt_embeds_sd15")
        if neg is None and cfg:
            neg = encode_sd15(sd15, negatives or [""] * n_prompts, [], 1, False, dev, p.clip_skip)
        emb15 = rows(neg, embeds["prompt_embeds_sd15"]).to(dt)
    else:
        emb15 = encode_sd15(sd15, prompts15, negatives or [""] * n_prompts, repeat, cfg, dev, p.clip_skip).to(dt)
    if "prompt_embeds" in embeds:
        neg, neg_pooled = embeds.get("negative_prompt_embeds"), embeds.get("negative_pooled_prompt_embeds")
        cond, pooled = embeds["prompt_embeds"], embeds["pooled_prompt_embeds"]
        if neg is None and cfg:
            if negatives is None:  # SDXL base: zeros for an empty negative prompt
                neg, neg_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
            else:
                neg, neg_pooled = encode_sdxl(sdxl, negatives, None, 1, False, dev, per_prompt(p.negative_prompt_2, None),
                                              clip_skip=p.clip_skip)
        embxl, pooled = rows(neg, cond), rows(neg_pooled, pooled)
    else:
        embxl, pooled = encode_sdxl(sdxl, p.prompts, negatives, repeat, cfg, dev, per_prompt(p.prompt_2, None),
                                    per_prompt(p.negative_prompt_2, None), p.clip_skip)
    time_ids = sdxl_time_ids(p.height, p.width, embxl.shape[0], dt, dev, p.original_size, p.crops_coords_top_left,
                             p.target_size)
    xl_cond = {"text_embeds": pooled.to(dt), "time_ids": time_ids}
    return emb15, embxl.to(dt), xl_cond
