"""The synthetic shapes data set (sdjax.data) and the image analyser that scores prompt adherence (sdjax.eval)."""

import math

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdjax import data
from sdjax.eval import adherence, analyse, parse_caption


def test_dataset_is_deterministic_and_matches_its_labels():
    images, captions, labels = data.make_dataset(300, seed=3)
    again, captions_again, _ = data.make_dataset(300, seed=3)
    other, _, _ = data.make_dataset(300, seed=4)
    assert images.shape == (300, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and captions == captions_again
    assert not np.array_equal(images, other)
    for image, text, label in zip(images, captions, labels):
        assert text == f"a {label['colour']} {label['shape']} on a {label['background']} background"
        assert parse_caption(text) == {k: label[k] for k in ("shape", "colour", "background")}
        assert label["colour"] != label["background"]
        assert data.MIN_SIZE <= label["size"] <= data.MAX_SIZE
        # The shape lies fully inside: the outermost ring of pixels is pure background.
        ring = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (ring == data.COLOURS[label["background"]]).all()
        cx, cy = label["center"]
        assert image[int(cy * 64), int(cx * 64)].tolist() == list(data.COLOURS[label["colour"]])
    # The default training set leaves out what the LoRA teaches later; every other choice appears.
    assert {l["shape"] for l in labels} == set(data.BASE_SHAPES)
    assert {l["colour"] for l in labels} == set(data.BASE_COLOURS)
    assert {l["background"] for l in labels} == set(data.BACKGROUNDS)


def test_image_size_is_configurable():
    images, _, _ = data.make_dataset(4, seed=0, image_size=96, shapes=["star"], colours=["purple"])
    assert images.shape == (4, 96, 96, 3)
    assert (images == data.COLOURS["purple"]).all(axis=-1).any(axis=(1, 2)).all()


@pytest.mark.parametrize(
    "shape, area",
    [
        ("circle", math.pi),
        ("square", 4.0),
        ("triangle", 2.0),
        ("star", 5 * 1.0 * 0.5 * math.sin(math.pi / 5)),  # 10 triangles (centre, outer, inner point)
    ],
)
def test_rendered_area_matches_geometry(shape, area):
    """Anti-aliased coverage summed over the image equals the shape's area (in half-size units squared)."""
    half_size_pixels = 40
    image = data.render(shape, "white", "black", size=0.625, center=(0.5, 0.5), image_size=128)
    white, black = np.array(data.COLOURS["white"], float), np.array(data.COLOURS["black"], float)
    coverage = ((image - black) / (white - black)).mean(axis=-1)
    assert coverage.min() >= 0 and coverage.max() <= 1
    assert coverage.sum() / half_size_pixels**2 == pytest.approx(area, rel=1e-3)


def test_random_captions_follow_the_grammar():
    captions = data.random_captions(200, seed=1, shapes=data.SHAPES, colours=data.SHAPE_COLOURS)
    assert captions == data.random_captions(200, seed=1, shapes=data.SHAPES, colours=data.SHAPE_COLOURS)
    parsed = [parse_caption(c) for c in captions]
    assert {p["shape"] for p in parsed} == set(data.SHAPES)
    assert {p["colour"] for p in parsed} == set(data.SHAPE_COLOURS)
    assert all(p["colour"] != p["background"] for p in parsed)
    assert {parse_caption(c)["shape"] for c in data.random_captions(100, seed=1)} == set(data.BASE_SHAPES)


def test_samples():
    samples = data.make_samples(3, seed=0)
    images, captions, _ = data.make_dataset(3, seed=0)
    assert [s.caption for s in samples] == captions
    assert np.array_equal(samples[1].image, images[1])
    assert samples[0].caption == data.caption(samples[0].shape, samples[0].colour, samples[0].background)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="hexagon"):
        data.render("hexagon", "red", "blue", 0.5, (0.5, 0.5))
    with pytest.raises(ValueError, match="accepted"):
        data.make_dataset(2, seed=0, colours=["mauve"])
    with pytest.raises(ValueError, match="no shape colour"):
        data.make_dataset(2, seed=0, colours=["red"], backgrounds=["red"])
    with pytest.raises(ValueError, match="not of the form"):
        parse_caption("a picture of a cat")
    with pytest.raises(ValueError, match="unknown"):
        parse_caption("a red hexagon on a blue background")
    with pytest.raises(ValueError, match="RGB image"):
        analyse(np.zeros((16, 16, 3), np.uint8))


@pytest.fixture(scope="module")
def every_kind():
    """Images of every shape and shape colour, star and purple included."""
    return data.make_dataset(600, seed=11, shapes=data.SHAPES, colours=data.SHAPE_COLOURS)


def test_analyser_reads_the_data_set_back(every_kind):
    images, captions, _ = every_kind
    scores = adherence(images, captions)
    assert scores["count"] == 600
    assert scores["all"] >= 0.99, scores


def test_analyser_tolerates_blur_noise_and_other_sizes(every_kind):
    images, captions, _ = every_kind
    rng = np.random.default_rng(0)
    degraded = []
    for i, image in enumerate(images[:150]):
        picture = Image.fromarray(image)
        if i % 3 == 0:
            picture = picture.filter(ImageFilter.GaussianBlur(1.5))
        elif i % 3 == 1:
            picture = picture.resize((160, 160), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        noisy = np.asarray(picture) + rng.normal(0, 12, (picture.height, picture.width, 3))
        degraded.append(np.clip(noisy, 0, 255).astype(np.uint8))
    scores = adherence(degraded, captions[:150])
    assert scores["all"] >= 0.97, scores


def test_analyser_is_not_trivially_right(every_kind):
    images, captions, labels = every_kind
    blank = np.full((64, 64, 3), data.COLOURS["blue"], np.uint8)
    assert analyse(blank) == {"shape": None, "colour": None, "background": "blue"}
    assert adherence([blank], ["a red circle on a blue background"])["all"] == 0

    def relabel(label, key, choices):
        wrong = {**label, key: choices[(choices.index(label[key]) + 1) % len(choices)]}
        if wrong["colour"] == wrong["background"]:  # keep the caption valid for the data set
            wrong[key] = choices[(choices.index(label[key]) + 2) % len(choices)]
        return data.caption(wrong["shape"], wrong["colour"], wrong["background"])

    subset, subset_labels = images[:200], labels[:200]
    wrong_shape = adherence(subset, [relabel(l, "shape", list(data.SHAPES)) for l in subset_labels])
    wrong_colour = adherence(subset, [relabel(l, "colour", list(data.SHAPE_COLOURS)) for l in subset_labels])
    wrong_background = adherence(subset, [relabel(l, "background", list(data.BACKGROUNDS)) for l in subset_labels])
    assert wrong_shape["shape"] <= 0.01 and wrong_shape["colour"] >= 0.99 and wrong_shape["all"] <= 0.01
    assert wrong_colour["colour"] <= 0.01 and wrong_colour["all"] <= 0.01
    assert wrong_background["background"] <= 0.01 and wrong_background["all"] <= 0.01
