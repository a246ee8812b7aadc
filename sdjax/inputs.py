"""Host-side checks and conversions of the per-image inputs of a request (numpy, before any tracing).

Prompts, seeds, guidance, strengths and caller-given latents arrive from users in many shapes (one
value for all, one per image); these functions validate them and return one array row per image, with
errors that name the argument and what is accepted.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional, Sequence, Union

import jax
import numpy as np
from PIL import Image

OUTPUT_TYPES = ("pil", "np", "latent")
Prompt = Union[str, Sequence[str]]

# Accepted ranges of the numeric knobs, shared by the API and the CLI (which names its flags instead).
GUIDANCE_RANGE = (0.0, 100.0)
STRENGTH_RANGE = (0.0, 1.0)
LORA_SCALE_RANGE = (-10.0, 10.0)
SEED_RANGE = (0, 2**32)  # [low, high): PRNGKey takes a uint32
MAX_STEPS = 1000  # the usual num_train_timesteps; make_schedule checks the model's own


def check_number(name: str, value, low: float, high: float) -> float:
    """A finite real number in [low, high], else ValueError naming ``name``, the value and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def check_numbers(name: str, values, low: float, high: float) -> np.ndarray:
    """``check_number`` over one value or a sequence (float64 array out; the message shows the bad one)."""
    try:
        array = None if isinstance(values, (str, bytes)) else np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None:
        raise ValueError(f"{name} must be a number or a list of numbers, got {values!r:.60}")
    bad = array[~(np.isfinite(array) & (array >= low) & (array <= high))]
    if bad.size:
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {float(bad.flat[0])!r}"
                         + (f" (in {values!r:.60})" if array.ndim else ""))
    return array


def check_integer(name: str, value, low: int, high: Optional[int] = None) -> int:
    """An integer (not a bool or float) in [low, high], else ValueError naming ``name``."""
    accepted = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low \
            or (high is not None and value > high):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return int(value)


def check_knobs(*, steps, guidance_scale, num_images_per_prompt, lora_scales: Optional[dict] = None) -> None:
    """The request-wide numeric arguments of a generation call, at the public boundary."""
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, (int, np.integer)) \
            or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    check_integer("num_steps", steps, 1, None)
    if guidance_scale is not None:  # None: the guidance-free path, where the pipeline has one
        check_numbers("guidance_scale", guidance_scale, *GUIDANCE_RANGE)
    for name, scale in (lora_scales or {}).items():
        check_number(f"LoRA scale of {name!r}", scale, *LORA_SCALE_RANGE)


def prompt_list(prompt, name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
    if not prompts:
        raise ValueError(f"{name} is empty; give a string or a non-empty list of strings")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{name} must hold strings only, got {type(bad[0]).__name__}: {bad[0]!r}")
    return prompts


def negative_prompt_list(negative_prompt, num_prompts: int) -> list[str]:
    """One negative prompt per prompt: empty strings, one repeated, or exactly one each."""
    if negative_prompt is None:
        return [""] * num_prompts
    negatives = prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1 and num_prompts > 1:
        negatives = negatives * num_prompts
    if len(negatives) != num_prompts:
        raise ValueError(
            f"got {len(negatives)} negative prompts for {num_prompts} prompts; "
            "give one negative prompt, or one per prompt"
        )
    return negatives


def per_image(name: str, value, count: int, dtype=np.float32) -> np.ndarray:
    """A scalar for every image, or exactly one value per image."""
    array = np.asarray(value, dtype=dtype)
    if array.ndim == 0:
        return np.full((count,), array, dtype=dtype)
    if array.shape != (count,):
        raise ValueError(f"{name} must be one value or one per image ({count}), got {len(array)} values")
    return array


def image_keys(seed: Union[int, Sequence[int]], count: int) -> np.ndarray:
    """Image i's key is ``PRNGKey(seed_i)`` with ``seed_i`` from ``image_seeds`` (seed + i for one seed):
    an image depends only on its own seed, so any image of a batch regenerates alone from its seed."""
    keys = [jax.random.PRNGKey(int(s)) for s in image_seeds(seed, count)]
    return np.stack([np.asarray(k) for k in keys]).astype(np.uint32)


def start_steps(strength, steps: int, count: int) -> np.ndarray:
    """Each image's first inference step, by diffusers' img2img rule: ``int(steps * strength)`` steps
    run (computed in float64 on the host, so strengths like 0.7 round exactly as in diffusers)."""
    strengths = per_image("strength", strength, count, dtype=np.float64)
    if not np.all(np.isfinite(strengths) & (strengths >= 0.0) & (strengths <= 1.0)):
        raise ValueError(f"strength must be in [0, 1] (0 keeps the image, 1 repaints it all), got {strength!r:.60}")
    runs = np.minimum((steps * strengths).astype(np.int64), steps)
    if np.any(runs == 0):
        warnings.warn(
            f"strength {strengths[runs == 0].min():g} with {steps} steps runs no denoising step "
            "(int(steps * strength) = 0): those images come back through the VAE unchanged",
            stacklevel=4,
        )
    return (steps - runs).astype(np.int32)


def check_latents(latents, count: int, latent_shape: tuple) -> np.ndarray:
    array = np.asarray(latents, dtype=np.float32)
    expected = (count,) + tuple(latent_shape)
    if array.shape != expected:
        raise ValueError(
            f"latents must be NHWC initial noise of shape {expected} for this request, got {array.shape}"
        )
    return array


def latent_shape(height: int, width: int, factor: int, channels: int) -> tuple[int, int, int]:
    """The latent (h, w, c) of an image size, which must be a multiple of the VAE's factor."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or value < factor:
            raise ValueError(f"{name} must be an integer of at least {factor}, got {value!r}")
        if value % factor:
            lower, upper = value - value % factor, value - value % factor + factor
            raise ValueError(
                f"{name}={value} is not a multiple of the VAE's downsampling factor {factor}; "
                f"nearest valid sizes: {max(lower, factor)} or {upper}"
            )
    return (height // factor, width // factor, channels)


def check_output(output: str) -> None:
    if output not in OUTPUT_TYPES:
        raise ValueError(f"unknown output {output!r}; accepted: {', '.join(OUTPUT_TYPES)}")


NON_FINITE_HINT = (
    "usually float16 overflow (the VAE decoder's activations exceed float16's range at larger sizes); "
    "run in float32 (dtype=jnp.float32, --dtype float32) or bfloat16"
)


def non_finite_images(values) -> np.ndarray:
    """Indices of the images (leading axis) of a float array that hold NaN or infinite values."""
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.floating) or array.ndim == 0:
        return np.zeros((0,), np.int64)
    return np.flatnonzero(~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1))


def warn_if_not_finite(values, what: str = "latents", bad: Optional[np.ndarray] = None) -> bool:
    """Warn, naming the likely cause, when results hold NaN/inf: pass float results (latents, float
    pixels), or the indices ``bad`` of the failing images (e.g. a per-image flag computed on the device
    before the uint8 conversion, which turns NaN into a plain colour). Returns whether it warned."""
    if bad is None:
        bad = non_finite_images(values)
    bad = np.asarray(bad).reshape(-1)
    if bad.size == 0:
        return False
    count = len(values) if values is not None else "?"
    warnings.warn(
        f"{bad.size} of {count} images have NaN or infinite {what} (image {', '.join(map(str, bad[:8]))}"
        f"{', ...' if bad.size > 8 else ''}): {NON_FINITE_HINT}",
        RuntimeWarning,
        stacklevel=3,
    )
    return True


def to_output(result, output: str):
    """Device results -> what the caller asked for: PIL images, a uint8 NHWC array or latents, with a
    warning naming the likely cause when NaN/inf came out. ``result`` is the latents, or the decoded
    ``(pixels, finite)`` pair (``sdjax.generate.DecodedImages``)."""
    if output == "latent":
        array = np.asarray(result)
        warn_if_not_finite(array, "latents")
        return array
    pixels, finite = (np.asarray(x) for x in result)
    warn_if_not_finite(pixels, "pixels", bad=np.flatnonzero(~finite.astype(bool)))
    if output != "pil":
        return pixels
    return [Image.fromarray(image) for image in pixels]


def image_seeds(seed: Union[int, Sequence[int]], count: int) -> np.ndarray:
    """Each image's own seed: ``seed + i`` for one seed (AUTOMATIC1111's and diffusers' batch rule), or
    exactly one per image; all in [0, 2**32)."""
    given = np.asarray(seed)
    if given.dtype == object or given.dtype == np.bool_ or not np.issubdtype(given.dtype, np.integer):
        raise ValueError(f"seed must be an integer or one integer per image, got {seed!r:.60}")
    seeds = given + np.arange(count) if given.ndim == 0 else per_image("seed", given, count, dtype=np.int64)
    seeds = np.asarray(seeds, np.int64)
    if np.any(seeds < SEED_RANGE[0]) or np.any(seeds >= SEED_RANGE[1]):
        raise ValueError(f"seeds must be in [0, 2**32) (the batch takes seed, seed+1, ...), got {seed!r:.60}")
    return seeds
