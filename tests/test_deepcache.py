"""DeepCache (``sdjax.deepcache``) against the authors' ``DeepCache`` package (its diffusers helper) on the tiny
random SD1 pipeline: same images at two intervals and two branch depths, the same number of full U-Net passes,
interval 1 equal to no cache, and the U-Net's two passes consistent with its ordinary call."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from reference import decode_unit, nchw, rel_err
from sdjax import deepcache
from sdjax.deepcache import DeepCache

PROMPTS = ["a red circle on a blue background", "a green square"]
NOISE = np.random.RandomState(5).randn(2, 8, 8, 4).astype(np.float32)
STEPS = 7


def run_package(pipe, interval, branch, guidance_scale):
    """The DeepCache package's images, and how many full U-Net passes it ran (the mid block runs only in those)."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    full_passes = []
    hook = pipe.unet.mid_block.resnets[0].register_forward_hook(lambda *_: full_passes.append(1))
    helper.enable()
    try:
        with torch.no_grad():
            images = pipe(PROMPTS, latents=nchw(NOISE), num_inference_steps=STEPS, guidance_scale=guidance_scale,
                          output_type="np").images
    finally:
        helper.disable()
        hook.remove()
    return images, len(full_passes)


@pytest.mark.parametrize("interval, branch, guidance", [(2, 0, 7.5), (3, 4, 1.0)])
def test_matches_the_deepcache_package(sd, torch_pipe, interval, branch, guidance):
    expected, full_passes = run_package(torch_pipe, interval, branch, guidance)
    latents = sd.text_to_image(PROMPTS, steps=STEPS, scheduler="pndm", latents=NOISE, guidance_scale=guidance,
                               output="latent", deep_cache=DeepCache(interval, branch))
    err = rel_err(decode_unit(sd, latents), expected)
    uncached = sd.text_to_image(PROMPTS, steps=STEPS, scheduler="pndm", latents=NOISE, guidance_scale=guidance,
                                output="latent")
    off = rel_err(decode_unit(sd, uncached), expected)
    print(f"interval {interval} branch {branch}: rel err {err:.2e}, without the cache {off:.2e}")
    assert err < 1e-3 < off  # the package's images really differ from uncached ones
    timesteps = jnp.asarray(torch_pipe.scheduler.timesteps.numpy(), jnp.float32)
    full = [bool(deepcache.is_full(DeepCache(interval, branch), timesteps, 0, i)) for i in range(len(timesteps))]
    assert sum(full) == full_passes


def test_interval_one_equals_no_cache(sd):
    plain = sd.text_to_image(PROMPTS, steps=4, scheduler="ddim", latents=NOISE, output="latent")
    cached = sd.text_to_image(PROMPTS, steps=4, scheduler="ddim", latents=NOISE, output="latent", deep_cache=(1, 2))
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(plain))


@pytest.mark.parametrize("branch", [0, 2, 4])  # (block, layer) = (0, 0), (0, 2), (1, 1)
def test_shallow_pass_on_its_own_feature_is_the_full_output(sd, branch):
    unet, variables = sd.unet, {"params": sd.params["unet"]}
    rng = np.random.RandomState(branch)
    x = jnp.asarray(rng.randn(2, 8, 8, 4), jnp.float32)
    ctx = jnp.asarray(rng.randn(2, 77, 32), jnp.float32)
    t = jnp.float32(501.0)
    plain = unet.apply(variables, x, t, ctx)
    block_layer = DeepCache(2, branch).block_and_layer
    out, feature = unet.apply(variables, x, t, ctx, branch=block_layer, method="deep_cache_full")
    shallow = unet.apply(variables, x, t, ctx, feature, branch=block_layer, method="deep_cache_shallow")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    np.testing.assert_allclose(np.asarray(shallow), np.asarray(plain), rtol=1e-5, atol=1e-5)


def test_schedule_counts_steps_as_the_package_does():
    # PNDM repeats its second timestep: both evaluations are step 1, so interval 2 runs full at 0, 4, 6.
    timesteps = jnp.asarray([901.0, 801.0, 801.0, 701.0, 601.0, 501.0, 401.0])
    full = [bool(deepcache.is_full(DeepCache(2, 0), timesteps, 0, i)) for i in range(7)]
    assert full == [True, False, False, False, True, False, True]
    later = [bool(deepcache.is_full(DeepCache(2, 0), timesteps, 3, i)) for i in range(3, 7)]
    assert later == [True, False, True, False]


def test_option_errors(sd):
    with pytest.raises(ValueError, match="interval"):
        DeepCache(0, 0)
    with pytest.raises(ValueError, match="branch 6 is out of range"):
        deepcache.resolve((3, 6), sd.config.unet)
    with pytest.raises(ValueError, match="deep_cache must be"):
        deepcache.resolve("fast", sd.config.unet)
    assert deepcache.resolve((1, 0), sd.config.unet) is None


def test_cache_crosses_progress_chunks_and_image_modes_run(sd):
    options = dict(steps=6, scheduler="ddim", latents=NOISE, output="latent", deep_cache=(3, 1))
    whole = sd.text_to_image(PROMPTS, **options)
    chunked = sd.text_to_image(PROMPTS, progress=True, **options)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-6, atol=1e-6)
    image = np.random.RandomState(0).rand(64, 64, 3).astype(np.float32)
    redrawn = sd.image_to_image(PROMPTS, image, 0.6, guidance_scale=None, **options)
    assert np.all(np.isfinite(np.asarray(redrawn))) and redrawn.shape == NOISE.shape


def test_image_to_image_matches_the_deepcache_package(sd, tiny_pipeline_dir, monkeypatch):
    """Image-to-image starts late in the schedule: the cache's first full pass is the first step that runs."""
    from DeepCache import DeepCacheSDHelper
    from diffusers import StableDiffusionImg2ImgPipeline

    from sdjax.generate import KeyStream
    from test_image_modes import draws_of, init_images, run_diffusers

    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    img2img.set_progress_bar_config(disable=True)
    noise, posterior = draws_of(2, [KeyStream.IMAGE])
    helper = DeepCacheSDHelper(img2img)
    helper.set_params(cache_interval=2, cache_branch_id=0)
    helper.enable()
    try:
        expected = run_diffusers(img2img, monkeypatch, noise, posterior,
                                 prompt=PROMPTS, image=init_images(), strength=0.6, guidance_scale=7.5)
    finally:
        helper.disable()
    latents = sd.image_to_image(PROMPTS, init_images(), 0.6, steps=8, seed=3, scheduler="pndm", latents=noise,
                                output="latent", deep_cache=DeepCache(2, 0))
    err = rel_err(decode_unit(sd, latents), expected)
    print(f"image-to-image, interval 2 branch 0: rel err {err:.2e}")
    assert err < 1e-3
