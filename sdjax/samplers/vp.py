"""Samplers on the variance-preserving sample z = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps:
DDIM, DDPM and PNDM (PLMS, optionally started with pseudo Runge-Kutta steps)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.samplers.schedule import Sampler, SamplerArrays, always, clip_range, push_newest_first
from sdjax.schedules import discrete_timesteps, pndm_timesteps, training_alphas_cumprod


class VPTables(NamedTuple):
    """DDIM and DDPM: alpha_bar of each evaluation's timestep and of the one it steps to."""

    alpha_prod: jax.Array  # (num_evals,)
    alpha_prod_prev: jax.Array  # (num_evals,)
    clip: jax.Array  # () x0 clipping range
    # (num_evals,) DDIM: eta; DDPM: 1 where the step adds noise, 0 at the last step to t = 0.
    noise_factor: jax.Array


def _vp_noising(alpha_prod):
    """add_noise coefficients z = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise."""
    return np.sqrt(alpha_prod).astype(np.float32), np.sqrt(np.float32(1.0) - alpha_prod).astype(np.float32)


# --------------------------------------------------------------------------------------------
# DDIM / DDPM
# --------------------------------------------------------------------------------------------


def build_ddim(config, n, options) -> SamplerArrays:
    alphas_cumprod = training_alphas_cumprod(config, zero_snr=True, terminal_fix=False)
    final = np.float32(1.0) if config.set_alpha_to_one else alphas_cumprod[0]
    timesteps = discrete_timesteps(config, n, round_linspace=True).astype(np.int64)
    # diffusers steps to t - T // n whatever the spacing, not to the next listed timestep.
    prev = timesteps - config.num_train_timesteps // n
    tables = VPTables(
        alpha_prod=alphas_cumprod[timesteps],
        alpha_prod_prev=np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], final),
        clip=np.float32(clip_range(config)),
        noise_factor=np.full(n, options["eta"], np.float32),
    )
    return SamplerArrays(timesteps, tables, 1.0, *_vp_noising(alphas_cumprod[timesteps]))


def step_ddim(t: VPTables, param, i, x, state, raw, noise):
    alpha_prod, alpha_prod_prev = t.alpha_prod[i], t.alpha_prod_prev[i]
    beta_prod = 1 - alpha_prod
    alpha, sigma = jnp.sqrt(alpha_prod), jnp.sqrt(beta_prod)
    x0 = jnp.clip(param.x0_vp(raw, x, alpha, sigma), -t.clip, t.clip)
    eps = param.eps_vp(raw, x, alpha, sigma)
    variance = ((1 - alpha_prod_prev) / beta_prod) * (1 - alpha_prod / alpha_prod_prev)
    std = t.noise_factor[i] * jnp.sqrt(variance)
    direction = jnp.sqrt(1 - alpha_prod_prev - std**2) * eps
    return jnp.sqrt(alpha_prod_prev) * x0 + direction + std * noise, state


def build_ddpm(config, n, options) -> SamplerArrays:
    alphas_cumprod = training_alphas_cumprod(config, zero_snr=True, terminal_fix=False)
    timesteps = discrete_timesteps(config, n, round_linspace=True).astype(np.int64)
    prev = np.concatenate([timesteps[1:], [-1]])
    tables = VPTables(
        alpha_prod=alphas_cumprod[timesteps],
        alpha_prod_prev=np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], np.float32(1.0)),
        clip=np.float32(clip_range(config)),
        noise_factor=(timesteps > 0).astype(np.float32),
    )
    return SamplerArrays(timesteps, tables, 1.0, *_vp_noising(alphas_cumprod[timesteps]))


def step_ddpm(t: VPTables, param, i, x, state, raw, noise):
    alpha_prod, alpha_prod_prev = t.alpha_prod[i], t.alpha_prod_prev[i]
    beta_prod, beta_prod_prev = 1 - alpha_prod, 1 - alpha_prod_prev
    current_alpha = alpha_prod / alpha_prod_prev
    current_beta = 1 - current_alpha
    x0 = param.x0_vp(raw, x, jnp.sqrt(alpha_prod), jnp.sqrt(beta_prod))
    x0 = jnp.clip(x0, -t.clip, t.clip)
    x0_coeff = (jnp.sqrt(alpha_prod_prev) * current_beta) / beta_prod
    x_coeff = jnp.sqrt(current_alpha) * beta_prod_prev / beta_prod
    mean = x0_coeff * x0 + x_coeff * x
    variance = jnp.maximum((1 - alpha_prod_prev) / (1 - alpha_prod) * current_beta, 1e-20)
    return mean + (jnp.sqrt(variance) * noise) * t.noise_factor[i], state


# --------------------------------------------------------------------------------------------
# PNDM
# --------------------------------------------------------------------------------------------


class PNDMTables(NamedTuple):
    passed_timestep: jax.Array  # (num_evals,) int32: the timestep diffusers' step is called with
    prk_timestep: jax.Array  # (max(num_prk, 1),) int32: the Runge-Kutta evaluations' timesteps
    num_prk: jax.Array  # () int32: Runge-Kutta evaluations before PLMS takes over
    ratio: jax.Array  # () int32: num_train_timesteps // num_steps
    alphas_cumprod: jax.Array  # (num_train_timesteps,)
    final_alpha_prod: jax.Array  # () alpha_bar stepped to below t = 0


class PNDMState(NamedTuple):
    count: jax.Array  # evaluations since the start
    ets: jax.Array  # (4, ...) raw model outputs, newest first
    num_ets: jax.Array
    cur_sample: jax.Array  # the sample the current Runge-Kutta step (or PLMS's first) started from
    rk_sum: jax.Array  # running weighted sum of the Runge-Kutta outputs


def build_pndm(config, n, options) -> SamplerArrays:
    alphas_cumprod = training_alphas_cumprod(config, zero_snr=False, terminal_fix=False)
    final = np.float32(1.0) if config.set_alpha_to_one else alphas_cumprod[0]
    ascending = pndm_timesteps(config, n)
    ratio = config.num_train_timesteps // n
    if options["skip_prk_steps"]:
        prk = np.zeros(0, np.int64)
        # PLMS starts with one extra evaluation: the second timestep is repeated.
        plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
    else:
        if n < 4:
            raise ValueError(f"pndm with skip_prk_steps=False needs at least 4 steps, got num_steps={n}")
        prk = np.repeat(ascending[-4:], 2) + np.tile([0, ratio // 2], 4)
        prk = np.repeat(prk[:-1], 2)[1:-1][::-1]
        plms = ascending[:-3][::-1]
    passed = np.concatenate([prk, plms]).astype(np.int64)
    tables = PNDMTables(
        passed_timestep=passed.astype(np.int32),
        prk_timestep=(prk if len(prk) else np.zeros(1)).astype(np.int32),
        num_prk=np.int32(len(prk)),
        ratio=np.int32(ratio),
        alphas_cumprod=alphas_cumprod,
        final_alpha_prod=np.float32(final),
    )
    return SamplerArrays(passed, tables, 1.0, *_vp_noising(alphas_cumprod[passed]))


def init_pndm(t: PNDMTables, x) -> PNDMState:
    zeros = jnp.zeros_like(x)
    return PNDMState(
        count=jnp.int32(0), ets=jnp.zeros((4,) + x.shape, x.dtype), num_ets=jnp.int32(0), cur_sample=zeros, rk_sum=zeros
    )


def step_pndm(t: PNDMTables, param, i, x, state: PNDMState, raw, noise):
    count, ets, num_ets = state.count, state.ets, state.num_ets
    passed = t.passed_timestep[i]
    in_prk = count < t.num_prk
    phase = count % 4

    # Which alpha_bar pair this evaluation steps between. diffusers derives it from the passed
    # timestep and its own counter, which is also what it does when image-to-image starts midway.
    half_ratio = t.ratio // 2
    prk_t = t.prk_timestep[jnp.minimum(count // 4 * 4, t.prk_timestep.shape[0] - 1)]
    prk_prev = passed - jnp.where(count % 2 == 1, 0, half_ratio)
    plms_redo = count == 1  # PLMS re-does its first step with the averaged slope
    timestep = jnp.where(in_prk, prk_t, jnp.where(plms_redo, passed + t.ratio, passed))
    prev = jnp.where(in_prk, prk_prev, jnp.where(plms_redo, passed, passed - t.ratio))

    appends = jnp.where(in_prk, phase == 0, ~plms_redo)
    ets = jnp.where(appends, push_newest_first(ets, raw), ets)
    num_ets = jnp.where(appends, jnp.minimum(num_ets + 1, 4), num_ets)
    keeps_sample = jnp.where(in_prk, phase == 0, count == 0)
    cur_sample = jnp.where(keeps_sample, x, state.cur_sample)

    # Runge-Kutta: weights 1/6, 1/3, 1/3, 1/6; the first three evaluations step with their own output.
    rk_weight = jnp.where((phase == 0) | (phase == 3), 1 / 6, 1 / 3)
    rk_sum = jnp.where(phase == 0, 0.0, state.rk_sum)
    rk_output = jnp.where(phase == 3, rk_sum + rk_weight * raw, raw)
    rk_sum = jnp.where(phase == 3, 0.0, rk_sum + rk_weight * raw)

    # Adams-Bashforth of increasing order over the stored outputs.
    e1, e2, e3, e4 = ets
    ab_output = jnp.select(
        [num_ets == 1, num_ets == 2, num_ets == 3],
        [
            jnp.where(plms_redo, (raw + e1) / 2, raw),
            (3 * e1 - e2) / 2,
            (23 * e1 - 16 * e2 + 5 * e3) / 12,
        ],
        (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4),
    )
    model_output = jnp.where(in_prk, rk_output, ab_output)
    sample = jnp.where(in_prk | plms_redo, cur_sample, x)

    alpha_prod = t.alphas_cumprod[timestep]
    alpha_prod_prev = jnp.where(prev >= 0, t.alphas_cumprod[jnp.maximum(prev, 0)], t.final_alpha_prod)
    beta_prod, beta_prod_prev = 1 - alpha_prod, 1 - alpha_prod_prev
    eps = param.eps_vp(model_output, sample, jnp.sqrt(alpha_prod), jnp.sqrt(beta_prod))
    sample_coeff = jnp.sqrt(alpha_prod_prev / alpha_prod)
    denom = alpha_prod * jnp.sqrt(beta_prod_prev) + jnp.sqrt(alpha_prod * beta_prod * alpha_prod_prev)
    x = sample_coeff * sample - (alpha_prod_prev - alpha_prod) * eps / denom
    return x, PNDMState(count=count + 1, ets=ets, num_ets=num_ets, cur_sample=cur_sample, rk_sum=rk_sum)


DDIM = Sampler(build_ddim, step_ddim, options={"eta": 0.0}, stochastic=lambda options: options["eta"] > 0)
DDPM = Sampler(build_ddpm, step_ddpm, stochastic=always)
# skip_prk_steps None: the model config's value.
PNDM = Sampler(build_pndm, step_pndm, init_pndm, options={"skip_prk_steps": None})
