"""Textual-inversion embedding files as data: the layouts AUTOMATIC1111, diffusers and SDXL trainers write.

* A1111 ``.pt`` (a ``torch.save`` dict, read through ``sdjax.layouts.safe_pickle``: nothing in the file
  runs): ``string_to_param`` {"*": (n, D)}, with ``name``, ``step`` and other bookkeeping;
* A1111 ``.safetensors``: ``emb_params`` (n, D);
* diffusers ``learned_embeds.safetensors`` / ``.bin``: {token: (D,) or (n, D)}, one token;
* SDXL embeddings: ``clip_l`` (n, 768) and ``clip_g`` (n, 1280); an SD 1.x model takes ``clip_l``.

``read_embedding`` returns the vectors for a text encoder of a given width, as float32 (n, D).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from sdjax.layouts.files import read_safetensors
from sdjax.layouts.safe_pickle import is_placeholder, load_torch_file

SUFFIXES = (".pt", ".bin", ".safetensors")
_SDXL_KEYS = {"clip_l": 768, "clip_g": 1280}


def _matrix(value, what: str, path: Path) -> np.ndarray:
    if is_placeholder(value) or not isinstance(value, np.ndarray):
        raise ValueError(f"embedding file {path}: {what} is not a tensor ({type(value).__name__})")
    array = np.asarray(value, np.float32)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"embedding file {path}: {what} has shape {array.shape}; expected (vectors, width)")
    return array


def _read(path: Path) -> dict:
    if path.suffix.lower() == ".safetensors":
        return read_safetensors(path)
    data = load_torch_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"embedding file {path} holds a {type(data).__name__}, not a dict of tensors")
    return data


def read_embedding(path: os.PathLike, width: int) -> tuple[np.ndarray, Optional[str]]:
    """(vectors (n, width) float32, the token the file names or None) of a textual-inversion file.

    ``ValueError`` for an unknown layout or vectors of another text encoder's width."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"embedding file not found: {path}")
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"embedding file {path}: unknown suffix {path.suffix!r}; accepted: {', '.join(SUFFIXES)}")
    data = _read(path)
    name = None
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if is_placeholder(params) and isinstance(getattr(params, "state", None), dict):  # an nn.ParameterDict
            params = params.state.get("_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError(f"embedding file {path}: string_to_param must hold one tensor, got {params!r:.80}")
        vectors = _matrix(next(iter(params.values())), "string_to_param", path)
        name = data.get("name") if isinstance(data.get("name"), str) else None
    elif "emb_params" in data:  # A1111 .safetensors
        vectors = _matrix(data["emb_params"], "emb_params", path)
    elif set(_SDXL_KEYS) & set(data):
        if "clip_l" not in data:
            raise ValueError(f"embedding file {path} is an SDXL embedding without clip_l; SD 1.x/2.x models "
                             "need a (vectors, width) clip_l or a single-encoder embedding")
        vectors = _matrix(data["clip_l"], "clip_l", path)
        if vectors.shape[1] != width:
            raise ValueError(f"embedding file {path} is an SDXL embedding (clip_l width {vectors.shape[1]}, "
                             f"clip_g width {_SDXL_KEYS['clip_g']}); this model's text encoder has width {width}")
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
        if len(tensors) != 1:
            raise ValueError(f"embedding file {path} has no known layout: expected string_to_param (A1111 .pt), "
                             f"emb_params (A1111 .safetensors), one {{token: vector}} (diffusers) or clip_l/clip_g "
                             f"(SDXL); found keys {sorted(map(str, data))[:8]}")
        name, value = next(iter(tensors.items()))
        vectors = _matrix(value, repr(name), path)
    if vectors.shape[1] != width:
        raise ValueError(f"embedding file {path} has vectors of width {vectors.shape[1]}, made for another text "
                         f"encoder; this model's text encoder has width {width}")
    if not np.all(np.isfinite(vectors)):
        raise ValueError(f"embedding file {path} holds NaN or infinite values")
    return vectors, name
