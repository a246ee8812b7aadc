"""The sdjax command line on a tiny saved model: PNGs with parameters, reproducibility, convert, info."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image



def sdjax(*args, cache_dir, check=True):
    env = {**os.environ, "SDJAX_CACHE_DIR": str(cache_dir), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "sdjax.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_generate_writes_png_with_parameters_and_is_reproducible(tiny_pipeline_dir, tmp_path):
    common = ["generate", "a red circle on a blue background", "--model", tiny_pipeline_dir, "--steps", "3", "--seed", "7",
              "--negative", "blurry", "--scheduler", "euler", "--size", "64x48"]
    first = sdjax(*common, "--out", tmp_path / "a.png", cache_dir=tmp_path / "cache")
    assert str(tmp_path / "a.png") in first.stdout
    assert "compiling" in first.stderr and "step 3/3" in first.stderr
    image = Image.open(tmp_path / "a.png")
    assert image.size == (64, 48)
    text = image.text["parameters"]
    assert text.startswith("a red circle on a blue background\nNegative prompt: blurry\n")
    assert "Steps: 3, Sampler: Euler, Schedule type: Uniform, CFG scale: 7.5, Seed: 7, Size: 64x48" in text
    assert "sdjax sampler: euler" in text
    sdjax(*common, "--out", tmp_path / "b.png", cache_dir=tmp_path / "cache")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert any((tmp_path / "cache").iterdir()), "the persistent compilation cache was not written"


def test_generate_several_images_into_a_folder(tiny_pipeline_dir, tmp_path):
    result = sdjax("generate", "a cat", "--model", tiny_pipeline_dir, "--steps", "2", "-n", "3", "--parallel", "pmap",
                   "--no-progress", "--out", tmp_path / "out", cache_dir=tmp_path / "cache")
    paths = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in paths] == ["00000-0.png", "00001-1.png", "00002-2.png"]  # A1111: NNNNN-SEED
    assert "step 1/2" not in result.stderr
    arrays = [np.asarray(Image.open(p)) for p in paths]
    assert not np.array_equal(arrays[0], arrays[1])


def test_bad_arguments_give_clear_errors(tiny_pipeline_dir, tmp_path):
    result = sdjax("generate", "a cat", "--model", tiny_pipeline_dir, "--size", "60x64", cache_dir=tmp_path, check=False)
    assert result.returncode == 2
    assert "--size 60x64: width 60 must be a positive multiple of 8 (the VAE's downsampling factor); nearest valid: " \
           "56 or 64" in result.stderr
    result = sdjax("generate", "a cat", "--model", tmp_path / "missing", cache_dir=tmp_path, check=False)
    assert result.returncode == 2 and "model folder not found" in result.stderr
    result = sdjax("generate", "a cat", "--model", tiny_pipeline_dir, "--scheduler", "nope", cache_dir=tmp_path, check=False)
    assert result.returncode == 2 and "--scheduler 'nope': unknown sampler 'nope'" in result.stderr
    result = sdjax("generate", "a cat", "--size", "big", cache_dir=tmp_path, check=False)
    assert result.returncode == 2 and "size must look like WIDTHxHEIGHT" in result.stderr


def test_convert_folder_to_single_file_and_back(tiny_pipeline_dir, tmp_path):
    from sdjax import weights

    sdjax("convert", tiny_pipeline_dir, tmp_path / "model.safetensors", cache_dir=tmp_path)
    # Tiny models break the SD head-width rules that inference relies on, so pass the config folder.
    sdjax("convert", tmp_path / "model.safetensors", tmp_path / "back", "--config", tiny_pipeline_dir, cache_dir=tmp_path)
    for component in ("unet", "vae", "text_encoder"):
        original = weights.read_component(tiny_pipeline_dir / component)
        back = weights.read_component(tmp_path / "back" / component)
        original = {k.removeprefix("text_model."): v for k, v in original.items()}
        back = {k.removeprefix("text_model."): v for k, v in back.items()}
        assert original.keys() == back.keys()
        for key in original:
            np.testing.assert_array_equal(original[key], back[key])


def test_info_prints_devices_and_config(tiny_pipeline_dir, tmp_path):
    result = sdjax("info", "--model", tiny_pipeline_dir, cache_dir=tmp_path)
    assert "jax " in result.stdout and "device 0" in result.stdout
    assert "unet: in_channels 4" in result.stdout and "native size: 64px" in result.stdout
