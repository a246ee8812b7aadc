"""k-diffusion samplers on x = x0 + sigma eps (the model sees x / sqrt(sigma**2 + 1)): LMS, Euler,
Euler ancestral and Heun.

Two sources of sigmas: diffusers' (the default: the config's timestep_spacing, optionally
``use_karras_sigmas``), or with the option ``sigmas`` = "uniform" | "karras" | "exponential"
k-diffusion's grids over the LDM sigma table as A1111 and ComfyUI sample (``sdjax.schedules.
k_diffusion_grid``; ``quantize`` rounds the U-Net timestep to the nearest table entry). The steps are
k-diffusion's ``sample_lms`` (order 4), ``sample_euler`` and ``sample_heun`` (s_churn = 0) and
``sample_euler_ancestral`` (eta = 1), whichever grid drives them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.samplers.schedule import K_GRID, Sampler, SamplerArrays, always, clip_range, push_newest_first
from sdjax.schedules import k_diffusion_grid, k_diffusion_init_sigma, k_diffusion_sigmas, training_alphas_cumprod


class KTables(NamedTuple):
    """Euler and Euler ancestral."""

    sigmas: jax.Array  # (num_evals + 1,) the sigma of each evaluation, then 0


class LMSTables(NamedTuple):
    sigmas: jax.Array  # (num_evals + 1,)
    coeffs: jax.Array  # (num_evals, 4) weights of the newest-first derivatives


class HeunTables(NamedTuple):
    sigmas: jax.Array  # (num_evals + 1,) every sigma but the first and the last twice
    clip: jax.Array  # () x0 clipping range


class LMSState(NamedTuple):
    derivatives: jax.Array  # (4, ...) newest first


class HeunState(NamedTuple):
    derivative: jax.Array  # the slope of the last Euler stage
    dt: jax.Array
    sample: jax.Array  # the sample the last Euler stage started from


def _grid(config, n, options, *, zero_snr: bool):
    """(timesteps, sigmas with a final 0, initial noise scale) of the chosen sigma source."""
    if options.get("sigmas") is not None:
        timesteps, sigmas = k_diffusion_grid(config, n, options["sigmas"], options["quantize"])
        return timesteps, sigmas, float(sigmas[0])  # k-diffusion: x = noise * sigmas[0]
    alphas_cumprod = training_alphas_cumprod(config, zero_snr=zero_snr, terminal_fix=zero_snr)
    timesteps, sigmas = k_diffusion_sigmas(config, n, alphas_cumprod, options.get("use_karras_sigmas", False))
    return timesteps, sigmas, k_diffusion_init_sigma(config, sigmas)


def _arrays(timesteps, sigmas, init_noise_sigma, tables) -> SamplerArrays:
    """k-diffusion add_noise is x = x0 + sigma noise; the model sees x / sqrt(sigma**2 + 1)."""
    evals = sigmas[:-1]
    return SamplerArrays(
        timesteps,
        tables,
        init_noise_sigma,
        signal_scale=np.ones_like(evals),
        noise_scale=evals,
        input_divisor=np.sqrt(evals * evals + np.float32(1.0)).astype(np.float32),
    )


def _slope(x, x0, sigma):
    """k-diffusion ODE slope dx/dsigma = (x - x0) / sigma."""
    return (x - x0) / sigma


# --------------------------------------------------------------------------------------------
# LMS
# --------------------------------------------------------------------------------------------


def lms_coefficients(sigmas: np.ndarray, max_order: int = 4) -> np.ndarray:
    """Linear multistep weights: the integral from sigma_i to sigma_{i+1} of each Lagrange basis
    polynomial through the last ``order`` sigmas (exact polynomial integration, float64)."""
    s = sigmas.astype(np.float64)
    n = len(s) - 1
    coeffs = np.zeros((n, max_order), np.float64)
    for i in range(n):
        order = min(i + 1, max_order)
        for j in range(order):
            nodes = [s[i - k] for k in range(order) if k != j]
            basis = np.poly1d(nodes, r=True) / np.prod([s[i - j] - node for node in nodes])
            antiderivative = basis.integ()
            coeffs[i, j] = antiderivative(s[i + 1]) - antiderivative(s[i])
    return coeffs.astype(np.float32)


def build_lms(config, n, options) -> SamplerArrays:
    timesteps, sigmas, init = _grid(config, n, options, zero_snr=False)
    return _arrays(timesteps, sigmas, init, LMSTables(sigmas=sigmas, coeffs=lms_coefficients(sigmas)))


def init_lms(t: LMSTables, x) -> LMSState:
    return LMSState(derivatives=jnp.zeros((4,) + x.shape, x.dtype))


def step_lms(t: LMSTables, param, i, x, state: LMSState, raw, noise):
    sigma = t.sigmas[i]
    derivative = _slope(x, param.x0_ve(raw, x, sigma), sigma)
    derivatives = push_newest_first(state.derivatives, derivative)
    # Slots not filled since the start are zero: like diffusers, which takes its order from the
    # absolute step index but only sums the derivatives it has (image-to-image starts midway).
    coeffs = t.coeffs[i]
    update = coeffs[0] * derivatives[0]
    for j in range(1, 4):
        update = update + coeffs[j] * derivatives[j]
    return x + update, LMSState(derivatives=derivatives)


# --------------------------------------------------------------------------------------------
# Euler, Euler ancestral
# --------------------------------------------------------------------------------------------


def build_euler(config, n, options) -> SamplerArrays:
    timesteps, sigmas, init = _grid(config, n, options, zero_snr=True)
    return _arrays(timesteps, sigmas, init, KTables(sigmas=sigmas))


def step_euler(t: KTables, param, i, x, state, raw, noise):
    sigma, sigma_next = t.sigmas[i], t.sigmas[i + 1]
    derivative = _slope(x, param.x0_ve(raw, x, sigma), sigma)
    return x + derivative * (sigma_next - sigma), state


def step_euler_ancestral(t: KTables, param, i, x, state, raw, noise):
    sigma, sigma_next = t.sigmas[i], t.sigmas[i + 1]
    sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = jnp.sqrt(sigma_next**2 - sigma_up**2)
    derivative = _slope(x, param.x0_ve(raw, x, sigma), sigma)
    x = x + derivative * (sigma_down - sigma)
    return x + noise * sigma_up, state


# --------------------------------------------------------------------------------------------
# Heun
# --------------------------------------------------------------------------------------------


def build_heun(config, n, options) -> SamplerArrays:
    timesteps, sigmas, init = _grid(config, n, options, zero_snr=False)
    # Every sigma but the first and the last is visited twice: Euler stage, then correction (the
    # last step, to sigma = 0, is Euler only, in diffusers and k-diffusion alike).
    sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
    timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
    # k-diffusion never clips x0; diffusers clips when the config says so.
    clip = np.inf if options.get("sigmas") is not None else clip_range(config)
    return _arrays(timesteps, sigmas, init, HeunTables(sigmas=sigmas, clip=np.float32(clip)))


def init_heun(t: HeunTables, x) -> HeunState:
    return HeunState(derivative=jnp.zeros_like(x), dt=jnp.float32(0.0), sample=jnp.zeros_like(x))


def step_heun(t: HeunTables, param, i, x, state: HeunState, raw, noise):
    sigma, sigma_next = t.sigmas[i], t.sigmas[i + 1]
    x0 = jnp.clip(param.x0_ve(raw, x, sigma), -t.clip, t.clip)
    derivative = _slope(x, x0, sigma)
    euler = i % 2 == 0  # evaluations alternate: Euler stage, correction, Euler stage, ...
    # Euler stage: step with this slope and remember it; correction: average the two slopes and
    # redo the step from the remembered sample.
    slope = jnp.where(euler, derivative, (state.derivative + derivative) / 2)
    dt = jnp.where(euler, sigma_next - sigma, state.dt)
    start = jnp.where(euler, x, state.sample)
    return start + slope * dt, HeunState(derivative=derivative, dt=dt, sample=x)


_KARRAS = {"use_karras_sigmas": False, **K_GRID}

LMS = Sampler(build_lms, step_lms, init_lms, options=_KARRAS)
EULER = Sampler(build_euler, step_euler, options=_KARRAS)
EULER_ANCESTRAL = Sampler(build_euler, step_euler_ancestral, options=K_GRID, stochastic=always)
HEUN = Sampler(build_heun, step_heun, init_heun, options=_KARRAS, evals_per_step=2)
