"""SDXL's single-file text encoders: the ``conditioner.embedders.*`` layout of A1111 / Stability files.

SDXL base files hold CLIP ViT-L as ``conditioner.embedders.0.transformer.*`` (transformers keys) and OpenCLIP
bigG as ``conditioner.embedders.1.model.*`` (OpenCLIP's own layout, all 32 layers, its text projection kept);
the refiner holds bigG alone as ``conditioner.embedders.0.model.*``. The per-tower conversion is
``sdjax.layouts.ldm``'s, with these prefixes.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from sdjax.config import CLIPTextConfig
from sdjax.layouts.ldm import IGNORED, TextEncoderSlot, text_encoder_to_transformers, transformers_to_text_encoder

CONDITIONER_PREFIX = "conditioner."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."

SDXL_TEXT_ENCODERS = {
    "text_encoder": TextEncoderSlot(SDXL_CLIP_PREFIX, open_clip=False),
    "text_encoder_2": TextEncoderSlot(SDXL_OPEN_CLIP_PREFIX, open_clip=True),
}
SDXL_REFINER_TEXT_ENCODERS = {"text_encoder_2": TextEncoderSlot(SDXL_REFINER_OPEN_CLIP_PREFIX, open_clip=True)}


def sdxl_text_encoders_to_transformers(
    state: Mapping[str, np.ndarray], configs: Mapping[str, CLIPTextConfig]
) -> dict[str, dict[str, np.ndarray]]:
    """SDXL's ``conditioner.*`` tensors -> transformers state dicts, named like diffusers' folders.

    ``configs`` names the towers the file holds: ``text_encoder`` (CLIP ViT-L) and ``text_encoder_2``
    (OpenCLIP bigG, a ``CLIPTextModelWithProjection``) for SDXL base, ``text_encoder_2`` alone for the
    refiner. Every ``conditioner.*`` tensor is used once or ignored by ``IGNORED``; others raise a ValueError.
    """
    slots = _sdxl_slots(configs)
    patterns = [re.compile(p) for p in IGNORED]
    used = {k for k in state if k.startswith(CONDITIONER_PREFIX) and any(p.fullmatch(k) for p in patterns)}
    states = {name: text_encoder_to_transformers(state, configs[name], slot, used) for name, slot in slots.items()}
    leftovers = sorted(k for k in state if k.startswith(CONDITIONER_PREFIX) and k not in used)
    if leftovers:
        shown = ", ".join(leftovers[:12]) + (" ..." if len(leftovers) > 12 else "")
        raise ValueError(f"{len(leftovers)} conditioner tensor(s) have no place in the SDXL text encoders "
                         f"({', '.join(slots)}) the configs describe: {shown}")
    return states


def transformers_to_sdxl_text_encoders(
    states: Mapping[str, Mapping[str, np.ndarray]], configs: Mapping[str, CLIPTextConfig]
) -> dict[str, np.ndarray]:
    """Inverse of ``sdxl_text_encoders_to_transformers``: every tensor of ``states`` placed under
    ``conditioner.``, or a ValueError naming those with no place and those missing."""
    out: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    for name, slot in _sdxl_slots(configs).items():
        out.update(transformers_to_text_encoder(states[name], configs[name], slot, unknown, what=name))
    if unknown:
        shown = ", ".join(sorted(unknown)[:12]) + (" ..." if len(unknown) > 12 else "")
        raise ValueError(f"{len(unknown)} tensor(s) have no place in SDXL's conditioner layout: {shown}")
    return out


def _sdxl_slots(configs: Mapping[str, CLIPTextConfig]) -> dict[str, TextEncoderSlot]:
    for slots in (SDXL_TEXT_ENCODERS, SDXL_REFINER_TEXT_ENCODERS):
        if set(configs) == set(slots):
            return slots
    raise ValueError(f"SDXL text encoders are {sorted(SDXL_TEXT_ENCODERS)} (base) or "
                     f"{sorted(SDXL_REFINER_TEXT_ENCODERS)} (refiner); got {sorted(configs)}")
