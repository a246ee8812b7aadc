"""``StableDiffusion``: load a model, validate requests, and run the jitted generate function.

The Python layer here only validates input, tokenizes, makes per-image keys, pads the batch to the
device count and converts images. All the math between token ids and pixels is the pure function
``generate`` below, compiled once per shape / step count / sampler and executed by ``sdjax.parallel``.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import parallel, schedulers, weights
from sdjax.config import ModelConfig
from sdjax.models.clip import CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL
from sdjax.sampling import classifier_free_guidance, sample
from sdjax.tokenizer import load_tokenizer, tokenize

OUTPUT_TYPES = ("pil", "np", "latent")
Prompt = Union[str, Sequence[str]]


def default_dtype() -> jnp.dtype:
    """bf16 where matrix units want it (TPU/GPU), fp32 on the CPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Models:
    """The three Flax modules of one model, built for one dtype (hashable: a static jit argument)."""

    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    clip_skip: int
    scaling_factor: float
    shift_factor: float


def encode_prompts(models: Models, params, ids: jnp.ndarray) -> jnp.ndarray:
    return models.text_encoder.apply({"params": params["text_encoder"]}, ids, skip_layers=models.clip_skip)


def decode_latents(models: Models, params, latents: jnp.ndarray) -> jnp.ndarray:
    """Scaled latents -> uint8 NHWC images (converted on device: 4x less to transfer than fp32)."""
    latents = latents / models.scaling_factor + models.shift_factor
    images = models.vae.apply({"params": params["vae"]}, latents.astype(models.vae.dtype), method="decode")
    images = jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)
    return jnp.round(images).astype(jnp.uint8)


def initial_noise(keys: jnp.ndarray, latent_shape: tuple[int, ...]) -> jnp.ndarray:
    """One standard-normal latent per image, from that image's own key only."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), latent_shape, jnp.float32))(keys)


def generate(params, batch: dict, schedule, *, models: Models, latent_shape: tuple, output: str, progress: bool):
    """The whole text-to-image computation for one (per-device) batch, as one pure function.

    ``batch`` holds ``cond_ids`` / ``uncond_ids`` (B, 77) int32, ``keys`` (B, 2) uint32,
    ``guidance`` (B,) fp32, and optionally ``noise`` (B, h, w, c) initial latents.
    """
    count = batch["cond_ids"].shape[0]
    context = encode_prompts(models, params, jnp.concatenate([batch["uncond_ids"], batch["cond_ids"]]))
    uncond_context, cond_context = context[:count], context[count:]
    noise = batch["noise"] if "noise" in batch else initial_noise(batch["keys"], latent_shape)
    x = noise.astype(jnp.float32) * schedule.init_noise_sigma

    def unet_fn(latents, t, ctx):
        out = models.unet.apply({"params": params["unet"]}, latents.astype(models.unet.dtype), t, ctx)
        return out.astype(jnp.float32)

    model_fn = classifier_free_guidance(unet_fn, cond_context, uncond_context, batch["guidance"])
    sampler_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(batch["keys"])
    callback = partial(parallel.progress_bar, total=schedule.num_evals) if progress else None
    latents = sample(model_fn, x, sampler_keys, schedule, callback=callback)
    if output == "latent":
        return latents
    return decode_latents(models, params, latents)


class StableDiffusion:
    """A Stable Diffusion model: configs, Flax modules, parameters and the tokenizer."""

    def __init__(
        self,
        config: ModelConfig,
        params: dict,
        tokenizer,
        *,
        dtype=None,
        attention_implementation: Optional[str] = None,
        devices: Optional[Sequence] = None,
    ):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.dtype = jnp.dtype(dtype or default_dtype())
        kwargs = dict(dtype=self.dtype, param_dtype=self.dtype, attention_implementation=attention_implementation)
        self.text_encoder = CLIPTextModel(config=config.text_encoder, **kwargs)
        self.unet = UNet2DConditionModel(config=config.unet, **kwargs)
        self.vae = AutoencoderKL(config=config.vae, **kwargs)
        self._executor = parallel.Executor(devices)

    # --- loading and saving --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id,
        *,
        dtype=None,
        variant: Optional[str] = None,
        revision: Optional[str] = None,
        token: Optional[str] = None,
        attention_implementation: Optional[str] = None,
        devices: Optional[Sequence] = None,
    ) -> "StableDiffusion":
        """A diffusers-layout folder (``text_encoder/ tokenizer/ unet/ vae/ scheduler/``) or a hub repo id.

        ``devices``: the devices to generate on (default: all local devices)."""
        folder = weights.resolve_model_dir(path_or_repo_id, revision=revision, token=token, variant=variant)
        dtype = jnp.dtype(dtype or default_dtype())
        config, params = weights.load_pretrained(folder, dtype=dtype, variant=variant)
        tokenizer = load_tokenizer(folder / "tokenizer")
        return cls(
            config, params, tokenizer, dtype=dtype, attention_implementation=attention_implementation, devices=devices
        )

    @classmethod
    def from_single_file(
        cls,
        path,
        config=None,
        *,
        dtype=None,
        prediction_type: Optional[str] = None,
        use_ema: bool = False,
        attention_implementation: Optional[str] = None,
    ) -> "StableDiffusion":
        """An original-layout (CompVis / Stability / A1111) ``.safetensors`` or ``.ckpt`` file.

        The model type is inferred from key names and shapes; ``config`` (a ``ModelConfig``, a preset
        name such as ``"sd21-v"``, or a diffusers folder) overrides it. ``prediction_type`` overrides the
        default (v-prediction for 768px SD 2.x files, as in diffusers); ``use_ema`` loads ``model_ema.*``.
        """
        from sdjax import single_file

        dtype = jnp.dtype(dtype or default_dtype())
        config, params = single_file.load_single_file(
            path, config, prediction_type=prediction_type, use_ema=use_ema, dtype=dtype
        )
        tokenizer = load_tokenizer()
        if single_file.uses_open_clip(config):
            tokenizer.pad_token = "!"  # SD 2.x's OpenCLIP tokenizer pads with "!" (id 0), not EOS
        return cls(config, params, tokenizer, dtype=dtype, attention_implementation=attention_implementation)

    def save_single_file(self, path, *, dtype=None) -> None:
        """Write the original single-file layout (``.safetensors``) that A1111, ComfyUI and diffusers load."""
        from sdjax import single_file

        single_file.save_single_file(path, self.config, self.params, dtype=dtype)

    @classmethod
    def default(cls, *, dtype=None) -> "StableDiffusion":
        """The small built-in model shipped inside the package (no download)."""
        return cls.from_pretrained(builtin_model_dir(), dtype=dtype)

    def save_pretrained(self, path) -> None:
        """Write the diffusers layout, loadable by diffusers' PyTorch ``from_pretrained``."""
        weights.save_pretrained(Path(path), self.config, self.params, self.tokenizer)

    # --- generation ----------------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return self.config.vae.downsample_factor

    @property
    def native_size(self) -> int:
        return self.config.unet.sample_size * self.vae_scale_factor

    def text_to_image(
        self,
        prompt: Prompt,
        negative_prompt: Optional[Prompt] = None,
        *,
        num_images_per_prompt: int = 1,
        steps: int = 50,
        guidance_scale: Union[float, Sequence[float]] = 7.5,
        height: Optional[int] = None,
        width: Optional[int] = None,
        seed: Union[int, Sequence[int]] = 0,
        scheduler: str = "pndm",
        scheduler_options: Optional[dict] = None,
        latents: Optional[Any] = None,
        output: str = "pil",
        parallel_mode: Optional[str] = None,
        progress: bool = False,
    ):
        """Generate images from text; returns PIL images, a uint8 NHWC array or the final latents."""
        request = self._text_request(
            prompt, negative_prompt, num_images_per_prompt, guidance_scale, seed, latents, height, width, output
        )
        schedule = schedulers.make_schedule(scheduler, self.config.scheduler, steps, **(scheduler_options or {}))
        return self._run(request, schedule, output, parallel_mode, progress)

    def _run(self, request: "Request", schedule, output: str, parallel_mode, progress: bool):
        static = dict(models=self._models(), latent_shape=request.latent_shape, output=output, progress=progress)
        result = self._executor.run(generate, self.params, request.batch, schedule, static=static, mode=parallel_mode)
        return to_output(result, output)

    def _models(self) -> Models:
        return Models(
            self.text_encoder,
            self.unet,
            self.vae,
            self.config.clip_skip,
            float(self.config.vae.scaling_factor),
            float(self.config.vae.shift_factor or 0.0),
        )

    def _text_request(
        self, prompt, negative_prompt, num_images_per_prompt, guidance_scale, seed, latents, height, width, output
    ) -> "Request":
        prompts = _as_prompt_list(prompt, "prompt")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = _as_prompt_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"got {len(negatives)} negative prompts for {len(prompts)} prompts; "
                    "give one negative prompt, or one per prompt"
                )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if output not in OUTPUT_TYPES:
            raise ValueError(f"unknown output {output!r}; accepted: {', '.join(OUTPUT_TYPES)}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        count = len(prompts)
        latent_shape = self._latent_shape(height, width)
        batch = {
            "cond_ids": self._tokenize(prompts),
            "uncond_ids": self._tokenize(negatives),
            "keys": image_keys(seed, count),
            "guidance": per_image("guidance_scale", guidance_scale, count),
        }
        if latents is not None:
            batch["noise"] = _check_latents(latents, count, latent_shape)
        return Request(batch, latent_shape)

    def _tokenize(self, prompts: list[str]) -> np.ndarray:
        ids, dropped = tokenize(self.tokenizer, prompts, self.config.text_encoder.max_position_embeddings)
        for text, lost in zip(prompts, dropped):
            if lost:
                warnings.warn(
                    f"prompt is longer than CLIP's {self.config.text_encoder.max_position_embeddings} tokens; "
                    f"{lost} token(s) were dropped from: {text[:60]!r}...",
                    stacklevel=4,
                )
        return ids

    def _latent_shape(self, height: Optional[int], width: Optional[int]) -> tuple[int, int, int]:
        factor = self.vae_scale_factor
        height = self.native_size if height is None else height
        width = self.native_size if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, (int, np.integer)) or value < factor:
                raise ValueError(f"{name} must be an integer of at least {factor}, got {value!r}")
            if value % factor:
                lower, upper = value - value % factor, value - value % factor + factor
                raise ValueError(
                    f"{name}={value} is not a multiple of the VAE's downsampling factor {factor}; "
                    f"nearest valid sizes: {max(lower, factor)} or {upper}"
                )
        return (height // factor, width // factor, self.config.unet.out_channels)


@dataclasses.dataclass
class Request:
    batch: dict
    latent_shape: tuple


def builtin_model_dir() -> Path:
    return Path(__file__).resolve().parent / "assets" / "builtin"


def _as_prompt_list(prompt, name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
    if not prompts:
        raise ValueError(f"{name} is empty; give a string or a non-empty list of strings")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{name} must hold strings only, got {type(bad[0]).__name__}: {bad[0]!r}")
    return prompts


def image_keys(seed: Union[int, Sequence[int]], count: int) -> np.ndarray:
    """Image i uses fold_in(PRNGKey(seed_i), i): it depends only on its seed and index."""
    seeds = per_image("seed", seed, count, dtype=np.int64)
    if np.any(seeds < 0) or np.any(seeds >= 2**32):
        raise ValueError(f"seeds must be in [0, 2**32), got {seed!r}")
    keys = [jax.random.fold_in(jax.random.PRNGKey(int(s)), i) for i, s in enumerate(seeds)]
    return np.stack([np.asarray(k) for k in keys]).astype(np.uint32)


def per_image(name: str, value, count: int, dtype=np.float32) -> np.ndarray:
    """A scalar for every image, or exactly one value per image."""
    array = np.asarray(value, dtype=dtype)
    if array.ndim == 0:
        return np.full((count,), array, dtype=dtype)
    if array.shape != (count,):
        raise ValueError(f"{name} must be one value or one per image ({count}), got {len(array)} values")
    return array


def _check_latents(latents, count: int, latent_shape: tuple) -> np.ndarray:
    array = np.asarray(latents, dtype=np.float32)
    expected = (count,) + tuple(latent_shape)
    if array.shape != expected:
        raise ValueError(
            f"latents must be NHWC initial noise of shape {expected} for this request, got {array.shape}"
        )
    return array


def to_output(result, output: str):
    array = np.asarray(result)
    if output != "pil":
        return array
    from PIL import Image

    return [Image.fromarray(image) for image in array]
