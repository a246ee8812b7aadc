"""Image, mask and depth-map inputs of the image-conditioned modes, turned into NHWC float arrays.

Images and masks may be PIL images, uint8 arrays or float arrays in [0, 1] (one, or a list / a
leading batch axis). Sizes follow diffusers' ``VaeImageProcessor``: an image whose sides are not
multiples of the VAE factor is resized down to the nearest multiple (Lanczos for PIL images,
nearest-neighbour for arrays), with a warning that says so. Masks are single-channel, white =
repaint; an RGB mask is converted to grayscale with a note.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
from PIL import Image

# ITU-R 601-2 luma, PIL's RGB -> "L" weights.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# Inpainting pastes the input back outside the mask, ramping in over this many pixels (A1111's mask blur).
FEATHER_PIXELS = 4
# torch's bicubic kernel coefficient (Keys' a), used by diffusers to resize depth maps.
BICUBIC_A = -0.75


def _is_pil(value) -> bool:
    return isinstance(value, Image.Image)


def as_list(value, name: str, item_ndims: Sequence[int]) -> list:
    """One input or several: a PIL image or array of ``item_ndims`` dimensions is one item, a list
    or tuple is several, an array with one more dimension is a batch."""
    if value is None:
        raise ValueError(f"{name} is missing")
    if _is_pil(value):
        return [value]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name} is an empty list; give at least one")
        return list(value)
    array = np.asarray(value)
    if array.dtype == object or array.ndim not in (*item_ndims, max(item_ndims) + 1):
        raise ValueError(
            f"{name} must be a PIL image, an array of {' or '.join(map(str, item_ndims))} dimensions, a batch "
            f"with a leading image axis, or a list of those; got {type(value).__name__} with shape "
            f"{getattr(array, 'shape', None)}"
        )
    if array.ndim == max(item_ndims) + 1:
        return list(array)
    return [array]


def to_unit_float(array: np.ndarray, name: str) -> np.ndarray:
    """uint8 -> /255, bool -> 0/1, float must already be in [0, 1]; float32 out."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"float {name} values must be in [0, 1], got [{low:.3g}, {high:.3g}]; "
                "for [-1, 1] data pass (x + 1) / 2, for 0-255 data pass a uint8 array"
            )
        return array
    raise ValueError(f"{name} must be uint8, bool or float in [0, 1], got dtype {array.dtype}")


def image_size(value) -> tuple[int, int]:
    """(height, width) of a PIL image or an (H, W[, C]) array."""
    if _is_pil(value):
        return value.height, value.width
    array = np.asarray(value)
    return int(array.shape[0]), int(array.shape[1])


def target_size(items: list, height: Optional[int], width: Optional[int], factor: int) -> tuple[int, int]:
    """The (height, width) all ``items`` are brought to: ``height`` / ``width`` where given, else the
    first item's side rounded down to a multiple of ``factor`` (diffusers' rule)."""
    own_height, own_width = image_size(items[0])
    if min(own_height, own_width) < factor:
        raise ValueError(f"image is {own_width}x{own_height}; both sides must be at least {factor} pixels")
    return (
        own_height - own_height % factor if height is None else height,
        own_width - own_width % factor if width is None else width,
    )


def warn_if_resized(items: list, size: tuple[int, int], name: str, factor: int, requested: bool,
                    why: Optional[str] = None) -> None:
    """Tell the user, once, which input sizes are resized and ``why`` (default: the requested size, or the
    rounding to multiples of ``factor``)."""
    sizes = sorted({"{1}x{0}".format(*image_size(item)) for item in items if image_size(item) != size})
    if sizes:
        if why is None:
            why = "the requested height/width" if requested else f"sides must be multiples of {factor}, one size per batch"
        warnings.warn(
            f"{name} size {', '.join(sizes)} resized to {size[1]}x{size[0]} ({why}); like diffusers: Lanczos for "
            "PIL images, nearest for arrays",
            stacklevel=4,
        )


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W, C) array with torch's ``interpolate(mode="nearest")`` indices."""
    rows = _nearest_indices(array.shape[0], height)
    columns = _nearest_indices(array.shape[1], width)
    return array[rows][:, columns]


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    scale = np.float32(size_in) / np.float32(size_out)
    indices = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(indices, size_in - 1)


def _resized(item, height: int, width: int):
    """A PIL image or array at (height, width): PIL by Lanczos, arrays by nearest (like diffusers)."""
    if image_size(item) == (height, width):
        return item
    if _is_pil(item):
        return item.resize((width, height), resample=Image.Resampling.LANCZOS)
    return resize_nearest(item, height, width)


def load_images(images, height: int, width: int, name: str = "image") -> np.ndarray:
    """RGB images as float32 NHWC in [-1, 1] at (height, width)."""
    return (load_unit_images(images, height, width, name) * 2.0 - 1.0).astype(np.float32)


def load_unit_images(images, height: int, width: int, name: str = "image", channels: int = 3) -> np.ndarray:
    """Images as float32 NHWC in [0, 1] at (height, width): RGB, or grayscale with ``channels=1`` (PIL's
    "L" conversion for colour images, as diffusers' adapter pipeline sees a grayscale PIL image)."""
    out = []
    for index, item in enumerate(images):
        if _is_pil(item):
            mode = "L" if channels == 1 else "RGB"
            item = item.convert(mode) if item.mode != mode else item
            array = to_unit_float(np.asarray(_resized(item, height, width)), name)
            array = array[..., None] if array.ndim == 2 else array
        else:
            array = np.asarray(item)
            if array.ndim == 2:
                array = array[..., None]
            if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
                raise ValueError(
                    f"{name} {index} must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {array.shape}"
                )
            array = to_unit_float(array, name)
            if channels == 1:
                if array.shape[-1] != 1:
                    raise ValueError(f"{name} {index} must be single-channel for this model (H, W) or (H, W, 1); "
                                     f"got shape {array.shape} (or give a PIL image, converted to grayscale)")
            else:
                array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
            array = _resized(array, height, width)
        out.append(array)
    return np.stack(out).astype(np.float32)


def load_masks(masks, height: int, width: int, binarize: bool = True) -> np.ndarray:
    """Single-channel masks as float32 (B, H, W, 1) in [0, 1], white (1) = repaint.

    RGB(A) masks are converted to grayscale (with a warning unless all colour channels are equal).
    ``binarize`` rounds at 0.5 as diffusers' inpainting pipeline does; without it soft masks blend.
    """
    out = []
    for index, item in enumerate(masks):
        if _is_pil(item):
            if item.mode not in ("L", "1", "F"):
                if item.mode in ("RGB", "RGBA", "LA", "P") and not _channels_equal(np.asarray(item.convert("RGB"))):
                    _note_grayscale(index, f"a {item.mode} PIL image")
                item = item.convert("L")
            item = _resized(item, height, width)
            array = np.asarray(item)
            if item.mode == "F":
                array = array.astype(np.float32)
            array = to_unit_float(array, "mask")
        else:
            array = np.asarray(item)
            if array.ndim == 3 and array.shape[-1] == 1:
                array = array[..., 0]
            elif array.ndim == 3 and array.shape[-1] in (3, 4):
                rgb = array[..., :3]
                if _channels_equal(rgb):
                    array = rgb[..., 0]
                else:
                    _note_grayscale(index, f"an array with {array.shape[-1]} channels")
                    array = to_unit_float(rgb, "mask") @ LUMA
            if array.ndim != 2:
                raise ValueError(
                    f"mask {index} must be single-channel: (H, W) or (H, W, 1) (RGB is converted), "
                    f"got shape {np.shape(item)}"
                )
            array = to_unit_float(array, "mask")
            array = _resized(array[..., None], height, width)[..., 0]
        out.append(array)
    masks = np.stack(out)[..., None].astype(np.float32)
    if binarize:
        masks = (masks >= 0.5).astype(np.float32)
    return masks


def _channels_equal(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))


def _note_grayscale(index: int, what: str) -> None:
    warnings.warn(
        f"mask {index} is {what} with differing colour channels; converted to grayscale (luma). "
        "Masks are single-channel: white = repaint, black = keep.",
        stacklevel=5,
    )


def keep_weights(masks: np.ndarray, feather: Optional[int] = None) -> np.ndarray:
    """How much of the input pixel to keep in the output: 1 outside the mask, 0 inside, a linear ramp
    over ``feather`` pixels (Chebyshev distance) outward from the mask's edge so no seam shows."""
    feather = FEATHER_PIXELS if feather is None else feather
    grown, total = masks, masks.copy()
    for _ in range(feather):
        grown = _max_filter_3x3(grown)
        total = total + grown
    return (1.0 - total / (feather + 1)).astype(np.float32)


def _max_filter_3x3(masks: np.ndarray) -> np.ndarray:
    """(B, H, W, 1) maximum over each pixel's 3x3 neighbourhood (edges padded with zeros)."""
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1), (0, 0)))
    height, width = masks.shape[1:3]
    return np.max([padded[:, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)], axis=0)


def check_same_sizes(images: list, masks: list) -> None:
    """Each image and its mask must come in the same size (before any resizing)."""
    for index, (image, mask) in enumerate(zip(images, masks)):
        if image_size(image) != image_size(mask):
            raise ValueError(
                "image {0} is {2}x{1} but its mask is {4}x{3}; give a mask of the image's size".format(
                    index, *image_size(image), *image_size(mask)
                )
            )


def load_depth_maps(depth_maps, height: int, width: int) -> np.ndarray:
    """Depth maps (any scale; larger = nearer, as DPT predicts) as float32 (B, height, width, 1) in
    [-1, 1]: bicubic resize (torch's, as diffusers uses) then each map's min -> -1, max -> 1."""
    out = []
    for index, item in enumerate(depth_maps):
        array = np.asarray(item.convert("F") if _is_pil(item) and item.mode not in ("F", "I") else item)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"depth map {index} must be a single-channel (H, W) array, got shape {array.shape}")
        array = array.astype(np.float32)
        if not np.all(np.isfinite(array)):
            raise ValueError(f"depth map {index} holds NaN or infinite values")
        resized = resize_bicubic(array, height, width)
        low, high = resized.min(), resized.max()
        if high <= low:
            raise ValueError(f"depth map {index} is constant ({low}); it needs some variation to normalise")
        out.append(2.0 * (resized - low) / (high - low) - 1.0)
    return np.stack(out)[..., None].astype(np.float32)


def resize_bicubic(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) float32 resized like ``torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False)``: Keys' cubic with a = -0.75, edge pixels repeated, no antialiasing."""
    rows = _cubic_weights(array.shape[0], height)
    columns = _cubic_weights(array.shape[1], width)
    return (rows @ array.astype(np.float32) @ columns.T).astype(np.float32)


def _cubic_weights(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) interpolation matrix of one axis."""
    f32 = np.float32
    scale = f32(size_in) / f32(size_out)
    source = (np.arange(size_out, dtype=f32) + f32(0.5)) * scale - f32(0.5)
    base = np.floor(source)
    t = (source - base).astype(f32)
    a = f32(BICUBIC_A)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    taps = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    indices = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, size_in - 1)
    matrix = np.zeros((size_out, size_in), np.float64)
    for k in range(4):
        np.add.at(matrix, (np.arange(size_out), indices[:, k]), taps[:, k])
    return matrix


def expand_indices(given: int, name: str, num_prompts: int, per_prompt: int) -> np.ndarray:
    """Which given item each output image uses: one for all, one per prompt, or one per image."""
    count = num_prompts * per_prompt
    if given == count:
        return np.arange(count)
    if given == 1:
        return np.zeros(count, np.int64)
    if given == num_prompts:
        return np.repeat(np.arange(num_prompts), per_prompt)
    raise ValueError(
        f"got {given} {name}s for {num_prompts} prompt(s) x {per_prompt} image(s) per prompt; "
        f"give one {name}, one per prompt ({num_prompts}) or one per image ({count})"
    )


def as_depth_list(depth_maps) -> list:
    """Depth maps: an (H, W) array is one, an (N, H, W) array or a list several; a trailing
    channel axis of 1 is dropped."""
    if not _is_pil(depth_maps) and not isinstance(depth_maps, (list, tuple)):
        array = np.asarray(depth_maps)
        if array.ndim in (3, 4) and array.shape[-1] == 1:
            depth_maps = array[..., 0]
    return as_list(depth_maps, "depth_map", (2,))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float NHWC in [-1, 1] -> uint8 (for depth estimators that want ordinary pixels)."""
    return np.round(np.clip((images + 1.0) * 127.5, 0, 255)).astype(np.uint8)
