"""SDXL's conditioning: two text encoders, the pooled text embedding and the size/crop micro-conditioning.

As diffusers' ``StableDiffusionXLPipeline`` encodes a prompt: each tokenizer pads to 77 tokens with its own pad
token (SDXL base's ``tokenizer_2`` pads with "!", id 0), each encoder's penultimate hidden states, before the
final layer norm, are concatenated on the feature axis (768 + 1280 = 2048 for the base model; the refiner has
only the bigG tower), and the pooled embedding is the second encoder's projected ``text_embeds``. Without a
negative prompt, models with ``force_zeros_for_empty_prompt`` get zeros as the negative context and pooled
embedding. The U-Net's ``time_ids`` are original size + crop top-left + target size, (height, width) pairs.

Host side: ``prompt_inputs`` tokenizes and builds the traced ``SDXLConditions`` of a request; device side:
``encode_conditions`` (called by ``sdjax.generate``) encodes them into the context and the U-Net's
``AddedInputs``, batched [negative; positive] as the context is for classifier-free guidance.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.config import ModelConfig
from sdjax.prompt import TokenizedPrompts, parse
from sdjax.tokenizer import tokenize

# SDXL's U-Nets read the second-to-last hidden states of both encoders, before the final layer norm.
PENULTIMATE = 1
# (original height, width, crop top, left, target height, width): the base model's time ids.
BASE_TIME_IDS = 6


@dataclasses.dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size and crop conditioning, diffusers' argument names; None: diffusers' default (sizes: the output
    size (height, width), crops: (0, 0)). The negative values condition the negative prompt's U-Net pass and
    are given as diffusers takes them: both negative sizes (the crop then defaults to (0, 0)), or none, the
    negative pass then reusing the positive values."""

    original_size: Optional[tuple] = None
    crops_coords_top_left: Optional[tuple] = None
    target_size: Optional[tuple] = None
    negative_original_size: Optional[tuple] = None
    negative_crops_coords_top_left: Optional[tuple] = None
    negative_target_size: Optional[tuple] = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))


@dataclasses.dataclass(frozen=True)
class SDXLConditions:
    """The SDXL side of a request (leading axis: images): ``cond_ids_2`` / ``uncond_ids_2`` (B, 77) int32 the
    second tokenizer's ids (the first tokenizer's are the request's ``cond_ids`` / ``uncond_ids``),
    ``cond_time_ids`` / ``uncond_time_ids`` (B, n) float32 and ``zero_uncond`` (B,) bool: the negative context
    and pooled embedding are zeros (no negative prompt, ``force_zeros_for_empty_prompt``). All traced."""

    cond_ids_2: jax.Array
    uncond_ids_2: jax.Array
    cond_time_ids: jax.Array
    uncond_time_ids: jax.Array
    zero_uncond: jax.Array


@dataclasses.dataclass(frozen=True)
class AddedInputs:
    """The U-Net's text-time inputs, batched as its context: ``text_embeds`` (N, pooled width), ``time_ids`` (N, n)."""

    text_embeds: jax.Array
    time_ids: jax.Array


jax.tree_util.register_dataclass(
    SDXLConditions,
    data_fields=["cond_ids_2", "uncond_ids_2", "cond_time_ids", "uncond_time_ids", "zero_uncond"],
    meta_fields=[],
)
jax.tree_util.register_dataclass(AddedInputs, data_fields=["text_embeds", "time_ids"], meta_fields=[])


# --- device side -----------------------------------------------------------------------------------------------


def encode_text(models, params, ids: Optional[jax.Array], ids_2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token ids of both tokenizers (B, 77) -> (context (B, 77, D1 + D2), pooled (B, P)); the refiner (no first
    text encoder in ``models``) encodes ``ids_2`` only."""
    hidden_2, pooled = models.text_encoder_2.apply(
        {"params": params["text_encoder_2"]}, ids_2, skip_layers=PENULTIMATE, final_norm=False,
        method="encode_with_pooled",
    )
    if models.text_encoder is None:
        return hidden_2, pooled
    hidden = models.text_encoder.apply({"params": params["text_encoder"]}, ids, skip_layers=PENULTIMATE,
                                       final_norm=False)
    return jnp.concatenate([hidden, hidden_2.astype(hidden.dtype)], axis=-1), pooled


def encode_conditions(models, params, cond_ids, uncond_ids, conditions: SDXLConditions,
                      guided: bool) -> tuple[jax.Array, AddedInputs]:
    """The context and the U-Net's added inputs of a request: [negative; positive] (2B, ...) for guidance, the
    positive ones alone (B, ...) on the guidance-free path."""
    if not guided:
        context, pooled = encode_text(models, params, cond_ids, conditions.cond_ids_2)
        return context, AddedInputs(pooled, conditions.cond_time_ids.astype(jnp.float32))
    both = lambda u, c: jnp.concatenate([u, c])  # noqa: E731
    context, pooled = encode_text(models, params, both(uncond_ids, cond_ids),
                                  both(conditions.uncond_ids_2, conditions.cond_ids_2))
    zero = jnp.concatenate([conditions.zero_uncond, jnp.zeros_like(conditions.zero_uncond)])
    context = jnp.where(zero[:, None, None], jnp.zeros_like(context), context)
    pooled = jnp.where(zero[:, None], jnp.zeros_like(pooled), pooled)
    time_ids = both(conditions.uncond_time_ids, conditions.cond_time_ids).astype(jnp.float32)
    return context, AddedInputs(pooled, time_ids)


# --- host side -------------------------------------------------------------------------------------------------


def refuse(config: ModelConfig, what: str) -> None:
    """A ``ValueError`` for a feature sdjax does not implement for SDXL models yet."""
    if config.is_sdxl:
        raise ValueError(f"{what} is not supported for SDXL models yet")


def check_request(config: ModelConfig, *, mode: str, clip_skip, controls, deep_cache, prompt_syntax: str,
                  micro: MicroConditioning) -> None:
    """Refuse, for SDXL models, what sdjax does not implement for them yet; refuse SDXL options elsewhere."""
    if not config.is_sdxl:
        if micro.given:
            raise ValueError("original_size, crops_coords_top_left, target_size and their negative_* forms are "
                             "SDXL micro-conditioning; this model is not an SDXL model")
        return
    if config.requires_aesthetics_score or config.text_encoder is None:
        raise ValueError("this is an SDXL refiner (aesthetic-score conditioning, bigG text encoder only), which "
                         "sdjax does not run yet")
    if mode != "text_to_image":
        raise ValueError(f"{mode} is not supported for SDXL models yet; text_to_image is")
    for given, what in ((clip_skip is not None, "clip_skip"), (bool(controls), "controls (ControlNet, T2I-Adapter)"),
                        (deep_cache is not None, "deep_cache"), (prompt_syntax == "compel", "prompt_syntax='compel'")):
        if given:
            refuse(config, what)
    added = config.unet.projection_class_embeddings_input_dim
    expected = config.text_encoder_2.projection_dim + BASE_TIME_IDS * (config.unet.addition_time_embed_dim or 0)
    if added != expected:
        raise ValueError(f"the U-Net's added conditioning is {added} wide, but the pooled text embedding "
                         f"({config.text_encoder_2.projection_dim}) and {BASE_TIME_IDS} time ids make {expected}")


def _pair(name: str, value, default: tuple) -> tuple[float, float]:
    if value is None:
        return tuple(float(v) for v in default)
    values = tuple(value) if isinstance(value, (tuple, list)) else None
    if values is None or len(values) != 2 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{name} must be a pair of non-negative numbers (height, width) or (top, left), got {value!r}")
    return tuple(float(v) for v in values)


def time_ids(micro: MicroConditioning, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The positive and negative time ids (6,) float32 of the output ``size`` (height, width)."""
    cond = np.array([*_pair("original_size", micro.original_size, size),
                     *_pair("crops_coords_top_left", micro.crops_coords_top_left, (0, 0)),
                     *_pair("target_size", micro.target_size, size)], np.float32)
    negative_sizes = (micro.negative_original_size, micro.negative_target_size)
    if all(v is None for v in negative_sizes):
        if micro.negative_crops_coords_top_left is not None:
            raise ValueError("negative_crops_coords_top_left needs negative_original_size and negative_target_size "
                             "too (diffusers ignores it without them)")
        return cond, cond
    if any(v is None for v in negative_sizes):
        raise ValueError("give both negative_original_size and negative_target_size, or neither (diffusers ignores "
                         "one without the other)")
    uncond = np.array([*_pair("negative_original_size", micro.negative_original_size, size),
                       *_pair("negative_crops_coords_top_left", micro.negative_crops_coords_top_left, (0, 0)),
                       *_pair("negative_target_size", micro.negative_target_size, size)], np.float32)
    return cond, uncond


def plain_text(text: str, syntax: str) -> str:
    """The text of a prompt without syntax; weighting and ``BREAK`` are refused (not implemented for SDXL)."""
    fragments = parse(text, syntax)
    if any(f.weight != 1.0 or f.is_break for f in fragments):
        raise ValueError(f"prompt weighting and BREAK are not supported for SDXL models yet, in {text[:60]!r}; write "
                         "the prompt without them, or pass prompt_syntax='plain' to take brackets literally")
    return "".join(f.text for f in fragments)


def _ids(tokenizer, texts: Sequence[str], max_length: int) -> np.ndarray:
    ids, dropped = tokenize(tokenizer, list(texts), max_length)
    for text, lost in zip(texts, dropped):
        if lost:
            raise ValueError(f"prompt is {lost} token(s) longer than the {max_length - 2} an SDXL prompt may have "
                             f"(long prompts are not supported for SDXL models yet): {text[:60]!r}...")
    return ids


def prompt_inputs(config: ModelConfig, tokenizer, tokenizer_2, prompts: Sequence[str], negatives: Sequence[str], *,
                  syntax: str, zero_negative: bool, size: tuple[int, int], micro: MicroConditioning,
                  ) -> tuple[TokenizedPrompts, TokenizedPrompts, SDXLConditions]:
    """The first tokenizer's prompts and negative prompts (``TokenizedPrompts``, one chunk, unweighted; the
    refiner's are the second tokenizer's) and the request's ``SDXLConditions``. ``zero_negative``: no negative
    prompt was given (zeros when the model has ``force_zeros_for_empty_prompt``)."""
    count = len(prompts)
    texts = [plain_text(p, syntax) for p in prompts]
    negative_texts = [plain_text(n, syntax) for n in negatives]
    length = config.text_encoder_2.max_position_embeddings
    cond_2, uncond_2 = _ids(tokenizer_2, texts, length), _ids(tokenizer_2, negative_texts, length)
    if tokenizer is None:
        cond, uncond = cond_2, uncond_2
    else:
        length = config.text_encoder.max_position_embeddings
        cond, uncond = _ids(tokenizer, texts, length), _ids(tokenizer, negative_texts, length)
    cond_time, uncond_time = time_ids(micro, size)
    conditions = SDXLConditions(
        cond_ids_2=cond_2, uncond_ids_2=uncond_2,
        cond_time_ids=np.tile(cond_time, (count, 1)), uncond_time_ids=np.tile(uncond_time, (count, 1)),
        zero_uncond=np.full((count,), zero_negative and config.force_zeros_for_empty_prompt),
    )
    one_chunk = (1,) * count
    return (TokenizedPrompts(cond, None, one_chunk), TokenizedPrompts(uncond, None, one_chunk), conditions)
