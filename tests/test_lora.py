"""LoRA: fused and unfused equal an independent weight edit W + scale * (alpha/rank) * up @ down
(and the conv, LoCon, PEFT, LoHa, LoKr variants); several LoRAs add; removal restores the base
bit for bit; original-layout names; wrong base, unmatched keys and unsupported variants."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xa_runtime.errors import CheckpointError, ParameterError
from xa_runtime.models import MappingConfig, MappingLayers, build_random_components
from xa_runtime.pipeline import XAdapterPipeline
from xa_runtime.plugins.lora import (
    LoraManager,
    load_lora,
    lora_delta,
    module_index,
    parse_lora,
    parse_lora_argument,
)
from xa_runtime.testing import write_random_lora

# fp32 on the CPU: a weight edit vs the same edit computed elsewhere (fused) or a low-rank
# side path (unfused) differ by summation order only.
CLOSE = dict(rtol=1e-5, atol=1e-5)
EXACT = dict(rtol=0, atol=0)


@pytest.fixture(scope="module")
def models():
    sd15 = build_random_components("tiny-sd15", 7)
    sdxl = build_random_components("tiny-sdxl", 8)
    torch.manual_seed(9)
    mapping = MappingLayers(MappingConfig.from_unet_configs(sd15.unet.config, sdxl.unet.config))
    for p in mapping.zero_out.parameters():  # zero-initialised in the release: make the adapter act
        torch.nn.init.normal_(p, std=0.05)
    return sd15, sdxl, mapping.eval().requires_grad_(False)


def _unet_call(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = unet.config.sample_size
    x = torch.randn(2, 4, n, n, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.ones(2, 6)}
    return lambda: unet(x, torch.tensor(400), ctx, **kwargs).sample


def _metadata(path):
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    return json.loads(raw) if raw else {}


def _edited_by_hand(model, state, scale, target="unet", metadata=None):
    """The reference: a copy of `model` with each adapted weight W += scale * alpha/r * (change),
    keys read here independently of the library (kohya, PEFT, old diffusers, LoHa, LoKr)."""
    ref = copy.deepcopy(model)
    dotted = dict(ref.named_modules())
    if target != "unet" and not hasattr(ref, "text_model"):  # transformers 5 flattened CLIPTextModel
        dotted = {f"text_model.{n}": m for n, m in dotted.items()}
    flat = {n.replace(".", "_"): m for n, m in dotted.items()}
    kohya = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}[target]
    old_proj = {"to_q_lora": ("to_q", "q_proj"), "to_k_lora": ("to_k", "k_proj"), "to_v_lora": ("to_v", "v_proj"),
                "to_out_lora": ("to_out.0", "out_proj")}
    for key in state:
        stem, part = key.split(".", 1) if key.startswith("lora_") else (None, None)
        if stem is not None and stem.startswith(kohya):
            module = flat[stem.split("_", 2)[2]]  # lora_unet_x, lora_te_x, lora_te1_x -> x
            alpha = float(state[stem + ".alpha"])
            if part == "lora_down.weight":
                down, up = state[key], state[stem + ".lora_up.weight"]
                r, change = down.shape[0], up.flatten(1) @ down.flatten(1)
            elif part == "hada_w1_a":
                w1a, w1b, w2a, w2b = (state[f"{stem}.hada_{n}"] for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
                r, change = w1b.shape[0], (w1a @ w1b) * (w2a @ w2b)
            elif part == "lokr_w1":
                w1, w2a, w2b = state[key], state[stem + ".lokr_w2_a"], state[stem + ".lokr_w2_b"]
                w = module.weight
                w2 = (w2a @ w2b).reshape(w.shape[0] // w1.shape[0], w.shape[1] // w1.shape[1], *w.shape[2:])
                r, change = w2a.shape[1], torch.kron(w1.reshape(*w1.shape, *[1] * (w.dim() - 2)), w2)
            else:
                continue
        elif key.startswith(target + ".") and key.endswith(".lora_A.weight"):  # PEFT
            name = key[len(target) + 1:-len(".lora_A.weight")]
            module = dotted[name]
            down, up = state[key], state[key.replace("lora_A", "lora_B")]
            alpha = metadata[f"{target}.lora_alpha"] if metadata else down.shape[0]
            r, change = down.shape[0], up.flatten(1) @ down.flatten(1)
        elif key.endswith(".down.weight") and (target == "unet") != key.startswith("text_encoder"):  # old diffusers
            body = key[:-len(".down.weight")].removeprefix(target + ".") if target != "unet" else key[:-len(".down.weight")]
            head, _, last = body.rpartition(".")
            if last in old_proj:
                name = head.removesuffix(".processor") + "." + old_proj[last][0 if target == "unet" else 1]
            else:
                name = head if last in ("lora", "lora_linear_layer") else body
            module = dotted[name]
            down, up = state[key], state[key.replace(".down.weight", ".up.weight")]
            r, alpha, change = down.shape[0], down.shape[0], up.flatten(1) @ down.flatten(1)
        else:
            continue
        with torch.no_grad():
            module.weight += scale * alpha / r * change.reshape(module.weight.shape)
    return ref


@pytest.mark.parametrize("mode", ["fused", "unfused"])
@pytest.mark.parametrize("fmt, conv, suffix", [
    ("kohya", True, ".safetensors"),     # linear + 1x1 conv + 3x3 LoCon + strided sampler convs
    ("kohya", False, ".pt"),              # linear only, a weights-only pickle
    ("peft", True, ".safetensors"),       # lora_A / lora_B, alpha from diffusers' metadata
    ("diffusers-old", True, ".bin"),      # attention processors and .lora.down, no alpha
    ("loha", True, ".safetensors"),
    ("lokr", True, ".safetensors"),
])
def test_lora_equals_hand_edited_weights_and_unloads_exactly(models, tmp_path, mode, fmt, conv, suffix):
    sd15 = models[0]
    path = write_random_lora(tmp_path / f"l{suffix}", sd15.unet, sd15.text_encoder, fmt=fmt, conv=conv)
    state = load_file(path) if suffix == ".safetensors" else torch.load(path, weights_only=True)
    if conv and fmt == "kohya":  # the file really holds 3x3 LoCon and 1x1 conv layers
        shapes = {tuple(v.shape[-2:]) for k, v in state.items() if "lora_down" in k and v.dim() == 4}
        assert shapes == {(3, 3), (1, 1)}
    meta = _metadata(path) if suffix == ".safetensors" else None
    run = _unet_call(sd15.unet)
    base = run()
    want = _unet_call(_edited_by_hand(sd15.unet, state, 0.8, metadata=meta))()  # copied before the LoRA is added
    manager = LoraManager.for_branch(sd15, mode)
    assert manager.add("style", load_lora(path), scale=0.8) == []
    got = run()
    torch.testing.assert_close(got, want, **CLOSE)
    assert (got - base).abs().max() > 1e-3
    manager.remove("style")
    torch.testing.assert_close(run(), base, **EXACT)
    assert not sd15.unet._forward_hooks and all(not m._forward_hooks for m in sd15.unet.modules())


@pytest.mark.parametrize("mode", ["fused", "unfused"])
def test_sdxl_lora_on_both_text_encoders_and_unet(models, tmp_path, mode):
    sdxl = models[1]
    path = write_random_lora(tmp_path / "xl.safetensors", sdxl.unet, sdxl.text_encoder,
                             text_encoder_2=sdxl.text_encoder_2, std=0.3)
    state = load_file(path)
    # the names real files carry, whichever way transformers nests CLIPTextModel
    assert {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"} <= set(state)
    ids = sdxl.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    encoders = {"text_encoder": sdxl.text_encoder, "text_encoder_2": sdxl.text_encoder_2}
    base = {t: m(ids)[0] for t, m in encoders.items()}
    want = {t: _edited_by_hand(m, state, 0.5, target=t)(ids)[0] for t, m in encoders.items()}
    run = _unet_call(sdxl.unet)
    base_unet, want_unet = run(), _unet_call(_edited_by_hand(sdxl.unet, state, 0.5))()
    lora = load_lora(path)
    assert lora.base == "sdxl" and "lora_te1_" in lora.base_evidence
    manager = LoraManager.for_branch(sdxl, mode)
    manager.add("xl", lora, 0.5)
    for t, m in encoders.items():
        got = m(ids)[0]
        torch.testing.assert_close(got, want[t], **CLOSE)
        assert (got - base[t]).abs().max() > 1e-3, t
    torch.testing.assert_close(run(), want_unet, **CLOSE)
    manager.clear()
    for t, m in encoders.items():
        torch.testing.assert_close(m(ids)[0], base[t], **EXACT)
    torch.testing.assert_close(run(), base_unet, **EXACT)


def test_sd15_text_encoder_lora_changes_embeddings(models, tmp_path):
    sd15 = models[0]
    path = write_random_lora(tmp_path / "te.safetensors", sd15.unet, sd15.text_encoder, std=0.3)
    ids = sd15.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    base = sd15.text_encoder(ids)[0]
    m = LoraManager.for_branch(sd15, "unfused")
    m.add("x", load_lora(path))
    assert (sd15.text_encoder(ids)[0] - base).abs().max() > 1e-3
    m.remove("x")
    torch.testing.assert_close(sd15.text_encoder(ids)[0], base, **EXACT)


def test_two_loras_add_scales_change_and_modes_switch(models, tmp_path):
    sd15 = models[0]
    a = write_random_lora(tmp_path / "a.safetensors", sd15.unet, seed=1)
    b = write_random_lora(tmp_path / "b.safetensors", sd15.unet, seed=2, fmt="peft")
    run = _unet_call(sd15.unet)
    base = run()
    base_weights = {f"unet.{k}": v.clone() for k, v in sd15.unet.state_dict().items()}
    only_b = _unet_call(_edited_by_hand(sd15.unet, load_file(b), 1.5, metadata=_metadata(b)))()
    both = _unet_call(_edited_by_hand(_edited_by_hand(sd15.unet, load_file(a), 0.5), load_file(b), 1.5,
                                      metadata=_metadata(b)))()
    for mode in ("fused", "unfused"):
        m = LoraManager.for_branch(sd15, mode)
        m.add("a", load_lora(a), 1.0)
        m.add("b", load_lora(b), 1.5)
        m.set_scale("a", 0.5)
        assert m.scales == {"a": 0.5, "b": 1.5}
        torch.testing.assert_close(run(), both, **CLOSE)
        m.unfuse() if mode == "fused" else m.fuse()  # the other mode, same LoRAs
        torch.testing.assert_close(run(), both, **CLOSE)
        if m.mode == "fused":  # what an engine refit would add to the original weights
            deltas = m.weight_deltas()
            assert "unet.down_blocks.0.resnets.0.conv1.weight" in deltas
            for key, delta in deltas.items():
                w = sd15.unet.get_submodule(key[len("unet."):-len(".weight")]).weight
                original = base_weights[key]
                torch.testing.assert_close(original + delta, w, **CLOSE)
        m.set_scale("a", 0.0)
        torch.testing.assert_close(run(), only_b, **CLOSE)
        m.remove("a")
        torch.testing.assert_close(run(), only_b, **CLOSE)
        m.clear()
        torch.testing.assert_close(run(), base, **EXACT)


def test_original_layout_names_resolve_like_diffusers_names(models, tmp_path):
    sd15, sdxl, _ = models
    for comp in (sd15, sdxl):
        run = _unet_call(comp.unet)
        outs = []
        for fmt in ("kohya", "kohya-ldm"):  # same seed: same tensors under two namings
            path = write_random_lora(tmp_path / f"{fmt}.safetensors", comp.unet, fmt=fmt, seed=3)
            m = LoraManager.for_branch(comp, "fused")
            m.add(fmt, load_lora(path))
            outs.append(run())
            m.clear()
        torch.testing.assert_close(outs[0], outs[1], **EXACT)
    # names written out (SD1.5 layout: 2 resnets per down stage, upsampler after the attention)
    index = module_index(sd15.unet)
    modules = dict(sd15.unet.named_modules())
    for ldm, name in {"input_blocks_1_1_transformer_blocks_0_attn2_to_k": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                      "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
                      "input_blocks_4_0_in_layers_2": "down_blocks.1.resnets.0.conv1",
                      "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
                      "middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
                      "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
                      "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
                      "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
                      "output_blocks_4_1_proj_out": "up_blocks.1.attentions.1.proj_out",
                      "time_embed_0": "time_embedding.linear_1", "out_2": "conv_out"}.items():
        assert index[ldm] is modules[name], ldm


def test_sdxl_original_layout_names_match_diffusers_conversion(models, tmp_path):
    # diffusers' own kohya-SDXL conversion is the independent reference for the SDXL layout
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    sdxl = models[1]
    state = load_file(write_random_lora(tmp_path / "x.safetensors", sdxl.unet, fmt="kohya-ldm"))
    lora = parse_lora(state)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(dict(state), sdxl.unet.config))
    by_tensor = {id(v): k for k, v in convert_unet_state_dict_to_peft(converted).items()}
    modules, index = dict(sdxl.unet.named_modules()), module_index(sdxl.unet)
    assert any(layer.module.startswith("input_blocks_") for layer in lora.layers)
    for layer in lora.layers:
        name = by_tensor[id(layer.factors["down"])].removeprefix("unet.").removesuffix(".lora_A.weight")
        assert index[layer.module] is modules[name], layer.stem


def test_lora_delta_written_out():
    down = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])  # r=2 x C=3
    up = torch.tensor([[1.0, 0.0], [2.0, 1.0]])               # O=2 x r=2
    want = torch.tensor([[1.0, 2.0, 3.0], [2.0, 3.0, 6.5]]) * 0.5 * (4.0 / 2)
    torch.testing.assert_close(lora_delta(down, up, 4.0, 0.5, (2, 3)), want, **EXACT)
    torch.testing.assert_close(lora_delta(down, up, None, 1.0, (2, 3)), want / 1.0, **EXACT)  # alpha None: alpha = r
    g = torch.Generator().manual_seed(0)
    d3, u3 = torch.randn(4, 5, 3, 3, generator=g).half(), torch.randn(6, 4, 1, 1, generator=g).half()
    before = d3.clone(), u3.clone()
    got = lora_delta(d3, u3, 2.0, 1.5, (6, 5, 3, 3))  # LoCon: r x C x 3 x 3 and O x r x 1 x 1
    want3 = 1.5 * 2.0 / 4 * torch.einsum("or,rchw->ochw", u3[:, :, 0, 0].float(), d3.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want3, rtol=1e-6, atol=1e-6)
    assert torch.equal(d3, before[0]) and torch.equal(u3, before[1])


def test_wrong_base_is_refused_naming_what_was_found(models, tmp_path):
    sd15, sdxl, _ = models
    xl = load_lora(write_random_lora(tmp_path / "xl.safetensors", sdxl.unet, sdxl.text_encoder,
                                     text_encoder_2=sdxl.text_encoder_2))
    with pytest.raises(ParameterError, match="sdxl LoRA: keys of SDXL's two text encoders"):
        LoraManager.for_branch(sd15).add("x", xl)
    # full-size widths tell the base without a model: cross-attention context 2048 / 768 / 1024
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    for width, base in ((2048, "sdxl"), (768, "sd15"), (1024, "sd2")):
        lora = parse_lora({f"{key}.lora_down.weight": torch.zeros(4, width), f"{key}.lora_up.weight": torch.zeros(640, 4)})
        assert lora.base == base and str(width) in lora.base_evidence
    with pytest.raises(ParameterError, match="it is a sd2 LoRA: cross-attention context width 1024"):
        LoraManager.for_branch(sdxl).add("x", lora)
    # tiny models: the block layout tells
    xl_unet = load_lora(write_random_lora(tmp_path / "xlu.safetensors", sdxl.unet, fmt="kohya-ldm"))
    assert xl_unet.base == "sdxl" and "transformer_blocks_1" in xl_unet.base_evidence
    sd_unet = load_lora(write_random_lora(tmp_path / "sdu.safetensors", sd15.unet, fmt="peft"))
    assert sd_unet.base == "sd15" and "SD1.x" in sd_unet.base_evidence
    with pytest.raises(ParameterError, match="it is a sd15 LoRA: a block only the SD1.x UNet has"):
        LoraManager.for_branch(sdxl).add("x", sd_unet)
    # nothing tells (one layer both layouts have): the shapes refuse it
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    k_width = sdxl.unet.config.cross_attention_dim
    untold = parse_lora({f"{key}.lora_A.weight": torch.zeros(4, k_width), f"{key}.lora_B.weight": torch.zeros(64, 4)})
    assert untold.base is None
    with pytest.raises(ParameterError, match=r"changes a 64 x 64 weight, the model's weight is \(64, 32\)"):
        LoraManager.for_branch(sd15).add("x", untold)


def test_unmatched_keys_are_reported(models, tmp_path):
    sd15 = models[0]
    state = load_file(write_random_lora(tmp_path / "s.safetensors", sd15.unet))
    state["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(4, 8)
    state["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(8, 4)
    state["some_training_step_counter"] = torch.tensor(3)
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.warns(UserWarning, match="1 keys are no LoRA weights"):
        lora = load_lora(tmp_path / "extra.safetensors")
    m = LoraManager.for_branch(sd15)
    with pytest.warns(UserWarning, match=r"1 LoRA layers match no module .*lora_unet_no_such_block_to_q"):
        reported = m.add("x", lora)
    assert reported == lora.unmatched == ["some_training_step_counter", "lora_unet_no_such_block_to_q"]
    m.clear()
    nothing = {"lora_unet_nowhere.lora_down.weight": torch.zeros(4, 8), "lora_unet_nowhere.lora_up.weight": torch.zeros(8, 4)}
    with pytest.raises(ParameterError, match="none of its 1 layers matched"):
        LoraManager.for_branch(sd15).add("x", parse_lora(nothing))


@pytest.mark.parametrize("key, match", [
    ("lora_unet_a.hada_t1", "unsupported LoRA variant: LoHa with Tucker cores"),
    ("lora_unet_a.lora_mid.weight", "unsupported LoRA variant: LoCon with a Tucker core"),
    ("lora_unet_a.dora_scale", "unsupported LoRA variant: DoRA"),
    ("unet.a.lora_magnitude_vector", "unsupported LoRA variant: DoRA"),
    ("lora_te_a.oft_blocks", "unsupported LoRA variant: OFT"),
])
def test_unsupported_variants_are_refused_by_name(key, match):
    with pytest.raises(CheckpointError, match=match) as e:
        parse_lora({key: torch.zeros(1), "lora_unet_a.lora_down.weight": torch.zeros(1, 1)})
    assert key in str(e.value)


def test_broken_files_and_arguments(models, tmp_path):
    sd15 = models[0]
    with pytest.raises(CheckpointError, match="missing factors: .*lora_unet_a"):
        parse_lora({"lora_unet_a.lora_down.weight": torch.zeros(4, 8)})
    with pytest.raises(CheckpointError, match="no LoRA keys found"):
        parse_lora({"model.diffusion_model.out.2.weight": torch.zeros(1)})
    with pytest.raises(ParameterError, match="lora_mode"):
        LoraManager.for_branch(sd15, "merged")
    m = LoraManager.for_branch(sd15)
    m.add("a", load_lora(write_random_lora(tmp_path / "a.safetensors", sd15.unet)))
    with pytest.raises(ParameterError, match="one LoraManager per model"):
        LoraManager.for_branch(sd15)
    with pytest.raises(ParameterError, match="lora scale"):
        m.set_scale("a", float("nan"))
    with pytest.raises(ParameterError, match="one of the active LoRAs: \\['a'\\]"):
        m.remove("b")
    m.clear()
    LoraManager.for_branch(sd15)  # free again once the other manager holds nothing


def test_peft_config_alphas():
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    state = {f"{key}.{p}.lora_{ab}.weight": torch.zeros(4, 4) for p in ("to_q", "to_k") for ab in "AB"}
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_q": 2}}
    alphas = {layer.module.rsplit(".", 1)[1]: layer.alpha for layer in parse_lora(state, config).layers}
    assert alphas == {"to_q": 2.0, "to_k": 8.0}
    rs = parse_lora(state, {**config, "unet.use_rslora": True}).layers[1]  # alpha / sqrt(r) as alpha' / r
    assert rs.alpha / rs.rank == pytest.approx(8 / 4 ** 0.5)
    assert all(layer.alpha is None for layer in parse_lora(state).layers)  # no config: alpha = rank


def test_parse_lora_argument():
    assert parse_lora_argument("a/b.safetensors:0.7") == ("a/b.safetensors", 0.7)
    assert parse_lora_argument("c:/x/b.safetensors") == ("c:/x/b.safetensors", 1.0)
    assert parse_lora_argument("b.safetensors") == ("b.safetensors", 1.0)


@pytest.mark.parametrize("mode", ["fused", "unfused"])
def test_generation_changes_with_each_branch_lora_and_returns_exactly(models, tmp_path, mode):
    sd15, sdxl, mapping = models
    pipe = XAdapterPipeline(sd15, sdxl, mapping, progress=False)
    kw = dict(num_inference_steps=3, adapter_guidance_start=1.0, seed=4, output_type="latent")
    base = pipe("a cat", **kw).images
    l15 = write_random_lora(tmp_path / "a.safetensors", sd15.unet, sd15.text_encoder, std=0.2)
    lxl = write_random_lora(tmp_path / "b.safetensors", sdxl.unet, sdxl.text_encoder,
                            text_encoder_2=sdxl.text_encoder_2, std=0.2, fmt="peft")
    m15, mxl = LoraManager.for_branch(sd15, mode), LoraManager.for_branch(sdxl, mode)
    m15.add("a", load_lora(l15))
    with_sd15 = pipe("a cat", **kw).images
    m15.clear()
    mxl.add("b", load_lora(lxl))
    with_sdxl = pipe("a cat", **kw).images
    assert (with_sd15 - base).abs().max() > 1e-3 and (with_sdxl - base).abs().max() > 1e-3
    mxl.clear()
    torch.testing.assert_close(pipe("a cat", **kw).images, base, **EXACT)


def test_each_plugin_family_with_an_sdxl_lora(models, tmp_path):
    from xa_runtime.plugins import (
        ControlNetPlugin,
        IPAdapterPlugin,
        T2IAdapterPlugin,
        load_image_encoder,
        load_ip_adapter,
    )
    from xa_runtime.plugins.controlnet import build_tiny_controlnet
    from xa_runtime.testing import write_tiny_image_encoder, write_tiny_ip_adapter
    from xa_runtime.plugins.nexus import NexusAdapterPlugin, build_tiny_nexus
    from xa_runtime.plugins.t2i_adapter import build_tiny_t2i_adapter

    sd15, sdxl, mapping = models
    pipe = XAdapterPipeline(sd15, sdxl, mapping, progress=False)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    controlnet = build_tiny_controlnet(sd15.unet)  # from the plain UNet, before the IP-Adapter is installed
    t2i, nexus = build_tiny_t2i_adapter(sd15.unet, "full_adapter", 0), build_tiny_nexus(sd15.unet)
    ip = load_ip_adapter(write_tiny_ip_adapter(tmp_path, sd15.unet)["safetensors"], sd15.unet)
    encoder = load_image_encoder(write_tiny_image_encoder(tmp_path / "enc"))
    families = {
        "controlnet": lambda: ControlNetPlugin(controlnet, image),
        "t2i": lambda: T2IAdapterPlugin(t2i, image),
        "nexus": lambda: NexusAdapterPlugin(nexus, image),
        "ip-adapter": lambda: IPAdapterPlugin(ip, encoder, image),
    }
    lxl = load_lora(write_random_lora(tmp_path / "xl.safetensors", sdxl.unet, std=0.2))
    kw = dict(num_inference_steps=3, adapter_guidance_start=1.0, seed=4, output_type="latent")
    try:
        for name, make in families.items():
            # the installed IP-Adapter needs its plugin in every call; at scale 0 it adds nothing
            plugins = [make()] + ([IPAdapterPlugin(ip, encoder, image, scale=0.0)] if name != "ip-adapter" else [])
            plain = pipe("a cat", plugins=plugins, **kw).images
            m = LoraManager.for_branch(sdxl, "fused")
            m.add("xl", lxl)
            with_lora = pipe("a cat", plugins=plugins, **kw).images
            m.clear()
            assert (with_lora - plain).abs().max() > 1e-3, name
    finally:
        ip.unload()
