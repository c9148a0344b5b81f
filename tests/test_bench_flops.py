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


def test_conv_and_attention_by_hand_equal_the_counter():
    """One conv and one (cross-)attention block counted by hand, by the counter on the meta
    device, and by the counter on real CPU tensors (whose SDPA op xa-bench registers)."""
    import torch
    from diffusers.models.attention_processor import Attention

    from xa_runtime.bench.components import flop_counter
    from xa_runtime.bench.flops import count_flops

    b, cin, cout, k, h, w = 2, 3, 8, 3, 16, 12
    conv_hand = 2 * b * cout * cin * k * k * h * w  # stride 1, padding 1: output h x w

    n, m, d_q, d_kv, heads, dim_head = 64, 77, 32, 24, 2, 16
    inner = heads * dim_head
    attn_hand = (
        2 * b * n * d_q * inner  # to_q
        + 2 * 2 * b * m * d_kv * inner  # to_k, to_v
        + 2 * 2 * b * heads * n * m * dim_head  # Q K^T and softmax(.) V
        + 2 * b * n * inner * d_q  # to_out
    )

    def conv():
        torch.nn.Conv2d(cin, cout, k, padding=1)(torch.ones(b, cin, h, w))

    def attention():
        Attention(d_q, cross_attention_dim=d_kv, heads=heads, dim_head=dim_head)(
            torch.ones(b, n, d_q), encoder_hidden_states=torch.ones(b, m, d_kv))

    assert count_flops(conv) == conv_hand
    assert count_flops(attention) == attn_hand
    for fn, hand in ((conv, conv_hand), (attention, attn_hand)):
        with torch.no_grad(), flop_counter() as counter:
            fn()
        assert counter.get_total_flops() == hand


def test_tiny_pipeline_counter_agrees_with_the_analytic_counts(tiny_models):
    """The counter on a real run of the tiny pipeline (per component, per call) against
    flops.py's per-forward counts of the same configs; tolerance 0.1 % (they agree exactly)."""
    from xa_runtime.bench import Workload, efficiency, workload_component_flops
    from xa_runtime.bench.components import compare_with_analytic
    from xa_runtime.pipeline import XAdapterPipeline

    pipe = XAdapterPipeline(*tiny_models, progress=False)
    w = Workload(steps=3, adapter_guidance_start=0.7)  # 3 stage-1 steps, 2 stage-2 steps
    counted = workload_component_flops(pipe, w)
    analytic = efficiency(pipe, w, {}, None)["flops"]
    for name, row in compare_with_analytic(counted, analytic).items():
        assert row["rel_diff"] <= 1e-3, (name, row)
    per = counted["per_component"]
    assert per["stage1/sd15_unet"] == analytic["stage1"]
    assert per["stage2/sd15_unet"] + per["stage2/mapping"] + per["stage2/sdxl_unet"] == analytic["stage2"]
    assert per["vae_decode/sdxl_vae_decode"] > 0 and per["text_encoders/text_encoder"] > 0
