"""A guidance-distilled (LCM) U-Net in the pipeline against diffusers' LatentConsistencyModelPipeline: the guidance
scale becomes the U-Net's ``timestep_cond`` (no classifier-free guidance), the LCM sampler re-noises every step
from each image's torch generator (noise="torch-cpu" draws those numbers), and new scales never recompile."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference
from reference import decode_unit, rel_err
from sdjax.pipeline import StableDiffusion

PROMPTS = ["a red circle on a blue background", "a green square"]
SEED = 11


@pytest.fixture(scope="module")
def lcm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_lcm")
    reference.save_pipeline(path, unet={"time_cond_proj_dim": 8})
    return path


@pytest.fixture(scope="module")
def sd(lcm_dir):
    return StableDiffusion.from_pretrained(lcm_dir, dtype=jnp.float32)


@pytest.mark.parametrize("steps, guidance", [(4, 8.0), (2, 1.5)])
def test_lcm_unet_matches_diffusers(sd, lcm_dir, steps, guidance):
    import diffusers

    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(lcm_dir, safety_checker=None,
                                                                     requires_safety_checker=False)
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))]
    with torch.no_grad():
        expected = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                        output_type="np").images
    latents = sd.text_to_image(PROMPTS, steps=steps, guidance_scale=guidance, scheduler="lcm", seed=SEED,
                               noise="torch-cpu", output="latent")
    err = rel_err(decode_unit(sd, latents), expected)
    print(f"LCM U-Net, {steps} steps, guidance {guidance}: rel err {err:.2e}")
    assert err < 1e-3


def test_guidance_is_an_input_of_one_program(sd):
    job = sd.prepare("text_to_image", PROMPTS, steps=2, guidance_scale=7.5, scheduler="lcm", output="latent")
    assert not job.program.guided  # the distilled U-Net embeds the scale: one U-Net call on the images alone
    first = sd.text_to_image(PROMPTS, steps=2, guidance_scale=7.5, scheduler="lcm", output="latent")
    compiles = sd.executor.compile_count()
    second = sd.text_to_image(PROMPTS, steps=2, guidance_scale=[2.0, 12.0], scheduler="lcm", output="latent")
    sd.text_to_image(PROMPTS, steps=2, guidance_scale=None, scheduler="lcm", output="latent")
    assert sd.executor.compile_count() == compiles
    assert not np.allclose(first, second)


def test_lcm_single_file_round_trip(sd, tmp_path):
    import jax
    from safetensors.numpy import load_file

    path = tmp_path / "lcm.safetensors"
    sd.save_single_file(path)
    state = load_file(path)
    assert "model.diffusion_model.time_embedding.cond_proj.weight" in state  # diffusers' converter's name
    loaded = StableDiffusion.from_single_file(path, dtype=jnp.float32)
    assert loaded.config.unet.time_cond_proj_dim == 8
    cond = loaded.params["unet"]["time_embedding"]["cond_proj"]["kernel"]
    np.testing.assert_array_equal(cond, sd.params["unet"]["time_embedding"]["cond_proj"]["kernel"])
    assert jax.tree.structure(loaded.params["unet"]) == jax.tree.structure(sd.params["unet"])
