"""Functional diffusion samplers: a ``Schedule`` value per sampler and step count.

A sampler is chosen by name on top of the model's training noise schedule (``SchedulerConfig``),
like diffusers' ``Scheduler.from_config``. ``make_schedule`` computes everything that depends only
on the step count on the host with numpy (timesteps, sigmas, LMS coefficients; ``sdjax.schedules``),
reproducing the float32 / float64 arithmetic of the diffusers scheduler of the same name so
trajectories match it step for step. What depends on the sample runs under jit in float32 inside
one ``lax.scan`` (``sdjax.sampling.sample``), through the step function the schedule carries.

Families: ``vp`` (DDIM, DDPM, PNDM), ``k`` (LMS, Euler, Euler ancestral, Heun), ``multistep``
(DPM-Solver++, UniPC), ``few_step`` (LCM, TCD: distilled models; ``guidance_embedding``). ``names``:
A1111 sampler names and schedule types (``from_a1111``, ``to_a1111``, ``resolve_sampler``).

A1111 / ComfyUI sampling: lms, euler, euler_a, heun, dpmpp_2m and dpmpp_2m_sde take ``sigmas`` =
"uniform" | "karras" | "exponential" (and ``quantize``), which replaces diffusers' grid by
k-diffusion 0.1.1's over the LDM sigma table and reproduces k-diffusion's samplers as A1111 wraps
them (``CompVisDenoiser``), initial noise scale included (tests/test_kdiffusion.py).

Per-step noise. sdjax's stochastic samplers (euler_a, dpmpp_2m_sde, ddpm, ddim with eta > 0) draw
the noise of model evaluation i of image b from ``fold_in(key[b], i)`` (``sampling.step_noise``), jax
keys: not A1111's numbers. A1111 1.6+ draws, per image, from that image's seed (its "RNG" setting:
a torch generator on the GPU, or on the CPU): for "Euler a" the next ``randn`` of the image's
generator after the initial latent at each step with a next sigma > 0 (k-diffusion's
``noise_sampler`` is A1111's ``torch.randn_like`` replacement; note that k-diffusion's Euler and Heun
draw and discard one ``randn_like`` per step too, so the stream advances for them as well); for
"DPM++ 2M SDE" a ``BrownianTreeNoiseSampler`` seeded with the image's seed over [sigma_min,
sigma_max] of the grid, whose noise for the step sigma -> sigma_next is the Brownian increment
W(sigma_next) - W(sigma) divided by sqrt(|sigma_next - sigma|) (sigma is the tree's time). To match
A1111 image for image, compute those tensors on the host and pass them to ``sampling.sample`` through
``noise_fn(i)`` (NHWC; evaluation i = step i for both samplers).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.config import TIMESTEP_SPACINGS, SchedulerConfig
from sdjax.schedules import K_DIFFUSION_GRIDS
from sdjax.samplers import few_step, k, multistep, vp
from sdjax.samplers.few_step import config_defaults, guidance_embedding
from sdjax.samplers.names import A1111_SAMPLERS, SCHEDULE_TYPES, from_a1111, resolve_sampler, to_a1111
from sdjax.samplers.schedule import (
    Parameterization,
    Sampler,
    Schedule,
    add_noise,
    first_eval,
    init_state,
    model_input,
    noise_to_eval,
    parameterization,
    per_sample,
    step,
)

__all__ = [
    "A1111_SAMPLERS",
    "SCHEDULE_TYPES",
    "from_a1111",
    "resolve_sampler",
    "to_a1111",
    "DIFFUSERS_DEFAULTS",
    "DIFFUSERS_SCHEDULERS",
    "TIMESTEP_SPACINGS",
    "SCHEDULERS",
    "Parameterization",
    "Schedule",
    "add_noise",
    "first_eval",
    "guidance_embedding",
    "init_state",
    "make_schedule",
    "model_input",
    "noise_to_eval",
    "parameterization",
    "per_sample",
    "step",
]

_SAMPLERS = {
    "ddim": vp.DDIM,
    "ddpm": vp.DDPM,
    "pndm": vp.PNDM,
    "lms": k.LMS,
    "euler": k.EULER,
    "euler_a": k.EULER_ANCESTRAL,
    "heun": k.HEUN,
    "dpmpp_2m": multistep.DPMPP_2M,
    "dpmpp_2m_karras": multistep.DPMPP_2M_KARRAS,
    "dpmpp_2m_sde": multistep.DPMPP_2M_SDE,
    "unipc": multistep.UNIPC,
    "lcm": few_step.LCM,
    "tcd": few_step.TCD,
}

SCHEDULERS = tuple(_SAMPLERS)

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
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}

# The defaults of each diffusers scheduler class for the config keys whose default differs between
# classes: a key absent from the model's scheduler config takes these (diffusers' ``from_config``).
_LEADING = {"timestep_spacing": "leading"}
_LINSPACE = {"timestep_spacing": "linspace"}
DIFFUSERS_DEFAULTS = {
    "ddim": {**_LEADING, "set_alpha_to_one": True, "clip_sample": True},
    "ddpm": {**_LEADING, "clip_sample": True},
    "pndm": {**_LEADING, "set_alpha_to_one": False, "skip_prk_steps": False},
    "lms": _LINSPACE,
    "euler": _LINSPACE,
    "euler_a": _LINSPACE,
    "heun": {**_LINSPACE, "clip_sample": False},
    "dpmpp_2m": _LINSPACE,
    "dpmpp_2m_karras": _LINSPACE,
    "dpmpp_2m_sde": _LINSPACE,
    "unipc": _LINSPACE,
    # LCM and TCD read neither the spacing nor set_alpha_to_one (their last step never looks below t = 0).
    "lcm": {**_LEADING, "set_alpha_to_one": True, "clip_sample": False},
    "tcd": {**_LEADING, "set_alpha_to_one": True},
}
# What the keys a sampler never reads resolve to (any value: unused).
_UNUSED = {"timestep_spacing": "leading", "set_alpha_to_one": False, "clip_sample": False, "skip_prk_steps": True}

_OPTION_CHOICES = {
    "solver_order": (1, 2, 3),
    "solver_type": ("midpoint", "heun"),
    "timestep_spacing": TIMESTEP_SPACINGS,
    "sigmas": (None,) + K_DIFFUSION_GRIDS,
    "quantize": (False, True),
}


def sampler_config(name: str, config: SchedulerConfig, timestep_spacing=None) -> SchedulerConfig:
    """``config`` with every key the model's file did not set filled with sampler ``name``'s diffusers
    default, and ``timestep_spacing`` (when given) overriding the file's."""
    defaults = {**_UNUSED, **DIFFUSERS_DEFAULTS[name]}
    filled = {key: defaults[key] for key in _UNUSED if getattr(config, key) is None}
    if timestep_spacing is not None:
        filled["timestep_spacing"] = timestep_spacing
    return dataclasses.replace(config, **filled)


def _check_options(name: str, sampler: Sampler, options: dict) -> dict:
    accepted = set(sampler.options) | {"timestep_spacing"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"scheduler {name!r} does not take option(s) {unknown}; it accepts {sorted(accepted)}")
    merged = {**sampler.options, **options}
    for key, choices in _OPTION_CHOICES.items():
        if key in merged and merged[key] not in choices:
            raise ValueError(
                f"scheduler {name!r}: {key}={merged[key]!r} is not supported; choose from {list(choices)}"
            )
    if merged.get("sigmas") is None and merged.get("quantize"):
        raise ValueError(f"scheduler {name!r}: quantize=True needs a k-diffusion grid, sigmas={list(K_DIFFUSION_GRIDS)}")
    if merged.get("sigmas") is not None:
        # A k-diffusion grid replaces diffusers' timestep choice: the options that shape it cannot apply.
        clashing = [key for key in ("timestep_spacing", "use_karras_sigmas") if options.get(key)]
        if clashing:
            raise ValueError(
                f"scheduler {name!r}: sigmas={merged['sigmas']!r} (a k-diffusion grid) cannot be combined "
                f"with {clashing}, which shape diffusers' grid"
            )
    if "eta" in merged and not merged["eta"] >= 0:
        raise ValueError(f"scheduler {name!r}: eta must be >= 0, got {merged['eta']!r}")
    if "disable_corrector" in merged:
        merged["disable_corrector"] = tuple(int(k) for k in merged["disable_corrector"])
    if merged.get("timesteps") is not None:
        merged["timesteps"] = tuple(int(t) for t in merged["timesteps"])
    return merged


def make_schedule(name: str, config: SchedulerConfig, num_steps: int, **options) -> Schedule:
    """Build the schedule of sampler ``name`` for ``num_steps`` steps of the model's noise schedule.

    Raises ValueError for an unknown name (listing ``SCHEDULERS``), a step count outside
    1..num_train_timesteps, or an option the sampler does not take.

    Options (each only where the diffusers scheduler has it): ``timestep_spacing`` ("leading" | "linspace" |
    "trailing", every sampler; default: the model config's, else the sampler's diffusers default), ``eta`` (ddim), ``use_karras_sigmas``
    (lms, euler, heun, dpmpp_*, unipc), ``solver_order`` (dpmpp_*, unipc: 1-3),
    ``lower_order_final`` and ``solver_type`` ("midpoint" | "heun") (dpmpp_*),
    ``disable_corrector`` (unipc: step indices), ``skip_prk_steps`` (pndm; default from config),
    ``sigmas`` (lms, euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde): None (default, diffusers' grid,
    unchanged) | "uniform" | "karras" | "exponential", k-diffusion's grids as A1111 samples
    (``sdjax.schedules.k_diffusion_grid``; not combinable with ``timestep_spacing`` or
    ``use_karras_sigmas``), ``quantize`` (with ``sigmas`` only; default False): integer U-Net timesteps,
    the nearest table entry, as A1111's "Enable quantization in K samplers".

    lcm and tcd (diffusers' ``LCMScheduler`` / ``TCDScheduler``; ``sdjax.samplers.few_step``):
    ``original_inference_steps`` (the distillation grid: the model's scheduler config's, else 50), ``strength`` (1.0; < 1 spreads
    the steps over the lowest part of that grid, ``set_timesteps(strength=)`` as diffusers' LCM
    image-to-image pipeline uses it: all ``num_steps`` run, from ``add_noise`` at step 0; the
    generic image-to-image of diffusers slices instead, sdjax's ``start_step``), ``timesteps``
    (None | a strictly descending list of ``num_steps`` integers, replacing the grid); lcm:
    ``timestep_scaling`` (the scheduler config's, else 10.0), ``sigmas`` (None | "uniform" | "karras" | "exponential": A1111's
    "LCM" sampler instead, ``sdjax.schedules.lcm_a1111_grid``); tcd: ``eta`` (gamma in [0, 1]; 0.0 as
    diffusers' pipelines pass it, TCD recipes use 0.3). All but ``sigmas`` only change table values
    and are not part of ``Schedule.options``: new values do not recompile (eta 0 against > 0 does).
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
    param = parameterization(config.prediction_type)
    sampler = _SAMPLERS[name]
    opts = _check_options(name, sampler, {**config_defaults(name, config), **options})
    config = sampler_config(name, config, opts.pop("timestep_spacing", None))
    if opts.get("skip_prk_steps", False) is None:
        opts["skip_prk_steps"] = config.skip_prk_steps
    arrays = sampler.build(config, num_steps, opts)
    static_options = {key: value for key, value in opts.items() if key not in sampler.traced_options}
    return Schedule(
        name=name,
        prediction_type=config.prediction_type,
        num_steps=num_steps,
        evals_per_step=sampler.evals_per_step,
        init_noise_sigma=float(arrays.init_noise_sigma),
        stochastic=bool(sampler.stochastic(opts)),
        options=tuple(sorted(static_options.items())),
        step_fn=sampler.step,
        init_fn=sampler.init,
        param=param,
        timesteps=jnp.asarray(np.asarray(arrays.timesteps, np.float64).astype(np.float32)),
        input_divisor=None if arrays.input_divisor is None else jnp.asarray(arrays.input_divisor),
        signal_scale=jnp.asarray(arrays.signal_scale),
        noise_scale=jnp.asarray(arrays.noise_scale),
        tables=jax.tree.map(jnp.asarray, arrays.tables),
    )
