"""Torch noise sources through the pipeline: initial and per-step noise drawn as diffusers draws them with one
generator per image (and AUTOMATIC1111's ImageRNG: seed + i, each image's generator continued), so the
same seeds give diffusers' latents; the errors for what a source cannot honour."""

import numpy as np
import pytest
import torch

from reference import rel_err
from sdjax import noise as sdjax_noise

PROMPTS = ["a red circle on a blue background", "a green square"]
STEPS = 6
SEED = 5
DIFFUSERS = {
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
}


@pytest.mark.parametrize("scheduler", list(DIFFUSERS))
def test_torch_cpu_noise_matches_diffusers_generators(sd, torch_pipe, scheduler):
    import diffusers

    name, extra = DIFFUSERS[scheduler]
    original = dict(torch_pipe.scheduler.config)
    torch_pipe.scheduler = getattr(diffusers, name).from_config(original, **extra)
    generators = [torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))]
    with torch.no_grad():
        expected = torch_pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, generator=generators,
                              output_type="latent").images
    torch_pipe.scheduler = type(torch_pipe.scheduler).from_config(original)
    ours = sd.text_to_image(PROMPTS, steps=STEPS, seed=SEED, scheduler=scheduler, noise="torch-cpu", output="latent")
    err = rel_err(ours, expected.permute(0, 2, 3, 1).numpy())
    print(f"{scheduler}: rel err {err:.2e}")
    assert err < 1e-3
    # jax noise differs: the test would catch noise="torch-cpu" being ignored
    assert rel_err(sd.text_to_image(PROMPTS, steps=STEPS, seed=SEED, scheduler=scheduler, output="latent"), ours) > 0.05


def test_each_image_regenerates_alone_from_its_seed(sd):
    for source in ("jax", "torch-cpu", "torch-cuda"):
        batch = sd.text_to_image(PROMPTS, steps=3, seed=SEED, scheduler="euler_a", noise=source, output="latent")
        alone = sd.text_to_image(PROMPTS[1], steps=3, seed=SEED + 1, scheduler="euler_a", noise=source,
                                 output="latent")
        assert rel_err(batch[1], alone[0]) < 1e-4  # not bit-equal: XLA's batch-1 and batch-2 matmuls round apart
        other = sd.text_to_image(PROMPTS[1], steps=3, seed=SEED, scheduler="euler_a", noise=source, output="latent")
        assert rel_err(other[0], alone[0]) > 0.05


def test_initial_noise_is_the_generators_first_nchw_draw(sd):
    latents = sd.text_to_image("x", steps=1, seed=9, scheduler="ddim", noise="torch-cuda", output="latent")
    assert latents.shape == (1, 8, 8, 4)
    first = sdjax_noise.torch_randn("torch-cuda", 9, (4, 8, 8)).transpose(1, 2, 0)
    noise, steps = sdjax_noise.image_noise("torch-cuda", [9], (8, 8, 4))
    np.testing.assert_array_equal(noise[0], first)
    assert steps is None


def test_what_a_noise_source_cannot_honour_is_refused(sd):
    with pytest.raises(ValueError, match=r"noise='torch' is not a noise source; accepted: 'jax', 'torch-cpu'"):
        sd.text_to_image("x", steps=2, noise="torch")
    with pytest.raises(ValueError, match="cannot be combined with latents="):
        sd.text_to_image("x", steps=2, noise="torch-cpu", latents=np.zeros((1, 8, 8, 4), np.float32))


def test_a1111_names_and_schedule_types_reach_the_sampler(sd):
    by_name = sd.text_to_image("x", steps=4, seed=1, scheduler="Euler a Karras", noise="torch-cpu", output="latent")
    by_type = sd.text_to_image("x", steps=4, seed=1, scheduler="euler_a", schedule_type="Karras", noise="torch-cpu",
                               output="latent")
    np.testing.assert_array_equal(by_name, by_type)
    diffusers_grid = sd.text_to_image("x", steps=4, seed=1, scheduler="euler_a", noise="torch-cpu", output="latent")
    assert rel_err(diffusers_grid, by_type) > 1e-3


def test_a1111_dpmpp_sde_with_torch_noise_is_refused(sd):
    # A1111 draws DPM++ SDE noise from a torchsde Brownian tree, which no generator stream reproduces
    with pytest.raises(ValueError, match="cannot reproduce AUTOMATIC1111's DPM\\+\\+ 2M SDE: .*Brownian tree"):
        sd.text_to_image("x", steps=4, scheduler="DPM++ 2M SDE", noise="torch-cuda")
    with pytest.raises(ValueError, match="unknown"):
        sd.text_to_image("x", steps=4, scheduler="Euler b")
