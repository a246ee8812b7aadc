"""The CLIP text encoder (transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``) in flax.linen.

SD 1.x uses OpenAI's ViT-L/14 text tower (quick_gelu), SD 2.x OpenCLIP's ViT-H text tower (exact
erf gelu); both are pre-norm transformers with a causal mask and a final layer norm. SDXL adds
OpenCLIP's ViT-bigG/14 tower with its ``text_projection`` head (``CLIPTextModelWithProjection``). The
module tree mirrors the transformers state-dict keys without the ``text_model.`` prefix
(``encoder.layers.0.self_attn.q_proj.weight`` -> ``encoder/layers_0/self_attn/q_proj/kernel``); the
projection head is ``text_projection/kernel``, as transformers' ``text_projection.weight`` beside
``text_model``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sdjax.config import CLIPTextConfig
from sdjax.models.layers import attention

Dtype = Any

# The projection's module name: transformers' ``text_projection.weight``, outside ``text_model``.
PROJECTION_HEAD = "text_projection"
# transformers' checkpoints from before PR #24773 set eos_token_id=2 and pool at the largest token id.
_LEGACY_EOS_TOKEN_ID = 2


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of gelu."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    # transformers' "gelu" is torch's exact erf gelu, not the tanh approximation.
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"CLIP hidden_act={name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, added_tokens: Optional[jax.Array] = None) -> jax.Array:
        """``added_tokens`` (N, D): the vectors of token ids vocab_size .. vocab_size + N - 1 (textual
        inversion), appended to the token embedding table."""
        embed = functools.partial(
            nn.Embed, features=self.config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype
        )
        token_embedding = embed(self.config.vocab_size, name="token_embedding")
        if added_tokens is None:
            tokens = token_embedding(input_ids)
        else:
            table = jnp.concatenate([token_embedding.embedding, added_tokens.astype(self.param_dtype)])
            tokens = jnp.take(table, input_ids, axis=0).astype(self.dtype)
        positions = embed(self.config.max_position_embeddings, name="position_embedding")(
            jnp.arange(input_ids.shape[-1])
        )
        return tokens + positions[None]


class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: Optional[str] = None

    @nn.compact
    def __call__(self, hidden: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        batch, seq, width = hidden.shape
        heads = self.config.num_attention_heads
        dense = functools.partial(nn.Dense, width, dtype=self.dtype, param_dtype=self.param_dtype)

        def split_heads(x: jax.Array) -> jax.Array:
            return x.reshape(batch, seq, heads, width // heads)

        q = split_heads(dense(name="q_proj")(hidden))
        k = split_heads(dense(name="k_proj")(hidden))
        v = split_heads(dense(name="v_proj")(hidden))
        out = attention(q, k, v, mask=mask, is_causal=True, implementation=self.attention_implementation)
        return dense(name="out_proj")(out.reshape(batch, seq, width))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = dense(self.config.intermediate_size, name="fc1")(hidden)
        hidden = _activation(self.config.hidden_act)(hidden)
        return dense(self.config.hidden_size, name="fc2")(hidden)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: Optional[str] = None

    @nn.compact
    def __call__(self, hidden: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        norm = functools.partial(
            nn.LayerNorm, epsilon=self.config.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype
        )
        hidden = hidden + CLIPAttention(
            self.config, self.dtype, self.param_dtype, self.attention_implementation, name="self_attn"
        )(norm(name="layer_norm1")(hidden), mask)
        return hidden + CLIPMLP(self.config, self.dtype, self.param_dtype, name="mlp")(
            norm(name="layer_norm2")(hidden)
        )


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: Optional[str] = None

    def setup(self):
        # A list attribute in setup names its entries layers_0, layers_1, ... like the checkpoint.
        self.layers = [
            CLIPEncoderLayer(self.config, self.dtype, self.param_dtype, self.attention_implementation)
            for _ in range(self.config.num_hidden_layers)
        ]

    def __call__(self, hidden: jax.Array, num_layers: int, mask: Optional[jax.Array] = None) -> list[jax.Array]:
        """The outputs of the first ``num_layers`` layers, in order."""
        outputs = []
        for layer in self.layers[:num_layers]:
            hidden = layer(hidden, mask)
            outputs.append(hidden)
        return outputs


def pool_at_eos(hidden: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """(B, T, D) -> (B, D) at each sequence's end-of-text token, by transformers' rule.

    Legacy configs (eos_token_id == 2) pool at the largest token id; others at the first position
    holding ``eos_token_id`` (position 0 if there is none, as in transformers).
    """
    if eos_token_id == _LEGACY_EOS_TOKEN_ID:
        position = jnp.argmax(input_ids, axis=-1)
    else:
        position = jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(hidden, position[:, None, None], axis=1)[:, 0]


class CLIPTextModel(nn.Module):
    """transformers ``CLIPTextModel``: token ids (B, T) -> final-layer-normed hidden states (B, T, D); with
    ``config.projection_dim`` set, ``CLIPTextModelWithProjection`` (its pooled output is ``text_embeds``).

    ``skip_layers=k`` drops the last k encoder layers before the final layer norm, which is
    diffusers' ``clip_skip=k`` (hidden_states[-(k + 1)] through final_layer_norm) and AUTOMATIC1111's
    "Clip skip" k + 1 (for SD 1.x; A1111 also applies the final layer norm). ``final_norm=False`` returns
    that layer's output without the final layer norm, which is what SDXL conditions on: SDXL takes
    hidden_states[-2], ``skip_layers=1, final_norm=False``; diffusers' SDXL ``clip_skip=c`` is
    ``skip_layers=c + 1``. ``added_tokens`` (N, D): textual-inversion vectors for token ids from
    ``vocab_size`` on. ``attention_mask`` (B, T), as transformers': 0 / False keeps a token out of every
    other token's attention (its own output remains).
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: Optional[str] = None

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(self.config, self.dtype, self.param_dtype)
        self.encoder = CLIPEncoder(
            self.config, self.dtype, self.param_dtype, self.attention_implementation
        )
        self.final_layer_norm = nn.LayerNorm(
            epsilon=self.config.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype
        )
        if self.config.has_projection:
            self.text_projection = nn.Dense(
                self.config.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                name=PROJECTION_HEAD,
            )

    def __call__(self, input_ids: jax.Array, skip_layers: int = 0, added_tokens: Optional[jax.Array] = None,
                 attention_mask: Optional[jax.Array] = None, *, final_norm: bool = True) -> jax.Array:
        self._check_inputs(input_ids, skip_layers)
        num_layers = self.config.num_hidden_layers - skip_layers
        layer_outputs = self._layer_outputs(input_ids, num_layers, added_tokens, attention_mask)
        normed = self.final_layer_norm(layer_outputs[-1])
        if self.config.has_projection and self.is_initializing():
            # __call__ never pools, so run the projection once here for init to create its kernel.
            self.text_projection(normed[:, 0])
        return normed if final_norm else layer_outputs[-1]

    def encode_with_pooled(self, input_ids: jax.Array, skip_layers: int = 0, added_tokens: Optional[jax.Array] = None,
                           attention_mask: Optional[jax.Array] = None, *,
                           final_norm: bool = True) -> tuple[jax.Array, jax.Array]:
        """(hidden states as ``__call__`` returns them, pooled vector (B, P)).

        The pooled vector always comes from the full-depth, final-layer-normed output at the
        end-of-text token, whatever ``skip_layers`` and ``final_norm`` are (as diffusers' SDXL
        pipelines use it): transformers' ``pooler_output`` (P = hidden_size), or for a tower with a
        projection that vector through ``text_projection``, transformers' ``text_embeds``
        (P = projection_dim).
        """
        self._check_inputs(input_ids, skip_layers)
        layer_outputs = self._layer_outputs(input_ids, self.config.num_hidden_layers, added_tokens, attention_mask)
        last = self.final_layer_norm(layer_outputs[-1])
        chosen = layer_outputs[-1 - skip_layers]
        if final_norm:
            chosen = self.final_layer_norm(chosen) if skip_layers else last
        pooled = pool_at_eos(last, input_ids, self.config.eos_token_id)
        return chosen, self.text_projection(pooled) if self.config.has_projection else pooled

    def _layer_outputs(self, input_ids: jax.Array, num_layers: int, added_tokens: Optional[jax.Array],
                       attention_mask: Optional[jax.Array]) -> list[jax.Array]:
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        return self.encoder(self.embeddings(input_ids, added_tokens), num_layers, mask)

    def _check_inputs(self, input_ids: jax.Array, skip_layers: int) -> None:
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"input_ids must be integer token ids shaped (batch, seq); "
                f"got shape {tuple(input_ids.shape)} dtype {input_ids.dtype}"
            )
        max_len = self.config.max_position_embeddings
        if input_ids.shape[1] > max_len:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens, more than the text encoder's "
                f"max_position_embeddings={max_len}"
            )
        layers = self.config.num_hidden_layers
        if not isinstance(skip_layers, (int, np.integer)) or not 0 <= skip_layers < layers:
            raise ValueError(
                f"skip_layers={skip_layers!r} is out of range: it must be an int in [0, {layers - 1}] "
                f"for a text encoder with {layers} layers"
            )
