"""Single files end to end: sdjax's from_single_file and from_pretrained against diffusers' from_single_file.

SD2-style v-prediction (OpenCLIP-style gelu text encoder, linear projections, upcast attention) through
every deterministic sampler, and SD1-style epsilon.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference
from reference import decode_unit, nchw, rel_err
from sdjax.pipeline import StableDiffusion
from sdjax.samplers import DIFFUSERS_SCHEDULERS

SD2_STYLE = dict(
    unet=dict(use_linear_projection=True, upcast_attention=True, attention_head_dim=(2, 4)),
    text_encoder=dict(hidden_act="gelu"),
    scheduler=dict(prediction_type="v_prediction"),
)
DETERMINISTIC = ["pndm", "ddim", "lms", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]
PROMPTS = ["a red circle on a blue background", "a yellow star"]


def build(tmp_path_factory, name, overrides):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp(name)
    reference.save_pipeline(folder, **overrides)
    file = folder.parent / f"{name}.safetensors"
    StableDiffusion.from_pretrained(folder, dtype=jnp.float32).save_single_file(file)
    torch_pipe = StableDiffusionPipeline.from_single_file(
        str(file), config=str(folder), local_files_only=True, safety_checker=None
    )
    torch_pipe.set_progress_bar_config(disable=True)
    torch_pipe.original_scheduler_config = dict(torch_pipe.scheduler.config)
    return folder, file, torch_pipe


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return build(tmp_path_factory, "sd2_v", SD2_STYLE)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return build(tmp_path_factory, "sd1", {})


_LOADED = {}


def sd2_from_file(folder, file):
    if file not in _LOADED:
        _LOADED[file] = StableDiffusion.from_single_file(file, config=folder, dtype=jnp.float32)
    return _LOADED[file]


def diffusers_images(torch_pipe, scheduler, noise, steps=6):
    import diffusers

    class_name, extra = DIFFUSERS_SCHEDULERS[scheduler]
    # From the model's own config, not the last test's scheduler: that one may carry use_karras_sigmas.
    base = torch_pipe.original_scheduler_config
    torch_pipe.scheduler = getattr(diffusers, class_name).from_config(base, **extra)
    with torch.no_grad():
        return torch_pipe(
            PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=steps, guidance_scale=6.0,
            latents=nchw(noise), output_type="np",
        ).images


def test_single_file_parameters_equal_the_folder_bit_for_bit(sd2):
    folder, file, _ = sd2
    from_file = StableDiffusion.from_single_file(file, config=folder, dtype=jnp.float32)
    from_folder = StableDiffusion.from_pretrained(folder, dtype=jnp.float32)
    assert from_file.config.scheduler.prediction_type == "v_prediction"
    assert from_file.config.unet.upcast_attention and from_file.config.unet.use_linear_projection
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), from_file.params, from_folder.params)
    assert all(jax.tree.leaves(same))


@pytest.mark.parametrize("scheduler", DETERMINISTIC)
def test_sd2_v_prediction_matches_diffusers_from_single_file(sd2, scheduler):
    folder, file, torch_pipe = sd2
    noise = np.random.RandomState(1).randn(2, 8, 8, 4).astype(np.float32)
    expected = diffusers_images(torch_pipe, scheduler, noise)
    # The folder path has bit-identical parameters (test above), so one sdjax model serves both paths.
    sd = sd2_from_file(folder, file)
    latents = sd.text_to_image(
        PROMPTS, ["blurry", ""], steps=6, guidance_scale=6.0, scheduler=scheduler, latents=noise, output="latent"
    )
    err = rel_err(decode_unit(sd, latents), expected)
    print(f"sd2 v-prediction {scheduler}: rel err {err:.2e}")
    assert err < 1e-3


def test_sd1_single_file_matches_diffusers(sd1):
    folder, file, torch_pipe = sd1
    noise = np.random.RandomState(2).randn(2, 8, 8, 4).astype(np.float32)
    expected = diffusers_images(torch_pipe, "dpmpp_2m", noise)
    sd = StableDiffusion.from_single_file(file, config=folder, dtype=jnp.float32)
    latents = sd.text_to_image(
        PROMPTS, ["blurry", ""], steps=6, guidance_scale=6.0, scheduler="dpmpp_2m", latents=noise, output="latent"
    )
    assert rel_err(decode_unit(sd, latents), expected) < 1e-3


def test_prediction_type_can_be_overridden(sd2):
    folder, file, _ = sd2
    sd = StableDiffusion.from_single_file(file, config=folder, prediction_type="epsilon", dtype=jnp.float32)
    assert sd.config.scheduler.prediction_type == "epsilon"
