"""Mapping layers: equal to the written-out xadapter.md table; channel derivation."""

import pytest
import torch

from xa_runtime.models import MappingConfig, MappingLayers, get_preset
from xa_runtime.models.mapping import MappingConfig as MC
from xa_reference import reference_mapping


def _random_mapping(config: MappingConfig, seed: int = 0) -> MappingLayers:
    torch.manual_seed(seed)
    m = MappingLayers(config)
    for p in m.parameters():  # zero_out is zero-initialised in training: make it count here
        torch.nn.init.normal_(p, std=0.05)
    return m.eval()


@pytest.mark.parametrize(
    "widths, f0_hw",
    [
        (((128, 64, 32), (128, 128, 64)), (4, 4)),  # the tiny models' widths
        (((48, 32, 16), (40, 40, 24)), (3, 5)),  # odd, non-square grid
        (((16, 16, 16), (16, 16, 16)), (2, 2)),  # equal widths: no in_conv anywhere
    ],
)
def test_mapping_equals_written_out_reference(widths, f0_hw):
    config = MappingConfig(*widths)
    m = _random_mapping(config)
    h, w = f0_hw
    torch.manual_seed(1)
    f0 = torch.randn(2, config.in_channels[0], h, w)
    f1 = torch.randn(2, config.in_channels[1], 2 * h, 2 * w)
    f2 = torch.randn(2, config.in_channels[2], 2 * h, 2 * w)
    with torch.no_grad():
        got = m(f0, f1, f2)
    want = reference_mapping(m.state_dict(), f0, f1, f2)
    expected_shapes = [
        (2, config.out_channels[0], h, w),
        (2, config.out_channels[1], 2 * h, 2 * w),
        (2, config.out_channels[2], 4 * h, 4 * w),
    ]
    for g, r, shape in zip(got, want, expected_shapes):
        assert tuple(g.shape) == shape
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        assert g.abs().max() > 1e-3  # the test compares real signal, not zeros


def test_channels_derived_from_unet_configs():
    full = MappingConfig.from_unet_configs(get_preset("sd15").unet, get_preset("sdxl").unet)
    assert full == MC((1280, 640, 320), (1280, 1280, 640))
    tiny = MappingConfig.from_unet_configs(get_preset("tiny-sd15").unet, get_preset("tiny-sdxl").unet)
    assert tiny == MC((128, 64, 32), (128, 128, 64))


def test_wrong_unet_topology_is_rejected():
    with pytest.raises(ValueError, match="4 stages"):
        MappingConfig.from_unet_configs(get_preset("sdxl").unet, get_preset("sdxl").unet)


def test_full_size_parameter_count():
    with torch.device("meta"):
        m = MappingLayers()
    assert sum(p.numel() for p in m.parameters()) == 212_914_240
    assert len(m.state_dict()) == 48


@pytest.mark.parametrize("config", [MappingConfig(), MappingConfig((128, 64, 32), (128, 128, 64)),
                                    MappingConfig((32, 16, 8), (32, 32, 16), blocks_per_stage=2)])
def test_config_read_off_a_state_dict(config):
    state = MappingLayers(config).state_dict()
    assert MappingConfig.from_state_dict(state) == config


def test_config_of_a_foreign_state_dict_is_refused(tmp_path):
    from safetensors.torch import save_file

    from xa_runtime.errors import CheckpointError
    from xa_runtime.loading import load_mapping

    with pytest.raises(ValueError, match="not an X-Adapter mapping checkpoint"):
        MappingConfig.from_state_dict({"conv_in.weight": torch.zeros(1)})
    path = tmp_path / "unet.safetensors"
    save_file({"body.0.block1.weight": torch.zeros(4, 4, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="unet.safetensors: not an X-Adapter mapping checkpoint"):
        load_mapping(path)
    tiny = MappingLayers(MappingConfig((32, 16, 8), (32, 32, 16)))
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, path)
    loaded = load_mapping(path)  # widths read off the file
    assert loaded.config == tiny.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny.state_dict().values()))
