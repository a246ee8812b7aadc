"""Prompts as people write them: weighting syntax, ``BREAK``, long prompts and textual-inversion tokens.

Host side only (numpy): a prompt becomes token ids and one weight per token, in chunks of 77 tokens
(BOS, 75 prompt tokens, EOS, padding), which ``sdjax.generate.encode_prompts`` encodes chunk by chunk
and weights. Three syntaxes (``SYNTAXES``):

* ``"a1111"`` (default), AUTOMATIC1111's emphasis, as its ``parse_prompt_attention`` reads it: ``(text)``
  multiplies the weight by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` multiplies it by 1.3; brackets
  nest (weights multiply), ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters and any other
  backslash is dropped, unmatched closing brackets are literal text and unclosed opening brackets apply to
  the rest of the prompt. ``BREAK`` (capitals, a whole word) ends the current 77-token chunk. As in A1111,
  a ``BREAK`` inside brackets is weighted with its bracket like any text, and only a ``BREAK`` whose weight
  stays exactly -1 breaks: inside ``(...)`` it becomes the word "BREAK" with weight -1.1 (``[...]``: -1/1.1),
  encoded as text. The weights are applied as A1111's "Original" emphasis does: the encoder's output is
  multiplied by each token's weight and rescaled to its original mean, per prompt and chunk. Prompt editing
  (``[a:b:0.5]``) and alternation (``[a|b]``) are not supported (read as emphasis and literal text); a
  malformed weight such as ``(a:1.2.3)``, which stops A1111 with an error, is literal text.
* ``"compel"``, compel's syntax (``sdjax.prompt_compel``: ``word++``, ``(words)0.8``, ``.blend()``,
  ``.and()``), weighted as compel 2.x's ``Compel`` does with its defaults: a chunk's tokens of weight w != 1
  become ``empty + (z - empty) * w`` (``empty``: the encoded empty prompt); then each fragment weighted
  below 1 is also encoded with its tokens masked out of the encoder's attention, and the prompt's encoding
  is lerped towards each such re-encoding with weight ``tan((1 - w) * pi / 2)`` (all normalised to sum 1).
  ``.blend()`` mixes the encodings of its prompts; ``.and()`` lays its prompts end to end (each starting a
  chunk), each weighted against the empty prompt. These extra encodings are ``Variants``. compel itself
  truncates prompts at 75 tokens by default; sdjax chunks them as below instead, and masks a down-weighted
  fragment as compel does without truncation (``truncate_long_prompts=False``): from its first to its last
  token, chunk boundaries in between included except each chunk's first and last position. So a long
  prompt matches compel's ``truncate_long_prompts=False`` wherever both cut the chunks at the same places
  (compel cuts at the last sentence, phrase or word end within 75 tokens, sdjax by A1111's rule below).
* ``"plain"``: the text as it is (no weighting, no ``BREAK``), long prompts still chunked.

Long prompts are cut into chunks of 75 tokens as A1111 does: a chunk that fills up within 20 tokens
after a comma ends at that comma, the rest moving to the next chunk, and a textual-inversion embedding
is never split between chunks. The chunk count is rounded up to a bucket (``chunk_bucket``), and so is
the variant count (``variant_bucket``), so prompts of similar length share one compiled program.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Sequence

import numpy as np

from sdjax.prompt_compel import Part  # noqa: F401  (what parse_compel returns)
from sdjax.prompt_compel import parse as parse_compel

SYNTAXES = ("a1111", "compel", "plain")
CHUNK_TOKENS = 75  # prompt tokens per chunk, besides BOS and EOS
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"
UP, DOWN = 1.1, 1 / 1.1  # A1111's round and square bracket multipliers
BREAK_WEIGHT = -1.0  # the weight A1111 gives a BREAK: only a BREAK still weighted -1 breaks the chunk


@dataclasses.dataclass(frozen=True)
class Fragment:
    """A run of prompt text with one weight; ``is_break`` marks a ``BREAK`` that ends the chunk (A1111's
    "BREAK" of weight exactly -1; its text is not encoded)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


@dataclasses.dataclass(frozen=True)
class Embedding:
    """A textual-inversion token: its name, its vectors (n, D) and the first of its n token ids (past the
    tokenizer's vocabulary: rows of the extra embedding table); ``name_ids`` are the ids the name
    tokenizes to, which a prompt is searched for."""

    name: str
    vectors: np.ndarray
    first_id: int
    name_ids: tuple[int, ...]

    @property
    def ids(self) -> list[int]:
        return list(range(self.first_id, self.first_id + len(self.vectors)))


@dataclasses.dataclass(frozen=True)
class Variants:
    """compel's extra encodings of a batch of B prompts (M per prompt, k chunks): ``ids`` (B, M, 77k) int32,
    ``weights`` (B, M, 77k) float32 and ``masks`` (B, M, 77k) bool (False: the encoder's attention skips
    that token) of each, and ``mix`` (B, 1 + M, k) float32: per chunk, the coefficient of the prompt's own
    encoding, then of each variant's. A chunk mixed (1, 0, ..., 0) is the prompt's own encoding, unchanged.
    ``sdjax.generate`` registers it as a pytree."""

    ids: np.ndarray
    weights: np.ndarray
    masks: np.ndarray
    mix: np.ndarray


@dataclasses.dataclass(frozen=True)
class TokenizedPrompts:
    """Token ids (B, 77k) int32 and per-token weights (B, 77k) float32 of a batch of prompts, k chunks each
    (short prompts padded with empty chunks); ``chunks`` the chunk count each prompt needs itself;
    ``variants`` compel's extra encodings (None when no prompt of the batch needs any)."""

    ids: np.ndarray
    weights: np.ndarray
    chunks: tuple[int, ...]
    variants: Optional[Variants] = None


# --- parsing -------------------------------------------------------------------------------------------------

_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_A1111_SPECIAL = "\\()[]:"


def _text_pieces(text: str) -> list[list]:
    """A run of text as A1111 appends it: split at each BREAK, which becomes ["BREAK", -1]."""
    out: list[list] = []
    for i, part in enumerate(_BREAK.split(text)):
        if i:
            out.append(["BREAK", BREAK_WEIGHT])
        out.append([part, 1.0])
    return out


def parse_a1111(text: str) -> list[Fragment]:
    """AUTOMATIC1111's emphasis syntax -> fragments with weights (see the module docstring)."""
    pieces: list[list] = []  # [text, weight]
    rounds: list[int] = []  # where each open "(" / "[" started, in pieces
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            escaped = i + 1 < n and text[i + 1] in "()[]\\"
            pieces.append([text[i + 1] if escaped else "", 1.0])  # A1111 drops a lone backslash
            i += 2 if escaped else 1
        elif c == "(":
            rounds.append(len(pieces))
            i += 1
        elif c == "[":
            squares.append(len(pieces))
            i += 1
        elif c == ":":
            match = _WEIGHT_CLOSE.match(text, i)
            weight = _float(match.group(1)) if match else None
            if weight is not None and rounds:
                scale(rounds.pop(), weight)
            else:
                pieces.extend(_text_pieces(match.group(0) if match else ":"))
            i = match.end() if match else i + 1
        elif c == ")" and rounds:
            scale(rounds.pop(), UP)
            i += 1
        elif c == "]" and squares:
            scale(squares.pop(), DOWN)
            i += 1
        elif c in ")]":
            pieces.append([c, 1.0])
            i += 1
        else:
            end = i
            while end < n and text[end] not in _A1111_SPECIAL:
                end += 1
            pieces.extend(_text_pieces(text[i:end]))
            i = end
    for start in rounds:
        scale(start, UP)
    for start in squares:
        scale(start, DOWN)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:  # runs of equal weight join, BREAKs included (as in A1111)
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [Fragment(t, w, t == "BREAK" and w == BREAK_WEIGHT) for t, w in merged]


def _float(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def parse(text: str, syntax: str = "a1111") -> list[Fragment]:
    """The fragments of ``text`` in ``syntax`` (one of ``SYNTAXES``); a compel prompt that blends or joins
    several prompts has no single list of fragments (``parse_compel`` gives its parts)."""
    check_syntax(syntax)
    if syntax == "a1111":
        return parse_a1111(text)
    if syntax == "compel":
        parts = parse_compel(text)
        if len(parts) != 1 or len(parts[0].prompts) != 1 or parts[0].weight != 1.0:
            raise ValueError(f"compel prompt {text[:60]!r} combines several prompts; parse_compel gives its parts")
        return [Fragment(t, w) for t, w in parts[0].prompts[0]]
    return [Fragment(text, 1.0)]


def check_syntax(syntax: str) -> str:
    if syntax not in SYNTAXES:
        raise ValueError(f"prompt_syntax={syntax!r} is not known; accepted: {', '.join(map(repr, SYNTAXES))}")
    return syntax


# --- chunking ------------------------------------------------------------------------------------------------


def chunk_bucket(chunks: int) -> int:
    """Compiled chunk counts: 1, 2, 3, 4, then multiples of 4 (so most prompts share a program)."""
    return chunks if chunks <= 4 else 4 * math.ceil(chunks / 4)


def variant_bucket(variants: int) -> int:
    """Compiled variant counts (compel's extra encodings per prompt): 0, then multiples of 4."""
    return 4 * math.ceil(variants / 4)


def _units(ids: list[int], embeddings: Sequence[Embedding]) -> list[list[int]]:
    """Token ids -> units: single tokens, or an embedding's ids where its name's token ids appear."""
    by_first: dict[int, list[Embedding]] = {}
    for emb in sorted(embeddings, key=lambda e: -len(e.name_ids)):
        by_first.setdefault(emb.name_ids[0], []).append(emb)
    units, position = [], 0
    while position < len(ids):
        for emb in by_first.get(ids[position], ()):
            if tuple(ids[position:position + len(emb.name_ids)]) == emb.name_ids:
                units.append(emb.ids)
                position += len(emb.name_ids)
                break
        else:
            units.append([ids[position]])
            position += 1
    return units


def _chunked(tokenizer, fragments: Sequence[Fragment], embeddings: Sequence[Embedding] = ()
             ) -> tuple[list[int], list[float], list[int]]:
    """Ids, weights and owners (the fragment each token came from; -1 for BOS, EOS and padding) of one
    parsed prompt, 77 per chunk, by A1111's chunking rules."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.get_vocab().get(",</w>")
    texts = [f.text for f in fragments if not f.is_break]
    encoded = iter(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
    out: tuple[list[int], list[float], list[int]] = ([], [], [])
    chunk: tuple[list, list, list] = ([], [], [])  # this chunk's ids, weights, owners
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        fill = CHUNK_TOKENS - len(chunk[0])
        for total, part, ends in zip(out, chunk, ((bos, eos, pad), (1.0, 1.0, 1.0), (-1, -1, -1))):
            total += [ends[0], *part, ends[1]] + [ends[2]] * fill
        chunk, last_comma = ([], [], []), -1

    for index, fragment in enumerate(fragments):
        if fragment.is_break:
            close()
            continue
        for unit in _units(next(encoded), embeddings):
            if unit[0] == comma:
                last_comma = len(chunk[0])
            elif len(chunk[0]) == CHUNK_TOKENS and last_comma != -1 and len(chunk[0]) - last_comma <= COMMA_BACKTRACK:
                moved = tuple(part[last_comma + 1:] for part in chunk)
                chunk = tuple(part[:last_comma + 1] for part in chunk)
                close()
                chunk = tuple(list(part) for part in moved)
            if len(chunk[0]) == CHUNK_TOKENS or len(chunk[0]) + len(unit) > CHUNK_TOKENS:
                close()
            for part, values in zip(chunk, (unit, [float(fragment.weight)] * len(unit), [index] * len(unit))):
                part += values
    if chunk[0] or not out[0]:
        close()
    return out


def prompt_chunks(tokenizer, fragments: Sequence[Fragment], embeddings: Sequence[Embedding] = ()
                  ) -> list[tuple[list[int], list[float]]]:
    """(ids, weights) of each 77-token chunk of one parsed prompt, by A1111's chunking rules."""
    ids, weights, _ = _chunked(tokenizer, fragments, embeddings)
    return [(ids[k:k + 77], weights[k:k + 77]) for k in range(0, len(ids), 77)]


# --- compel's encodings ----------------------------------------------------------------------------------------


def _compel_encodings(tokenizer, text: str, embeddings: Sequence[Embedding], empty_ids: Sequence[int]) -> list:
    """compel's encodings of one prompt, each (ids, weights, attention mask, a coefficient per chunk), the
    first the prompt's own: per part of ``parse_compel``, each blended prompt unmasked and with each
    down-weighted fragment masked (see the module docstring); parts follow each other chunk by chunk."""
    parts = []  # per part: (first chunk, chunk count, its encodings with one coefficient each)
    start = 0
    for part in parse_compel(text):
        members = [_chunked(tokenizer, [Fragment(t, w) for t, w in prompt], embeddings) for prompt in part.prompts]
        count = max(len(ids) for ids, _, _ in members) // 77
        blend = np.asarray(part.blend, np.float32)
        blend = blend / blend.sum(dtype=np.float32) if part.normalize else blend
        encodings = []
        for (ids, weights, owners), prompt, share in zip(members, part.prompts, blend):
            fill = count * 77 - len(ids)
            ids = np.asarray(ids + list(empty_ids) * (fill // 77), np.int32)
            weights = (np.asarray(weights + [1.0] * fill) * part.weight).astype(np.float32)
            owners = np.asarray(owners + [-1] * fill)
            masks, lerp = [np.ones(len(ids), bool)], [1.0]
            for index, (_, weight) in enumerate(prompt):
                where = np.flatnonzero(owners == index)
                if weight < 1 and where.size:  # the fragment's span masked, each chunk's ends kept
                    mask = np.ones(len(ids), bool)
                    mask[where[0]:where[-1] + 1] = False
                    mask[0::77] = mask[76::77] = True
                    masks.append(mask)
                    lerp.append(math.tan((1.0 - max(1e-5, weight)) * math.pi / 2))
            lerp = np.asarray(lerp, np.float32)
            lerp = lerp / lerp.sum(dtype=np.float32)
            encodings += [(ids, weights, mask, float(share) * float(c)) for mask, c in zip(masks, lerp)]
        parts.append((start, count, encodings))
        start += count
    own = [np.concatenate([encodings[0][k] for _, _, encodings in parts]) for k in range(3)]
    own.append(np.concatenate([np.full(count, encodings[0][3], np.float32) for _, count, encodings in parts]))
    out = [tuple(own)]
    for first, count, encodings in parts:
        for ids, weights, mask, coefficient in encodings[1:]:  # over the whole prompt: elsewhere its own
            spread = [x.copy() for x in own[:3]] + [np.zeros(start, np.float32)]
            for whole, this in zip(spread, (ids, weights, mask)):
                whole[first * 77:(first + count) * 77] = this
            spread[3][first:first + count] = coefficient
            out.append(tuple(spread))
    return out


# --- batches -------------------------------------------------------------------------------------------------


def tokenize_prompts(tokenizer, prompts: Sequence[str], syntax: str = "a1111",
                     embeddings: Sequence[Embedding] = (), min_chunks: int = 1, min_variants: int = 0
                     ) -> TokenizedPrompts:
    """Ids and weights of ``prompts`` (B, 77k): every prompt padded with empty chunks (BOS, EOS, padding;
    weight 1) to the bucket (``chunk_bucket``) of the longest one, or of ``min_chunks`` if more; compel's
    variants likewise padded to the bucket (``variant_bucket``) of the most any prompt needs, or of
    ``min_variants``, with unused ones (coefficient 0)."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    check_syntax(syntax)
    empty = _chunked(tokenizer, [Fragment("")])
    if syntax == "compel":
        rows = [_compel_encodings(tokenizer, p, embeddings, empty[0]) for p in prompts]
    else:
        rows = [[(*_chunked(tokenizer, parse(p, syntax), embeddings)[:2], None, None)] for p in prompts]
    needed = tuple(len(row[0][0]) // 77 for row in rows)
    count = chunk_bucket(max(min_chunks, *needed))
    width = variant_bucket(max(min_variants, *(len(row) - 1 for row in rows)))
    ids = np.zeros((len(prompts), 1 + width, count * 77), np.int32)
    weights = np.ones((len(prompts), 1 + width, count * 77), np.float32)
    masks = np.ones((len(prompts), 1 + width, count * 77), bool)
    mix = np.zeros((len(prompts), 1 + width, count), np.float32)
    for b, row in enumerate(rows):
        ids[b] = np.tile(np.asarray(empty[0], np.int32), count)
        for v, (row_ids, row_weights, row_mask, coefficients) in enumerate(row):
            size = len(row_ids)
            ids[b, v, :size], weights[b, v, :size] = row_ids, row_weights
            if row_mask is not None:
                masks[b, v, :size], mix[b, v, :size // 77] = row_mask, coefficients
        mix[b, 0, needed[b]:] = 1.0  # the empty chunks are the prompt's own encoding
        if len(row) == 1:
            mix[b, 0] = 1.0
    own = np.ascontiguousarray
    variants = Variants(own(ids[:, 1:]), own(weights[:, 1:]), own(masks[:, 1:]), mix) if width else None
    return TokenizedPrompts(own(ids[:, 0]), own(weights[:, 0]), needed, variants)


def tokenize_pair(tokenizer, prompts: Sequence[str], negatives: Sequence[str], syntax: str = "a1111",
                  embeddings: Sequence[Embedding] = ()) -> tuple[TokenizedPrompts, TokenizedPrompts]:
    """Prompts and negative prompts tokenized to the same shapes (chunks and variants), as classifier-free
    guidance encodes them in one batch."""
    cond = tokenize_prompts(tokenizer, prompts, syntax, embeddings)
    uncond = tokenize_prompts(tokenizer, negatives, syntax, embeddings)
    shape = lambda t: (t.ids.shape[1] // 77, 0 if t.variants is None else t.variants.ids.shape[1])  # noqa: E731
    chunks, width = (max(a, b) for a, b in zip(shape(cond), shape(uncond)))
    if shape(cond) != (chunks, width):
        cond = tokenize_prompts(tokenizer, prompts, syntax, embeddings, chunks, width)
    if shape(uncond) != (chunks, width):
        uncond = tokenize_prompts(tokenizer, negatives, syntax, embeddings, chunks, width)
    return cond, uncond
