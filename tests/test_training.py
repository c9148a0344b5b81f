"""The training step against the method: step 0 is the new model alone; the loss and the
mapping layers' gradients equal a written-out reference (plain diffusers block calls,
hand-written hooks, functional mapping convs: tests/xa_reference.py); the noised latents
follow the DDPM formula by hand; a tiny captioned set is overfitted on fixed draws."""

import numpy as np
import pytest
import torch

from xa_reference import manual_unet_forward, reference_mapping
from xa_runtime.models.mapping import MappingConfig
from xa_runtime.models.tiny import build_tiny_models
from xa_runtime.testing.training_data import write_webdataset
from xa_runtime.training.data import DataStats, iter_batches, iter_samples, make_buckets, open_source, prepare_row
from xa_runtime.training.options import TrainOptions
from xa_runtime.training.step import TrainableMapping, XAdapterTrainingStep, zero_initialised_mapping

# fp32 on CPU: the reference sums in another order (block by block, F.conv2d), so equal to
# float rounding: relative 1e-4 of the largest gradient entry of a tensor, 1e-5 on the loss.
GRAD_RTOL, LOSS_RTOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    sd15, sdxl, _ = build_tiny_models(0)
    data = write_webdataset(tmp_path_factory.mktemp("data"), 4)
    buckets = make_buckets(128, 64, 32, 64, 2.0)
    bucket, samples = next(iter_batches(iter_samples(open_source(str(data)), 0, 0, DataStats(), 10), buckets, 2))
    rows = [prepare_row(s, bucket) for s in samples]
    step = XAdapterTrainingStep(sd15, sdxl, TrainOptions(), torch.device("cpu"), torch.float32, torch.float32)
    draws = step.draw(len(rows), bucket.new_hw, bucket.old_hw, torch.Generator().manual_seed(3))
    config = MappingConfig.from_unet_configs(sd15.unet.config, sdxl.unet.config)
    return sd15, sdxl, step, rows, draws, config


def test_step_zero_is_the_new_model_alone(setup):
    sd15, sdxl, step, rows, draws, config = setup
    x = step.prepare(rows, draws)
    mapping = TrainableMapping(zero_initialised_mapping(config, 0), checkpointing=False)
    with torch.no_grad():
        ours = step.prediction(x, mapping, step.old_features(x))
        alone = sdxl.unet(x.noisy_new, x.timesteps, x.emb_new,
                          added_cond_kwargs={"text_embeds": x.text_embeds, "time_ids": x.time_ids}).sample
    assert torch.equal(ours, alone)


def test_inputs_follow_the_method_by_hand(setup):
    sd15, sdxl, step, rows, draws, config = setup
    x = step.prepare(rows, draws)
    ac = step.noise_scheduler.alphas_cumprod[draws.timesteps].reshape(-1, 1, 1, 1)
    with torch.no_grad():
        for vae, px, eps, noise, noisy in (
            (sdxl.vae, [r.pixels_new for r in rows], draws.vae_new, draws.noise_new, x.noisy_new),
            (sd15.vae, [r.pixels_old for r in rows], draws.vae_old, draws.noise_old, x.noisy_old),
        ):
            post = vae.encode(torch.from_numpy(np.stack(px))).latent_dist
            latents = (post.mean + post.std * eps) * vae.config.scaling_factor
            torch.testing.assert_close(noisy, ac.sqrt() * latents + (1 - ac).sqrt() * noise, rtol=1e-5, atol=1e-5)
        # null text: the SDXL encoders' empty-prompt embeddings, not zeros; the old model gets the captions
        ids = sdxl.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        empty = sdxl.text_encoder(ids, output_hidden_states=True).hidden_states[-2][0]
        assert torch.equal(x.emb_new[0, :, : empty.shape[-1]], empty) and x.emb_new.abs().sum() > 0
        ids = sd15.tokenizer([r.caption for r in rows], padding="max_length", max_length=77, return_tensors="pt").input_ids
        torch.testing.assert_close(x.emb_old, sd15.text_encoder(ids)[0])
    assert torch.equal(x.target, draws.noise_new) and torch.equal(x.timesteps, draws.timesteps)
    # SDXL's conditioning: original size (96 x 96 source), crop, target = the bucket
    assert x.time_ids[0].tolist() == [96, 96, 0, 0, 128, 128]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_and_mapping_gradients_equal_a_written_out_reference(setup, checkpointing):
    sd15, sdxl, step, rows, draws, config = setup
    x = step.prepare(rows, draws)
    mapping = zero_initialised_mapping(config, 0)
    torch.manual_seed(5)
    for p in mapping.zero_out.parameters():  # nonzero, so that gradients reach every stage's body
        torch.nn.init.normal_(p, std=0.05)
    mapping.requires_grad_(True)
    if checkpointing:
        sdxl.unet.enable_gradient_checkpointing()
    try:
        loss = step.loss(x, TrainableMapping(mapping, checkpointing))
        loss.backward()
    finally:
        sdxl.unet.disable_gradient_checkpointing()

    sd = {k: v.detach().clone().requires_grad_(True) for k, v in mapping.state_dict().items()}
    feats = {}
    with torch.no_grad():
        manual_unet_forward(sd15.unet, x.noisy_old, x.timesteps, x.emb_old,
                            at=lambda name, h: feats.setdefault(name, h))
    residuals = reference_mapping(sd, feats["up1"], feats["up2"], feats["up3"])
    sites = {"mid": residuals[0], "up0": residuals[1], "up1": residuals[2]}
    pred = manual_unet_forward(sdxl.unet, x.noisy_new, x.timesteps, x.emb_new,
                               added_cond_kwargs={"text_embeds": x.text_embeds, "time_ids": x.time_ids},
                               at=lambda name, h: h + sites[name] if name in sites else h)
    ref_loss = ((pred - x.target) ** 2).mean()
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL, atol=0)
    for name, p in mapping.named_parameters():
        ref = sd[name].grad
        assert ref is not None and ref.abs().max() > 0, name
        torch.testing.assert_close(p.grad, ref, rtol=0, atol=GRAD_RTOL * float(ref.abs().max()), msg=name)


def test_only_the_mapping_layers_get_gradients_and_frozen_parts_record_nothing(setup):
    sd15, sdxl, step, rows, draws, config = setup
    x = step.prepare(rows, draws)
    assert not any(t.requires_grad for t in (x.noisy_new, x.noisy_old, x.emb_old, x.emb_new, x.text_embeds))
    feats = step.old_features(x)
    assert not any(f.requires_grad for f in feats)  # the old UNet ran without autograd
    mapping = zero_initialised_mapping(config, 0).requires_grad_(True)
    step.loss(x, TrainableMapping(mapping, True)).backward()
    frozen = [sd15.unet, sd15.vae, sd15.text_encoder, sdxl.unet, sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2]
    assert all(p.grad is None and not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.grad is not None for p in mapping.zero_out.parameters())


def test_overfits_a_tiny_captioned_set_on_fixed_draws(setup):
    # Tiny random UNets cannot predict fresh noise, so "learning" is shown by memorising:
    # one batch, fixed timesteps and noise, 30 AdamW steps (lr 3e-3).
    sd15, sdxl, step, rows, draws, config = setup
    x = step.prepare(rows, draws)
    mapping = zero_initialised_mapping(config, 0).requires_grad_(True)
    module = TrainableMapping(mapping, checkpointing=False)
    optimizer = torch.optim.AdamW(mapping.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = step.loss(x, module)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses
