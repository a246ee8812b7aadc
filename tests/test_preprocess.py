"""Condition-image preprocessors: Canny edges equal OpenCV's, depth equals transformers' depth-estimation pipeline."""

import cv2
import numpy as np
import pytest
from PIL import Image

from sdjax import preprocess
from sdjax.data import render

CIRCLE = render("circle", "red", "blue", 0.6, (0.5, 0.5))  # 64x64, a circle of radius 19.2 around the centre


def test_canny_equals_opencv_and_marks_the_outline():
    for low, high in ((100, 200), (20, 60)):
        expected = cv2.Canny(cv2.cvtColor(CIRCLE, cv2.COLOR_RGB2GRAY), low, high)
        edges = preprocess.canny(CIRCLE, low, high)
        assert edges.shape == (64, 64, 3) and edges.dtype == np.uint8
        np.testing.assert_array_equal(edges, np.repeat(expected[..., None], 3, axis=-1))
    ys, xs = np.nonzero(edges[..., 0])
    assert len(ys) > 100 and set(np.unique(edges)) == {0, 255}
    radius = np.hypot(ys - 31.5, xs - 31.5)
    assert radius.min() > 17.5 and radius.max() < 21  # on the outline, nowhere else


def test_input_types_agree():
    edges = preprocess.canny(CIRCLE, 20, 60)
    rgba = np.concatenate([CIRCLE, np.full((64, 64, 1), 255, np.uint8)], axis=-1)
    for image in (Image.fromarray(CIRCLE), CIRCLE / 255.0, (CIRCLE / 255.0).astype(np.float32), rgba,
                  Image.fromarray(rgba)):
        np.testing.assert_array_equal(preprocess.canny(image, 20, 60), edges)
    gray = np.asarray(Image.fromarray(CIRCLE).convert("L"))
    assert preprocess.none(gray).shape == (64, 64, 3)
    np.testing.assert_array_equal(preprocess.preprocess("none", Image.fromarray(CIRCLE)), CIRCLE)
    np.testing.assert_array_equal(preprocess.preprocess("invert", CIRCLE), 255 - CIRCLE)


@pytest.mark.parametrize("low, high, message", [
    (-1, 200, r"canny low threshold must be an integer in \[0, 255\], got -1"),
    (100, 256, r"canny high threshold must be an integer in \[0, 255\], got 256"),
    (1.5, 200, r"canny low threshold must be an integer in \[0, 255\], got 1.5"),
    (True, 200, r"canny low threshold must be an integer in \[0, 255\], got True"),
    (200, 100, r"canny low threshold \(200\) must not exceed the high one \(100\)"),
])
def test_threshold_errors(low, high, message):
    with pytest.raises(ValueError, match=message):
        preprocess.canny(CIRCLE, low, high)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"unknown preprocessor 'sobel'; accepted: canny, depth, invert, none"):
        preprocess.preprocess("sobel", CIRCLE)
    with pytest.raises(ValueError, match=r"preprocessor 'canny' has no option 'lo'; accepted: low, high"):
        preprocess.preprocess("canny", CIRCLE, lo=10)
    with pytest.raises(ValueError, match=r"must be a PIL image or an \(H, W\).*got shape \(2, 64, 64, 3\)"):
        preprocess.canny(np.stack([CIRCLE, CIRCLE]))
    with pytest.raises(ValueError, match=r"float image values must be in \[0, 1\]"):
        preprocess.canny(CIRCLE.astype(np.float32))
    with pytest.raises(ValueError, match="must be one image"):
        preprocess.canny([CIRCLE])


def test_depth_normalises_the_estimate_at_the_image_size():
    ramp = np.tile(np.linspace(0.0, 3.0, 16, dtype=np.float32), (8, 1))  # nearer to the right, at 8x16

    def estimator(images):
        assert images.shape == (1, 48, 64, 3) and images.dtype == np.uint8
        return [ramp]

    image = np.zeros((48, 64, 3), np.uint8)
    depth = preprocess.preprocess("depth", image, estimator=estimator)
    assert depth.shape == (48, 64, 3) and depth.dtype == np.uint8
    assert depth.min() == 0 and depth.max() == 255
    assert np.all(np.diff(depth[..., 0].astype(int), axis=1) >= 0)
    np.testing.assert_array_equal(preprocess.depth(image, lambda images: [np.ones((8, 8))]), 0)  # flat: no layout


def test_depth_equals_transformers_depth_estimation_pipeline(tmp_path):
    torch = pytest.importorskip("torch", reason="depth estimation needs the depth extra (PyTorch)")
    transformers = pytest.importorskip("transformers")
    from reference import randomize_

    from sdjax.depth import DepthEstimator

    config = transformers.DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32,
        patch_size=8, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3],
        head_in_index=-1, is_hybrid=False,
    )
    model = randomize_(transformers.DPTForDepthEstimation(config), 0)
    with torch.no_grad():
        model.head.head[-2].bias.fill_(1.0)  # past the final ReLU: random weights alone predict zero depth
    model.save_pretrained(tmp_path / "dpt")
    processor = transformers.DPTImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "dpt")
    photo = Image.fromarray(render("star", "yellow", "purple", 0.7, (0.4, 0.6), image_size=48)).resize((64, 48))

    ours = preprocess.depth(photo, DepthEstimator(str(tmp_path / "dpt")))
    pipe = transformers.pipeline("depth-estimation", model=model, image_processor=processor)
    expected = np.asarray(pipe(photo)["depth"])
    assert ours.shape == (48, 64, 3) and np.ptp(ours) > 100
    assert np.abs(ours[..., 0].astype(int) - expected).max() <= 1  # float rounding before truncation
    np.testing.assert_array_equal(preprocess.depth(photo, str(tmp_path / "dpt")), ours)  # a folder as estimator
