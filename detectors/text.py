"""Text normalisation and word shingles shared by the overlap-based detectors
(system-prompt leak, cross-tenant, injection echo, grounding).

Normalisation folds case, Unicode compatibility forms (NFKC), common confusables and
whitespace, and drops invisible format characters, so that light edits do not hide a copy.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

# Letters that render like ASCII but are not (a small, practical subset of Unicode's
# confusables table: Cyrillic and Greek look-alikes used to dodge filters).
_CONFUSABLES = str.maketrans(
    {
        "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i",
        "ј": "j", "ѕ": "s", "һ": "h", "ԁ": "d", "ո": "n", "ɡ": "g",
        "Α": "a", "Β": "b", "Ε": "e", "Ζ": "z", "Η": "h", "Ι": "i", "Κ": "k", "Μ": "m",
        "Ν": "n", "Ο": "o", "Ρ": "p", "Τ": "t", "Υ": "y", "Χ": "x", "ο": "o", "ν": "v",
        "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-",
    }
)

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?", re.UNICODE)


def strip_invisible(text: str) -> str:
    """Remove format characters (zero-width, bidi controls, tag characters)."""
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    # fold before and after case folding: capitals fold to look-alikes the table maps too
    text = strip_invisible(text).translate(_CONFUSABLES).casefold().translate(_CONFUSABLES)
    return text


def words(text: str) -> list[str]:
    """Normalised word tokens."""
    return _WORD.findall(normalise(text))


def word_spans(text: str) -> list[tuple[str, int, int]]:
    """Normalised words with their character spans in the *original* text.

    NFKC can change lengths, so tokens are found on the original and normalised one by one.
    """
    out: list[tuple[str, int, int]] = []
    for m in _WORD.finditer(text):
        w = normalise(m.group())
        if w:
            out.append((w, m.start(), m.end()))
    return out


def shingle_hash(tokens: Iterable[str]) -> int:
    """Stable 64-bit hash of a shingle (stable across processes, unlike ``hash``)."""
    h = hashlib.blake2b("\x1f".join(tokens).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


def shingles(tokens: list[str], k: int) -> set[int]:
    """Hashes of every run of ``k`` consecutive tokens (the whole list when shorter)."""
    if not tokens:
        return set()
    if len(tokens) < k:
        return {shingle_hash(tokens)}
    return {shingle_hash(tokens[i : i + k]) for i in range(len(tokens) - k + 1)}
