"""Incremental pattern scanning over a growing text, shared by regex-style detectors.

A match is reported once it is *settled*: every character it could cover (``window`` from its
start) has arrived, or the channel finished. Reporting earlier (say, once one character after
a greedy match arrived) would make results depend on the chunking for patterns with optional
multi-character tails. The buffer keeps only
the last ``window`` characters plus a little context, so work per ``feed`` is proportional to
the new text plus the window, never to the whole output.
"""

from __future__ import annotations

from collections.abc import Iterator
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


class StreamScanner:
    """Finds settled, non-overlapping matches of ``pattern`` in a stream of text.

    ``window`` is the longest match that must be found whole; longer matches may be cut.
    Yields ``(start, end, match)`` with absolute character offsets.
    """

    __slots__ = ("_base", "_buf", "_done", "_min_scan", "_pattern", "_scan_from", "_unscanned", "_window")

    def __init__(self, pattern: _Pattern, window: int, min_scan_chars: int = 1) -> None:
        """``min_scan_chars`` > 1 batches scans: the buffer is only scanned once that many new
        characters are pending (or at finish), so the window is not rescanned on every small
        delta. A caller that holds text back must add ``min_scan_chars - 1`` to its hold-back."""
        self._pattern = pattern
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
        self._buf += text
        self._unscanned += len(text)
        if self._unscanned < self._min_scan:
            return []
        self._unscanned = 0
        return self._scan(final=False)

    def finish(self) -> list[tuple[int, int, Any]]:
        if self._done:
            return []
        out = self._scan(final=True)
        self._done = True
        self._buf = ""
        return out

    def _scan(self, final: bool) -> list[tuple[int, int, Any]]:
        buf, base = self._buf, self._base
        n = len(buf)
        out: list[tuple[int, int, Any]] = []
        pos = self._scan_from - base
        pending_at: int | None = None
        for m in self._pattern.finditer(buf, pos):
            s, e = m.start(), m.end()
            if e == s:
                continue
            if not final and (s + self._window > n or e >= n):
                # the match could still grow (an optional tail, a longer alternative): it is
                # settled only once everything it could cover has arrived, so the result does
                # not depend on where the text was split
                pending_at = s
                break
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
