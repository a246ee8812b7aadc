"""Prompts as people write them: weighting syntax, ``BREAK``, long prompts and textual-inversion tokens.

Host side only (numpy): a prompt becomes token ids and one weight per token, in chunks of 77 tokens
(BOS, 75 prompt tokens, EOS, padding), which ``sdjax.generate.encode_prompts`` encodes chunk by chunk
and weights. Three syntaxes (``SYNTAXES``):

* ``"a1111"`` (default), AUTOMATIC1111's emphasis: ``(text)`` multiplies the weight by 1.1, ``[text]``
  divides it by 1.1, ``(text:1.3)`` multiplies it by 1.3; brackets nest (weights multiply), ``\\(``
  ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters, unmatched closing brackets are literal text and
  unclosed opening brackets apply to the rest of the prompt. ``BREAK`` (capitals, a whole word) ends the
  current 77-token chunk. The weights are applied as A1111's "Original" emphasis does: the encoder's
  output is multiplied by each token's weight and rescaled to its original mean, per prompt and chunk.
  Prompt editing (``[a:b:0.5]``) and alternation (``[a|b]``) are not supported (read as emphasis and
  literal text). Unlike A1111, ``BREAK`` inside brackets still breaks the chunk.
* ``"compel"``, the weight syntax of compel (diffusers' usual prompt weighting): ``word+`` / ``word++``
  (x1.1 per ``+``), ``word-`` (x0.9 per ``-``), ``(several words)+``, ``(text)1.3``; nesting multiplies.
  Weights are applied as compel does for up-weighting: ``empty + (z - empty) * w``, with ``empty`` the
  encoding of the empty prompt. Compel down-weights by lerping against re-encodings with the fragment
  masked out; sdjax applies the same ``empty``-delta rule to weights below 1 (a close, not equal, result).
  ``.blend()``, ``.and()`` and ``.swap()`` are not supported.
* ``"plain"``: the text as it is (no weighting, no ``BREAK``), long prompts still chunked.

Long prompts are cut into chunks of 75 tokens as A1111 does: a chunk that fills up within 20 tokens
after a comma ends at that comma, the rest moving to the next chunk, and a textual-inversion embedding
is never split between chunks. The chunk count is rounded up to a bucket (``chunk_bucket``) so prompts
of similar length share one compiled program.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Sequence

import numpy as np

SYNTAXES = ("a1111", "compel", "plain")
CHUNK_TOKENS = 75  # prompt tokens per chunk, besides BOS and EOS
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"
UP, DOWN = 1.1, 1 / 1.1  # A1111's round and square bracket multipliers
COMPEL_UP, COMPEL_DOWN = 1.1, 0.9


@dataclasses.dataclass(frozen=True)
class Fragment:
    """A run of prompt text with one weight; ``is_break`` marks a ``BREAK`` (text and weight unused)."""

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
class TokenizedPrompts:
    """Token ids (B, 77k) int32 and per-token weights (B, 77k) float32 of a batch of prompts, k chunks each
    (short prompts padded with empty chunks); ``chunks`` the chunk count each prompt needs itself."""

    ids: np.ndarray
    weights: np.ndarray
    chunks: tuple[int, ...]


# --- parsing -------------------------------------------------------------------------------------------------

_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_A1111_SPECIAL = "\\()[]:"


def _merged(fragments: list[Fragment]) -> list[Fragment]:
    """Neighbouring fragments of equal weight joined (breaks never join)."""
    out: list[Fragment] = []
    for f in fragments:
        if out and not f.is_break and not out[-1].is_break and out[-1].weight == f.weight:
            out[-1] = Fragment(out[-1].text + f.text, f.weight)
        else:
            out.append(f)
    return out


def _with_breaks(text: str) -> list[list]:
    parts = _BREAK.split(text)
    out: list[list] = []
    for i, part in enumerate(parts):
        if i:
            out.append([None, 1.0])  # a BREAK
        out.append([part, 1.0])
    return out


def parse_a1111(text: str) -> list[Fragment]:
    """AUTOMATIC1111's emphasis syntax -> fragments with weights (see the module docstring)."""
    pieces: list[list] = []  # [text or None for BREAK, weight]
    rounds: list[int] = []  # where each open "(" / "[" started, in pieces
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1] if i + 1 < n else ""
            if nxt in ("(", ")", "[", "]", "\\"):
                pieces.append([nxt, 1.0])
                i += 2
            else:
                pieces.append(["\\", 1.0])
                i += 1
        elif c == "(":
            rounds.append(len(pieces))
            i += 1
        elif c == "[":
            squares.append(len(pieces))
            i += 1
        elif c == ":":
            match = _WEIGHT_CLOSE.match(text, i)
            weight = _float(match.group(1)) if match else None
            if match and weight is not None and rounds:
                scale(rounds.pop(), weight)
                i = match.end()
            elif match:
                pieces.extend(_with_breaks(match.group(0)))
                i = match.end()
            else:
                pieces.append([":", 1.0])
                i += 1
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
            pieces.extend(_with_breaks(text[i:end]))
            i = end
    for start in rounds:
        scale(start, UP)
    for start in squares:
        scale(start, DOWN)
    fragments = [Fragment("", 1.0, True) if t is None else Fragment(t, w) for t, w in pieces]
    return _merged(fragments) or [Fragment("", 1.0)]


def _float(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


_COMPEL_TOKEN = re.compile(r"\\[()\\]|\(|\)(?:[+-]+|\d*\.?\d+)?|[^\s()\\]+|\s+|\\")
_COMPEL_WORD = re.compile(r"^(.*?[^+-])?([+-]+)$")


def _compel_factor(suffix: str) -> float:
    if not suffix:
        return 1.0
    if suffix[0] in "+-":
        return COMPEL_UP ** suffix.count("+") * COMPEL_DOWN ** suffix.count("-")
    return float(suffix)


def parse_compel(text: str) -> list[Fragment]:
    """compel's weight syntax -> fragments with weights (see the module docstring)."""
    pieces: list[list] = []
    opens: list[int] = []
    for match in _COMPEL_TOKEN.finditer(text):
        token = match.group(0)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token == "(":
            opens.append(len(pieces))
        elif token.startswith(")"):
            if not opens:
                pieces.append([token, 1.0])
                continue
            factor = _compel_factor(token[1:])
            for piece in pieces[opens.pop():]:
                piece[1] *= factor
        elif token.isspace():
            pieces.append([token, 1.0])
        else:
            word = _COMPEL_WORD.match(token)
            if word and word.group(1):
                pieces.append([word.group(1), _compel_factor(word.group(2))])
            else:
                pieces.append([token, 1.0])
    if opens:
        raise ValueError(f"prompt {text[:60]!r} has {len(opens)} unclosed '(' (compel syntax: '(text)1.2', "
                         "'(text)++'; write \\( for a literal bracket)")
    return _merged([Fragment(t, w) for t, w in pieces]) or [Fragment("", 1.0)]


def parse(text: str, syntax: str = "a1111") -> list[Fragment]:
    """The fragments of ``text`` in ``syntax`` (one of ``SYNTAXES``)."""
    check_syntax(syntax)
    if syntax == "a1111":
        return parse_a1111(text)
    if syntax == "compel":
        return parse_compel(text)
    return [Fragment(text, 1.0)]


def check_syntax(syntax: str) -> str:
    if syntax not in SYNTAXES:
        raise ValueError(f"prompt_syntax={syntax!r} is not known; accepted: {', '.join(map(repr, SYNTAXES))}")
    return syntax


# --- chunking ------------------------------------------------------------------------------------------------


def chunk_bucket(chunks: int) -> int:
    """Compiled chunk counts: 1, 2, 3, 4, then multiples of 4 (so most prompts share a program)."""
    return chunks if chunks <= 4 else 4 * math.ceil(chunks / 4)


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


def prompt_chunks(tokenizer, fragments: Sequence[Fragment], embeddings: Sequence[Embedding] = ()
                  ) -> list[tuple[list[int], list[float]]]:
    """(ids, weights) of each 77-token chunk of one parsed prompt, by A1111's chunking rules."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.get_vocab().get(",</w>")
    texts = [f.text for f in fragments if not f.is_break]
    encoded = iter(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        fill = CHUNK_TOKENS - len(ids)
        chunks.append(([bos, *ids, eos] + [pad] * fill, [1.0, *weights, 1.0] + [1.0] * fill))
        ids, weights, last_comma = [], [], -1

    for fragment in fragments:
        if fragment.is_break:
            close()
            continue
        for unit in _units(next(encoded), embeddings):
            if unit[0] == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK_TOKENS and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = list(moved[0]), list(moved[1])
            if len(ids) == CHUNK_TOKENS or len(ids) + len(unit) > CHUNK_TOKENS:
                close()
            ids += unit
            weights += [float(fragment.weight)] * len(unit)
    if ids or not chunks:
        close()
    return chunks


def tokenize_prompts(tokenizer, prompts: Sequence[str], syntax: str = "a1111",
                     embeddings: Sequence[Embedding] = (), min_chunks: int = 1) -> TokenizedPrompts:
    """Ids and weights of ``prompts`` (B, 77k): every prompt padded with empty chunks (BOS, EOS, padding;
    weight 1) to the bucket (``chunk_bucket``) of the longest one, or of ``min_chunks`` if more."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    per_prompt = [prompt_chunks(tokenizer, parse(p, syntax), embeddings) for p in prompts]
    count = chunk_bucket(max(min_chunks, *(len(c) for c in per_prompt)))
    empty = prompt_chunks(tokenizer, [Fragment("")])[0]
    ids = np.zeros((len(prompts), count * 77), np.int32)
    weights = np.ones((len(prompts), count * 77), np.float32)
    for row, chunks in enumerate(per_prompt):
        chunks = chunks + [empty] * (count - len(chunks))
        ids[row] = np.concatenate([np.asarray(c[0], np.int32) for c in chunks])
        weights[row] = np.concatenate([np.asarray(c[1], np.float64) for c in chunks]).astype(np.float32)
    return TokenizedPrompts(ids, weights, tuple(len(c) for c in per_prompt))
