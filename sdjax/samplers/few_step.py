"""Few-step samplers of distilled models: LCM (latent consistency) and TCD (trajectory consistency),
on the variance-preserving sample z = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps.

Both take their timesteps from the distillation grid (``sdjax.schedules.consistency_timesteps``:
``original_inference_steps`` points, every ``num_train_timesteps // original_inference_steps``-th
timestep) as diffusers' ``LCMScheduler`` / ``TCDScheduler`` do, or from an explicit descending
``timesteps`` list. Each step predicts x0 through the model's parameterization, then:

- LCM: applies the consistency boundary condition, denoised = c_out x0 + c_skip z with
  c_skip = sigma_data**2 / ((10 t)**2 + sigma_data**2), c_out = 10 t / sqrt((10 t)**2 + sigma_data**2)
  (sigma_data = 0.5, 10 = ``timestep_scaling``), and re-noises it to the next timestep with fresh
  noise; the last step returns the denoised sample itself.
- TCD: moves x0 and the predicted noise to the intermediate timestep s = floor((1 - eta) t_next)
  (eta is the paper's gamma), then adds fresh noise from s to t_next; eta = 0 is deterministic.
  The last step returns the sample at s = 0 (not x0): diffusers' convention.

With the option ``sigmas`` ("uniform" | "karras" | "exponential") lcm is A1111's "LCM" sampler instead
(``sdjax.schedules.lcm_a1111_grid``): k-diffusion sigmas on the distillation grid, each step's U-Net
timestep the nearest grid timestep, the same boundary condition and re-noising in k-diffusion's
x = x0 + sigma eps form (A1111 mixes c_skip with that x, not with the VP sample; with c_skip below
1e-5 at every grid timestep this changes little). A1111 treats every model as epsilon-predicting
there; sdjax uses the model's parameterization.

The grid options (``original_inference_steps``, ``strength``, ``timesteps``, ``timestep_scaling``)
and ``eta`` only change table values: they are left out of the static ``Schedule.options``, so
schedules that differ in them share one compilation (except eta = 0, which draws no noise, against
eta > 0). ``guidance_embedding`` is the w-embedding that guidance-distilled U-Nets (LCM,
``time_cond_proj_dim``) take as ``timestep_cond``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.samplers.schedule import Sampler, SamplerArrays, always, clip_range, static_field
from sdjax.schedules import consistency_timesteps, lcm_a1111_grid, training_alphas_cumprod

_F32 = np.float32
SIGMA_DATA = 0.5  # the data standard deviation of LCM's boundary condition


def guidance_embedding(w: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding (B, dim) float32 of guidance weights ``w`` (B,), diffusers'
    ``get_guidance_scale_embedding``: w is scaled by 1000, then [sin | cos] at frequencies
    10000 ** (-i / (dim // 2 - 1)), zero-padded to an odd ``dim``. Diffusers' LCM pipelines pass
    w = guidance_scale - 1 as the U-Net's ``timestep_cond``."""
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 1:
        raise ValueError(f"guidance weights must be one per image, shape (B,); got shape {w.shape}")
    half = dim // 2
    step = jnp.log(jnp.float32(10000.0)) / (half - 1)
    angles = (w * 1000.0)[:, None] * jnp.exp(jnp.arange(half, dtype=jnp.float32) * -step)[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LCMTables:
    # (num_evals,) the noise level of each evaluation: alpha_bar (diffusers), or the k-diffusion sigma of
    # samples x = x0 + sigma eps (A1111's LCM, ``k_diffusion``).
    level: jax.Array
    clip: jax.Array  # () x0 clipping range
    c_skip: jax.Array  # (num_evals,) boundary-condition weight of the sample
    c_out: jax.Array  # (num_evals,) boundary-condition weight of x0
    # (num_evals,) re-noising to the next level: x = next_signal * denoised + next_noise * noise
    # (sqrt(alpha_bar), sqrt(1 - alpha_bar) there, or 1, sigma); 1, 0 after the last evaluation.
    next_signal: jax.Array
    next_noise: jax.Array
    k_diffusion: bool = static_field()


class TCDTables(NamedTuple):
    alphas_cumprod: jax.Array  # (num_train_timesteps,): alpha_bar of the traced intermediate timestep s
    alpha_prod: jax.Array  # (num_evals,)
    alpha_prod_next: jax.Array  # (num_evals,) alpha_bar of the next timestep (t = 0 after the last)
    next_timestep: jax.Array  # (num_evals,) float32
    one_minus_eta: jax.Array  # () float32(1 - eta), rounded once as diffusers' torch arithmetic does
    renoises: jax.Array  # (num_evals,) 1 where the step adds noise, 0 at the last


def _timesteps(config, n: int, options) -> np.ndarray:
    """The evaluations' timesteps: the distillation grid, or the caller's descending ``timesteps``."""
    custom = options["timesteps"]
    if custom is None:
        return consistency_timesteps(
            config.num_train_timesteps, n, options["original_inference_steps"], options["strength"]
        )
    custom = np.asarray(custom, np.int64)
    if len(custom) != n:
        raise ValueError(f"timesteps has {len(custom)} entries but num_steps={n}; pass num_steps=len(timesteps)")
    if np.any(np.diff(custom) >= 0) or custom[0] >= config.num_train_timesteps or custom[-1] < 0:
        raise ValueError(
            f"timesteps must descend strictly within [0, {config.num_train_timesteps}); got {custom.tolist()}"
        )
    if options["strength"] != 1.0:
        raise ValueError(
            "strength cannot be combined with custom timesteps: to skip leading ones, start image-to-image "
            "at a later step (start_step) as diffusers' set_timesteps(timesteps=, strength=) does"
        )
    return custom


def _noising(alpha_prod):
    return np.sqrt(alpha_prod).astype(_F32), np.sqrt(_F32(1.0) - alpha_prod).astype(_F32)


def boundary_scalings(timesteps: np.ndarray, timestep_scaling: float):
    """LCM's (c_skip, c_out) of integer timesteps, in float32 as diffusers computes them."""
    scaled = timesteps.astype(_F32) * _F32(timestep_scaling)
    denominator = scaled * scaled + _F32(SIGMA_DATA**2)
    return (_F32(SIGMA_DATA**2) / denominator).astype(_F32), (scaled / np.sqrt(denominator)).astype(_F32)


def build_lcm(config, n, options) -> SamplerArrays:
    if options["sigmas"] is not None:
        return _build_lcm_a1111(config, n, options)
    alphas_cumprod = training_alphas_cumprod(config, zero_snr=True, terminal_fix=False)
    timesteps = _timesteps(config, n, options)
    alpha_prod = alphas_cumprod[timesteps]
    next_signal, next_noise = _noising(alphas_cumprod[np.concatenate([timesteps[1:], timesteps[-1:]])])
    next_signal[-1], next_noise[-1] = 1.0, 0.0
    c_skip, c_out = boundary_scalings(timesteps, options["timestep_scaling"])
    tables = LCMTables(alpha_prod, _F32(clip_range(config)), c_skip, c_out, next_signal, next_noise, k_diffusion=False)
    return SamplerArrays(timesteps, tables, 1.0, *_noising(alpha_prod))


def _build_lcm_a1111(config, n, options) -> SamplerArrays:
    """A1111's LCM: k-diffusion samples x = x0 + sigma eps, the model sees x / sqrt(sigma**2 + 1) at the
    nearest grid timestep, and the boundary condition mixes x0 with x itself (not the VP sample: A1111's
    formula), then adds sigma_next noise. x0 is never clipped."""
    if options["strength"] != 1.0 or options["timesteps"] is not None:
        raise ValueError("scheduler 'lcm': sigmas= (A1111's grid) cannot be combined with strength or timesteps")
    timesteps, sigmas = lcm_a1111_grid(config, n, options["sigmas"], options["original_inference_steps"])
    c_skip, c_out = boundary_scalings(timesteps, options["timestep_scaling"])
    evals = sigmas[:-1]
    ones = np.ones_like(evals)
    tables = LCMTables(evals, _F32(np.inf), c_skip, c_out, ones, sigmas[1:], k_diffusion=True)
    input_divisor = np.sqrt(evals * evals + _F32(1.0)).astype(_F32)
    return SamplerArrays(timesteps, tables, float(sigmas[0]), ones, evals, input_divisor)


def step_lcm(t: LCMTables, param, i, x, state, raw, noise):
    if t.k_diffusion:
        x0 = param.x0_ve(raw, x, t.level[i])
    else:
        alpha_prod = t.level[i]
        x0 = param.x0_vp(raw, x, jnp.sqrt(alpha_prod), jnp.sqrt(1 - alpha_prod))
    x0 = jnp.clip(x0, -t.clip, t.clip)
    denoised = t.c_out[i] * x0 + t.c_skip[i] * x
    return t.next_signal[i] * denoised + t.next_noise[i] * noise, state


def build_tcd(config, n, options) -> SamplerArrays:
    eta = float(options["eta"])
    if not 0 <= eta <= 1:
        raise ValueError(f"scheduler 'tcd': eta (gamma) must be in [0, 1], got {eta}")
    alphas_cumprod = training_alphas_cumprod(config, zero_snr=True, terminal_fix=False)
    timesteps = _timesteps(config, n, options)
    next_timestep = np.concatenate([timesteps[1:], [0]])
    tables = TCDTables(
        alphas_cumprod=alphas_cumprod,
        alpha_prod=alphas_cumprod[timesteps],
        alpha_prod_next=alphas_cumprod[next_timestep],
        next_timestep=next_timestep.astype(_F32),
        one_minus_eta=_F32(1.0 - eta),
        renoises=(np.arange(n) < n - 1).astype(_F32),
    )
    return SamplerArrays(timesteps, tables, 1.0, *_noising(alphas_cumprod[timesteps]))


def step_tcd(t: TCDTables, param, i, x, state, raw, noise):
    alpha_prod, alpha_prod_next = t.alpha_prod[i], t.alpha_prod_next[i]
    alpha, sigma = jnp.sqrt(alpha_prod), jnp.sqrt(1 - alpha_prod)
    x0, eps = param.x0_vp(raw, x, alpha, sigma), param.eps_vp(raw, x, alpha, sigma)
    s = jnp.floor(t.one_minus_eta * t.next_timestep[i]).astype(jnp.int32)
    alpha_prod_s = t.alphas_cumprod[s]
    noised = jnp.sqrt(alpha_prod_s) * x0 + jnp.sqrt(1 - alpha_prod_s) * eps
    # From s forward to the next timestep; eta = 0 gives s = t_next, ratio 1, no noise.
    ratio = alpha_prod_next / alpha_prod_s
    renoised = jnp.sqrt(ratio) * noised + jnp.sqrt(1 - ratio) * noise
    return jnp.where(t.renoises[i] > 0, renoised, noised), state


_GRID = {"original_inference_steps": 50, "strength": 1.0, "timesteps": None}

LCM = Sampler(
    build_lcm,
    step_lcm,
    options={**_GRID, "timestep_scaling": 10.0, "sigmas": None},
    stochastic=always,
    traced_options=(*_GRID, "timestep_scaling"),
)
TCD = Sampler(
    build_tcd,
    step_tcd,
    # diffusers' pipelines pass eta=0.0 unless told otherwise; TCD's recipes pass it (0.3 TCD, 1.0 Hyper-SD 1-step).
    options={**_GRID, "eta": 0.0},
    stochastic=lambda options: options["eta"] > 0,
    traced_options=(*_GRID, "eta"),
)


def config_defaults(name: str, config) -> dict:
    """The options of sampler ``name`` that the model's scheduler config sets (``original_inference_steps``,
    and ``timestep_scaling`` for lcm), as its LCMScheduler / TCDScheduler would take them."""
    keys = {"lcm": ("original_inference_steps", "timestep_scaling"), "tcd": ("original_inference_steps",)}
    return {key: getattr(config, key) for key in keys.get(name, ()) if getattr(config, key) is not None}
