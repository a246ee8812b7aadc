"""compel's prompt syntax, read as compel 2.x reads it.

compel parses prompts with a pyparsing grammar; pyparsing matches like a PEG (the first alternative that
matches wins, no backtracking into a choice once it has matched), so the grammar is written here as a small
recursive-descent reader with the same alternatives in the same order. What it reads:

* words (``cat``, ``cat-like``; a ``+`` / ``-`` inside a word stays part of it), whitespace, ``,`` and ``.``;
  ``\\(`` ``\\)`` ``\\"`` are literal characters (``\\,`` ``\\.`` ``\\+`` ``\\-`` ``\\=`` keep their backslash,
  as in compel);
* weights: ``word+`` / ``word--`` (x1.1 / x0.9 per sign), ``(several words)1.3``, ``(words)++``,
  ``"quoted words"0.8``, ``target.attend(1.2)``; nested weights multiply;
* ``("a prompt", "another").blend(0.7, 0.3)`` (``no_normalize`` as a last option) and
  ``("a prompt", "another").and(1, 0.5)`` (``.add`` too) at the start of the prompt;
* anything that is not one of these (an unclosed bracket, ``a=b``) becomes literal text, as in compel.

The result is compel's: neighbouring pieces of equal weight fused into one fragment with single spaces, and
the weight of a piece the product of its enclosing weights, outermost first. ``.swap()`` (cross-attention
control) and ``useLora()`` / ``withLora()`` are refused. A prompt that is only whitespace or only empty
brackets is the empty prompt (compel fails on ``()``).
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Optional

PLUS, MINUS = 1.1, 0.9  # compel's attention_plus_base and attention_minus_base
_SYNTACTIC = '()",.+-='
_SKIPPED = " \n\t\r"  # whitespace skipped before each element (pyparsing's default)
_WHITE = " \t\r\n"  # what pyparsing's White() matches
_SPACE = string.whitespace  # what free words and plain word characters exclude
_QUOTED = re.compile(r'"(?:\\"|[^"\n\r])*"')
_QUOTE_ESCAPES = re.compile(r"(\\[tnfr])|(\\[0-7]3|\\0|\\x[0-9a-fA-F]2|\\u[0-9a-fA-F]4)|(.)|(\n)", re.S)
_REAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_INTEGER = re.compile(r"-?[0-9]+")
_KEYWORD = re.compile(r"[A-Za-z0-9_-]+")


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of a compel prompt: a blend of flattened prompts (``prompts``: each a tuple of (text, weight)
    fragments; ``blend``: their weights, normalised to sum 1 when ``normalize``), weighted by ``weight``
    against the empty prompt. A plain prompt is one part holding one prompt; ``.and()`` makes one part per
    prompt, laid end to end along the tokens."""

    prompts: tuple[tuple[tuple[str, float], ...], ...]
    blend: tuple[float, ...] = (1.0,)
    normalize: bool = True
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class _Weighted:
    weight: float
    children: tuple


@dataclasses.dataclass(frozen=True)
class _Unsupported:
    message: str


class _Refused(ValueError):
    pass


def _unescape(text: str) -> str:
    """What compel's Fragment does to its text."""
    return text.replace("\\(", "(").replace("\\)", ")").replace('\\"', '"')


def _unquote(body: str) -> str:
    """The text of a quoted string as pyparsing's QuotedString(esc_quote='\\\\"') returns it."""
    out = []
    for match in _QUOTE_ESCAPES.finditer(body):
        space, numeric, char, newline = match.groups()
        if space:
            out.append({"t": "\t", "n": "\n", "f": "\f", "r": "\r"}[space[1]])
        elif numeric:
            code = numeric[1:]
            if code == "0":
                out.append("\0")
            elif code[0] in "ux":
                out.append(chr(int(code[1:], 16)))
            else:
                out.append(code)
        else:
            out.append(char if char is not None else newline)
    return "".join(out).replace('\\"', '"')


def _memoised(method):
    """Each rule is read at most once per position (nested brackets would otherwise be re-read
    exponentially often, as each alternative tries them again)."""

    def read(self, i: int, *args):
        key = (method.__name__, i, args)
        if key not in self.memo:
            self.memo[key] = method(self, i, *args)
        return self.memo[key]

    return read


class _Reader:
    """compel's grammar over one string; each method returns (nodes, end) or None when it does not match.
    A node is a fragment's text (str) or a ``_Weighted`` group."""

    def __init__(self, text: str):
        self.text, self.n = text, len(text)
        self.memo: dict = {}

    def skip(self, i: int) -> int:
        while i < self.n and self.text[i] in _SKIPPED:
            i += 1
        return i

    def literal(self, i: int, token: str) -> Optional[int]:
        i = self.skip(i)
        return i + len(token) if self.text.startswith(token, i) else None

    @_memoised
    def word(self, i: int):
        """A word without syntax: escaped syntax characters, and + / - only when a plain character follows."""
        start = i = self.skip(i)
        text, n = self.text, self.n
        while i < n:
            c = text[i]
            if c == "\\" and i + 1 < n and text[i + 1] in _SYNTACTIC:
                i += 2
            elif c in "+-" and i + 1 < n and text[i + 1] not in _WHITE and text[i + 1] not in _SYNTACTIC:
                i += 1
            elif c not in _SPACE and c not in _SYNTACTIC:
                i += 1
            else:
                break
        return ([_unescape(text[start:i])], i) if i > start else None

    def number(self, i: int):
        i = self.skip(i)
        match = _REAL.match(self.text, i) or _INTEGER.match(self.text, i)
        return (float(match.group(0)), match.end()) if match else None

    def signs(self, i: int):
        i = self.skip(i)
        if i < self.n and self.text[i] in "+-":
            sign, end = self.text[i], i
            while end < self.n and self.text[end] == sign:
                end += 1
            return (PLUS if sign == "+" else MINUS) ** (end - i), end
        return None

    def weight(self, i: int):
        return self.signs(i) or self.number(i)

    @_memoised
    def quoted(self, i: int, content: str = "contents"):
        """A "quoted" run; its text is read by ``content`` (default: the bracket contents' grammar)."""
        i = self.skip(i)
        match = _QUOTED.match(self.text, i)
        if not match:
            return None
        body = _unquote(match.group(0)[1:-1])
        if not body.strip():
            return [""], match.end()
        inner = _Reader(body.replace('"', '\\"'))
        nodes = inner.prompt(0) if content == "prompt" else inner.contents(0)
        if nodes is None or inner.skip(nodes[1]) != inner.n:
            return None
        return nodes[0], match.end()

    @_memoised
    def parens(self, i: int):
        i = self.literal(i, "(")
        if i is None:
            return None
        nodes, i = self.contents(i)
        end = self.literal(i, ")")
        return (nodes, end) if end is not None else None

    def target(self, i: int):
        return self.quoted(i) or self.parens(i) or self.word(i)

    @_memoised
    def attention(self, i: int):
        found = self.target(i)
        if found:  # target.attend(weight)
            end = self.literal(found[1], ".attend")
            end = None if end is None else self.literal(end, "(")
            weight = None if end is None else self.weight(end)
            close = None if weight is None else self.literal(weight[1], ")")
            if close is not None:
                return [_Weighted(weight[0], tuple(found[0]))], close
        found = self.quoted(i) or self.parens(i)
        glued = found and found[1] < self.n and self.text[found[1]] not in _WHITE
        if glued and (weight := self.weight(found[1])):
            return [_Weighted(weight[0], tuple(found[0]))], weight[1]
        found = self.word(i)
        glued = found and found[1] < self.n and self.text[found[1]] not in _WHITE
        if glued and (weight := self.signs(found[1])):
            return [_Weighted(weight[0], tuple(found[0]))], weight[1]
        return None

    @_memoised
    def lora(self, i: int):
        """``withLora(name, 0.8)`` / ``useLora(name)``: compel loads LoRA adapters from the prompt."""
        for trigger in ("useLora", "withLora"):
            end = self.literal(i, trigger)
            end = None if end is None else self.literal(end, "(")
            name = None if end is None else self.keyword(end)
            comma = None if not name else self.literal(name[1], ",")
            scale = None if comma is None else self.number(comma)
            close = None if not name else self.literal(scale[1] if scale else name[1], ")")
            if close is not None:
                message = f"compel's {trigger}() is not supported (load LoRA adapters with load_lora)"
                return [_Unsupported(message)], close
        return None

    @_memoised
    def swap(self, i: int):
        """``target.swap(replacement, options)``: compel's cross-attention control."""
        found = self.target(i)
        end = found and self.literal(found[1], ".swap")
        end = end and self.literal(end, "(")
        if not end:
            return None
        end = self.contents(end, False)[1]
        comma = self.literal(end, ",")
        listed = None if comma is None else self.option_list(comma)
        close = self.literal(listed[1] if listed else end, ")")
        if close is None:
            return None
        return [_Unsupported("compel's .swap() (cross-attention control) is not supported")], close

    @_memoised
    def contents(self, i: int, commas: bool = True):
        """What brackets and quotes may hold: weighted terms, brackets, quotes, words, commas and periods."""
        nodes = []
        while True:
            found = (self.lora(i) or self.attention(i) or self.swap(i) or self.parens(i) or self.quoted(i)
                     or self.word(i))
            if not found and commas:
                j = self.skip(i)
                if j < self.n and self.text[j] in ",.":
                    found = [self.text[j]], j + 1
            if not found:
                return nodes, i
            nodes += found[0]
            i = found[1]

    def prompt(self, i: int):
        """A whole prompt: as ``contents``, but anything else up to the next whitespace is a literal word."""
        nodes = []
        while True:
            found = self.swap(i) or self.lora(i) or self.attention(i) or self.quoted(i) or self.parens(i)
            if not found:
                j = self.skip(i)
                end = j
                while end < self.n and self.text[end] not in _SPACE:
                    end += 1
                if end == j:  # the end, or whitespace pyparsing does not skip (compel fails there too)
                    return nodes, j
                found = [_unescape(self.text[j:end])], end

            nodes += found[0]
            i = found[1]

    def operands(self, i: int):
        """``("a", (b)+, c)``: the prompts a .blend() or .and() combines."""
        i = self.literal(i, "(")
        items = []
        while i is not None:
            found = self.target(i) or self.quoted(i, "prompt")
            if not found:
                return None
            items.append(found[0])
            comma = self.literal(found[1], ",")
            if comma is None:
                end = self.literal(found[1], ")")
                return (items, end) if end is not None else None
            i = comma
        return None

    def options(self, i: int):
        """The arguments of .blend() / .and(): ``(`` numbers and keywords, comma separated ``)``."""
        i = self.literal(i, "(")
        listed = None if i is None else self.option_list(i)
        end = self.literal(listed[1] if listed else i, ")") if i is not None else None
        return None if end is None else (listed[0] if listed else [], end)

    def option_list(self, i: int):
        """``0.3, 0.7, no_normalize``, ``s_start=0.2``: numbers and keywords (``name=value`` too)."""
        values, j = [], i
        while True:
            j = self.skip(j)
            key = _KEYWORD.match(self.text, j)
            equals = key and self.literal(key.end(), "=")
            number = self.number(j)
            if equals is not None and key and (value := self.number(equals) or self.keyword(equals)):
                values.append(key.group(0))
                j = value[1]
            elif number:
                values.append(number[0])
                j = number[1]
            elif key:
                values.append(key.group(0))
                j = key.end()
            else:
                return (values, i) if not values else None
            comma = self.literal(j, ",")
            if comma is None or not (_KEYWORD.match(self.text, self.skip(comma)) or self.number(comma)):
                return values, j
            j = comma

    def keyword(self, i: int):
        match = _KEYWORD.match(self.text, self.skip(i))
        return (match.group(0), match.end()) if match else None


def _flatten(nodes, scale: float = 1.0) -> list[tuple[str, float]]:
    out = []
    for node in nodes:
        if isinstance(node, _Weighted):
            out += _flatten(node.children, scale * node.weight)
        elif isinstance(node, _Unsupported):
            raise _Refused(node.message)
        else:
            out.append((_unescape(node), scale))  # compel makes a new Fragment here, unescaping again
    return out


def _fused(nodes) -> tuple[tuple[str, float], ...]:
    """compel's flattening: pieces weighted outermost first, neighbours of equal weight joined by a space."""
    fused: list[tuple[str, float]] = []
    for text, weight in _flatten(nodes):
        if fused and fused[-1][1] == weight:
            fused[-1] = (_unescape(fused[-1][0] + " " + text), weight)
        else:
            fused.append((text, weight))
    return tuple(fused)


def _combined(reader: _Reader, text: str) -> Optional[list[Part]]:
    """The parts of a prompt that starts with ``(...).and(...)`` (compel ignores any text after it), or that is
    ``(...).blend(...)``; None for other prompts."""
    found = reader.operands(0)
    if not found:
        return None
    operator = next((op for op in (".and", ".add", ".blend") if reader.literal(found[1], op) is not None), None)
    options = operator and reader.options(reader.literal(found[1], operator))
    if not options:
        return None
    prompts = [_fused(item) for item in found[0]]
    values = options[0]
    normalize = not (operator == ".blend" and values and values[-1] == "no_normalize")
    if not normalize:
        values = values[:-1]
    if not all(isinstance(v, float) for v in values):
        raise _Refused(f"prompt {text[:60]!r}: {operator}() takes numbers (and .blend() a last no_normalize), "
                       f"got {values!r}")
    weights = values or [1.0] * len(prompts)
    kept = [(p, w) for p, w in zip(prompts, weights) if p]
    if len(weights) != len(prompts) or (operator == ".blend" and len(kept) != len(prompts)):
        raise _Refused(f"prompt {text[:60]!r}: {operator}() of {len(prompts)} prompts got {len(weights)} weights")
    if operator != ".blend":
        return [Part((p,), weight=w) for p, w in kept]
    if reader.skip(options[1]) != reader.n:
        raise _Refused(f"prompt {text[:60]!r}: compel's .blend(...) must be the whole prompt")
    return [Part(tuple(prompts), tuple(weights), normalize)]


def parse(text: str) -> list[Part]:
    """The parts of a compel prompt (see the module docstring)."""
    text = re.sub(r",(\S)", r", \1", text)
    if not text.strip():
        return [Part(((("", 1.0),),))]
    reader = _Reader(text)
    try:
        parts = _combined(reader, text)
        if parts is None:
            nodes, end = reader.prompt(0)
            if end != reader.n:
                raise _Refused(f"prompt {text[:60]!r}: compel's grammar cannot read {text[end:end + 20]!r}")
            fused = _fused(nodes)
            parts = [Part((fused,))] if fused else []
    except _Refused as error:
        raise ValueError(f"{error} (prompt_syntax='compel')") from None
    return parts or [Part(((("", 1.0),),))]
