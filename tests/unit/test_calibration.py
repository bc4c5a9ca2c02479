"""Calibration figures (``proxy.calibration``) against values worked out by hand."""

from __future__ import annotations

import pytest

from proxy.calibration import brier, ece, extremes, reliability, summary, verbalised


def test_ece_and_brier_by_hand() -> None:
    # bin 0.8-0.9: confidences 0.8, 0.8, 0.8, 0.8 and 2 of 4 right -> |0.5 - 0.8| = 0.3, weight 4/6
    # bin 0.2-0.3: 0.2, 0.2 and 0 of 2 right -> |0 - 0.2| = 0.2, weight 2/6
    pairs = [(0.8, True), (0.8, True), (0.8, False), (0.8, False), (0.2, False), (0.2, False)]
    assert ece(pairs) == pytest.approx(4 / 6 * 0.3 + 2 / 6 * 0.2, abs=1e-6)
    assert brier(pairs) == pytest.approx((2 * 0.04 + 2 * 0.64 + 2 * 0.04) / 6, abs=1e-6)
    perfect = [(0.7, True)] * 7 + [(0.7, False)] * 3
    assert ece(perfect) == pytest.approx(0.0, abs=1e-9)
    assert ece([]) is None and brier([]) is None


def test_bins_are_equal_width_and_include_one() -> None:
    bins = reliability([(0.0, False), (0.05, True), (0.1, True), (0.999, True), (1.0, True)])
    assert len(bins) == 10 and [b["lo"] for b in bins][:3] == [0.0, 0.1, 0.2]
    assert [b["n"] for b in bins] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins[0]["accuracy"] == 0.5 and bins[9]["confidence"] == pytest.approx(0.9995)
    assert bins[5]["accuracy"] is None


def test_most_against_least_confident() -> None:
    pairs = [(i / 10, i >= 5) for i in range(10)]
    assert extremes(pairs) == (1.0, 0.0, 2)
    assert extremes([(0.5, True)]) == (None, None, 0)
    s = summary(pairs, {"logprobs": 10})
    assert s["n"] == 10 and s["top_accuracy"] == 1.0 and s["accuracy"] == 0.5 and s["sources"] == {"logprobs": 10}


@pytest.mark.parametrize(("text", "rest", "conf"), [
    ("The code is QX-1.\n\nConfidence: 80%", "The code is QX-1.", 0.8),
    ("QX-1\nconfidence = 0.35", "QX-1", 0.35),
    ("QX-1\n**Confidence:** 90 %\n", "QX-1", 0.9),
    ("Confidence: 20%\nmore\nConfidence: 70%", "Confidence: 20%\nmore", 0.7),  # the last one counts
    ("QX-1\nConfidence: 250%", "QX-1", 1.0),
    ("My confidence: high", "My confidence: high", None),
])
def test_verbalised(text: str, rest: str, conf: float | None) -> None:
    assert verbalised(text) == (rest, conf)
