"""The plugin contract: merged kwargs reach the SD1.5 UNet in both stages."""

import pytest
import torch

from xa_runtime.pipeline import XAdapterPipeline
from xa_runtime.plugins import merge_unet_kwargs


def test_merge_sums_residuals_and_merges_dicts():
    a = {"down_block_additional_residuals": (torch.ones(1), torch.ones(1)), "mid_block_additional_residual": torch.ones(1),
         "cross_attention_kwargs": {"scale": 0.5}}
    b = {"down_block_additional_residuals": (torch.ones(1) * 2, torch.ones(1) * 3), "mid_block_additional_residual": torch.ones(1),
         "added_cond_kwargs": {"image_embeds": [torch.zeros(1)]}}
    c = {"added_cond_kwargs": {"image_embeds": [torch.ones(1)]}}
    m = merge_unet_kwargs([a, b, c])
    assert [float(x) for x in m["down_block_additional_residuals"]] == [3.0, 4.0]
    assert float(m["mid_block_additional_residual"]) == 2.0
    assert m["cross_attention_kwargs"] == {"scale": 0.5}
    assert len(m["added_cond_kwargs"]["image_embeds"]) == 2
    single = [torch.ones(1)]
    assert merge_unet_kwargs([{"down_intrablock_additional_residuals": single}])["down_intrablock_additional_residuals"] is not single
    with pytest.raises(ValueError, match="timestep_cond"):
        merge_unet_kwargs([{"timestep_cond": 1}, {"timestep_cond": 2}])


class ConstantAdapter:
    """A stand-in T2I-Adapter: constant features for the 4 SD1.5 down blocks, computed once
    per generation (as T2I-Adapter does) and recording calls."""

    name = "constant-adapter"

    def __init__(self, value: float):
        self.value, self.calls = value, []

    def prepare(self, ctx):
        self.rows = ctx.batch * (2 if ctx.cfg else 1)
        h, w = ctx.height // 8, ctx.width // 8
        self.feats = [torch.full((self.rows, c, h >> i, w >> i), self.value) for i, c in enumerate((32, 64, 128, 128))]

    def unet_kwargs(self, ctx, step, sample):
        self.calls.append((step.stage, step.index, step.num_steps))
        assert sample.shape[0] == self.rows
        return {"down_intrablock_additional_residuals": self.feats}


def test_plugin_acts_in_both_stages_and_zero_changes_nothing(tiny_models):
    pipe = XAdapterPipeline(*tiny_models, progress=False)
    kwargs = dict(num_inference_steps=4, adapter_guidance_start=0.5, seed=3, output_type="latent")
    plain = pipe("a cat", **kwargs).images
    zero = ConstantAdapter(0.0)
    torch.testing.assert_close(pipe("a cat", plugins=[zero], **kwargs).images, plain, rtol=0, atol=0)
    assert zero.calls == [("stage1", i, 4) for i in range(4)] + [("stage2", i, 2) for i in range(2)]
    changed = pipe("a cat", plugins=[ConstantAdapter(0.5)], **kwargs).images
    assert (changed - plain).abs().max() > 1e-3


def test_a_plugin_class_can_require_itself_for_a_unet_state(tiny_models):
    """The pipeline asks the plugin contract, not a plugin by name: a class registered with
    requires_plugin is demanded while its required_for(unet) says so."""
    from xa_runtime.errors import ParameterError
    from xa_runtime.plugins import base
    from xa_runtime.plugins.base import requires_plugin

    @requires_plugin
    class MarkerPlugin(ConstantAdapter):
        name = "marker"

        @classmethod
        def required_for(cls, unet):
            return "a MarkerPlugin (the test marked the UNet)" if getattr(unet, "_test_marker", False) else None

    pipe = XAdapterPipeline(*tiny_models, progress=False)
    kwargs = dict(num_inference_steps=2, adapter_guidance_start=1.0, seed=3, output_type="latent")
    pipe("a cat", **kwargs)  # unmarked: nothing required
    pipe.sd15.unet._test_marker = True
    try:
        with pytest.raises(ParameterError, match=r"invalid plugins=\['constant-adapter'\]: a MarkerPlugin \(the test marked"):
            pipe("a cat", plugins=[ConstantAdapter(0.0)], **kwargs)
        pipe("a cat", plugins=[MarkerPlugin(0.0)], **kwargs)
    finally:
        del pipe.sd15.unet._test_marker
        base._REQUIRED.remove(MarkerPlugin)
