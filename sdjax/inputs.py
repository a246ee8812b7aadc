"""Host-side checks and conversions of the per-image inputs of a request (numpy, before any tracing).

Prompts, seeds, guidance, strengths and caller-given latents arrive from users in many shapes (one
value for all, one per image); these functions validate them and return one array row per image, with
errors that name the argument and what is accepted.
"""

from __future__ import annotations

import warnings
from typing import Sequence, Union

import jax
import numpy as np
from PIL import Image

OUTPUT_TYPES = ("pil", "np", "latent")
Prompt = Union[str, Sequence[str]]


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
    """Image i uses fold_in(PRNGKey(seed_i), i): it depends only on its seed and index."""
    seeds = per_image("seed", seed, count, dtype=np.int64)
    if np.any(seeds < 0) or np.any(seeds >= 2**32):
        raise ValueError(f"seeds must be in [0, 2**32), got {seed!r}")
    keys = [jax.random.fold_in(jax.random.PRNGKey(int(s)), i) for i, s in enumerate(seeds)]
    return np.stack([np.asarray(k) for k in keys]).astype(np.uint32)


def start_steps(strength, steps: int, count: int) -> np.ndarray:
    """Each image's first inference step, by diffusers' img2img rule: ``int(steps * strength)`` steps
    run (computed in float64 on the host, so strengths like 0.7 round exactly as in diffusers)."""
    strengths = per_image("strength", strength, count, dtype=np.float64)
    if not np.all((strengths >= 0.0) & (strengths <= 1.0)):
        raise ValueError(f"strength must be in [0, 1] (0 keeps the image, 1 repaints it all), got {strength!r}")
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


def to_output(result, output: str):
    """Device results -> what the caller asked for: PIL images, a uint8 NHWC array or latents."""
    array = np.asarray(result)
    if output != "pil":
        return array
    return [Image.fromarray(image) for image in array]
