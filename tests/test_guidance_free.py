"""The guidance-free path: guidance_scale=None (or 1.0 for every image) runs one U-Net call per step on the images
alone, equals the guided computation at guidance 1, equals diffusers (which skips guidance at 1), and changing
values within a path never recompiles."""

import dataclasses

import numpy as np
import pytest
import torch

from reference import decode_unit, nchw, rel_err
from sdjax.models.unet import UNet2DConditionModel

PROMPTS = ["a red circle on a blue background", "a green square"]
NOISE = np.random.RandomState(2).randn(2, 8, 8, 4).astype(np.float32)
STEPS = 5


def traced_unet_batches(monkeypatch):
    """The batch size of every U-Net call traced from now on (the scan body is traced once: one per step)."""
    batches = []
    original = UNet2DConditionModel.__call__

    def counting(self, sample, *args, **kwargs):
        batches.append(sample.shape[0])
        return original(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "__call__", counting)
    return batches


# each case its own step count: its own program, traced anew
@pytest.mark.parametrize("guidance, steps", [(None, 3), (1.0, 4), ([1.0, 1.0], 6), (2.0, 7)])
def test_no_guidance_is_one_unet_call_on_the_images_alone(sd, monkeypatch, guidance, steps):
    job = sd.prepare("text_to_image", PROMPTS, steps=steps, guidance_scale=guidance, latents=NOISE, output="latent")
    assert job.program.guided == (guidance == 2.0)
    batches = traced_unet_batches(monkeypatch)
    sd.run(job)
    assert batches == ([4] if guidance == 2.0 else [2])  # once in the traced scan body: [uncond; cond] or the images


def test_guidance_free_equals_the_guided_computation_at_1(sd):
    job = sd.prepare("text_to_image", PROMPTS, steps=STEPS, guidance_scale=1.0, latents=NOISE, output="latent")
    free = sd.run(job)
    guided = sd.run(dataclasses.replace(job, program=dataclasses.replace(job.program, guided=True)))
    err = np.abs(free - guided).max() / np.abs(guided).max()
    print(f"guidance-free vs guided at 1: {err:.2e}")
    assert err < 1e-5


def test_guidance_free_matches_diffusers_at_guidance_1(sd, tiny_pipeline_dir):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=1.0, latents=nchw(NOISE),
                        output_type="np").images
    latents = sd.text_to_image(PROMPTS, steps=STEPS, guidance_scale=None, scheduler="pndm", latents=NOISE,
                               output="latent")
    err = rel_err(decode_unit(sd, latents), expected)
    print(f"guidance-free vs diffusers at guidance 1: {err:.2e}")
    assert err < 1e-3


def test_paths_switch_only_on_none_or_all_ones_and_values_never_recompile(sd):
    def run(guidance, seed=0):
        return sd.text_to_image(PROMPTS, steps=2, guidance_scale=guidance, seed=seed, output="latent")

    run(None)
    compiles = sd.executor.compile_count()
    run(1.0, seed=1)
    run([1.0, 1.0], seed=2)
    assert sd.executor.compile_count() == compiles  # all three are the guidance-free program
    run(3.0)
    guided = sd.executor.compile_count()
    assert guided == compiles + 1
    run([1.0, 5.0])
    run(7.5)
    assert sd.executor.compile_count() == guided
