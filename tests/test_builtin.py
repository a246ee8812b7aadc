"""The built-in model shipped in the package: it loads without a download, draws what it is asked, and is
an ordinary diffusers model (PyTorch diffusers loads it and gives the same images)."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from reference import nchw, rel_err
from sdjax import data, eval as sd_eval
from sdjax.pipeline import StableDiffusion, builtin_model_dir


@pytest.fixture(scope="module")
def sd():
    return StableDiffusion.default(dtype=jnp.float32)


def test_builtin_model_is_small_and_in_the_diffusers_layout():
    folder = builtin_model_dir()
    for part in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json"):
        assert (folder / part).is_file(), part
    weights_bytes = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert weights_bytes < 40 * 2**20, weights_bytes


def test_builtin_model_uses_the_full_clip_vocabulary(sd):
    assert sd.config.text_encoder.vocab_size == 49408
    assert sd.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"].shape[0] == 49408
    assert sd.config.vae.downsample_factor == 8


def test_adherence_on_a_small_fixed_set(sd):
    """dpmpp_2m, 25 steps, the built-in model's guidance (BUILTIN_GUIDANCE_SCALE, the default here)."""
    captions = data.random_captions(40, seed=777)
    scores, _ = sd_eval.generate_and_score(sd, captions, scheduler="dpmpp_2m", steps=25, seed=777)
    print(scores)
    assert scores["all"] >= 0.8


def test_generate_cli_draws_a_red_circle_on_blue(tmp_path):
    env = {**os.environ, "SDJAX_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "circle.png"
    result = subprocess.run(
        [sys.executable, "-m", "sdjax.cli", "generate", "a red circle on a blue background", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = sd_eval.analyse(np.asarray(Image.open(out).convert("RGB")))
    assert (found["shape"], found["colour"], found["background"]) == ("circle", "red", "blue"), found


def test_pytorch_diffusers_loads_it_and_draws_the_same(sd):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(builtin_model_dir(), safety_checker=None, torch_dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle on a blue background", "a white triangle on a green background"]
    noise = np.random.RandomState(5).randn(2, 8, 8, 4).astype(np.float32)
    with torch.no_grad():
        expected = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, latents=nchw(noise), output_type="np").images
    latents = sd.text_to_image(prompts, steps=20, guidance_scale=5.0, scheduler="dpmpp_2m", latents=noise, output="latent")
    images = sd.vae.apply({"params": sd.params["vae"]}, latents / sd.config.vae.scaling_factor, method="decode")
    ours = np.clip(np.asarray(images) / 2 + 0.5, 0, 1)
    err = rel_err(ours, expected)
    print(f"built-in model vs diffusers: rel err {err:.2e}")
    assert err < 1e-3
