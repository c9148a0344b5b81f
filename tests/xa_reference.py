"""Independent, written-out references for the tests (no xa_runtime model code used).

- `reference_mapping`: the xadapter.md mapping table as direct conv calls on a state dict.
- `manual_unet_forward`: a diffusers UNet2DConditionModel run block by block, with a
  hook point after the mid block and after each up block, to record or modify them.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def reference_mapping(sd: dict[str, torch.Tensor], f0: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor):
    def conv(x, name, padding=1):
        return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=padding)

    def block(x, i, out_hw=None):
        if f"body.{i}.up_opt.op.weight" in sd:
            # ConvTranspose2d(k=3, s=2, p=1): out = 2*in - 1 + output_padding
            pad = (out_hw[0] - (2 * x.shape[-2] - 1), out_hw[1] - (2 * x.shape[-1] - 1))
            x = F.conv_transpose2d(
                x, sd[f"body.{i}.up_opt.op.weight"], sd[f"body.{i}.up_opt.op.bias"], stride=2, padding=1,
                output_padding=pad,
            )
        if f"body.{i}.in_conv.weight" in sd:
            x = conv(x, f"body.{i}.in_conv")
        return x + conv(torch.relu(conv(x, f"body.{i}.block1")), f"body.{i}.block2")

    out = []
    up_hw = (f0.shape[-2] * 4, f0.shape[-1] * 4)
    for stage, x in enumerate((f0, f1, f2)):
        for j in range(3):
            x = block(x, 3 * stage + j, up_hw if (stage == 2 and j == 0) else None)
        out.append(conv(x, f"zero_out.{stage}", padding=0))
    return tuple(out)


Hook = Callable[[str, torch.Tensor], torch.Tensor]


def manual_unet_forward(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, at: Hook | None = None):
    """UNet forward written out; `at(name, h)` runs after "mid", "up0", "up1", ... and may
    return a replacement for h."""
    at = at or (lambda name, h: h)
    batch = sample.shape[0]
    t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
    emb = unet.time_embedding(unet.time_proj(t).to(sample.dtype))
    if added_cond_kwargs is not None:
        time_emb = unet.add_time_proj(added_cond_kwargs["time_ids"].flatten()).reshape(batch, -1)
        add = torch.cat([added_cond_kwargs["text_embeds"], time_emb], dim=-1).to(emb.dtype)
        emb = emb + unet.add_embedding(add)
    h = unet.conv_in(sample)
    skips = (h,)
    for blk in unet.down_blocks:
        if getattr(blk, "has_cross_attention", False):
            h, res = blk(h, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h, res = blk(h, temb=emb)
        skips += res
    h = at("mid", unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states))
    for i, blk in enumerate(unet.up_blocks):
        res, skips = skips[-len(blk.resnets) :], skips[: -len(blk.resnets)]
        if getattr(blk, "has_cross_attention", False):
            h = blk(h, res, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h = blk(h, res, temb=emb)
        h = at(f"up{i}", h)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
