"""One image's generation settings (a ``Recipe``), to and from AUTOMATIC1111's infotext, and regeneration.

A ``Recipe`` is what regenerates one image exactly: prompt, negative prompt, steps, sdjax sampler and its
options, guidance, the image's own seed, size, noise source, LoRAs. Written as infotext it carries A1111's
sampler name and schedule type (``sdjax.samplers.to_a1111``) so A1111 and other readers understand it, plus
two sdjax fields, ``sdjax sampler`` and ``sdjax options``, because several sdjax schedules share one A1111
name (diffusers' Euler grid and k-diffusion's uniform grid are both "Euler", "Uniform"). Read back, an
sdjax infotext gives the same recipe; an A1111 infotext resolves its sampler and schedule type through
``sdjax.samplers.resolve_sampler`` and its ``RNG`` (absent = A1111's GPU default) to a torch noise source.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Union

import sdjax
from sdjax import samplers
from sdjax.prompt import SYNTAXES
from sdjax.infotext import GenerationParameters, LoraRecord, format_infotext, parse_infotext, read_png_infotext

# sdjax noise source -> A1111's "RNG" value; A1111 writes no RNG for its default, "GPU".
RNG_NAMES = {"jax": "sdjax-jax", "torch-cpu": "CPU", "torch-cuda": "NV"}
_NOISE_OF_RNG = {"sdjax-jax": "jax", "CPU": "torch-cpu", "NV": "torch-cuda", "GPU": "torch-cuda"}
SAMPLER_FIELD, OPTIONS_FIELD = "sdjax sampler", "sdjax options"
CLIP_SKIP_FIELD, SYNTAX_FIELD = "Clip skip", "sdjax prompt syntax"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that regenerates one text-to-image result. ``scheduler_options`` are sorted (key, value)
    pairs; ``loras`` the adapters applied with their scales (and short hashes, for the infotext).

    An image made in a batch records ``batch_size`` and its ``batch_pos`` (A1111's "Batch size" / "Batch pos"):
    XLA's kernels round differently at another batch size, so the exact image comes back only from the same
    batch, which ``regenerate`` runs (seeds ``seed - batch_pos`` on) and takes the image from."""

    prompt: str
    negative_prompt: str
    steps: int
    scheduler: str
    guidance_scale: float
    seed: int
    width: int
    height: int
    noise: str = "jax"
    scheduler_options: tuple = ()
    loras: tuple[LoraRecord, ...] = ()
    model: Optional[str] = None
    model_hash: Optional[str] = None
    batch_size: int = 1
    batch_pos: int = 0
    clip_skip: int = 1  # A1111's "Clip skip" (1 = the text encoder's last layer), written when not 1
    prompt_syntax: str = "a1111"  # sdjax.prompt syntax, written as "sdjax prompt syntax" when not A1111's

    def generate_options(self) -> dict:
        """Keyword arguments of ``StableDiffusion.text_to_image`` (besides prompt and negative prompt) that
        make the whole batch the image came from; it is image ``batch_pos`` of the result."""
        return dict(steps=self.steps, scheduler=self.scheduler, scheduler_options=dict(self.scheduler_options),
                    guidance_scale=self.guidance_scale, seed=self.seed - self.batch_pos, width=self.width,
                    height=self.height, noise=self.noise, num_images_per_prompt=self.batch_size,
                    clip_skip=self.clip_skip, prompt_syntax=self.prompt_syntax)

    def to_parameters(self) -> GenerationParameters:
        options = dict(self.scheduler_options)
        sampler, schedule_type = samplers.to_a1111(self.scheduler, options)
        extra = [(SAMPLER_FIELD, self.scheduler)]
        if options:
            extra.append((OPTIONS_FIELD, json.dumps(options, sort_keys=True)))
        if self.batch_size > 1:
            extra += [("Batch size", str(self.batch_size)), ("Batch pos", str(self.batch_pos))]
        if self.clip_skip != 1:
            extra.append((CLIP_SKIP_FIELD, str(self.clip_skip)))
        if self.prompt_syntax != "a1111":
            extra.append((SYNTAX_FIELD, self.prompt_syntax))
        return GenerationParameters(
            prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps, sampler=sampler,
            schedule_type=schedule_type, cfg_scale=float(self.guidance_scale), seed=self.seed, width=self.width,
            height=self.height, model=self.model, model_hash=self.model_hash, loras=self.loras,
            rng=RNG_NAMES[self.noise], version=f"sdjax {sdjax.__version__}", extra=tuple(extra),
        )

    def infotext(self) -> str:
        """The image's A1111-format infotext (``sdjax.infotext.format_infotext``)."""
        return format_infotext(self.to_parameters())

    @classmethod
    def from_parameters(cls, params: GenerationParameters) -> "Recipe":
        """The recipe of an infotext written by sdjax or A1111; ``ValueError`` for what cannot be
        regenerated (an image-to-image result, a missing seed or size, an unknown sampler or RNG)."""
        if params.denoising_strength is not None:
            raise ValueError("this infotext records an image-to-image result (Denoising strength); regenerating "
                             "it needs the original input image: use image_to_image with these settings")
        missing = [name for name, value in (("Steps", params.steps), ("Seed", params.seed),
                                            ("Size", params.width), ("CFG scale", params.cfg_scale))
                   if value is None]
        if missing:
            raise ValueError(f"the infotext lacks {', '.join(missing)}; cannot regenerate the image")
        extra = dict(params.extra)
        if SAMPLER_FIELD in extra:
            scheduler = extra[SAMPLER_FIELD]
            options = json.loads(extra.get(OPTIONS_FIELD, "{}"))
        else:
            scheduler, options = samplers.resolve_sampler(params.sampler or "DPM++ 2M", params.schedule_type)
        try:
            batch_size, batch_pos = int(extra.get("Batch size", 1)), int(extra.get("Batch pos", 0))
        except ValueError:
            raise ValueError(f"bad Batch size / Batch pos in the infotext: {extra.get('Batch size')!r}, "
                             f"{extra.get('Batch pos')!r}") from None
        if not 0 <= batch_pos < batch_size or batch_pos > params.seed:
            raise ValueError(f"Batch pos {batch_pos} does not fit Batch size {batch_size} and Seed {params.seed}")
        try:
            clip_skip = int(extra.get(CLIP_SKIP_FIELD, 1))
        except ValueError:
            clip_skip = 0
        if clip_skip < 1:
            raise ValueError(f"bad Clip skip in the infotext: {extra.get(CLIP_SKIP_FIELD)!r}; expected an integer >= 1")
        syntax = extra.get(SYNTAX_FIELD, "a1111")
        if syntax not in SYNTAXES:
            raise ValueError(f"unknown {SYNTAX_FIELD} {syntax!r} in the infotext; accepted: {', '.join(SYNTAXES)}")
        rng = params.rng or "GPU"
        if rng not in _NOISE_OF_RNG:
            raise ValueError(f"unknown RNG {rng!r} in the infotext; accepted: {', '.join(_NOISE_OF_RNG)}")
        return cls(
            prompt=params.prompt, negative_prompt=params.negative_prompt, steps=params.steps, scheduler=scheduler,
            guidance_scale=params.cfg_scale, seed=params.seed, width=params.width, height=params.height,
            noise=_NOISE_OF_RNG[rng], scheduler_options=tuple(sorted(options.items())), loras=params.loras,
            model=params.model, model_hash=params.model_hash, batch_size=batch_size, batch_pos=batch_pos,
            clip_skip=clip_skip, prompt_syntax=syntax,
        )


def read_recipe(source: Union[str, os.PathLike]) -> Recipe:
    """The recipe in a PNG's infotext (a path ending in .png) or in an infotext string."""
    text = source
    if isinstance(source, os.PathLike) or (isinstance(source, str) and source.lower().endswith(".png")):
        text = read_png_infotext(source)
    return Recipe.from_parameters(parse_infotext(str(text)))


def check_loras_loaded(sd, recipe: Recipe) -> None:
    """The LoRAs the recipe used must be loaded under the same names; their scales are set as recorded."""
    loaded = sd.lora_adapters
    wanted = {lora.name: lora.scale for lora in recipe.loras}
    absent = sorted(set(wanted) - set(loaded))
    if absent:
        raise ValueError(f"the image used LoRA(s) {absent} which are not loaded; load them under those names "
                         "first (sd.load_lora(path, name=...), or --lora in the CLI)")
    unused = sorted(set(loaded) - set(wanted))
    if unused:
        raise ValueError(f"LoRA(s) {unused} are loaded but the image did not use them; unload them first")
    for name, scale in wanted.items():
        sd.set_lora_scale(name, scale)


def regenerate(sd, source: Union[str, os.PathLike], **overrides):
    """Regenerate the image an infotext describes (a PNG path or the text itself) with ``sd``; returns what
    ``text_to_image`` returns, for that one image. ``overrides`` replace recorded settings (e.g.
    ``output="np"``)."""
    recipe = read_recipe(source)
    check_loras_loaded(sd, recipe)
    batch = sd.text_to_image(recipe.prompt, recipe.negative_prompt, **{**recipe.generate_options(), **overrides})
    return batch[recipe.batch_pos:recipe.batch_pos + 1]
