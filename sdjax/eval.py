"""Reads shape, shape colour and background colour back out of a shapes image, to score prompt adherence.

The analysis is deterministic and uses no learned model, so it judges generated images the same way
every time:
  background  the named colour most border pixels are closest to;
  foreground  pixels closer to the shape's colour than to the background's (a midpoint split, so
              anti-aliased or blurred edges count half-way);
  colour      the named colour nearest to the median foreground pixel;
  shape       from three scale-free mask features: solidity (area / convex hull area) separates the
              concave star from convex shapes, the share of the area in the top half of the bounding
              box singles out the upward triangle (1/4), and the area's share of its bounding box
              separates square (1), circle (pi/4) and star (~1/2).
"""

from collections.abc import Sequence

import numpy as np

from sdjax.data import COLOURS, parse_caption
from sdjax.pipeline import BUILTIN_GUIDANCE_SCALE

__all__ = ["analyse", "adherence", "parse_caption"]

_NAMES = tuple(COLOURS)

MIN_IMAGE_SIZE = 32
# A pixel this far (RGB distance) from the background may be part of the shape; about a third of the
# distance between the closest two named colours.
FOREGROUND_DISTANCE = 60.0
MIN_SHAPE_SHARE = 0.01  # a shape covers at least this share of the image (the data set's smallest: ~8%)
STAR_MAX_SOLIDITY = 0.86  # star 0.64-0.73 (blurred up to 0.83), convex shapes 0.89-1
TRIANGLE_MAX_TOP_SHARE = 0.375  # share of the area in the top half of the box: triangle 1/4, others ~1/2
SQUARE_MIN_BOX_FILL = 0.89  # area / bounding box: square 1.0, circle 0.785
CIRCLE_MIN_BOX_FILL = 0.71  # circle 0.74-0.82, star 0.45-0.55 (blurred up to 0.68)


def _nearest_colour(pixels: np.ndarray, allowed: Sequence[str] = _NAMES) -> np.ndarray:
    """Index into `allowed` of the nearest named colour for each RGB row of `pixels`."""
    palette = np.array([COLOURS[name] for name in allowed], dtype=np.float32)
    distances = np.linalg.norm(pixels[:, None, :] - palette[None, :, :], axis=-1)
    return np.argmin(distances, axis=1)


def _border(image: np.ndarray, width: int) -> np.ndarray:
    rows = np.concatenate([image[:width], image[-width:]], axis=0).reshape(-1, 3)
    columns = np.concatenate([image[width:-width, :width], image[width:-width, -width:]], axis=1).reshape(-1, 3)
    return np.concatenate([rows, columns], axis=0)


def _majority_filter(mask: np.ndarray) -> np.ndarray:
    """Keeps a pixel set when at least 5 of its 3x3 neighbourhood are: removes speckle, keeps shapes."""
    padded = np.pad(mask.astype(np.int32), 1)
    h, w = mask.shape
    votes = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    return votes >= 5


def _convex_hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (x, y) points (Andrew's monotone chain, then the shoelace formula)."""
    points = np.unique(points, axis=0)  # sorted by x, then y
    if len(points) < 3:
        return 0.0

    def half_hull(ordered):
        hull = []
        for p in ordered:
            while len(hull) >= 2:
                (ox, oy), (ax, ay) = hull[-2], hull[-1]
                if (ax - ox) * (p[1] - oy) - (ay - oy) * (p[0] - ox) > 0:
                    break
                hull.pop()
            hull.append(p)
        return hull

    listed = points.tolist()
    hull = np.array(half_hull(listed)[:-1] + half_hull(listed[::-1])[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _shape_features(mask: np.ndarray) -> dict[str, float]:
    """solidity, bounding-box fill and top-half share of a non-empty mask, measured on pixel squares."""
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    area = float(mask.sum())
    box_fill = area / ((rows[-1] - rows[0] + 1) * (columns[-1] - columns[0] + 1))
    # The hull of the mask's pixel squares is the hull of the outer corners of each row's end pixels.
    corners = []
    for row in rows:
        filled = np.flatnonzero(mask[row])
        left, right = filled[0], filled[-1] + 1
        corners += [(left, row), (left, row + 1), (right, row), (right, row + 1)]
    solidity = area / _convex_hull_area(np.array(corners))
    middle = (rows[0] + rows[-1] + 1) / 2
    row_areas = mask.sum(axis=1)
    top = row_areas[: int(middle)].sum() + (middle % 1) * row_areas[int(middle)]
    return {"solidity": float(solidity), "box_fill": float(box_fill), "top_share": float(top / area)}


def _classify_shape(solidity: float, box_fill: float, top_share: float) -> str:
    if solidity < STAR_MAX_SOLIDITY:
        return "star"
    if top_share < TRIANGLE_MAX_TOP_SHARE:
        return "triangle"
    if box_fill >= SQUARE_MIN_BOX_FILL:
        return "square"
    # A blur fills a small star's notches, raising its solidity; its box stays emptier than a circle's.
    return "circle" if box_fill >= CIRCLE_MIN_BOX_FILL else "star"


def analyse(image) -> dict:
    """{"shape", "colour", "background"} read from a uint8 (H, W, 3) image (or PIL image), H, W >= 32.

    shape and colour are None when no shape stands out from the background. With a shape, the
    measured "solidity", "box_fill" and "top_share" come along for diagnosis.
    """
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or min(pixels.shape[:2]) < MIN_IMAGE_SIZE:
        raise ValueError(f"expected an RGB image (H, W, 3) with H, W >= {MIN_IMAGE_SIZE}, got shape {pixels.shape}")
    pixels = pixels.astype(np.float32)
    height, width, _ = pixels.shape

    border = _border(pixels, width=max(1, min(height, width) // 32))
    nearest = _nearest_colour(border)
    votes = np.bincount(nearest, minlength=len(_NAMES))
    background = _NAMES[int(np.argmax(votes))]
    background_rgb = np.median(border[nearest == np.argmax(votes)], axis=0)

    result = {"shape": None, "colour": None, "background": background}
    distance_to_background = np.linalg.norm(pixels - background_rgb, axis=-1)
    mask = distance_to_background > FOREGROUND_DISTANCE
    if mask.sum() < MIN_SHAPE_SHARE * height * width:
        return result
    # Refine the shape colour (two-means with a fixed background): on noisy images, background
    # pixels beyond FOREGROUND_DISTANCE bias the first estimate.
    for _ in range(3):
        shape_rgb = np.median(pixels[mask], axis=0)
        closer_to_shape = np.linalg.norm(pixels - shape_rgb, axis=-1) < distance_to_background
        mask = _majority_filter(closer_to_shape)
        if mask.sum() < MIN_SHAPE_SHARE * height * width:
            return result
    others = [name for name in _NAMES if name != background]
    result["colour"] = others[int(_nearest_colour(shape_rgb[None], others)[0])]
    features = _shape_features(mask)
    result.update(shape=_classify_shape(**features), **features)
    return result


def adherence(images, captions: Sequence[str]) -> dict:
    """Share of images whose shape, colour, background, and all three at once match their caption.

    images: uint8 (N, H, W, 3) or a sequence of images; captions as written by sdjax.data.caption.
    """
    if len(images) != len(captions) or len(captions) == 0:
        raise ValueError(f"need one caption per image and at least one image, got {len(images)} images, "
                         f"{len(captions)} captions")
    keys = ("shape", "colour", "background")
    correct = {key: 0 for key in (*keys, "all")}
    for image, text in zip(images, captions):
        wanted, seen = parse_caption(text), analyse(image)
        right = [seen[key] == wanted[key] for key in keys]
        for key, ok in zip(keys, right):
            correct[key] += ok
        correct["all"] += all(right)
    return {key: count / len(captions) for key, count in correct.items()} | {"count": len(captions)}


def generate_and_score(
    sd,
    captions: Sequence[str],
    *,
    scheduler: str = "dpmpp_2m",
    steps: int = 25,
    guidance_scale: float = BUILTIN_GUIDANCE_SCALE,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[dict, np.ndarray]:
    """Generate one image per caption with ``sd`` and score it against the caption.

    Returns the ``adherence`` dict and the uint8 images. Image i uses seed ``seed`` and index i, so the
    result does not depend on ``batch_size``.
    """
    images = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start : start + batch_size])
        images.append(
            sd.text_to_image(
                chunk,
                steps=steps,
                guidance_scale=guidance_scale,
                scheduler=scheduler,
                seed=[seed + start + i for i in range(len(chunk))],
                output="np",
            )
        )
    images = np.concatenate(images)
    return adherence(images, captions), images


def image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
    """Tile uint8 (N, H, W, 3) images into one uint8 grid image, row by row."""
    count, height, width, channels = images.shape
    rows = -(-count // columns)
    grid = np.zeros((rows * height, columns * width, channels), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    return grid
