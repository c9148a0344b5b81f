"""CLIP tokenizers built offline from CLIP's BPE vocabulary, shipped in this package.

Single-file checkpoints carry no tokenizer and we never reach a hub, so the vocabulary
and merges are rebuilt from `clip_vocab/bpe_simple_vocab_16e6.txt.gz` (OpenAI CLIP's file,
MIT, byte for byte the copy open_clip_torch ships; clip_vocab/LICENSE) the way CLIP defines
them (byte-level alphabet, then merges, then the two special tokens). Shipping the 1.3 MB
file here, rather than installing open_clip_torch for it, leaves no package whose
requirements (torchvision, timm) pip would report unmet.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

from transformers import CLIPTokenizer

_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2


def _bpe_vocab_path() -> Path:
    path = Path(__file__).resolve().parent / "clip_vocab" / _VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the CLIP vocabulary {path} is missing from this install of xa-runtime")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to 256+.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    lines = gzip.open(_bpe_vocab_path(), "rt", encoding="utf-8").read().split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1])
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def build_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer (49408 tokens). SDXL's second tokenizer pads with "!"."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=model_max_length
    )
