"""The pure generate function: a typed ``Request`` in, images or latents out.

Everything between token ids and pixels for one (per-device) batch is ``generate``: encode the
prompts, draw or take the initial noise, build the image conditioning of the request's mode, run the
guided sampler in one ``lax.scan`` and decode. The host side (``sdjax.pipeline``) only validates,
tokenizes and builds the ``Request``; ``sdjax.parallel`` compiles and places it on the devices.
Encoding and decoding here are also what training uses.
"""

from __future__ import annotations

import dataclasses
import enum
from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from sdjax import control, deepcache, lora, parallel, samplers, sdxl
from sdjax.models.clip import CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL
from sdjax.prompt import Variants
from sdjax.samplers import Schedule
from sdjax.sampling import SamplerCarry, classifier_free_guidance, sample_evaluations, start_sampling


class Mode(str, enum.Enum):
    """What a request conditions on besides the prompt; static: each mode is its own program."""

    TEXT_TO_IMAGE = "text_to_image"
    IMAGE_TO_IMAGE = "image_to_image"
    INPAINT = "inpaint"
    DEPTH_TO_IMAGE = "depth_to_image"


class KeyStream(enum.IntEnum):
    """Image i's random draws: ``fold_in(keys[i], stream)``, one independent stream per use."""

    INITIAL_NOISE = 0
    SAMPLER = 1
    IMAGE = 2  # the VAE posterior draw of the init image
    MASKED_IMAGE = 3  # the VAE posterior draw of inpainting's masked image


@dataclasses.dataclass(frozen=True)
class Models:
    """The Flax modules of one model, built for one dtype (hashable: part of the static argument); SDXL models
    add ``text_encoder_2`` (the refiner has only that one: ``text_encoder`` None)."""

    text_encoder: Optional[CLIPTextModel]
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    clip_skip: int
    scaling_factor: float
    shift_factor: float
    text_encoder_2: Optional[CLIPTextModel] = None


@dataclasses.dataclass(frozen=True)
class ImageCondition:
    """The image side of a request; every array leads with the image axis.

    ``pixels`` (B, H, W, 3) in [-1, 1]; ``start_step`` (B,) int32, each image's first inference step
    (its strength); inpainting adds ``mask`` (B, H, W, 1), white = repaint, and ``keep`` (B, H, W, 1),
    the weights that paste the input's pixels back after decoding (zeros to skip); depth-to-image
    adds ``depth`` (B, h, w, 1) in [-1, 1] at the latent size.
    """

    pixels: jax.Array
    start_step: jax.Array
    mask: Optional[jax.Array] = None
    keep: Optional[jax.Array] = None
    depth: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation batch: the traced inputs of ``generate`` (leading axis: images) and its mode.

    ``cond_ids`` / ``uncond_ids`` (B, 77k) int32 token ids, k chunks of 77 each encoded alone
    (``sdjax.prompt``), ``keys`` (B, 2) uint32 per-image keys,
    ``guidance`` (B,) fp32; ``noise`` (B, h, w, c) initial latents when the caller gave them or a torch
    noise source drew them (else drawn from the keys); ``step_noise`` (B, E, h, w, c) the noise a
    stochastic sampler adds at each image's 1st, 2nd, ... run evaluation, when a torch noise source drew it
    (else drawn from the keys); ``image`` for the image modes; ``lora_scales`` {adapter name: (B,)} when
    the parameters hold unfused LoRA adapters. ``cond_weights`` / ``uncond_weights`` (B, 77k) fp32: each
    token's prompt weight (``sdjax.prompt``; None: all 1); ``empty_ids`` (B, 77) the empty prompt's ids,
    which compel's weighting measures from; ``cond_variants`` / ``uncond_variants`` compel's extra encodings
    (``sdjax.prompt.Variants``) when a prompt needs them. ``mode`` and ``weighting`` ("a1111" | "compel",
    ``apply_prompt_weights``) are static. ``controls``: one ``sdjax.control.ControlInput`` per control of the
    program (``Program.controls``), in the same order. ``sdxl``: an SDXL model's second tokenizer's ids, time
    ids and negative zeroing (``sdjax.sdxl.SDXLConditions``). ``guidance_rescale`` (B,) fp32: diffusers'
    ``guidance_rescale`` (None: 0, skipped).
    """

    mode: Mode
    cond_ids: jax.Array
    uncond_ids: jax.Array
    keys: jax.Array
    guidance: jax.Array
    noise: Optional[jax.Array] = None
    step_noise: Optional[jax.Array] = None
    image: Optional[ImageCondition] = None
    lora_scales: Optional[dict] = None
    cond_weights: Optional[jax.Array] = None
    uncond_weights: Optional[jax.Array] = None
    empty_ids: Optional[jax.Array] = None
    cond_variants: Optional[Variants] = None
    uncond_variants: Optional[Variants] = None
    controls: Optional[tuple] = None
    sdxl: Optional[sdxl.SDXLConditions] = None
    guidance_rescale: Optional[jax.Array] = None
    weighting: str = "a1111"

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def take(self, indices) -> "Request":
        """The sub-request of images ``indices`` (a slice or an index array)."""
        return jax.tree.map(lambda x: x[indices], self)


jax.tree_util.register_dataclass(
    ImageCondition, data_fields=["pixels", "start_step", "mask", "keep", "depth"], meta_fields=[]
)
jax.tree_util.register_dataclass(
    Request,
    data_fields=["cond_ids", "uncond_ids", "keys", "guidance", "noise", "step_noise", "image", "lora_scales",
                 "cond_weights", "uncond_weights", "empty_ids", "cond_variants", "uncond_variants", "controls",
                 "sdxl", "guidance_rescale"],
    meta_fields=["mode", "weighting"],
)


@dataclasses.dataclass(frozen=True)
class Program:
    """The compile-time side of a generate call: models, latent shape, output kind and the controls' modules
    (``sdjax.control.ControlSpec``; their parameters are ``params["controls"]``, in the same order)."""

    models: Models
    latent_shape: tuple
    output: str  # "pil" | "np" (both decode to uint8) | "latent"
    controls: tuple = ()
    guided: bool = True  # False: the guidance-free path, one U-Net call per step on the images alone
    deep_cache: Optional[deepcache.DeepCache] = None  # reuse the U-Net's deep features between steps


@dataclasses.dataclass(frozen=True)
class KnownRegion:
    """Inpainting with an ordinary U-Net: what re-imposes the unmasked region after every step."""

    image_latents: jax.Array
    noise: jax.Array
    mask: jax.Array  # (B, h, w, 1), 1 = repaint


@dataclasses.dataclass(frozen=True)
class Denoising:
    """A generation between its stages (``begin``, ``advance``, ``finish``): the sampler's carry, the
    encoded prompts (leading axis: images; no unconditional ones on the guidance-free path), the U-Net's extra input channels of the image modes,
    for inpainting with an ordinary U-Net the known region, and the T2I-Adapters' features (one entry per
    control, None for ControlNets); for SDXL the U-Net's text-time inputs, batched as the U-Net's context."""

    sampler: SamplerCarry
    uncond_context: Optional[jax.Array]
    cond_context: jax.Array
    extra_channels: Optional[jax.Array] = None
    known: Optional[KnownRegion] = None
    control_features: Optional[tuple] = None
    added: Optional[sdxl.AddedInputs] = None


jax.tree_util.register_dataclass(KnownRegion, data_fields=["image_latents", "noise", "mask"], meta_fields=[])
jax.tree_util.register_dataclass(
    Denoising,
    data_fields=["sampler", "uncond_context", "cond_context", "extra_channels", "known", "control_features", "added"],
    meta_fields=[],
)


def encode_prompts(models: Models, params, ids: jax.Array, weights: Optional[jax.Array] = None,
                   weighting: str = "a1111", empty_ids: Optional[jax.Array] = None,
                   variants: Optional[Variants] = None) -> jax.Array:
    """Token ids (B, 77k) -> the U-Net's context (B, 77k, D): each 77-token chunk encoded alone (as
    AUTOMATIC1111 encodes long prompts), textual-inversion rows from ``params["embeddings"]`` when
    loaded, then the per-token ``weights`` applied (``apply_prompt_weights``); compel's ``variants``
    (``sdjax.prompt.Variants``, M per prompt) are encoded with their attention masks and weighted alike,
    and each chunk becomes its mix of the prompt's own encoding and its variants' (``mix_variants``)."""
    batch, length = ids.shape
    chunk = models.text_encoder.config.max_position_embeddings
    if length % chunk:
        raise ValueError(f"token ids of length {length} are not whole chunks of {chunk} tokens")
    added = params.get("embeddings")

    def encode(token_ids, mask=None):
        out = models.text_encoder.apply(
            {"params": params["text_encoder"]}, token_ids.reshape(-1, chunk), skip_layers=models.clip_skip,
            added_tokens=added, attention_mask=None if mask is None else mask.reshape(-1, chunk),
        )
        return out.reshape(token_ids.shape[0], -1, out.shape[-1])

    context = encode(ids)
    if weights is None:
        return context
    empty = encode(empty_ids) if weighting == "compel" else None
    context = apply_prompt_weights(context, weights, weighting, empty)
    if variants is None:
        return context
    if weighting != "compel":
        raise ValueError(f"prompt variants are compel's; the weighting is {weighting!r}")
    count = variants.ids.shape[1]
    extra = encode(variants.ids.reshape(batch * count, length), variants.masks.reshape(batch * count, length))
    extra = apply_prompt_weights(extra, variants.weights.reshape(batch * count, length), weighting,
                                 jnp.repeat(empty, count, axis=0))
    return mix_variants(context, extra.reshape(batch, count, length, -1), variants.mix)


jax.tree_util.register_dataclass(Variants, data_fields=["ids", "weights", "masks", "mix"], meta_fields=[])


def mix_variants(context: jax.Array, variants: jax.Array, mix: jax.Array) -> jax.Array:
    """compel's lerps and blends: per chunk, ``mix`` (B, 1 + M, k) weighs the encoded prompts (B, 77k, D)
    and their encoded variants (B, M, 77k, D); a chunk mixed (1, 0, ..., 0) is returned unchanged."""
    batch, length, width = context.shape
    chunks = mix.shape[-1]
    z = jnp.concatenate([context[:, None], variants], axis=1).astype(jnp.float32)
    z = z.reshape(batch, -1, chunks, length // chunks, width)
    mixed = jnp.sum(mix.astype(jnp.float32)[..., None, None] * z, axis=1)  # elementwise: full fp32 on any backend
    own = (mix[:, 0] == 1.0) & jnp.all(mix[:, 1:] == 0.0, axis=1)
    own_chunks = context.reshape(batch, chunks, length // chunks, width)
    return jnp.where(own[..., None, None], own_chunks, mixed.astype(context.dtype)).reshape(batch, length, width)


def apply_prompt_weights(context: jax.Array, weights: jax.Array, weighting: str = "a1111",
                         empty: Optional[jax.Array] = None) -> jax.Array:
    """Per-token weights (B, 77k) on encoded prompts (B, 77k, D), chunk by chunk; a chunk whose weights are
    all 1 is returned unchanged, bit for bit.

    "a1111" (AUTOMATIC1111's "Original" emphasis): ``z * w`` rescaled so its mean over the chunk's tokens
    and features is the original's. "compel": ``empty + (z - empty) * w`` with ``empty`` (B, 77, D) the
    encoded empty prompt, as compel weights every token (its down-weighting then mixes in variants:
    ``encode_prompts``).
    """
    batch, length, width = context.shape
    chunks = length // 77
    z = context.astype(jnp.float32).reshape(batch, chunks, 77, width)
    w = weights.astype(jnp.float32).reshape(batch, chunks, 77, 1)
    if weighting == "compel":
        base = empty.astype(jnp.float32)[:, None]
        weighted = jnp.where(w == 1.0, z, base + (z - base) * w)  # compel leaves 1-weighted tokens exact
    elif weighting == "a1111":
        original_mean = jnp.mean(z, axis=(2, 3), keepdims=True)
        weighted = z * w
        weighted = weighted * (original_mean / jnp.mean(weighted, axis=(2, 3), keepdims=True))
    else:
        raise ValueError(f"prompt weighting {weighting!r} is not known; accepted: 'a1111', 'compel'")
    plain = jnp.all(w == 1.0, axis=(2, 3), keepdims=True)
    weighted = jnp.where(plain, context.reshape(batch, chunks, 77, width), weighted.astype(context.dtype))
    return weighted.reshape(batch, length, width)


def encode_images(models: Models, params, pixels: jax.Array, noise: Optional[jax.Array] = None) -> jax.Array:
    """[-1, 1] NHWC pixels -> scaled latents: the VAE posterior mean, or the draw ``mean + std * noise``
    that diffusers' image pipelines take (``latent_dist.sample``) when ``noise`` is given."""
    mean, logvar = models.vae.apply({"params": params["vae"]}, pixels.astype(models.vae.dtype), method="encode")
    latents = mean.astype(jnp.float32)
    if noise is not None:
        latents = latents + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise
    return (latents - models.shift_factor) * models.scaling_factor


def decode_latents(models: Models, params, latents: jax.Array, overlay=None) -> jax.Array:
    """Scaled latents -> uint8 NHWC images (converted on device: 4x less to transfer than fp32).

    ``overlay``: (pixels in [-1, 1], keep weights (B, H, W, 1)) composited over the decoded images.
    ``decoded_images`` also says which images were finite before the conversion."""
    return decoded_images(models, params, latents, overlay).pixels


class DecodedImages(NamedTuple):
    """uint8 NHWC pixels, and per image whether the decoder's output was finite (NaN/inf turn into plain
    colours in uint8, so this is the only place they can be seen)."""

    pixels: jax.Array
    finite: jax.Array


def decoded_images(models: Models, params, latents: jax.Array, overlay=None) -> DecodedImages:
    """``decode_latents`` with the per-image finite flag."""
    latents = latents / models.scaling_factor + models.shift_factor
    images = models.vae.apply({"params": params["vae"]}, latents.astype(models.vae.dtype), method="decode")
    images = images.astype(jnp.float32)
    if overlay is not None:
        original, keep = overlay
        images = images * (1.0 - keep) + original * keep
    finite = jnp.all(jnp.isfinite(images), axis=tuple(range(1, images.ndim)))
    images = jnp.clip((images + 1.0) * 127.5, 0.0, 255.0)
    return DecodedImages(jnp.round(images).astype(jnp.uint8), finite)


def image_normals(keys: jax.Array, stream: KeyStream, shape: tuple) -> jax.Array:
    """One standard-normal array of ``shape`` per image, from ``fold_in(keys[i], stream)`` only."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), shape, jnp.float32))(keys)


def image_conditioning(models: Models, params, request: Request, schedule: Schedule, noise: jax.Array):
    """Initial latents, extra U-Net input channels and per-step blend of the image modes.

    The init image is encoded and noised to each image's ``start_step`` (diffusers' img2img rule; a
    start past the last step leaves the clean latents). Inpainting at strength 1 (start 0) starts from
    pure noise as diffusers' does; a 9-channel U-Net gets the mask (nearest downsampled) and the masked
    image's latents as extra channels, an ordinary U-Net gets the known region re-imposed after every
    step. Depth-to-image gives the depth map as the extra channel.
    Returns (x_init, extra channels or None, the known region or None).
    """
    condition, keys = request.image, request.keys
    start, latent_shape = condition.start_step, noise.shape[1:]
    image_latents = encode_images(models, params, condition.pixels, image_normals(keys, KeyStream.IMAGE, latent_shape))
    x = samplers.add_noise(schedule, image_latents, noise, start)
    x = jnp.where(samplers.per_sample(start >= schedule.num_steps, x.ndim), image_latents, x)
    if request.mode == Mode.DEPTH_TO_IMAGE:
        return x, condition.depth.astype(jnp.float32), None
    if request.mode != Mode.INPAINT:
        return x, None, None
    x = jnp.where(samplers.per_sample(start == 0, x.ndim), noise * schedule.init_noise_sigma, x)
    factor = condition.pixels.shape[1] // latent_shape[0]
    mask = condition.mask[:, ::factor, ::factor].astype(jnp.float32)  # torch's nearest at an integer factor
    if models.unet.config.in_channels == latent_shape[-1]:
        return x, None, KnownRegion(image_latents, noise, mask)
    masked_image = condition.pixels * (condition.mask < 0.5)
    masked_noise = image_normals(keys, KeyStream.MASKED_IMAGE, latent_shape)
    masked_latents = encode_images(models, params, masked_image, masked_noise)
    return x, jnp.concatenate([mask, masked_latents], axis=-1), None


def blend_known_region(schedule: Schedule, region: KnownRegion, x, i):
    """Inpainting with an ordinary U-Net: after evaluation i, outside the mask the sample becomes the
    init image's latents noised to the next evaluation's level (clean after the last one)."""
    last = schedule.num_evals - 1
    known = samplers.noise_to_eval(schedule, region.image_latents, region.noise, jnp.minimum(i + 1, last))
    known = jnp.where(i < last, known, region.image_latents)
    return (1 - region.mask) * known + region.mask * x


def merge_loaded_lora(params, lora_scales: Optional[dict]):
    """``params`` with the loaded LoRA adapters (``params["lora"]``: {name: adapter}) merged in.

    Each adapter's scale comes traced (one value per image, all equal), so a new scale reuses the
    compiled function. Merging costs one small matmul per adapted layer per call, against every
    denoising step applying the low-rank path again if it stayed unfused.
    """
    if "lora" not in params:
        return params
    base = {k: v for k, v in params.items() if k != "lora"}
    adapters = params["lora"]
    return lora.merge_lora(base, [(adapters[name], lora_scales[name][0]) for name in sorted(adapters)])


def drawn_step_noise(step_noise: jax.Array, first: jax.Array, i) -> jax.Array:
    """The noise of evaluation ``i`` from per-image tables of draws: image b's (i - first_b)-th entry, so
    an image that starts late (image-to-image strength) still takes its draws from the first one on."""
    count, draws = step_noise.shape[:2]
    index = jnp.clip(i - jnp.broadcast_to(first, (count,)), 0, draws - 1)
    return jax.vmap(lambda table, k: table[k])(step_noise, index)


def begin(params, request: Request, schedule: Schedule, program: Program) -> Denoising:
    """Encode the prompts, draw or take the initial noise and build the image conditioning."""
    params = merge_loaded_lora(params, request.lora_scales)
    models, count = program.models, request.size
    added = None
    if request.sdxl is not None:
        context, added = sdxl.encode_conditions(models, params, request.cond_ids, request.uncond_ids, request.sdxl,
                                                program.guided)
    else:
        context = encode_request_prompts(models, params, request, program.guided)
    uncond_context, cond_context = (context[:count], context[count:]) if program.guided else (None, context)
    if request.noise is not None:
        noise = request.noise.astype(jnp.float32)
    else:
        noise = image_normals(request.keys, KeyStream.INITIAL_NOISE, program.latent_shape)
    if request.image is not None:
        x, extra_channels, known = image_conditioning(models, params, request, schedule, noise)
        start_step = request.image.start_step
    else:
        x, extra_channels, known, start_step = noise * schedule.init_noise_sigma, None, None, 0
    features = None
    if program.controls:
        features = control.adapter_features(program.controls, params["controls"], request.controls)
    cache = None
    if program.deep_cache is not None:  # what the U-Net sees: [uncond; cond] if guided, plus any extra channels
        copies = 2 if program.guided else 1
        sample = jax.ShapeDtypeStruct((copies * count, *x.shape[1:-1], models.unet.config.in_channels),
                                      models.unet.dtype)
        cache = deepcache.initial_cache(models.unet, params["unet"], program.deep_cache, sample, context)
    return Denoising(start_sampling(x, schedule, start_step, cache), uncond_context, cond_context, extra_channels,
                     known, features, added)


def encode_request_prompts(models: Models, params, request: Request, guided: bool) -> jax.Array:
    """The request's encoded prompts: [negative; positive] (2B, ...) for guidance, the positive ones alone
    (B, ...) on the guidance-free path."""
    def both(uncond, cond):
        if uncond is None:
            return None
        return jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond) if guided else cond

    empty_ids = both(request.empty_ids, request.empty_ids)
    return encode_prompts(models, params, both(request.uncond_ids, request.cond_ids),
                          both(request.uncond_weights, request.cond_weights), request.weighting, empty_ids,
                          both(request.uncond_variants, request.cond_variants))


def advance(params, request: Request, schedule: Schedule, program: Program, carry: Denoising, evaluations) -> Denoising:
    """Run the guided sampler's model evaluations ``evaluations`` (indices past the last are skipped)."""
    params = merge_loaded_lora(params, request.lora_scales)
    models, extra_channels = program.models, carry.extra_channels
    embeds_guidance = models.unet.config.time_cond_proj_dim is not None

    def unet_fn(latents, t, ctx, i, model_state=None):
        residuals = {}
        if carry.added is not None:  # SDXL: batched as ctx ([uncond; cond] when guided)
            residuals.update(text_embeds=carry.added.text_embeds, time_ids=carry.added.time_ids)
        if embeds_guidance:  # guidance-distilled (LCM) U-Nets take w = scale - 1 embedded, instead of guidance
            cond = samplers.guidance_embedding(request.guidance - 1.0, models.unet.config.time_cond_proj_dim)
            residuals["timestep_cond"] = jnp.concatenate([cond] * (latents.shape[0] // cond.shape[0]))
        if program.controls:  # on the latents alone, before an inpainting or depth U-Net's extra channels
            def weight_of(given):
                return given.scale * control.keep(i, carry.sampler.first, schedule.num_evals, given.start, given.end)

            residuals.update(control.residuals(
                program.controls, params["controls"], request.controls, carry.control_features, latents, t,
                carry.uncond_context, carry.cond_context, weight_of,
            ).as_kwargs())
        if extra_channels is not None:  # appended after the sampler's input scaling, for [uncond; cond] if guided
            copies = latents.shape[0] // extra_channels.shape[0]
            extra = jnp.concatenate([extra_channels] * copies).astype(latents.dtype)
            latents = jnp.concatenate([latents, extra], axis=-1)
        variables, latents = {"params": params["unet"]}, latents.astype(models.unet.dtype)
        if model_state is None:
            return models.unet.apply(variables, latents, t, ctx, **residuals).astype(jnp.float32)
        full = deepcache.is_full(program.deep_cache, schedule.timesteps, jnp.min(carry.sampler.first), i)
        out, cache = deepcache.cached_unet(models.unet, variables, program.deep_cache, full, model_state, latents, t,
                                           ctx, **residuals)
        return out.astype(jnp.float32), cache

    if program.guided:
        rescale = 0.0 if request.guidance_rescale is None else request.guidance_rescale
        model_fn = classifier_free_guidance(unet_fn, carry.cond_context, carry.uncond_context, request.guidance, rescale)
    else:
        model_fn = partial(_unguided, unet_fn, carry.cond_context)
    sampler_keys = jax.vmap(lambda k: jax.random.fold_in(k, KeyStream.SAMPLER))(request.keys)
    after_step = None if carry.known is None else partial(blend_known_region, schedule, carry.known)
    noise_fn = None if request.step_noise is None else partial(drawn_step_noise, request.step_noise, carry.sampler.first)
    sampler = sample_evaluations(
        model_fn, carry.sampler, sampler_keys, schedule, evaluations, noise_fn=noise_fn, after_step=after_step,
        model_takes_index=True,
    )
    return dataclasses.replace(carry, sampler=sampler)


def _unguided(unet_fn, context, x, t, **extra):
    out = unet_fn(x, t, context, **extra)
    return out if "model_state" in extra else out.astype(jnp.float32)  # stateful: (fp32 output, new state)


def finish(params, request: Request, schedule: Schedule, program: Program, carry: Denoising):
    """The final latents, or ``DecodedImages`` (inpainting: the input's own pixels outside the mask)."""
    latents = carry.sampler.x
    if program.output == "latent":
        return latents
    params = merge_loaded_lora(params, request.lora_scales)
    if request.mode == Mode.INPAINT:  # the input's own pixels outside the mask, not their VAE round trip
        return decoded_images(program.models, params, latents, overlay=(request.image.pixels, request.image.keep))
    return decoded_images(program.models, params, latents)


def generate(params, request: Request, schedule: Schedule, program: Program):
    """The whole computation of one (per-device) batch, as one pure function."""
    carry = begin(params, request, schedule, program)
    carry = advance(params, request, schedule, program, carry, jnp.arange(schedule.num_evals))
    return finish(params, request, schedule, program, carry)


def _advance_chunk(params, request, schedule, program_and_chunk, carry, first_index):
    program, chunk = program_and_chunk
    return advance(params, request, schedule, program, carry, first_index + jnp.arange(chunk))


STAGES = parallel.Stages(begin=begin, advance=_advance_chunk, finish=finish)
"""``generate`` in three compiled parts, for a progress display between chunks of the sampler loop."""


def progress_chunk(num_evals: int, updates: int = 20) -> int:
    """Evaluations per chunk when the loop shows progress: about ``updates`` display updates per run (one
    compiled chunk program whatever the step count's remainder: evaluations past the end are skipped)."""
    return max(1, -(-num_evals // updates))
