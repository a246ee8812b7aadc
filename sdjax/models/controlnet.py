"""ControlNet for SD 1.x / 2.x (diffusers ``ControlNetModel``), NHWC.

A copy of the U-Net's encoder half (time embedding, ``conv_in``, down blocks, mid block) whose input is the
latent plus an embedding of the conditioning image; each skip connection and the mid block's output pass
through a 1x1 "zero" convolution and become residuals the U-Net adds to its own (``down_block_additional_residuals``,
``mid_block_additional_residual``). Submodules carry diffusers' state-dict names, so weights convert with
``sdjax.layouts.diffusers``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from sdjax.config import ControlNetConfig
from sdjax.models.layers import Dtype, TimestepEmbedding, conv, timestep_embedding
from sdjax.models.unet import UNetDownBlock, UNetMidBlock2DCrossAttn


class ControlNetConditioningEmbedding(nn.Module):
    """Conditioning image -> latent-sized features: conv_in, then (conv, stride-2 conv) per level, conv_out;
    SiLU after every convolution but the last."""

    channels: Sequence[int]
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        dt, pdt, channels = self.dtype, self.param_dtype, self.channels
        x = nn.silu(conv(channels[0], 3, dt, pdt, "conv_in")(image))
        for level in range(len(channels) - 1):
            x = nn.silu(conv(channels[level], 3, dt, pdt, f"blocks_{2 * level}")(x))
            x = nn.silu(conv(channels[level + 1], 3, dt, pdt, f"blocks_{2 * level + 1}", stride=2)(x))
        return conv(self.out_channels, 3, dt, pdt, "conv_out")(x)


def _per_image(value, batch: int, dtype) -> jax.Array:
    """A scalar or (batch,) knob as (batch, 1, 1, 1), so it scales NHWC residuals image by image."""
    value = jnp.asarray(value, dtype)
    if value.ndim > 1 or value.size not in (1, batch):
        raise ValueError(f"per-image ControlNet knobs must be a scalar or shaped ({batch},); got {value.shape}")
    return jnp.broadcast_to(jnp.reshape(value, (-1,)), (batch,))[:, None, None, None]


class ControlNetModel(nn.Module):
    """``__call__(sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
    guess_mode=False)``.

    sample (B, h, w, in_channels) latents; timesteps a scalar or (B,); encoder_hidden_states
    (B, L, cross_attention_dim); controlnet_cond (B, h * f, w * f, conditioning_channels) with f =
    ``cond_downsample_factor`` (8 for released models), values as the ControlNet was trained (images in [0, 1]).
    ``conditioning_scale`` and ``guess_mode`` may be traced scalars or per-image (B,) arrays. Guess mode weights
    the down residuals from 0.1 up to 1 on a log scale (the mid residual gets 1), as diffusers does, except for
    ``global_pool_conditions`` models, which ignore it. Returns (tuple of down residuals, mid residual), one per
    U-Net skip connection.
    """

    config: ControlNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: Optional[str] = None

    @property
    def cond_downsample_factor(self) -> int:
        return 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)

    def _check_inputs(self, sample, context, cond) -> None:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"ControlNet sample must be NHWC with {cfg.in_channels} channels; "
                             f"got shape {sample.shape}")
        if context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states must be (batch, tokens, {cfg.cross_attention_dim}); "
                             f"got shape {context.shape}")
        factor = self.cond_downsample_factor
        batch, height, width = sample.shape[:3]
        expected = (batch, height * factor, width * factor, cfg.conditioning_channels)
        if tuple(cond.shape) != expected:
            raise ValueError(f"controlnet_cond must be NHWC {expected} ({factor}x the latent size, "
                             f"{cfg.conditioning_channels} channels); got shape {tuple(cond.shape)}")

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        conditioning_scale=1.0,
        guess_mode=False,
    ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        cfg, dt, pdt, impl = self.config, self.dtype, self.param_dtype, self.attention_implementation
        self._check_inputs(sample, encoder_hidden_states, controlnet_cond)
        unet_cfg = cfg.unet_config()
        batch = sample.shape[0]
        heads = cfg.heads_per_block()
        channels = cfg.block_out_channels
        context = encoder_hidden_states.astype(dt)
        cond = controlnet_cond.astype(dt)
        if cfg.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]

        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))
        t_emb = timestep_embedding(t, channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                   downscale_freq_shift=cfg.freq_shift)
        # SDXL ControlNets (issue #17) add their text-time embedding to temb here.
        temb = TimestepEmbedding(4 * channels[0], dt, pdt, name="time_embedding")(t_emb)

        x = conv(channels[0], 3, dt, pdt, "conv_in")(sample.astype(dt))
        x = x + ControlNetConditioningEmbedding(
            cfg.conditioning_embedding_out_channels, channels[0], dt, pdt, name="controlnet_cond_embedding"
        )(cond)
        skips = [x]
        for i, block_type in enumerate(cfg.down_block_types):
            x, block_skips = UNetDownBlock(
                unet_cfg, channels[i], heads[i], with_attention=block_type == "CrossAttnDownBlock2D",
                add_downsample=i < len(channels) - 1, attention_implementation=impl, dtype=dt, param_dtype=pdt,
                name=f"down_blocks_{i}",
            )(x, temb, context)
            skips.extend(block_skips)
        x = UNetMidBlock2DCrossAttn(unet_cfg, heads[-1], impl, dt, pdt, name="mid_block")(x, temb, context)

        down = [conv(s.shape[-1], 1, dt, pdt, f"controlnet_down_blocks_{n}")(s) for n, s in enumerate(skips)]
        mid = conv(x.shape[-1], 1, dt, pdt, "controlnet_mid_block")(x)

        scale = _per_image(conditioning_scale, batch, jnp.float32)
        if cfg.global_pool_conditions:
            weights = [scale] * len(down)
        else:
            ramp = jnp.logspace(-1.0, 0.0, len(down) + 1, dtype=jnp.float32)
            guess = _per_image(guess_mode, batch, jnp.bool_)
            weights = [jnp.where(guess, ramp[n], 1.0) * scale for n in range(len(down))]
        down = [(r * w).astype(dt) for r, w in zip(down, weights)]
        mid = (mid * scale).astype(dt)  # the ramp ends at exactly 1 for the mid residual
        if cfg.global_pool_conditions:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid
