"""Incremental JSON tokenizer: one document, fed piece by piece, failing at the first bad byte.

Why it exists: a streamed structured answer should be judged while it streams. ``JsonStream``
consumes text in arbitrary pieces with work proportional to the new text (regex runs skip
whitespace, string bodies and numbers in C; the Python loop runs once per token), keeps only
a bounded carry between pieces (a partial number, literal or escape), and stops at the first
character that makes the prefix impossible to complete as JSON. Its syntax is exactly the one
``orjson.loads`` accepts (RFC 8259, no BOM, no NaN, depth at most 1024, numbers finite as
doubles, surrogate escapes paired), so anything it rejects the final parse rejects too; the
one deliberate addition is that a key repeated in one object is rejected (parsers disagree
on which value wins, so the document is ambiguous).

It knows nothing about schemas: an optional ``Checker`` receives structural events (a value
starts, a key closes, a scalar ends, a container closes) and may answer with a ``Verdict``
that stops the stream as a ``schema`` problem. Offsets are absolute character offsets into
the caller's text (the caller passes the offset of each piece).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Protocol

import orjson

# Value kinds, as reported to checkers.
OBJ, ARR, STR, NUM, TRUE, FALSE, NULL = range(7)
KIND_NAMES = ("object", "array", "string", "number", "boolean", "boolean", "null")
LITERALS = {"t": ("true", TRUE), "f": ("false", FALSE), "n": ("null", NULL)}

MAX_DEPTH = 1024  # orjson's limit: the 1025th nested container is an error

# Parser states.
_VALUE, _ARR_FIRST, _ARR_NEXT, _OBJ_FIRST, _OBJ_NEXT, _COLON, _AFTER = range(7)
_STR, _ESC, _HEX, _LOW_BS, _LOW_U = range(7, 12)
_NUM, _LIT, _DONE, _FAIL = range(12, 16)
_IN_STRING = frozenset((_STR, _ESC, _HEX, _LOW_BS, _LOW_U))

_WS_RUN = re.compile(r"[ \t\n\r]*").match
_STR_RUN = re.compile(r'[^"\\\x00-\x1f]*').match
_NUM_RUN = re.compile(r"[0-9eE.+\-]*").match
_NUM_FULL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?").fullmatch
_WS = " \t\n\r"
_NUM_START = "-0123456789"
_HEX_DIGITS = {c: int(c, 16) for c in "0123456789abcdefABCDEF"}

# Number grammar as a DFA over [0-9eE.+-]; used across piece boundaries and to place errors.
_D = "0123456789"
_NUM_DFA: tuple[dict[str, int], ...] = (
    {"-": 1, "0": 2, **{d: 3 for d in _D[1:]}},  # 0 start
    {"0": 2, **{d: 3 for d in _D[1:]}},  # 1 after '-'
    {".": 4, "e": 6, "E": 6},  # 2 after leading 0
    {".": 4, "e": 6, "E": 6, **{d: 3 for d in _D}},  # 3 integer digits
    {d: 5 for d in _D},  # 4 after '.'
    {"e": 6, "E": 6, **{d: 5 for d in _D}},  # 5 fraction digits
    {"+": 7, "-": 7, **{d: 8 for d in _D}},  # 6 after 'e'
    {d: 8 for d in _D},  # 7 after exponent sign
    {d: 8 for d in _D},  # 8 exponent digits
)
_NUM_ACCEPT = frozenset((2, 3, 5, 8))
_NUM_EXPECT = ("a digit or '-'", "a digit", "'.', 'e' or the end of the number (no leading zeros)",
               "a digit, '.', 'e' or the end of the number", "a digit after '.'",
               "a digit, 'e' or the end of the number", "a digit or sign after 'e'",
               "a digit after the exponent sign", "a digit or the end of the number")

Path = tuple[str | int, ...]
Verdict = tuple[str, int, int]
"""A checker's objection: (message, span start, span end)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """Why the stream stopped. ``at`` is the offset of the character whose arrival proved the
    problem (the end of input for ``truncated``/end-of-input problems); ``span`` is the text
    the problem is about. ``kind``: syntax | schema | format | truncated. ``habit`` names a
    model habit for ``format`` problems (``trailing_comma``)."""

    kind: str
    at: int
    span: tuple[int, int]
    path: Path
    message: str
    habit: str = ""


class Checker(Protocol):
    """Receives structural events; a returned ``Verdict`` stops the stream (kind ``schema``).

    ``value`` fires at the first character of every value (kinds above), ``key`` when a key
    string closes (decoded name), ``scalar`` when a string or number ends (``raw`` is the
    string's JSON-escaped body without quotes, or the number's text), ``close`` at ``}``/``]``
    with the object's key set (``None`` for arrays) and the array's item count.
    """

    def value(self, kind: int, start: int) -> Verdict | None: ...

    def key(self, name: str, start: int, end: int) -> Verdict | None: ...

    def scalar(self, kind: int, raw: str, start: int, end: int) -> Verdict | None: ...

    def close(self, kind: int, at: int, keys: set[str] | None, count: int) -> Verdict | None: ...


def decode_string(raw: str) -> str:
    """The value of a JSON string body already validated by ``JsonStream``."""
    if "\\" not in raw:
        return raw
    return orjson.loads('"' + raw + '"')  # type: ignore[no-any-return]


def parse_number(raw: str) -> int | float:
    """The number as ``orjson.loads`` returns it: int within the 64-bit range, else float."""
    if "." not in raw and "e" not in raw and "E" not in raw:
        v = int(raw)
        if -(2**63) <= v < 2**64:
            return v
    return float(raw)


def format_path(path: Path) -> str:
    """``$.items[3].price``; keys that are not identifiers are quoted: ``$["a b"]``."""
    out = ["$"]
    for p in path:
        if isinstance(p, int):
            out.append(f"[{p}]")
        elif p.isidentifier() and p.isascii() and len(p) <= 40:
            out.append("." + p)
        else:
            out.append("[" + orjson.dumps(p if len(p) <= 40 else p[:39] + "…").decode() + "]")
    return "".join(out)


def _char(c: str) -> str:
    return repr(c) if c.isprintable() else f"U+{ord(c):04X}"


class JsonStream:
    """Incremental tokenizer for one JSON document (see the module docstring).

    ``feed(text, pos, base)`` consumes ``text[pos:]`` (``base`` = absolute offset of
    ``text[0]``) and returns the index where it stopped: ``len(text)``, or earlier when the
    document ended (``done``; ``end`` is the absolute offset after it) or failed (``problem``).
    ``finish(truncated)`` is called at the end of input.
    """

    __slots__ = (
        "_checker",
        "_comma",
        "_hex",
        "_keysets",
        "_kinds",
        "_lit",
        "_numst",
        "_parts",
        "_path",
        "_start",
        "_state",
        "_str_key",
        "allow_trailing_commas",
        "end",
        "problem",
        "trailing_commas",
    )

    def __init__(self, checker: Checker | None = None, allow_trailing_commas: bool = False) -> None:
        self._checker = checker
        self.allow_trailing_commas = allow_trailing_commas
        self._state = _VALUE
        self._kinds: list[int] = []  # OBJ/ARR per open container
        self._path: list[str | int] = []  # current key / index per open container
        self._keysets: list[set[str] | None] = []
        self._parts: list[str] = []  # string / number / literal text carried across pieces
        self._start = 0  # absolute offset where the current token began
        self._str_key = False
        self._hex = (0, 0, False, False)  # digits read, first digit, high surrogate, need low
        self._numst = 0
        self._lit = ("", 0, NULL)  # literal, chars matched, kind
        self._comma = -1
        self.trailing_commas: list[int] = []
        self.problem: Problem | None = None
        self.end = -1

    # -- public state -------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def failed(self) -> bool:
        return self._state == _FAIL

    @property
    def started(self) -> bool:
        return not (self._state == _VALUE and not self._kinds)

    @property
    def depth(self) -> int:
        return len(self._kinds)

    def path(self) -> Path:
        return tuple(self._path)

    # -- problems -------------------------------------------------------------------------
    def _fail(self, kind: str, at: int, message: str, span: tuple[int, int] | None = None,
              container: bool = False, habit: str = "") -> None:
        path = tuple(self._path[:-1]) if container else tuple(self._path)
        self.problem = Problem(kind, at, span or (at, at + 1), path, message, habit)
        self._state = _FAIL

    def _schema(self, v: Verdict, at: int, container: bool = False) -> None:
        self._fail("schema", at, v[0], (v[1], v[2]), container)

    # -- feeding --------------------------------------------------------------------------
    def feed(self, text: str, pos: int = 0, base: int = 0) -> int:
        st = self._state
        if st >= _DONE:
            return pos
        n = len(text)
        i = pos
        chk = self._checker
        kinds = self._kinds
        path = self._path
        sstart = pos  # where the current string's text begins in this piece
        while i < n:
            if st < _STR:  # between tokens: the states are ordered by how often they occur
                c = text[i]
                if c in _WS:
                    i = _WS_RUN(text, i).end()
                    if i == n:
                        break
                    c = text[i]
                at = base + i
                if st == _AFTER:  # a value ended inside a container
                    top = kinds[-1]
                    if c == ",":
                        self._comma = at
                        st = _OBJ_NEXT if top == OBJ else _ARR_NEXT
                        i += 1
                        continue
                    if (c == "}" and top == OBJ) or (c == "]" and top == ARR):
                        st = self._close(top, at)
                        if st >= _DONE:
                            return i + 1 if st == _DONE else i
                        i += 1
                        continue
                    close = "}" if top == OBJ else "]"
                    self._fail("syntax", at, f"expected ',' or '{close}', got {_char(c)}")
                    return i
                if st == _COLON:
                    if c == ":":
                        st = _VALUE
                        i += 1
                        continue
                    self._fail("syntax", at, f"expected ':' after the property name, got {_char(c)}")
                    return i
                if st >= _OBJ_FIRST:  # a key is expected (or '}' after '{' / a trailing comma)
                    if c == '"':
                        self._start = at
                        self._str_key = True
                        st = _STR
                        i += 1
                        sstart = i
                        continue
                    if c == "}" and (st == _OBJ_FIRST or self._trailing_comma_ok(at, "}")):
                        st = self._close(OBJ, at)
                        if st >= _DONE:
                            return i + 1 if st == _DONE else i
                        i += 1
                        continue
                    if self._state != _FAIL:
                        hint = " (single quotes are not JSON)" if c == "'" else ""
                        self._fail("syntax", at, f"expected a property name in double quotes, got "
                                   f"{_char(c)}{hint}", container=True)
                    return i
                # a value is expected (in an array: or ']' after '[' / a trailing comma)
                if st != _VALUE:
                    if c == "]":
                        if st == _ARR_FIRST or self._trailing_comma_ok(at, "]"):
                            st = self._close(ARR, at)
                            if st >= _DONE:
                                return i + 1 if st == _DONE else i
                            i += 1
                            continue
                        return i
                    path[-1] += 1  # the array's entry is the index of its current item
                if c == '"':
                    if chk is not None:
                        v = chk.value(STR, at)
                        if v is not None:
                            self._schema(v, at)
                            return i
                    self._start = at
                    self._str_key = False
                    st = _STR
                    i += 1
                    sstart = i
                    continue
                if c == "{" or c == "[":
                    kind = OBJ if c == "{" else ARR
                    if len(kinds) >= MAX_DEPTH:
                        self._fail("syntax", at, f"nesting deeper than {MAX_DEPTH} levels")
                        return i
                    if chk is not None:
                        v = chk.value(kind, at)
                        if v is not None:
                            self._schema(v, at)
                            return i
                    kinds.append(kind)
                    if kind == OBJ:
                        path.append("")
                        self._keysets.append(set())
                        st = _OBJ_FIRST
                    else:
                        path.append(-1)
                        self._keysets.append(None)
                        st = _ARR_FIRST
                    i += 1
                    continue
                if c in _NUM_START:
                    if chk is not None:
                        v = chk.value(NUM, at)
                        if v is not None:
                            self._schema(v, at)
                            return i
                    j = _NUM_RUN(text, i).end()
                    self._start = at
                    if j < n and _NUM_FULL(text, i, j):
                        if not self._number_done(text[i:j], at, base + j):
                            return j
                        i = j
                        if not kinds:
                            self._state = _DONE
                            self.end = base + j
                            return i
                        st = _AFTER
                        continue
                    self._numst = 0
                    st = _NUM
                    continue  # the _NUM branch places any error and carries the rest
                lit = LITERALS.get(c)
                if lit is not None:
                    if chk is not None:
                        v = chk.value(lit[1], at)
                        if v is not None:
                            self._schema(v, at)
                            return i
                    self._start = at
                    self._lit = (lit[0], 0, lit[1])
                    st = _LIT
                    continue
                hint = " (single quotes are not JSON)" if c == "'" else ""
                self._fail("syntax", at, f"expected a JSON value, got {_char(c)}{hint}")
                return i
            if st == _STR:
                j = _STR_RUN(text, i).end()
                if j == n:
                    i = n
                    break
                c = text[j]
                if c == '"':
                    parts = self._parts
                    if parts:
                        parts.append(text[sstart:j])
                        raw = "".join(parts)
                        parts.clear()
                    else:
                        raw = text[sstart:j]
                    start = self._start
                    end = base + j + 1
                    i = j + 1
                    if self._str_key:
                        name = decode_string(raw) if "\\" in raw else raw
                        keys = self._keysets[-1]
                        assert keys is not None
                        if name in keys:
                            self._fail("syntax", end - 1, f"duplicate key {_quote(name)} in one object "
                                       "(parsers disagree on which value wins)", (start, end), True)
                            return i
                        keys.add(name)
                        if chk is not None:
                            v = chk.key(name, start, end)
                            if v is not None:
                                self._schema(v, end - 1, container=True)
                                return i
                        path[-1] = name
                        st = _COLON
                        continue
                    if chk is not None:
                        v = chk.scalar(STR, raw, start, end)
                        if v is not None:
                            self._schema(v, end - 1)
                            return i
                    if not kinds:
                        self._state = _DONE
                        self.end = end
                        return i
                    st = _AFTER
                    continue
                if c == "\\":
                    i = j + 1
                    st = _ESC
                    continue
                self._fail("syntax", base + j, f"control character {_char(c)} inside a string "
                           "(it must be escaped)")
                return j
            if st == _ESC:
                c = text[i]
                if c == "u":
                    st = _HEX
                    self._hex = (0, 0, False, False)
                elif c in '"\\/bfnrt':
                    st = _STR
                else:
                    self._fail("syntax", base + i, f"invalid escape '\\{c}' in a string")
                    return i
                i += 1
                continue
            if st <= _LOW_U:  # _HEX, _LOW_BS, _LOW_U
                st = self._escape_char(text[i], base + i, st)
                if st == _FAIL:
                    return i
                i += 1
                continue
            if st == _NUM:
                j = _NUM_RUN(text, i).end()
                q = self._num_dfa(text, i, j, base)
                if q >= 0:
                    self._fail("syntax", base + q, self._num_msg(text[q]))
                    return q
                self._parts.append(text[i:j])
                if j == n:
                    i = n
                    break
                raw = "".join(self._parts)
                self._parts.clear()
                if self._numst not in _NUM_ACCEPT:
                    self._fail("syntax", base + j, self._num_msg(text[j]), (self._start, base + j + 1))
                    return j
                if not self._number_done(raw, self._start, base + j):
                    return j
                i = j
                if not kinds:
                    self._state = _DONE
                    self.end = base + j
                    return i
                st = _AFTER
                continue
            # st == _LIT
            lit, k, kind = self._lit
            rest = lit[k:]
            if text.startswith(rest, i):
                i += len(rest)
                if not kinds:
                    self._state = _DONE
                    self.end = base + i
                    return i
                st = _AFTER
                continue
            while i < n and k < len(lit):
                if text[i] != lit[k]:
                    self._fail("syntax", base + i, f"invalid literal: expected '{lit}', got "
                               f"{_char(text[i])} at character {k + 1}")
                    return i
                i += 1
                k += 1
            self._lit = (lit, k, kind)
        if st in _IN_STRING:
            self._parts.append(text[sstart:n])
        self._state = st
        return n

    def _trailing_comma_ok(self, at: int, bracket: str) -> bool:
        if self.allow_trailing_commas:
            self.trailing_commas.append(self._comma)
            return True
        self._fail("format", at, f"trailing comma before '{bracket}'", (self._comma, self._comma + 1),
                   container=True, habit="trailing_comma")
        return False

    def _close(self, kind: int, at: int) -> int:
        """``}`` or ``]`` at ``at``: the checker's last word on the container, then pop it.
        Returns the next state (``_AFTER``, ``_DONE`` or ``_FAIL``)."""
        keys = self._keysets[-1]
        count = self._path[-1] + 1 if kind == ARR else len(keys or ())  # type: ignore[operator]
        if self._checker is not None:
            v = self._checker.close(kind, at, keys, count)
            if v is not None:
                self._schema(v, at, container=True)
                return _FAIL
        self._kinds.pop()
        self._path.pop()
        self._keysets.pop()
        if not self._kinds:
            self._state = _DONE
            self.end = at + 1
            return _DONE
        return _AFTER

    def _escape_char(self, c: str, at: int, st: int) -> int:
        """One character of a ``\\uXXXX`` escape (or of the low-surrogate escape that must
        follow a high surrogate): fail at the first digit that rules out a valid pair."""
        if st == _LOW_BS:
            if c == "\\":
                return _LOW_U
            self._fail("syntax", at, "a high surrogate escape must be followed by a low surrogate escape")
            return _FAIL
        if st == _LOW_U:
            if c == "u":
                self._hex = (0, 0, False, True)
                return _HEX
            self._fail("syntax", at, "a high surrogate escape must be followed by a low surrogate escape")
            return _FAIL
        d = _HEX_DIGITS.get(c)
        if d is None:
            self._fail("syntax", at, f"invalid \\u escape: expected a hex digit, got {_char(c)}")
            return _FAIL
        got, first, high, need_low = self._hex
        if need_low:
            if (got == 0 and d != 0xD) or (got == 1 and d < 0xC):
                self._fail("syntax", at, "expected a low surrogate (\\uDC00-\\uDFFF) after a high surrogate")
                return _FAIL
        elif got == 1 and first == 0xD:
            if d >= 0xC:
                self._fail("syntax", at, "lone low surrogate escape (\\uDC00-\\uDFFF) in a string")
                return _FAIL
            if d >= 0x8:
                high = True
        got += 1
        self._hex = (got, d if got == 1 else first, high, need_low)
        if got < 4:
            return _HEX
        return _LOW_BS if high and not need_low else _STR

    def _num_dfa(self, text: str, i: int, j: int, base: int) -> int:
        """Advance the number DFA over ``text[i:j]``; index of the first bad char or -1."""
        q = self._numst
        for k in range(i, j):
            nxt = _NUM_DFA[q].get(text[k])
            if nxt is None:
                self._numst = q
                return k
            q = nxt
        self._numst = q
        return -1

    def _num_msg(self, c: str) -> str:
        return f"invalid number: expected {_NUM_EXPECT[self._numst]}, got {_char(c)}"

    def _number_done(self, raw: str, start: int, end: int) -> bool:
        """A syntactically complete number ended at ``end`` (the next character, or the end of
        input): range check, then the checker."""
        if (len(raw) > 15 or "e" in raw or "E" in raw) and math.isinf(float(raw)):
            self._fail("syntax", end, "number out of range (infinite as a double)", (start, end))
            return False
        if self._checker is not None:
            v = self._checker.scalar(NUM, raw, start, end)
            if v is not None:
                self._schema(v, end)
                return False
        return True

    def finish(self, truncated: bool, at: int) -> Problem | None:
        """End of input at absolute offset ``at``. Completes a top-level number; otherwise an
        unfinished document is a problem of kind ``truncated`` (when the caller says the
        output was cut off) or ``syntax``."""
        st = self._state
        if st in (_DONE, _FAIL):
            return self.problem
        if st == _NUM and not self._kinds:
            raw = "".join(self._parts)
            self._parts.clear()
            if self._numst in _NUM_ACCEPT:
                if self._number_done(raw, self._start, at):
                    self._state = _DONE
                    self.end = at
                    return None
                return self.problem
        where = _WHERE.get(st, "inside a value")
        if st == _LIT:
            where = f"inside the literal '{self._lit[0]}'"
        path = tuple(self._path)
        if path and path[-1] in ("", -1):  # nothing inside the innermost container yet
            path = path[:-1]
        if truncated:
            msg = f"output was cut off {where} (incomplete JSON)"
            self.problem = Problem("truncated", at, (at, at), path, msg)
        else:
            self.problem = Problem("syntax", at, (at, at), path, f"unexpected end of output {where} (incomplete JSON)")
        self._state = _FAIL
        return self.problem


_WHERE = {
    _VALUE: "where a value was expected", _ARR_FIRST: "inside an array", _ARR_NEXT: "inside an array",
    _OBJ_FIRST: "inside an object", _OBJ_NEXT: "inside an object", _COLON: "after a property name",
    _AFTER: "inside a container", _STR: "inside a string", _ESC: "inside a string",
    _HEX: "inside a string", _LOW_BS: "inside a string", _LOW_U: "inside a string",
    _NUM: "inside a number",
}


def _quote(s: str, limit: int = 40) -> str:
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return orjson.dumps(s).decode()


class _Locator:
    """Checker that records the span of the value at ``target`` and stops the parse."""

    __slots__ = ("depth", "found", "parser", "pending", "target")

    def __init__(self, target: Path) -> None:
        self.target = list(target)
        self.parser: JsonStream | None = None
        self.found: tuple[int, int] | None = None
        self.pending = -1  # start of the target value once it began
        self.depth = len(target)

    def value(self, kind: int, start: int) -> Verdict | None:
        p = self.parser
        assert p is not None
        if p.depth == self.depth and p._path == self.target:
            if kind in (TRUE, FALSE, NULL):
                self.found = (start, start + (5 if kind == FALSE else 4))
                return ("", 0, 0)
            self.pending = start
        return None

    def key(self, name: str, start: int, end: int) -> Verdict | None:
        return None

    def scalar(self, kind: int, raw: str, start: int, end: int) -> Verdict | None:
        if self.pending == start:
            self.found = (start, end)
            return ("", 0, 0)
        return None

    def close(self, kind: int, at: int, keys: set[str] | None, count: int) -> Verdict | None:
        p = self.parser
        assert p is not None
        if self.pending >= 0 and p.depth == self.depth + 1:
            self.found = (self.pending, at + 1)
            return ("", 0, 0)
        return None


def locate(text: str, path: Path, base: int = 0, allow_trailing_commas: bool = False) -> tuple[int, int] | None:
    """Span (absolute, offset by ``base``) of the value at ``path`` in the JSON ``text``."""
    loc = _Locator(path)
    parser = JsonStream(loc, allow_trailing_commas=allow_trailing_commas)
    loc.parser = parser
    parser.feed(text, 0, base)
    if loc.found is None:
        parser.finish(False, base + len(text))
    return loc.found
