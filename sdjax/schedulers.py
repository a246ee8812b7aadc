"""Functional diffusion schedulers: host-built schedules and one pure step function per sampler.

A sampler is chosen by name on top of the model's training noise schedule (``SchedulerConfig``),
like diffusers' ``Scheduler.from_config``. ``make_schedule`` computes everything that depends only
on the step count on the host with numpy (timesteps, sigmas, LMS coefficients), reproducing the
float32 / float64 arithmetic of the diffusers scheduler of the same name so trajectories match it
step for step. What depends on the sample runs under jit in float32 inside one ``lax.scan``
(``sdjax.sampling.sample``).

Conventions of every step function ``step(s, i, x, state, raw, noise, param) -> (x, state)``:

- ``i`` is the index of the model evaluation (Heun evaluates the model twice per step, PNDM once
  more than its step count); ``s.timesteps[i]`` is the U-Net timestep of that evaluation and the
  U-Net input is ``x / s.tables["input_divisor"][i]``.
- ``raw`` is the model output as the model predicts it; ``param`` (``parameterization``) turns it
  into the denoised sample or the noise, so the samplers never know the prediction type.
- ``state`` is a dict of arrays built by the sampler's ``init`` (history buffers, and a ``count``
  of evaluations since the start where the order depends on it); data-dependent choices (which
  order to use, first or second Heun stage) are ``jnp.where`` / ``lax.switch`` on arrays, never
  Python ``if``. Python ``if`` only picks static structure (solver order branches, SDE or not).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sdjax.config import SchedulerConfig

SCHEDULERS = (
    "ddim",
    "ddpm",
    "pndm",
    "lms",
    "euler",
    "euler_a",
    "heun",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde",
    "unipc",
)

# The diffusers scheduler each name matches, with the config entries it sets on top of the model's
# scheduler config (for tests and for users moving between the two libraries).
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

_F32 = np.float32


# --------------------------------------------------------------------------------------------
# Training noise schedule (host, numpy, bit-compatible with diffusers' torch float32 tables)
# --------------------------------------------------------------------------------------------


def _linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """``torch.linspace(start, end, num, dtype=float32)``: fp32 step, each half anchored at its end."""
    start32, end32 = _F32(start), _F32(end)
    if num == 1:
        return np.array([start32], _F32)
    step = _F32((end32 - start32) / _F32(num - 1))
    idx = np.arange(num)
    from_start = np.float64(start32) + np.float64(step) * idx
    from_end = np.float64(end32) - np.float64(step) * (num - 1 - idx)
    return np.where(idx < num // 2, from_start, from_end).astype(_F32)


def _cumprod_f32(values: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 CPU tensor, which accumulates in float64."""
    return np.cumprod(values.astype(np.float64)).astype(_F32)


def _squaredcos_cap_v2_betas(num: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num) / alpha_bar(i / num), max_beta) for i in range(num)]
    return np.array(betas, np.float64).astype(_F32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR (arXiv:2305.08891, Alg. 1)."""
    root = np.sqrt(_cumprod_f32(_F32(1.0) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alpha_bar = root * root
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (_F32(1.0) - alphas).astype(_F32)


def training_betas(config: SchedulerConfig) -> np.ndarray:
    """The float32 betas of the model's training schedule."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return np.asarray(config.trained_betas, np.float64).astype(_F32)
    if config.beta_schedule == "linear":
        return _linspace_f32(config.beta_start, config.beta_end, n)
    if config.beta_schedule == "scaled_linear":
        root = _linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n)
        return root * root
    if config.beta_schedule == "squaredcos_cap_v2":
        return _squaredcos_cap_v2_betas(n)
    raise ValueError(
        f"beta_schedule={config.beta_schedule!r} is not supported; "
        "supported: ['linear', 'scaled_linear', 'squaredcos_cap_v2']"
    )


def training_alphas_cumprod(config: SchedulerConfig, *, zero_snr: bool, terminal_fix: bool) -> np.ndarray:
    """float32 alpha_bar(t). ``zero_snr`` applies the config's rescale (for samplers that support
    it); ``terminal_fix`` then sets the last value to 2**-24 as diffusers' sigma-based samplers do,
    so that sigma stays finite."""
    betas = training_betas(config)
    rescale = zero_snr and config.rescale_betas_zero_snr
    if rescale:
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = _cumprod_f32(_F32(1.0) - betas)
    if rescale and terminal_fix:
        alphas_cumprod[-1] = _F32(2.0**-24)
    return alphas_cumprod


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """k-diffusion sigma(t) = sqrt((1 - alpha_bar) / alpha_bar), in float32."""
    return np.sqrt((_F32(1.0) - alphas_cumprod) / alphas_cumprod).astype(_F32)


# --------------------------------------------------------------------------------------------
# Sampling timesteps and sigmas (host)
# --------------------------------------------------------------------------------------------


def _discrete_timesteps(config: SchedulerConfig, n: int, *, round_linspace: bool) -> np.ndarray:
    """Descending timesteps of DDIM, DDPM and the k-diffusion samplers, as float64 values."""
    num_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        t = np.linspace(0, num_train - 1, n)
        return (t.round() if round_linspace else t)[::-1].copy()
    if config.timestep_spacing == "leading":
        return (np.arange(n) * (num_train // n)).round()[::-1] + config.steps_offset
    return np.round(np.arange(num_train, 0, -num_train / n)) - 1.0  # trailing


def _multistep_timesteps(config: SchedulerConfig, n: int) -> np.ndarray:
    """Descending integer timesteps of DPM-Solver and UniPC (n + 1 points, the last dropped)."""
    num_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, num_train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = num_train // (n + 1)
        return (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    return np.arange(num_train, 0, -num_train / n).round().astype(np.int64) - 1  # trailing


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels: uniform in sigma**(1/rho), float64."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_timestep(sigmas: np.ndarray, log_sigma_table: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigma_table[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigma_table) - 2)
    lo, hi = log_sigma_table[low], log_sigma_table[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _interp_sigmas(sigma_table: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    return np.interp(timesteps, np.arange(len(sigma_table)), sigma_table)


def _k_diffusion_sigmas(config, n, alphas_cumprod, use_karras_sigmas):
    """Timesteps (float32) and sigmas (float32, a final 0 appended) of Euler, Heun and LMS."""
    sigma_table = sigmas_from_alphas_cumprod(alphas_cumprod)
    timesteps = _discrete_timesteps(config, n, round_linspace=False).astype(_F32)
    sigmas = _interp_sigmas(sigma_table, timesteps)
    if use_karras_sigmas:
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
        timesteps = sigma_to_timestep(sigmas, np.log(sigma_table)).astype(_F32)
    return timesteps, np.concatenate([sigmas, [0.0]]).astype(_F32)


def _k_diffusion_init_sigma(config: SchedulerConfig, sigmas: np.ndarray) -> float:
    sigma_max = sigmas.max()
    if config.timestep_spacing in ("linspace", "trailing"):
        return float(sigma_max)
    return float(np.sqrt(sigma_max * sigma_max + _F32(1.0)))


def _multistep_sigmas(config, n, alphas_cumprod, use_karras_sigmas, round_karras_timesteps):
    """Timesteps and sigmas (a final 0 appended) of DPM-Solver and UniPC."""
    sigma_table = sigmas_from_alphas_cumprod(alphas_cumprod)
    timesteps = _multistep_timesteps(config, n)
    if use_karras_sigmas:
        sigmas = karras_sigmas(float(sigma_table[0]), float(sigma_table[-1]), n)
        timesteps = sigma_to_timestep(sigmas, np.log(sigma_table))
        if round_karras_timesteps:
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)
    else:
        sigmas = _interp_sigmas(sigma_table, timesteps)
    return timesteps, np.concatenate([sigmas, [0.0]]).astype(_F32)


def _lms_coefficients(sigmas: np.ndarray, max_order: int = 4) -> np.ndarray:
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
    return coeffs.astype(_F32)


# --------------------------------------------------------------------------------------------
# The schedule pytree
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A sampler for a fixed number of steps: host-computed arrays plus static facts.

    A pytree: ``timesteps`` and ``tables`` are leaves (traced under jit), the rest is static, so
    the same schedule object can be an argument of a jitted function; a different step count or
    sampler changes the shapes or the static part and recompiles, nothing else does.
    """

    name: str
    prediction_type: str
    num_steps: int
    # Model evaluations per inference step for image-to-image offsets (Heun: 2), as diffusers' order.
    order: int
    # The pipeline scales unit-variance initial noise by this (sigma_max for k-diffusion samplers).
    init_noise_sigma: float
    # Whether the step consumes fresh Gaussian noise.
    stochastic: bool
    options: tuple
    timesteps: jax.Array  # (num_evals,) float32: the U-Net timestep of each model evaluation
    tables: dict  # name -> jax.Array, read by the sampler's step function

    @property
    def num_evals(self) -> int:
        """Length of the sampling scan (model evaluations)."""
        return self.timesteps.shape[0]

    def option(self, name: str) -> Any:
        return dict(self.options)[name]


jax.tree_util.register_dataclass(
    Schedule,
    data_fields=["timesteps", "tables"],
    meta_fields=["name", "prediction_type", "num_steps", "order", "init_noise_sigma", "stochastic", "options"],
)


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


def _alpha_sigma(sigma):
    """VP coefficients (alpha_t, sigma_t) of a k-diffusion sigma."""
    alpha = 1 / jnp.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


def _clip_range(config: SchedulerConfig) -> float:
    return config.clip_sample_range if config.clip_sample else np.inf


def _slope(x, x0, sigma):
    """k-diffusion ODE slope dx/dsigma = (x - x0) / sigma."""
    return (x - x0) / sigma


def _push_newest_first(buffer, value):
    return jnp.concatenate([value[None], buffer[:-1]])


def _push_newest_last(buffer, value):
    return jnp.concatenate([buffer[1:], value[None]])


# --------------------------------------------------------------------------------------------
# DDIM / DDPM
# --------------------------------------------------------------------------------------------


def _build_ddim(config, n, options):
    alphas_cumprod = training_alphas_cumprod(config, zero_snr=True, terminal_fix=False)
    final = _F32(1.0) if config.set_alpha_to_one else alphas_cumprod[0]
    timesteps = _discrete_timesteps(config, n, round_linspace=True).astype(np.int64)
    # diffusers steps to t - T // n whatever the spacing, not to the next listed timestep.
    prev = timesteps - config.num_train_timesteps // n
    tables = dict(
        alpha_prod=alphas_cumprod[timesteps],
        alpha_prod_prev=np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], final),
        eta=_F32(options["eta"]),
        clip=_F32(_clip_range(config)),
    )
    return timesteps, tables, 1.0, _vp_noising(alphas_cumprod[timesteps])


def _step_ddim(s, i, x, state, raw, noise, param):
    t = s.tables
    alpha_prod, alpha_prod_prev = t["alpha_prod"][i], t["alpha_prod_prev"][i]
    beta_prod = 1 - alpha_prod
    alpha, sigma = jnp.sqrt(alpha_prod), jnp.sqrt(beta_prod)
    x0 = jnp.clip(param.x0_vp(raw, x, alpha, sigma), -t["clip"], t["clip"])
    eps = param.eps_vp(raw, x, alpha, sigma)
    variance = ((1 - alpha_prod_prev) / beta_prod) * (1 - alpha_prod / alpha_prod_prev)
    std = t["eta"] * jnp.sqrt(variance)
    direction = jnp.sqrt(1 - alpha_prod_prev - std**2) * eps
    return jnp.sqrt(alpha_prod_prev) * x0 + direction + std * noise, state


def _build_ddpm(config, n, options):
    alphas_cumprod = training_alphas_cumprod(config, zero_snr=True, terminal_fix=False)
    timesteps = _discrete_timesteps(config, n, round_linspace=True).astype(np.int64)
    prev = np.concatenate([timesteps[1:], [-1]])
    tables = dict(
        alpha_prod=alphas_cumprod[timesteps],
        alpha_prod_prev=np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], _F32(1.0)),
        adds_noise=(timesteps > 0).astype(_F32),
        clip=_F32(_clip_range(config)),
    )
    return timesteps, tables, 1.0, _vp_noising(alphas_cumprod[timesteps])


def _step_ddpm(s, i, x, state, raw, noise, param):
    t = s.tables
    alpha_prod, alpha_prod_prev = t["alpha_prod"][i], t["alpha_prod_prev"][i]
    beta_prod, beta_prod_prev = 1 - alpha_prod, 1 - alpha_prod_prev
    current_alpha = alpha_prod / alpha_prod_prev
    current_beta = 1 - current_alpha
    x0 = param.x0_vp(raw, x, jnp.sqrt(alpha_prod), jnp.sqrt(beta_prod))
    x0 = jnp.clip(x0, -t["clip"], t["clip"])
    x0_coeff = (jnp.sqrt(alpha_prod_prev) * current_beta) / beta_prod
    x_coeff = jnp.sqrt(current_alpha) * beta_prod_prev / beta_prod
    mean = x0_coeff * x0 + x_coeff * x
    variance = jnp.maximum((1 - alpha_prod_prev) / (1 - alpha_prod) * current_beta, 1e-20)
    return mean + (jnp.sqrt(variance) * noise) * t["adds_noise"][i], state


def _vp_noising(alpha_prod):
    """add_noise coefficients z = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise."""
    return np.sqrt(alpha_prod).astype(_F32), np.sqrt(_F32(1.0) - alpha_prod).astype(_F32)


# --------------------------------------------------------------------------------------------
# PNDM (PLMS, optionally started with pseudo Runge-Kutta steps)
# --------------------------------------------------------------------------------------------


def _pndm_ascending_timesteps(config, n):
    num_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, num_train - 1, n).round().astype(np.int64)
    if config.timestep_spacing == "leading":
        return (np.arange(n) * (num_train // n)).round().astype(np.int64) + config.steps_offset
    return np.round(np.arange(num_train, 0, -num_train / n))[::-1].astype(np.int64) - 1


def _build_pndm(config, n, options):
    alphas_cumprod = training_alphas_cumprod(config, zero_snr=False, terminal_fix=False)
    final = _F32(1.0) if config.set_alpha_to_one else alphas_cumprod[0]
    ascending = _pndm_ascending_timesteps(config, n)
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
    tables = dict(
        passed_timestep=passed.astype(np.int32),
        prk_timestep=(prk if len(prk) else np.zeros(1)).astype(np.int32),
        num_prk=np.int32(len(prk)),
        ratio=np.int32(ratio),
        alphas_cumprod=alphas_cumprod,
        final_alpha_prod=_F32(final),
    )
    return passed, tables, 1.0, _vp_noising(alphas_cumprod[passed])


def _init_pndm(s, x):
    zeros = jnp.zeros_like(x)
    return dict(
        count=jnp.int32(0),
        ets=jnp.zeros((4,) + x.shape, x.dtype),  # raw model outputs, newest first
        num_ets=jnp.int32(0),
        cur_sample=zeros,
        rk_sum=zeros,
    )


def _step_pndm(s, i, x, state, raw, noise, param):
    t = s.tables
    count, ets, num_ets = state["count"], state["ets"], state["num_ets"]
    passed = t["passed_timestep"][i]
    in_prk = count < t["num_prk"]
    phase = count % 4

    # Which alpha_bar pair this evaluation steps between. diffusers derives it from the passed
    # timestep and its own counter, which is also what it does when image-to-image starts midway.
    half_ratio = t["ratio"] // 2
    prk_t = t["prk_timestep"][jnp.minimum(count // 4 * 4, t["prk_timestep"].shape[0] - 1)]
    prk_prev = passed - jnp.where(count % 2 == 1, 0, half_ratio)
    plms_redo = count == 1  # PLMS re-does its first step with the averaged slope
    timestep = jnp.where(in_prk, prk_t, jnp.where(plms_redo, passed + t["ratio"], passed))
    prev = jnp.where(in_prk, prk_prev, jnp.where(plms_redo, passed, passed - t["ratio"]))

    appends = jnp.where(in_prk, phase == 0, ~plms_redo)
    ets = jnp.where(appends, _push_newest_first(ets, raw), ets)
    num_ets = jnp.where(appends, jnp.minimum(num_ets + 1, 4), num_ets)
    keeps_sample = jnp.where(in_prk, phase == 0, count == 0)
    cur_sample = jnp.where(keeps_sample, x, state["cur_sample"])

    # Runge-Kutta: weights 1/6, 1/3, 1/3, 1/6; the first three evaluations step with their own output.
    rk_weight = jnp.where((phase == 0) | (phase == 3), 1 / 6, 1 / 3)
    rk_sum = jnp.where(phase == 0, 0.0, state["rk_sum"])
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

    alpha_prod = t["alphas_cumprod"][timestep]
    alpha_prod_prev = jnp.where(prev >= 0, t["alphas_cumprod"][jnp.maximum(prev, 0)], t["final_alpha_prod"])
    beta_prod, beta_prod_prev = 1 - alpha_prod, 1 - alpha_prod_prev
    eps = param.eps_vp(model_output, sample, jnp.sqrt(alpha_prod), jnp.sqrt(beta_prod))
    sample_coeff = jnp.sqrt(alpha_prod_prev / alpha_prod)
    denom = alpha_prod * jnp.sqrt(beta_prod_prev) + jnp.sqrt(alpha_prod * beta_prod * alpha_prod_prev)
    x = sample_coeff * sample - (alpha_prod_prev - alpha_prod) * eps / denom
    state = dict(count=count + 1, ets=ets, num_ets=num_ets, cur_sample=cur_sample, rk_sum=rk_sum)
    return x, state


# --------------------------------------------------------------------------------------------
# k-diffusion samplers: LMS, Euler, Euler ancestral, Heun
# --------------------------------------------------------------------------------------------


def _input_divisor(sigmas):
    return np.sqrt(sigmas * sigmas + _F32(1.0)).astype(_F32)


def _ve_noising(sigmas):
    """add_noise coefficients x = x0 + sigma noise."""
    return np.ones_like(sigmas), sigmas


def _build_lms(config, n, options):
    alphas_cumprod = training_alphas_cumprod(config, zero_snr=False, terminal_fix=False)
    timesteps, sigmas = _k_diffusion_sigmas(config, n, alphas_cumprod, options["use_karras_sigmas"])
    tables = dict(
        sigmas=sigmas,
        input_divisor=_input_divisor(sigmas[:-1]),
        coeffs=_lms_coefficients(sigmas),
    )
    return timesteps, tables, _k_diffusion_init_sigma(config, sigmas), _ve_noising(sigmas[:-1])


def _init_lms(s, x):
    return dict(derivatives=jnp.zeros((4,) + x.shape, x.dtype))


def _step_lms(s, i, x, state, raw, noise, param):
    sigma = s.tables["sigmas"][i]
    derivative = _slope(x, param.x0_ve(raw, x, sigma), sigma)
    derivatives = _push_newest_first(state["derivatives"], derivative)
    # Slots not filled since the start are zero: like diffusers, which takes its order from the
    # absolute step index but only sums the derivatives it has (image-to-image starts midway).
    coeffs = s.tables["coeffs"][i]
    update = coeffs[0] * derivatives[0]
    for j in range(1, 4):
        update = update + coeffs[j] * derivatives[j]
    return x + update, dict(derivatives=derivatives)


def _build_euler(config, n, options):
    alphas_cumprod = training_alphas_cumprod(config, zero_snr=True, terminal_fix=True)
    timesteps, sigmas = _k_diffusion_sigmas(config, n, alphas_cumprod, options.get("use_karras_sigmas", False))
    tables = dict(sigmas=sigmas, input_divisor=_input_divisor(sigmas[:-1]))
    return timesteps, tables, _k_diffusion_init_sigma(config, sigmas), _ve_noising(sigmas[:-1])


def _step_euler(s, i, x, state, raw, noise, param):
    sigma, sigma_next = s.tables["sigmas"][i], s.tables["sigmas"][i + 1]
    derivative = _slope(x, param.x0_ve(raw, x, sigma), sigma)
    return x + derivative * (sigma_next - sigma), state


def _step_euler_ancestral(s, i, x, state, raw, noise, param):
    sigma, sigma_next = s.tables["sigmas"][i], s.tables["sigmas"][i + 1]
    sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = jnp.sqrt(sigma_next**2 - sigma_up**2)
    derivative = _slope(x, param.x0_ve(raw, x, sigma), sigma)
    x = x + derivative * (sigma_down - sigma)
    return x + noise * sigma_up, state


def _build_heun(config, n, options):
    alphas_cumprod = training_alphas_cumprod(config, zero_snr=False, terminal_fix=False)
    timesteps, sigmas = _k_diffusion_sigmas(config, n, alphas_cumprod, options["use_karras_sigmas"])
    # Every sigma but the first and the last is visited twice: Euler stage, then correction.
    sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
    timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
    tables = dict(
        sigmas=sigmas,
        input_divisor=_input_divisor(sigmas[:-1]),
        is_euler_stage=np.arange(len(timesteps)) % 2 == 0,
        clip=_F32(_clip_range(config)),
    )
    return timesteps, tables, _k_diffusion_init_sigma(config, sigmas), _ve_noising(sigmas[:-1])


def _init_heun(s, x):
    return dict(derivative=jnp.zeros_like(x), dt=jnp.float32(0.0), sample=jnp.zeros_like(x))


def _step_heun(s, i, x, state, raw, noise, param):
    t = s.tables
    sigma, sigma_next = t["sigmas"][i], t["sigmas"][i + 1]
    x0 = jnp.clip(param.x0_ve(raw, x, sigma), -t["clip"], t["clip"])
    derivative = _slope(x, x0, sigma)
    euler = t["is_euler_stage"][i]
    # Euler stage: step with this slope and remember it; correction: average the two slopes and
    # redo the step from the remembered sample.
    slope = jnp.where(euler, derivative, (state["derivative"] + derivative) / 2)
    dt = jnp.where(euler, sigma_next - sigma, state["dt"])
    start = jnp.where(euler, x, state["sample"])
    return start + slope * dt, dict(derivative=derivative, dt=dt, sample=x)


# --------------------------------------------------------------------------------------------
# DPM-Solver++ (2M, SDE) and UniPC: multistep solvers on the data prediction
# --------------------------------------------------------------------------------------------


def _build_dpmpp(config, n, options):
    alphas_cumprod = training_alphas_cumprod(config, zero_snr=True, terminal_fix=True)
    round_karras = config.beta_schedule != "squaredcos_cap_v2"
    timesteps, sigmas = _multistep_sigmas(config, n, alphas_cumprod, options["use_karras_sigmas"], round_karras)
    order = options["solver_order"]
    max_order = np.full(n, order, np.int32)
    if options["lower_order_final"] and 2 <= n < 15:
        max_order[-2] = min(order, 2)
    max_order[-1] = 1  # the final step to sigma = 0 is always first order (final_sigmas_type "zero")
    tables = dict(sigmas=sigmas, max_order=max_order)
    return timesteps, tables, 1.0, _multistep_noising(sigmas[:-1])


def _multistep_noising(sigmas):
    alpha = (_F32(1.0) / np.sqrt(sigmas * sigmas + _F32(1.0))).astype(_F32)
    return alpha, (sigmas * alpha).astype(_F32)


def _init_dpmpp(s, x):
    history = jnp.zeros((s.option("solver_order"),) + x.shape, x.dtype)  # x0 predictions, newest last
    return dict(count=jnp.int32(0), history=history)


def _init_unipc(s, x):
    # last_sample / last_order: the previous predictor step, which the corrector redoes.
    return dict(_init_dpmpp(s, x), last_sample=jnp.zeros_like(x), last_order=jnp.int32(1))


def _log_snr(sigma):
    alpha, sigma_t = _alpha_sigma(sigma)
    return alpha, sigma_t, jnp.log(alpha) - jnp.log(sigma_t)


def _dpmpp_update(order, solver_type, sde, sigmas, x, history, noise):
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
        if order == 2 and solver_type == "midpoint":
            weights.append(0.5 * (alpha_t * (1 - decay)))
        elif order >= 2:
            weights.append(alpha_t * ((1.0 - decay) / (-2.0 * h) + 1.0))
        if order == 3:
            weights.append(alpha_t * ((1.0 - decay - 2.0 * h) / (2.0 * h) ** 2 - 0.5))
    else:
        x_coeff = sigma_t / sigma_s0
        weights = [-(alpha_t * (jnp.exp(-h) - 1.0))]
        if order == 2 and solver_type == "midpoint":
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


def _make_step_dpmpp(sde: bool):
    def step(s, i, x, state, raw, noise, param):
        sigmas_all = s.tables["sigmas"]
        sigma = sigmas_all[i]
        alpha, sigma_t = _alpha_sigma(sigma)
        history = _push_newest_last(state["history"], param.x0_vp(raw, x, alpha, sigma_t))
        sigmas = sigmas_all[jnp.maximum(i + jnp.array([1, 0, -1, -2]), 0)]
        order = jnp.minimum(s.tables["max_order"][i], state["count"] + 1)
        solver_type = s.option("solver_type")
        branches = [
            (lambda k: lambda ops: _dpmpp_update(k, solver_type, sde, *ops))(k)
            for k in range(1, s.option("solver_order") + 1)
        ]
        x = lax.switch(order - 1, branches, (sigmas, x, history, noise))
        return x, dict(state, count=state["count"] + 1, history=history)

    return step


def _build_unipc(config, n, options):
    alphas_cumprod = training_alphas_cumprod(config, zero_snr=True, terminal_fix=True)
    timesteps, sigmas = _multistep_sigmas(config, n, alphas_cumprod, options["use_karras_sigmas"], True)
    # lower_order_final: the order drops towards the end (diffusers' default; without it the
    # last step to sigma = 0 is singular).
    max_order = np.minimum(options["solver_order"], n - np.arange(n))
    disabled = set(options["disable_corrector"])
    corrects = np.array([(k - 1) not in disabled for k in range(n)])
    tables = dict(sigmas=sigmas, max_order=max_order.astype(np.int32), corrects=corrects)
    return timesteps, tables, 1.0, _multistep_noising(sigmas[:-1])


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


def _step_unipc(s, i, x, state, raw, noise, param):
    sigmas_all = s.tables["sigmas"]
    max_order = s.option("solver_order")
    alpha, sigma_t = _alpha_sigma(sigmas_all[i])
    model_t = param.x0_vp(raw, x, alpha, sigma_t)
    history, count = state["history"], state["count"]

    # Corrector: the previous step, redone with this output (its sigmas: i, i - 1, i - 2, ...).
    correct_sigmas = sigmas_all[jnp.maximum(i - jnp.arange(max_order + 1), 0)]
    correctors = [
        (lambda k: lambda ops: _unipc_correct(k, correct_sigmas, *ops))(k)
        for k in range(1, max_order + 1)
    ]
    corrected = lax.cond(
        (count > 0) & s.tables["corrects"][i],
        lambda ops: lax.switch(state["last_order"] - 1, correctors, ops),
        lambda ops: x,
        (state["last_sample"], history, model_t),
    )
    history = _push_newest_last(history, model_t)
    order = jnp.minimum(s.tables["max_order"][i], count + 1)
    predict_sigmas = sigmas_all[jnp.maximum(i + 1 - jnp.arange(max_order + 1), 0)]
    predictors = [
        (lambda k: lambda ops: _unipc_predict(k, predict_sigmas, *ops))(k)
        for k in range(1, max_order + 1)
    ]
    x = lax.switch(order - 1, predictors, (corrected, history))
    return x, dict(count=count + 1, history=history, last_sample=corrected, last_order=order)


# --------------------------------------------------------------------------------------------
# Registry and public constructors
# --------------------------------------------------------------------------------------------


def _no_state(s, x):
    return {}


@dataclasses.dataclass(frozen=True)
class _Sampler:
    build: Callable  # (config, num_steps, options) -> (timesteps, tables, init_sigma, (x0 coeffs, noise coeffs))
    step: Callable
    init: Callable = _no_state
    options: dict = dataclasses.field(default_factory=dict)
    order: int = 1  # model evaluations per inference step, for image-to-image offsets
    stochastic: Callable = lambda options: False


_KARRAS = {"use_karras_sigmas": False}
_DPMPP = {"solver_order": 2, "lower_order_final": True, "use_karras_sigmas": False, "solver_type": "midpoint"}
_ALWAYS = lambda options: True  # noqa: E731

_SAMPLERS = {
    "ddim": _Sampler(_build_ddim, _step_ddim, options={"eta": 0.0}, stochastic=lambda o: o["eta"] > 0),
    "ddpm": _Sampler(_build_ddpm, _step_ddpm, stochastic=_ALWAYS),
    "pndm": _Sampler(_build_pndm, _step_pndm, _init_pndm, options={"skip_prk_steps": None}),
    "lms": _Sampler(_build_lms, _step_lms, _init_lms, options=_KARRAS),
    "euler": _Sampler(_build_euler, _step_euler, options=_KARRAS),
    "euler_a": _Sampler(_build_euler, _step_euler_ancestral, stochastic=_ALWAYS),
    "heun": _Sampler(_build_heun, _step_heun, _init_heun, options=_KARRAS, order=2),
    "dpmpp_2m": _Sampler(_build_dpmpp, _make_step_dpmpp(sde=False), _init_dpmpp, options=_DPMPP),
    "dpmpp_2m_karras": _Sampler(
        _build_dpmpp, _make_step_dpmpp(sde=False), _init_dpmpp, options={**_DPMPP, "use_karras_sigmas": True}
    ),
    "dpmpp_2m_sde": _Sampler(
        _build_dpmpp, _make_step_dpmpp(sde=True), _init_dpmpp, options=_DPMPP, stochastic=_ALWAYS
    ),
    "unipc": _Sampler(
        _build_unipc,
        _step_unipc,
        _init_unipc,
        options={"solver_order": 2, "use_karras_sigmas": False, "disable_corrector": ()},
    ),
}
assert tuple(_SAMPLERS) == SCHEDULERS

_OPTION_CHOICES = {"solver_order": (1, 2, 3), "solver_type": ("midpoint", "heun")}


def _check_options(name: str, sampler: _Sampler, options: dict, config: SchedulerConfig) -> dict:
    unknown = sorted(set(options) - set(sampler.options))
    if unknown:
        raise ValueError(
            f"scheduler {name!r} does not take option(s) {unknown}; it accepts {sorted(sampler.options)}"
        )
    merged = {**sampler.options, **options}
    if merged.get("skip_prk_steps", False) is None:
        merged["skip_prk_steps"] = config.skip_prk_steps
    for key, choices in _OPTION_CHOICES.items():
        if key in merged and merged[key] not in choices:
            raise ValueError(
                f"scheduler {name!r}: {key}={merged[key]!r} is not supported; choose from {list(choices)}"
            )
    if "eta" in merged and not merged["eta"] >= 0:
        raise ValueError(f"scheduler {name!r}: eta must be >= 0, got {merged['eta']!r}")
    if "disable_corrector" in merged:
        merged["disable_corrector"] = tuple(int(k) for k in merged["disable_corrector"])
    return merged


def make_schedule(name: str, config: SchedulerConfig, num_steps: int, **options) -> Schedule:
    """Build the schedule of sampler ``name`` for ``num_steps`` steps of the model's noise schedule.

    Raises ValueError for an unknown name (listing ``SCHEDULERS``), a step count outside
    1..num_train_timesteps, or an option the sampler does not take.

    Options (each only where the diffusers scheduler has it): ``eta`` (ddim), ``use_karras_sigmas``
    (lms, euler, heun, dpmpp_*, unipc), ``solver_order`` (dpmpp_*, unipc: 1-3),
    ``lower_order_final`` and ``solver_type`` ("midpoint" | "heun") (dpmpp_*),
    ``disable_corrector`` (unipc: step indices), ``skip_prk_steps`` (pndm; default from config).
    """
    if name not in _SAMPLERS:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {list(SCHEDULERS)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not 1 <= num_steps <= config.num_train_timesteps:
        raise ValueError(
            f"num_steps must be between 1 and num_train_timesteps={config.num_train_timesteps}, got {num_steps}"
        )
    num_steps = int(num_steps)
    parameterization(config.prediction_type)  # validates
    sampler = _SAMPLERS[name]
    opts = _check_options(name, sampler, options, config)
    timesteps, tables, init_sigma, (noise_x0, noise_eps) = sampler.build(config, num_steps, opts)
    tables = dict(tables, noise_x0=noise_x0, noise_eps=noise_eps)
    return Schedule(
        name=name,
        prediction_type=config.prediction_type,
        num_steps=num_steps,
        order=sampler.order,
        init_noise_sigma=float(init_sigma),
        stochastic=bool(sampler.stochastic(opts)),
        options=tuple(sorted(opts.items())),
        timesteps=jnp.asarray(np.asarray(timesteps, np.float64).astype(_F32)),
        tables={key: jnp.asarray(value) for key, value in tables.items()},
    )


def init_state(schedule: Schedule, x: jax.Array) -> dict:
    """The sampler's initial carry (history buffers, counters) for samples shaped like ``x``."""
    return _SAMPLERS[schedule.name].init(schedule, x)


def step(schedule: Schedule, i, x, state, raw, noise):
    """One scheduler step after model evaluation ``i``: returns the next sample and state (fp32)."""
    param = parameterization(schedule.prediction_type)
    raw = raw.astype(jnp.float32)
    return _SAMPLERS[schedule.name].step(schedule, i, x, state, raw, noise, param)


def model_input(schedule: Schedule, i, x):
    """The U-Net input and timestep of evaluation ``i`` (diffusers' ``scale_model_input``)."""
    divisor = schedule.tables.get("input_divisor")
    scaled = x if divisor is None else x / divisor[i]
    return scaled, schedule.timesteps[i]


def first_eval(schedule: Schedule, start_step):
    """Index of the first model evaluation when denoising starts at inference step ``start_step``.

    From ``num_steps`` on there is nothing to denoise: ``num_evals`` (PNDM's one extra evaluation
    must not run on its own)."""
    return jnp.where(jnp.asarray(start_step) >= schedule.num_steps, schedule.num_evals, start_step * schedule.order)


def add_noise(schedule: Schedule, x0, noise, step_index):
    """Noised samples at inference step ``step_index`` (diffusers' ``scheduler.add_noise`` at
    ``timesteps[step_index * order]``): sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise for DDIM,
    DDPM and PNDM, x0 + sigma noise for the k-diffusion samplers, alpha_t x0 + sigma_t noise for
    DPM-Solver and UniPC. ``step_index`` may be traced, and a scalar or one per sample (B,)."""
    e = jnp.minimum(first_eval(schedule, step_index), schedule.num_evals - 1)
    return noise_to_eval(schedule, x0, noise, e)


def noise_to_eval(schedule: Schedule, x0, noise, eval_index):
    """``x0`` noised to the level of model evaluation ``eval_index`` (a scalar or one per sample),
    the noise level the sampler expects before that evaluation."""
    x0 = jnp.asarray(x0, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    scale_x0, scale_noise = (
        _per_sample(schedule.tables[name][eval_index], x0.ndim) for name in ("noise_x0", "noise_eps")
    )
    return scale_x0 * x0 + scale_noise * noise


def _per_sample(value, ndim):
    return value.reshape(value.shape + (1,) * (ndim - value.ndim)) if value.ndim else value
