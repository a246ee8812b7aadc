"""The diffusers / transformers state-dict layout <-> Flax parameter trees, by sdjax's naming convention.

sdjax names every Flax submodule after the diffusers / transformers state-dict key, with list
indices joined by an underscore: ``down_blocks.0.attentions.1.proj_in.weight`` lives at
``down_blocks_0/attentions_1/proj_in/kernel``. Conversion is therefore a mechanical renaming plus
layout transposes, checked against the module's own parameter shapes (``sdjax.weights.param_shapes``):
every checkpoint tensor must be used exactly once and every parameter filled.

transformers' ``CLIPTextModel`` keys carry a ``text_model.`` prefix (transformers 4) or not
(transformers 5); the Flax text encoder's tree has none.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util

# Flax names that end in "_<digit>" in the checkpoint itself, so they are not list indices.
_NATIVE_SUFFIXED_NAMES = frozenset({"linear_1", "linear_2"})
_INDEXED = re.compile(r"^(.*)_(\d+)$")

TEXT_MODEL_PREFIX = "text_model."
# Non-persistent buffers that older transformers checkpoints of the text encoder contain.
TEXT_ENCODER_BUFFERS = (r"embeddings\.position_ids",)


class WeightsMismatchError(ValueError):
    """A checkpoint does not fit the module: missing, unexpected or mis-shaped tensors."""


def module_path(key: str) -> tuple[str, ...]:
    """``a.0.b.weight`` -> ("a_0", "b"), dropping the final parameter name."""
    parts = key.split(".")[:-1]
    path: list[str] = []
    for part in parts:
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def torch_key(flax_path: tuple[str, ...], torch_leaf: str) -> str:
    """Inverse of ``module_path``: ("a_0", "b"), "weight" -> ``a.0.b.weight``."""
    parts: list[str] = []
    for name in flax_path:
        match = _INDEXED.match(name)
        if match and name not in _NATIVE_SUFFIXED_NAMES:
            parts.extend([match.group(1), match.group(2)])
        else:
            parts.append(name)
    return ".".join(parts + [torch_leaf])


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if array.ndim == 4:  # conv: (out, in, kh, kw) -> (kh, kw, in, out)
            return array.transpose(2, 3, 1, 0)
        if array.ndim == 2:  # linear: (out, in) -> (in, out)
            return array.T
    return array


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if array.ndim == 4:
            return array.transpose(3, 2, 0, 1)
        if array.ndim == 2:
            return array.T
    return array


def _torch_leaf_name(flax_leaf: str) -> str:
    return "bias" if flax_leaf == "bias" else "weight"


def torch_to_flax(
    state_dict: Mapping[str, Any],
    template: Mapping[str, Any],
    *,
    what: str = "checkpoint",
    ignore: Iterable[str] = (),
    dtype: Any = None,
) -> dict:
    """Convert a PyTorch-layout state dict into the Flax tree shaped like ``template``.

    ``template`` is the parameter tree of the module (arrays or ``jax.ShapeDtypeStruct``).
    ``ignore`` holds regular expressions for checkpoint keys that are buffers, not parameters.
    Raises ``WeightsMismatchError`` naming missing, unexpected and mis-shaped tensors.
    """
    flat_template = traverse_util.flatten_dict(dict(template))
    by_module: dict[tuple[str, ...], dict[str, tuple]] = {}
    for path, spec in flat_template.items():
        by_module.setdefault(path[:-1], {})[path[-1]] = spec.shape

    ignore_patterns = [re.compile(p) for p in ignore]
    filled: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, misshaped = [], []
    for key, value in state_dict.items():
        if any(p.fullmatch(key) for p in ignore_patterns):
            continue
        module = module_path(key)
        torch_leaf = key.rsplit(".", 1)[-1]
        leaves = by_module.get(module)
        if leaves is None:
            unexpected.append(key)
            continue
        if torch_leaf == "bias" and "bias" in leaves:
            flax_leaf = "bias"
        elif torch_leaf == "weight":
            flax_leaf = next((n for n in ("kernel", "scale", "embedding") if n in leaves), None)
        else:
            flax_leaf = None
        if flax_leaf is None:
            unexpected.append(key)
            continue
        array = _to_flax_layout(flax_leaf, np.asarray(value))
        expected = tuple(leaves[flax_leaf])
        if array.shape != expected:
            misshaped.append(f"{key}: checkpoint {tuple(array.shape)} vs model {expected}")
            continue
        if dtype is not None:
            array = array.astype(dtype)
        filled[module + (flax_leaf,)] = array

    missing = [torch_key(p[:-1], _torch_leaf_name(p[-1])) for p in flat_template if p not in filled]
    if missing or unexpected or misshaped:
        lines = [f"{what} does not match the model:"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                shown = ", ".join(sorted(items)[:10]) + (" ..." if len(items) > 10 else "")
                lines.append(f"  {len(items)} {label} tensor(s): {shown}")
        raise WeightsMismatchError("\n".join(lines))
    return traverse_util.unflatten_dict(filled)


def flax_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of ``torch_to_flax``: a PyTorch-layout state dict of numpy arrays."""
    out = {}
    for path, value in traverse_util.flatten_dict(dict(params)).items():
        key = torch_key(path[:-1], _torch_leaf_name(path[-1]))
        out[key] = np.ascontiguousarray(_to_torch_layout(path[-1], np.asarray(value)))
    return out


def strip_text_model_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers ``CLIPTextModel`` state dict with its keys as the Flax text encoder names them."""
    stripped: dict[str, Any] = {}
    for key, value in state_dict.items():
        name = key[len(TEXT_MODEL_PREFIX):] if key.startswith(TEXT_MODEL_PREFIX) else key
        if name in stripped:
            raise ValueError(
                f"text encoder state dict holds {name!r} both with and without the "
                f"{TEXT_MODEL_PREFIX!r} prefix; give one or the other"
            )
        stripped[name] = value
    return stripped
