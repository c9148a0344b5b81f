"""Branch wrappers: hooks change nothing by themselves, capture the documented features,
and inject exactly r at the three documented places (against a written-out forward)."""

import copy

import pytest
import torch

from xa_runtime.models import build_random_components
from xa_runtime.models.branches import SD15Branch, SDXLBranch, inject_residual
from xa_reference import manual_unet_forward

EXACT = dict(rtol=0, atol=0)
CLOSE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def unets():
    sd15 = build_random_components("tiny-sd15", seed=3).unet
    sdxl = build_random_components("tiny-sdxl", seed=4).unet
    return sd15, sdxl


def _sd15_inputs(batch=2, hw=(8, 8)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, *hw, generator=g), torch.tensor(500), torch.randn(batch, 77, 32, generator=g)


def _sdxl_inputs(batch=2, hw=(16, 16)):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, *hw, generator=g)
    ehs = torch.randn(batch, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * batch)}
    return sample, torch.tensor(500), ehs, added


def _residuals(batch=2, hw=(16, 16), seed=2):
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    return (
        torch.randn(batch, 128, h // 4, w // 4, generator=g),
        torch.randn(batch, 128, h // 2, w // 2, generator=g),
        torch.randn(batch, 64, h, w, generator=g),
    )


@torch.no_grad()
def test_sd15_capture_keeps_output_and_returns_up_block_outputs(unets):
    unet = copy.deepcopy(unets[0])
    stock = copy.deepcopy(unet)
    branch = SD15Branch(unet)
    x, t, ehs = _sd15_inputs()
    noise, feats = branch(x, t, ehs)
    torch.testing.assert_close(noise, stock(x, t, ehs).sample, **EXACT)

    recorded = {}
    manual = manual_unet_forward(stock, x, t, ehs, at=lambda name, h: recorded.setdefault(name, h))
    torch.testing.assert_close(noise, manual, **CLOSE)
    for f, name, shape in zip(feats, ("up1", "up2", "up3"), [(2, 128, 4, 4), (2, 64, 8, 8), (2, 32, 8, 8)]):
        assert tuple(f.shape) == shape
        torch.testing.assert_close(f, recorded[name], **CLOSE)


@torch.no_grad()
def test_sdxl_without_residuals_or_with_zeros_equals_stock(unets):
    unet = copy.deepcopy(unets[1])
    stock = copy.deepcopy(unet)
    branch = SDXLBranch(unet)
    x, t, ehs, added = _sdxl_inputs()
    want = stock(x, t, ehs, added_cond_kwargs=added).sample
    torch.testing.assert_close(branch(x, t, ehs, added), want, **EXACT)
    zeros = tuple(torch.zeros_like(r) for r in _residuals())
    torch.testing.assert_close(branch(x, t, ehs, added, residuals=zeros), want, **EXACT)
    # hooks are inert outside a branch call, and removable
    torch.testing.assert_close(unet(x, t, ehs, added_cond_kwargs=added).sample, want, **EXACT)
    branch.remove_hooks()
    assert not unet.mid_block._forward_hooks


@pytest.mark.parametrize("scale, fusion", [(1.0, None), (0.7, None), (1.3, 0.4)])
@torch.no_grad()
def test_sdxl_injects_exactly_at_documented_places(unets, scale, fusion):
    unet = copy.deepcopy(unets[1])
    stock = copy.deepcopy(unet)
    branch = SDXLBranch(unet)
    x, t, ehs, added = _sdxl_inputs()
    r = _residuals()
    got = branch(x, t, ehs, added, residuals=r, adapter_condition_scale=scale, fusion_guidance_scale=fusion)

    places = {"mid": r[0], "up0": r[1], "up1": r[2]}

    def add(name, h):
        if name not in places:
            return h
        if fusion is None:
            return h + scale * places[name]
        return h + fusion * (scale * places[name] - h)

    want = manual_unet_forward(stock, x, t, ehs, added, at=add)
    torch.testing.assert_close(got, want, **CLOSE)
    assert (got - stock(x, t, ehs, added_cond_kwargs=added).sample).abs().max() > 1e-3


def test_residual_of_wrong_shape_is_a_clear_error(unets):
    branch = SDXLBranch(copy.deepcopy(unets[1]))
    x, t, ehs, added = _sdxl_inputs()
    bad = _residuals(hw=(32, 32))
    with pytest.raises(ValueError, match="cannot be added"):
        branch(x, t, ehs, added, residuals=bad)
    assert branch._pending is None  # nothing left armed after the failure


def test_inject_residual_formula():
    h, r = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(inject_residual(h, r, 2.0), h + 2 * r, **EXACT)
    torch.testing.assert_close(inject_residual(h, r, 2.0, 0.25), h + 0.25 * (2 * r - h), **EXACT)
