"""The low-level parts (sdjax.parts): the classic tutorial loop written from them computes what
``text_to_image`` computes, bit for bit, and what the same loop written with diffusers' PyTorch parts
computes, to float rounding."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from reference import nchw, nhwc, rel_err
from sdjax import StableDiffusion, parts

PROMPTS = ["a red circle on a blue background", "a green square on a black background"]
NEGATIVES = ["", "blurry"]
SEED, STEPS, GUIDANCE = 3, 6, 7.5
SAMPLERS = ["lms", "ddim", "dpmpp_2m"]


@pytest.fixture(scope="module")
def builtin():
    return StableDiffusion.default(dtype=jnp.float32)


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_dir):
    return StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype=jnp.float32)


def guided_step(sd, params, schedule, context, scale, i, x, state):
    """The tutorial's loop body: scale the input, predict the noise of [uncond; cond], guide, step."""
    x_in, t = parts.scale_model_input(schedule, i, x)
    out = parts.predict_noise(sd, jnp.concatenate([x_in, x_in]), t, context, params)
    uncond, cond = jnp.split(out, 2)
    return parts.scheduler_step(schedule, i, x, state, parts.guide(uncond, cond, scale))


def start(sd, sampler):
    schedule = parts.make_schedule(sd, sampler, STEPS)
    context = parts.encode_text(sd, parts.tokenize(sd, NEGATIVES + PROMPTS))
    x = parts.initial_latents(schedule, parts.image_keys(SEED, len(PROMPTS)), parts.latent_shape(sd))
    return schedule, context, x, parts.scheduler_state(schedule, x)


def python_loop(sd, sampler, jit_step):
    schedule, context, x, state = start(sd, sampler)
    step = jax.jit(partial(guided_step, sd)) if jit_step else partial(guided_step, sd)
    for i in range(schedule.num_evals):
        x, state = step(sd.params, schedule, context, GUIDANCE, i, x, state)
    return np.asarray(x)


def scanned_loop(sd, sampler):
    schedule, context, x, state = start(sd, sampler)

    @jax.jit
    def run(params, schedule, context, x, state):
        def body(carry, i):
            return guided_step(sd, params, schedule, context, GUIDANCE, i, *carry), None

        (x, _), _ = lax.scan(body, (x, state), jnp.arange(schedule.num_evals))
        return x

    return np.asarray(run(sd.params, schedule, context, x, state))


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("model", ["builtin", "tiny"])
def test_loop_from_parts_is_text_to_image(model, sampler, request):
    sd = request.getfixturevalue(model)
    expected = sd.text_to_image(PROMPTS, NEGATIVES, steps=STEPS, guidance_scale=GUIDANCE, seed=SEED,
                                scheduler=sampler, output="latent")
    np.testing.assert_array_equal(python_loop(sd, sampler, jit_step=True), expected)
    np.testing.assert_array_equal(scanned_loop(sd, sampler), expected)
    if sampler == "lms":
        # Called one by one from Python, guidance and the scheduler step run op by op outside the U-Net's
        # compiled program: the same math, rounded apart (measured 1e-6 to 6e-6 relative).
        error = rel_err(python_loop(sd, sampler, jit_step=False), expected)
        print(f"{model} {sampler}: parts called one by one vs text_to_image: {error:.1e} relative")
        assert error < 1e-5


def test_stochastic_sampler_from_parts_is_text_to_image(builtin):
    """euler_a draws fresh noise each step: ``sampler_noise`` draws it as the pipeline does."""
    expected = builtin.text_to_image(PROMPTS, NEGATIVES, steps=STEPS, guidance_scale=GUIDANCE, seed=SEED,
                                     scheduler="euler_a", output="latent")
    schedule, context, x, state = start(builtin, "euler_a")
    keys = parts.image_keys(SEED, len(PROMPTS))

    @jax.jit
    def step(params, schedule, context, i, x, state):
        x_in, t = parts.scale_model_input(schedule, i, x)
        uncond, cond = jnp.split(parts.predict_noise(builtin, jnp.concatenate([x_in, x_in]), t, context, params), 2)
        noise = parts.sampler_noise(keys, i, x.shape[1:])
        return parts.scheduler_step(schedule, i, x, state, parts.guide(uncond, cond, GUIDANCE), noise)

    for i in range(schedule.num_evals):
        x, state = step(builtin.params, schedule, context, i, x, state)
    np.testing.assert_array_equal(np.asarray(x), expected)


def test_decode_and_pil_are_the_pipelines(builtin):
    latents = builtin.text_to_image(PROMPTS[0], steps=2, seed=SEED, scheduler="ddim", output="latent")
    images = builtin.text_to_image(PROMPTS[0], steps=2, seed=SEED, scheduler="ddim", output="np")
    decoded = parts.decode(builtin, latents)
    assert decoded.dtype == jnp.uint8 and decoded.shape == (1, builtin.native_size, builtin.native_size, 3)
    np.testing.assert_array_equal(np.asarray(decoded), images)
    pil = parts.to_pil(decoded)
    assert len(pil) == 1 and np.array_equal(np.asarray(pil[0]), images[0])


def test_initial_noise_is_what_text_to_image_takes(builtin):
    """Feeding ``initial_noise`` as ``latents=`` reproduces the seeded call (to float rounding: the seeded
    call draws and scales the noise in one program, see ``initial_latents``)."""
    keys = parts.image_keys(SEED, 2)
    noise = parts.initial_noise(keys, parts.latent_shape(builtin))
    assert noise.shape == (2, 8, 8, 4) and noise.dtype == jnp.float32
    kwargs = dict(steps=3, seed=SEED, scheduler="lms", output="latent")
    seeded = builtin.text_to_image(PROMPTS, **kwargs)
    given = builtin.text_to_image(PROMPTS, latents=np.asarray(noise), **kwargs)
    assert rel_err(given, seeded) < 1e-5
    schedule = parts.make_schedule(builtin, "lms", 3)
    np.testing.assert_allclose(parts.initial_latents(schedule, keys, (8, 8, 4)),
                               noise * schedule.init_noise_sigma, rtol=1e-6)


def test_guide_is_the_pipelines_rule():
    uncond, cond = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 4, 4))
    np.testing.assert_allclose(parts.guide(uncond, cond, 7.5), uncond + 7.5 * (cond - uncond), rtol=1e-6)
    per_image = parts.guide(uncond, cond, jnp.array([1.0, 2.0, 0.0]))
    np.testing.assert_allclose(per_image[0], cond[0], atol=1e-6)
    np.testing.assert_array_equal(per_image[2], uncond[2])


def test_tutorial_in_diffusers_agrees(tiny, tiny_pipeline_dir):
    """The same hand-written K-LMS loop with diffusers' PyTorch parts, the same weights and initial noise."""
    import torch
    from diffusers import AutoencoderKL, LMSDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = str(tiny_pipeline_dir)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    scheduler = LMSDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    noise = np.asarray(parts.initial_noise(parts.image_keys(SEED, len(PROMPTS)), parts.latent_shape(tiny)))

    with torch.no_grad():
        def embed(texts):
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            return text_encoder(ids)[0]

        text_embeddings = torch.cat([embed(NEGATIVES), embed(PROMPTS)])
        scheduler.set_timesteps(STEPS)
        latents = nchw(noise) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + GUIDANCE * (noise_pred_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
        image = vae.decode(latents / vae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1)
        expected_images = (nhwc(image) * 255).round().astype(np.uint8)

    schedule, context, x, state = start(tiny, "lms")
    step = jax.jit(partial(guided_step, tiny))
    for i in range(schedule.num_evals):
        x, state = step(tiny.params, schedule, context, GUIDANCE, i, x, state)
    images = np.asarray(parts.decode(tiny, x))
    latent_err, pixel_err = rel_err(x, nhwc(latents)), np.abs(images.astype(int) - expected_images).max()
    print(f"sdjax vs diffusers: latents {latent_err:.2e} relative, pixels {pixel_err} max (uint8)")
    assert latent_err < 1e-3
    assert pixel_err <= 1
