"""Tests for detectors.transparency: refusals, abstentions and hedges as low-severity signals."""

from __future__ import annotations

import pydantic
import pytest

from detectors.base import TEXT, Channel, RequestContext, Severity, StreamEnd
from detectors.transparency import (
    CONFIGS,
    PHRASES_FILE,
    TransparencyConfig,
    TransparencyDetector,
    _compile_template,
    load_phrases,
)
from tests.unit.compliance import assert_compliant, run

CTX = RequestContext()


@pytest.fixture(scope="module")
def det() -> TransparencyDetector:
    return TransparencyDetector(TransparencyConfig())


def signals(det: TransparencyDetector, text: str) -> list[tuple[str, str]]:
    return [(f.category, text[f.span[0] : f.span[1]]) for f in run(det, CTX, text)]


def classify(det: TransparencyDetector, text: str, finish_reason: str = "stop") -> str:
    state = det.start(CTX)
    state.feed(TEXT, text)
    state.finish(TEXT, StreamEnd(finish_reason))
    state.finish_response()
    return det.classification(state._prepared)


@pytest.mark.parametrize("text", [
    "I can't help with that.",
    "I’m sorry, but I cannot assist with this request.",
    "Sorry, but I won't write that.",
    "I'm not able to provide that information.",
    "I must respectfully decline.",
    "As an AI language model, I cannot browse the web.",
    "I am unable to comply with this request.",
    "That request goes against my guidelines.",
])
def test_refusals(det: TransparencyDetector, text: str) -> None:
    assert [c for c, _ in signals(det, text)][:1] == ["refusal"]
    assert classify(det, text) == "refused"


@pytest.mark.parametrize("text", [
    "I don't know.",
    "The context does not say when he was born.",
    "The provided documents don't mention the price.",
    "I don't have enough information to answer that.",
    "There is no information about the author in the passage.",
    "This is not mentioned in the context.",
    "I couldn't find any reference to that event.",
    "Based on the provided context, I cannot tell who won.",
    "It cannot be determined from the text.",
    "I'm sorry, but I cannot find that in the document.",
])
def test_abstentions(det: TransparencyDetector, text: str) -> None:
    cats = [c for c, _ in signals(det, text)]
    assert "abstention" in cats and "refusal" not in cats, cats
    assert classify(det, text) == "abstained"


@pytest.mark.parametrize(("text", "phrase"), [
    ("I think the answer is Paris.", "I think"),
    ("It is probably 1998.", "probably"),
    ("It might be a later edition.", "It might be"),
    ("As far as I know, the bridge is still open.", "As far as I know"),
    ("I'm not sure, but it seems to be the 2019 model.", "I'm not sure"),
    ("To the best of my knowledge it was never released.", "To the best of my knowledge"),
    ("The most likely cause is a loose cable.", "most likely"),
])
def test_hedges(det: TransparencyDetector, text: str, phrase: str) -> None:
    found = signals(det, text)
    assert ("hedge", phrase) in found, found
    assert classify(det, text) == "answered"


@pytest.mark.parametrize("text", [
    "The thinker wrote three books.",            # "think" inside a word
    "The probability is 0.3.",                   # not "probably"
    "I know the answer: it is Paris.",           # knowing is not abstaining
    "The likelihood ratio was 4.2.",
    "Helping users is what the help desk does.",
    "The document says the price is $40.",
    "I can help with that: the bridge opened in 1932.",
    "He said the context does matter.",
])
def test_near_misses_are_silent(det: TransparencyDetector, text: str) -> None:
    assert signals(det, text) == []
    assert classify(det, text) == "answered"


def test_findings_are_low_severity_signals(det: TransparencyDetector) -> None:
    fs = run(det, CTX, "I'm sorry, but I can't help with that. I think you should ask a lawyer.")
    assert {f.category for f in fs} == {"refusal", "hedge"}
    for f in fs:
        assert f.severity is Severity.low and f.detector == "transparency" and f.replacement is None
        assert f.evidence == f.evidence.lower() and len(f.evidence) <= 80


def test_late_abstention_in_a_long_answer_still_answered(det: TransparencyDetector) -> None:
    text = ("The bridge opened in 1932 and carries eight lanes of road traffic, two railway lines, "
            "a footway and a cycleway. " * 5) + "The context does not say who paid for the repairs."
    assert classify(det, text) == "answered"
    assert ("abstention", "The context does not say") in signals(det, text)


def test_content_filter_finish_is_refused(det: TransparencyDetector) -> None:
    assert classify(det, "Here is the", finish_reason="content_filter") == "refused"


def test_compliance_on_realistic_texts(det: TransparencyDetector) -> None:
    texts = [
        "I’m sorry, but I can’t help with that. However, I think a lawyer could. It might be "
        "worth asking one; probably the local bar association can refer you.",
        "The context does not specify the year. As far as I know, the first edition was "
        "probably printed in 1851, but I'm not certain.\n\nI don't know who the printer was.",
        "Plain answer with no signals at all: the capital of France is Paris." * 3,
    ]
    for i, text in enumerate(texts):
        assert_compliant(det, CTX, text, seed=i)


def test_match_split_exactly_at_chunk_edges(det: TransparencyDetector) -> None:
    text = "Well, I do not know the answer."
    whole = signals(det, text)
    for cut in range(1, len(text)):
        state = det.start(CTX)
        fs = state.feed(TEXT, text[:cut]) + state.feed(TEXT, text[cut:]) + state.finish(TEXT, StreamEnd("stop"))
        assert [(f.category, text[f.span[0] : f.span[1]]) for f in fs] == whole


def test_memory_is_bounded(det: TransparencyDetector) -> None:
    state = det.start(CTX)
    for _ in range(2000):
        state.feed(TEXT, "The bridge carries eight lanes. ")
    assert len(state._channels[TEXT.key]._buf) <= det._window + 40


def test_tool_calls_are_ignored(det: TransparencyDetector) -> None:
    channel = Channel(kind="tool_call", tool_index=0)
    assert run(det, CTX, '{"reply": "I don\'t know"}', channel=channel) == []


def test_response_metrics(det: TransparencyDetector) -> None:
    state = det.start(CTX)
    state.feed(TEXT, "I think it is probably Paris.")
    state.finish(TEXT, StreamEnd("stop"))
    m = det.response_metrics(state._prepared)
    assert m == {"classification": "answered", "refusal": 0, "abstention": 0, "hedge": 2}


def test_config_extra_phrases_and_categories() -> None:
    det = TransparencyDetector(TransparencyConfig(extra_phrases={"abstention": ("no {idea|clue}",)},
                                                  categories=("abstention",)))
    assert signals(det, "No idea, I think.") == [("abstention", "No idea")]
    with pytest.raises(ValueError, match="unknown category"):
        TransparencyDetector(TransparencyConfig(extra_phrases={"rant": ("x",)}))
    with pytest.raises(ValueError, match="categories"):
        TransparencyDetector(TransparencyConfig(categories=("refusal", "other")))
    with pytest.raises(pydantic.ValidationError):
        TransparencyConfig(action_level=1)
    assert CONFIGS["transparency"] is TransparencyConfig


def test_phrase_file_compiles_within_window() -> None:
    phrases = load_phrases(PHRASES_FILE)
    assert all(phrases[c] for c in ("refusal", "abstention", "hedge"))
    for templates in phrases.values():
        for t in templates:
            _, longest = _compile_template(t)
            assert longest <= 120, t
    source, longest = _compile_template("I {can't|cannot} {help|}")
    assert longest == len("I") + 4 + len("cannot") + 4 + len("help")
    assert "\u2019" in source
