"""``StableDiffusion``: load a model, validate requests, and run the jitted generate function.

The Python layer here only validates input, tokenizes, makes per-image keys and builds the typed
``Request``; the math between token ids and pixels is ``sdjax.generate.generate``, compiled once per
shape / step count / sampler / mode and executed on the devices by ``sdjax.parallel``.
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

from sdjax import conditions, control, deepcache
from sdjax import images as image_inputs
from sdjax import inputs, memory, parallel, samplers, sdxl, single_file, weights
from sdjax.adapters import AdapterMethods
from sdjax.config import ModelConfig
from sdjax.control import Control
from sdjax.depth import DepthEstimator
from sdjax.generate import STAGES as generate_stages
from sdjax.generate import (
    Mode,
    Models,
    Program,
    Request,
    generate,
    progress_chunk,
)
from sdjax.inputs import Prompt
from sdjax.prompt import Embedding, Fragment, check_syntax, prompt_chunks
from sdjax.noise import check_noise_source, image_noise
from sdjax.models.clip import CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL
from sdjax.samplers import Schedule
from sdjax.tokenizer import load_tokenizer, tokenize

# The built-in model draws its shapes best with light guidance: its prompt adherence over 200 captions is
# 93% with dpmpp_2m at 1.5; its 14,000-step stage scored 91% at 1.5 but 50% at 3.0 (README, "The built-in model").
BUILTIN_GUIDANCE_SCALE = 1.5
DEFAULT_GUIDANCE_SCALE = 7.5
# One default sampler for the API and the CLI: DPM-Solver++(2M), a second-order multistep solver that is good
# at 20-25 steps (built-in model at 25 steps: 93.0% adherence vs pndm's 87.5%, README); scheduler="pndm" gives
# diffusers' SD 1.x default.
DEFAULT_SCHEDULER = "dpmpp_2m"


def default_dtype() -> jnp.dtype:
    """bf16 where matrix units want it (TPU/GPU), fp32 on the CPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def builtin_model_dir() -> Path:
    return Path(__file__).resolve().parent / "assets" / "builtin"


@dataclasses.dataclass(frozen=True)
class Job:
    """A prepared generation: the request, the schedule and the compile-time program ``generate`` runs.

    ``StableDiffusion.prepare`` builds it, ``StableDiffusion.run`` executes it; in between a caller may
    inspect it or take a subset of its images (``job.take(indices)``)."""

    request: Request
    schedule: Schedule
    program: Program
    progress: bool = False  # a step display, the sampler loop then running in chunks (see ``run``)
    control_params: tuple = ()  # the parameters of the program's controls, in order

    def take(self, indices) -> "Job":
        return dataclasses.replace(self, request=self.request.take(indices))


class StableDiffusion(AdapterMethods):
    """A Stable Diffusion model: configs, Flax modules, parameters and the tokenizer."""

    def __init__(
        self,
        config: ModelConfig,
        params: dict,
        tokenizer,
        *,
        tokenizer_2=None,
        dtype=None,
        attention_implementation: Optional[str] = None,
        devices: Optional[Sequence] = None,
    ):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer  # None for the SDXL refiner, which has only the second text encoder
        self.tokenizer_2 = tokenizer_2  # SDXL's second tokenizer
        self.dtype = jnp.dtype(dtype or default_dtype())
        kwargs = dict(dtype=self.dtype, param_dtype=self.dtype, attention_implementation=attention_implementation)
        text = config.text_encoder
        self.text_encoder = None if text is None else CLIPTextModel(config=text, **kwargs)
        self.text_encoder_2 = None if config.text_encoder_2 is None else CLIPTextModel(config=config.text_encoder_2,
                                                                                       **kwargs)
        self.unet = UNet2DConditionModel(config=config.unet, **kwargs)
        # SDXL pipelines decode (and encode) in fp32 where the VAE overflows in fp16, as diffusers' do.
        upcast = config.is_sdxl and config.vae.force_upcast and self.dtype == jnp.float16
        self.vae = AutoencoderKL(config=config.vae, **{**kwargs, "dtype": jnp.float32 if upcast else self.dtype})
        self.executor = parallel.Executor(devices)
        self.depth_estimator: Optional[DepthEstimator] = None  # used by depth_to_image without a depth map
        self._lora_scales: dict[str, float] = {}
        self._unfused_kernels: dict[tuple, Any] = {}  # base kernels that fuse_lora replaced, for unload_lora
        self._embeddings: dict[str, Embedding] = {}  # textual-inversion tokens, rows of params["embeddings"]
        self._with_controls: tuple = ((), None, None)  # (control params, self.params, both): placed once per set

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
        """A diffusers-layout folder (``text_encoder/ tokenizer/ unet/ vae/ scheduler/``; SDXL adds
        ``text_encoder_2/ tokenizer_2/``, named in its model_index.json) or a hub repo id.

        ``devices``: the devices to generate on (default: all local devices)."""
        folder = weights.resolve_model_dir(path_or_repo_id, revision=revision, token=token, variant=variant)
        dtype = jnp.dtype(dtype or default_dtype())
        config, params = weights.load_pretrained(folder, dtype=dtype, variant=variant)
        tokenizer = None if config.text_encoder is None else load_tokenizer(folder / "tokenizer")
        tokenizer_2 = load_tokenizer(folder / "tokenizer_2") if config.is_sdxl else None
        model = cls(config, params, tokenizer, tokenizer_2=tokenizer_2, dtype=dtype,
                    attention_implementation=attention_implementation, devices=devices)
        model.depth_estimator = DepthEstimator.from_model_folder(folder)  # SD 2 depth repos ship DPT
        return model

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
        dtype = jnp.dtype(dtype or default_dtype())
        config_override = config
        config, params = single_file.load_single_file(
            path, config, prediction_type=prediction_type, use_ema=use_ema, dtype=dtype
        )
        config_dir = Path(config_override) if isinstance(config_override, (str, Path)) else None
        if config_dir is not None and (config_dir / "tokenizer").is_dir():
            tokenizer = load_tokenizer(config_dir / "tokenizer")
        else:
            tokenizer = load_tokenizer()
            if single_file.uses_open_clip(config):
                tokenizer.pad_token = "!"  # SD 2.x's OpenCLIP tokenizer pads with "!" (id 0), not EOS
        return cls(config, params, tokenizer, dtype=dtype, attention_implementation=attention_implementation)

    def save_single_file(self, path, *, dtype=None) -> None:
        """Write the original single-file layout (``.safetensors``) that A1111, ComfyUI and diffusers load."""
        single_file.save_single_file(path, self.config, self.params, dtype=dtype)

    @classmethod
    def load(cls, model=None, *, config=None, dtype=None) -> "StableDiffusion":
        """Any model by one name: None (the built-in model), a single-file checkpoint (``.safetensors`` /
        ``.ckpt``, with an optional ``config``: see ``from_single_file``), a diffusers folder or a hub repo id."""
        if model is None:
            if config is not None:
                raise ValueError("config= describes a single-file model (.safetensors/.ckpt); no model was given")
            return cls.default(dtype=dtype)
        if single_file.is_single_file(model):
            return cls.from_single_file(model, config, dtype=dtype)
        path = Path(model).expanduser()
        if path.suffix.lower() in single_file.SINGLE_FILE_SUFFIXES and not path.exists():
            raise FileNotFoundError(f"model file not found: {model}")
        if config is not None:
            raise ValueError(f"config= describes a single-file model (.safetensors/.ckpt), not {model}")
        return cls.from_pretrained(model, dtype=dtype)

    @classmethod
    def default(cls, *, dtype=None) -> "StableDiffusion":
        """The small built-in model shipped inside the package (no download)."""
        return cls.from_pretrained(builtin_model_dir(), dtype=dtype)

    def save_pretrained(self, path) -> None:
        """Write the diffusers layout, loadable by diffusers' PyTorch ``from_pretrained``."""
        weights.save_pretrained(Path(path), self.config, self.params, self.tokenizer, self.tokenizer_2)

    # --- generation ----------------------------------------------------------------------------------------

    @property
    def models(self) -> Models:
        """The Flax modules and latent scaling ``sdjax.generate`` runs (hashable: a static jit argument)."""
        return self.models_for()

    def models_for(self, clip_skip: Optional[int] = None) -> Models:
        """``models`` with AUTOMATIC1111's "Clip skip" ``clip_skip`` (1 = the last layer, 2 = the
        penultimate, ...; None = the model's own). A layer count is a compile-time value: each clip skip
        is its own program."""
        if clip_skip is None or self.config.text_encoder is None:
            skip = self.config.clip_skip
        else:
            layers = self.config.text_encoder.num_hidden_layers
            skip = inputs.check_integer("clip_skip", clip_skip, 1, layers) - 1
        return Models(
            self.text_encoder,
            self.unet,
            self.vae,
            skip,
            float(self.config.vae.scaling_factor),
            float(self.config.vae.shift_factor or 0.0),
            self.text_encoder_2,
        )

    @property
    def vae_scale_factor(self) -> int:
        return self.config.vae.downsample_factor

    @property
    def native_size(self) -> int:
        return self.config.unet.sample_size * self.vae_scale_factor

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """(N, 77) int32 token ids of the text encoder, padded; prompts past 77 tokens are cut with a warning."""
        prompts = list(prompts)
        ids, dropped = tokenize(self.tokenizer, prompts, self.config.text_encoder.max_position_embeddings)
        for text, lost in zip(prompts, dropped):
            if lost:
                warnings.warn(
                    f"prompt is longer than CLIP's {self.config.text_encoder.max_position_embeddings} tokens; "
                    f"{lost} token(s) were dropped from: {text[:60]!r}...",
                    stacklevel=4,
                )
        return ids

    def text_to_image(
        self,
        prompt: Prompt,
        negative_prompt: Optional[Prompt] = None,
        *,
        parallel_mode: Optional[str] = None,
        **options,
    ):
        """Generate images from text; returns PIL images, a uint8 NHWC array or the final latents.

        Options: ``num_images_per_prompt`` (1), ``steps`` (50), ``guidance_scale`` (7.5; one value or one
        per image; None, or 1.0 for every image, runs the guidance-free path: one U-Net call per step, no negative
        prompt; guidance-distilled U-Nets (LCM, ``time_cond_proj_dim``) always run it, taking the scale as an input), ``height``/``width`` (the model's native size), ``seed`` (0; one or one per image),
        ``scheduler`` ("dpmpp_2m"; an sdjax name, ``sdjax.samplers.SCHEDULERS``, or an AUTOMATIC1111 name
        such as "DPM++ 2M" or "Euler a Karras", ``sdjax.samplers.A1111_SAMPLERS``), ``schedule_type``
        (A1111's "Automatic" | "Uniform" | "Karras" | "Exponential": k-diffusion's sigma grids),
        ``scheduler_options`` (e.g. ``timestep_spacing``, ``sigmas``, ``quantize``; ``make_schedule``),
        ``latents`` (the initial noise, NHWC, unscaled), ``noise`` ("jax" | "torch-cpu" | "torch-cuda": where
        the initial and per-step noise come from; the torch sources draw as torch does from each image's
        seed, seed + i in a batch, as AUTOMATIC1111 and diffusers with one generator per image do),
        ``output`` ("pil" | "np" | "latent"), ``progress`` (False), ``prompt_syntax`` ("a1111" | "compel" |
        "plain": weighting such as ``(red:1.3)``, ``BREAK``; ``sdjax.prompt``; prompts past 75 tokens are
        encoded in chunks of 77 as AUTOMATIC1111 does), ``clip_skip`` (A1111's "Clip skip": 2 = the text
        encoder's penultimate layer; None = the model's own; each value compiles its own program).
        ``controls``: a list of ``sdjax.Control(model, image, scale, start, end, guess_mode)``, ControlNets and
        T2I-Adapters, their effects summed (``sdjax.control``); without ``height``/``width`` the output takes the
        first control image's size, rounded down to a multiple of 8, as diffusers' ControlNet pipeline does.
        ``deep_cache``: ``sdjax.deepcache.DeepCache(interval, branch)`` or ``(interval, branch)``: the full U-Net
        every ``interval`` steps, only its shallow branch in between (DeepCache); None (default): off.
        ``guidance_rescale`` (0.0; one or one per image, in [0, 1]): diffusers' rescale of the guided prediction
        towards the conditional one's standard deviation (arXiv:2305.08891 §3.4).
        SDXL models (``sdjax.sdxl``) also take diffusers' micro-conditioning, (height, width) / (top, left) pairs:
        ``original_size`` and ``target_size`` (default: the output size), ``crops_coords_top_left`` ((0, 0)), and
        ``negative_original_size`` + ``negative_target_size`` (both or neither; then also
        ``negative_crops_coords_top_left``) for the negative pass; all traced. Without a negative prompt an SDXL
        base model's negative conditioning is zeros (``force_zeros_for_empty_prompt``). Not yet on SDXL: prompt
        weighting, prompts past 75 tokens, clip_skip, embeddings, LoRA, controls, DeepCache, image modes.
        ``parallel_mode``: "mesh" (default) or "pmap".
        """
        return self.run(self.prepare(Mode.TEXT_TO_IMAGE, prompt, negative_prompt, **options), parallel_mode)

    def image_to_image(
        self,
        prompt: Prompt,
        image,
        strength: Union[float, Sequence[float]] = 0.8,
        negative_prompt: Optional[Prompt] = None,
        *,
        parallel_mode: Optional[str] = None,
        **options,
    ):
        """Redraw ``image`` after ``prompt``: encode it, noise it to the step ``strength`` selects and
        denoise the remaining steps (diffusers' img2img: ``int(steps * strength)`` steps run, so
        strength 0 returns the image through the VAE and 1 starts from almost pure noise).

        ``image``: a PIL image, a uint8 or [0, 1] float (H, W, 3) array, an (N, H, W, 3) batch or a
        list; one for all, one per prompt or one per output image. The output has the first image's
        size, rounded down to a multiple of 8 with a warning, unless ``height``/``width`` are given.
        ``strength``: one value or one per output image, in [0, 1]; traced, so new strengths never
        recompile. ``latents``: the noise added to the encoded image (NHWC, unscaled). Every other
        keyword is ``text_to_image``'s (steps, guidance_scale, seed, scheduler, output, ...).
        """
        job = self.prepare(Mode.IMAGE_TO_IMAGE, prompt, negative_prompt, image=image, strength=strength, **options)
        return self.run(job, parallel_mode)

    def inpaint(
        self,
        prompt: Prompt,
        image,
        mask,
        negative_prompt: Optional[Prompt] = None,
        *,
        strength: Union[float, Sequence[float]] = 1.0,
        parallel_mode: Optional[str] = None,
        **options,
    ):
        """Repaint the white part of ``mask`` in ``image`` after ``prompt``; the rest is kept.

        Inpainting U-Nets (9 input channels) see the mask and the masked image's latents; any ordinary
        4-channel model inpaints by the blended method: after every step the known region is reset to
        the init image's latents at the current noise level. ``mask``: single-channel, white = repaint
        (PIL, uint8, bool or [0, 1] float (H, W) / (H, W, 1); RGB masks are converted with a warning),
        the image's size; one for all, one per prompt or one per output image. Masks are rounded at
        0.5 as diffusers does unless ``binarize_mask=False``, which keeps soft masks (a soft blend with
        4-channel models). ``keep_unmasked`` (default) pastes the input's pixels back outside the mask,
        feathered over ``images.FEATHER_PIXELS`` pixels, so the VAE's round trip does not touch them
        (diffusers returns the plain decode: ``keep_unmasked=False``). ``strength`` < 1 starts from the
        noised image instead of pure noise. Other arguments as in ``image_to_image``.
        """
        job = self.prepare(
            Mode.INPAINT, prompt, negative_prompt, image=image, mask=mask, strength=strength, **options
        )
        return self.run(job, parallel_mode)

    def depth_to_image(
        self,
        prompt: Prompt,
        image,
        depth_map=None,
        strength: Union[float, Sequence[float]] = 0.8,
        negative_prompt: Optional[Prompt] = None,
        *,
        parallel_mode: Optional[str] = None,
        **options,
    ):
        """Image-to-image with a depth model (5-channel U-Net, like stable-diffusion-2-depth): the depth
        map is resized to the latent size (bicubic), normalised to [-1, 1] per image and given to the
        U-Net as an extra channel, so the result keeps the image's 3-D layout.

        ``depth_map``: (H, W) arrays of relative depth (larger = nearer, as DPT predicts; any scale and
        size), a (N, H, W) batch or a list; one for all, one per prompt or one per output image. When
        None, ``self.depth_estimator`` (``sdjax.depth.DepthEstimator``, needs the ``depth`` extra)
        estimates it from each image. Other arguments as in ``image_to_image``.
        """
        job = self.prepare(
            Mode.DEPTH_TO_IMAGE, prompt, negative_prompt, image=image, depth_map=depth_map, strength=strength,
            **options,
        )
        return self.run(job, parallel_mode)

    def prepare(
        self,
        mode: Union[Mode, str],
        prompt: Prompt,
        negative_prompt: Optional[Prompt] = None,
        *,
        image=None,
        strength: Union[float, Sequence[float]] = 0.8,
        mask=None,
        depth_map=None,
        binarize_mask: bool = True,
        keep_unmasked: bool = True,
        num_images_per_prompt: int = 1,
        steps: int = 50,
        guidance_scale: Union[float, Sequence[float]] = DEFAULT_GUIDANCE_SCALE,
        height: Optional[int] = None,
        width: Optional[int] = None,
        seed: Union[int, Sequence[int]] = 0,
        scheduler: str = DEFAULT_SCHEDULER,
        schedule_type: Optional[str] = None,
        scheduler_options: Optional[dict] = None,
        latents: Optional[Any] = None,
        noise: str = "jax",
        output: str = "pil",
        progress: bool = False,
        prompt_syntax: str = "a1111",
        clip_skip: Optional[int] = None,
        controls: Optional[Sequence[Control]] = None,
        deep_cache=None,
        guidance_rescale: Union[float, Sequence[float]] = 0.0,
        original_size: Optional[tuple] = None,
        crops_coords_top_left: Optional[tuple] = None,
        target_size: Optional[tuple] = None,
        negative_original_size: Optional[tuple] = None,
        negative_crops_coords_top_left: Optional[tuple] = None,
        negative_target_size: Optional[tuple] = None,
    ) -> Job:
        """Validate and convert one request of ``mode`` (a ``sdjax.generate.Mode`` or its value) into the
        ``Job`` that ``run`` executes; every argument as in the mode's method (``text_to_image``, ...)."""
        mode = Mode(mode)
        conditions.check_unet_for(self.config.unet, mode, mask)
        if (mode == Mode.TEXT_TO_IMAGE) != (image is None):
            raise ValueError(f"{mode.value} takes {'no image' if image is not None else 'an image'}, got image={image!r:.40}")
        prompts = inputs.prompt_list(prompt, "prompt")
        negatives = inputs.negative_prompt_list(negative_prompt, len(prompts))
        inputs.check_knobs(steps=steps, guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                           lora_scales=self._lora_scales)
        inputs.check_output(output)
        check_syntax(prompt_syntax)
        micro = sdxl.MicroConditioning(original_size, crops_coords_top_left, target_size, negative_original_size,
                                       negative_crops_coords_top_left, negative_target_size)
        sdxl.check_request(self.config, mode=mode.value, clip_skip=clip_skip, controls=controls, deep_cache=deep_cache,
                           prompt_syntax=prompt_syntax, micro=micro)
        models = self.models_for(clip_skip)
        scheduler, options = samplers.resolve_sampler(scheduler, schedule_type, scheduler_options)
        schedule = samplers.make_schedule(scheduler, self.config.scheduler, steps, **options)
        controls = list(controls or ()) if isinstance(controls, (list, tuple)) or controls is None else controls
        control.check_controls(controls, self.config.unet)
        if mode == Mode.TEXT_TO_IMAGE and controls and height is None and width is None:
            size = image_inputs.target_size(conditions.control_images(controls[0]), None, None, self.vae_scale_factor)
        elif mode == Mode.TEXT_TO_IMAGE:
            size = (self.native_size if height is None else height, self.native_size if width is None else width)
        else:
            given = image_inputs.as_list(image, "image", (2, 3))
            size = image_inputs.target_size(given, height, width, self.vae_scale_factor)
        latent_shape = inputs.latent_shape(*size, self.vae_scale_factor, self.config.unet.out_channels)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        count = len(prompts)
        self._check_memory(*size, count)
        sdxl_inputs = None
        if self.config.is_sdxl:
            cond, uncond, sdxl_inputs = sdxl.prompt_inputs(
                self.config, self.tokenizer, self.tokenizer_2, prompts, negatives, syntax=prompt_syntax,
                zero_negative=negative_prompt is None, size=size, micro=micro)
        else:
            cond, uncond = self.tokenize_prompts(prompts, negatives, prompt_syntax)
        compel = prompt_syntax == "compel"
        request = Request(
            mode=mode,
            cond_ids=cond.ids,
            uncond_ids=uncond.ids,
            cond_weights=cond.weights,
            uncond_weights=uncond.weights,
            weighting="compel" if compel else "a1111",
            empty_ids=np.tile(np.asarray(prompt_chunks(self.tokenizer, [Fragment("")])[0][0], np.int32), (count, 1))
            if compel else None,
            cond_variants=cond.variants,
            uncond_variants=uncond.variants,
            keys=inputs.image_keys(seed, count),
            guidance=inputs.per_image("guidance_scale", 1.0 if guidance_scale is None else guidance_scale, count),
            noise=None if latents is None else inputs.check_latents(latents, count, latent_shape),
            lora_scales=self._lora_scales_per_image(count),
            sdxl=sdxl_inputs,
            guidance_rescale=None if np.all(np.asarray(guidance_rescale) == 0) else inputs.per_image(
                "guidance_rescale", inputs.check_numbers("guidance_rescale", guidance_rescale, 0.0, 1.0), count),
        )
        if check_noise_source(noise) != "jax":
            request = self._torch_noise(request, noise, seed, schedule, latent_shape, latents)
        expand = partial(image_inputs.expand_indices, num_prompts=count // num_images_per_prompt,
                         per_prompt=num_images_per_prompt)
        if mode != Mode.TEXT_TO_IMAGE:
            requested = height is not None or width is not None
            image_inputs.warn_if_resized(given, size, "image", self.vae_scale_factor, requested)
            condition = conditions.image_condition(
                mode, given, size, expand, inputs.start_steps(strength, schedule.num_steps, count), mask=mask,
                depth_map=depth_map, binarize_mask=binarize_mask, keep_unmasked=keep_unmasked,
                depth_estimator=self.depth_estimator, latent_factor=self.vae_scale_factor,
            )
            request = dataclasses.replace(request, image=condition)
        specs, control_params = control.specs_and_params(controls, self.dtype)
        if controls:
            control_inputs = conditions.control_condition(controls, size, expand, count, self.vae_scale_factor)
            request = dataclasses.replace(request, controls=control_inputs)
        embeds_guidance = self.config.unet.time_cond_proj_dim is not None  # LCM: guidance is a U-Net input
        program = Program(models, latent_shape, output, specs, guided=guided(guidance_scale) and not embeds_guidance,
                          deep_cache=deepcache.resolve(deep_cache, self.config.unet))
        return Job(request, schedule, program, progress=bool(progress), control_params=control_params)

    def run(self, job: Job, parallel_mode: Optional[str] = None):
        """Execute a prepared ``Job`` on this model's devices; returns what its ``output`` asked for.

        With ``job.progress`` the sampler loop runs as a few compiled chunks with the step display advanced
        between them (same results, and every program stays in JAX's persistent compilation cache, which a
        host callback inside the loop would prevent); otherwise the whole job is one compiled program."""
        params = self._params_with(job.control_params)
        if job.progress:
            total = job.schedule.num_evals
            result = self.executor.run_in_chunks(
                generate_stages, params, job.request, job.schedule, static=job.program, total=total,
                chunk=progress_chunk(total), progress=self.executor.progress, mode=parallel_mode,
            )
        else:
            result = self.executor.run(
                generate, params, job.request, job.schedule, static=job.program, mode=parallel_mode
            )
        return inputs.to_output(result, job.program.output)

    def _params_with(self, control_params: tuple) -> dict:
        """``self.params``, with ``control_params`` as ``params["controls"]`` when there are controls; the same
        dict object for the same parameters, so the executor places them on the devices only once."""
        if not control_params:
            return self.params
        given, base, combined = self._with_controls
        if base is not self.params or len(given) != len(control_params) or any(
                a is not b for a, b in zip(given, control_params)):
            combined = {**self.params, "controls": control_params}
            self._with_controls = (control_params, self.params, combined)
        return combined

    def _check_memory(self, height: int, width: int, count: int) -> None:
        """Refuse, before compiling, a request whose estimated memory exceeds the devices' (``sdjax.memory``)."""
        param_bytes = memory.tree_bytes(self.params)
        if "lora" in self.params:  # generate merges the adapters into a copy of the weights they touch
            param_bytes += memory.tree_bytes({k: v for k, v in self.params.items() if k in ("unet", "text_encoder")})
        memory.check_fits(self.config, height, width, count, dtype=self.dtype, param_bytes=param_bytes,
                          devices=self.executor.devices)

    def _torch_noise(self, request: Request, source: str, seed, schedule: Schedule, latent_shape, latents) -> Request:
        """``request`` with its initial noise (and a stochastic sampler's per-step noise) drawn as torch
        draws it on ``source`` from each image's own seed (``sdjax.noise.image_noise``)."""
        if latents is not None:
            raise ValueError(f"noise={source!r} draws the initial noise from the seeds; it cannot be combined "
                             "with latents= (give one or the other)")
        options = dict(schedule.options)
        if schedule.name == "dpmpp_2m_sde" and options.get("sigmas") is not None:
            raise ValueError(
                f"noise={source!r} cannot reproduce AUTOMATIC1111's DPM++ 2M SDE: it draws the per-step noise "
                "from a Brownian tree (torchsde), not from the seed's generator; use noise='jax', or the "
                "diffusers grid (no sigmas= option), where the generator's draws continue as diffusers does"
            )
        draws = schedule.num_evals if schedule.stochastic else 0
        initial, steps = image_noise(source, inputs.image_seeds(seed, request.size), latent_shape, draws)
        return dataclasses.replace(request, noise=initial, step_noise=steps)


def guided(guidance_scale) -> bool:
    """Whether a request runs classifier-free guidance: not for ``guidance_scale=None`` or 1.0 for every image,
    whose guided result is the conditional prediction (the guidance-free path then makes one U-Net call per
    step on the images alone instead of two)."""
    return guidance_scale is not None and not np.all(np.asarray(guidance_scale, np.float64) == 1.0)
