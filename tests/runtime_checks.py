"""Checks shared by the lean-runtime tests on a GPU (test_runtime_lean.py) and on CPU with
the torch.cuda stand-in (test_runtime_fake_cuda.py)."""

import torch

from xa_runtime.plugins.lora import LoraManager, load_lora


def assert_lora_switches_reach(lean, plain, sd15_components, lora_path, kwargs, base):
    """Between requests of `lean` (captured graphs, streams), an unfused LoRA (hooks: a new
    fingerprint), a fused one (weights changed in place), a scale change and the unload all
    give what the `plain` pipeline gives, bit for bit; `base` is lean's result without LoRA."""
    for mode in ("unfused", "fused"):
        manager = LoraManager.for_branch(sd15_components, mode)
        manager.add("style", load_lora(lora_path), scale=0.8)
        try:
            with_lora = lean("a cat", **kwargs).images
            assert torch.equal(with_lora, plain("a cat", **kwargs).images), mode
            assert not torch.equal(with_lora, base), mode
            manager.set_scale("style", 0.3)
            assert torch.equal(lean("a cat", **kwargs).images, plain("a cat", **kwargs).images), mode
        finally:
            manager.clear()
        assert torch.equal(lean("a cat", **kwargs).images, base), mode
