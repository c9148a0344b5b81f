"""Test-only ComfyUI nodes: tiny stand-ins for CheckpointLoaderSimple and CLIPTextEncode.

ComfyUI's model detection refuses tiny models, so the end-to-end test swaps these two
node types in the example workflows for these (same outputs, same slots); everything else
(LoraLoaderModelOnly, ControlNetLoader, KSampler, the X-Adapter nodes, VAEDecode,
SaveImage) is ComfyUI's or the pack's own. Linked into a temporary ComfyUI's
custom_nodes/ by the test only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # comfy_tiny

import comfy.supported_models_base  # noqa: E402
import comfy_tiny  # noqa: E402

# ComfyUI's ControlNet loader builds an unrecognised model with SD's 64 channels per head;
# the tiny ControlNet has 4 heads of 8 (this process only serves the tests).
comfy.supported_models_base.BASE.unet_extra_config = {"num_heads": 4, "num_head_channels": -1}
from xa_runtime.pipeline.text import encode_sd15, encode_sdxl  # noqa: E402

_TINY: list = []


def tiny() -> comfy_tiny.TinyComfy:
    if not _TINY:
        _TINY.append(comfy_tiny.build(0))
    return _TINY[0]


class TinyClip:
    """The CLIP value of the tiny loader: which branch's text encoders to use."""

    def __init__(self, family: str):
        self.family = family


class XATinyCheckpoint:
    CATEGORY = "testing/x-adapter"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["sd15", "sdxl"],)}}

    def load(self, family):
        t = tiny()
        if family == "sd15":
            return (t.sd15_model, TinyClip("sd15"), t.sd15_vae)
        return (t.sdxl_model, TinyClip("sdxl"), t.sdxl_vae)


class XATinyTextEncode:
    CATEGORY = "testing/x-adapter"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"multiline": True})}}

    @torch.no_grad()
    def encode(self, clip, text):
        t = tiny()
        if clip.family == "sd15":
            return ([[encode_sd15(t.sd15, [text], [], 1, False, torch.device("cpu")), {}]],)
        emb, pooled = encode_sdxl(t.sdxl, [text], None, 1, False, torch.device("cpu"))
        return ([[emb, {"pooled_output": pooled}]],)


NODE_CLASS_MAPPINGS = {"XATinyCheckpoint": XATinyCheckpoint, "XATinyTextEncode": XATinyTextEncode}
