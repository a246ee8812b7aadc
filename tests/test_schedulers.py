"""Every sampler against diffusers' PyTorch scheduler of the same name, trajectory by trajectory.

Both sides start from the same noise and are driven by the same deterministic stand-in model (a
smooth non-linear function of (x, t), written once for numpy/torch and jax); stochastic samplers
get the same per-step noise injected on both sides.
"""

import dataclasses

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete, scheduling_lcm, scheduling_tcd

from reference import rel_err
from sdjax import sampling, samplers
from sdjax.config import SchedulerConfig
from sdjax.samplers import SCHEDULERS, add_noise, make_schedule

SHAPE = (2, 8, 8, 4)  # NHWC
TOL = 1e-5
# A fixed channel mixing: the stand-in "U-Net" output is tanh(x W) * 0.9 + 0.1 cos(t / 250 + x).
MIX = np.array(
    [[0.9, -0.3, 0.2, 0.1], [0.2, 0.8, -0.1, 0.3], [-0.2, 0.1, 0.7, -0.4], [0.3, 0.2, 0.1, 0.6]], np.float32
)
SD_CONFIG = SchedulerConfig()  # SD 1.x/2.x: scaled_linear 0.00085..0.012, leading, steps_offset=1


def stand_in_jax(x, t):
    return jnp.tanh(x @ MIX) * 0.9 + 0.1 * jnp.cos(t / 250.0 + x)


def stand_in_torch(x_nchw, t):
    x = x_nchw.permute(0, 2, 3, 1)
    t = torch.as_tensor(t, dtype=torch.float32)
    out = torch.tanh(x @ torch.from_numpy(MIX)) * 0.9 + 0.1 * torch.cos(t / 250.0 + x)
    return out.permute(0, 3, 1, 2)


def to_torch(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def to_numpy(t):
    return t.numpy().transpose(0, 2, 3, 1)


def diffusers_scheduler(name, config, **options):
    class_name, extra = samplers.DIFFUSERS_SCHEDULERS[name]
    options = {k: v for k, v in options.items() if k != "eta"}
    return getattr(diffusers, class_name).from_config({**config.to_diffusers_config(), **extra, **options})


def run_diffusers(name, config, steps, noise, step_noise, monkeypatch, *, start_step=0, x0=None, **options):
    """diffusers' denoising loop (image-to-image like its img2img pipelines when start_step > 0).

    Returns (initial sample, final sample, timesteps, init_noise_sigma)."""
    sched = diffusers_scheduler(name, config, **options)
    sched.set_timesteps(steps)
    first = start_step * sched.order
    timesteps = sched.timesteps[first:]
    if start_step:
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(first)
        x = sched.add_noise(to_torch(x0), to_torch(noise), timesteps[:1])
    else:
        x = to_torch(noise) * sched.init_noise_sigma
    x_init = to_numpy(x)
    current = {"i": 0}

    def injected_randn(*args, **kwargs):
        return to_torch(step_noise[current["i"]])

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", injected_randn)
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", injected_randn)
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", injected_randn)
    monkeypatch.setattr(scheduling_tcd, "randn_tensor", injected_randn)
    for j, t in enumerate(timesteps):
        current["i"] = first + j
        out = stand_in_torch(sched.scale_model_input(x, t), t)
        kwargs = {}
        if name == "ddim" and options.get("eta", 0) > 0:
            kwargs = dict(eta=options["eta"], variance_noise=injected_randn())
        if name == "dpmpp_2m_sde":
            kwargs = dict(variance_noise=injected_randn())
        if name == "tcd":  # as diffusers' pipelines call it (TCDScheduler.step's own default is 0.3)
            kwargs = dict(eta=options.get("eta", 0.0))
        x = sched.step(out, t, x, **kwargs).prev_sample
    return x_init, to_numpy(x), sched.timesteps.numpy().astype(np.float32), float(sched.init_noise_sigma)


@jax.jit
def run_sdjax(noise, step_noise, schedule):
    x = noise * schedule.init_noise_sigma
    return sampling.sample(stand_in_jax, x, None, schedule, noise_fn=lambda i: step_noise[i])


def draws(seed, evals=100):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal((evals,) + SHAPE).astype(np.float32)


def compare(name, config, steps, monkeypatch, seed=0, **options):
    noise, step_noise = draws(seed)
    schedule = make_schedule(name, config, steps, **options)
    _, ref, ref_timesteps, ref_sigma = run_diffusers(name, config, steps, noise, step_noise, monkeypatch, **options)
    ours = run_sdjax(noise, step_noise, schedule)
    # torch's vectorised fp32 sqrt is not always correctly rounded: timesteps may differ by an ulp.
    np.testing.assert_allclose(np.asarray(schedule.timesteps), ref_timesteps, rtol=1e-6)
    np.testing.assert_allclose(schedule.init_noise_sigma, ref_sigma, rtol=1e-6)
    assert ours.dtype == jnp.float32
    return rel_err(ours, ref)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 10, 25, 50])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_trajectory_matches_diffusers(name, steps, prediction_type, monkeypatch):
    config = SchedulerConfig(prediction_type=prediction_type)
    assert compare(name, config, steps, monkeypatch) < TOL


NOISE_SCHEDULES = {
    "trailing": SchedulerConfig(timestep_spacing="trailing", steps_offset=0),
    "linspace": SchedulerConfig(timestep_spacing="linspace", steps_offset=0),
    "linear_betas": SchedulerConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "squaredcos_cap_v2": SchedulerConfig(beta_schedule="squaredcos_cap_v2", timestep_spacing="leading"),
}


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("variant", list(NOISE_SCHEDULES))
def test_spacings_and_beta_schedules(variant, name, monkeypatch):
    if variant == "squaredcos_cap_v2" and name == "dpmpp_2m_karras":
        pytest.skip(
            "diffusers truncates unrounded Karras timesteps of this schedule to a repeated 999, then "
            "starts at step 1 and indexes past its sigmas (IndexError)"
        )
    assert compare(name, NOISE_SCHEDULES[variant], 7, monkeypatch) < TOL


ZERO_SNR = SchedulerConfig(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
ZERO_SNR_SAMPLERS = ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde", "unipc")


@pytest.mark.parametrize("name", ZERO_SNR_SAMPLERS)
def test_zero_terminal_snr(name, monkeypatch):
    assert compare(name, ZERO_SNR, 25, monkeypatch) < TOL


def test_zero_terminal_snr_few_euler_steps_as_accurate_as_diffusers(monkeypatch):
    # With zero terminal SNR, Euler starts at sigma ~ 4096 and its first step cancels x ~ 4096
    # down to x0 ~ 1, so fp32 rounding alone leaves ~1e-4 of noise; both implementations are
    # judged against a float64 run of diffusers instead of against each other.
    noise, step_noise = draws(0)
    _, ref32, _, _ = run_diffusers("euler", ZERO_SNR, 1, noise, step_noise, monkeypatch)
    sched = diffusers_scheduler("euler", ZERO_SNR)
    sched.set_timesteps(1)
    sched.sigmas = sched.sigmas.double()
    x = to_torch(noise).double() * sched.init_noise_sigma.double()
    mix = torch.from_numpy(MIX).double()
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t).permute(0, 2, 3, 1)
        out = torch.tanh(x_in @ mix) * 0.9 + 0.1 * torch.cos(t.double() / 250.0 + x_in)
        x = sched.step(out.permute(0, 3, 1, 2), t, x).prev_sample
    ref64 = to_numpy(x)
    ours = run_sdjax(noise, step_noise, make_schedule("euler", ZERO_SNR, 1))
    diffusers_error = rel_err(ref32, ref64)
    assert diffusers_error > 1e-5  # the premise: this case is at fp32's limit
    assert rel_err(ours, ref64) < 3 * diffusers_error


OPTION_CASES = [
    ("lms", 10, {"use_karras_sigmas": True}),
    ("euler", 10, {"use_karras_sigmas": True}),
    ("heun", 10, {"use_karras_sigmas": True}),
    ("unipc", 10, {"use_karras_sigmas": True}),
    ("dpmpp_2m_sde", 10, {"use_karras_sigmas": True}),
    ("ddim", 10, {"eta": 0.7}),
    ("pndm", 4, {"skip_prk_steps": False}),
    ("pndm", 10, {"skip_prk_steps": False}),
    ("dpmpp_2m", 3, {"solver_order": 3}),
    ("dpmpp_2m", 10, {"solver_order": 3}),
    ("dpmpp_2m_sde", 10, {"solver_order": 3}),
    ("unipc", 3, {"solver_order": 3}),
    ("unipc", 10, {"solver_order": 3}),
    ("dpmpp_2m", 10, {"solver_order": 1}),
    ("dpmpp_2m", 10, {"solver_type": "heun"}),
    ("dpmpp_2m_sde", 10, {"solver_type": "heun"}),
    ("dpmpp_2m", 10, {"lower_order_final": False, "solver_order": 3}),
    ("unipc", 10, {"disable_corrector": [0, 3]}),
]


@pytest.mark.parametrize("name,steps,options", OPTION_CASES, ids=lambda v: str(v))
def test_sampler_options(name, steps, options, monkeypatch):
    assert compare(name, SD_CONFIG, steps, monkeypatch, **options) < TOL


@pytest.mark.parametrize("name", ["ddim", "ddpm", "lms", "euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_sample_prediction(name, monkeypatch):
    # pndm and euler_a raise for prediction_type="sample" in diffusers; sdjax supports it everywhere.
    assert compare(name, SchedulerConfig(prediction_type="sample"), 10, monkeypatch) < TOL


@pytest.mark.parametrize("name", ["ddim", "ddpm", "heun"])
def test_clip_sample(name, monkeypatch):
    config = SchedulerConfig(prediction_type="sample", clip_sample=True, clip_sample_range=0.5)
    assert compare(name, config, 10, monkeypatch) < TOL


@jax.jit
def run_image_to_image(x0, noise, step_noise, start_step, schedule):
    x = add_noise(schedule, x0, noise, start_step)
    return x, sampling.sample(stand_in_jax, x, None, schedule, start_step=start_step, noise_fn=lambda i: step_noise[i])


@pytest.mark.parametrize("name", SCHEDULERS)
def test_image_to_image_matches_diffusers(name, monkeypatch):
    """add_noise + sample(start_step=k) against diffusers' img2img convention: timesteps sliced at
    k * evals_per_step, set_begin_index, add_noise at the first kept timestep."""
    noise, step_noise = draws(1)
    x0 = 0.5 * draws(2)[0]
    schedule = make_schedule(name, SD_CONFIG, 10)
    compiled = run_image_to_image._cache_size()
    for start_step in (3, 7):
        ref_init, ref, _, _ = run_diffusers(
            name, SD_CONFIG, 10, noise, step_noise, monkeypatch, start_step=start_step, x0=x0
        )
        init, ours = run_image_to_image(x0, noise, step_noise, start_step, schedule)
        assert rel_err(init, ref_init) < 1e-6
        assert rel_err(ours, ref) < TOL
    assert run_image_to_image._cache_size() == compiled + 1  # start_step is traced: one compilation


def test_unknown_scheduler_lists_valid_names():
    with pytest.raises(ValueError, match="unknown scheduler 'dpm_fast'.*'euler_a'.*'unipc'"):
        make_schedule("dpm_fast", SD_CONFIG, 10)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, 1001])
def test_bad_step_count(steps):
    with pytest.raises(ValueError, match="num_steps"):
        make_schedule("euler", SD_CONFIG, steps)


def test_bad_options():
    unknown_option = r"'ddim' does not take option\(s\) \['use_karras_sigmas'\]; it accepts \['eta', 'timestep_spacing'\]"
    with pytest.raises(ValueError, match=unknown_option):
        make_schedule("ddim", SD_CONFIG, 10, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="solver_order=4 is not supported"):
        make_schedule("dpmpp_2m", SD_CONFIG, 10, solver_order=4)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        make_schedule("ddim", SD_CONFIG, 10, eta=-1.0)
    with pytest.raises(ValueError, match="at least 4 steps"):
        make_schedule("pndm", SD_CONFIG, 3, skip_prk_steps=False)


def test_options_default_from_name():
    assert make_schedule("dpmpp_2m_karras", SD_CONFIG, 10).option("use_karras_sigmas") is True
    assert make_schedule("dpmpp_2m", SD_CONFIG, 10).option("use_karras_sigmas") is False
    assert make_schedule("pndm", SchedulerConfig(skip_prk_steps=False), 10).option("skip_prk_steps") is False
    assert make_schedule("ddim", SD_CONFIG, 10).stochastic is False
    assert make_schedule("ddim", SD_CONFIG, 10, eta=1.0).stochastic is True
    assert make_schedule("heun", SD_CONFIG, 10).num_evals == 19


def test_schedule_carries_its_sampler():
    schedule = make_schedule("dpmpp_2m_sde", SD_CONFIG, 5, solver_type="heun")
    assert (schedule.tables.sde, schedule.tables.solver_type.value, schedule.tables.solver_order) == (True, "heun", 2)
    assert make_schedule("heun", SD_CONFIG, 3).evals_per_step == 2
    # Stepping looks nothing up by name: a renamed schedule samples exactly as the original.
    noise, step_noise = draws(0)
    renamed = dataclasses.replace(schedule, name="not a sampler")
    np.testing.assert_array_equal(run_sdjax(noise, step_noise, renamed), run_sdjax(noise, step_noise, schedule))


def test_scheduler_config_from_diffusers_file(tmp_path):
    """A model's scheduler/scheduler_config.json brings its noise schedule; the sampler is picked on top."""
    diffusers.DDIMScheduler(
        beta_schedule="linear", beta_start=0.0002, beta_end=0.03, prediction_type="v_prediction",
        timestep_spacing="trailing", steps_offset=0,
    ).save_pretrained(tmp_path)
    config = SchedulerConfig.from_diffusers_config(tmp_path / "scheduler_config.json")
    reference = diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path)
    reference.set_timesteps(10)
    schedule = make_schedule("euler", config, 10)
    np.testing.assert_allclose(np.asarray(schedule.tables.sigmas), reference.sigmas.numpy(), rtol=1e-6)
    assert schedule.prediction_type == "v_prediction"


def test_scheduler_math_is_fp32_for_low_precision_models():
    schedule = make_schedule("dpmpp_2m", SD_CONFIG, 5)
    noise = jnp.asarray(draws(0)[0])

    def bf16_model(x, t):
        assert x.dtype == jnp.float32
        return stand_in_jax(x, t).astype(jnp.bfloat16)

    out = sampling.sample(bf16_model, noise.astype(jnp.bfloat16), None, schedule)
    assert out.dtype == jnp.float32


# stable-diffusion-v1-5's scheduler/scheduler_config.json as released: no timestep_spacing, no prediction_type.
SD15_RELEASED_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_released_sd15_config_matches_diffusers_from_config(name, steps, tmp_path, monkeypatch):
    """Keys absent from the released file take each sampler's own diffusers default, as a diffusers user
    gets them with ``EulerDiscreteScheduler.from_config(pipe.scheduler.config)``."""
    import json
    import sys

    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD15_RELEASED_SCHEDULER_CONFIG))
    config = SchedulerConfig.from_diffusers_config(tmp_path / "scheduler_config.json")
    loaded = diffusers.PNDMScheduler.from_pretrained(tmp_path)  # what the pipeline holds
    class_name, extra = samplers.DIFFUSERS_SCHEDULERS[name]

    def users_scheduler(_name, _config, **options):
        return getattr(diffusers, class_name).from_config(loaded.config, **extra)

    monkeypatch.setattr(sys.modules[__name__], "diffusers_scheduler", users_scheduler)
    assert compare(name, config, steps, monkeypatch) < TOL


def test_per_sampler_defaults_are_diffusers_class_defaults():
    import inspect

    for name, defaults in samplers.DIFFUSERS_DEFAULTS.items():
        cls = getattr(diffusers, samplers.DIFFUSERS_SCHEDULERS[name][0])
        signature = inspect.signature(cls.__init__).parameters
        for key, value in defaults.items():
            assert signature[key].default == value, (name, key)


def test_timestep_spacing_override_per_call():
    config = SchedulerConfig(timestep_spacing="leading")
    assert float(make_schedule("euler", config, 10).timesteps[0]) == 901.0
    assert float(make_schedule("euler", config, 10, timestep_spacing="linspace").timesteps[0]) == 999.0
    assert float(make_schedule("euler", config, 10, timestep_spacing="trailing").timesteps[0]) == 999.0
    with pytest.raises(ValueError, match="timestep_spacing='uniform' is not supported; choose from"):
        make_schedule("euler", config, 10, timestep_spacing="uniform")
