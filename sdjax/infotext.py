"""AUTOMATIC1111-compatible PNG "infotext" (the ``parameters`` text chunk), written and read.

The text has this shape (see ``create_infotext`` in A1111's ``modules/processing.py`` and
``parse_generation_parameters`` in ``modules/infotext_utils.py``)::

    <prompt, possibly several lines>
    Negative prompt: <negative prompt, possibly several lines>
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, ...

Rules followed, as A1111 applies them:

* The whole text is stripped and split on ``"\\n"``.  The last line is the parameters line only if
  it holds at least 3 ``key: value`` pairs; otherwise it belongs to the prompt (this module then
  raises ``ValueError``, since there are no parameters).  Every other line is stripped of
  surrounding whitespace; lines before the first one starting with ``Negative prompt:`` form the
  prompt, that line and the following ones the negative prompt (any line starting with the label
  loses it, so :func:`format_infotext` refuses such prompt lines).  Whitespace at the ends of
  prompt lines is therefore not preserved.
* Pairs are joined with ``", "``.  A value is quoted with JSON (``ensure_ascii=False``) when it
  contains ``,``, ``:`` or a newline (A1111's ``quote()``); this module also quotes values with
  ``"``, surrounding whitespace or no characters at all, which A1111's reader unquotes the same
  way.  A quoted value is unquoted with ``json.loads`` when reading.
* ``Size: WxH`` is split into width and height.  Numbers are written like A1111's web UI writes
  them: ``7`` for a CFG scale of 7.0, ``7.5`` otherwise.
* LoRAs are recorded as ``<lora:name:multiplier>`` tags in the prompt (A1111's extra-network
  syntax; the multiplier is optional and means 1.0) plus a ``Lora hashes: "name: hash, ..."``
  field whose names have ``:`` and ``,`` removed.  :class:`GenerationParameters` keeps ``prompt``
  free of these tags: :func:`format_infotext` appends `` <lora:name:scale>`` for each LoRA to the
  prompt, and :func:`parse_infotext` removes every ``<lora:name>`` / ``<lora:name:number>`` tag
  from the prompt (then strips the ends of each prompt line) into ``loras``, taking hashes from
  ``Lora hashes`` by name.  Tags with more parts (``<lora:name:0.8:0.5>``, ``te=``...) stay in the
  prompt.  If an entry of ``Lora hashes`` names no extracted tag, the field is kept verbatim in
  ``extra`` and no hash is attached.
* A missing ``RNG`` means A1111's default ``GPU``; it is read as ``None``.  Old-style samplers such
  as ``DPM++ 2M Karras`` (no ``Schedule type``) are kept as written.

Non-latin-1 text is stored by Pillow (as by A1111) in an ``iTXt`` chunk instead of ``tEXt``.
One infotext describes one image: pass each image's own seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import struct
from typing import Union

from PIL import Image, PngImagePlugin

__all__ = ["LoraRecord", "GenerationParameters", "format_infotext", "parse_infotext",
           "read_png_infotext", "png_info", "model_hash", "lora_hash"]

PathLike = Union[str, "os.PathLike[str]"]

# One ``key: value`` pair of the parameters line: a key of word characters, spaces, '-' and '/',
# then either a JSON-style quoted string or anything up to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:[^"\\]|\\.)+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]+")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?>")
_NEG = "Negative prompt:"
_CHUNK = 1 << 20

# Field name in the text -> GenerationParameters attribute, in A1111's create_infotext order.
_FIELDS = (("Steps", "steps"), ("Sampler", "sampler"), ("Schedule type", "schedule_type"),
           ("CFG scale", "cfg_scale"), ("Seed", "seed"), ("Size", None),
           ("Model hash", "model_hash"), ("Model", "model"),
           ("Denoising strength", "denoising_strength"), ("RNG", "rng"))
_INTS = {"steps", "seed"}
_FLOATS = {"cfg_scale", "denoising_strength"}
_KNOWN = {k for k, _ in _FIELDS} | {"Lora hashes", "Version"}


@dataclasses.dataclass(frozen=True)
class LoraRecord:
    """One LoRA applied to an image: its name as in ``<lora:name:scale>``, scale, short hash."""

    name: str
    scale: float
    hash: str | None = None


@dataclasses.dataclass(frozen=True)
class GenerationParameters:
    """The settings an A1111 infotext records for one image (``None``: not recorded)."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None
    schedule_type: str | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model: str | None = None
    model_hash: str | None = None
    loras: tuple[LoraRecord, ...] = ()
    denoising_strength: float | None = None
    rng: str | None = None
    version: str | None = None
    extra: tuple[tuple[str, str], ...] = ()


def _quote(value: str) -> str:
    if (value == "" or value != value.strip()
            or any(c in value for c in ',:"\n\r')):
        return json.dumps(value, ensure_ascii=False)
    return value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _number(name: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return str(int(value)) if value.is_integer() else repr(value)


def _lora_key(name: str) -> str:
    return name.replace(":", "").replace(",", "")


def format_infotext(params: GenerationParameters) -> str:
    """Write ``params`` as A1111 writes infotext; ``ValueError`` if it could not be read back.

    The parameters line must hold at least 3 pairs (A1111 reads a shorter last line as prompt).
    """
    lines = (params.prompt + "\n" + params.negative_prompt).split("\n")
    if any(ln.strip().startswith(_NEG) for ln in lines):
        raise ValueError(f"a prompt line may not start with {_NEG!r}")
    if _extract_loras(params.prompt)[1]:
        raise ValueError("put LoRAs in GenerationParameters.loras, not <lora:...> tags in prompt")
    prompt = params.prompt
    hashes = []
    for lora in params.loras:
        name = lora.name
        if not name or any(c in name for c in ":<>\n\r") or name != name.strip():
            raise ValueError(f"LoRA name {lora.name!r} cannot be written in a <lora:...> tag")
        prompt += f" <lora:{lora.name}:{_number('LoRA scale', lora.scale)}>"
        if lora.hash is not None:
            if not re.fullmatch(r"[^\s,:\"]+", lora.hash):
                raise ValueError(f"bad LoRA hash {lora.hash!r}")
            hashes.append(f"{_lora_key(lora.name)}: {lora.hash}")
    pairs: list[tuple[str, str]] = []
    for key, attr in _FIELDS:
        if attr is None:
            if (params.width is None) != (params.height is None):
                raise ValueError("width and height must be given together")
            if params.width is not None:
                pairs.append((key, f"{_number('width', params.width)}x"
                                   f"{_number('height', params.height)}"))
            continue
        value = getattr(params, attr)
        if value is None:
            continue
        if attr in _INTS and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{key} must be an int, got {value!r}")
        pairs.append((key, _number(key, value) if attr in _INTS | _FLOATS else str(value)))
    extra_keys = [k for k, _ in params.extra]
    if hashes:
        if "Lora hashes" in extra_keys:
            raise ValueError("'Lora hashes' given both in extra and as LoRA hashes")
        pairs.append(("Lora hashes", ", ".join(hashes)))
    for key, value in params.extra:
        reserved = key in _KNOWN and key != "Lora hashes"
        if not _KEY.fullmatch(key) or key != key.strip() or reserved:
            raise ValueError(f"extra key {key!r} is not allowed")
        pairs.append((key, str(value)))
    if params.version is not None:
        pairs.append(("Version", str(params.version)))
    if len(pairs) < 3:
        raise ValueError("an infotext needs at least 3 parameters (A1111 reads fewer as prompt)")
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in pairs)
    negative = f"\n{_NEG} {params.negative_prompt}" if params.negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def _extract_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Remove ``<lora:name>`` / ``<lora:name:number>`` tags; returns the prompt and the tags."""
    found: list[tuple[str, float]] = []

    def take(m: re.Match[str]) -> str:
        try:
            scale = 1.0 if m.group(2) is None else float(m.group(2))
        except ValueError:
            return m.group(0)
        found.append((m.group(1), scale))
        return ""

    text = _LORA_TAG.sub(take, prompt)
    if found:
        text = "\n".join(ln.strip() for ln in text.split("\n"))
    return text, found


def parse_infotext(text: str) -> GenerationParameters:
    """Read A1111-written (or :func:`format_infotext`-written) infotext.

    ``ValueError`` if the last line is not a parameters line (fewer than 3 pairs) or a typed
    field (``Steps``, ``Seed``, ``CFG scale``, ``Size``, ...) has a value of the wrong form.
    """
    *lines, last = text.strip().split("\n")
    found = _PAIR.findall(last)
    if len(found) < 3:
        raise ValueError("infotext has no parameters line (need at least 3 'key: value' pairs)")
    texts = ["", ""]  # prompt, negative prompt; joined line by line exactly as A1111 does
    which = 0
    for line in lines:
        line = line.strip()
        if line.startswith(_NEG):
            which, line = 1, line[len(_NEG):].strip()
        texts[which] += ("\n" if texts[which] else "") + line
    fields: dict[str, object] = {"negative_prompt": texts[1]}
    extra: list[tuple[str, str]] = []
    lora_hashes: str | None = None
    attrs = {k: a for k, a in _FIELDS}
    for key, raw in found:
        value = _unquote(raw)
        attr = attrs.get(key, "")
        try:
            if key == "Size":
                m = _SIZE.match(value)
                if m is None:
                    raise ValueError
                fields["width"], fields["height"] = int(m.group(1)), int(m.group(2))
            elif attr in _INTS:
                fields[attr] = int(value)
            elif attr in _FLOATS:
                fields[attr] = float(value)
            elif attr:
                fields[attr] = value
            elif key == "Version":
                fields["version"] = value
            elif key == "Lora hashes":
                lora_hashes = value
            else:
                extra.append((key, value))
        except ValueError:
            raise ValueError(f"bad value for {key!r} in infotext: {raw!r}") from None
    prompt_text, tags = _extract_loras(texts[0])
    by_name: dict[str, str] = {}
    for entry in (lora_hashes or "").split(","):
        name, sep, short = entry.partition(":")
        if sep and name.strip():
            by_name[_lora_key(name.strip())] = short.strip()
    tag_keys = {_lora_key(name) for name, _ in tags}
    matched = lora_hashes is not None and by_name.keys() <= tag_keys and bool(by_name)
    if lora_hashes is not None and not matched:
        extra.append(("Lora hashes", lora_hashes))
    loras = tuple(LoraRecord(name, scale, by_name.get(_lora_key(name)) if matched else None)
                  for name, scale in tags)
    return GenerationParameters(prompt=prompt_text, loras=loras, extra=tuple(extra),
                                **fields)  # type: ignore[arg-type]


def png_info(text: str) -> PngImagePlugin.PngInfo:
    """A ``PngInfo`` with ``text`` as the ``parameters`` chunk, for ``Image.save(pnginfo=...)``."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info


def read_png_infotext(path: PathLike) -> str:
    """The ``parameters`` text chunk (``tEXt``/``iTXt``/``zTXt``) of the PNG at ``path``.

    ``ValueError`` naming the file if it is not a PNG or has no such chunk; a missing file
    raises ``FileNotFoundError``.
    """
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise ValueError(f"{os.fspath(path)} is not a PNG file (it is {im.format})")
            text = im.text.get("parameters")  # type: ignore[attr-defined]
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{os.fspath(path)} is not a readable PNG file: {e}") from e
    if text is None:
        raise ValueError(f"{os.fspath(path)} has no 'parameters' text chunk")
    return str(text)


def _sha256(f, start: int = 0) -> str:
    digest = hashlib.sha256()
    f.seek(start)
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def model_hash(path: PathLike) -> str:
    """A1111's ``Model hash``: the first 10 hex digits of the SHA-256 of the whole file."""
    with open(path, "rb") as f:
        return _sha256(f)[:10]


def lora_hash(path: PathLike) -> str:
    """The 12-hex-digit hash A1111's Lora extension writes in ``Lora hashes``.

    For ``.safetensors`` files: the ``sshs_model_hash`` metadata entry if present (kohya-ss
    writes it), else SHA-256 of the bytes after the header (the "addnet" hash, unaffected by
    metadata edits).  For other files: SHA-256 of the whole file.
    """
    with open(path, "rb") as f:
        if os.fspath(path).lower().endswith(".safetensors"):
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) != 8 or struct.unpack("<Q", head)[0] + 8 > size:
                raise ValueError(f"{os.fspath(path)} is not a safetensors file")
            n = struct.unpack("<Q", head)[0]
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ValueError(f"{os.fspath(path)} has a bad safetensors header") from e
            meta = header.get("__metadata__") if isinstance(header, dict) else None
            if isinstance(meta, dict) and isinstance(meta.get("sshs_model_hash"), str):
                return meta["sshs_model_hash"][:12]
            return _sha256(f, 8 + n)[:12]
        return _sha256(f)[:12]
