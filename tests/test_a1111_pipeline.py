"""Whole pipelines against the references users trust, on a tiny random SD1 model:

- AUTOMATIC1111: the same U-Net wrapped as A1111 wraps it (k-diffusion's ``CompVisDenoiser`` over an LDM
  model exposing ``apply_model`` and the float64 LDM ``alphas_cumprod``, classifier-free guidance on
  [uncond; cond]), k-diffusion's own samplers and sigma grids, and A1111's noise: one ``torch.Generator``
  per image seeded seed + i, its first draw the initial noise and its next draws each step's noise.
- diffusers: a model folder carrying stable-diffusion-v1-5's released scheduler_config.json, every sampler
  built as diffusers users build it (``Cls.from_config(pipe.scheduler.config)``), with one generator per image.
"""

import json
import shutil

import jax.numpy as jnp
import pytest
import torch

from reference import rel_err
from sdjax import samplers
from sdjax.pipeline import StableDiffusion
from test_kdiffusion import K_EXTERNAL, K_SAMPLING, a1111_sigmas
from test_schedulers import SD15_RELEASED_SCHEDULER_CONFIG

PROMPTS = ["a red circle on a blue background", "a green square"]
NEGATIVE = ["blurry", ""]
SEED, GUIDANCE = 11, 7.5


class LDMModel:
    """What k-diffusion's CompVisDenoiser reads from an LDM model (A1111's ``sd_model``)."""

    def __init__(self, unet):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # LDM "linear"
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)
        self.unet = unet

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


def _context(pipe, prompts):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def _a1111_latents(pipe, sampler, grid, steps, quantize):
    denoiser = K_EXTERNAL.CompVisDenoiser(LDMModel(pipe.unet), quantize=quantize)
    cond, uncond = _context(pipe, PROMPTS), _context(pipe, NEGATIVE)

    def cfg_denoiser(x, sigma, **_):  # A1111's CFGDenoiser: one batch [uncond; cond]
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([uncond, cond]))
        u, c = out.chunk(2)
        return u + (c - u) * GUIDANCE

    generators = [torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))]

    def draw():  # A1111's ImageRNG: each image's generator continued
        return torch.stack([torch.randn((4, 8, 8), generator=g) for g in generators])

    sigmas = a1111_sigmas(denoiser, grid, steps)
    x = draw() * sigmas[0]
    kwargs = {"noise_sampler": lambda sigma, sigma_next: draw()} if sampler in ("euler_a",) else {}
    function = {"euler_a": "sample_euler_ancestral", "euler": "sample_euler", "lms": "sample_lms",
                "heun": "sample_heun", "dpmpp_2m": "sample_dpmpp_2m"}[sampler]
    with torch.no_grad():
        return getattr(K_SAMPLING, function)(cfg_denoiser, x, sigmas, disable=True, **kwargs)


A1111_CASES = [  # (A1111 name, schedule type, sdjax sampler, grid, steps, quantize)
    ("Euler a", "Automatic", "euler_a", "uniform", 10, False),
    ("Euler a", "Karras", "euler_a", "karras", 20, False),
    ("Euler", "Exponential", "euler", "exponential", 10, False),
    ("LMS", "Uniform", "lms", "uniform", 10, True),
    ("Heun", "Karras", "heun", "karras", 10, False),
    ("DPM++ 2M", "Automatic", "dpmpp_2m", "karras", 10, False),
    ("DPM++ 2M", "Uniform", "dpmpp_2m", "uniform", 30, False),
]


@pytest.mark.parametrize("name, schedule_type, sampler, grid, steps, quantize", A1111_CASES)
def test_a1111_pipeline_matches_k_diffusion(sd, torch_pipe, name, schedule_type, sampler, grid, steps, quantize):
    expected = _a1111_latents(torch_pipe, sampler, grid, steps, quantize).permute(0, 2, 3, 1).numpy()
    options = {"quantize": True} if quantize else None
    ours = sd.text_to_image(PROMPTS, NEGATIVE, steps=steps, guidance_scale=GUIDANCE, seed=SEED, scheduler=name,
                            schedule_type=schedule_type, scheduler_options=options, noise="torch-cpu",
                            output="latent")
    err = rel_err(ours, expected)
    print(f"{name} {schedule_type} {steps} steps quantize={quantize}: rel err {err:.2e}")
    assert err < 1e-4


@pytest.fixture(scope="module")
def released_config_dir(tiny_pipeline_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("released_config") / "model"
    shutil.copytree(tiny_pipeline_dir, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_RELEASED_SCHEDULER_CONFIG))
    return folder


@pytest.fixture(scope="module")
def released(released_config_dir):
    """(diffusers pipeline, its scheduler config as loaded, sdjax model) of the released-config folder."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(released_config_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config), StableDiffusion.from_pretrained(released_config_dir, dtype=jnp.float32)


@pytest.mark.parametrize("name", samplers.SCHEDULERS)
def test_released_config_pipeline_matches_diffusers(released, name):
    import diffusers

    pipe, loaded_config, sd = released
    class_name, extra = samplers.DIFFUSERS_SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, class_name).from_config(loaded_config, **extra)  # as users swap samplers
    generators = [torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))]
    with torch.no_grad():
        expected = pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=12, guidance_scale=GUIDANCE,
                        generator=generators, output_type="latent").images.permute(0, 2, 3, 1).numpy()
    ours = sd.text_to_image(PROMPTS, NEGATIVE, steps=12, guidance_scale=GUIDANCE, seed=SEED, scheduler=name,
                            noise="torch-cpu", output="latent")
    err = rel_err(ours, expected)
    print(f"{name}: rel err {err:.2e}")
    assert err < 1e-3
