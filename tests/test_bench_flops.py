"""FLOP counts: the full-size numbers of xadapter.md, and a hand computation for the mapping."""

from xa_runtime.bench.flops import mapping_flops, unet_flops, workload_flops
from xa_runtime.models import MappingConfig, get_preset


def test_full_size_counts_match_the_design_table():
    sd15, sdxl = get_preset("sd15").unet, get_preset("sdxl").unet
    assert round(unet_flops(sd15, 1, (64, 64)) / 1e9) == 803
    assert round(unet_flops(sdxl, 1, (128, 128)) / 1e9) == 6761
    assert round(mapping_flops(MappingConfig(), 1, (32, 32)) / 1e9) == 1789
    w = workload_flops(sd15, sdxl, batch=1, cfg=True, steps=30, stage2_steps=27, sd15_latent=(64, 64), sdxl_latent=(128, 128))
    assert round(w.total / 1e12) == 553  # the standard workload of xadapter.md


def test_mapping_flops_by_hand():
    # Every conv: 2 * Cout * Cin * k*k * H_out * W_out (+ nothing for bias in torch's counter).
    c = MappingConfig(in_channels=(8, 4, 4), out_channels=(8, 8, 4))
    h = w = 2

    def conv(cout, cin, k, hh, ww):
        return 2 * cout * cin * k * k * hh * ww

    stage0 = 3 * 2 * conv(8, 8, 3, h, w) + conv(8, 8, 1, h, w)
    stage1 = conv(8, 4, 3, 2 * h, 2 * w) + 3 * 2 * conv(8, 8, 3, 2 * h, 2 * w) + conv(8, 8, 1, 2 * h, 2 * w)
    # transposed conv: counted as the conv it is the adjoint of (input grid 2h x 2w)
    up = conv(4, 4, 3, 2 * h, 2 * w)
    stage2 = up + 3 * 2 * conv(4, 4, 3, 4 * h, 4 * w) + conv(4, 4, 1, 4 * h, 4 * w)
    assert mapping_flops(c, 1, (h, w)) == stage0 + stage1 + stage2
