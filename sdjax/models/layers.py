"""Building blocks shared by the U-Net, the VAE and the CLIP text encoder (flax.linen, NHWC).

Submodule names follow the diffusers state-dict keys (``to_out.0`` -> ``to_out_0``), so the
checkpoint conversion in ``sdjax.layouts.diffusers`` is mechanical.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any

_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)


def _cudnn_supports(q: jax.Array, k: jax.Array) -> bool:
    """Whether cuDNN flash attention can run these shapes/dtypes on the current backend."""
    if jax.default_backend() != "gpu":
        return False
    if q.dtype not in _CUDNN_DTYPES or k.dtype != q.dtype:
        return False
    head_dim = q.shape[-1]
    # cuDNN's limit is 128 before Hopper and 256 from Hopper on; 128 is safe everywhere.
    return head_dim % 8 == 0 and head_dim <= 128


def resolve_attention_implementation(implementation: Optional[str], q: jax.Array, k: jax.Array) -> str:
    """``None`` (auto), ``"xla"`` or ``"cudnn"`` -> the implementation that will actually run."""
    if implementation not in (None, "xla", "cudnn"):
        raise ValueError(
            f"attention implementation {implementation!r} is not supported; use None (auto), 'xla' or 'cudnn'"
        )
    if implementation == "xla":
        return "xla"
    return "cudnn" if _cudnn_supports(q, k) else "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Optional[jax.Array] = None,
    is_causal: bool = False,
    implementation: Optional[str] = None,
    upcast: bool = False,
) -> jax.Array:
    """Scaled dot-product attention; q, k, v shaped (batch, seq, heads, head_dim).

    Returns (batch, q_seq, heads, head_dim) in ``q.dtype``. The softmax always runs in fp32:
    jax's XLA implementation computes the logits with fp32 accumulation (fp32 output) for any
    input dtype and applies the softmax in fp32; cuDNN's flash kernel keeps logits and softmax
    statistics in fp32 as well. ``upcast=True`` (diffusers' ``upcast_attention``) additionally
    runs the XLA path on fp32 copies of q, k and v (jax needs them in one dtype), so q·k is an
    fp32 product whatever the backend's matmul precision defaults; cuDNN already accumulates
    q·k in fp32. ``mask`` is boolean, True = attend, broadcastable to (batch, heads, q_seq, k_seq).
    ``implementation``: None picks cuDNN on GPU for fp16/bf16 when the shapes allow it, else
    XLA; an explicit "cudnn" that the backend or shapes cannot serve falls back to XLA.
    """
    out_dtype = q.dtype
    chosen = resolve_attention_implementation(implementation, q, k)
    if chosen == "cudnn":
        try:
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=is_causal, implementation="cudnn"
            )
            return out.astype(out_dtype)
        except (NotImplementedError, ValueError, RuntimeError):
            pass  # shapes/versions cuDNN rejects at trace time: use XLA instead
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")
    return out.astype(out_dtype)


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of (batch,) timesteps -> (batch, dim), in fp32 (DDPM / diffusers convention).

    Frequencies are ``max_period ** (-i / (dim // 2 - downscale_freq_shift))``; the first half of the
    channels holds sines and the second cosines, swapped when ``flip_sin_to_cos``.
    """
    half = dim // 2
    exponent = -jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    angles = scale * timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def group_norm(num_groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    """GroupNorm with fp32 statistics (flax promotes them) and PyTorch's two-pass variance."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name)


def conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, *, stride: int = 1,
         padding: int | None = None) -> nn.Conv:
    """A square convolution with PyTorch-style symmetric padding (default: "same" for odd kernels)."""
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def dense(features: int, dtype: Dtype, param_dtype: Dtype, name: str, *, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal timestep embedding: linear_1 -> SiLU -> linear_2.

    With ``cond_proj_dim`` (guidance-distilled U-Nets) a bias-free projection ``cond_proj`` of the
    condition (B, cond_proj_dim) is added to the sinusoidal embedding first; a missing condition adds
    nothing (the projection of zeros), as in diffusers, and keeps the parameter in the tree.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    cond_proj_dim: Optional[int] = None

    @nn.compact
    def __call__(self, t_emb: jax.Array, condition: Optional[jax.Array] = None) -> jax.Array:
        t_emb = t_emb.astype(self.dtype)
        if self.cond_proj_dim is not None:
            if condition is None:
                condition = jnp.zeros((t_emb.shape[0], self.cond_proj_dim), self.dtype)
            project = dense(t_emb.shape[-1], self.dtype, self.param_dtype, "cond_proj", use_bias=False)
            t_emb = t_emb + project(condition.astype(self.dtype))
        elif condition is not None:
            raise ValueError("this time embedding has no cond_proj (time_cond_proj_dim is None): pass no condition")
        x = dense(self.features, self.dtype, self.param_dtype, "linear_1")(t_emb)
        x = nn.silu(x)
        return dense(self.features, self.dtype, self.param_dtype, "linear_2")(x)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added between; 1x1 shortcut when channels change."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        h = nn.silu(group_norm(self.groups, self.eps, dt, pdt, "norm1")(x))
        h = conv(self.out_channels, 3, dt, pdt, "conv1")(h)
        if temb is not None:
            t = dense(self.out_channels, dt, pdt, "time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, dt, pdt, "norm2")(h))
        h = conv(self.out_channels, 3, dt, pdt, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, dt, pdt, "conv_shortcut")(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=0`` means diffusers' asymmetric (bottom/right only) zero pad (the VAE)."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv", stride=2, padding=self.padding)(x)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC nearest-neighbour resize with PyTorch's index rule: source = floor(dest * in / out)."""
    rows = np.minimum(np.floor(np.arange(size[0]) * (x.shape[1] / size[0])).astype(np.int32), x.shape[1] - 1)
    cols = np.minimum(np.floor(np.arange(size[1]) * (x.shape[2] / size[1])).astype(np.int32), x.shape[2] - 1)
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (2x, or to ``output_size``) followed by a 3x3 conv.

    The U-Net passes the size of the skip connection it is about to meet, so latents whose size does
    not divide by the U-Net's downsampling factor work, as in diffusers.
    """

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: Optional[tuple[int, int]] = None) -> jax.Array:
        if output_size is None or tuple(output_size) == (2 * x.shape[1], 2 * x.shape[2]):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            x = resize_nearest(x, tuple(output_size))
        return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv")(x)


class Attention(nn.Module):
    """Multi-head attention over (batch, seq, channels) with diffusers' parameter names.

    Self-attention when ``context`` is None, cross-attention otherwise. ``norm_num_groups`` adds the
    input GroupNorm and ``residual_connection`` the skip that the VAE's mid-block attention uses.
    """

    heads: int
    head_dim: int
    out_features: int
    qkv_bias: bool = False
    upcast: bool = False
    norm_num_groups: Optional[int] = None
    norm_eps: float = 1e-6
    residual_connection: bool = False
    implementation: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        residual = x
        if self.norm_num_groups is not None:
            x = group_norm(self.norm_num_groups, self.norm_eps, dt, pdt, "group_norm")(x)
        context = x if context is None else context.astype(dt)
        inner = self.heads * self.head_dim
        q = dense(inner, dt, pdt, "to_q", use_bias=self.qkv_bias)(x)
        k = dense(inner, dt, pdt, "to_k", use_bias=self.qkv_bias)(context)
        v = dense(inner, dt, pdt, "to_v", use_bias=self.qkv_bias)(context)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)
        out = attention(split(q), split(k), split(v), implementation=self.implementation, upcast=self.upcast)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        out = dense(self.out_features, dt, pdt, "to_out_0")(out)
        return out + residual if self.residual_connection else out


class GEGLU(nn.Module):
    """``proj`` to twice the width, then value * GELU(gate) (exact, erf-based GELU)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(dense(2 * self.features, self.dtype, self.param_dtype, "proj")(x), 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU MLP with the 4x inner width; ``net_1`` is dropout in diffusers and has no parameters."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = GEGLU(self.dim * self.mult, self.dtype, self.param_dtype, name="net_0")(x)
        return dense(self.dim, self.dtype, self.param_dtype, "net_2")(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each with a residual.

    With ``only_cross_attention`` the first attention also attends to the text context.
    """

    dim: int
    heads: int
    head_dim: int
    only_cross_attention: bool = False
    upcast: bool = False
    implementation: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        attn = lambda name: Attention(
            self.heads, self.head_dim, self.dim, upcast=self.upcast, implementation=self.implementation,
            dtype=dt, param_dtype=pdt, name=name,
        )
        h = layer_norm(1e-5, dt, pdt, "norm1")(x)
        x = x + attn("attn1")(h, context if self.only_cross_attention else None)
        h = layer_norm(1e-5, dt, pdt, "norm2")(x)
        x = x + attn("attn2")(h, context)
        h = layer_norm(1e-5, dt, pdt, "norm3")(x)
        return x + FeedForward(self.dim, dtype=dt, param_dtype=pdt, name="ff")(h)


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, project in, transformer blocks over the H*W tokens, project out, residual.

    ``use_linear_projection`` selects Dense projections on tokens (SD 2.x) instead of 1x1 convs (SD 1.x).
    """

    heads: int
    head_dim: int
    norm_num_groups: int = 32
    num_layers: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast: bool = False
    implementation: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        batch, height, width, channels = x.shape
        inner = self.heads * self.head_dim
        project = (lambda f, name: dense(f, dt, pdt, name)) if self.use_linear_projection else (
            lambda f, name: conv(f, 1, dt, pdt, name)
        )
        residual = x
        h = group_norm(self.norm_num_groups, 1e-6, dt, pdt, "norm")(x)
        h = project(inner, "proj_in")(h)  # a 1x1 conv and a Dense are the same map on NHWC
        h = h.reshape(batch, height * width, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                inner, self.heads, self.head_dim, only_cross_attention=self.only_cross_attention,
                upcast=self.upcast, implementation=self.implementation, dtype=dt, param_dtype=pdt,
                name=f"transformer_blocks_{i}",
            )(h, context)
        h = project(channels, "proj_out")(h.reshape(batch, height, width, inner))
        return h + residual
