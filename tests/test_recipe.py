"""Recipes: one image's settings written as A1111 infotext and read back (sdjax's and A1111's own text),
and regeneration from a PNG's infotext through the public API."""

import numpy as np
import pytest

import sdjax
from sdjax import infotext
from sdjax.recipe import Recipe, read_recipe, regenerate

RECIPE = Recipe(prompt="a red circle, on a blue: background", negative_prompt="blurry, ugly", steps=5,
                scheduler="euler_a", guidance_scale=1.5, seed=123, width=64, height=48, noise="torch-cpu",
                scheduler_options=(("sigmas", "karras"),), model="builtin", model_hash="0123456789")


def test_recipe_round_trips_through_infotext():
    text = RECIPE.infotext()
    assert "Sampler: Euler a, Schedule type: Karras, CFG scale: 1.5, Seed: 123, Size: 64x48" in text
    assert "Model hash: 0123456789, Model: builtin" in text and "RNG: CPU" in text
    assert f"Version: sdjax {sdjax.__version__}" in text and '"a red circle, on a blue: background' not in text
    assert read_recipe(text) == RECIPE
    params = infotext.parse_infotext(text)
    assert params.prompt == RECIPE.prompt and params.negative_prompt == RECIPE.negative_prompt
    assert (params.sampler, params.schedule_type, params.rng) == ("Euler a", "Karras", "CPU")


def test_diffusers_grid_and_k_diffusion_grid_stay_apart():
    diffusers_grid = Recipe(**{**RECIPE.__dict__, "scheduler_options": ()})
    k_grid = Recipe(**{**RECIPE.__dict__, "scheduler_options": (("sigmas", "uniform"),)})
    for recipe in (diffusers_grid, k_grid):
        assert "Sampler: Euler a, Schedule type: Uniform" in recipe.infotext()
        assert read_recipe(recipe.infotext()) == recipe


def test_a1111_infotext_is_accepted():
    text = ("masterpiece, 1girl, (red hair:1.2)\nNegative prompt: lowres, bad anatomy\n"
            "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3713911546, Size: 512x768, "
            "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")
    recipe = read_recipe(text)
    assert (recipe.scheduler, dict(recipe.scheduler_options)) == ("dpmpp_2m", {"sigmas": "karras"})
    assert (recipe.seed, recipe.width, recipe.height, recipe.steps, recipe.guidance_scale) == (3713911546, 512, 768, 20, 7.0)
    assert recipe.noise == "torch-cuda"  # no RNG field: A1111's default GPU source
    old = read_recipe(text.replace("Sampler: DPM++ 2M, Schedule type: Karras", "Sampler: Euler a, RNG: CPU"))
    assert (old.scheduler, dict(old.scheduler_options), old.noise) == ("euler_a", {"sigmas": "uniform"}, "torch-cpu")
    with pytest.raises(ValueError, match="image-to-image result"):
        read_recipe(text + ", Denoising strength: 0.5")
    with pytest.raises(ValueError, match="unknown RNG 'TPU'"):
        read_recipe(text + ", RNG: TPU")


def test_regenerate_from_png_gives_the_same_image(tmp_path):
    sd = sdjax.StableDiffusion.default()
    recipe = Recipe(**{**RECIPE.__dict__, "width": 64, "height": 64, "model_hash": None})
    image = sd.text_to_image(recipe.prompt, recipe.negative_prompt, **recipe.generate_options())[0]
    path = tmp_path / "made.png"
    image.save(path, pnginfo=infotext.png_info(recipe.infotext()))
    again = regenerate(sd, path, output="np")
    np.testing.assert_array_equal(again[0], np.asarray(image))
    with pytest.raises(ValueError, match=r"LoRA\(s\) \['style'\] which are not loaded"):
        regenerate(sd, Recipe(**{**recipe.__dict__, "loras": (infotext.LoraRecord("style", 0.8),)}).infotext())
