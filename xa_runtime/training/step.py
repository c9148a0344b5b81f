"""One X-Adapter training step, as the paper describes it (xadapter.md, "Training").

A timestep t shared by both branches; both latents noised to t. The old model (SD1.5) with
the caption gives its decoder features; the mapping layers turn them into residuals; the
new model (SDXL) with null text (its encoders' empty-prompt embeddings and pooled
embedding, for a `null_text_share` of the rows) and the residuals predicts the noise; the
loss is on that prediction. Only the mapping layers get gradients.

`prepare` (encoders, VAEs, noise, the old UNet) runs without autograd; `loss` runs the
mapping layers and the new UNet, whose down and mid blocks record nothing either (no input
of theirs needs a gradient: the residuals enter after the mid block). With gradient
checkpointing the mapping stages and the new UNet's blocks keep only their inputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models.branches import SD15Branch, SDXLBranch
from ..models.components import SD15Components, SDXLComponents
from ..models.mapping import MappingLayers, fit_features
from ..pipeline.text import encode_sd15, encode_sdxl
from .data import BatchRow
from .options import TrainOptions


class TrainableMapping(nn.Module):
    """The mapping layers as the optimizer and DDP see them: forward(f0, f1, f2) -> (r0, r1, r2),
    each stage under activation checkpointing when `checkpointing` (and autograd is on)."""

    def __init__(self, mapping: MappingLayers, checkpointing: bool):
        super().__init__()
        self.mapping, self.checkpointing = mapping, checkpointing

    def forward(self, f0: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not (self.checkpointing and torch.is_grad_enabled()):
            return self.mapping(f0, f1, f2)
        sizes = (None, None, (f0.shape[-2] * 4, f0.shape[-1] * 4))  # as MappingLayers.features
        hidden = [checkpoint(self.mapping.stage, i, f, sizes[i], use_reentrant=False) for i, f in enumerate((f0, f1, f2))]
        return tuple(conv(h) for conv, h in zip(self.mapping.zero_out, hidden))


def zero_initialised_mapping(config, seed: int) -> MappingLayers:
    """Fresh mapping layers (PyTorch's default init, seeded) with `zero_out` at zero, so that
    an untrained adapter leaves the new model unchanged (the release's training start)."""
    torch.manual_seed(seed)
    mapping = MappingLayers(config)
    for p in mapping.zero_out.parameters():
        nn.init.zeros_(p)
    return mapping


@dataclass
class StepInputs:
    """What one step's loss needs, for this process's rows (B = rows)."""

    noisy_old: torch.Tensor  # B x 4 x h x w
    noisy_new: torch.Tensor  # B x 4 x H x W
    timesteps: torch.Tensor  # B (long), shared by both branches
    emb_old: torch.Tensor  # B x 77 x D_old, the caption
    emb_new: torch.Tensor  # B x 77 x D_new, null text (or the caption for 1 - null_text_share of rows)
    text_embeds: torch.Tensor  # B x P, pooled
    time_ids: torch.Tensor  # B x 6
    target: torch.Tensor  # B x 4 x H x W: the noise (epsilon) or v (v_prediction)
    weights: torch.Tensor  # B, per-row loss weights (1 without loss weighting)


@dataclass
class Draws:
    """One global batch's random numbers, drawn in a fixed order on a CPU generator, so that
    every process (taking its rows) and every resume draw the same."""

    timesteps: torch.Tensor
    noise_old: torch.Tensor
    noise_new: torch.Tensor
    vae_old: torch.Tensor
    vae_new: torch.Tensor
    null_text: torch.Tensor  # uniform in [0, 1): a row gets null text when below the share

    def take(self, rows: slice) -> "Draws":
        """The draws of some rows (a process's share of the global batch)."""
        return Draws(*(getattr(self, f)[rows] for f in Draws.__dataclass_fields__))


class XAdapterTrainingStep:
    """The frozen models and the method's step; `mapping` is called by the caller's module
    (a TrainableMapping, possibly wrapped by DDP)."""

    def __init__(self, sd15: SD15Components, sdxl: SDXLComponents, options: TrainOptions, device: torch.device,
                 weight_dtype: torch.dtype, vae_dtype: torch.dtype):
        self.sd15, self.sdxl, self.options = sd15, sdxl, options
        self.device, self.weight_dtype, self.vae_dtype = device, weight_dtype, vae_dtype
        self.old_branch = SD15Branch(sd15.unet)
        self.new_branch = SDXLBranch(sdxl.unet)
        self.noise_scheduler = DDPMScheduler.from_config(
            {k: v for k, v in sdxl.scheduler_config.items() if not k.startswith("_")})
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.naive = False  # the benchmark's baseline: everything under autograd
        with torch.no_grad():
            emb, pooled = encode_sdxl(sdxl, [""], None, 1, False, device)
        self.null_emb, self.null_pooled = emb.to(weight_dtype), pooled.to(weight_dtype)

    def frozen(self):
        """The context the frozen models run in: no autograd (the naive baseline: autograd on)."""
        return contextlib.nullcontext() if self.naive else torch.no_grad()

    def draw(self, n: int, new_hw: tuple[int, int], old_hw: tuple[int, int], generator: torch.Generator) -> Draws:
        """The random numbers of a global batch of `n` rows at these pixel sizes."""
        (hn, wn), (ho, wo) = new_hw, old_hw
        f_new = 2 ** (len(self.sdxl.vae.config.block_out_channels) - 1)
        f_old = 2 ** (len(self.sd15.vae.config.block_out_channels) - 1)
        c = self.sdxl.unet.config.in_channels
        new_shape, old_shape = (n, c, hn // f_new, wn // f_new), (n, c, ho // f_old, wo // f_old)
        g = generator
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=g)
        noise_new = torch.randn(new_shape, generator=g)
        if self.options.noise == "shared":
            # One draw for both: the old model's noise is the new one's average over each
            # 2x2 cell (times 2: unit variance again), at the old latent grid.
            noise_old = F.adaptive_avg_pool2d(noise_new, old_shape[-2:]) * (new_shape[-1] / old_shape[-1])
        else:
            noise_old = torch.randn(old_shape, generator=g)
        vae_new, vae_old = torch.randn(new_shape, generator=g), torch.randn(old_shape, generator=g)
        null_text = torch.rand((n,), generator=g)
        return Draws(timesteps, noise_old, noise_new, vae_old, vae_new, null_text)

    def _latents(self, vae: nn.Module, pixels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        posterior = vae.encode(pixels.to(self.device, next(vae.parameters()).dtype)).latent_dist
        eps = eps.to(posterior.mean.device, posterior.mean.dtype)
        return ((posterior.mean + posterior.std * eps) * vae.config.scaling_factor).to(self.weight_dtype)

    def prepare(self, rows: Sequence[BatchRow], d: Draws) -> StepInputs:
        """Encoders, VAEs and noise for `rows` (this process's rows; `d` taken to the same rows)."""
        dev, dt = self.device, self.weight_dtype
        with self.frozen():
            px_new = torch.from_numpy(np.stack([r.pixels_new for r in rows]))
            px_old = torch.from_numpy(np.stack([r.pixels_old for r in rows]))
            lat_new = self._latents(self.sdxl.vae, px_new, d.vae_new)
            lat_old = self._latents(self.sd15.vae, px_old, d.vae_old)
            captions = [r.caption for r in rows]
            emb_old = encode_sd15(self.sd15, captions, [], 1, False, dev) if not self.naive else \
                _encode_with_grad(encode_sd15, self.sd15, captions, [], 1, False, dev)
            return self._noised(lat_new, lat_old, emb_old.to(dt), captions, [r.time_ids for r in rows], d)

    def prepare_cached(self, rows: Sequence[Any], d: Draws) -> StepInputs:
        """As `prepare`, from cached posteriors and caption embeddings (cache.CachedRow)."""
        dev, dt = self.device, self.weight_dtype
        with torch.no_grad():
            def sample(vae: nn.Module, means: list, stds: list, eps: torch.Tensor) -> torch.Tensor:
                mean, std = torch.stack(means).to(dev), torch.stack(stds).to(dev)
                return ((mean + std * eps.to(dev, mean.dtype)) * vae.config.scaling_factor).to(dt)

            lat_new = sample(self.sdxl.vae, [r.mean_new for r in rows], [r.std_new for r in rows], d.vae_new)
            lat_old = sample(self.sd15.vae, [r.mean_old for r in rows], [r.std_old for r in rows], d.vae_old)
            emb_old = torch.stack([r.emb_old for r in rows]).to(dev, dt)
            return self._noised(lat_new, lat_old, emb_old, [r.caption for r in rows], [r.time_ids for r in rows], d)

    def _noised(self, lat_new: torch.Tensor, lat_old: torch.Tensor, emb_old: torch.Tensor, captions: list[str],
                time_ids: list, d: Draws) -> StepInputs:
        dev, dt = self.device, self.weight_dtype
        n = len(captions)
        emb_new, pooled = self.null_emb.expand(n, -1, -1), self.null_pooled.expand(n, -1)
        use_caption = (d.null_text >= self.options.null_text_share).to(dev)
        if bool(use_caption.any()):
            cap_emb, cap_pooled = encode_sdxl(self.sdxl, captions, None, 1, False, dev)
            emb_new = torch.where(use_caption[:, None, None], cap_emb.to(dt), emb_new)
            pooled = torch.where(use_caption[:, None], cap_pooled.to(dt), pooled)
        t = d.timesteps.to(dev)
        noise_new, noise_old = d.noise_new.to(dev, dt), d.noise_old.to(dev, dt)
        noisy_new = self.noise_scheduler.add_noise(lat_new, noise_new, t)
        noisy_old = self.noise_scheduler.add_noise(lat_old, noise_old, t)
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(lat_new, noise_new, t)
        else:
            target = noise_new
        ids = torch.tensor(time_ids, dtype=dt, device=dev)
        return StepInputs(noisy_old, noisy_new, t, emb_old, emb_new.contiguous(), pooled.contiguous(), ids, target,
                          self.loss_weights(t))

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-row weights: 1, or Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for
        epsilon targets, / (SNR + 1) for v targets."""
        if self.options.loss_weighting == "none":
            return torch.ones(t.shape, device=t.device)
        ac = self.noise_scheduler.alphas_cumprod.to(t.device)[t].float()
        snr = ac / (1 - ac)
        clipped = torch.clamp(snr, max=self.options.snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr

    def old_features(self, x: StepInputs) -> tuple[torch.Tensor, ...]:
        """The old UNet with the caption -> f0, f1, f2 (no autograd)."""
        with self.frozen():
            _, feats = self.old_branch(x.noisy_old, x.timesteps, x.emb_old)
        return feats

    def prediction(self, x: StepInputs, mapping: nn.Module, feats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The new UNet with null text and the mapped residuals -> its prediction (B x 4 x H x W)."""
        residuals = mapping(*fit_features(feats, x.noisy_new.shape[-2:]))
        cond = {"text_embeds": x.text_embeds, "time_ids": x.time_ids}
        return self.new_branch(x.noisy_new, x.timesteps, x.emb_new, cond, residuals=residuals)

    def loss(self, x: StepInputs, mapping: nn.Module) -> torch.Tensor:
        """Mean over rows of weight * MSE(prediction, target), in fp32."""
        pred = self.prediction(x, mapping, self.old_features(x))
        per_row = F.mse_loss(pred.float(), x.target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_row * x.weights).mean()


def _encode_with_grad(fn, *args):
    # encode_sd15 is decorated with no_grad; the naive baseline wants it under autograd
    return fn.__wrapped__(*args) if hasattr(fn, "__wrapped__") else fn(*args)
