"""Few-step sampling (issue #19): LCM and TCD against diffusers' schedulers, trailing-spaced samplers at
1-8 steps, and the guidance embedding of guidance-distilled (LCM) U-Nets.

The samplers are driven as in test_schedulers.py: the same noise, the same deterministic stand-in model
on both sides, and diffusers' per-step draws replaced by the noise sdjax's loop injects.
"""

import dataclasses

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_lcm, scheduling_tcd
from reference import nchw, nhwc, rel_err, save_pipeline, save_unet
from safetensors.numpy import load_file
from test_schedulers import TOL, compare, draws, run_sdjax, stand_in_jax, stand_in_torch, to_numpy, to_torch

from sdjax import StableDiffusion, sampling
from sdjax.config import SchedulerConfig, UNetConfig
from sdjax.layouts.diffusers import torch_to_flax
from sdjax.models.unet import UNet2DConditionModel
from sdjax.samplers import add_noise, guidance_embedding, make_schedule

STEPS = (1, 2, 4, 8)
PREDICTIONS = ("epsilon", "v_prediction")
# SDXL-Lightning / Hyper-SD / SD-Turbo scheduler configs: the SD noise schedule with trailing spacing.
TRAILING = {"timestep_spacing": "trailing", "steps_offset": 1}
TCD_ETAS = (0.0, 0.3, 0.7, 1.0)
CLASSES = {"lcm": diffusers.LCMScheduler, "tcd": diffusers.TCDScheduler}


def run_diffusers(name, config, steps, noise, step_noise, monkeypatch, *, eta=None, config_keys=None,
                  start_step=0, x0=None, **set_timesteps):
    """diffusers' LCM / TCD loop (image-to-image as its generic img2img pipelines when start_step > 0)."""
    sched = CLASSES[name].from_config({**config.to_diffusers_config(), **(config_keys or {})})
    if "timesteps" in set_timesteps:
        sched.set_timesteps(**set_timesteps)
    else:
        sched.set_timesteps(steps, **set_timesteps)
    timesteps = sched.timesteps[start_step:]
    if start_step:
        sched.set_begin_index(start_step)
        x = sched.add_noise(to_torch(x0), to_torch(noise), timesteps[:1])
    else:
        x = to_torch(noise) * sched.init_noise_sigma
    x_init = to_numpy(x)
    current = {"i": 0}
    for module in (scheduling_lcm, scheduling_tcd):
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: to_torch(step_noise[current["i"]]))
    for j, t in enumerate(timesteps):
        current["i"] = start_step + j
        out = stand_in_torch(sched.scale_model_input(x, t), t)
        kwargs = {} if eta is None else {"eta": eta}
        x = sched.step(out, t, x, **kwargs).prev_sample
    return x_init, to_numpy(x), sched.timesteps.numpy().astype(np.float32)


def compare_few_step(name, config, steps, monkeypatch, *, eta=None, config_keys=None, seed=0, **set_timesteps):
    noise, step_noise = draws(seed)
    options = dict(config_keys or {}, **set_timesteps)
    if eta is not None:
        options["eta"] = eta
    schedule = make_schedule(name, config, steps, **options)
    _, ref, ref_timesteps = run_diffusers(
        name, config, steps, noise, step_noise, monkeypatch, eta=eta, config_keys=config_keys, **set_timesteps
    )
    np.testing.assert_array_equal(np.asarray(schedule.timesteps), ref_timesteps)
    return rel_err(run_sdjax(noise, step_noise, schedule), ref)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", STEPS)
def test_lcm_matches_diffusers(steps, prediction_type, monkeypatch):
    assert compare_few_step("lcm", SchedulerConfig(prediction_type=prediction_type), steps, monkeypatch) < TOL


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", STEPS)
def test_tcd_matches_diffusers(steps, prediction_type, monkeypatch):
    config = SchedulerConfig(prediction_type=prediction_type)
    for eta in TCD_ETAS:
        assert compare_few_step("tcd", config, steps, monkeypatch, eta=eta) < TOL, eta


FEW_STEP_CASES = [
    ("lcm", 4, {"config_keys": {"original_inference_steps": 100}}),
    ("lcm", 4, {"config_keys": {"timestep_scaling": 0.5}}),  # large c_skip: the z term counts
    ("lcm", 3, {"strength": 0.6}),
    ("lcm", 4, {"timesteps": [999, 600, 301, 45]}),
    ("tcd", 4, {"config_keys": {"original_inference_steps": 20}, "eta": 0.3}),
    ("tcd", 3, {"strength": 0.5, "eta": 0.5}),
    ("tcd", 4, {"timesteps": [999, 600, 301, 45], "eta": 0.3}),
]


@pytest.mark.parametrize("name,steps,options", FEW_STEP_CASES, ids=lambda v: str(v))
def test_few_step_options(name, steps, options, monkeypatch):
    assert compare_few_step(name, SchedulerConfig(), steps, monkeypatch, **options) < TOL


@pytest.mark.parametrize("config", [
    SchedulerConfig(prediction_type="sample", clip_sample=True, clip_sample_range=0.5),
    SchedulerConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True),
    SchedulerConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
], ids=["sample_clipped", "zero_snr", "linear_betas"])
@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_few_step_noise_schedules(name, config, monkeypatch):
    assert compare_few_step(name, config, 4, monkeypatch, eta=0.3 if name == "tcd" else None) < TOL


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_few_step_image_to_image(name, monkeypatch):
    """sdjax's start_step against diffusers' generic img2img: timesteps sliced, begin index, add_noise."""
    noise, step_noise = draws(1)
    x0 = 0.5 * draws(2)[0]
    eta = 0.3 if name == "tcd" else None
    schedule = make_schedule(name, SchedulerConfig(), 4, **({} if eta is None else {"eta": eta}))

    @jax.jit
    def run(x0, noise, step_noise, start_step, schedule):
        x = add_noise(schedule, x0, noise, start_step)
        return x, sampling.sample(stand_in_jax, x, None, schedule, start_step=start_step,
                                  noise_fn=lambda i: step_noise[i])

    for start_step in (1, 3):
        ref_init, ref, _ = run_diffusers(
            name, SchedulerConfig(), 4, noise, step_noise, monkeypatch, eta=eta, start_step=start_step, x0=x0
        )
        init, ours = run(x0, noise, step_noise, start_step, schedule)
        assert rel_err(init, ref_init) < 1e-6
        assert rel_err(ours, ref) < TOL


@pytest.mark.parametrize("name,variants", [
    ("tcd", [{"eta": 0.2}, {"eta": 0.6, "strength": 0.5}, {"eta": 0.3, "timesteps": [999, 500, 100]}]),
    ("lcm", [{}, {"strength": 0.5, "timestep_scaling": 1.0}, {"original_inference_steps": 10}]),
], ids=["tcd", "lcm"])
def test_grid_options_and_eta_are_traced(name, variants):
    noise, step_noise = draws(0)
    run = jax.jit(lambda *args: run_sdjax.__wrapped__(*args))  # a new function: a cache of its own
    outs = [run(noise, step_noise, make_schedule(name, SchedulerConfig(), 3, **options)) for options in variants]
    assert run._cache_size() == 1
    assert min(rel_err(outs[0], out) for out in outs[1:]) > 1e-3

def test_tcd_default_eta_is_deterministic():
    assert make_schedule("tcd", SchedulerConfig(), 3).stochastic is False  # eta 0.0, as diffusers' pipelines pass it
    assert make_schedule("tcd", SchedulerConfig(), 3, eta=0.3).stochastic is True


def test_distillation_settings_come_from_the_scheduler_config(tmp_path):
    """A consistency-distilled model's scheduler_config.json sets the lcm/tcd grid and boundary scaling, as its
    LCMScheduler / TCDScheduler would; a call's own options win."""
    diffusers.LCMScheduler(original_inference_steps=100, timestep_scaling=5.0).save_pretrained(tmp_path)
    config = SchedulerConfig.from_diffusers_config(tmp_path / "scheduler_config.json")
    assert (config.original_inference_steps, config.timestep_scaling) == (100, 5.0)
    assert (SchedulerConfig().original_inference_steps, SchedulerConfig().timestep_scaling) == (None, None)

    def tables(name, config, **options):
        schedule = make_schedule(name, config, 4, **options)
        return jax.tree.leaves((schedule.timesteps, schedule.tables))

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(a, b))

    plain = dataclasses.replace(config, original_inference_steps=None, timestep_scaling=None)
    explicit = dict(original_inference_steps=100, timestep_scaling=5.0)
    assert same(tables("lcm", config), tables("lcm", plain, **explicit))
    assert not same(tables("lcm", config), tables("lcm", plain))
    assert same(tables("lcm", config, original_inference_steps=50, timestep_scaling=10.0), tables("lcm", plain))
    assert same(tables("tcd", config), tables("tcd", plain, original_inference_steps=100))
    assert same(tables("ddim", config), tables("ddim", plain))  # other samplers ignore them


def test_few_step_errors():
    config = SchedulerConfig()
    with pytest.raises(ValueError, match=r"eta \(gamma\) must be in \[0, 1\], got 1.5"):
        make_schedule("tcd", config, 4, eta=1.5)
    with pytest.raises(ValueError, match="num_steps=60 cannot exceed original_inference_steps=50"):
        make_schedule("lcm", config, 60)
    with pytest.raises(ValueError, match="fewer than num_steps=8"):
        make_schedule("lcm", config, 8, strength=0.1)
    with pytest.raises(ValueError, match="timesteps has 2 entries but num_steps=4"):
        make_schedule("lcm", config, 4, timesteps=[999, 499])
    with pytest.raises(ValueError, match="must descend strictly"):
        make_schedule("tcd", config, 2, timesteps=[499, 999])
    with pytest.raises(ValueError, match="strength cannot be combined with custom timesteps"):
        make_schedule("lcm", config, 2, timesteps=[999, 499], strength=0.5)
    with pytest.raises(ValueError, match=r"'lcm' does not take option\(s\) \['eta'\]"):
        make_schedule("lcm", config, 4, eta=0.3)


# --- trailing spacing (Lightning, Hyper-SD, Turbo) ------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m", "ddim"])
def test_trailing_few_steps_match_diffusers(name, steps, prediction_type, monkeypatch):
    config = SchedulerConfig(prediction_type=prediction_type, **TRAILING)
    assert compare(name, config, steps, monkeypatch) < TOL


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m", "ddim"])
def test_trailing_as_a_per_call_option(name, monkeypatch):
    """timestep_spacing="trailing" on a model whose config says otherwise (the usual Lightning recipe:
    ``Scheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")``)."""
    assert compare(name, SchedulerConfig(), 4, monkeypatch, timestep_spacing="trailing") < TOL


# --- guidance embedding and guidance-distilled U-Nets ---------------------------------------------------------


@pytest.mark.parametrize("dim", [8, 256, 17])
def test_guidance_embedding_matches_diffusers(dim):
    w = np.array([0.0, 0.5, 3.0, 7.0], np.float32)
    ref = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.from_numpy(w), dim)
    ours = guidance_embedding(w, dim)
    assert ours.shape == (4, dim) and ours.dtype == jnp.float32
    # sin/cos of angles up to 7000 rad: one ulp of the angle is ~5e-4, so the two libraries differ there.
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=2e-3)
    assert rel_err(ours, ref) < 1e-4


def test_guidance_embedding_rejects_a_scalar():
    with pytest.raises(ValueError, match=r"one per image, shape \(B,\); got shape \(\)"):
        guidance_embedding(1.0, 8)


@pytest.fixture(scope="module")
def lcm_unet(tmp_path_factory):
    path = tmp_path_factory.mktemp("lcm_unet")
    torch_model = save_unet(path, seed=3, time_cond_proj_dim=8)
    config = UNetConfig.from_diffusers_config(path / "config.json")
    module = UNet2DConditionModel(config)
    rng = np.random.RandomState(0)
    inputs = (rng.randn(2, 16, 16, 4).astype(np.float32), np.array([259.0, 999.0], np.float32),
              rng.randn(2, 7, 32).astype(np.float32))
    template = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))["params"]
    params = torch_to_flax(load_file(path / "diffusion_pytorch_model.safetensors"), template, what="unet")
    return torch_model, module, params, inputs


def test_unet_time_cond_proj_matches_diffusers(lcm_unet):
    torch_model, module, params, (sample, timesteps, context) = lcm_unet
    assert module.config.time_cond_proj_dim == 8
    assert params["time_embedding"]["cond_proj"]["kernel"].shape == (8, 32)
    cond = np.asarray(guidance_embedding(np.array([7.0, 3.0], np.float32), 8))

    @jax.jit  # one compilation for both calls
    def both(params):
        run = lambda given: module.apply({"params": params}, sample, timesteps, context, timestep_cond=given)
        return run(cond), run(None)

    ours = dict(zip(("cond", None), both(params)))
    for given in ("cond", None):
        with torch.no_grad():
            ref = torch_model(nchw(sample), torch.from_numpy(timesteps), torch.from_numpy(context),
                              timestep_cond=None if given is None else torch.tensor(cond)).sample
        assert rel_err(ours[given], nhwc(ref)) < 1e-4
    assert rel_err(ours["cond"], ours[None]) > 1e-3


def test_unet_timestep_cond_errors(lcm_unet):
    _, module, params, (sample, timesteps, context) = lcm_unet
    expected = r"timestep_cond must be \(2, 8\) \(time_cond_proj_dim=8\); got shape \(2, 4\)"
    with pytest.raises(ValueError, match=expected):
        module.apply({"params": params}, sample, timesteps, context, timestep_cond=jnp.zeros((2, 4)))
    plain = UNet2DConditionModel(dataclasses.replace(module.config, time_cond_proj_dim=None))
    with pytest.raises(ValueError, match="takes none"):
        plain.apply({"params": params}, sample, timesteps, context, timestep_cond=jnp.zeros((2, 8)))


def test_lcm_pipeline_folder_loads_and_saves(tmp_path):
    """A diffusers folder whose U-Net has time_cond_proj_dim loads with strict key accounting and saves back."""
    pipe = save_pipeline(tmp_path / "lcm", unet={"time_cond_proj_dim": 8})
    sd = StableDiffusion.from_pretrained(tmp_path / "lcm", dtype=jnp.float32)
    assert sd.config.unet.time_cond_proj_dim == 8
    sd.save_pretrained(tmp_path / "saved")
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "saved" / "unet")
    assert reloaded.config.time_cond_proj_dim == 8
    torch.testing.assert_close(reloaded.time_embedding.cond_proj.weight, pipe.unet.time_embedding.cond_proj.weight)


# --- A1111's "LCM" sampler ----------------------------------------------------------------------------------


def a1111_lcm_reference(config, grid, steps, noise, step_noise):
    """A1111's LCM sampler (modules/sd_samplers_lcm.py), restated over k-diffusion's DiscreteEpsDDPMDenoiser:
    the LDM sigma table at the 50 distillation timesteps 19, 39, ..., 999; each sigma's U-Net timestep is
    the nearest of them in log sigma; the denoiser's x0 goes through the boundary condition with the
    k-diffusion sample x; each step adds sigma_next noise. Returns (final sample, U-Net timesteps)."""
    k_external = pytest.importorskip("test_kdiffusion").K_EXTERNAL
    import test_kdiffusion

    grid_timesteps = torch.arange(19, 1000, 20)
    model = k_external.DiscreteEpsDDPMDenoiser(
        test_kdiffusion.CompVisStandIn(config), test_kdiffusion.ldm_alphas_cumprod(config)[grid_timesteps], False
    )

    def grid_timestep(sigma):
        return grid_timesteps[(sigma.log() - model.log_sigmas[:, None]).abs().argmin(dim=0)]

    if grid == "uniform":
        index = ((torch.linspace(999, 19, steps) - 19) / 20).clamp(0, 49)
        sigmas = model.t_to_sigma(index)
    else:
        fn = test_kdiffusion.K_SAMPLING.get_sigmas_karras if grid == "karras" else (
            test_kdiffusion.K_SAMPLING.get_sigmas_exponential)
        sigmas = fn(steps, model.sigmas[0].item(), model.sigmas[-1].item())[:-1]
    sigmas = torch.cat([sigmas, sigmas.new_zeros([1])])
    x = to_torch(noise) * sigmas[0]
    for i in range(steps):
        sigma, t = sigmas[i], grid_timestep(sigmas[i : i + 1])
        c_out, c_in = (-sigma, 1 / (sigma**2 + 1) ** 0.5)
        x0 = x + stand_in_torch(x * c_in, t[0]) * c_out
        scaled = t * 10.0
        c_skip, c_boundary = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
        x = c_boundary * x0 + c_skip * x
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * to_torch(step_noise[i])
    timesteps = grid_timestep(sigmas[:-1]).numpy().astype(np.float32)
    return to_numpy(x), timesteps


@pytest.mark.parametrize("grid,steps", [("uniform", 1), ("uniform", 2), ("uniform", 4), ("uniform", 8),
                                        ("karras", 4), ("exponential", 6)])
def test_a1111_lcm_matches_its_sampler(grid, steps):
    noise, step_noise = draws(4)
    ref, ref_timesteps = a1111_lcm_reference(SchedulerConfig(), grid, steps, noise, step_noise)
    schedule = make_schedule("lcm", SchedulerConfig(), steps, sigmas=grid)
    np.testing.assert_array_equal(np.asarray(schedule.timesteps), ref_timesteps)
    assert rel_err(run_sdjax(noise, step_noise, schedule), ref) < TOL


def test_a1111_lcm_name_and_timesteps():
    from sdjax.samplers import from_a1111, resolve_sampler, to_a1111

    assert from_a1111("LCM") == ("lcm", {"sigmas": "uniform"})
    assert resolve_sampler("LCM", "Karras") == ("lcm", {"sigmas": "karras"})
    assert to_a1111("lcm", {"sigmas": "uniform"}) == ("LCM", "Uniform")
    assert to_a1111("tcd", {}) == ("TCD", "Automatic") and from_a1111("TCD") == ("tcd", {})
    a1111 = make_schedule("lcm", SchedulerConfig(), 4, sigmas="uniform")
    np.testing.assert_array_equal(np.asarray(a1111.timesteps), [999, 679, 339, 19])
    diffusers_grid = make_schedule("lcm", SchedulerConfig(), 4)
    np.testing.assert_array_equal(np.asarray(diffusers_grid.timesteps), [999, 759, 499, 259])
    with pytest.raises(ValueError, match="cannot be combined with strength or timesteps"):
        make_schedule("lcm", SchedulerConfig(), 4, sigmas="uniform", strength=0.5)
