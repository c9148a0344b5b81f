"""The CLIP vocabulary ships in the package: the file is OpenAI CLIP's (its published sha256,
the bytes open_clip_torch and clip-anytorch ship), and the tokenizers built from it give
CLIP's token ids (well-known ids of `a photo of a cat`), with no open_clip installed."""

import hashlib
import importlib.util
import subprocess
import sys

from xa_runtime.models import tokenizer

CLIP_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def test_vocabulary_file_is_clips():
    path = tokenizer._bpe_vocab_path()
    assert "clip_vocab" in path.parts and "open_clip" not in path.parts
    assert hashlib.sha256(path.read_bytes()).hexdigest() == CLIP_VOCAB_SHA256
    if importlib.util.find_spec("open_clip") is not None:  # where open_clip_torch is still installed: the same bytes
        spec = importlib.util.find_spec("open_clip")
        other = next(iter(spec.submodule_search_locations)) + "/bpe_simple_vocab_16e6.txt.gz"
        assert open(other, "rb").read() == path.read_bytes()


def test_token_ids_are_clips():
    tok = tokenizer.build_clip_tokenizer()
    assert len(tok) == 49408
    # CLIP ViT-L/14's ids: <|startoftext|> 49406, a 320, photo 1125, of 539, cat 2368, <|endoftext|> 49407
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tokenizer.build_clip_tokenizer(pad_token="!")("a cat", padding="max_length", max_length=8).input_ids
    assert padded == [49406, 320, 2368, 49407, 0, 0, 0, 0]  # "!" is id 0 (SDXL's second tokenizer pads with it)


def test_vocabulary_needs_no_open_clip():
    code = ("import sys; sys.modules['open_clip'] = None\n"
            "from xa_runtime.models.tokenizer import build_clip_tokenizer\n"
            "print(build_clip_tokenizer()('a cat').input_ids)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[49406, 320, 2368, 49407]"
