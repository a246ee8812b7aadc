"""SDXL text-to-image end to end against diffusers' StableDiffusionXLPipeline on the same files and noise: a tiny
random SDXL base saved by diffusers, loaded by ``StableDiffusion.from_pretrained``."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference
from reference import decode_unit, rel_err
from sdjax.pipeline import StableDiffusion

PROMPTS = ["a red circle on a blue background", "a green square"]
SEED = 7
SIZE = dict(height=48, width=64)  # non-square: (height, width) order matters in the time ids
DIFFUSERS_CLASSES = {"euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
MICRO = dict(original_size=(96, 128), crops_coords_top_left=(8, 16), target_size=(40, 56),
             negative_original_size=(32, 32), negative_target_size=(48, 64))


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sdxl")
    reference.save_sdxl_pipeline(path)
    return path


@pytest.fixture(scope="module")
def sd(sdxl_dir):
    return StableDiffusion.from_pretrained(sdxl_dir, dtype=jnp.float32)


@pytest.fixture(scope="module")
def torch_pipe(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_both_text_encoders_and_the_sdxl_settings(sd):
    assert sd.config.is_sdxl and sd.config.force_zeros_for_empty_prompt
    assert set(sd.params) == {"text_encoder", "text_encoder_2", "unet", "vae"}
    assert sd.config.text_encoder_2.projection_dim == 16 and sd.config.vae.scaling_factor == 0.13025
    assert sd.tokenizer_2.pad_token == "!" and sd.tokenizer_2.pad_token_id == 0  # SDXL's tokenizer_2 pads with "!"
    assert sd.tokenizer.pad_token_id == 49407


CASES = {
    # No negative prompt: zero negative conditioning (force_zeros_for_empty_prompt).
    "zeros": (PROMPTS, {}),
    # Negative prompts, one explicitly empty (encoded, not zeroed), positive micro-conditioning.
    "negatives": (PROMPTS, dict(negative_prompt=["blurry", ""], original_size=(96, 128),
                                crops_coords_top_left=(8, 16), target_size=(40, 56))),
    # Negative micro-conditioning too, and guidance rescale, on one prompt: diffusers 0.42 repeats the [negative;
    # positive] time ids per image after concatenating them, so with several prompts its ids interleave wrongly.
    "negative_micro": (PROMPTS[:1], dict(negative_prompt="blurry", guidance_rescale=0.7, **MICRO)),
}


@pytest.mark.parametrize("scheduler, case", [("euler", "zeros"), ("euler", "negatives"), ("dpmpp_2m", "negative_micro")])
def test_text_to_image_matches_diffusers(sd, torch_pipe, scheduler, case):
    import diffusers

    torch_pipe.scheduler = getattr(diffusers, DIFFUSERS_CLASSES[scheduler]).from_config(torch_pipe.scheduler.config)
    prompts, options = CASES[case]
    generators = [torch.Generator().manual_seed(SEED + i) for i in range(len(prompts))]
    with torch.no_grad():
        expected = torch_pipe(prompts, num_inference_steps=3, guidance_scale=5.0, generator=generators,
                              output_type="np", **SIZE, **options).images
    options = dict(options)
    negative = options.pop("negative_prompt", None)
    latents = sd.text_to_image(prompts, negative, steps=3, guidance_scale=5.0, scheduler=scheduler, seed=SEED,
                               noise="torch-cpu", output="latent", **SIZE, **options)
    err = rel_err(decode_unit(sd, latents), expected)
    print(f"SDXL {scheduler} {case}: rel err {err:.2e}")
    assert err < 1e-3


def test_micro_conditioning_prompts_and_zeroing_never_recompile(sd):
    def run(**options):
        # the program of the euler parity tests: prompts, sizes, crops, zeroing, seeds and scales are all traced
        return sd.text_to_image(PROMPTS, steps=3, scheduler="euler", output="latent", **SIZE, **options)

    first = run()
    compiles = sd.executor.compile_count()
    changed = [
        run(original_size=(512, 512), crops_coords_top_left=(3, 4), target_size=(64, 64)),
        run(negative_prompt="ugly", negative_original_size=(8, 8), negative_target_size=(16, 16)),
        run(guidance_scale=[3.0, 9.0], seed=5),
    ]
    assert sd.executor.compile_count() == compiles
    for other in changed:
        assert not np.allclose(first, other)


def test_save_pretrained_writes_an_sdxl_folder_diffusers_loads(sd, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    sd.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["force_zeros_for_empty_prompt"] is True
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path, add_watermarker=False)
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.text_encoder_2.config.projection_dim == 16
    again = StableDiffusion.from_pretrained(tmp_path, dtype=jnp.float32)
    assert again.config == sd.config
    reference.assert_trees_equal(again.params, sd.params)


def test_fp16_decodes_with_an_fp32_vae(sdxl_dir):
    half = StableDiffusion.from_pretrained(sdxl_dir, dtype=jnp.float16)
    assert half.vae.dtype == jnp.float32 and half.unet.dtype == jnp.float16
    assert half.params["vae"]["decoder"]["conv_out"]["kernel"].dtype == jnp.float16  # upcast when computing


def _one_line_error(kind, fn):
    with pytest.raises(kind) as error:
        fn()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_bad_input_is_refused_in_one_line(sd, sdxl_dir, tmp_path, tiny_pipeline_dir):
    t2i = sd.text_to_image
    assert "multiple of" in _one_line_error(ValueError, lambda: t2i("a", height=50, width=64, steps=2))
    assert "weighting" in _one_line_error(ValueError, lambda: t2i("a (cat:1.3)", steps=2))
    assert "long prompts" in _one_line_error(ValueError, lambda: t2i("cat " * 80, steps=2))
    assert "both" in _one_line_error(ValueError, lambda: t2i("a", negative_original_size=(8, 8), steps=2))
    assert "needs" in _one_line_error(ValueError, lambda: t2i("a", negative_crops_coords_top_left=(1, 1), steps=2))
    assert "pair" in _one_line_error(ValueError, lambda: t2i("a", original_size=(8,), steps=2))
    assert "clip_skip" in _one_line_error(ValueError, lambda: t2i("a", clip_skip=2, steps=2))
    assert "SDXL" in _one_line_error(ValueError, lambda: sd.add_lora({}, 1.0))
    broken = tmp_path / "no_text_encoder_2"
    shutil.copytree(sdxl_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    message = _one_line_error(FileNotFoundError, lambda: StableDiffusion.from_pretrained(broken))
    assert "SDXL" in message and "text_encoder_2/" in message
    sd15 = StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype=jnp.float32)
    assert "SDXL" in _one_line_error(ValueError, lambda: sd15.text_to_image("a", original_size=(64, 64), steps=2))


def test_refiner_layout_loads_and_saves_without_the_first_text_encoder(sdxl_dir, tmp_path):
    """The refiner's folder: only text_encoder_2/ and tokenizer_2/ (model_index.json: text_encoder [null, null]),
    requires_aesthetics_score; loading and saving work, generating is refused until the refiner lands."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    folder = tmp_path / "refiner"
    shutil.copytree(sdxl_dir, folder)
    for name in ("text_encoder", "tokenizer"):
        shutil.rmtree(folder / name)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None], tokenizer=[None, None],
                 requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    (folder / "model_index.json").write_text(json.dumps(index))
    refiner = StableDiffusion.from_pretrained(folder, dtype=jnp.float32)
    assert set(refiner.params) == {"text_encoder_2", "unet", "vae"} and refiner.config.text_encoder is None
    assert refiner.config.requires_aesthetics_score and not refiner.config.force_zeros_for_empty_prompt
    assert "refiner" in _one_line_error(ValueError, lambda: refiner.text_to_image("a", steps=2))
    saved = tmp_path / "saved"
    refiner.save_pretrained(saved)
    assert not (saved / "text_encoder").exists()
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(saved, add_watermarker=False)
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score
    again = StableDiffusion.from_pretrained(saved, dtype=jnp.float32)
    assert again.config == refiner.config
    reference.assert_trees_equal(again.params, refiner.params)
