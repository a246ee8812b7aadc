"""The ``Schedule`` value, the model parameterizations, and the functions the sampling loop calls.

A ``Schedule`` carries its sampler: the step and init functions and the parameterization are
static fields, the sampler's typed tables are data. ``step`` therefore only calls
``schedule.step_fn``: nothing is looked up by name while tracing.

Conventions of every step function ``step_fn(tables, param, i, x, state, raw, noise) -> (x, state)``:

- ``i`` is the index of the model evaluation (Heun evaluates the model twice per step, PNDM once
  more than its step count); ``timesteps[i]`` is the U-Net timestep of that evaluation.
- ``raw`` is the model output as the model predicts it; ``param`` (a ``Parameterization``) turns it
  into the denoised sample or the noise, so the samplers never know the prediction type.
- ``state`` is the sampler's own NamedTuple of arrays, built by ``init_fn(tables, x)`` (history
  buffers, and a ``count`` of evaluations since the start where the order depends on it);
  data-dependent choices (which order to use, first or second Heun stage) are ``jnp.where`` /
  ``lax.switch`` on arrays, never Python ``if``. Python ``if`` only reads static fields of the
  tables (solver order, solver type, SDE or not).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.config import SchedulerConfig


def static_field(**kwargs):
    """A dataclass field that is static (part of the treedef) when the dataclass is a pytree."""
    return dataclasses.field(metadata=dict(static=True), **kwargs)


class Parameterization(NamedTuple):
    """Turns the raw model output into the denoised sample x0 or the noise eps.

    ``x0_vp`` / ``eps_vp`` are for samples z = alpha * x0 + sigma * eps (DDIM-style; the model sees
    z); ``x0_ve`` is for k-diffusion samples x = x0 + sigma * eps (the model sees
    x / sqrt(sigma**2 + 1)). Each follows diffusers' float32 formula for that family.
    """

    x0_vp: Callable
    eps_vp: Callable
    x0_ve: Callable


_PARAMETERIZATIONS = {
    "epsilon": Parameterization(
        x0_vp=lambda raw, z, alpha, sigma: (z - sigma * raw) / alpha,
        eps_vp=lambda raw, z, alpha, sigma: raw,
        x0_ve=lambda raw, x, sigma: x - sigma * raw,
    ),
    "v_prediction": Parameterization(
        x0_vp=lambda raw, z, alpha, sigma: alpha * z - sigma * raw,
        eps_vp=lambda raw, z, alpha, sigma: alpha * raw + sigma * z,
        x0_ve=lambda raw, x, sigma: raw * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1),
    ),
    "sample": Parameterization(
        x0_vp=lambda raw, z, alpha, sigma: raw,
        eps_vp=lambda raw, z, alpha, sigma: (z - alpha * raw) / sigma,
        x0_ve=lambda raw, x, sigma: raw,
    ),
}


def parameterization(prediction_type: str) -> Parameterization:
    if prediction_type not in _PARAMETERIZATIONS:
        raise ValueError(
            f"prediction_type={prediction_type!r} is not supported; supported: {list(_PARAMETERIZATIONS)}"
        )
    return _PARAMETERIZATIONS[prediction_type]


class SamplerArrays(NamedTuple):
    """What a sampler's host ``build`` computes for one step count (numpy)."""

    timesteps: np.ndarray  # (num_evals,) the U-Net timestep of each model evaluation
    tables: Any  # the sampler's typed tables
    init_noise_sigma: float
    # add_noise coefficients of each evaluation: x = signal_scale * x0 + noise_scale * noise.
    signal_scale: np.ndarray
    noise_scale: np.ndarray
    # The U-Net sees x / input_divisor[i] (k-diffusion samplers); None: it sees x.
    input_divisor: Optional[np.ndarray] = None


def no_state(tables, x):
    return ()


def never(options: dict) -> bool:
    return False


def always(options: dict) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How ``make_schedule`` builds one named sampler (host side, never traced)."""

    build: Callable  # (config, num_steps, options) -> SamplerArrays
    step: Callable  # (tables, param, i, x, state, raw, noise) -> (x, state)
    init: Callable = no_state  # (tables, x) -> state
    options: dict = dataclasses.field(default_factory=dict)  # accepted options and their defaults
    evals_per_step: int = 1  # model evaluations per inference step (Heun: 2)
    stochastic: Callable = never  # (options) -> whether the step consumes fresh noise
    # Options that build only puts into the tables (array leaves): left out of ``Schedule.options``, so
    # schedules that differ in them share one compilation.
    traced_options: tuple = ()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """A sampler for a fixed number of steps: host-computed arrays plus static facts.

    A pytree: the arrays are leaves (traced under jit), the rest is static, so the same schedule
    object can be an argument of a jitted function; a different step count or sampler changes the
    shapes or the static part and recompiles, nothing else does.
    """

    name: str = static_field()  # for messages and infotext only
    prediction_type: str = static_field()
    num_steps: int = static_field()
    # Model evaluations per inference step (Heun: 2): image-to-image starts at start_step * this.
    evals_per_step: int = static_field()
    # The pipeline scales unit-variance initial noise by this (sigma_max for k-diffusion samplers).
    init_noise_sigma: float = static_field()
    # Whether the step consumes fresh Gaussian noise.
    stochastic: bool = static_field()
    options: tuple = static_field()
    step_fn: Callable = static_field()
    init_fn: Callable = static_field()
    param: Parameterization = static_field()
    timesteps: jax.Array  # (num_evals,) float32: the U-Net timestep of each model evaluation
    input_divisor: Optional[jax.Array]  # (num_evals,) or None
    signal_scale: jax.Array  # (num_evals,) add_noise coefficient of x0
    noise_scale: jax.Array  # (num_evals,) add_noise coefficient of the noise
    tables: Any  # the sampler's typed tables, read by step_fn and init_fn

    @property
    def num_evals(self) -> int:
        """Length of the sampling scan (model evaluations)."""
        return self.timesteps.shape[0]

    def option(self, name: str) -> Any:
        return dict(self.options)[name]


def init_state(schedule: Schedule, x: jax.Array):
    """The sampler's initial carry (history buffers, counters) for samples shaped like ``x``."""
    return schedule.init_fn(schedule.tables, x)


def step(schedule: Schedule, i, x, state, raw, noise):
    """One scheduler step after model evaluation ``i``: returns the next sample and state (fp32)."""
    raw = raw.astype(jnp.float32)
    return schedule.step_fn(schedule.tables, schedule.param, i, x, state, raw, noise)


def model_input(schedule: Schedule, i, x):
    """The U-Net input and timestep of evaluation ``i`` (diffusers' ``scale_model_input``)."""
    divisor = schedule.input_divisor
    scaled = x if divisor is None else x / divisor[i]
    return scaled, schedule.timesteps[i]


def first_eval(schedule: Schedule, start_step):
    """Index of the first model evaluation when denoising starts at inference step ``start_step``.

    From ``num_steps`` on there is nothing to denoise: ``num_evals`` (PNDM's one extra evaluation
    must not run on its own)."""
    return jnp.where(
        jnp.asarray(start_step) >= schedule.num_steps, schedule.num_evals, start_step * schedule.evals_per_step
    )


def add_noise(schedule: Schedule, x0, noise, step_index):
    """Noised samples at inference step ``step_index`` (diffusers' ``scheduler.add_noise`` at
    ``timesteps[step_index * evals_per_step]``): sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise for
    DDIM, DDPM and PNDM, x0 + sigma noise for the k-diffusion samplers, alpha_t x0 + sigma_t noise
    for DPM-Solver and UniPC. ``step_index`` may be traced, and a scalar or one per sample (B,)."""
    e = jnp.minimum(first_eval(schedule, step_index), schedule.num_evals - 1)
    return noise_to_eval(schedule, x0, noise, e)


def noise_to_eval(schedule: Schedule, x0, noise, eval_index):
    """``x0`` noised to the level of model evaluation ``eval_index`` (a scalar or one per sample),
    the noise level the sampler expects before that evaluation."""
    x0 = jnp.asarray(x0, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    scale_x0, scale_noise = (
        per_sample(scale[eval_index], x0.ndim) for scale in (schedule.signal_scale, schedule.noise_scale)
    )
    return scale_x0 * x0 + scale_noise * noise


def per_sample(value, ndim: int):
    """A scalar, or one value per sample (B,), shaped to broadcast against (B, ...) arrays of ``ndim`` dims."""
    return value.reshape(value.shape + (1,) * (ndim - value.ndim)) if value.ndim else value


# Helpers shared by the sampler families.

# The options of the samplers that can run on k-diffusion's sigma grids (A1111 / ComfyUI):
# ``sigmas`` None (diffusers' grid) | "uniform" | "karras" | "exponential"; ``quantize`` (integer
# U-Net timesteps, only with a k-diffusion grid).
K_GRID = {"sigmas": None, "quantize": False}


def clip_range(config: SchedulerConfig) -> float:
    """The x0 clipping range (infinite when the config does not clip)."""
    return config.clip_sample_range if config.clip_sample else np.inf


def push_newest_first(buffer, value):
    return jnp.concatenate([value[None], buffer[:-1]])


def push_newest_last(buffer, value):
    return jnp.concatenate([buffer[1:], value[None]])
