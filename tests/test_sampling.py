"""The lax.scan sampling loop: scan vs Python loop, compilation, guidance, per-image noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from reference import rel_err
from sdjax.sampling import classifier_free_guidance, denoise_step, sample
from sdjax.samplers import SCHEDULERS, init_state, make_schedule
from test_schedulers import SD_CONFIG, draws, stand_in_jax, stand_in_torch, to_numpy, to_torch


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scan_equals_python_loop(name):
    schedule = make_schedule(name, SD_CONFIG, 6, **({"eta": 0.5} if name == "ddim" else {}))
    noise, step_noise = draws(0)
    step_noise = jnp.asarray(step_noise)
    x_init = jnp.asarray(noise) * schedule.init_noise_sigma
    run = jax.jit(lambda x, s: sample(stand_in_jax, x, None, s, noise_fn=lambda i: step_noise[i]))
    scanned = run(x_init, schedule)

    def python_loop(step):
        x, state = x_init, init_state(schedule, x_init)
        for i in range(schedule.num_evals):
            x, state = step(x, state, i, step_noise[i], schedule)
        return x

    # XLA on CPU contracts a * b + c into a fused multiply-add in ordinary fusions but not inside
    # a loop body, so a step compiled on its own rounds differently by an ulp here and there...
    plain = python_loop(jax.jit(lambda x, state, i, noise, s: denoise_step(stand_in_jax, s, x, state, i, noise)))
    assert rel_err(plain, scanned) < 1e-6
    # ...while the same step compiled inside a loop body (a one-trip loop) is bit-identical.
    in_loop_body = jax.jit(
        lambda x, state, i, noise, s: lax.fori_loop(
            i, i + 1, lambda j, carry: denoise_step(stand_in_jax, s, *carry, j, noise), (x, state)
        )
    )
    np.testing.assert_array_equal(np.asarray(python_loop(in_loop_body)), np.asarray(scanned))


def context_unet(x, t, context):
    """A stand-in U-Net whose output depends on the text context (B, L, 4)."""
    return stand_in_jax(x, t) + jnp.mean(context, axis=1)[:, None, None, :]


def test_recompiles_for_step_count_only():
    traces = []

    @jax.jit
    def generate(noise, keys, guidance_scale, cond, uncond, schedule):
        traces.append(schedule.num_steps)
        model = classifier_free_guidance(context_unet, cond, uncond, guidance_scale)
        return sample(model, noise * schedule.init_noise_sigma, keys, schedule)

    rng = np.random.default_rng(0)
    cond, uncond = rng.standard_normal((2, 2, 5, 4)).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), 2)
    noise_a, noise_b = draws(1)[0], draws(2)[0]
    schedule = make_schedule("euler_a", SD_CONFIG, 10)
    out_a = generate(noise_a, keys, 7.5, cond, uncond, schedule)
    out_b = generate(noise_b, jax.random.split(jax.random.key(1), 2), 3.0, cond, uncond, schedule)
    generate(noise_a, keys, 7.5, cond, uncond, make_schedule("euler_a", SD_CONFIG, 10))  # equal schedule
    assert traces == [10]
    assert rel_err(out_a, out_b) > 0.1  # the new noise and guidance scale were used
    generate(noise_a, keys, 7.5, cond, uncond, make_schedule("euler_a", SD_CONFIG, 12))
    assert traces == [10, 12]
    assert generate._cache_size() == 2


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
def test_classifier_free_guidance_matches_diffusers(guidance_rescale):
    calls = []

    def unet(x, t, context):
        calls.append(x.shape[0])
        return context_unet(x, t, context)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    cond, uncond = rng.standard_normal((2, 2, 5, 4)).astype(np.float32)
    scale = np.array([2.0, 7.5], np.float32)  # per image
    model = classifier_free_guidance(unet, cond, uncond, jnp.asarray(scale), guidance_rescale)
    ours = model(jnp.asarray(x), jnp.float32(500.0))
    assert calls == [4]  # one U-Net call on [uncond; cond]

    def torch_unet(context):
        return stand_in_torch(to_torch(x), 500.0) + torch.from_numpy(context.mean(axis=1))[:, :, None, None]

    uncond_out, cond_out = torch_unet(uncond), torch_unet(cond)
    ref = uncond_out + torch.from_numpy(scale)[:, None, None, None] * (cond_out - uncond_out)
    if guidance_rescale:
        ref = rescale_noise_cfg(ref, cond_out, guidance_rescale)
    assert ours.dtype == jnp.float32
    assert rel_err(ours, to_numpy(ref)) < 1e-6


def test_guidance_scale_is_traced_scalar_or_per_image():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)).astype(np.float32))
    cond, uncond = rng.standard_normal((2, 2, 5, 4)).astype(np.float32)
    guided = jax.jit(lambda g: classifier_free_guidance(context_unet, cond, uncond, g)(x, jnp.float32(10.0)))
    per_image = guided(jnp.array([3.0, 3.0]))
    np.testing.assert_allclose(guided(3.0), per_image, rtol=1e-6)
    assert rel_err(guided(jnp.array([3.0, 9.0]))[1], per_image[1]) > 0.01


def test_each_image_noise_depends_only_on_its_key():
    schedule = make_schedule("euler_a", SD_CONFIG, 5)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 8, 4)), jnp.float32) * schedule.init_noise_sigma
    typed_keys = jax.random.split(jax.random.key(0), 3)
    run = jax.jit(lambda x, keys: sample(stand_in_jax, x, keys, schedule))
    batch = run(x, typed_keys)
    alone = run(x[1:2], typed_keys[1:2])
    np.testing.assert_allclose(batch[1:2], alone, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(run(x, jax.random.key_data(typed_keys)), batch)  # raw (B, 2) keys
    other = run(x, jax.random.split(jax.random.key(1), 3))
    assert rel_err(other, batch) > 0.01


def test_stochastic_sampler_needs_keys():
    schedule = make_schedule("ddpm", SD_CONFIG, 3)
    with pytest.raises(ValueError, match="stochastic: pass per-image keys"):
        sample(stand_in_jax, jnp.zeros((1, 8, 8, 4)), None, schedule)


def test_callback_and_start_step():
    schedule = make_schedule("heun", SD_CONFIG, 4)  # 7 model evaluations
    seen = []
    run = jax.jit(lambda x, start: sample(stand_in_jax, x, None, schedule, start_step=start, callback=seen.append))
    x = jnp.asarray(draws(0)[0])
    run(x, 1).block_until_ready()
    jax.effects_barrier()
    assert sorted(int(i) for i in seen) == [2, 3, 4, 5, 6]  # evaluations from start_step * evals_per_step
    np.testing.assert_array_equal(run(x, 4), x)  # strength 0: nothing to denoise
    assert run._cache_size() == 1
