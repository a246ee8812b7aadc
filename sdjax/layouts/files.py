"""Tensor files: safetensors (read memory-mapped, written atomically) and guarded PyTorch pickles.

Everything here returns or takes flat ``{key: numpy array}`` state dicts; bf16 is ``ml_dtypes.bfloat16``.
PyTorch pickles are read by ``sdjax.layouts.safe_pickle``, which needs no torch and runs no code from the file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping, Optional

import ml_dtypes
import numpy as np

from sdjax.layouts.safe_pickle import PickleError, is_placeholder, load_torch_file, placeholder_name

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: corrupt, truncated or unsafe."""


def read_safetensors_header(path: os.PathLike) -> tuple[dict, int]:
    """(the JSON header, ``__metadata__`` included; the offset where tensor data starts), checked against
    the file size, so a truncated download is reported as such instead of surfacing as garbage weights."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: it is only {size} bytes long")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: header claims {header_len} bytes "
                f"but the file has {size}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON ({e})") from None
    return header, 8 + header_len


def safetensors_metadata(path: os.PathLike) -> dict:
    """The ``__metadata__`` string map of a safetensors file (empty if it has none)."""
    return read_safetensors_header(path)[0].get("__metadata__") or {}


def read_safetensors(path: os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` file into numpy arrays (bf16 included), memory-mapped."""
    path = Path(path)
    header, data_start = read_safetensors_header(path)
    header.pop("__metadata__", None)
    size = path.stat().st_size
    data_len = max((info["data_offsets"][1] for info in header.values()), default=0)
    if data_start + data_len > size:
        raise CheckpointError(
            f"{path} is truncated: tensors need {data_start + data_len} bytes, the file has {size}"
        )
    buffer = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    out = {}
    for key, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out[key] = buffer[data_start + begin : data_start + end].view(dtype).reshape(info["shape"])
    return out


def write_safetensors(path: os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Optional[dict] = None) -> None:
    """Write numpy arrays (bf16 included) as a safetensors file that PyTorch tools read."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        array = np.ascontiguousarray(np.asarray(tensors[key]))
        name = _DTYPE_NAMES.get(array.dtype)
        if name is None:
            raise ValueError(f"cannot write tensor {key} of dtype {array.dtype} to safetensors")
        header[key] = {"dtype": name, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside and rename: arrays memory-mapped from the old file (read_safetensors) stay valid.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(tmp, path)


def read_torch_pickle(path: os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a ``.bin`` / ``.ckpt`` / ``.pt`` pickle (its ``state_dict`` when it has one), read by
    ``sdjax.layouts.safe_pickle``: no torch needed, no code from the file run, objects other than tensors
    (training callbacks, optimizer state, numpy scalars) left out."""
    path = Path(path)
    try:
        state = load_torch_file(path)
    except PickleError as e:
        raise CheckpointError(f"{path} could not be loaded safely: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        found = f"a {placeholder_name(state)} object" if is_placeholder(state) else type(state).__name__
        raise CheckpointError(f"{path} does not hold a state dict (found {found}); expected a dict of tensors")
    out = {}
    for key, value in state.items():
        if is_placeholder(value):
            raise CheckpointError(
                f"{path} could not be loaded safely: its state dict holds a {placeholder_name(value)} object "
                f"under {key!r} where tensors belong (sdjax never runs code from a pickle)"
            )
        if isinstance(value, np.ndarray) and not value.dtype.hasobject:
            out[str(key)] = np.asarray(value)
    return out


def read_checkpoint_file(path: os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file or a PyTorch pickle, by the file's suffix."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return read_torch_pickle(path)
    raise CheckpointError(f"unknown checkpoint file type {path.name}; accepted: .safetensors, .bin, .ckpt, .pt, .pth")
