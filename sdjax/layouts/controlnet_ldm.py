"""The original ControlNet single-file layout (lllyasviel's ``cldm``: ``control_v11p_sd15_canny.pth`` and kin).

Keys, under an optional ``control_model.`` prefix (some files, e.g. SD 2.x ones, have none):

* ``time_embed.*``, ``input_blocks.*``, ``middle_block.*``  the U-Net encoder copy, numbered as in the LDM U-Net
  (so the module tables of ``sdjax.layouts.ldm`` apply)
* ``zero_convs.{n}.0``                                        1x1 conv on skip connection n
* ``middle_block_out.0``                                      1x1 conv on the mid block's output
* ``input_hint_block.{0, 2, 4, ...}``                         the conditioning-image encoder, SiLUs at odd indices

``ldm_to_diffusers`` / ``diffusers_to_ldm`` convert between this layout and diffusers' ``ControlNetModel``
state dict through an explicit module table; every tensor is used once or named in ``IGNORED``, and
anything else is an error. Shapes are checked later, against the Flax module.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from sdjax.config import ControlNetConfig
from sdjax.layouts.ldm import IGNORED as LDM_IGNORED
from sdjax.layouts.ldm import unet_module_table

CONTROL_PREFIX = "control_model."
# The U-Net encoder modules a ControlNet copies, as the LDM U-Net names them.
_ENCODER_MODULES = ("time_embed.", "input_blocks.", "middle_block.")

# ControlNet 1.0 files (``control_sd15_canny.pth``) bundle the whole Stable Diffusion model they were trained
# with beside ``control_model.*``; only the ControlNet is loaded from them.
IGNORED = {
    r"(model\.diffusion_model|first_stage_model|cond_stage_model|model_ema)\..*": "the bundled base model",
    **LDM_IGNORED,
}


def skip_count(config: ControlNetConfig) -> int:
    """Residuals a ControlNet emits besides the mid one: conv_in, each resnet, each downsampler."""
    levels = len(config.block_out_channels)
    return 1 + levels * config.layers_per_block + (levels - 1)


def hint_conv_indices(config: ControlNetConfig) -> list[int]:
    """``input_hint_block`` indices of the conditioning encoder's convolutions, in order (conv_in ... conv_out)."""
    convs = 2 + 2 * (len(config.conditioning_embedding_out_channels) - 1)
    return [2 * i for i in range(convs)]


def module_table(config: ControlNetConfig) -> dict[str, str]:
    """Original module paths (without ``control_model.``) -> diffusers ``ControlNetModel`` module paths."""
    table = {
        ldm: diffusers
        for ldm, diffusers in unet_module_table(config.unet_config()).items()
        if ldm.startswith(_ENCODER_MODULES)
    }
    for n in range(skip_count(config)):
        table[f"zero_convs.{n}.0"] = f"controlnet_down_blocks.{n}"
    table["middle_block_out.0"] = "controlnet_mid_block"
    hint = hint_conv_indices(config)
    table[f"input_hint_block.{hint[0]}"] = "controlnet_cond_embedding.conv_in"
    for j, index in enumerate(hint[1:-1]):
        table[f"input_hint_block.{index}"] = f"controlnet_cond_embedding.blocks.{j}"
    table[f"input_hint_block.{hint[-1]}"] = "controlnet_cond_embedding.conv_out"
    return table


def has_control_prefix(state: Mapping[str, np.ndarray]) -> bool:
    return any(key.startswith(CONTROL_PREFIX) for key in state)


def strip_control_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ControlNet's own tensors with ``control_model.`` removed; files without the prefix pass through."""
    if not has_control_prefix(state):
        return dict(state)
    return {key[len(CONTROL_PREFIX):]: value for key, value in state.items() if key.startswith(CONTROL_PREFIX)}


def _shown(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")


def ldm_to_diffusers(state: Mapping[str, np.ndarray], config: ControlNetConfig) -> dict[str, np.ndarray]:
    """An original ControlNet state dict (with or without ``control_model.``) -> diffusers ``ControlNetModel`` keys.

    Tensors outside ``control_model.*`` must match ``IGNORED``; a ControlNet tensor the table has no place for
    raises a one-line ``ValueError`` naming a few of them.
    """
    if has_control_prefix(state):
        ignore = [re.compile(p) for p in IGNORED]
        stray = [k for k in state if not k.startswith(CONTROL_PREFIX) and not any(p.fullmatch(k) for p in ignore)]
        if stray:
            raise ValueError(f"{len(stray)} tensor(s) outside control_model.* that a ControlNet file does not "
                             f"hold: {_shown(stray)}")
    table = module_table(config)
    out: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in strip_control_prefix(state).items():
        module, _, leaf = key.rpartition(".")
        target = table.get(module)
        if target is None:
            unknown.append(key)
        else:
            out[f"{target}.{leaf}"] = value
    if unknown:
        raise ValueError(f"{len(unknown)} tensor(s) have no place in the ControlNet its config describes "
                         f"({len(config.block_out_channels)} levels, {config.layers_per_block} layers per block): "
                         f"{_shown(unknown)}; pass config= if the shapes are unusual")
    return out


def diffusers_to_ldm(
    state: Mapping[str, np.ndarray], config: ControlNetConfig, prefix: str = CONTROL_PREFIX
) -> dict[str, np.ndarray]:
    """diffusers ``ControlNetModel`` keys -> the original layout, each key under ``prefix``."""
    inverse = {diffusers: ldm for ldm, diffusers in module_table(config).items()}
    out, unknown = {}, []
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        ldm = inverse.get(module)
        if ldm is None:
            unknown.append(key)
        else:
            out[f"{prefix}{ldm}.{leaf}"] = value
    if unknown:
        raise ValueError(f"{len(unknown)} tensor(s) have no place in the original ControlNet layout: {_shown(unknown)}")
    return out
