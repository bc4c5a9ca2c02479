"""Tests for detectors.uncertainty: token-logprob statistics and low-confidence runs."""

from __future__ import annotations

import math

import pydantic
import pytest

from detectors.base import TEXT, Channel, RequestContext, StreamEnd
from detectors.uncertainty import CONFIGS, UncertaintyConfig, UncertaintyDetector, UncertaintyStats
from tests.unit.compliance import assert_compliant

CTX = RequestContext()

# "The capital of Freedonia is Zorbleville, founded in 1842." with a guessed name and year
TOKENS = [
    ("The", -0.01), (" capital", -0.05), (" of", -0.001), (" Fre", -0.3), ("edonia", -0.02),
    (" is", -0.01), (" Z", -3.1), ("orb", -4.2), ("leville", -2.9), (",", -0.2), (" founded", -0.4),
    (" in", -0.1), (" 18", -2.7), ("42", -3.3), (".", -0.05),
]
TEXT_ = "".join(t for t, _ in TOKENS)


def run_tokens(det: UncertaintyDetector, tokens: list[tuple[str, float]], batch: int = 1,
               channel: Channel = TEXT) -> tuple[list, object]:
    state = det.start(CTX)
    fs = []
    for i in range(0, len(tokens), batch):
        chunk = tokens[i : i + batch]
        fs += state.feed(channel, "".join(t for t, _ in chunk))
        fs += state.feed_logprobs(channel, chunk)
    fs += state.finish(channel, StreamEnd("stop"))
    fs += state.finish_response()
    return fs, state._prepared


def test_low_confidence_run_spans_the_guessed_name() -> None:
    det = UncertaintyDetector(UncertaintyConfig(min_run_tokens=2, min_tokens=100))
    fs, _ = run_tokens(det, TOKENS)
    runs = [TEXT_[f.span[0] : f.span[1]] for f in fs if f.category == "low_confidence_run"]
    assert runs == ["Zorbleville", "1842"]
    f = fs[0]
    assert f.attrs["tokens"] == 3 and f.evidence != "Zorbleville"  # masked


def test_batching_does_not_change_findings() -> None:
    det = UncertaintyDetector(UncertaintyConfig(min_run_tokens=2, min_tokens=5))
    ref = sorted((f.category, f.span) for f in run_tokens(det, TOKENS)[0])
    for batch in (2, 3, 7, len(TOKENS)):
        assert sorted((f.category, f.span) for f in run_tokens(det, TOKENS, batch)[0]) == ref


def test_short_runs_do_not_fire() -> None:
    det = UncertaintyDetector(UncertaintyConfig(min_run_tokens=4, min_tokens=100))
    assert run_tokens(det, TOKENS)[0] == []


def test_response_stats_and_share() -> None:
    det = UncertaintyDetector(UncertaintyConfig(min_tokens=10, max_low_share=0.2))
    fs, prepared = run_tokens(det, TOKENS)
    stats = det.response_stats(prepared)
    assert isinstance(stats, UncertaintyStats)
    assert stats.tokens == 15 and stats.min_logprob == -4.2
    assert stats.low_share == pytest.approx(5 / 15)
    assert stats.mean_logprob == pytest.approx(sum(lp for _, lp in TOKENS) / 15)
    low = [f for f in fs if f.category == "low_confidence"]
    assert len(low) == 1 and low[0].span is None and low[0].score == pytest.approx(5 / 15)
    assert det.response_metrics(prepared)["low_runs"] == 1


def test_confident_answer_is_silent_but_measured() -> None:
    det = UncertaintyDetector(UncertaintyConfig())
    tokens = [(f" w{i}", -0.1) for i in range(50)]
    fs, prepared = run_tokens(det, tokens)
    assert fs == []
    stats = det.response_stats(prepared)
    assert stats is not None and stats.low_share == 0 and stats.mean_logprob == pytest.approx(-0.1)


def test_without_logprobs_nothing_and_no_stats() -> None:
    det = UncertaintyDetector(UncertaintyConfig())
    assert UncertaintyDetector.wants_logprobs is True
    text = "The capital of Freedonia is Zorbleville, founded in 1842. " * 4
    assert assert_compliant(det, CTX, text) == []
    state = det.start(CTX)
    state.feed(TEXT, text)
    state.finish(TEXT, StreamEnd("stop"))
    assert det.response_stats(state._prepared) is None and det.response_metrics(state._prepared) == {}


def test_whitespace_tokens_and_bad_values() -> None:
    det = UncertaintyDetector(UncertaintyConfig(min_run_tokens=2, min_tokens=1000))
    tokens = [("A", -0.1), (" ", -0.1), ("Qx", -5.0), (" ", -0.01), ("Vy", float("-inf")),
              ("!", float("nan")), (" ok", -0.1)]
    text = "".join(t for t, _ in tokens)
    fs, prepared = run_tokens(det, tokens)
    assert [text[f.span[0] : f.span[1]] for f in fs] == ["Qx Vy"]  # high-prob space does not break it
    stats = det.response_stats(prepared)
    assert stats is not None and stats.tokens == 6 and math.isfinite(stats.mean_logprob)
    assert stats.min_logprob == -100.0


def test_finish_is_idempotent_and_channels_are_separate() -> None:
    det = UncertaintyDetector(UncertaintyConfig(min_run_tokens=2, min_tokens=1000))
    state = det.start(CTX)
    other = Channel(choice=1)
    state.feed_logprobs(TEXT, [(" Zor", -4.0), ("ble", -4.0)])
    state.feed_logprobs(other, [("Fine", -0.1)])
    first = state.finish(TEXT, StreamEnd("stop"))
    assert [f.span for f in first] == [(1, 7)]
    assert state.finish(TEXT, StreamEnd("stop")) == []
    assert state.finish(other, StreamEnd("stop")) == []
    assert state.finish_response() == [] and state.finish_response() == []
    assert det.response_stats(state._prepared).tokens == 3


def test_tool_call_channels_are_ignored() -> None:
    det = UncertaintyDetector(UncertaintyConfig(min_run_tokens=1, min_tokens=1))
    channel = Channel(kind="tool_call", tool_index=0)
    assert run_tokens(det, [("{", -9.0), ('"a"', -9.0)], channel=channel)[0] == []


def test_config() -> None:
    assert CONFIGS["uncertainty"] is UncertaintyConfig
    with pytest.raises(pydantic.ValidationError):
        UncertaintyConfig(low_logprobs=-1)
    assert UncertaintyConfig().build().lookback_chars == 0
