"""T2I-Adapter (flax.linen, NHWC): a control image -> one feature map per U-Net down level.

Submodule names follow diffusers' ``T2IAdapter`` state-dict keys (``adapter.body.1.resnets.0.block1`` ->
``adapter/body_1/resnets_0/block1``), so ``sdjax.layouts.diffusers`` converts the weights mechanically.

The image is first folded into channels by a pixel unshuffle, then every level runs residual blocks, after an
optional 2x2 average pool and a 1x1 projection when the width changes. The full adapters use blocks of a 3x3
and a 1x1 conv; the light adapter narrows each level to a quarter of its width, runs blocks of two 3x3 convs
there and widens back with a 1x1 conv. The features are what the U-Net adds to its down-block outputs
(``down_intrablock_additional_residuals``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from sdjax.config import T2IAdapterConfig

Dtype = Any


def pixel_unshuffle(x: jax.Array, factor: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/r, W/r, C*r*r), with torch's ``nn.PixelUnshuffle`` channel order.

    Output channel ``c*r*r + i*r + j`` holds input channel ``c`` at row offset ``i``, column offset ``j``
    of each r x r cell, so the channel index runs slowest and the column offset fastest.
    """
    batch, height, width, channels = x.shape
    r = factor
    x = x.reshape(batch, height // r, r, width // r, r, channels)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # (B, H/r, W/r, C, i, j)
    return x.reshape(batch, height // r, width // r, channels * r * r)


def average_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 average pool with stride 2 on even-sized NHWC maps (the sizes ``check_image`` admits)."""
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


def _conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), padding=kernel // 2, dtype=dtype, param_dtype=param_dtype, name=name)


class AdapterResnetBlock(nn.Module):
    """x + conv(relu(conv3x3(x))): the second conv is 1x1 in the full adapters, 3x3 in the light one."""

    channels: int
    second_kernel: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        h = nn.relu(_conv(self.channels, 3, "block1", dt, pdt)(x))
        return x + _conv(self.channels, self.second_kernel, "block2", dt, pdt)(h)


class AdapterBlock(nn.Module):
    """One level of the full adapters: pool, project to the new width if it changes, residual blocks."""

    in_channels: int
    out_channels: int
    num_res_blocks: int
    downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        if self.downsample:
            x = average_pool_2x2(x)
        if self.in_channels != self.out_channels:
            x = _conv(self.out_channels, 1, "in_conv", dt, pdt)(x)
        for i in range(self.num_res_blocks):
            x = AdapterResnetBlock(self.out_channels, 1, dt, pdt, name=f"resnets_{i}")(x)
        return x


class LightAdapterBlock(nn.Module):
    """One level of the light adapter: pool, 1x1 down to a quarter width, residual blocks, 1x1 back up."""

    out_channels: int
    num_res_blocks: int
    downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        inner = self.out_channels // 4
        if self.downsample:
            x = average_pool_2x2(x)
        x = _conv(inner, 1, "in_conv", dt, pdt)(x)
        for i in range(self.num_res_blocks):
            x = AdapterResnetBlock(inner, 3, dt, pdt, name=f"resnets_{i}")(x)
        return _conv(self.out_channels, 1, "out_conv", dt, pdt)(x)


def full_adapter_widths(config: T2IAdapterConfig) -> list[tuple[int, int]]:
    """(declared input width, output width) of each level of a full adapter, as diffusers builds them.

    The SDXL variant keeps the first level's width, widens at the second level without pooling and pools
    once, at the third; both variants project only where the two widths differ.
    """
    channels = config.channels
    if config.adapter_type == "full_adapter_xl":
        return [((channels[i - 1] if i in (1, 2) else channels[i]), channels[i]) for i in range(len(channels))]
    return [(channels[max(i - 1, 0)], channels[i]) for i in range(len(channels))]


class FullAdapter(nn.Module):
    """``full_adapter`` and ``full_adapter_xl``: unshuffle, 3x3 ``conv_in``, one ``AdapterBlock`` per level."""

    config: T2IAdapterConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array) -> list[jax.Array]:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        x = pixel_unshuffle(image, cfg.downscale_factor)
        x = _conv(cfg.channels[0], 3, "conv_in", dt, pdt)(x)
        features = []
        levels = zip(full_adapter_widths(cfg), cfg.downsampling_levels)
        for i, ((in_width, out_width), down) in enumerate(levels):
            x = AdapterBlock(in_width, out_width, cfg.num_res_blocks, down, dt, pdt, name=f"body_{i}")(x)
            features.append(x)
        return features


class LightAdapter(nn.Module):
    """``light_adapter``: unshuffle, then one ``LightAdapterBlock`` per width and a last one at the last width."""

    config: T2IAdapterConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array) -> list[jax.Array]:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        x = pixel_unshuffle(image, cfg.downscale_factor)
        widths = tuple(cfg.channels) + (cfg.channels[-1],)
        features = []
        for i, (width, down) in enumerate(zip(widths, cfg.downsampling_levels)):
            x = LightAdapterBlock(width, cfg.num_res_blocks, down, dt, pdt, name=f"body_{i}")(x)
            features.append(x)
        return features


def check_image(config: T2IAdapterConfig, shape: Sequence[int]) -> None:
    """A one-line ``ValueError`` unless ``shape`` is an NHWC control image this adapter takes."""
    if len(shape) != 4 or shape[-1] != config.in_channels:
        raise ValueError(
            f"T2I-Adapter image must be NHWC (batch, height, width, {config.in_channels}); got shape {tuple(shape)}"
        )
    factor = config.total_downscale_factor
    height, width = shape[1], shape[2]
    if height % factor or width % factor:
        raise ValueError(
            f"T2I-Adapter image size {height}x{width} is not a multiple of {factor} (pixel unshuffle by "
            f"{config.downscale_factor}, then {sum(config.downsampling_levels)} halvings); resize the image, "
            f"e.g. to {max(factor, height // factor * factor)}x{max(factor, width // factor * factor)}"
        )


class T2IAdapterModel(nn.Module):
    """``adapter.apply({"params": p}, image_nhwc)`` -> feature maps (NHWC), largest first."""

    config: T2IAdapterConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array) -> list[jax.Array]:
        check_image(self.config, image.shape)
        body = LightAdapter if self.config.adapter_type == "light_adapter" else FullAdapter
        return body(self.config, self.dtype, self.param_dtype, name="adapter")(image.astype(self.dtype))


def feature_shapes(config: T2IAdapterConfig, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
    """The NHWC shapes of the feature maps for an image of this size (no computation)."""
    check_image(config, (batch, height, width, config.in_channels))
    widths = tuple(config.channels) + ((config.channels[-1],) if config.adapter_type == "light_adapter" else ())
    size = (height // config.downscale_factor, width // config.downscale_factor)
    shapes = []
    for width_out, down in zip(widths, config.downsampling_levels):
        size = (size[0] // 2, size[1] // 2) if down else size
        shapes.append((batch, *size, width_out))
    return shapes


# --- several adapters, and the conditioning scale ---------------------------------------------------------


def combine_features(
    features_per_adapter: Sequence[Sequence[jax.Array]],
    adapter_weights: Optional[Union[Sequence[float], jax.Array]] = None,
) -> list[jax.Array]:
    """diffusers' ``MultiAdapter``: per level, the sum over adapters of weight x features.

    ``adapter_weights`` default to 1 / number of adapters each; they may be traced values.
    """
    count = len(features_per_adapter)
    if count == 0:
        raise ValueError("combine_features needs the features of at least one adapter; got none")
    shapes = [[tuple(f.shape) for f in features] for features in features_per_adapter]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ValueError(
            "adapters to combine must give feature maps of the same shapes (same channels and total downscale "
            f"factor); got {shapes}"
        )
    if adapter_weights is None:
        weights = jnp.full((count,), 1.0 / count, jnp.float32)
    else:
        weights = jnp.asarray(adapter_weights, jnp.float32)
        if weights.shape != (count,):
            raise ValueError(f"adapter_weights must hold one weight per adapter ({count}); got shape {weights.shape}")
    combined = []
    for level in range(len(shapes[0])):
        total = sum(weights[k] * features_per_adapter[k][level].astype(jnp.float32) for k in range(count))
        combined.append(total.astype(features_per_adapter[0][level].dtype))
    return combined


def scale_features(features: Sequence[jax.Array], scale: Union[float, jax.Array]) -> list[jax.Array]:
    """``adapter_conditioning_scale``: every feature map times ``scale``, a scalar or one value per image (B,)."""
    scale = jnp.asarray(scale, jnp.float32)
    if scale.ndim > 1:
        raise ValueError(f"adapter conditioning scale must be a scalar or one value per image; got shape {scale.shape}")
    scaled = []
    for f in features:
        if scale.ndim == 1 and scale.shape[0] != f.shape[0]:
            raise ValueError(
                f"adapter conditioning scale has {scale.shape[0]} values but the features hold {f.shape[0]} images"
            )
        factor = scale.reshape((-1, 1, 1, 1)) if scale.ndim == 1 else scale
        scaled.append((f.astype(jnp.float32) * factor).astype(f.dtype))
    return scaled
