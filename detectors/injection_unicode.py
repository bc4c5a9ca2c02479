"""Invisible Unicode for the injection detector: tag characters, bidi controls, zero-width
characters and variation-selector runs, in requests (hidden instructions) and in output
(smuggling).

Why a separate scanner: these characters are dropped by text normalisation, so phrase and
shingle matching never see them; they must be found on the raw text. Legitimate uses are
exempt: a zero-width joiner inside an emoji sequence (👩‍💻), ZWJ/ZWNJ between letters of
scripts that need them (Persian, Indic), a leading byte-order mark, and the tag characters
of subdivision flags (🏴 + tags + cancel tag). Left-to-right/right-to-left *marks*
(U+200E/F, U+061C) are ordinary in bidirectional text and are not flagged; embeddings,
overrides and isolates (U+202A–E, U+2066–9) are.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from detectors.stream_scan import BufferedScan

INVISIBLE = re.compile(
    "[\u200b-\u200d\u2060-\u2064\ufeff\u180e\u202a-\u202e\u2066-\u2069"
    "\U000e0000-\U000e007f\U000e0100-\U000e01ef]+"
)
_TAG_LO, _TAG_HI = 0xE0000, 0xE007F
_BLACK_FLAG = "\U0001f3f4"
_CANCEL_TAG = "\U000e007f"
_MAX_RUN = 256  # long runs are reported in pieces that fit the hold-back window


def is_tag(ch: str) -> bool:
    return _TAG_LO <= ord(ch) <= _TAG_HI


def decode_tags(run: str) -> str:
    """The ASCII text that tag characters spell (U+E0041 -> "A")."""
    return "".join(chr(ord(c) - _TAG_LO) for c in run if 0xE0020 <= ord(c) <= 0xE007E)


def _emojiish(ch: str) -> bool:
    o = ord(ch)
    return (o >= 0x1F000 or 0x2190 <= o <= 0x2BFF or o in (0xFE0F, 0x00A9, 0x00AE, 0x3030, 0x20E3)
            or 0x1F3FB <= o <= 0x1F3FF)


def _joining_letter(ch: str) -> bool:
    """A non-ASCII letter or combining mark (a virama before ZWJ in Devanagari)."""
    return not ch.isascii() and (ch.isalpha() or unicodedata.category(ch) in ("Mn", "Mc"))


def _ideograph(ch: str) -> bool:
    o = ord(ch)
    return 0x3400 <= o <= 0x9FFF or 0x20000 <= o <= 0x3FFFF or 0xF900 <= o <= 0xFAFF


@dataclass(frozen=True, slots=True)
class InvisibleRun:
    start: int
    end: int
    kind: str  # tag | bidi | zero_width | variation_selector
    decoded: str  # text spelled by tag characters ("" otherwise)


def classify(run: str, prev: str, nxt: str, at_text_start: bool) -> str | None:
    """What an invisible run is, or None when it is a legitimate use."""
    if any(is_tag(c) for c in run):
        if (prev == _BLACK_FLAG and run.endswith(_CANCEL_TAG) and len(run) <= 8
                and all(is_tag(c) for c in run)):
            return None
        return "tag"
    if any("\u202a" <= c <= "\u202e" or "\u2066" <= c <= "\u2069" for c in run):
        return "bidi"
    if any(0xE0100 <= ord(c) <= 0xE01EF for c in run):
        if len(run) == 1 and prev and _ideograph(prev):
            return None
        return "variation_selector"
    if run == "\u200d" and prev and nxt and _emojiish(prev) and _emojiish(nxt):
        return None
    if run in ("\u200c", "\u200d") and prev and nxt and _joining_letter(prev) and _joining_letter(nxt):
        return None
    if run == "\ufeff" and at_text_start:
        return None
    return "zero_width"


def runs_in(text: str) -> list[InvisibleRun]:
    """Every non-exempt invisible run in a complete text."""
    out: list[InvisibleRun] = []
    if text.isascii():
        return out
    for m in INVISIBLE.finditer(text):
        s, e = m.start(), m.end()
        kind = classify(m.group(), text[s - 1] if s else "", text[e] if e < len(text) else "", s == 0)
        if kind:
            out.append(InvisibleRun(s, e, kind, decode_tags(m.group()) if kind == "tag" else ""))
    return out


class InvisibleScanner(BufferedScan[InvisibleRun]):
    """Incremental ``runs_in`` with the same results: a run is reported once the character
    after it has arrived (or at finish). A run longer than 256 characters is never a
    legitimate use; it is reported in 256-character pieces counted from its start, so that
    each piece fits the hold-back window."""

    __slots__ = ("_base", "_cut", "_pos")

    def __init__(self) -> None:
        self._buf = ""
        self._base = 0  # absolute offset of _buf[0]
        self._pos = 0  # absolute: everything before it is decided
        self._cut = False  # inside a long run that is being reported in pieces
        self._done = False

    def _scan(self, final: bool) -> list[InvisibleRun]:
        buf, base = self._buf, self._base
        n = len(buf)
        out: list[InvisibleRun] = []
        if not self._cut and buf.isascii():  # nothing invisible can be pending or new
            self._pos = base + n
            if n > 1:
                self._buf = buf[-1:]
                self._base = base + n - 1
            return out
        while True:
            rel = self._pos - base
            m = INVISIBLE.search(buf, rel)
            if m is None:
                self._pos = base + n
                self._cut = False
                break
            s, e = m.start(), m.end()
            if self._cut and s != rel:
                self._cut = False
            if e - s > _MAX_RUN:
                self._cut = True
                out.append(_piece(buf, base, s, s + _MAX_RUN))
                self._pos = base + s + _MAX_RUN
                continue
            if e == n and not final:
                self._pos = base + s
                break
            if self._cut:
                out.append(_piece(buf, base, s, e))
                self._cut = False
            else:
                run = buf[s:e]
                kind = classify(run, buf[s - 1] if s else "", buf[e] if e < n else "", base + s == 0)
                if kind:
                    out.append(InvisibleRun(base + s, base + e, kind,
                                            decode_tags(run) if kind == "tag" else ""))
            self._pos = base + e
        keep_from = max(0, self._pos - base - 1)  # one character of context for the next run
        if keep_from:
            self._buf = buf[keep_from:]
            self._base = base + keep_from
        return out

    def safe_point(self) -> int:
        """Where a run not reported yet may start: everything before ``_pos`` is decided."""
        return self._pos


def _piece(buf: str, base: int, s: int, e: int) -> InvisibleRun:
    run = buf[s:e]
    kind = classify(run, "", "", False) or "zero_width"
    return InvisibleRun(base + s, base + e, kind, decode_tags(run) if kind == "tag" else "")
