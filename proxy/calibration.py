"""Calibration of a model's confidence against its correctness, for ``gapwatch eval``.

A calibrated model is right about 70 % of the time when it is 70 % sure; an overconfident one
is as sure of its wrong answers as of its right ones, and its confidence cannot be used to
route, abstain or ask a human. Input: one ``(confidence, correct)`` pair per answer, the
confidence in [0, 1] (from token logprobs, ``detectors.uncertainty.response_confidence``, or
verbalised by the model: ``verbalised``), correctness from the case's checks.

Figures (``summary``):

- expected calibration error (ECE): answers in ``BINS`` equal-width confidence bins, the
  mean over bins of |accuracy - mean confidence| weighted by the bin's share of answers
  (0 is perfect; a model always 97 % sure and right half the time scores about 0.47);
- Brier score: the mean squared difference between confidence and correctness (0 or 1);
  unlike ECE it also rewards confidence that separates right from wrong;
- the accuracy of the most confident ``EXTREME_SHARE`` of answers against the least
  confident share: a usable confidence makes the first clearly higher;
- the reliability diagram's points (per bin: range, answers, mean confidence, accuracy).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

BINS = 10
EXTREME_SHARE = 0.2

# "Confidence: 80%", "confidence = 0.8", "**Confidence:** 80 %" on a line of its own
_VERBALISED = re.compile(r"^[ \t>*_-]*confidence[ \t*_]*[:=][ \t*_]*(\d{1,3}(?:\.\d+)?)[ \t]*(%?)[ \t*_.]*$",
                         re.IGNORECASE | re.MULTILINE)

Pair = tuple[float, bool]


def verbalised(text: str) -> tuple[str, float | None]:
    """The answer without its last "Confidence: N%" line, and that confidence (None when the
    model gave none). Numbers above 1, or with %, are percentages."""
    found = list(_VERBALISED.finditer(text))
    if not found:
        return text, None
    m = found[-1]
    value = float(m.group(1))
    if m.group(2) or value > 1.0:
        value /= 100.0
    return (text[:m.start()] + text[m.end():]).strip(), min(1.0, max(0.0, value))


def _bin(confidence: float) -> int:
    return min(BINS - 1, max(0, int(confidence * BINS)))


def reliability(pairs: Sequence[Pair]) -> list[dict[str, float | int | None]]:
    """Per bin: its range, the answers in it, their mean confidence and accuracy (None when
    the bin is empty). The last bin includes a confidence of exactly 1."""
    groups: list[list[Pair]] = [[] for _ in range(BINS)]
    for c, ok in pairs:
        groups[_bin(c)].append((c, ok))
    out: list[dict[str, float | int | None]] = []
    for i, g in enumerate(groups):
        n = len(g)
        out.append({"lo": round(i / BINS, 6), "hi": round((i + 1) / BINS, 6), "n": n,
                    "confidence": round(sum(c for c, _ in g) / n, 6) if n else None,
                    "accuracy": round(sum(ok for _, ok in g) / n, 6) if n else None})
    return out


def ece(pairs: Sequence[Pair]) -> float | None:
    if not pairs:
        return None
    total = len(pairs)
    err = 0.0
    for b in reliability(pairs):
        n = int(b["n"] or 0)
        if n:
            err += n / total * abs(float(b["accuracy"] or 0.0) - float(b["confidence"] or 0.0))
    return round(err, 6)


def brier(pairs: Sequence[Pair]) -> float | None:
    if not pairs:
        return None
    return round(sum((c - float(ok)) ** 2 for c, ok in pairs) / len(pairs), 6)


def extremes(pairs: Sequence[Pair], share: float = EXTREME_SHARE) -> tuple[float | None, float | None, int]:
    """(accuracy of the most confident share, of the least confident share, answers in each).
    Ties in confidence keep the answers' order; fewer than two answers give no figures."""
    if len(pairs) < 2:
        return None, None, 0
    k = max(1, round(share * len(pairs)))
    order = sorted(range(len(pairs)), key=lambda i: pairs[i][0])
    low = [pairs[i][1] for i in order[:k]]
    high = [pairs[i][1] for i in order[-k:]]
    return round(sum(high) / k, 6), round(sum(low) / k, 6), k


def summary(pairs: Sequence[Pair], sources: dict[str, int] | None = None) -> dict[str, object]:
    """Every calibration figure of one model (None where there are no answers)."""
    top, bottom, k = extremes(pairs)
    n = len(pairs)
    return {
        "n": n, "sources": dict(sources or {}), "ece": ece(pairs), "brier": brier(pairs),
        "mean_confidence": round(sum(c for c, _ in pairs) / n, 6) if n else None,
        "accuracy": round(sum(ok for _, ok in pairs) / n, 6) if n else None,
        "top_share": EXTREME_SHARE, "top_n": k, "top_accuracy": top, "bottom_accuracy": bottom,
        "bins": reliability(pairs),
    }
