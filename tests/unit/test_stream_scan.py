"""The fast regex path (native RE2 calls without capture groups, scans per batch) finds exactly
what the capture-group alternation finds, and the pipeline's batched feeding loses nothing."""

from __future__ import annotations

import re2
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors.base import Channel, RequestContext, StreamEnd
from detectors.custom import RegexConfig
from detectors.stream_scan import StreamScanner, named_alternatives
from proxy.config import load_dict
from proxy.pipeline import OBSERVE_BATCH_CHARS, Policy, ResponsePipeline

PATTERNS = {
    "word": r"\bab+c?\b",
    "ticket": r"T-[0-9]{2,4}",
    "greedy": r"(?i)x\s*y+",
    "alt": r"ab|abd",
    "uni": r"é+[a-z]",
}
alphabet = st.sampled_from(list("abcdTxy-0123 é\u00e9.\nABX"))


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=alphabet, max_size=80), pos=st.integers(0, 10))
def test_named_alternatives_match_the_capture_alternation(text, pos):
    alts = named_alternatives(PATTERNS)
    assert alts is not None
    slow = re2.compile("|".join(f"(?P<{n}>{p})" for n, p in PATTERNS.items()))
    pos = min(pos, len(text))
    want = [(m.start(), m.end(), m.lastgroup, m.group(0)) for m in slow.finditer(text, pos)]
    got = [(m.start(), m.end(), m.lastgroup, m.group(0)) for m in alts.finditer(text, pos)]
    assert got == want


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=alphabet, max_size=120), cuts=st.lists(st.integers(1, 30), min_size=1, max_size=30))
def test_scanner_with_finder_equals_scanner_without(text, cuts):
    alts = named_alternatives(PATTERNS)
    assert alts is not None
    slow = re2.compile("|".join(f"(?P<{n}>{p})" for n, p in PATTERNS.items()))
    fast_scan = StreamScanner(alts, 16, 8, alts.finder)
    slow_scan = StreamScanner(slow, 16, 1)
    got, want, i = [], [], 0
    for c in cuts:
        piece = text[i : i + c]
        i += c
        got += [(s, e, m.lastgroup) for s, e, m in fast_scan.feed(piece)]
        want += [(s, e, m.lastgroup) for s, e, m in slow_scan.feed(piece)]
    rest = text[i:]
    got += [(s, e, m.lastgroup) for s, e, m in fast_scan.feed(rest) + fast_scan.finish()]
    want += [(s, e, m.lastgroup) for s, e, m in slow_scan.feed(rest) + slow_scan.finish()]
    assert got == want


def _policy(action: str) -> Policy:
    cfg = load_dict({
        "upstreams": {"u": {"base_url": "http://127.0.0.1:1/v1"}},
        "routes": [{"upstream": "u"}],
        "policies": {"default": {"detectors": {
            "regex": {"action": action, "patterns": {"t": "T-[0-9]{4}"}, "max_match_chars": 16},
            "max_output_chars": {"action": "observe", "max_chars": 10}}}},
    })
    return Policy.build("default", cfg.config.policies["default"], cfg.detectors["default"])


def test_batched_feeding_is_flushed_before_finish_and_counted():
    pol = _policy("annotate")
    regex_det = pol.detectors[0]
    assert dict(zip((e.name for e in pol.entries), pol.feed_batches, strict=True)) == {
        "regex": OBSERVE_BATCH_CHARS, "max_output_chars": OBSERVE_BATCH_CHARS}
    pl = ResponsePipeline(pol, RequestContext())
    ch = Channel()
    for c in "see T-1234 and more":  # far less than a batch: only finish feeds it
        pl.feed(ch, c)
    assert not pl.outcome.applied
    pl.finish_channel(ch, StreamEnd(finish_reason="stop"))
    assert sorted(a.finding.category for a in pl.outcome.applied) == ["t", "too_long"]
    assert next(a.finding.span for a in pl.outcome.applied if a.finding.category == "t") == (4, 10)
    assert set(pl.outcome.detector_ns) == {"regex", "max_output_chars"}
    assert regex_det.feed_batch_chars > 1 and regex_det.lookback_chars >= 16 + regex_det.feed_batch_chars - 1


def test_redacting_detector_is_fed_every_delta_and_release_never_passes_a_match():
    """An enforcing detector sees every delta (release waits for its safe point, so it must
    be current); whatever the pipeline releases before the match completes stops short of it."""
    pol = _policy("redact")
    batch = dict(zip((e.name for e in pol.entries), pol.feed_batches, strict=True))["regex"]
    assert batch == 1
    assert pol.holdback_chars == pol.detectors[0].lookback_chars
    pl = ResponsePipeline(pol, RequestContext())
    ch = Channel()
    text = "x" * 40 + "T-1234" + "y" * 200
    led = pl.ledger(ch)
    out = []
    for i in range(0, len(text), 3):
        pl.feed(ch, text[i : i + 3])
        line = pl.release_line(ch)
        out.append(led.cut(led.released, line, text[led.released : line]))
    pl.finish_channel(ch, StreamEnd(finish_reason="stop"))
    out.append(led.cut(led.released, led.total, text[led.released :]))
    assert "".join(out) == "x" * 40 + "[REDACTED:t]" + "y" * 200
    assert pl.outcome.late_redactions == 0


def test_regex_detector_finds_the_same_with_and_without_native_calls():
    det = RegexConfig(patterns=PATTERNS, max_match_chars=16).build()
    text = "ab abbc T-12 x  yyy éa abd T-99999 " * 3

    def run() -> list[tuple[tuple[int, int] | None, str]]:
        state = det.start(RequestContext())
        found = []
        for i in range(0, len(text), 7):
            found += state.feed(Channel(), text[i : i + 7])
        found += state.finish(Channel(), StreamEnd())
        return [(f.span, f.category) for f in found]

    fast = run()
    assert len(fast) == 21
    det._pattern, det._finder = det._alternatives._fallback, None  # type: ignore[union-attr]
    assert run() == fast


def test_an_empty_match_inside_a_multibyte_character_does_not_raise():
    # RE2 works on UTF-8 bytes: \B can match between the bytes of "é"
    alts = named_alternatives({"digits": r"\B\d*"})
    assert alts is not None
    text = "café au lait, 1234 et ünïcödé 56"
    spans = [(m.start(), m.end()) for m in alts.finditer(text)]
    assert (15, 18) in spans and all(0 <= s <= e <= len(text) for s, e in spans)
    loaded = load_dict({"upstreams": {"u": {"base_url": "http://127.0.0.1:1/v1"}}, "routes": [{"upstream": "u"}],
                        "policies": {"p": {"detectors": {"regex": {"action": "observe",
                                                                   "patterns": {"digits": r"\B\d+"}}}}}})
    pl = ResponsePipeline(Policy.build("p", loaded.config.policies["p"], loaded.detectors["p"]), RequestContext())
    for i in range(0, len(text), 3):
        pl.feed(Channel(), text[i : i + 3])
    pl.finish()
    assert pl.outcome.detector_errors == []
