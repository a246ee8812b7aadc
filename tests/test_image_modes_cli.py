"""``sdjax img2img | inpaint | depth2img`` on tiny saved models: PNGs with parameters, the options, errors."""

import numpy as np
import pytest
from PIL import Image

from sdjax.data import render
from test_cli import sdjax


@pytest.fixture()
def inputs(tmp_path):
    Image.fromarray(render("circle", "red", "blue", 0.6, (0.5, 0.5))).save(tmp_path / "in.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path


def test_img2img_and_inpaint_write_pngs_with_parameters(tiny_pipeline_dir, inputs):
    common = ["--model", tiny_pipeline_dir, "--image", inputs / "in.png", "--steps", "4", "--seed", "5", "--scheduler",
              "ddim", "--no-progress"]
    sdjax("img2img", "a green square", *common, "--strength", "0.5", "--out", inputs / "a.png",
          cache_dir=inputs / "cache")
    image = Image.open(inputs / "a.png")
    assert image.size == (64, 64)
    assert "Steps: 4, Sampler: DDIM" in image.text["parameters"] and "sdjax sampler: ddim" in image.text["parameters"]
    assert "Denoising strength: 0.5" in image.text["parameters"]
    sdjax("inpaint", "a green square", *common, "--mask", inputs / "mask.png", "-n", "2", "--size", "48x64",
          "--out", inputs / "out", cache_dir=inputs / "cache")
    paths = sorted((inputs / "out").glob("*.png"))
    assert [p.name for p in paths] == ["00000-5.png", "00001-6.png"]
    assert Image.open(paths[1]).size == (48, 64)
    assert "Mode: inpaint" in Image.open(paths[1]).text["parameters"]
    assert "Batch size: 2, Batch pos: 1" in Image.open(paths[1]).text["parameters"]


def test_image_commands_give_clear_errors(tiny_pipeline_dir, inputs):
    result = sdjax("img2img", "a cat", "--model", tiny_pipeline_dir, "--image", inputs / "missing.png", cache_dir=inputs,
                   check=False)
    assert result.returncode == 2 and "--image file not found" in result.stderr
    result = sdjax("img2img", "a cat", "--model", tiny_pipeline_dir, "--image", inputs / "in.png", "--strength", "1.5",
                   cache_dir=inputs, check=False)
    assert result.returncode == 2 and "--strength must be a finite number in [0, 1], got 1.5" in result.stderr
    result = sdjax("depth2img", "a cat", "--model", tiny_pipeline_dir, "--image", inputs / "in.png", cache_dir=inputs,
                   check=False)
    assert result.returncode == 2 and "depth_to_image needs a U-Net with 5 input channels" in result.stderr


def test_depth2img_reads_a_depth_map_file(tiny_depth_dir, inputs):
    yy, xx = np.mgrid[:32, :32]
    np.save(inputs / "depth.npy", (xx + 2 * yy).astype(np.float32))
    sdjax("depth2img", "a cat", "--model", tiny_depth_dir, "--image", inputs / "in.png", "--depth", inputs / "depth.npy",
          "--steps", "2", "--no-progress", "--out", inputs / "d.png", cache_dir=inputs / "cache")
    assert "Mode: depth2img" in Image.open(inputs / "d.png").text["parameters"]
