"""Incremental pattern scanning over a growing text, shared by regex-style detectors.

A match is reported once it is *settled*: every character it could cover (``window`` from its
start) has arrived, or the channel finished. Reporting earlier (say, once one character after
a greedy match arrived) would make results depend on the chunking for patterns with optional
multi-character tails. The buffer keeps only
the last ``window`` characters plus a little context, so work per ``feed`` is proportional to
the new text plus the window, never to the whole output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

_CONTEXT = 16

T = TypeVar("T")


class BufferedScan(Generic[T]):
    """The decoder shape shared by the incremental scanners: ``feed`` appends to a bounded
    buffer and scans what can be decided, ``finish`` decides the rest once. Subclasses
    implement ``_scan(final)`` and initialise ``_buf = ""`` and ``_done = False``."""

    __slots__ = ("_buf", "_done")

    def feed(self, text: str) -> list[T]:
        if self._done or not text:
            return []
        self._buf += text
        return self._scan(final=False)

    def finish(self) -> list[T]:
        if self._done:
            return []
        out = self._scan(final=True)
        self._done = True
        self._buf = ""
        return out

    def _scan(self, final: bool) -> list[T]:
        raise NotImplementedError


class _Pattern(Protocol):
    def finditer(self, text: str, pos: int = ..., /) -> Iterator[Any]: ...


Finder = Callable[[str, int], "tuple[int, int] | None"]


def _re2_native(pattern: Any) -> tuple[Any, Any, Any] | None:
    """(RE2::Match on UTF-8 bytes, UNANCHORED, ANCHOR_START) of a compiled ``re2`` pattern, or
    ``None`` when the installed ``re2`` does not expose them."""
    try:
        import re2

        return pattern._regexp.Match, re2._Anchor.UNANCHORED, re2._Anchor.ANCHOR_START
    except (ImportError, AttributeError):
        return None


def re2_finder(pattern: Any) -> Finder | None:
    """``find(text, pos)``: the span (character offsets) of the leftmost match of ``pattern`` (a
    compiled ``re2`` pattern) in ``text[pos:]``, ``text[:pos]`` being context for ``\\b``; or
    ``None``. One native call on the UTF-8 bytes.

    Why: almost every scan of a stream finds nothing, and ``re2``'s Python ``finditer`` costs
    several microseconds per call before it reaches RE2 (a generator, offset conversions, a
    span per capture group). Pass a pattern *without capture groups* (RE2 then answers from
    its DFA). ``None`` when the installed ``re2`` does not expose what this needs."""
    native = _re2_native(pattern)
    if native is None:
        return None
    match, unanchored, _ = native

    def find(text: str, pos: int) -> tuple[int, int] | None:
        raw = text.encode()
        if len(raw) == len(text):  # ASCII: byte offsets are character offsets
            span = match(unanchored, raw, pos, len(raw))[0]
            return None if span[0] < 0 else span
        s, e = match(unanchored, raw, len(text[:pos].encode()), len(raw))[0]
        if s < 0:
            return None
        # RE2 works on bytes: an empty match (``\B``) can fall inside a character; it then
        # counts at that character's start
        return len(raw[:s].decode(errors="ignore")), len(raw[:e].decode(errors="ignore"))

    return find


class NamedMatch:
    """The part of a match object the scanners use: span, matched text, ``lastgroup``."""

    __slots__ = ("_end", "_start", "_text", "lastgroup")

    def __init__(self, name: str, start: int, end: int, text: str) -> None:
        self.lastgroup = name
        self._start, self._end, self._text = start, end, text

    def start(self) -> int:
        return self._start

    def end(self) -> int:
        return self._end

    def group(self, g: int | str = 0) -> str | None:
        return self._text if g in (0, self.lastgroup) else None


class NamedAlternatives:
    """``finditer`` over named RE2 patterns with the matches of the alternation
    ``(?P<a>...)|(?P<b>...)`` (leftmost-first: at the leftmost position the first pattern that
    matches there wins), built from native RE2 calls without capture groups.

    Why: RE2 answers "where is the leftmost match" from its DFA; asking for 20 capture groups
    runs a slower engine and ``re2``'s ``lastgroup`` loops in Python (tens of µs per match).
    Here a match costs one search of the alternation plus one anchored call per pattern tried.
    Use ``named_alternatives``, which returns ``None`` when the native calls are unavailable."""

    __slots__ = ("_alts", "_anchor", "_fallback", "_find")

    def __init__(self, find: Finder, alts: list[tuple[str, Any]], anchor: Any, fallback: Any) -> None:
        self._find = find
        self._alts = alts
        self._anchor = anchor
        self._fallback = fallback  # the capture-group alternation, should the two ever disagree

    @property
    def finder(self) -> Finder:
        return self._find

    def finditer(self, text: str, pos: int = 0) -> Iterator[Any]:
        n = len(text)
        while pos <= n:
            span = self._find(text, pos)
            if span is None:
                return
            s, e = span
            yield self._resolve(text, s, e)
            pos = e if e > s else s + 1

    def _resolve(self, text: str, s: int, e: int) -> Any:
        raw = text.encode()
        ascii_ = len(raw) == len(text)
        sb = s if ascii_ else len(text[:s].encode())
        eb = e if ascii_ else len(text[:e].encode())
        for name, match in self._alts:
            got = match(self._anchor, raw, sb, len(raw))[0]
            if got[0] >= 0:
                if got[1] == eb:
                    return NamedMatch(name, s, e, text[s:e])
                break
        return next(iter(self._fallback.finditer(text, s)))


def named_alternatives(patterns: dict[str, str]) -> NamedAlternatives | None:
    """``NamedAlternatives`` for ``name -> RE2 pattern``, or ``None`` (use the capture-group
    alternation with ``re2``'s own ``finditer`` then)."""
    import re2

    find = re2_finder(re2.compile("|".join(f"(?:{p})" for p in patterns.values())))
    alts = [(n, _re2_native(re2.compile(p))) for n, p in patterns.items()]
    if find is None or any(a is None for _, a in alts):
        return None
    anchor = alts[0][1][2]  # type: ignore[index]
    fallback = re2.compile("|".join(f"(?P<{n}>{p})" for n, p in patterns.items()))
    return NamedAlternatives(find, [(n, a[0]) for n, a in alts], anchor, fallback)  # type: ignore[index]


def _first_span(pattern: _Pattern, text: str, pos: int) -> tuple[int, int] | None:
    for m in pattern.finditer(text, pos):
        if m.end() > m.start():
            return m.start(), m.end()
    return None


def prefix_finder(prefix_pattern: str | None) -> Finder | None:
    """A finder for ``Prefix(pattern)\\z`` on RE2 (native calls where available), or ``None``."""
    if prefix_pattern is None:
        return None
    import re2

    try:
        compiled = re2.compile(prefix_pattern + r"\z")
    except Exception:  # noqa: BLE001 - re2 raises its own error type (e.g. program too large)
        return None
    native = re2_finder(compiled)
    if native is not None:
        return native

    def find(text: str, pos: int) -> tuple[int, int] | None:
        m = compiled.search(text, pos)
        return None if m is None else m.span()

    return find


class StreamScanner:
    """Finds settled, non-overlapping matches of ``pattern`` in a stream of text.

    ``window`` is the longest match that must be found whole; longer matches may be cut.
    Yields ``(start, end, match)`` with absolute character offsets.
    """

    __slots__ = ("_base", "_buf", "_done", "_finder", "_min_scan", "_pattern", "_scan_from", "_unscanned",
                 "_window")

    def __init__(self, pattern: _Pattern, window: int, min_scan_chars: int = 1,
                 finder: Finder | None = None) -> None:
        """``min_scan_chars`` > 1 batches scans: the buffer is only scanned once that many new
        characters are pending (or at finish), so the window is not rescanned on every small
        delta. A caller that holds text back must add ``min_scan_chars - 1`` to its hold-back.
        ``finder`` (see ``re2_finder``) finds the same matches as ``pattern`` faster; ``pattern``
        is then only asked for the match objects of reported matches."""
        self._pattern = pattern
        self._finder = finder
        self._window = max(1, window)
        self._min_scan = max(1, min_scan_chars)
        self._unscanned = 0
        self._buf = ""
        self._base = 0  # absolute offset of _buf[0]
        self._scan_from = 0  # absolute offset: matches starting before it are decided
        self._done = False

    def feed(self, text: str) -> list[tuple[int, int, Any]]:
        if self._done or not text:
            return []
        buf = self._buf = self._buf + text
        unscanned = self._unscanned + len(text)
        if unscanned < self._min_scan:
            self._unscanned = unscanned
            return []
        self._unscanned = 0
        find = self._finder
        if find is None or find(buf, self._scan_from - self._base) is not None:
            return self._scan(final=False)
        # the common case, nothing in the undecided region: what _scan does when it finds no
        # match, without its loop
        base = self._base
        n = len(buf)
        scan_from = max(self._scan_from, base + n - self._window + 1)
        self._scan_from = scan_from
        keep_from = scan_from - base - _CONTEXT
        if keep_from > 0:
            self._buf = buf[keep_from:]
            self._base = base + keep_from
        return []

    def safe_point(self, prefix: Finder | None) -> int | None:
        """The earliest absolute offset where a match not reported yet may start: the first
        match in the undecided region (found, not settled), or the leftmost position from
        which the text is still a prefix of a match (``prefix`` finds the leftmost match of
        ``Prefix(pattern)\\z``, see ``detectors.pattern_prefix``); the end of the text when
        neither. ``None`` without a prefix finder (the caller keeps its look-back window)."""
        if prefix is None:
            return None
        buf, base = self._buf, self._base
        end = base + len(buf)
        if self._done:
            return end
        pos = max(0, self._scan_from - base)
        found = self._finder(buf, pos) if self._finder is not None else _first_span(self._pattern, buf, pos)
        best = end if found is None else base + found[0]
        live = prefix(buf, pos)
        if live is not None and base + live[0] < best:
            best = base + live[0]
        return best

    def finish(self) -> list[tuple[int, int, Any]]:
        if self._done:
            return []
        out = self._scan(final=True)
        self._done = True
        self._buf = ""
        return out

    def _matches(self, buf: str, pos: int) -> Iterator[tuple[int, int, Any]]:
        """``(start, end, match or None)`` of successive matches from ``pos``, as finditer."""
        find = self._finder
        if find is None:
            for m in self._pattern.finditer(buf, pos):
                yield m.start(), m.end(), m
            return
        n = len(buf)
        while pos <= n:
            span = find(buf, pos)
            if span is None:
                return
            s, e = span
            yield s, e, None
            pos = e if e > s else s + 1

    def _scan(self, final: bool) -> list[tuple[int, int, Any]]:
        buf, base = self._buf, self._base
        n = len(buf)
        out: list[tuple[int, int, Any]] = []
        pos = self._scan_from - base
        pending_at: int | None = None
        for s, e, m in self._matches(buf, pos):
            if e == s:
                continue
            if not final and (s + self._window > n or e >= n):
                # the match could still grow (an optional tail, a longer alternative): it is
                # settled only once everything it could cover has arrived, so the result does
                # not depend on where the text was split
                pending_at = s
                break
            if m is None:  # found by the finder: the match object from the full pattern
                m = next(iter(self._pattern.finditer(buf, s)))
            out.append((base + s, base + e, m))
            self._scan_from = base + e
        if pending_at is not None:
            self._scan_from = max(self._scan_from, base + pending_at)
            # a pending match longer than the window is cut: scan resumes inside it
            self._scan_from = max(self._scan_from, base + n - self._window)
        else:
            self._scan_from = max(self._scan_from, base + n - self._window + 1)
        keep_from = max(0, self._scan_from - base - _CONTEXT)
        if keep_from:
            self._buf = buf[keep_from:]
            self._base = base + keep_from
        return out
