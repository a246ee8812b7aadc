"""The k-diffusion sigma grids (A1111 / ComfyUI sampling) against k-diffusion 0.1.1 itself.

k-diffusion wraps a CompVis-style model (``apply_model`` and ``alphas_cumprod``, the LDM float64
schedule rounded to float32) in ``CompVisDenoiser`` exactly as A1111 does, and runs its own
samplers on its own grids (``get_sigmas``, ``get_sigmas_karras``, ``get_sigmas_exponential``
between ``model.sigmas[0]`` and ``[-1]``), starting from ``noise * sigmas[0]``. sdjax runs
``sampling.sample`` with ``make_schedule(name, config, steps, sigmas=..., quantize=...)`` from
``noise * init_noise_sigma``. Both sides are driven by the same stand-in model, a smooth non-linear
function of (x, t) that depends on the fractional U-Net timestep (so ``sigma_to_t`` matters), and
the stochastic samplers get the same per-step noise (k-diffusion's ``noise_sampler``, sdjax's
``noise_fn``).
"""

import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from reference import rel_err
from sdjax import sampling, schedules
from sdjax.config import SchedulerConfig
from sdjax.samplers import make_schedule

if importlib.util.find_spec("k_diffusion") is None:
    pytest.skip("k-diffusion is not installed", allow_module_level=True)


def load_k_diffusion():
    """``k_diffusion.sampling`` and ``k_diffusion.external`` without the package ``__init__``, which
    imports torchvision and scikit-image (not installed); a torchvision stub serves ``utils``' import
    while loading and is removed again, so nothing else sees it."""
    spec = importlib.util.find_spec("k_diffusion")
    if "k_diffusion.external" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules.setdefault("k_diffusion", package)
        stubs = {}
        if importlib.util.find_spec("torchvision") is None:
            for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
                stubs[name] = sys.modules[name] = types.ModuleType(name)
        if stubs:
            stubs["torchvision"].transforms = stubs["torchvision.transforms"]
            stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
        try:
            importlib.import_module("k_diffusion.sampling")
            importlib.import_module("k_diffusion.external")
        finally:
            for name in stubs:
                del sys.modules[name]
    return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]


K_SAMPLING, K_EXTERNAL = load_k_diffusion()

SHAPE = (2, 8, 8, 4)  # NHWC
TOL = 1e-5  # observed: at most 1.3e-6 (fp32 on both sides); a timestep off by 0.05 gives 3e-4
MIX = np.array(
    [[0.9, -0.3, 0.2, 0.1], [0.2, 0.8, -0.1, 0.3], [-0.2, 0.1, 0.7, -0.4], [0.3, 0.2, 0.1, 0.6]], np.float32
)
SD_CONFIG = SchedulerConfig()  # SD 1.x/2.x: LDM "linear" 0.00085..0.012 (diffusers' scaled_linear)

# sdjax name -> (k-diffusion sampler, whether it takes per-step noise)
K_SAMPLERS = {
    "euler_a": ("sample_euler_ancestral", True),
    "euler": ("sample_euler", False),
    "lms": ("sample_lms", False),
    "heun": ("sample_heun", False),
    "dpmpp_2m": ("sample_dpmpp_2m", False),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", True),
}
GRIDS = ("uniform", "karras", "exponential")


def stand_in_jax(x, t):
    return jnp.tanh(x @ MIX) * 0.9 + 0.3 * jnp.cos(t / 10.0 + x)


def stand_in_torch(x_nchw, t):
    x = x_nchw.permute(0, 2, 3, 1)
    t = t.to(torch.float32).reshape(-1, 1, 1, 1)
    out = torch.tanh(x @ torch.from_numpy(MIX)) * 0.9 + 0.3 * torch.cos(t / 10.0 + x)
    return out.permute(0, 3, 1, 2)


def ldm_alphas_cumprod(config: SchedulerConfig) -> torch.Tensor:
    """LDM's ``register_schedule``: make_beta_schedule("linear") in float64 numpy, cumprod, to float32."""
    n = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float64)
    return torch.tensor(np.cumprod(1.0 - betas.numpy(), axis=0), dtype=torch.float32)


class CompVisStandIn:
    """What ``CompVisDenoiser`` reads from an LDM model: ``alphas_cumprod`` and ``apply_model``."""

    def __init__(self, config):
        self.alphas_cumprod = ldm_alphas_cumprod(config)

    def apply_model(self, x, t, cond=None):
        return stand_in_torch(x, t)


def denoiser(config, quantize):
    """A1111's ``KDiffusionSampler`` model wrap: eps or v, over the CompVis model."""
    cls = K_EXTERNAL.CompVisVDenoiser if config.prediction_type == "v_prediction" else K_EXTERNAL.CompVisDenoiser
    return cls(CompVisStandIn(config), quantize=quantize)


def a1111_sigmas(model, grid, steps):
    """A1111 1.9 ``get_sigmas``: the schedule type's function, sigma_min/max = model.sigmas[0], [-1]."""
    if grid == "uniform":
        return model.get_sigmas(steps)
    sigma_min, sigma_max = model.sigmas[0].item(), model.sigmas[-1].item()
    fn = K_SAMPLING.get_sigmas_karras if grid == "karras" else K_SAMPLING.get_sigmas_exponential
    return fn(n=steps, sigma_min=sigma_min, sigma_max=sigma_max)


def to_torch(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def draws(seed, steps):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal((steps,) + SHAPE).astype(np.float32)


def run_k_diffusion(name, config, grid, steps, noise, step_noise, quantize, **kwargs):
    model = denoiser(config, quantize)
    sigmas = a1111_sigmas(model, grid, steps)
    fn_name, stochastic = K_SAMPLERS[name]
    if stochastic:
        calls = iter(range(steps))
        kwargs["noise_sampler"] = lambda sigma, sigma_next: to_torch(step_noise[next(calls)])
    x = to_torch(noise) * sigmas[0]
    with torch.no_grad():
        out = getattr(K_SAMPLING, fn_name)(model, x, sigmas, extra_args={"cond": None}, disable=True, **kwargs)
    return out.numpy().transpose(0, 2, 3, 1), model, sigmas


@jax.jit
def run_sdjax(noise, step_noise, schedule):
    x = noise * schedule.init_noise_sigma
    return sampling.sample(stand_in_jax, x, None, schedule, noise_fn=lambda i: step_noise[i])


def compare(name, grid, steps, *, quantize=False, config=SD_CONFIG, seed=0):
    noise, step_noise = draws(seed, steps)
    ref, model, ref_sigmas = run_k_diffusion(name, config, grid, steps, noise, step_noise, quantize)
    schedule = make_schedule(name, config, steps, sigmas=grid, quantize=quantize)
    ours = np.asarray(run_sdjax(noise, step_noise, schedule))
    assert np.all(np.isfinite(ours)) and ours.dtype == np.float32
    return rel_err(ours, ref)


# Every A1111 k-sampler sdjax has x every schedule type x 10/20/30 steps; quantize on for a third.
CASES = [
    (name, grid, steps, (i % 3 == 0))
    for i, (name, grid, steps) in enumerate(
        (name, grid, steps) for name in K_SAMPLERS for grid in GRIDS for steps in (10, 20, 30)
    )
]


@pytest.mark.parametrize("name,grid,steps,quantize", CASES, ids=lambda v: str(v))
def test_matches_k_diffusion(name, grid, steps, quantize):
    assert compare(name, grid, steps, quantize=quantize) < TOL


def test_dpmpp_2m_sde_heun_matches_k_diffusion():
    """A1111's "DPM++ 2M SDE Heun": k-diffusion's solver_type="heun"."""
    noise, step_noise = draws(3, 15)
    ref, _, _ = run_k_diffusion("dpmpp_2m_sde", SD_CONFIG, "exponential", 15, noise, step_noise, False,
                                solver_type="heun")
    midpoint, _, _ = run_k_diffusion("dpmpp_2m_sde", SD_CONFIG, "exponential", 15, noise, step_noise, False)
    schedule = make_schedule("dpmpp_2m_sde", SD_CONFIG, 15, sigmas="exponential", solver_type="heun")
    ours = run_sdjax(noise, step_noise, schedule)
    assert rel_err(ours, ref) < TOL
    assert rel_err(midpoint, ref) > 10 * TOL


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m_sde", "heun"])
def test_v_prediction_matches_compvis_v_denoiser(name):
    config = SchedulerConfig(prediction_type="v_prediction")
    assert compare(name, "karras", 10, config=config) < TOL


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
def test_grid_and_timesteps_equal_k_diffusion(grid, steps, quantize):
    """The sigmas, the U-Net timesteps (``sigma_to_t``) and the initial scale, value by value."""
    model = denoiser(SD_CONFIG, quantize)
    ref = a1111_sigmas(model, grid, steps)
    ref_t = model.sigma_to_t(ref[:-1]).numpy()
    timesteps, sigmas = schedules.k_diffusion_grid(SD_CONFIG, steps, grid, quantize)
    # torch's vectorised CPU sqrt is not always correctly rounded (numpy's is): an ulp apart.
    np.testing.assert_allclose(sigmas, ref.numpy(), rtol=3e-7, atol=0)
    if quantize:
        # A sigma half-way between two table entries in log sigma (the uniform grid at t = k + 0.5)
        # is a tie that an ulp decides either way; everywhere else the nearest index is the same.
        fraction = model.sigma_to_t(ref[:-1], quantize=False).numpy() % 1
        tie = np.abs(fraction - 0.5) < 1e-3
        np.testing.assert_array_equal(timesteps[~tie], ref_t[~tie])
        assert np.all(np.abs(timesteps[tie] - ref_t[tie]) <= 1)
    else:
        np.testing.assert_allclose(timesteps, ref_t, rtol=0, atol=1.3e-4)
    for name in ("euler", "heun", "lms", "euler_a"):
        schedule = make_schedule(name, SD_CONFIG, steps, sigmas=grid, quantize=quantize)
        assert schedule.init_noise_sigma == pytest.approx(ref[0].item(), rel=3e-7)
        np.testing.assert_allclose(np.asarray(schedule.tables.sigmas)[[0, -1]], ref.numpy()[[0, -1]], rtol=3e-7)


def test_sigma_table_is_ldm_float64_schedule():
    table = schedules.k_diffusion_sigma_table(SD_CONFIG)
    np.testing.assert_allclose(table, denoiser(SD_CONFIG, False).sigmas.numpy(), rtol=2e-7, atol=0)
    # Not diffusers' float32 betas: near t = 0 the two tables differ by far more than an ulp.
    diffusers_table = schedules.sigmas_from_alphas_cumprod(
        schedules.training_alphas_cumprod(SD_CONFIG, zero_snr=False, terminal_fix=False)
    )
    assert np.abs(diffusers_table / table - 1).max() > 1e-6


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_multistep_initial_sample_is_k_diffusions_in_vp_form(name):
    """k-diffusion starts at x = sigma_0 noise (VE); the VP solver at z = x / sqrt(sigma_0**2 + 1)."""
    schedule = make_schedule(name, SD_CONFIG, 10, sigmas="karras")
    sigma_0 = float(schedule.tables.sigmas[0])
    assert schedule.init_noise_sigma == pytest.approx(sigma_0 / np.sqrt(sigma_0**2 + 1), rel=1e-7)
    assert make_schedule(name, SD_CONFIG, 10).init_noise_sigma == 1.0  # diffusers' stays
    # The wrong start (diffusers' unit scale, or k-diffusion's VE scale) is measurably off.
    noise, step_noise = draws(0, 10)
    ref, _, _ = run_k_diffusion(name, SD_CONFIG, "karras", 10, noise, step_noise, False)
    for wrong_scale in (1.0, sigma_0):
        wrong = np.asarray(run_sdjax(noise * wrong_scale / schedule.init_noise_sigma, step_noise, schedule))
        assert rel_err(wrong, ref) > 10 * TOL


def test_quantize_changes_the_trajectory():
    noise, step_noise = draws(0, 10)
    plain, _, _ = run_k_diffusion("euler", SD_CONFIG, "karras", 10, noise, step_noise, False)
    quantized = make_schedule("euler", SD_CONFIG, 10, sigmas="karras", quantize=True)
    assert np.all(np.asarray(quantized.timesteps) == np.round(np.asarray(quantized.timesteps)))
    assert rel_err(run_sdjax(noise, step_noise, quantized), plain) > 10 * TOL


def test_default_grid_is_still_diffusers():
    """Without ``sigmas`` nothing changes: diffusers' Euler grid differs from A1111's uniform one."""
    default = make_schedule("euler", SD_CONFIG, 10)
    explicit = make_schedule("euler", SD_CONFIG, 10, sigmas=None, quantize=False)
    uniform = make_schedule("euler", SD_CONFIG, 10, sigmas="uniform")
    for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(explicit)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert default.init_noise_sigma == explicit.init_noise_sigma
    assert not np.array_equal(np.asarray(default.tables.sigmas), np.asarray(uniform.tables.sigmas))


def test_option_errors():
    with pytest.raises(ValueError, match=r"sigmas='polyexponential' is not supported; choose from \[None, 'uniform'"):
        make_schedule("euler", SD_CONFIG, 10, sigmas="polyexponential")
    with pytest.raises(ValueError, match="quantize=True needs a k-diffusion grid"):
        make_schedule("euler", SD_CONFIG, 10, quantize=True)
    with pytest.raises(ValueError, match=r"cannot be combined with \['use_karras_sigmas'\]"):
        make_schedule("lms", SD_CONFIG, 10, sigmas="karras", use_karras_sigmas=True)
    with pytest.raises(ValueError, match=r"cannot be combined with \['timestep_spacing'\]"):
        make_schedule("dpmpp_2m", SD_CONFIG, 10, sigmas="karras", timestep_spacing="trailing")
    for name in ("dpmpp_2m_karras", "ddim", "unipc", "pndm", "ddpm"):
        with pytest.raises(ValueError, match=r"does not take option\(s\) \['sigmas'\]"):
            make_schedule(name, SD_CONFIG, 10, sigmas="karras")

