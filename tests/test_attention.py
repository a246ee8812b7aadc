"""sdjax.models.layers.attention: the math, the fp32 softmax and the implementation choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import rel_err

from sdjax.models.layers import attention, resolve_attention_implementation


def qkv(dtype=jnp.float32, q_len=6, k_len=9, heads=2, head_dim=8, qk_scale=2.0):
    rng = np.random.RandomState(0)
    shape = lambda length: (2, length, heads, head_dim)
    scaled = ((q_len, qk_scale), (k_len, qk_scale), (k_len, 1.0))
    return tuple(jnp.asarray(rng.randn(*shape(n)) * s, dtype) for n, s in scaled)


def torch_attention(q, k, v, mask=None, is_causal=False):
    to_torch = lambda x: torch.from_numpy(np.array(x, np.float32)).transpose(1, 2)  # (B, N, T, H)
    mask = None if mask is None else torch.from_numpy(np.asarray(mask))
    out = torch.nn.functional.scaled_dot_product_attention(
        to_torch(q), to_torch(k), to_torch(v), attn_mask=mask, is_causal=is_causal
    )
    return out.transpose(1, 2).numpy()


def test_matches_pytorch_sdpa_with_mask():
    q, k, v = qkv()
    mask = np.random.RandomState(1).rand(2, 1, 6, 9) > 0.3
    mask[..., 0] = True  # every query attends to something
    assert rel_err(attention(q, k, v, mask=jnp.asarray(mask)), torch_attention(q, k, v, mask)) < 1e-6


def test_causal_matches_pytorch_sdpa():
    q, k, v = qkv(k_len=6)
    assert rel_err(attention(q, k, v, is_causal=True), torch_attention(q, k, v, is_causal=True)) < 1e-6


@pytest.mark.parametrize("upcast", [False, True])
def test_bf16_keeps_dtype_and_fp32_softmax(upcast):
    q, k, v = qkv(jnp.bfloat16, q_len=16, k_len=32, qk_scale=4.0)
    out = attention(q, k, v, upcast=upcast)
    assert out.dtype == jnp.bfloat16
    # Logits reach ~±70 here: bf16 logits and softmax give ~9e-3, fp32 ones ~1.7e-3 (bf16 output rounding).
    assert rel_err(out, torch_attention(q, k, v)) < 3e-3


def test_cudnn_request_falls_back_to_xla_where_unsupported():
    q, k, v = qkv()
    if jax.default_backend() != "gpu":
        assert resolve_attention_implementation("cudnn", q, k) == "xla"
    np.testing.assert_allclose(
        np.asarray(attention(q, k, v, implementation="cudnn")), np.asarray(attention(q, k, v)), rtol=1e-5, atol=1e-6
    )
    # fp32 is never served by cuDNN flash attention, on any backend.
    assert resolve_attention_implementation(None, q, k) == "xla"


def test_unknown_implementation_is_rejected():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="'flash'.*None \\(auto\\), 'xla' or 'cudnn'"):
        attention(q, k, v, implementation="flash")
