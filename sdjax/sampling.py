"""The denoising loop: one ``lax.scan`` over model evaluations, and classifier-free guidance.

``sample`` never leaves the device: the schedule's arrays, the sampler state and the per-image
noise all live in the scan carry or are computed from the step index.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from sdjax import samplers
from sdjax.samplers import Schedule, per_sample


def step_noise(keys: jax.Array, i, shape, dtype=jnp.float32) -> jax.Array:
    """Gaussian noise of evaluation ``i``: image b draws from ``fold_in(keys[b], i)``, so its noise
    depends only on its own key. ``keys`` is (B, 2) raw uint32 keys or (B,) typed keys."""
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, i), shape[1:], dtype))(keys)


def denoise_step(model_fn, schedule: Schedule, x, state, i, noise=None):
    """One model evaluation and the scheduler step after it (all in fp32).

    ``noise`` is the Gaussian noise stochastic samplers inject at this evaluation (ignored by
    deterministic ones; zeros when omitted).
    """
    x_in, t = samplers.model_input(schedule, i, x)
    raw = model_fn(x_in, t).astype(jnp.float32)
    if noise is None:
        noise = jnp.zeros_like(x)
    return samplers.step(schedule, i, x, state, raw, noise.astype(jnp.float32))


class SamplerCarry(NamedTuple):
    """What the denoising loop carries between evaluations: the sample, the sampler's state and each
    image's first evaluation (``first``: a scalar, or (B,) when images start at their own step) and, when
    the model keeps one between evaluations (``sdjax.deepcache``), its state (else None)."""

    x: jax.Array
    state: Any
    first: jax.Array
    model_state: Any = None


def start_sampling(x_init: jax.Array, schedule: Schedule, start_step=0, model_state=None) -> SamplerCarry:
    """The loop's initial carry for ``x_init`` starting at inference step ``start_step`` (see ``sample``), with
    the model's initial state when it keeps one (see ``sample_evaluations``)."""
    x = jnp.asarray(x_init, jnp.float32)
    per_image = jnp.ndim(start_step) == 1
    first = samplers.first_eval(schedule, jnp.asarray(start_step) if per_image else start_step)
    if per_image:
        state = jax.vmap(lambda xb: samplers.init_state(schedule, xb[None]))(x)
    else:
        state = samplers.init_state(schedule, x)
    return SamplerCarry(x, state, jnp.asarray(first), model_state)


def sample_evaluations(
    model_fn: Callable,
    carry: SamplerCarry,
    key: Optional[jax.Array],
    schedule: Schedule,
    evaluations: jax.Array,
    *,
    noise_fn: Optional[Callable] = None,
    callback: Optional[Callable] = None,
    after_step: Optional[Callable] = None,
    model_takes_index: bool = False,
) -> SamplerCarry:
    """Run the model evaluations ``evaluations`` (an int array, in order) of the loop from ``carry``.

    Indices at or past ``schedule.num_evals`` are skipped, so a loop split into equal chunks (a progress
    display between them, each chunk the same compiled program) computes exactly what one ``sample``
    call computes. ``model_takes_index``: ``model_fn(x, t, i)`` also gets the evaluation index (what
    acts on some steps only, such as a ControlNet's start/end, needs it). When ``carry.model_state`` is not
    None the model is stateful: ``model_fn(..., model_state=s)`` returns (output, new state), and the state
    is carried to the next evaluation that runs (shared by the batch). Other arguments as in ``sample``.
    """
    per_image = jnp.ndim(carry.first) == 1
    x_shape = carry.x.shape

    def noise_at(i):
        if not schedule.stochastic:
            return None
        if noise_fn is not None:
            return noise_fn(i)
        if key is None:
            raise ValueError(f"scheduler {schedule.name!r} is stochastic: pass per-image keys to sample()")
        return step_noise(key, i, x_shape)

    def run(loop, i):
        x, state, model_state = loop
        step_fn = partial(model_fn, i=i) if model_takes_index else model_fn
        if model_state is not None:
            step_fn, new_model_state = _keeping_state(step_fn, model_state)
        if per_image:
            new_x, new_state = _per_image_step(step_fn, schedule, x, state, i, noise_at(i))
        else:
            new_x, new_state = denoise_step(step_fn, schedule, x, state, i, noise_at(i))
        if after_step is not None:
            new_x = after_step(new_x, i)
        if per_image:
            started = i >= carry.first
            new_x, new_state = jax.tree.map(
                lambda new, old: jnp.where(per_sample(started, new.ndim), new, old),
                (new_x, new_state),
                (x, state),
            )
        if callback is not None:
            jax.debug.callback(callback, i)
        return new_x, new_state, None if model_state is None else new_model_state[0]

    def body(loop, i):
        runs = (i >= (jnp.min(carry.first) if per_image else carry.first)) & (i < schedule.num_evals)
        return lax.cond(runs, run, lambda loop, i: loop, loop, i), None

    (x, state, model_state), _ = lax.scan(body, (carry.x, carry.state, carry.model_state), evaluations)
    return SamplerCarry(x, state, carry.first, model_state)


def _keeping_state(model_fn, model_state):
    """``model_fn`` with ``model_state`` passed in and its new state kept aside (in the returned list), so the
    samplers' steps see a plain ``model_fn(x, t) -> output`` (each calls it once)."""
    kept = []

    def stateless(x, t, **extra):
        out, new_state = model_fn(x, t, model_state=model_state, **extra)
        kept.append(new_state)
        return out

    return stateless, kept


def sample(
    model_fn: Callable,
    x_init: jax.Array,
    key: Optional[jax.Array],
    schedule: Schedule,
    *,
    start_step=0,
    noise_fn: Optional[Callable] = None,
    callback: Optional[Callable] = None,
    after_step: Optional[Callable] = None,
) -> jax.Array:
    """Run the sampler from ``x_init`` and return the final sample (fp32).

    model_fn(x_model_input, t) -> raw model output (epsilon, v or x0, as the model was trained);
        ``t`` is the diffusers timestep of the evaluation, a float32 scalar.
    x_init: the initial sample, already scaled (noise * schedule.init_noise_sigma for
        text-to-image, ``add_noise(schedule, x0, noise, start_step)`` for image-to-image).
    key: per-image PRNG keys, (B, 2) raw or (B,) typed; only stochastic samplers use them, drawing
        the noise of evaluation i from ``fold_in(key[b], i)``. May be None for deterministic ones.
    start_step: first inference step to run (image-to-image strength), a scalar or one per image
        (B,). It may be traced: the scan always runs all ``schedule.num_evals`` evaluations and
        evaluations before ``start_step * schedule.evals_per_step`` are skipped, so changing it does not
        recompile. The sampler state starts fresh at an image's first run evaluation, exactly as
        diffusers' image-to-image pipelines slice ``scheduler.timesteps``. A scalar skips with
        ``lax.cond`` (no model call, x unchanged). Per image, the model runs once any image of the
        batch has started; each image keeps its own sampler state (the step is vmapped over the
        images) and images that have not started yet keep their sample and state.
    noise_fn(i) -> noise: overrides the per-step noise (tests inject diffusers' draws).
    callback(i): called through ``jax.debug.callback`` after each evaluation that runs (a host
        callback: JAX does not keep such programs in its persistent compilation cache; the pipeline
        shows progress between chunks of ``sample_evaluations`` instead).
    after_step(x, i) -> x: applied to the sample after the scheduler step of evaluation i
        (inpainting re-imposes the known region there).

    ``start_sampling`` and ``sample_evaluations`` are the same loop in pieces.
    """
    carry = start_sampling(x_init, schedule, start_step)
    evaluations = jnp.arange(schedule.num_evals)
    carry = sample_evaluations(
        model_fn, carry, key, schedule, evaluations, noise_fn=noise_fn, callback=callback, after_step=after_step
    )
    return carry.x


def _per_image_step(model_fn, schedule: Schedule, x, state, i, noise=None):
    """``denoise_step`` with one sampler state per image (state leaves lead with the image axis)."""
    x_in, t = samplers.model_input(schedule, i, x)
    raw = model_fn(x_in, t).astype(jnp.float32)
    noise = jnp.zeros_like(x) if noise is None else noise.astype(jnp.float32)

    def one_image(x_b, state_b, raw_b, noise_b):
        x_b, state_b = samplers.step(schedule, i, x_b[None], state_b, raw_b[None], noise_b[None])
        return x_b[0], state_b

    return jax.vmap(one_image)(x, state, raw, noise)


def classifier_free_guidance(
    unet_fn: Callable,
    cond_context: jax.Array,
    uncond_context: jax.Array,
    guidance_scale,
    guidance_rescale=0.0,
) -> Callable:
    """Wrap ``unet_fn(x, t, context)`` into a guided ``model_fn(x, t)``.

    One U-Net call on the batch [uncond; cond] (x repeated, t passed through unchanged), then
    uncond + scale * (cond - uncond) in fp32. ``guidance_scale`` is a scalar or a per-image (B,)
    array and may be traced. ``guidance_rescale`` (arXiv:2305.08891 §3.4, diffusers'
    ``rescale_noise_cfg``) blends in the guided output rescaled to the conditional output's
    per-image standard deviation; a literal 0 skips it.
    """
    context = jnp.concatenate([uncond_context, cond_context], axis=0)

    def model_fn(x, t, **extra):
        out = unet_fn(jnp.concatenate([x, x], axis=0), t, context, **extra)
        stateful = "model_state" in extra  # a stateful unet_fn returns (output, new state): pass the state on
        out, new_state = out if stateful else (out, None)
        uncond, cond = jnp.split(out.astype(jnp.float32), 2, axis=0)
        guided = guide(uncond, cond, guidance_scale, guidance_rescale)
        return (guided, new_state) if stateful else guided

    return model_fn


def guide(uncond: jax.Array, cond: jax.Array, guidance_scale, guidance_rescale=0.0) -> jax.Array:
    """Classifier-free guidance of computed outputs (B, ...) fp32: uncond + scale * (cond - uncond), then the
    optional rescale of ``classifier_free_guidance`` (a literal 0 skips it). Scales: scalar or per image."""
    scale = per_sample(jnp.asarray(guidance_scale, jnp.float32), cond.ndim)
    guided = uncond + scale * (cond - uncond)
    if isinstance(guidance_rescale, (int, float)) and guidance_rescale == 0:
        return guided
    axes = tuple(range(1, cond.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescale = per_sample(jnp.asarray(guidance_rescale, jnp.float32), cond.ndim)
    return rescale * (guided * (std_cond / std_guided)) + (1 - rescale) * guided

