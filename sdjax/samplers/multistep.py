"""Multistep solvers on the data prediction: DPM-Solver++ (2M, 2M SDE) and UniPC.

Both step in log-SNR lambda = log(alpha_t / sigma_t) over VP samples z = alpha_t x0 + sigma_t eps,
with alpha_t = 1 / sqrt(sigma**2 + 1) for the k-diffusion sigma of each evaluation.

DPM-Solver++ takes the option ``sigmas`` = "uniform" | "karras" | "exponential" (and ``quantize``):
k-diffusion's grids, as A1111 and ComfyUI sample (``sdjax.schedules.k_diffusion_grid``). In VP form
that is k-diffusion's ``sample_dpmpp_2m`` / ``sample_dpmpp_2m_sde`` (eta = 1, midpoint) exactly:
lambda = -log(sigma) is the same in both forms, each update is k-diffusion's multiplied by alpha_t,
the model sees z = alpha x = x / sqrt(sigma**2 + 1) (k-diffusion's c_in x) and predicts the same
x0; the last step to sigma = 0 (alpha = 1) returns x0 itself in both. k-diffusion starts from
x = noise * sigma_0, so the VP start is z = alpha_0 sigma_0 noise: ``init_noise_sigma`` is
sigma_0 / sqrt(sigma_0**2 + 1) there (diffusers' is 1).
"""

from __future__ import annotations

import dataclasses
import enum
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sdjax.samplers.schedule import K_GRID, Sampler, SamplerArrays, always, push_newest_last, static_field
from sdjax.schedules import k_diffusion_grid, multistep_sigmas, training_alphas_cumprod


class SolverType(enum.Enum):
    """How DPM-Solver's second-order term is weighted (diffusers' ``solver_type``)."""

    MIDPOINT = "midpoint"
    HEUN = "heun"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DPMSolverTables:
    sigmas: jax.Array  # (num_steps + 1,) the sigma of each evaluation, then 0
    max_order: jax.Array  # (num_steps,) int32: the highest order each step may use
    solver_order: int = static_field()  # history length and highest order of any step
    solver_type: SolverType = static_field()
    sde: bool = static_field()  # the SDE variant (sde-dpmsolver++): injects fresh noise


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UniPCTables:
    sigmas: jax.Array  # (num_steps + 1,)
    max_order: jax.Array  # (num_steps,) int32
    corrects: jax.Array  # (num_steps,) bool: whether the corrector runs before step i's prediction
    solver_order: int = static_field()


class DPMSolverState(NamedTuple):
    count: jax.Array  # evaluations since the start
    history: jax.Array  # (solver_order, ...) x0 predictions, newest last


class UniPCState(NamedTuple):
    count: jax.Array
    history: jax.Array  # (solver_order, ...) x0 predictions, newest last
    # The previous predictor step, which the corrector redoes.
    last_sample: jax.Array
    last_order: jax.Array


def _multistep_arrays(timesteps, sigmas, tables, init_noise_sigma=1.0) -> SamplerArrays:
    """add_noise is z = alpha_t x0 + sigma_t noise."""
    evals = sigmas[:-1]
    alpha = (np.float32(1.0) / np.sqrt(evals * evals + np.float32(1.0))).astype(np.float32)
    return SamplerArrays(
        timesteps, tables, init_noise_sigma, signal_scale=alpha, noise_scale=(evals * alpha).astype(np.float32)
    )


def vp_init_noise_sigma(sigma_max) -> float:
    """The VP scale of k-diffusion's initial sample noise * sigma_max: alpha sigma_max."""
    sigma_max = np.float64(sigma_max)
    return float(sigma_max / np.sqrt(sigma_max * sigma_max + 1.0))


def _alpha_sigma(sigma):
    """VP coefficients (alpha_t, sigma_t) of a k-diffusion sigma."""
    alpha = 1 / jnp.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


def _log_snr(sigma):
    alpha, sigma_t = _alpha_sigma(sigma)
    return alpha, sigma_t, jnp.log(alpha) - jnp.log(sigma_t)


# --------------------------------------------------------------------------------------------
# DPM-Solver++
# --------------------------------------------------------------------------------------------


def build_dpmpp(config, n, options, *, sde: bool) -> SamplerArrays:
    if options.get("sigmas") is not None:
        timesteps, sigmas = k_diffusion_grid(config, n, options["sigmas"], options["quantize"])
        init_noise_sigma = vp_init_noise_sigma(sigmas[0])
    else:
        alphas_cumprod = training_alphas_cumprod(config, zero_snr=True, terminal_fix=True)
        round_karras = config.beta_schedule != "squaredcos_cap_v2"
        timesteps, sigmas = multistep_sigmas(config, n, alphas_cumprod, options["use_karras_sigmas"], round_karras)
        init_noise_sigma = 1.0
    order = options["solver_order"]
    max_order = np.full(n, order, np.int32)
    if options["lower_order_final"] and 2 <= n < 15:
        max_order[-2] = min(order, 2)
    max_order[-1] = 1  # the final step to sigma = 0 is always first order (final_sigmas_type "zero")
    tables = DPMSolverTables(
        sigmas=sigmas,
        max_order=max_order,
        solver_order=order,
        solver_type=SolverType(options["solver_type"]),
        sde=sde,
    )
    return _multistep_arrays(timesteps, sigmas, tables, init_noise_sigma)


def init_dpmpp(t: DPMSolverTables, x) -> DPMSolverState:
    return DPMSolverState(count=jnp.int32(0), history=jnp.zeros((t.solver_order,) + x.shape, x.dtype))


def _dpmpp_update(order, midpoint, sde, sigmas, x, history, noise):
    """DPM-Solver++ multistep update of a static order, from sigmas (s_t, s_0, s_1, s_2).

    x_t = c_x x + sum_k w_k D_k (+ noise term for the SDE variant), where D_k are finite
    differences of the data predictions in log-SNR; the terms are added in diffusers' order.
    """
    alpha_t, sigma_t, lambda_t = _log_snr(sigmas[0])
    _, sigma_s0, lambda_s0 = _log_snr(sigmas[1])
    h = lambda_t - lambda_s0
    m0 = history[-1]
    slopes = [m0]
    if order == 2:
        _, _, lambda_s1 = _log_snr(sigmas[2])
        slopes.append((1.0 / ((lambda_s0 - lambda_s1) / h)) * (m0 - history[-2]))
    elif order == 3:
        _, _, lambda_s1 = _log_snr(sigmas[2])
        _, _, lambda_s2 = _log_snr(sigmas[3])
        r0, r1 = (lambda_s0 - lambda_s1) / h, (lambda_s1 - lambda_s2) / h
        d1_0 = (1.0 / r0) * (m0 - history[-2])
        d1_1 = (1.0 / r1) * (history[-2] - history[-3])
        slopes.append(d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1))
        slopes.append((1.0 / (r0 + r1)) * (d1_0 - d1_1))

    if sde:
        decay = jnp.exp(-2.0 * h)
        x_coeff = sigma_t / sigma_s0 * jnp.exp(-h)
        weights = [alpha_t * (1 - decay)]
        if order == 2 and midpoint:
            weights.append(0.5 * (alpha_t * (1 - decay)))
        elif order >= 2:
            weights.append(alpha_t * ((1.0 - decay) / (-2.0 * h) + 1.0))
        if order == 3:
            weights.append(alpha_t * ((1.0 - decay - 2.0 * h) / (2.0 * h) ** 2 - 0.5))
    else:
        x_coeff = sigma_t / sigma_s0
        weights = [-(alpha_t * (jnp.exp(-h) - 1.0))]
        if order == 2 and midpoint:
            weights.append(-(0.5 * (alpha_t * (jnp.exp(-h) - 1.0))))
        elif order >= 2:
            weights.append(alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0))
        if order == 3:
            weights.append(-(alpha_t * ((jnp.exp(-h) - 1.0 + h) / h**2 - 0.5)))

    x_t = x_coeff * x
    for weight, slope in zip(weights, slopes):
        x_t = x_t + weight * slope
    if sde:
        x_t = x_t + sigma_t * jnp.sqrt(1.0 - decay) * noise
    return x_t


def step_dpmpp(t: DPMSolverTables, param, i, x, state: DPMSolverState, raw, noise):
    sigma = t.sigmas[i]
    alpha, sigma_t = _alpha_sigma(sigma)
    history = push_newest_last(state.history, param.x0_vp(raw, x, alpha, sigma_t))
    sigmas = t.sigmas[jnp.maximum(i + jnp.array([1, 0, -1, -2]), 0)]
    order = jnp.minimum(t.max_order[i], state.count + 1)
    midpoint = t.solver_type is SolverType.MIDPOINT
    branches = [
        (lambda k: lambda ops: _dpmpp_update(k, midpoint, t.sde, *ops))(k) for k in range(1, t.solver_order + 1)
    ]
    x = lax.switch(order - 1, branches, (sigmas, x, history, noise))
    return x, DPMSolverState(count=state.count + 1, history=history)


# --------------------------------------------------------------------------------------------
# UniPC (the bh2 variant, predicting x0)
# --------------------------------------------------------------------------------------------


def build_unipc(config, n, options) -> SamplerArrays:
    alphas_cumprod = training_alphas_cumprod(config, zero_snr=True, terminal_fix=True)
    timesteps, sigmas = multistep_sigmas(config, n, alphas_cumprod, options["use_karras_sigmas"], True)
    # lower_order_final: the order drops towards the end (diffusers' default; without it the
    # last step to sigma = 0 is singular).
    max_order = np.minimum(options["solver_order"], n - np.arange(n))
    disabled = set(options["disable_corrector"])
    corrects = np.array([(k - 1) not in disabled for k in range(n)])
    tables = UniPCTables(
        sigmas=sigmas, max_order=max_order.astype(np.int32), corrects=corrects, solver_order=options["solver_order"]
    )
    return _multistep_arrays(timesteps, sigmas, tables)


def init_unipc(t: UniPCTables, x) -> UniPCState:
    return UniPCState(
        count=jnp.int32(0),
        history=jnp.zeros((t.solver_order,) + x.shape, x.dtype),
        last_sample=jnp.zeros_like(x),
        last_order=jnp.int32(1),
    )


def _unipc_weights(order, h, lambda_s0, lambdas_before):
    """UniPC's (rks, R, b, h_phi_1, B_h) for a static order from the earlier log-SNRs."""
    rks = [(lam - lambda_s0) / h for lam in lambdas_before[: order - 1]] + [jnp.float32(1.0)]
    rks = jnp.stack(rks)
    hh = -h  # data prediction (predict_x0)
    h_phi_1 = jnp.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = jnp.expm1(hh)  # the "bh2" variant
    factorial = 1
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append(rks ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return rks, jnp.stack(rows), jnp.stack(b), h_phi_1, b_h


def _unipc_predict(order, sigmas, x, history):
    """UniPC-p: step from sigmas[1] to sigmas[0]; earlier sigmas in sigmas[2:]."""
    alpha_t, sigma_t, lambda_t = _log_snr(sigmas[0])
    _, sigma_s0, lambda_s0 = _log_snr(sigmas[1])
    h = lambda_t - lambda_s0
    before = [_log_snr(sig)[2] for sig in sigmas[2 : order + 1]]
    rks, rows, b, h_phi_1, b_h = _unipc_weights(order, h, lambda_s0, before)
    m0 = history[-1]
    x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    if order == 1:
        return x_t
    d1s = [(history[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)]
    rhos = jnp.full((1,), 0.5) if order == 2 else jnp.linalg.solve(rows[:-1, :-1], b[:-1])
    return x_t - alpha_t * b_h * _weighted_sum(rhos, d1s)


def _unipc_correct(order, sigmas, last_sample, history, model_t):
    """UniPC-c: redo the last step from sigmas[1] to sigmas[0] with the new model output."""
    alpha_t, sigma_t, lambda_t = _log_snr(sigmas[0])
    _, sigma_s0, lambda_s0 = _log_snr(sigmas[1])
    h = lambda_t - lambda_s0
    before = [_log_snr(sig)[2] for sig in sigmas[2 : order + 1]]
    rks, rows, b, h_phi_1, b_h = _unipc_weights(order, h, lambda_s0, before)
    m0 = history[-1]
    x_t = sigma_t / sigma_s0 * last_sample - alpha_t * h_phi_1 * m0
    rhos = jnp.full((1,), 0.5) if order == 1 else jnp.linalg.solve(rows, b)
    d1s = [(history[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)]
    correction = rhos[-1] * (model_t - m0)
    if d1s:
        correction = _weighted_sum(rhos[:-1], d1s) + correction
    return x_t - alpha_t * b_h * correction


def _weighted_sum(weights, values):
    total = weights[0] * values[0]
    for k in range(1, len(values)):
        total = total + weights[k] * values[k]
    return total


def step_unipc(t: UniPCTables, param, i, x, state: UniPCState, raw, noise):
    max_order = t.solver_order
    alpha, sigma_t = _alpha_sigma(t.sigmas[i])
    model_t = param.x0_vp(raw, x, alpha, sigma_t)
    history, count = state.history, state.count

    # Corrector: the previous step, redone with this output (its sigmas: i, i - 1, i - 2, ...).
    correct_sigmas = t.sigmas[jnp.maximum(i - jnp.arange(max_order + 1), 0)]
    correctors = [
        (lambda k: lambda ops: _unipc_correct(k, correct_sigmas, *ops))(k) for k in range(1, max_order + 1)
    ]
    corrected = lax.cond(
        (count > 0) & t.corrects[i],
        lambda ops: lax.switch(state.last_order - 1, correctors, ops),
        lambda ops: x,
        (state.last_sample, history, model_t),
    )
    history = push_newest_last(history, model_t)
    order = jnp.minimum(t.max_order[i], count + 1)
    predict_sigmas = t.sigmas[jnp.maximum(i + 1 - jnp.arange(max_order + 1), 0)]
    predictors = [
        (lambda k: lambda ops: _unipc_predict(k, predict_sigmas, *ops))(k) for k in range(1, max_order + 1)
    ]
    x = lax.switch(order - 1, predictors, (corrected, history))
    return x, UniPCState(count=count + 1, history=history, last_sample=corrected, last_order=order)


_DPMPP = {"solver_order": 2, "lower_order_final": True, "use_karras_sigmas": False, "solver_type": "midpoint"}

DPMPP_2M = Sampler(partial(build_dpmpp, sde=False), step_dpmpp, init_dpmpp, options={**_DPMPP, **K_GRID})
DPMPP_2M_KARRAS = Sampler(
    partial(build_dpmpp, sde=False), step_dpmpp, init_dpmpp, options={**_DPMPP, "use_karras_sigmas": True}
)
DPMPP_2M_SDE = Sampler(
    partial(build_dpmpp, sde=True), step_dpmpp, init_dpmpp, options={**_DPMPP, **K_GRID}, stochastic=always
)
UNIPC = Sampler(
    build_unipc,
    step_unipc,
    init_unipc,
    options={"solver_order": 2, "use_karras_sigmas": False, "disable_corrector": ()},
)
