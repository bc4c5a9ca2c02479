"""Scorecard comparison with a baseline (``proxy.scorecard``): direction per property, margins
and their precedence, missing values and models."""

from __future__ import annotations

from typing import Any

import pytest

from proxy import scorecard


def report(**models: dict[str, float | None]) -> dict[str, Any]:
    return {"kind": "gapwatch.eval", "suite": "s", "models": list(models), "paraphrases": 0,
            "per_model": {m: {"scorecard": {k: card.get(k) for k in scorecard.KEYS}} for m, card in models.items()}}


def test_regressions_follow_each_property_direction() -> None:
    before = report(a={"accuracy": 0.9, "ece": 0.05, "brier": 0.1, "robustness": None},
                    b={"accuracy": 0.5})
    after = report(a={"accuracy": 0.8, "ece": 0.04, "brier": 0.2, "robustness": 0.9}, b={"accuracy": 0.56},
                   c={"accuracy": 1.0})
    cmp = scorecard.compare(after, scorecard.check_baseline(before, "x"), scorecard.margins_from(None, {}, {}))
    rows = cmp["models"]["a"]["properties"]
    assert rows["accuracy"]["regressed"] and rows["accuracy"]["worse_by"] == pytest.approx(0.1)
    assert not rows["ece"]["regressed"] and rows["ece"]["worse_by"] == pytest.approx(-0.01)  # lower ECE: better
    assert rows["brier"]["regressed"]
    assert rows["robustness"]["change"] is None and not rows["robustness"]["regressed"]  # nothing to compare
    assert not cmp["models"]["b"]["properties"]["accuracy"]["regressed"]  # better
    assert {(r["model"], r["property"]) for r in cmp["regressions"]} == {("a", "accuracy"), ("a", "brier")}
    assert cmp["not_in_baseline"] == ["c"]
    text = "\n".join(scorecard.render_comparison(cmp))
    assert "REGRESSION" in text and "2 regressions beyond the margins" in text and "c: not in the baseline" in text


def test_margin_precedence() -> None:
    assert scorecard.margins_from(None, {}, {})["ece"] == scorecard.DEFAULT_MARGIN
    assert scorecard.margins_from(None, {}, {"ece": 0.01})["ece"] == 0.01
    assert scorecard.margins_from(0.2, {}, {"ece": 0.01})["ece"] == 0.2
    assert scorecard.margins_from(0.2, {"ece": 0.03}, {"ece": 0.01}) == {**dict.fromkeys(scorecard.KEYS, 0.2),
                                                                         "ece": 0.03}
    within = scorecard.compare(report(a={"accuracy": 0.86}), report(a={"accuracy": 0.9}),
                               scorecard.margins_from(None, {"accuracy": 0.05}, {}))
    assert within["regressions"] == []


def test_best_marks() -> None:
    assert scorecard.best("ece", [0.1, 0.4]) == {0}
    assert scorecard.best("accuracy", [0.5, 0.9, 0.9]) == {1, 2}
    assert scorecard.best("accuracy", [0.5, 0.5]) == set() and scorecard.best("accuracy", [0.5, None]) == set()


def test_baseline_must_be_a_report() -> None:
    with pytest.raises(scorecard.BaselineError, match="not a gapwatch eval report"):
        scorecard.check_baseline({"kind": "gapwatch.replay"}, "f.json")
    with pytest.raises(scorecard.BaselineError, match="no scorecard for m"):
        scorecard.check_baseline({"kind": "gapwatch.eval", "per_model": {"m": {"task": {}}}}, "f.json")
