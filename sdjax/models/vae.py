"""The Stable Diffusion autoencoder (diffusers ``AutoencoderKL``), NHWC.

``encode`` returns the mean and (clamped) log-variance of the latent Gaussian and ``decode`` maps
latents back to images in about [-1, 1]. Latents are unscaled here: the pipeline applies
``VAEConfig.scaling_factor`` (and ``shift_factor``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from sdjax.config import VAEConfig
from sdjax.models.layers import Attention, Downsample2D, Dtype, ResnetBlock2D, Upsample2D, conv, group_norm

_EPS = 1e-6  # diffusers hard-codes this for every VAE norm
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


class VAEMidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D`` without time embedding: resnet, (single-head self-attention), resnet."""

    groups: int
    add_attention: bool = True
    attention_implementation: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        batch, height, width, channels = x.shape
        x = ResnetBlock2D(channels, self.groups, _EPS, dt, pdt, name="resnets_0")(x)
        if self.add_attention:
            attn = Attention(
                heads=1, head_dim=channels, out_features=channels, qkv_bias=True, norm_num_groups=self.groups,
                norm_eps=_EPS, residual_connection=True, implementation=self.attention_implementation,
                dtype=dt, param_dtype=pdt, name="attentions_0",
            )
            x = attn(x.reshape(batch, height * width, channels)).reshape(batch, height, width, channels)
        return ResnetBlock2D(channels, self.groups, _EPS, dt, pdt, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
    """Resnets without time embedding, then an optional stride-2 downsampler (asymmetric padding)."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, _EPS, dt, pdt, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, 0, dt, pdt, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """Resnets without time embedding, then an optional nearest-2x upsampler."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, _EPS, dt, pdt, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dt, pdt, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels) moments before quant_conv."""

    config: VAEConfig
    attention_implementation: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        channels = cfg.block_out_channels
        x = conv(channels[0], 3, dt, pdt, "conv_in")(x)
        for i, out in enumerate(channels):
            x = DownEncoderBlock2D(out, cfg.layers_per_block, cfg.norm_num_groups, i < len(channels) - 1, dt, pdt,
                                   name=f"down_blocks_{i}")(x)
        x = VAEMidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, self.attention_implementation, dt, pdt,
                        name="mid_block")(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, _EPS, dt, pdt, "conv_norm_out")(x))
        return conv(2 * cfg.latent_channels, 3, dt, pdt, "conv_out")(x)


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels)."""

    config: VAEConfig
    attention_implementation: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        channels = cfg.block_out_channels[::-1]
        x = conv(channels[0], 3, dt, pdt, "conv_in")(z)
        x = VAEMidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, self.attention_implementation, dt, pdt,
                        name="mid_block")(x)
        for i, out in enumerate(channels):
            x = UpDecoderBlock2D(out, cfg.layers_per_block + 1, cfg.norm_num_groups, i < len(channels) - 1, dt, pdt,
                                 name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, _EPS, dt, pdt, "conv_norm_out")(x))
        return conv(cfg.out_channels, 3, dt, pdt, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """``vae.apply({"params": p}, images, method="encode")`` -> (mean, logvar);
    ``vae.apply({"params": p}, latents, method="decode")`` -> images. All NHWC, latents unscaled."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: Optional[str] = None

    def setup(self) -> None:
        cfg, dt, pdt, impl = self.config, self.dtype, self.param_dtype, self.attention_implementation
        self.encoder = Encoder(cfg, impl, dt, pdt)
        self.decoder = Decoder(cfg, impl, dt, pdt)
        moments = 2 * cfg.latent_channels
        pointwise = lambda features: nn.Conv(features, (1, 1), dtype=dt, param_dtype=pdt)
        self.quant_conv = pointwise(moments) if cfg.use_quant_conv else None
        self.post_quant_conv = pointwise(cfg.latent_channels) if cfg.use_post_quant_conv else None

    def _check_channels(self, x: jax.Array, expected: int, what: str) -> None:
        if x.ndim != 4 or x.shape[-1] != expected:
            raise ValueError(
                f"VAE {what} must be NHWC (batch, height, width, {expected}); got shape {tuple(x.shape)}"
            )

    def encode(self, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
        self._check_channels(images, self.config.in_channels, "encode input")
        moments = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        self._check_channels(latents, self.config.latent_channels, "decode input")
        z = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)
