"""sdjax's U-Net against diffusers' UNet2DConditionModel with the same random weights."""

import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import nchw, nhwc, rel_err, save_unet
from safetensors.numpy import load_file

from sdjax.config import UNetConfig
from sdjax.layouts.diffusers import flax_to_torch, torch_to_flax
from sdjax.models.unet import UNet2DConditionModel

SD2_STYLE = dict(use_linear_projection=True, upcast_attention=True, attention_head_dim=(2, 4))
INPAINT = dict(in_channels=9)
DEPTH = dict(in_channels=5, use_linear_projection=True, only_cross_attention=True)
THREE_BLOCKS = dict(
    block_out_channels=(16, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=4,
    flip_sin_to_cos=False,
    freq_shift=1,
    center_input_sample=True,
    downsample_padding=0,
    norm_eps=1e-6,
)
CONFIGS = {"sd1_tiny": {}, "sd2_style": SD2_STYLE, "inpaint": INPAINT, "depth": DEPTH, "three_blocks": THREE_BLOCKS}


class Reference:
    """A saved random diffusers U-Net and the same weights converted for sdjax."""

    def __init__(self, path, overrides):
        self.torch_model = save_unet(path, seed=1, **overrides)
        self.config = UNetConfig.from_diffusers_config(path / "config.json")
        self.state = load_file(path / "diffusion_pytorch_model.safetensors")
        rng = np.random.RandomState(0)
        self.sample = rng.randn(2, 16, 16, self.config.in_channels).astype(np.float32)
        self.context = rng.randn(2, 7, self.config.cross_attention_dim).astype(np.float32)
        self.timesteps = np.array([10.0, 731.0], np.float32)

    def module(self, dtype=jnp.float32, **kwargs):
        return UNet2DConditionModel(self.config, dtype=dtype, param_dtype=dtype, **kwargs)

    def params(self, module, dtype=None):
        template = jax.eval_shape(
            lambda: module.init(jax.random.PRNGKey(0), self.sample, self.timesteps, self.context)
        )["params"]
        return torch_to_flax(self.state, template, what="unet", dtype=dtype)

    def run_torch(self, dtype=torch.float32, timesteps=None):
        model = self.torch_model if dtype == torch.float32 else copy.deepcopy(self.torch_model).to(dtype)
        timesteps = torch.from_numpy(self.timesteps) if timesteps is None else timesteps
        with torch.no_grad():
            out = model(nchw(self.sample).to(dtype), timesteps, torch.from_numpy(self.context).to(dtype)).sample
        return nhwc(out.float())


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    @functools.cache
    def get(name):
        return Reference(tmp_path_factory.mktemp(name), CONFIGS[name])

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_matches_diffusers_fp32(references, name):
    ref = references(name)
    unet = ref.module()
    params = ref.params(unet)
    ours = jax.jit(unet.apply)({"params": params}, ref.sample, ref.timesteps, ref.context)
    err = rel_err(ours, ref.run_torch())
    print(f"unet {name} fp32 rel err {err:.2e}")
    assert ours.shape == ref.sample.shape[:3] + (ref.config.out_channels,)
    assert err < 1e-4


def test_unet_bf16_error_is_close_to_pytorch_bf16(references):
    ref = references("sd1_tiny")
    unet = ref.module(jnp.bfloat16)
    params = ref.params(unet, dtype=jnp.bfloat16)
    ours = jax.jit(unet.apply)({"params": params}, ref.sample, ref.timesteps, ref.context)
    assert ours.dtype == jnp.bfloat16
    exact = ref.run_torch()
    err, torch_err = rel_err(ours, exact), rel_err(ref.run_torch(torch.bfloat16), exact)
    print(f"unet bf16 rel err {err:.2e} (PyTorch bf16: {torch_err:.2e})")
    # bf16 rounding through ~20 residual layers costs ~2e-2 here, for PyTorch too.
    assert err < 3e-2 and err < 1.5 * torch_err


def test_scalar_timestep_broadcasts_over_batch(references):
    ref = references("sd1_tiny")
    unet = ref.module()
    ours = jax.jit(unet.apply)({"params": ref.params(unet)}, ref.sample, jnp.float32(500), ref.context)
    assert rel_err(ours, ref.run_torch(timesteps=500)) < 1e-4


def test_num_attention_heads_overrides_attention_head_dim(references):
    ref = references("sd1_tiny")  # attention_head_dim=(2, 4): diffusers reads it as head counts
    config = dataclasses.replace(ref.config, attention_head_dim=1, num_attention_heads=(2, 4))
    unet = UNet2DConditionModel(config)
    ours = jax.jit(unet.apply)({"params": ref.params(unet)}, ref.sample, ref.timesteps, ref.context)
    assert rel_err(ours, ref.run_torch()) < 1e-4


def test_params_round_trip_bit_exact(references):
    ref = references("sd2_style")
    back = flax_to_torch(ref.params(ref.module()))
    assert back.keys() == ref.state.keys()
    for key, value in ref.state.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_latent_size_not_divisible_by_the_downsampling_matches_diffusers(references):
    """diffusers upsamples to each skip connection's size; 13x10 latents on a 4x U-Net work the same here."""
    ref = references("three_blocks")
    unet = ref.module()
    rng = np.random.RandomState(3)
    sample = rng.randn(2, 13, 10, ref.config.in_channels).astype(np.float32)
    ours = jax.jit(unet.apply)({"params": ref.params(unet)}, sample, ref.timesteps, ref.context)
    with torch.no_grad():
        expected = ref.torch_model(nchw(sample), torch.from_numpy(ref.timesteps), torch.from_numpy(ref.context)).sample
    assert ours.shape == (2, 13, 10, ref.config.out_channels)
    assert rel_err(ours, nhwc(expected)) < 1e-4


def test_latent_too_small_to_downsample_raises_clear_error(references):
    ref = references("three_blocks")  # halves the resolution twice: latents need at least 4x4
    unet = ref.module()
    sample = np.zeros((1, 3, 16, ref.config.in_channels), np.float32)
    with pytest.raises(ValueError) as info:
        unet.init(jax.random.PRNGKey(0), sample, 1.0, ref.context[:1])
    message = str(info.value)
    assert "height 3 is too small" in message and "at least 4" in message


def test_wrong_channel_count_names_in_channels(references):
    ref = references("inpaint")
    sample = np.zeros((1, 16, 16, 4), np.float32)
    with pytest.raises(ValueError, match="in_channels=9"):
        ref.module().init(jax.random.PRNGKey(0), sample, 1.0, ref.context[:1])
