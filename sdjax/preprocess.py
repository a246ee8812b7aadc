"""Condition images for ControlNets and T2I-Adapters, made from ordinary pictures.

>>> edges = sdjax.preprocess.canny(photo)                 # OpenCV's Canny, white edges on black, (H, W, 3) uint8
>>> depth = sdjax.preprocess.depth(photo)                 # DPT relative depth, 0 = farthest, 255 = nearest
>>> image = sdjax.preprocess.preprocess("canny", photo, low=50, high=150)

Each returns what lllyasviel's ControlNets (and diffusers' examples for them) take: an (H, W, 3) uint8 image of
the input's size, single-channel conditions repeated into the three channels. Inputs are PIL images, uint8
(H, W, 3) or (H, W) arrays, or float arrays in [0, 1]. ``canny`` needs OpenCV (``opencv-python-headless``);
``depth`` needs PyTorch and transformers (the ``depth`` extra).
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, Optional, Union

import numpy as np
from PIL import Image

from sdjax.depth import DepthEstimator
from sdjax.images import resize_bicubic, to_unit_float

OPENCV_HINT = "pip install opencv-python-headless"


def rgb_uint8(image: Any, name: str = "image") -> np.ndarray:
    """One picture as an (H, W, 3) uint8 array: PIL (any mode), uint8 or [0, 1] float (H, W[, 1 | 3 | 4])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, (list, tuple)):
        raise ValueError(f"{name} must be one image; preprocess each image of a list on its own")
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be a PIL image or an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array; "
                         f"got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.round(to_unit_float(array, name) * 255.0).astype(np.uint8)
    if array.shape[-1] == 4:
        array = array[..., :3]  # alpha dropped, as PIL's convert("RGB") does
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def _threshold(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= 255:
        raise ValueError(f"canny {name} threshold must be an integer in [0, 255], got {value!r}")
    return int(value)


def _cv2():
    try:
        import cv2
    except ImportError as e:  # a ValueError, as sdjax.depth's missing-extra error, so the CLI prints one line
        raise ValueError(f"Canny edges need OpenCV: {OPENCV_HINT} ({e})") from None
    return cv2


def canny(image: Any, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges (OpenCV, on the grayscale image): white (255) edges on black, (H, W, 3) uint8.

    ``low`` / ``high``: the hysteresis thresholds, integers in [0, 255] with low <= high (100 / 200 are the
    values of lllyasviel's and diffusers' canny examples)."""
    low, high = _threshold("low", low), _threshold("high", high)
    if low > high:
        raise ValueError(f"canny low threshold ({low}) must not exceed the high one ({high})")
    cv2 = _cv2()
    gray = cv2.cvtColor(rgb_uint8(image), cv2.COLOR_RGB2GRAY)
    return _gray_to_rgb(cv2.Canny(gray, low, high))


Estimator = Union[DepthEstimator, Callable[[np.ndarray], list], str]


def depth(image: Any, estimator: Optional[Estimator] = None) -> np.ndarray:
    """Relative depth (larger = nearer) at the image's size, min-max normalised to 0..255, (H, W, 3) uint8: what
    transformers' depth-estimation pipeline returns as ``["depth"]`` and depth ControlNets take.

    ``estimator``: a ``sdjax.depth.DepthEstimator`` (or any callable with its interface: uint8 (N, H, W, 3) ->
    N relative depth maps), a DPT folder or hub id, or None for ``DepthEstimator()`` (Intel/dpt-hybrid-midas,
    the MiDaS model of lllyasviel's depth annotator). Reuse one estimator for several images: it loads once."""
    rgb = rgb_uint8(image)
    if estimator is None or isinstance(estimator, str):
        estimator = DepthEstimator() if estimator is None else DepthEstimator(estimator)
    elif not callable(estimator):
        raise ValueError(f"estimator must be a DepthEstimator, a DPT folder or hub id, or None; "
                         f"got {type(estimator).__name__}")
    predicted = np.asarray(estimator(rgb[None])[0], np.float32)
    if predicted.ndim != 2:
        raise ValueError(f"the depth estimator returned a map of shape {predicted.shape}; expected (h, w)")
    resized = resize_bicubic(predicted, *rgb.shape[:2])  # as the pipeline's post-processing (torch bicubic)
    low, span = resized.min(), resized.max() - resized.min()
    if not np.isfinite(span) or span <= 1e-5 * np.abs(resized).max():  # flat (up to resampling) or broken: all far
        return np.zeros_like(rgb)
    unit = (resized - low) / span
    return _gray_to_rgb((unit * np.float32(255)).astype(np.uint8))  # truncated, as transformers does


def invert(image: Any) -> np.ndarray:
    """255 - the image: black lines on white (a drawing) -> the white-on-black lines that lineart, scribble and
    sketch models take (A1111's "invert" preprocessor)."""
    return 255 - rgb_uint8(image)


def none(image: Any) -> np.ndarray:
    """The image as it is (already a condition image), as (H, W, 3) uint8."""
    return rgb_uint8(image)


PREPROCESSORS: dict[str, Callable[..., np.ndarray]] = {"canny": canny, "depth": depth, "invert": invert,
                                                       "none": none}


def options_of(kind: str) -> tuple[str, ...]:
    """The keyword options preprocessor ``kind`` takes (besides the image)."""
    return tuple(inspect.signature(PREPROCESSORS[kind]).parameters)[1:]


def check_kind(kind: str) -> str:
    if kind not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {kind!r}; accepted: {', '.join(PREPROCESSORS)}")
    return kind


def preprocess(kind: str, image: Any, **options) -> np.ndarray:
    """``PREPROCESSORS[kind](image, **options)``, with one-line errors for an unknown kind or option."""
    check_kind(kind)
    unknown = sorted(set(options) - set(options_of(kind)))
    if unknown:
        accepted = ", ".join(options_of(kind)) or "none"
        raise ValueError(f"preprocessor {kind!r} has no option {unknown[0]!r}; accepted: {accepted}")
    return PREPROCESSORS[kind](image, **options)
