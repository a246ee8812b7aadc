"""T2I-Adapter checkpoint layouts: the original TencentARC files and diffusers' ``T2IAdapter`` keys.

diffusers (and sdjax, by ``sdjax.layouts.diffusers``) key an adapter as ``adapter.conv_in``,
``adapter.body.<level>.in_conv``, ``adapter.body.<level>.resnets.<n>.block1`` ... The original repository
(github.com/TencentARC/T2I-Adapter, ``ldm/modules/encoders/adapter.py`` and ``Adapter/models/adapters.py``)
has no ``adapter.`` prefix and two module trees:

* ``Adapter`` / ``Adapter_XL`` keep one flat list of residual blocks, level after level: block
  ``level * blocks_per_level + n`` is diffusers' ``body.<level>.resnets.<n>``, and a level's width-changing
  1x1 projection (``in_conv``) sits on its first block.
* ``Adapter_light`` has one ``extractor`` per level, whose residual blocks are ``body.<level>.body.<n>``.

The tables below are the whole mapping; ``{level}``, ``{block}`` and ``{resnet}`` are integers.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

import numpy as np

DIFFUSERS_PREFIX = "adapter."

# (original module, diffusers module); every module holds a ``weight`` and a ``bias``.
FULL_ADAPTER_MODULES = (
    ("conv_in", "adapter.conv_in"),
    ("body.{block}.in_conv", "adapter.body.{level}.in_conv"),
    ("body.{block}.block1", "adapter.body.{level}.resnets.{resnet}.block1"),
    ("body.{block}.block2", "adapter.body.{level}.resnets.{resnet}.block2"),
)
LIGHT_ADAPTER_MODULES = (
    ("body.{level}.in_conv", "adapter.body.{level}.in_conv"),
    ("body.{level}.body.{resnet}.block1", "adapter.body.{level}.resnets.{resnet}.block1"),
    ("body.{level}.body.{resnet}.block2", "adapter.body.{level}.resnets.{resnet}.block2"),
    ("body.{level}.out_conv", "adapter.body.{level}.out_conv"),
)
# Original modules diffusers' T2IAdapter has no counterpart for, and what they are.
UNSUPPORTED_ORIGINAL_MODULES = {
    "skep": "skip convolutions (an adapter built with sk=False)",
    "down_opt.op": "strided-convolution downsampling (an adapter built with use_conv=True)",
}

_LIGHT_MARKER = re.compile(r"^body\.\d+\.body\.\d+\.")


def _pattern(template: str) -> re.Pattern:
    body = re.escape(template)
    for name in ("level", "block", "resnet"):
        body = body.replace(re.escape("{" + name + "}"), rf"(?P<{name}>\d+)")
    return re.compile(rf"^{body}\.(?P<leaf>weight|bias)$")


_FULL_PATTERNS = tuple((_pattern(original), diffusers) for original, diffusers in FULL_ADAPTER_MODULES)
_LIGHT_PATTERNS = tuple((_pattern(original), diffusers) for original, diffusers in LIGHT_ADAPTER_MODULES)


def is_diffusers_layout(keys: Iterable[str]) -> bool:
    return any(key.startswith(DIFFUSERS_PREFIX) for key in keys)


def is_light_original(keys: Iterable[str]) -> bool:
    """Whether original-layout keys are an ``Adapter_light`` (residual blocks nested in each level)."""
    return any(_LIGHT_MARKER.match(key) for key in keys)


def unsupported_original_modules(keys: Iterable[str]) -> list[str]:
    """Descriptions of the original modules in ``keys`` that diffusers' layout cannot hold."""
    keys = list(keys)
    found = []
    for marker, description in UNSUPPORTED_ORIGINAL_MODULES.items():
        hits = [key for key in keys if f".{marker}." in key]
        if hits:
            found.append(f"{description}, e.g. {hits[0]}")
    return found


def original_blocks_per_level(keys: Iterable[str], default_levels: int = 4) -> int:
    """Residual blocks per level of an original ``Adapter``, from where the width-changing projections sit.

    Every released adapter has ``default_levels`` levels, which is taken whenever the projections fit it;
    otherwise the projections (each on the first block of a level) give it by their greatest common divisor,
    and an adapter without any is one level.
    """
    keys = list(keys)
    count = len({int(m.group(1)) for m in (re.match(r"^body\.(\d+)\.", k) for k in keys) if m})
    projected = [int(m.group(1)) for m in (re.match(r"^body\.(\d+)\.in_conv\.weight$", k) for k in keys) if m]
    if count and count % default_levels == 0 and all(p % (count // default_levels) == 0 for p in projected):
        return count // default_levels
    if any(projected):
        return math.gcd(*projected)
    return max(count, 1)


def original_to_diffusers(state: Mapping[str, np.ndarray], *, blocks_per_level: int = 0) -> dict[str, np.ndarray]:
    """An original TencentARC state dict with diffusers' keys; ``blocks_per_level`` is needed for ``Adapter``.

    Keys no table row matches (or a projection that is not on a level's first block) keep their original
    name, so the strict accounting that follows reports them as unexpected.
    """
    light = is_light_original(state)
    if not light and blocks_per_level < 1:
        raise ValueError(f"an original Adapter needs blocks_per_level >= 1 to map its keys; got {blocks_per_level}")
    patterns = _LIGHT_PATTERNS if light else _FULL_PATTERNS
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        for pattern, template in patterns:
            match = pattern.match(key)
            if match is None:
                continue
            fields = {k: int(v) for k, v in match.groupdict().items() if k != "leaf" and v is not None}
            if "block" in fields:
                fields["level"], fields["resnet"] = divmod(fields.pop("block"), blocks_per_level)
                if "{resnet}" not in template and fields["resnet"] != 0:
                    continue
            out[template.format(**fields) + "." + match.group("leaf")] = value
            break
        else:
            out[key] = value
    return out
