"""Tests for detectors.grounding: claims that must fire, paraphrases that must not, streaming."""

from __future__ import annotations

import pydantic
import pytest

from detectors.base import TEXT, Channel, Message, RequestContext, StreamEnd
from detectors.grounding import CONFIGS, Evidence, GroundingConfig, GroundingDetector, stem
from tests.conftest import require_halueval
from tests.unit.compliance import assert_compliant, run

CONTEXT = """<document index="1">
Northwind Robotics, a warehouse-automation company based in Rotterdam, reported revenue of
EUR 1,213 million for the fiscal year 2023, up 18% from the previous year. The company was
founded in 2009 by Ingrid Vos and Tomas Berg. Chief executive Ingrid Vos said the growth came
mainly from its autonomous forklift line, which now accounts for 42 percent of sales.
</document>
<document index="2">
In March 2024 Northwind opened a second factory in Gdansk, Poland, employing about 650 people.
The firm plans to hire twelve hundred engineers over the next three years and to expand into
the North American market through a partnership with Cascade Logistics of Seattle.
Analysts at Meridian Capital expect margins to remain under pressure because of rising
component costs.
</document>"""

# A faithful summary that paraphrases freely: other verbs, rounded and re-spelled numbers,
# "CEO" for "chief executive", "1,200" for "twelve hundred", a citation per document.
FAITHFUL = (
    "Northwind Robotics, which is headquartered in Rotterdam, earned roughly EUR 1.2 billion in "
    "2023, an increase of 18 percent on the year before [1]. Its autonomous forklifts made up 42% "
    "of sales, according to CEO Ingrid Vos, who co-founded the firm with Tomas Berg in 2009.\n\n"
    "In March 2024 the company opened another plant in Gdansk with around 650 staff [2]. It "
    "intends to recruit 1,200 engineers during the coming three years and to enter North America "
    "by partnering with Seattle-based Cascade Logistics. Meridian Capital analysts warn that "
    "higher component costs will keep margins under pressure."
)

FABRICATIONS = {
    "unsupported_number": ("42%", "57%"),
    "unsupported_entity": ("Tomas Berg", "Pieter Jansen"),
}


def ctx_with(context: str = CONTEXT, question: str = "Summarise the two documents.") -> RequestContext:
    return RequestContext(messages=(
        Message("system", "You are a helpful analyst.", 0),
        Message("user", f"{context}\n\n{question}", 1),
    ))


@pytest.fixture(scope="module")
def det() -> GroundingDetector:
    return GroundingDetector(GroundingConfig())


def findings(det: GroundingDetector, text: str, ctx: RequestContext | None = None) -> list:
    return run(det, ctx or ctx_with(), text)


def cats(fs: list) -> list[str]:
    return sorted(f.category for f in fs)


def spans(fs: list, text: str, category: str) -> list[str]:
    return [text[f.span[0] : f.span[1]] for f in fs if f.category == category]


def score(det: GroundingDetector, text: str, ctx: RequestContext | None = None) -> float | None:
    state = det.start(ctx or ctx_with())
    state.feed(TEXT, text)
    state.finish(TEXT, StreamEnd("stop"))
    state.finish_response()
    return det.response_score(state._prepared)


# -- the long-answer cases the issue asks for -------------------------------------------------


def test_faithful_paraphrased_summary_does_not_fire(det: GroundingDetector) -> None:
    assert findings(det, FAITHFUL) == []
    s = score(det, FAITHFUL)
    assert s is not None and s > det.cfg.threshold + 0.05


@pytest.mark.parametrize(
    ("old", "new", "category", "claim"),
    [
        ("42%", "57%", "unsupported_number", "57%"),
        ("in 2009", "in 2012", "unsupported_number", "2012"),
        ("In March 2024", "In October 2024", "unsupported_number", "October"),
        ("around 650 staff", "around 950 staff", "unsupported_number", "950"),
        ("Tomas Berg", "Pieter Jansen", "unsupported_entity", "Pieter Jansen"),
        ("in Gdansk", "in Warsaw", "unsupported_entity", "Warsaw"),
        ("Cascade Logistics", "Summit Freight", "unsupported_entity", "Summit Freight"),
        ("[2]", "[4]", "unsupported_citation", "[4]"),
    ],
)
def test_summary_with_one_changed_fact_fires(det: GroundingDetector, old: str, new: str, category: str,
                                             claim: str) -> None:
    text = FAITHFUL.replace(old, new)
    fs = findings(det, text)
    assert spans(fs, text, category) == [claim], cats(fs)
    assert "grounding_score" in cats(fs)  # one invented fact is enough at response level
    assert score(det, text) < det.cfg.threshold


def test_invented_sentence_is_low_support(det: GroundingDetector) -> None:
    extra = " The company also plans an initial public offering on the Frankfurt exchange next spring."
    fs = findings(det, FAITHFUL + extra)
    assert spans(fs, FAITHFUL + extra, "unsupported_entity") == ["Frankfurt"]
    low = spans(fs, FAITHFUL + extra, "low_support")
    assert low == [extra.strip()]


def test_markdown_headings_and_labels_are_not_names(det: GroundingDetector) -> None:
    md = ("## Key Findings\n\n- **Revenue Growth:** Northwind Robotics earned EUR 1,213 million in 2023.\n"
          "- **Factory Expansion**: A second plant opened in Gdansk.\n"
          "Market Outlook: Meridian Capital expects pressure on margins.")
    assert assert_compliant(det, ctx_with(), md) == []
    text = "- **Outlook:** Zorblax Industries will buy the firm."
    assert spans(findings(det, text), text, "unsupported_entity") == ["Zorblax Industries"]


def test_compliance_on_long_answers(det: GroundingDetector) -> None:
    for text in [FAITHFUL, FAITHFUL.replace("42%", "57%") + " See https://example.org/x [7] (Smith 2020)."]:
        assert_compliant(det, ctx_with(), text)
    md = ("## Summary\n\n1. Revenue was EUR 1,213 million in 2023.\n2. Dr. Vos leads the firm, e.g. its "
          "U.S. plans.\n\n```python\nx = 99999\n```\n- The Gdansk plant employs about 650 people!")
    fs = assert_compliant(det, ctx_with(), md, seed=3)
    assert fs == []  # list numbers, abbreviations and code are not claims


# -- numbers ------------------------------------------------------------------------------------

NUM_CTX = ("The company had 1,200 employees and revenue of $4.7 million in 2019. Its share "
           "price rose 12.5% to 3.47 euros. Founded in 1994, it sold twelve hundred units in "
           "its first year and 3,213 in the second. The survey covered 0.25 of all households.")


@pytest.mark.parametrize("phrase", [
    "1200 employees", "1,200 employees", "1.2 thousand employees", "twelve hundred employees",
    "about 3,200 units", "roughly 3.2 thousand units", "$4.7m in revenue", "4.7 million dollars",
    "a 12.5 percent rise", "3.5 euros", "in the 1990s", "in the 20th century", "25% of households",
    "in 2019", "nearly 1,250 people",
])
def test_number_paraphrases_are_supported(det: GroundingDetector, phrase: str) -> None:
    ctx = RequestContext(messages=(Message("system", NUM_CTX, 0),))
    text = f"Reports mention {phrase} for the company."
    assert spans(findings(det, text, ctx), text, "unsupported_number") == []


@pytest.mark.parametrize("phrase", [
    "1,300 employees", "13 thousand employees", "thirteen hundred employees", "$5.7 million",
    "a 15% rise", "3.9 euros", "in 2018", "in the 1980s", "founded in 1995", "3,500 units",
    "seventeen branches",
])
def test_changed_numbers_fire(det: GroundingDetector, phrase: str) -> None:
    ctx = RequestContext(messages=(Message("system", NUM_CTX, 0),))
    text = f"Reports mention {phrase} for the company."
    assert len(spans(findings(det, text, ctx), text, "unsupported_number")) == 1


def test_dates_compare_months(det: GroundingDetector) -> None:
    treaty = "The treaty was signed on 3 March 2021 in Oslo by both parties after two years of talks."
    ctx = RequestContext(messages=(Message("system", treaty, 0),))
    assert spans(findings(det, "It was signed on March 3rd, 2021.", ctx), "", "unsupported_number") == []
    text = "It was signed on April 3, 2021."
    assert spans(findings(det, text, ctx), text, "unsupported_number") == ["April"]


# -- names, quotes, URLs, citations ----------------------------------------------------------

ENT_CTX = ("Allison Beth Goertz is an American musician known for satirical songs. Milhouse is a "
           "character in The Simpsons created by Matt Groening, who named him after President "
           "Richard Nixon's middle name. The National Aeronautics and Space Administration "
           "funded the project. Details: https://example.com/goertz/bio and report doc_7.")


@pytest.mark.parametrize("text", [
    "Goertz is a musician from the United States.",            # demonym <-> place
    "Groening named the character after Nixon.",               # surname only
    "The Simpsons character was named after Richard Nixon.",   # multiword, sentence-initial article
    "Funding came from NASA.",                                 # acronym of a capitalised run
    "Satirical songs made her known.",                         # sentence-initial capital, common word
    "See https://example.com/goertz/bio/ for more.",           # URL without/with trailing slash
    'She is known for "satirical songs" about pop culture.',   # quote, case-insensitive
    "The report (doc_7) lists it.",
])
def test_supported_names_quotes_urls(det: GroundingDetector, text: str) -> None:
    ctx = RequestContext(messages=(Message("system", ENT_CTX, 0),))
    assert [f for f in findings(det, text, ctx) if f.category.startswith("unsupported")] == []


@pytest.mark.parametrize(("text", "category", "claim"), [
    ("Groening named him after Gerald Ford.", "unsupported_entity", "Gerald Ford"),
    ("Tuppence Middleton voiced Milhouse.", "unsupported_entity", "Tuppence Middleton"),
    ("Milhouse was created by Matt Groening in Portland.", "unsupported_entity", "Portland"),
    ('Groening called him "the best character ever written".', "unsupported_quote",
     '"the best character ever written"'),
    ("Read more at https://example.com/goertz/interview today.", "unsupported_url",
     "https://example.com/goertz/interview"),
    ("The report doc_9 lists it.", "unsupported_citation", "doc_9"),
    ("Goertz is a musician (Smith 2020).", "unsupported_citation", "(Smith 2020)"),
])
def test_fabricated_names_quotes_urls_fire(det: GroundingDetector, text: str, category: str, claim: str) -> None:
    ctx = RequestContext(messages=(Message("system", ENT_CTX, 0),))
    fs = findings(det, text, ctx)
    assert spans(fs, text, category) == [claim]
    f = next(f for f in fs if f.category == category)
    assert claim not in f.evidence and claim not in f.message  # evidence is masked


def test_bare_name_answer_is_checked(det: GroundingDetector) -> None:
    oberoi = "The Oberoi Group is a hotel company with its head office in Delhi."
    ctx = RequestContext(messages=(Message("system", oberoi, 0),
                                   Message("user", "Where is the head office?", 1)))
    assert findings(det, "Delhi", ctx) == []
    assert spans(findings(det, "Mumbai", ctx), "Mumbai", "unsupported_entity") == ["Mumbai"]


def test_numbered_citations_follow_the_documents(det: GroundingDetector) -> None:
    text = "Revenue rose [1]. A plant opened [2]. Margins are under pressure [1, 2]."
    assert spans(findings(det, text), text, "unsupported_citation") == []
    text = "Revenue rose [3]."
    assert spans(findings(det, text), text, "unsupported_citation") == ["[3]"]


# -- what counts as context -------------------------------------------------------------------


def test_no_context_means_no_findings(det: GroundingDetector) -> None:
    ctx = RequestContext(messages=(Message("system", "You are a helpful assistant.", 0),
                                   Message("user", "Who won the 1998 World Cup?", 1)))
    state = det.start(ctx)
    assert run(det, ctx, "France won in 1998, beating Brazil 3-0 in Paris.") == []
    assert det.response_score(state._prepared) is None


def test_question_is_echo_not_evidence(det: GroundingDetector) -> None:
    ctx = RequestContext(messages=(
        Message("system", "Sang-Wook Cheong is a Korean American materials scientist at Rutgers University.", 0),
        Message("user", "In which state does Sang-Wook Cheong work as a materials scientist in 2016?", 1),
    ))
    # repeating the question's names and numbers is not a fabrication
    assert findings(det, "Sang-Wook Cheong works at Rutgers University.", ctx) == []
    text = "Sang-Wook Cheong works in North Dakota."
    assert spans(findings(det, text, ctx), text, "unsupported_entity") == ["North Dakota"]
    det2 = GroundingDetector(GroundingConfig())
    split = det2.split_request(ctx)
    assert all("?" not in c for c in split[0]) and any("?" in e for e in split[1])


def test_user_message_without_delimiters_minus_question(det: GroundingDetector) -> None:
    article = ("The bridge opened in 1932 and is 1,149 metres long. It was designed by John Bradfield "
               "and carries eight lanes of traffic.")
    ctx = RequestContext(messages=(Message("user", article + "\nHow long is the bridge?", 0),))
    assert findings(det, "The bridge is 1,149 metres long.", ctx) == []
    text = "The bridge is 1,500 metres long."
    assert spans(findings(det, text, ctx), text, "unsupported_number") == ["1,500"]


def test_delimited_blocks_only_are_context() -> None:
    det = GroundingDetector(GroundingConfig())
    msg = ("Use only the context. Mention the 2031 deadline only if it appears.\n<context>\nThe plant "
           "in Leeds employs 310 people and opened in 2004.\n</context>\nQuestion: how many work there?")
    context, echo = det.split_request(RequestContext(messages=(Message("user", msg, 0),)))
    assert len(context) == 1 and "Leeds" in context[0] and "2031" not in context[0]
    assert any("2031" in e for e in echo)
    heading = "Context: The plant in Leeds employs 310 people.\nQuestion: How many?"
    context, _ = det.split_request(RequestContext(messages=(Message("user", heading, 0),)))
    assert [c.strip() for c in context] == ["The plant in Leeds employs 310 people."]


def test_tool_results_are_context(det: GroundingDetector) -> None:
    ctx = RequestContext(messages=(
        Message("user", "What's the weather in Lyon?", 0),
        Message("tool", '{"city": "Lyon", "temperature_c": 21, "conditions": "light rain"}', 1, name="weather"),
    ))
    assert findings(det, "It is 21 degrees with light rain in Lyon.", ctx) == []
    text = "It is 27 degrees with light rain in Lyon."
    assert spans(findings(det, text, ctx), text, "unsupported_number") == ["27"]


def test_tool_call_channel_is_not_scored(det: GroundingDetector) -> None:
    channel = Channel(kind="tool_call", tool_index=0, tool_name="f")
    assert run(det, ctx_with(), '{"amount": 99999, "city": "Atlantis"}', channel=channel) == []


# -- score, threshold, streaming --------------------------------------------------------------


def test_score_reported_only_below_threshold_but_always_exposed() -> None:
    det = GroundingDetector(GroundingConfig(threshold=0.2))
    text = FAITHFUL.replace("42%", "57%")
    fs = findings(det, text)
    assert "grounding_score" not in cats(fs)
    s = score(det, text)
    assert s is not None and 0.2 < s < 0.8
    assert det.response_metrics(det.start(ctx_with())._prepared) == {}


def test_grounding_score_finding_attrs(det: GroundingDetector) -> None:
    fs = findings(det, "Northwind was bought by Globex Corporation for 9 billion dollars in 2030.")
    g = [f for f in fs if f.category == "grounding_score"]
    assert len(g) == 1 and g[0].span is None
    assert 0.0 <= g[0].score < det.cfg.threshold
    assert set(g[0].attrs) == {"sentences", "unsupported"} and g[0].attrs["sentences"] == 1


def test_sentences_are_scored_as_they_complete(det: GroundingDetector) -> None:
    state = det.start(ctx_with())
    first = state.feed(TEXT, "The firm was founded in 1987 by Ingrid Vos. ")
    assert first == []  # the next sentence has not started: "Vos. the" could still continue
    second = state.feed(TEXT, "It")
    assert [f.category for f in second] == ["unsupported_number"]
    assert state.feed(TEXT, " opened in Gdansk.") == []
    assert state.finish(TEXT, StreamEnd("stop")) == []
    assert state.finish(TEXT, StreamEnd("stop")) == []  # idempotent


def test_long_sentence_is_cut_and_memory_bounded() -> None:
    det = GroundingDetector(GroundingConfig(max_sentence_chars=200))
    state = det.start(ctx_with())
    for _ in range(500):
        state.feed(TEXT, "forklift sales rose again and ")
    ch = state._channels[TEXT.key]
    assert len(ch._buf) <= 200 + 30
    assert det.response_score(state._prepared) is not None


def test_stemmer_reference_cases() -> None:
    cases = {"caresses": "caress", "ponies": "poni", "running": "run", "hopping": "hop",
             "relational": "relat", "generalization": "gener", "motoring": "motor",
             "adjustment": "adjust", "happy": "happi", "sky": "sky", "agreed": "agre"}
    assert {w: stem(w) for w in cases} == cases
    assert stem("employees") == stem("employee") and stem("founded") == stem("founding")


def test_evidence_indexes_numbers_in_any_spelling() -> None:
    ev = Evidence.build(["twelve hundred people, 3.5%, 1,000,000 dollars and two dozen eggs in 1877"])
    for v in (1200.0, 3.5, 0.035, 1e6, 24.0, 1877.0, 1870.0, 19.0):
        assert v in ev.numbers


def test_config_is_strict_and_registered() -> None:
    assert CONFIGS["grounding"] is GroundingConfig and len(CONFIGS) == 1
    with pytest.raises(pydantic.ValidationError):
        GroundingConfig(treshold=0.3)
    with pytest.raises(ValueError, match="context delimiter"):
        GroundingDetector(GroundingConfig(context_delimiters=("CONTEXT",)))
    assert GroundingConfig().build().lookback_chars == 0


def test_halueval_auroc_does_not_regress() -> None:
    """The full dev set runs in about a second; the floor is the measured AUROC (0.910)
    minus a margin, so a change that loses ranking quality fails here."""
    from tests.eval import grounding_eval

    require_halueval()
    rep = grounding_eval.evaluate(grounding_eval.load_rows())
    assert rep.auroc >= 0.88, rep
    assert rep.default_precision >= 0.95, rep
