"""The prefixes of a regular expression, as a regular expression.

Why: a streaming detector holds text back only while it could still become a match. RE2 and
Python's ``re`` report whole matches, never "this tail could still grow into one", so the
candidate starts are derived from each pattern's prefix language instead: ``Prefix(R)``
matches every string that some match of ``R`` starts with (the empty string included).
Searching ``(?:Prefix(R))\\z`` in a channel's undecided tail gives the leftmost position from
which the text is still a live candidate; everything before it is proven safe.

The construction works on the parse tree of Python's regular-expression parser:

- ``Prefix(x)`` for one character (literal, class, ``.``): ``x?``;
- ``Prefix(AB) = Prefix(A) | A Prefix(B)``, nested from the left, so the result is linear in
  the sequence;
- ``Prefix(A|B) = Prefix(A) | Prefix(B)``;
- ``Prefix(A{m,n}) = A{0,n-1} Prefix(A)`` (the lower bound does not restrict prefixes).

Anchors, word boundaries and look-arounds are dropped. That only makes the language larger
(some text is held a character longer than it had to be), never smaller, so a safe point
derived from it stays sound. Syntax the two engines read differently (RE2's ``[[:alpha:]]``,
``\\pL``, ``\\Q..\\E``, ``\\x{..}``, ``\\C``, ``(?U)``) and constructs without a regular prefix
language here (back-references, possessive repeats) give ``None``: the caller then keeps its
look-back window.
"""

from __future__ import annotations

import re
from typing import Any

try:  # the parser moved in 3.11; sre_parse still works but warns
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser as _p  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - older Pythons
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

# RE2 syntax that Python's parser would read as something else
_FOREIGN = re.compile(r"\[:[a-z]+:\]|\\[pPQECz]|\\x\{|\(\?[a-zA-Z]*U")
# beyond this a prefix pattern costs more to compile and search than the window it saves
MAX_PREFIX_PATTERN_CHARS = 20_000

_CATEGORIES = {
    _c.CATEGORY_DIGIT: r"\d", _c.CATEGORY_NOT_DIGIT: r"\D", _c.CATEGORY_SPACE: r"\s",
    _c.CATEGORY_NOT_SPACE: r"\S", _c.CATEGORY_WORD: r"\w", _c.CATEGORY_NOT_WORD: r"\W",
}
_DROPPED = {_c.AT, _c.ASSERT, _c.ASSERT_NOT}  # zero-width: dropping them only widens the language


class Unsupported(Exception):
    """The pattern has a construct this module does not translate."""


class _Writer:
    """Writes parse-tree nodes back as pattern text that RE2 and Python read the same way."""

    def __init__(self, re2_syntax: bool) -> None:
        self.re2 = re2_syntax

    def char(self, code: int) -> str:
        ch = chr(code)
        if ch.isalnum() or ch == "_":
            return ch
        if code < 128 and ch.isprintable() and ch != " ":
            return "\\" + ch
        if code < 256:
            return f"\\x{code:02x}"
        return f"\\x{{{code:x}}}" if self.re2 else (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")

    def klass(self, items: list[tuple[Any, Any]]) -> str:
        out = []
        negate = False
        for op, av in items:
            if op is _c.NEGATE:
                negate = True
            elif op is _c.LITERAL:
                out.append(self.char(av))
            elif op is _c.RANGE:
                out.append(f"{self.char(av[0])}-{self.char(av[1])}")
            elif op is _c.CATEGORY and av in _CATEGORIES:
                out.append(_CATEGORIES[av])
            else:
                raise Unsupported(str(op))
        return "[" + ("^" if negate else "") + "".join(out) + "]"

    def seq(self, nodes: Any) -> str:
        return "".join(self.node(op, av) for op, av in nodes)

    def node(self, op: Any, av: Any) -> str:
        """The node itself (exactly, but zero-width assertions dropped)."""
        if op is _c.LITERAL:
            return self.char(av)
        if op is _c.NOT_LITERAL:
            return f"[^{self.char(av)}]"
        if op is _c.ANY:
            return "."
        if op is _c.IN:
            return self.klass(av)
        if op is _c.CATEGORY and av in _CATEGORIES:
            return _CATEGORIES[av]
        if op is _c.BRANCH:
            return "(?:" + "|".join(self.seq(b) for b in av[1]) + ")"
        if op is _c.SUBPATTERN:
            return self.flags(av[1], av[2], self.seq(av[3]))
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            lo, hi, item = av
            return f"(?:{self.seq(item)}){_bounds(lo, hi)}"
        if op in _DROPPED:
            return ""
        raise Unsupported(str(op))

    @staticmethod
    def flags(add: int, drop: int, body: str) -> str:
        on = _flag_letters(add)
        off = _flag_letters(drop)
        if not on and not off:
            return f"(?:{body})"
        return f"(?{on}{'-' + off if off else ''}:{body})"

    # -- the prefix language ---------------------------------------------------------------

    def prefix_seq(self, nodes: list[tuple[Any, Any]]) -> str:
        """Prefix(n1 n2 ... nk) = Prefix(n1) | n1 (Prefix(n2) | n2 (...))."""
        nodes = [(op, av) for op, av in nodes if op not in _DROPPED]
        if not nodes:
            return ""
        op, av = nodes[0]
        head = self.prefix_node(op, av)
        if len(nodes) == 1:
            return head
        return f"(?:{head}|{self.node(op, av)}{self.prefix_seq(nodes[1:])})"

    def prefix_node(self, op: Any, av: Any) -> str:
        if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN, _c.CATEGORY):
            return f"(?:{self.node(op, av)})?"
        if op is _c.BRANCH:
            return "(?:" + "|".join(self.prefix_seq(list(b)) for b in av[1]) + ")"
        if op is _c.SUBPATTERN:
            return self.flags(av[1], av[2], self.prefix_seq(list(av[3])))
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            _lo, hi, item = av
            if hi == 0:
                return ""
            reps = "*" if hi == _c.MAXREPEAT else f"{{0,{hi - 1}}}"
            return f"(?:(?:{self.seq(item)}){reps}{self.prefix_seq(list(item))})"
        raise Unsupported(str(op))


def _bounds(lo: int, hi: int) -> str:
    if hi == _c.MAXREPEAT:
        return "*" if lo == 0 else "+" if lo == 1 else f"{{{lo},}}"
    if lo == hi:
        return f"{{{lo}}}"
    return "?" if (lo, hi) == (0, 1) else f"{{{lo},{hi}}}"


def _flag_letters(flags: int) -> str:
    return "".join(letter for bit, letter in ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"))
                   if flags & bit)


def prefix_regex(pattern: str, *, re2_syntax: bool = True, flags: int = 0) -> str | None:
    """The pattern text of ``Prefix(pattern)`` (unanchored; the caller adds ``\\z``/``\\Z``),
    or ``None`` when the pattern uses a construct this module does not translate."""
    if _FOREIGN.search(pattern):
        return None
    try:
        tree = _p.parse(pattern, flags)
        writer = _Writer(re2_syntax)
        body = writer.prefix_seq(list(tree))
    except (Unsupported, re.error, RecursionError, OverflowError):
        return None
    global_flags = _flag_letters(tree.state.flags)
    out = f"(?{global_flags}:{body})" if global_flags else f"(?:{body})"
    return out if len(out) <= MAX_PREFIX_PATTERN_CHARS else None


def prefix_regex_of_all(patterns: list[str], *, re2_syntax: bool = True) -> str | None:
    """``Prefix(p1 | p2 | ...)``, or ``None`` if any pattern cannot be translated."""
    parts = []
    for pat in patterns:
        got = prefix_regex(pat, re2_syntax=re2_syntax)
        if got is None:
            return None
        parts.append(got)
    joined = "(?:" + "|".join(parts) + ")"
    return joined if len(joined) <= MAX_PREFIX_PATTERN_CHARS else None
