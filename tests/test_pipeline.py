"""Text-to-image end to end against diffusers' PyTorch StableDiffusionPipeline on the same files and noise."""

import warnings

import numpy as np
import pytest
import torch

from reference import decode_unit, nchw, rel_err
from sdjax.pipeline import StableDiffusion

DIFFUSERS_CLASSES = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}
PROMPTS = ["a red circle on a blue background", "a green square"]
STEPS = 8


@pytest.mark.parametrize("scheduler", list(DIFFUSERS_CLASSES))
def test_text_to_image_matches_diffusers(sd, torch_pipe, scheduler):
    import diffusers

    torch_pipe.scheduler = getattr(diffusers, DIFFUSERS_CLASSES[scheduler]).from_config(torch_pipe.scheduler.config)
    noise = np.random.RandomState(0).randn(len(PROMPTS), 8, 8, 4).astype(np.float32)
    for negative in (None, ["blurry", "ugly"]):
        for guidance in (1.0, 7.5):
            with torch.no_grad():
                expected = torch_pipe(
                    PROMPTS,
                    negative_prompt=negative,
                    num_inference_steps=STEPS,
                    guidance_scale=guidance,
                    latents=nchw(noise),
                    output_type="np",
                ).images
            latents = sd.text_to_image(
                PROMPTS, negative, steps=STEPS, guidance_scale=guidance, scheduler=scheduler, latents=noise, output="latent"
            )
            err = rel_err(decode_unit(sd, latents), expected)
            print(f"{scheduler} negative={negative is not None} guidance={guidance}: rel err {err:.2e}")
            assert err < 1e-3


def test_outputs_pil_np_and_latent(sd):
    pil = sd.text_to_image("a cat", steps=2, seed=3, scheduler="ddim")
    array = sd.text_to_image("a cat", steps=2, seed=3, scheduler="ddim", output="np")
    latents = sd.text_to_image("a cat", steps=2, seed=3, scheduler="ddim", output="latent")
    assert len(pil) == 1 and pil[0].size == (64, 64)
    assert array.dtype == np.uint8 and array.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(np.asarray(pil[0]), array[0])
    assert latents.shape == (1, 8, 8, 4) and latents.dtype == np.float32


def test_non_square_sizes_and_per_image_seeds_and_guidance(sd):
    images = sd.text_to_image(
        "a cat", num_images_per_prompt=3, steps=2, height=48, width=80, seed=[5, 6, 5], guidance_scale=[1.0, 3.0, 9.0],
        scheduler="euler", output="np",
    )
    assert images.shape == (3, 48, 80, 3)
    single = sd.text_to_image("a cat", steps=2, height=48, width=80, seed=6, guidance_scale=3.0, scheduler="euler",
                              output="latent")
    in_batch = sd.text_to_image("a cat", num_images_per_prompt=3, steps=2, height=48, width=80, seed=[5, 6, 5],
                                guidance_scale=[1.0, 3.0, 9.0], scheduler="euler", output="latent")
    assert rel_err(in_batch[1], single[0]) < 1e-4  # an image depends only on its own seed, not its index
    again = sd.text_to_image(
        "a cat", num_images_per_prompt=3, steps=2, height=48, width=80, seed=[5, 6, 5], guidance_scale=[1.0, 3.0, 9.0],
        scheduler="euler", output="np",
    )
    np.testing.assert_array_equal(images, again)


def test_image_depends_only_on_its_seed_and_index(sd):
    batch = sd.text_to_image(["a cat", "a dog", "a cow"], steps=2, seed=11, scheduler="euler_a", output="np")
    first_two = sd.text_to_image(["a cat", "a dog"], steps=2, seed=11, scheduler="euler_a", output="np")
    np.testing.assert_array_equal(batch[:2], first_two)


def test_new_prompts_seeds_and_guidance_do_not_recompile(sd):
    sd.text_to_image("a cat", num_images_per_prompt=2, steps=3, seed=1, guidance_scale=5.0, scheduler="dpmpp_2m")
    count = sd.executor.compile_count()
    sd.text_to_image(
        ["a dog on a hill", "a boat"], ["bad", "worse"], steps=3, seed=7, guidance_scale=[2.0, 9.0], scheduler="dpmpp_2m"
    )
    assert sd.executor.compile_count() == count
    sd.text_to_image("a cat", num_images_per_prompt=2, steps=4, scheduler="dpmpp_2m")
    assert sd.executor.compile_count() == count + 1  # the step count is a shape: it does recompile


def test_long_prompt_is_encoded_in_chunks_without_a_warning(sd):
    prompt = " ".join(["word"] * 100)  # 100 tokens: two chunks of 77, as AUTOMATIC1111 encodes it (#20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job = sd.prepare("text_to_image", prompt, steps=1, scheduler="ddim", output="latent")
        sd.run(job)
    assert job.request.cond_ids.shape == (1, 154) and job.request.uncond_ids.shape == (1, 154)
    assert not [w for w in caught if "dropped" in str(w.message)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=60), r"height=60 is not a multiple of the VAE's downsampling factor 8; nearest valid sizes: 56 or 64"),
        (dict(width=70), r"width=70 is not a multiple .* nearest valid sizes: 64 or 72"),
        (dict(prompt=[]), r"prompt is empty"),
        (dict(negative_prompt=["a", "b", "c"]), r"got 3 negative prompts for 2 prompts"),
        (dict(steps=0), r"num_steps must be"),
        (dict(scheduler="fastest"), r"unknown sampler 'fastest'; accepted: sdjax names \[.*'dpmpp_2m'"),
        (dict(output="jpeg"), r"unknown output 'jpeg'; accepted: pil, np, latent"),
        (dict(guidance_scale=[1.0, 2.0, 3.0]), r"guidance_scale must be one value or one per image \(2\)"),
        (dict(seed=-1), r"seeds must be in \[0, 2\*\*32\)"),
        (dict(latents=np.zeros((2, 4, 4, 4))), r"latents must be NHWC initial noise of shape \(2, 8, 8, 4\)"),
        (dict(num_images_per_prompt=0), r"num_images_per_prompt must be a positive integer"),
    ],
)
def test_bad_input_is_a_clear_error(sd, kwargs, message):
    request = {**dict(prompt=["a cat", "a dog"], steps=2, scheduler="ddim"), **kwargs}
    with pytest.raises(ValueError, match=message):
        sd.text_to_image(**request)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        StableDiffusion.from_pretrained(str(tmp_path / "missing" / "model"))
