"""PyTorch checkpoints (``.ckpt`` / ``.bin`` / ``.pt``) read without torch and without running their code.

A torch checkpoint is a pickle. Unpickling calls whatever functions the file names, which is how a
malicious ``.ckpt`` runs code. ``load_torch_file`` unpickles through ``RestrictedUnpickler``, whose
``find_class`` never imports the module a pickle names. It answers:

* torch's tensor rebuild functions and storage types -> sdjax's numpy versions (tensors come back as
  ``numpy.ndarray`` views of the storages, strides and offsets honoured, bf16 as ``ml_dtypes.bfloat16``);
* ``collections.OrderedDict``, plain builtin containers, ``_codecs.encode`` (protocol-2 bytes) and numpy
  scalars / arrays / dtypes -> safe versions that check their arguments and only build data;
* anything else (a PyTorch Lightning callback, ``os.system``, ``builtins.eval`` ...) -> an inert
  ``Placeholder`` class that records the module and name. Calling it, instantiating it or restoring its
  state only records the arguments; nothing is imported or run.

Both on-disk formats are read: the zip format of ``torch.save`` since PyTorch 1.6 (``<name>/data.pkl``
plus one ``<name>/data/<key>`` record per storage, memory-mapped when stored uncompressed) and the
legacy format before it (a sequence of pickles followed by the raw storages).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> numpy dtype of its elements.
STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
    "Float8_e4m3fnStorage": ml_dtypes.float8_e4m3fn,
    "Float8_e5m2Storage": ml_dtypes.float8_e5m2,
    "UntypedStorage": np.uint8,
}


class PickleError(ValueError):
    """A pickle that is malformed or asks for something the restricted unpickler does not build."""


# --- inert placeholders for every global that is not explicitly allowed ------------------------------------


class _FrozenType(type):
    """Metaclass of placeholder classes: a pickle cannot set attributes (``__call__``, ...) on them."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise PickleError(f"a pickle tried to set {name!r} on the placeholder for {cls.global_name}")

    def __delattr__(cls, name: str) -> None:
        raise PickleError(f"a pickle tried to delete {name!r} of the placeholder for {cls.global_name}")


class Placeholder(metaclass=_FrozenType):
    """Stands in for an object of a class (or the result of a function) the pickle named but sdjax never
    imports: ``global_name`` is ``"module.name"``; ``args``, ``kwargs``, ``state``, ``items`` and
    ``entries`` record what the pickle passed. Calling an instance gives another inert placeholder."""

    global_name = "?"
    __slots__ = ("args", "kwargs", "state", "items", "entries")

    def __new__(cls, *args: Any, **kwargs: Any) -> "Placeholder":
        self = object.__new__(cls)
        for slot, value in (("args", args), ("kwargs", kwargs), ("state", None), ("items", {}), ("entries", [])):
            object.__setattr__(self, slot, value)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # arguments were recorded by __new__
        pass

    def __setattr__(self, name: str, value: Any) -> None:
        raise PickleError(f"a pickle tried to set attribute {name!r} of a {self.global_name} placeholder")

    def __setstate__(self, state: Any) -> None:  # BUILD
        object.__setattr__(self, "state", state)

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) on a dict subclass
        self.items[key] = value

    def append(self, value: Any) -> None:  # APPEND(S) on a list subclass
        self.entries.append(value)

    def extend(self, values: Any) -> None:
        self.entries.extend(list(values) if isinstance(values, (list, tuple)) else [])

    def __call__(self, *args: Any, **kwargs: Any) -> "Placeholder":
        return _placeholder_class(f"{self.global_name}(...)")(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<not loaded: {self.global_name}>"


def _placeholder_class(global_name: str) -> type:
    return _FrozenType(
        "Placeholder", (Placeholder,), {"global_name": global_name, "__slots__": (), "__module__": __name__}
    )


def is_placeholder(value: Any) -> bool:
    """Whether ``value`` stands in for an object of a class the pickle named but sdjax did not build."""
    return isinstance(value, Placeholder) or (isinstance(value, type) and issubclass(value, Placeholder))


def placeholder_name(value: Any) -> str:
    """``"module.name"`` of a placeholder (instance or class)."""
    return value.global_name


# --- what the allowed globals become ------------------------------------------------------------------------


class _Safe:
    """An allowed global: a fixed function; a pickle can neither replace it nor set attributes on it."""

    __slots__ = ("_function", "_name")

    def __init__(self, name: str, function: Callable[..., Any]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_function", function)

    def __setattr__(self, name: str, value: Any) -> None:
        raise PickleError(f"a pickle tried to set attribute {name!r} of {self._name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<sdjax safe {self._name}>"


class StorageType:
    """What ``torch.<Name>Storage`` becomes: only its element dtype matters."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: Any) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", np.dtype(dtype))

    def __setattr__(self, name: str, value: Any) -> None:
        raise PickleError(f"a pickle tried to set attribute {name!r} of torch.{self.name}")


def _check_ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(type(v) is int for v in values):
        raise PickleError(f"tensor {what} must be a tuple of integers, got {type(values).__name__}")
    return tuple(values)


def rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any, **__: Any) -> np.ndarray:
    """torch's ``_rebuild_tensor(_v2)``: a strided view of ``storage`` (a 1-D numpy array), bounds-checked."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1 or storage.dtype.hasobject:
        raise PickleError(f"a tensor is built from a {type(storage).__name__} instead of a storage")
    size, stride = _check_ints(size, "size"), _check_ints(stride, "stride")
    if type(storage_offset) is not int or storage_offset < 0 or len(size) != len(stride):
        raise PickleError(f"tensor offset {storage_offset!r} / size {size} / stride {stride} do not fit together")
    if any(s < 0 for s in size + stride):
        raise PickleError(f"tensor size {size} or stride {stride} is negative")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.shape[0]:
        raise PickleError(
            f"tensor of size {size}, stride {stride} at offset {storage_offset} reaches element {last} "
            f"of a storage of {storage.shape[0]}"
        )
    item = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=size,
        strides=tuple(s * item for s in stride),
        writeable=False,
    )


def _rebuild_parameter(data: Any, *_: Any, **__: Any) -> Any:
    return data  # _rebuild_parameter(data, requires_grad, backward_hooks[, state])


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any = None) -> Any:
    # A tensor subclass: build the plain tensor, forget the subclass (it would be a placeholder anyway).
    if isinstance(func, _Safe) and isinstance(args, tuple):
        return func(*args)
    return _placeholder_class("torch._tensor._rebuild_from_type_v2")(func, new_type, args, state)


def _rebuild_from_numpy(data: Any, *_: Any, **__: Any) -> Any:
    return data  # _rebuild_device_tensor_from_numpy(data, dtype, device, requires_grad)


def _codecs_encode(text: Any, encoding: Any = "utf-8", *_: Any) -> bytes:
    # Protocol 2 writes bytes as _codecs.encode(latin-1 text, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise PickleError(f"_codecs.encode called with {type(text).__name__} / {encoding!r}")
    return text.encode(encoding)


def _bytes(*args: Any) -> bytes:
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray, list, tuple)):
        return bytes(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin1")
    raise PickleError("builtins.bytes called with arguments that are not data")


def _bytearray(*args: Any) -> bytearray:
    return bytearray(_bytes(*args))


def _container(kind: type) -> Callable[..., Any]:
    def build(*args: Any) -> Any:
        if not args:
            return kind()
        if len(args) == 1 and isinstance(args[0], (list, tuple, set, frozenset, dict)):
            return kind(args[0])
        raise PickleError(f"builtins.{kind.__name__} called with arguments that are not a plain container")

    return build


class NumpyDtype:
    """What ``numpy.dtype(code)`` becomes: a plain type code and byte order, turned into a real dtype only
    after checking (structured and sub-array dtypes are refused); numpy's own ``__setstate__`` never sees
    data from the pickle."""

    __slots__ = ("code", "byteorder")

    def __init__(self, code: Any, align: Any = False, copy: Any = False) -> None:
        if not isinstance(code, str):
            raise PickleError(f"numpy.dtype called with a {type(code).__name__}, not a type code")
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "byteorder", "=")

    def __setattr__(self, name: str, value: Any) -> None:
        raise PickleError(f"a pickle tried to set attribute {name!r} of a numpy dtype")

    def __setstate__(self, state: Any) -> None:  # (version, byteorder, subarray, names, fields, ...)
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "|", "=")):
            raise PickleError("malformed numpy dtype state")
        if any(part is not None for part in state[2:5]):
            raise PickleError("structured or sub-array numpy dtypes are not read from pickles")
        object.__setattr__(self, "byteorder", state[1])

    def resolve(self) -> np.dtype:
        dtype = np.dtype(self.code)
        if dtype.fields is not None or dtype.subdtype is not None:
            raise PickleError(f"structured numpy dtype {self.code!r} is not read from pickles")
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" and dtype.byteorder != "|" else dtype


def _resolve_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, NumpyDtype):
        raise PickleError(f"numpy data with a {type(dtype).__name__} instead of a numpy dtype")
    return dtype.resolve()


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    resolved = _resolve_dtype(dtype)
    if resolved.hasobject:
        return data  # an object scalar pickles the object itself, already unpickled here
    if not isinstance(data, (bytes, bytearray)) or len(data) != resolved.itemsize:
        raise PickleError(f"numpy scalar of {resolved} with {type(data).__name__} data")
    return np.frombuffer(data, resolved)[0]


class NumpyArray(np.ndarray):
    """A numpy array from a pickle; its state (shape, dtype, data) is checked before numpy restores it."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # (version, shape, dtype, is_fortran, data)
        if not (isinstance(state, tuple) and len(state) == 4):
            raise PickleError("malformed numpy array state")
        shape, dtype, fortran, data = state
        shape, dtype = _check_ints(shape, "numpy shape"), _resolve_dtype(dtype)
        if any(n < 0 for n in shape):
            raise PickleError(f"numpy array of negative shape {shape}")
        count = int(np.prod(shape, dtype=np.int64))
        if dtype.hasobject:
            ok = isinstance(data, list) and len(data) == count
        else:
            ok = isinstance(data, (bytes, bytearray)) and len(data) == count * dtype.itemsize
        if not ok:
            raise PickleError(f"numpy array of shape {shape} and dtype {dtype} with data that does not fit")
        super().__setstate__((shape, dtype, bool(fortran), data))


def _numpy_reconstruct(subtype: Any, shape: Any, typecode: Any) -> Any:
    # ndarray.__reduce__: _reconstruct(ndarray, (0,), b"b"), then BUILD restores shape, dtype and data.
    if not (isinstance(subtype, _Safe) and subtype._name == "numpy.ndarray"):
        return _placeholder_class("numpy.core.multiarray._reconstruct")(subtype, shape, typecode)
    return np.ndarray.__new__(NumpyArray, (0,), np.uint8)


def _numpy_ndarray(*_: Any) -> Any:
    raise PickleError("numpy.ndarray(...) called directly; pickles of arrays go through _reconstruct")


_TORCH_UTILS = ("torch._utils", "torch._tensor", "torch")
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_BUILTINS = ("builtins", "__builtin__")

_ALLOWED: dict[tuple[str, str], Any] = {
    **{(m, "_rebuild_tensor_v2"): rebuild_tensor for m in _TORCH_UTILS},
    **{(m, "_rebuild_tensor"): rebuild_tensor for m in _TORCH_UTILS},
    **{(m, "_rebuild_parameter"): _rebuild_parameter for m in _TORCH_UTILS},
    **{(m, "_rebuild_parameter_with_state"): _rebuild_parameter for m in _TORCH_UTILS},
    **{(m, "_rebuild_from_type_v2"): _rebuild_from_type_v2 for m in _TORCH_UTILS},
    **{(m, "_rebuild_device_tensor_from_numpy"): _rebuild_from_numpy for m in _TORCH_UTILS},
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Size"): _container(tuple),
    **{(m, name): _container(kind) for m in _BUILTINS for name, kind in
       (("dict", dict), ("list", list), ("tuple", tuple), ("set", set), ("frozenset", frozenset))},
    **{(m, "bytes"): _bytes for m in _BUILTINS},
    **{(m, "bytearray"): _bytearray for m in _BUILTINS},
    **{(m, "scalar"): _numpy_scalar for m in _NUMPY_CORE},
    **{(m, "_reconstruct"): _numpy_reconstruct for m in _NUMPY_CORE},
    ("numpy", "dtype"): NumpyDtype,
    ("numpy", "ndarray"): _numpy_ndarray,
}
# Types handed out as themselves: builtin C types whose attributes a pickle cannot change.
_TYPES: dict[tuple[str, str], type] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds data only; see the module docstring for what each global becomes.

    ``load_storage(dtype, key, numel)`` returns the 1-D numpy array of a ``("storage", ...)`` persistent id.
    """

    def __init__(self, file: Any, load_storage: Optional[Callable[[np.dtype, str, int, tuple], np.ndarray]] = None):
        super().__init__(file)
        self._load_storage = load_storage
        self._placeholders: dict[str, type] = {}
        self._safe = {key: _Safe(".".join(key), fn) for key, fn in _ALLOWED.items()}

    def find_class(self, module: str, name: str) -> Any:
        key = (str(module), str(name))
        if key in self._safe:
            return self._safe[key]
        if key in _TYPES:
            return _TYPES[key]
        if key[0] == "torch" and key[1] in STORAGE_DTYPES:
            return StorageType(key[1], STORAGE_DTYPES[key[1]])
        global_name = f"{key[0]}.{key[1]}"
        if global_name not in self._placeholders:
            self._placeholders[global_name] = _placeholder_class(global_name)
        return self._placeholders[global_name]

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 5):
            raise PickleError(f"unknown persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, StorageType):
            raise PickleError(f"storage of unsupported type {getattr(storage_type, 'global_name', storage_type)!r}; "
                              f"supported: {', '.join('torch.' + s for s in STORAGE_DTYPES)}")
        if self._load_storage is None or type(numel) is not int or numel < 0:
            raise PickleError(f"unexpected storage {key!r} in this pickle")
        return self._load_storage(storage_type.dtype, str(key), numel, pid[5:])


def unpickle(data: bytes) -> Any:
    """Restricted unpickling of bytes that hold no storages (for tests and metadata)."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


# --- the two torch.save formats -----------------------------------------------------------------------------


def _zip_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise PickleError(f"bad zip entry {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in infos if name.endswith("data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise PickleError("the zip archive is not a torch.save file (no <name>/data.pkl record)")
        prefix = pickles[0][: -len("data.pkl")]
        big_endian = prefix + "byteorder" in infos and archive.read(prefix + "byteorder").strip() == b"big"
        file_map = np.memmap(path, dtype=np.uint8, mode="r")
        storages: dict[str, np.ndarray] = {}

        def load_storage(dtype: np.dtype, key: str, numel: int, _rest: tuple) -> np.ndarray:
            if key in storages:
                return storages[key]
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise PickleError(f"storage record data/{key} is missing")
            nbytes = numel * dtype.itemsize
            if info.file_size < nbytes:
                raise PickleError(f"storage data/{key} holds {info.file_size} bytes, {nbytes} needed")
            if info.compress_type == zipfile.ZIP_STORED:
                start = _zip_data_offset(path, info)
                if start + nbytes > file_map.shape[0]:
                    raise PickleError(f"storage data/{key} runs past the end of the file (truncated?)")
                raw = file_map[start : start + nbytes]
            else:
                raw = np.frombuffer(archive.read(info)[:nbytes], np.uint8)
            array = raw.view(dtype.newbyteorder(">")).astype(dtype) if big_endian else raw.view(dtype)
            storages[key] = array
            return array

        with archive.open(pickles[0]) as f:
            return RestrictedUnpickler(f, load_storage).load()


def _load_legacy(path: Path) -> Any:
    size = path.stat().st_size
    with open(path, "rb") as f:
        storages: dict[str, np.ndarray] = {}

        def load_storage(dtype: np.dtype, key: str, numel: int, rest: tuple) -> np.ndarray:
            if key not in storages:
                if numel * dtype.itemsize > size:
                    raise PickleError(f"storage {key} claims {numel} elements, more than the file holds")
                storages[key] = np.empty(numel, dtype)
            root = storages[key]
            view = rest[0] if rest else None
            if view is None:
                return root
            # (view_key, offset, size): a storage view, written by PyTorch before 1.0.
            if not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int for v in view[1:])):
                raise PickleError(f"malformed storage view {view!r:.80}")
            return root[view[1] : view[1] + view[2]]

        if RestrictedUnpickler(f).load() != _LEGACY_MAGIC:
            raise PickleError("not a torch.save file (neither a zip archive nor the legacy magic number)")
        if RestrictedUnpickler(f).load() != _LEGACY_PROTOCOL:
            raise PickleError("unsupported legacy torch.save protocol version")
        RestrictedUnpickler(f).load()  # sys_info: endianness and type sizes of the writer
        result = RestrictedUnpickler(f, load_storage).load()
        keys = RestrictedUnpickler(f).load()
        if not isinstance(keys, list):
            raise PickleError("the legacy storage key list is missing")
        for key in keys:
            storage = storages.get(str(key))
            head = f.read(8)
            if storage is None or len(head) < 8:
                raise PickleError(f"storage {key} is missing or the file is truncated")
            (numel,) = struct.unpack("<q", head)
            if numel != storage.shape[0] or f.readinto(memoryview(storage.view(np.uint8))) != storage.nbytes:
                raise PickleError(f"storage {key}: the file is truncated or its sizes disagree")
        return result


def load_torch_file(path: os.PathLike) -> Any:
    """The object a ``torch.save`` file holds, tensors as numpy arrays and unknown objects as placeholders.

    Raises ``PickleError`` (a ``ValueError``) for malformed or truncated files. Never imports torch or any
    module the file names, and never calls anything but the data-building functions listed above.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        if head.startswith(b"PK\x03\x04"):
            raise PickleError("it is a zip archive (torch.save format) that is truncated or corrupt")
        if len(head) > 262 and head[257:262] == b"ustar":
            raise PickleError("this is PyTorch's pre-1.0 tar format, which sdjax does not read; "
                              "re-save it with a recent torch.save or convert it to .safetensors")
        return _load_legacy(path)
    except PickleError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, TypeError, AttributeError,
            KeyError, IndexError, UnicodeDecodeError, MemoryError, OSError, ValueError, RecursionError) as e:
        message = str(e).splitlines()[0] if str(e) else ""
        raise PickleError(f"{type(e).__name__}: {message[:200]}") from None
