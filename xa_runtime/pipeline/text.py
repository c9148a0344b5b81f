"""Prompt encoding for both branches (SD1.5: CLIP-L; SDXL: CLIP-L + OpenCLIP-bigG, pooled)."""

from __future__ import annotations

import warnings

import torch
from transformers import CLIPTokenizer

from ..models.components import SD15Components, SDXLComponents


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


@torch.no_grad()
def encode_sd15(
    c: SD15Components, prompts: list[str], negatives: list[str], repeat: int, cfg: bool, device: torch.device
) -> torch.Tensor:
    """Token embeddings, (2 if cfg else 1) * len(prompts) * repeat x 77 x D, [uncond; cond]."""
    texts = (negatives + prompts) if cfg else prompts
    ids = _token_ids(c.tokenizer, texts, "prompt_sd15").to(device)
    emb = c.text_encoder(ids)[0]
    return emb.repeat_interleave(repeat, dim=0)


@torch.no_grad()
def encode_sdxl(
    c: SDXLComponents,
    prompts: list[str],
    negatives: list[str] | None,
    repeat: int,
    cfg: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token embeddings B' x 77 x (D1 + D2), pooled B' x P), B' as in encode_sd15.

    Both encoders give their penultimate hidden state; the pooled vector is the projected
    end-of-text embedding of the second. Without a negative prompt the unconditional
    embeddings are zeros, as SDXL base does (force_zeros_for_empty_prompt).
    """

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts, pooled = [], None
        for tok, enc in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
            out = enc(_token_ids(tok, texts, "prompt").to(device), output_hidden_states=True)
            parts.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection model (second encoder)
        assert pooled is not None
        return torch.cat(parts, dim=-1), pooled

    emb, pooled = encode(prompts)
    if cfg:
        if negatives is None:
            neg_emb, neg_pooled = torch.zeros_like(emb), torch.zeros_like(pooled)
        else:
            neg_emb, neg_pooled = encode(negatives)
        emb, pooled = torch.cat([neg_emb, emb]), torch.cat([neg_pooled, pooled])
    return emb.repeat_interleave(repeat, dim=0), pooled.repeat_interleave(repeat, dim=0)


def sdxl_time_ids(height: int, width: int, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """SDXL size/crop conditioning: (original H, W, crop top, left, target H, W), rows x 6."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
    return ids.repeat(rows, 1)
