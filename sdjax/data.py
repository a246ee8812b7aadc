"""The synthetic shapes data set of the built-in model: one coloured shape on a plain background.

Every image shows one shape of one colour on a background of another colour, captioned
"a red circle on a blue background". Images are drawn from exact signed distances to the shape
outline, which gives anti-aliased edges without supersampling and renders 10k 64x64 images in a
few seconds.

`star` and `purple` are drawable but left out of the default training set (BASE_SHAPES,
BASE_COLOURS): they are what a LoRA teaches the base model later.
"""

import dataclasses
import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (150, 50, 200),
}
SHAPES = ("circle", "square", "triangle", "star")
BASE_SHAPES = ("circle", "square", "triangle")
SHAPE_COLOURS = ("red", "green", "blue", "yellow", "white", "purple")
BASE_COLOURS = ("red", "green", "blue", "yellow", "white")
BACKGROUNDS = ("red", "green", "blue", "yellow", "white", "black")

MIN_SIZE, MAX_SIZE = 0.40, 0.75  # shape extent as a fraction of the image side
MARGIN = 0.03  # background kept between the shape and the image edge, fraction of the side
BATCH = 512  # images rendered at once: bounds the memory of the (batch, H, W) temporaries


def _star_vertices(points: int = 5, inner_radius: float = 0.5) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points  # first point straight up
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner_radius)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


# Outlines in units of the half-size, centred on the origin, image y axis pointing down; every
# shape spans [-1, 1] in its larger dimension. None means the unit circle.
OUTLINES: dict[str, np.ndarray | None] = {
    "circle": None,
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float),
    "triangle": np.array([[0, -1], [1, 1], [-1, 1]], dtype=float),
    "star": _star_vertices(),
}


@dataclasses.dataclass(frozen=True)
class Sample:
    image: np.ndarray  # uint8 (H, W, 3)
    caption: str
    shape: str
    colour: str
    background: str


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


_CAPTION = re.compile(r"an? (\w+) (\w+) on an? (\w+) background")


def parse_caption(text: str) -> dict[str, str]:
    """{"shape", "colour", "background"} of a caption written by `caption`."""
    match = _CAPTION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"caption {text!r} is not of the form 'a <colour> <shape> on a <colour> background'")
    colour, shape, background = match.groups()
    if shape not in OUTLINES or colour not in COLOURS or background not in COLOURS:
        raise ValueError(
            f"caption {text!r} names an unknown shape or colour; shapes: {SHAPES}, colours: {tuple(COLOURS)}"
        )
    return {"shape": shape, "colour": colour, "background": background}


def _polygon_sdf(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Signed distance from points (x, y) to a simple polygon: negative inside."""
    distance = np.full(x.shape, np.inf, dtype=np.float32)
    inside = np.zeros(x.shape, dtype=bool)
    # Python floats keep the arithmetic in the points' float32.
    for (ax, ay), (bx, by) in zip(vertices.tolist(), np.roll(vertices, -1, axis=0).tolist()):
        ex, ey = bx - ax, by - ay
        t = np.clip(((x - ax) * ex + (y - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        distance = np.minimum(distance, np.hypot(x - ax - t * ex, y - ay - t * ey))
        # Even-odd rule: count crossings of a ray from the point towards +x.
        straddles = (ay > y) != (by > y)
        crossing_x = ax + (y - ay) * (ex / ey if ey else 0.0)
        inside ^= straddles & (x < crossing_x)
    return np.where(inside, -distance, distance)


def _unit_sdf(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    outline = OUTLINES[shape]
    if outline is None:
        return np.hypot(x, y) - 1.0
    return _polygon_sdf(x, y, outline)


def _check_names(kind: str, given: Sequence[str], accepted: Sequence[str]) -> None:
    unknown = [name for name in given if name not in accepted]
    if unknown or not given:
        raise ValueError(f"{kind} {list(given)!r}: unknown or empty, accepted are {tuple(accepted)}")


def _render_batch(
    shapes: Sequence[str],
    colours: np.ndarray,
    backgrounds: np.ndarray,
    sizes: np.ndarray,
    centers: np.ndarray,
    image_size: int,
) -> np.ndarray:
    """uint8 (N, S, S, 3) images; colours and backgrounds (N, 3) RGB, sizes (N,), centers (N, 2) in [0, 1]."""
    n = len(shapes)
    pixel = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size  # pixel centres in [0, 1]
    half = (sizes / 2).astype(np.float32)[:, None, None]
    x = (pixel[None, None, :] - centers[:, 0, None, None].astype(np.float32)) / half
    y = (pixel[None, :, None] - centers[:, 1, None, None].astype(np.float32)) / half
    x, y = np.broadcast_to(x, (n, image_size, image_size)), np.broadcast_to(y, (n, image_size, image_size))
    distance = np.empty((n, image_size, image_size), dtype=np.float32)
    names = np.asarray(shapes)
    for shape in set(shapes):
        chosen = names == shape
        distance[chosen] = _unit_sdf(shape, x[chosen], y[chosen])
    distance_in_pixels = distance * half * image_size
    coverage = np.clip(0.5 - distance_in_pixels, 0.0, 1.0)[..., None]
    images = backgrounds[:, None, None, :] * (1 - coverage) + colours[:, None, None, :] * coverage
    return np.round(images).astype(np.uint8)


def render(
    shape: str,
    colour: str,
    background: str,
    size: float,
    center: tuple[float, float],
    image_size: int = 64,
) -> np.ndarray:
    """One uint8 (image_size, image_size, 3) image.

    size is the shape's extent and center its (x, y) position, both as fractions of the image side.
    """
    _check_names("shape", [shape], tuple(OUTLINES))
    _check_names("colour", [colour, background], tuple(COLOURS))
    if not 0 < size <= 1 or len(center) != 2:
        raise ValueError(f"size must be in (0, 1] and center an (x, y) pair, got size={size}, center={center}")
    rgb = np.array([COLOURS[colour]], dtype=np.float32)
    background_rgb = np.array([COLOURS[background]], dtype=np.float32)
    return _render_batch([shape], rgb, background_rgb, np.array([size]), np.array([center]), image_size)[0]


def _combinations(shapes, colours, backgrounds) -> list[tuple[str, str, str]]:
    _check_names("shapes", shapes, tuple(OUTLINES))
    _check_names("colours", colours, tuple(COLOURS))
    _check_names("backgrounds", backgrounds, tuple(COLOURS))
    combos = [(s, c, b) for s, c, b in itertools.product(shapes, colours, backgrounds) if c != b]
    if not combos:
        raise ValueError(f"no shape colour differs from a background: colours {colours}, backgrounds {backgrounds}")
    return combos


def make_dataset(
    num: int,
    seed: int,
    image_size: int = 64,
    shapes: Sequence[str] = BASE_SHAPES,
    colours: Sequence[str] = BASE_COLOURS,
    backgrounds: Sequence[str] = BACKGROUNDS,
) -> tuple[np.ndarray, list[str], list[dict]]:
    """`num` images uint8 (num, S, S, 3), their captions and labels, a pure function of the arguments.

    Each image draws uniformly one (shape, colour, background) combination with colour != background,
    a size in [MIN_SIZE, MAX_SIZE] and a position that keeps the shape inside the image.
    Labels hold shape, colour, background, size and center (x, y), fractions of the image side.
    """
    if num < 0 or image_size < 8:
        raise ValueError(f"num must be >= 0 and image_size >= 8, got num={num}, image_size={image_size}")
    combos = _combinations(shapes, colours, backgrounds)
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(combos), size=num)
    sizes = rng.uniform(MIN_SIZE, MAX_SIZE, size=num)
    slack = 1 - sizes - 2 * MARGIN  # room left for the shape's top-left corner
    centers = MARGIN + sizes[:, None] / 2 + rng.uniform(size=(num, 2)) * slack[:, None]

    chosen = [combos[i] for i in picks]
    names = [c[0] for c in chosen]
    rgb = np.array([COLOURS[c[1]] for c in chosen], dtype=np.float32).reshape(num, 3)
    background_rgb = np.array([COLOURS[c[2]] for c in chosen], dtype=np.float32).reshape(num, 3)
    images = np.empty((num, image_size, image_size, 3), dtype=np.uint8)
    for start in range(0, num, BATCH):
        part = slice(start, start + BATCH)
        images[part] = _render_batch(
            names[part], rgb[part], background_rgb[part], sizes[part], centers[part], image_size
        )

    captions = [caption(*c) for c in chosen]
    labels = [
        {"shape": s, "colour": c, "background": b, "size": float(size), "center": (float(cx), float(cy))}
        for (s, c, b), size, (cx, cy) in zip(chosen, sizes, centers)
    ]
    return images, captions, labels


def make_samples(num: int, seed: int, **kwargs) -> list[Sample]:
    """make_dataset as a list of Samples (keyword arguments as in make_dataset)."""
    images, captions, labels = make_dataset(num, seed, **kwargs)
    return [
        Sample(image, text, label["shape"], label["colour"], label["background"])
        for image, text, label in zip(images, captions, labels)
    ]


def random_captions(
    num: int,
    seed: int,
    shapes: Sequence[str] = BASE_SHAPES,
    colours: Sequence[str] = BASE_COLOURS,
    backgrounds: Sequence[str] = BACKGROUNDS,
) -> list[str]:
    """`num` captions drawn uniformly from the same grammar and combinations as make_dataset."""
    combos = _combinations(shapes, colours, backgrounds)
    picks = np.random.default_rng(seed).integers(len(combos), size=num)
    return [caption(*combos[i]) for i in picks]


# --- image folders with captions (the imagefolder convention) -----------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
_CAPTION_FIELDS = ("text", "caption")
_REPEAT_PREFIX = re.compile(r"^\d+_")  # kohya's "10_name" folders: 10 repeats of concept "name"


def _metadata_captions(folder) -> dict:
    """{image path: caption} from ``metadata.jsonl`` lines ``{"file_name": ..., "text": ...}``."""
    captions = {}
    path = folder / METADATA_FILE
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not JSON: {e}") from None
        field = next((f for f in _CAPTION_FIELDS if f in record), None)
        if "file_name" not in record or field is None:
            raise ValueError(
                f"{path} line {number} needs a \"file_name\" and a caption field ({' or '.join(_CAPTION_FIELDS)}); "
                f"got keys {sorted(record)}"
            )
        image = folder / record["file_name"]
        if not image.is_file():
            raise FileNotFoundError(f"{path} line {number} names {record['file_name']!r}, which is not in {folder}")
        captions[image.resolve()] = str(record[field])
    return captions


def load_image_folder(path, caption_from_folder_name: bool = False) -> tuple[list, list[str]]:
    """(image paths, captions) of a folder of images, searched recursively.

    A caption comes from ``metadata.jsonl`` in the folder (``{"file_name": "a.png", "text": "..."}`` per
    line), else from a ``.txt`` file of the same name beside the image, else, with
    ``caption_from_folder_name``, from the name of the image's folder (kohya's ``10_`` repeat prefix
    dropped). An empty folder or an image without a caption is a ``ValueError`` saying which.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
    images = sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not any(part.startswith(".") for part in p.parts)
    )
    if not images:
        raise ValueError(f"no images in {folder} (looked recursively for {', '.join(IMAGE_SUFFIXES)})")
    from_metadata = _metadata_captions(folder) if (folder / METADATA_FILE).is_file() else {}
    captions, missing = [], []
    for image in images:
        text_file = image.with_suffix(".txt")
        if image.resolve() in from_metadata:
            captions.append(from_metadata[image.resolve()])
        elif text_file.is_file():
            captions.append(text_file.read_text(encoding="utf-8").strip())
        elif caption_from_folder_name:
            captions.append(_REPEAT_PREFIX.sub("", image.parent.name).replace("_", " "))
        else:
            missing.append(image)
    if missing:
        shown = ", ".join(str(p.relative_to(folder)) for p in missing[:5])
        raise ValueError(
            f"{len(missing)} of {len(images)} images in {folder} have no caption (e.g. {shown}); give each image "
            f"a .txt file of the same name, list them in {METADATA_FILE}, or use the folder name as the caption "
            "(caption_from_folder_name=True, --caption-from-folder-name)"
        )
    return images, captions


def load_images(paths, size: int) -> np.ndarray:
    """uint8 (N, size, size, 3): each image made RGB, centre-cropped to a square and resized (bicubic)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            image = image.convert("RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
            if side != size:
                image = image.resize((size, size), Image.Resampling.BICUBIC)
            out[i] = np.asarray(image)
    return out
