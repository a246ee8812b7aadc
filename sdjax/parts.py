"""The parts of the text-to-image pipeline, one function per step of the classic tutorial loop.

``StableDiffusion.text_to_image`` runs these steps inside one jitted program (``sdjax.generate``); this
module exposes the same steps one by one, re-using that implementation, so a loop written from them
computes what the pipeline computes (bit for bit when its per-step function is jitted; tests/test_parts.py):

    ids = tokenize(sd, [""] * n + prompts)                  # uncond first, as the pipeline batches them
    context = encode_text(sd, ids)                          # (2n, 77, D)
    schedule = make_schedule(sd, "lms", 25)                 # the scheduler: a pytree, usable under jit
    keys = image_keys(seed, n)                              # (n, 2) uint32: image i's seed
    x = initial_latents(schedule, keys, latent_shape(sd))   # (n, h, w, 4) noise * init_noise_sigma
    state = scheduler_state(schedule, x)
    for i in range(schedule.num_evals):
        x_in, t = scale_model_input(schedule, i, x)
        out = predict_noise(sd, jnp.concatenate([x_in, x_in]), t, context)
        uncond, cond = jnp.split(out, 2)
        x, state = scheduler_step(schedule, i, x, state, guide(uncond, cond, 7.5))
    images = to_pil(decode(sd, x))

Every array is NHWC; latents, model outputs and the scheduler are float32 whatever the model's dtype
(parameters and activations are in ``sd.dtype``). Each function is pure: the same step body runs in a
Python loop and as the body of ``jax.lax.scan``. The model calls (``encode_text``, ``predict_noise``,
``decode``) are compiled once per shape, so even a plain Python loop runs at speed. Inside a jitted
function pass the weights in as ``params=`` (an argument of that function, e.g. ``sd.params``), or they
are baked into the program as constants.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdjax import inputs, samplers, sampling
from sdjax.generate import KeyStream, decode_latents, encode_prompts, image_normals
from sdjax.samplers import Schedule
from sdjax.sampling import step_noise

__all__ = [
    "tokenize",
    "encode_text",
    "latent_shape",
    "make_schedule",
    "image_keys",
    "initial_noise",
    "initial_latents",
    "scheduler_state",
    "scale_model_input",
    "predict_noise",
    "guide",
    "sampler_noise",
    "scheduler_step",
    "decode",
    "to_pil",
]


def _params(sd, params: Optional[dict]) -> dict:
    """The weights a part runs with: ``params`` when given, else the model's own with any loaded LoRA
    adapters merged at their scales (``sd.merged_params()``)."""
    if params is not None:
        return params
    return sd.merged_params() if "lora" in sd.params else sd.params


# The model calls compile once per model and shape, so the parts are fast called one by one from Python
# too; inside a caller's jit they are inlined into its program.
_encode = jax.jit(encode_prompts, static_argnums=0)
_decode = jax.jit(decode_latents, static_argnums=0)


def tokenize(sd, prompts: Union[str, Sequence[str]]) -> np.ndarray:
    """(N, 77) int32 CLIP token ids, padded as the model's tokenizer pads (``sd.tokenize``; host side)."""
    return sd.tokenize([prompts] if isinstance(prompts, str) else list(prompts))


def encode_text(sd, ids: jax.Array, params: Optional[dict] = None) -> jax.Array:
    """Token ids (N, 77) int32 -> the text encoder's hidden states (N, 77, D) in ``sd.dtype``: the
    U-Net's cross-attention context (the model's ``clip_skip`` applied).

    The pipeline encodes the negative and the positive prompts as one batch [uncond; cond]; encode
    them together too for bit-identical contexts (a different batch size may round differently)."""
    return _encode(sd.models, _params(sd, params), jnp.asarray(ids, jnp.int32))


def latent_shape(sd, height: Optional[int] = None, width: Optional[int] = None) -> tuple:
    """The latent (h, w, c) of an image size (default: the model's native size): h = height / 8 for
    SD's VAE; c = the U-Net's output channels (4)."""
    size = sd.native_size
    return inputs.latent_shape(height or size, width or size, sd.vae_scale_factor, sd.config.unet.out_channels)


def make_schedule(sd, name: str, steps: int, **options) -> Schedule:
    """The scheduler of sampler ``name`` for ``steps`` inference steps on the model's training noise
    schedule: an sdjax name (``sdjax.samplers.SCHEDULERS``: "lms", "ddim", "dpmpp_2m", ...) or an
    AUTOMATIC1111 one ("DPM++ 2M Karras"); options as ``sdjax.samplers.make_schedule``.

    A ``Schedule`` is an immutable pytree (its arrays are leaves, the sampler's functions static), so it
    can be an argument of a jitted function. ``schedule.timesteps`` (num_evals,) float32 holds the U-Net
    timestep of each model evaluation; ``schedule.num_evals`` is the loop length (``steps`` for most
    samplers, ``steps + 1`` for PNDM, ``2 * steps`` for Heun); ``schedule.init_noise_sigma`` is a float."""
    name, options = samplers.resolve_sampler(name, None, options or None)
    return samplers.make_schedule(name, sd.config.scheduler, steps, **options)


def image_keys(seed: Union[int, Sequence[int]], count: int) -> np.ndarray:
    """(count, 2) uint32 PRNG keys, one per image, as the pipeline derives them from ``seed`` (one int for
    the batch, or one per image; ``sdjax.inputs.image_keys``): an image depends only on its own seed."""
    return inputs.image_keys(seed, count)


@partial(jax.jit, static_argnums=1)
def initial_noise(keys: jax.Array, shape: tuple) -> jax.Array:
    """(B, h, w, c) float32 standard-normal noise, image i's from ``fold_in(keys[i], INITIAL_NOISE)``:
    the pipeline's initial noise, unscaled (what ``text_to_image(latents=...)`` takes, NHWC)."""
    return image_normals(keys, KeyStream.INITIAL_NOISE, tuple(shape))


@partial(jax.jit, static_argnums=2)
def initial_latents(schedule: Schedule, keys: jax.Array, shape: tuple) -> jax.Array:
    """The sampler's starting sample (B, h, w, c) float32: ``initial_noise(keys, shape)`` times the
    scheduler's initial sigma (1 for DDIM / DPM-Solver, sigma_max ~ 14.6 for LMS / Euler).

    Drawn and scaled in one compiled function, as the pipeline does: noise drawn in one program and
    scaled in another can round differently in the last bit (seen with LMS's sigma)."""
    return initial_noise(keys, shape) * schedule.init_noise_sigma


def scheduler_state(schedule: Schedule, latents: jax.Array):
    """The sampler's initial state for samples shaped like ``latents`` (a NamedTuple of float32 arrays:
    LMS's derivative history, DPM-Solver's previous outputs, ...; ``()`` for samplers without one)."""
    return samplers.init_state(schedule, jnp.asarray(latents, jnp.float32))


def scale_model_input(schedule: Schedule, i, latents: jax.Array) -> tuple:
    """The U-Net's input and timestep of model evaluation ``i`` (an int or a traced int32 scalar):
    (latents scaled as diffusers' ``scheduler.scale_model_input`` does, by 1 / sqrt(sigma^2 + 1) for
    the k-diffusion samplers, unchanged otherwise; the float32 scalar timestep ``schedule.timesteps[i]``)."""
    return samplers.model_input(schedule, i, latents)


def predict_noise(sd, x_in: jax.Array, t: jax.Array, context: jax.Array, params: Optional[dict] = None) -> jax.Array:
    """The U-Net's output for latents ``x_in`` (B, h, w, c) at timestep ``t`` (a scalar, or (B,)) under
    the text ``context`` (B, 77, D), as float32 (B, h, w, c): the noise for epsilon models, v for
    v-prediction models (the scheduler step reads it as the schedule's ``prediction_type``). Inputs
    are cast to ``sd.dtype`` for the U-Net, as in the pipeline."""
    return _unet(sd.unet, _params(sd, params)["unet"], x_in, t, context)


@partial(jax.jit, static_argnums=0)
def _unet(unet, params, x_in, t, context):
    return unet.apply({"params": params}, x_in.astype(unet.dtype), t, context).astype(jnp.float32)


def guide(uncond: jax.Array, cond: jax.Array, scale, rescale=0.0) -> jax.Array:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)`` in float32, the pipeline's own rule
    (``sdjax.sampling.guide``). ``uncond``, ``cond``: (B, h, w, c) model outputs; ``scale``: a scalar or
    (B,), may be traced; ``rescale``: guidance rescale (arXiv:2305.08891), 0 skips it."""
    return sampling.guide(uncond.astype(jnp.float32), cond.astype(jnp.float32), scale, rescale)


def sampler_noise(keys: jax.Array, i, shape: tuple) -> jax.Array:
    """The fresh Gaussian noise (B, h, w, c) float32 a stochastic sampler (euler_a, dpmpp_2m_sde, ddpm)
    injects at evaluation ``i``, drawn as the pipeline draws it from the per-image ``keys`` (B, 2);
    ``shape`` is one image's latent shape (h, w, c), as for ``initial_noise``."""
    sampler_keys = jax.vmap(lambda key: jax.random.fold_in(key, KeyStream.SAMPLER))(jnp.asarray(keys))
    return step_noise(sampler_keys, i, (sampler_keys.shape[0],) + tuple(shape))


def scheduler_step(schedule: Schedule, i, latents: jax.Array, state, model_output: jax.Array, noise=None) -> tuple:
    """One scheduler step after model evaluation ``i`` (diffusers' ``scheduler.step``): returns the next
    latents (B, h, w, c) float32 and the next sampler state. ``model_output`` is the (guided) U-Net
    output; ``noise`` is what a stochastic sampler injects (``sampler_noise``), ignored otherwise."""
    x = jnp.asarray(latents, jnp.float32)
    noise = jnp.zeros_like(x) if noise is None else jnp.asarray(noise, jnp.float32)
    return samplers.step(schedule, i, x, state, model_output, noise)


def decode(sd, latents: jax.Array, params: Optional[dict] = None) -> jax.Array:
    """Scaled latents (B, h, w, c) -> uint8 RGB images (B, 8h, 8w, 3): divided by the VAE's scaling
    factor (1 / 0.18215 for SD 1.x), decoded, mapped from [-1, 1] to [0, 255] and rounded."""
    return _decode(sd.models, _params(sd, params), jnp.asarray(latents))


def to_pil(images) -> list[Image.Image]:
    """uint8 NHWC images (B, H, W, 3) -> a list of B PIL images."""
    return [Image.fromarray(image) for image in np.asarray(images, np.uint8)]

