"""sdjax's AutoencoderKL against diffusers' AutoencoderKL with the same random weights."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import nchw, nhwc, rel_err, save_vae
from safetensors.numpy import load_file

from sdjax.config import VAEConfig
from sdjax.layouts.diffusers import flax_to_torch, torch_to_flax
from sdjax.models.vae import AutoencoderKL

VARIANT = dict(  # no mid-block attention, no (post_)quant_conv, 3 levels, 2 resnets per level
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    mid_block_add_attention=False,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
CONFIGS = {"sd_tiny": {}, "variant": VARIANT}


class Reference:
    """A saved random diffusers VAE and the same weights converted for sdjax."""

    def __init__(self, path, overrides):
        self.torch_model = save_vae(path, seed=2, **overrides)
        self.config = VAEConfig.from_diffusers_config(path / "config.json")
        self.state = load_file(path / "diffusion_pytorch_model.safetensors")
        rng = np.random.RandomState(0)
        self.images = rng.uniform(-1, 1, (2, 40, 24, self.config.in_channels)).astype(np.float32)
        latent_hw = (40 // self.config.downsample_factor, 24 // self.config.downsample_factor)
        self.latents = rng.randn(2, *latent_hw, self.config.latent_channels).astype(np.float32)

    def module(self, dtype=jnp.float32):
        return AutoencoderKL(self.config, dtype=dtype, param_dtype=dtype)

    def params(self, module, dtype=None):
        template = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), self.images))["params"]
        return torch_to_flax(self.state, template, what="vae", dtype=dtype)

    def run_torch(self, dtype=torch.float32):
        model = self.torch_model if dtype == torch.float32 else copy.deepcopy(self.torch_model).to(dtype)
        with torch.no_grad():
            dist = model.encode(nchw(self.images).to(dtype)).latent_dist
            decoded = model.decode(nchw(self.latents).to(dtype)).sample
        return nhwc(dist.mean.float()), nhwc(dist.logvar.float()), nhwc(decoded.float())


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Reference(tmp_path_factory.mktemp(name), CONFIGS[name])
        return cache[name]

    return get


def run_ours(ref, dtype=jnp.float32):
    vae = ref.module(dtype)
    params = ref.params(vae, dtype=None if dtype == jnp.float32 else dtype)
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))
    mean, logvar = encode(params, ref.images)
    return mean, logvar, decode(params, ref.latents)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vae_matches_diffusers_fp32(references, name):
    ref = references(name)
    ours = run_ours(ref)
    errors = [rel_err(a, b) for a, b in zip(ours, ref.run_torch())]
    print(f"vae {name} fp32 rel err mean/logvar/decode: " + " ".join(f"{e:.2e}" for e in errors))
    assert ours[0].shape == ref.latents.shape
    assert ours[2].shape == ref.images.shape
    assert max(errors) < 1e-4


def test_vae_bf16_error_is_close_to_pytorch_bf16(references):
    ref = references("sd_tiny")
    ours = run_ours(ref, jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in ours)
    exact = ref.run_torch()
    errors = [rel_err(a, b) for a, b in zip(ours, exact)]
    torch_errors = [rel_err(a, b) for a, b in zip(ref.run_torch(torch.bfloat16), exact)]
    print("vae bf16 rel err mean/logvar/decode: " + " ".join(f"{e:.2e}" for e in errors))
    print("PyTorch bf16 rel err mean/logvar/decode: " + " ".join(f"{e:.2e}" for e in torch_errors))
    # The decoder's 11 resnets accumulate bf16 rounding to ~2.5e-2, for PyTorch too.
    for err, torch_err in zip(errors, torch_errors):
        assert err < 3.5e-2 and err < 1.5 * torch_err


def test_call_encodes_then_decodes_the_mean(references):
    ref = references("sd_tiny")
    vae = ref.module()
    ours = jax.jit(vae.apply)({"params": ref.params(vae)}, ref.images)
    with torch.no_grad():
        model = ref.torch_model
        expected = model.decode(model.encode(nchw(ref.images)).latent_dist.mean).sample
    assert rel_err(ours, nhwc(expected)) < 1e-4


def test_logvar_is_clamped_like_diffusers(references):
    ref = references("sd_tiny")
    vae = ref.module()
    params = ref.params(vae)
    # Zero the quant_conv kernel so its bias alone sets the moments: logvar channels are the last 4.
    params["quant_conv"] = {
        "kernel": jnp.zeros_like(params["quant_conv"]["kernel"]),
        "bias": jnp.array([0, 0, 0, 0, 100, -100, 5, -5], jnp.float32),
    }
    _, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(params, ref.images)
    np.testing.assert_array_equal(np.asarray(logvar[0, 0, 0]), [20.0, -30.0, 5.0, -5.0])


def test_params_round_trip_bit_exact(references):
    ref = references("sd_tiny")
    back = flax_to_torch(ref.params(ref.module()))
    assert back.keys() == ref.state.keys()
    for key, value in ref.state.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_wrong_channel_counts_raise(references):
    ref = references("sd_tiny")
    vae = ref.module()
    with pytest.raises(ValueError, match=r"encode input must be NHWC \(batch, height, width, 3\)"):
        vae.init(jax.random.PRNGKey(0), np.zeros((1, 3, 16, 16), np.float32))
    params = {"params": ref.params(vae)}
    with pytest.raises(ValueError, match=r"decode input must be NHWC \(batch, height, width, 4\)"):
        vae.apply(params, np.zeros((1, 4, 2, 2), np.float32), method="decode")
