"""Paraphrase generation (``proxy.paraphrase``): deterministic, distinct, each rule doing what
its name says, and a larger N only adding variants."""

from __future__ import annotations

import pytest

from proxy import paraphrase
from proxy.paraphrase import KINDS, apply, variants

Q = "My boots are too small. Can I swap them for a bigger size, and does it cost anything?"


def test_variants_are_deterministic_distinct_and_prefix_stable() -> None:
    six = variants(Q, 6, seed="size-exchange")
    assert [v.kind for v in six] == list(KINDS)
    assert six == variants(Q, 6, seed="size-exchange")
    texts = [" ".join(v.text.split()).casefold() for v in six]
    assert len(set(texts)) == 6 and " ".join(Q.split()).casefold() not in texts
    assert variants(Q, 3, seed="size-exchange") == six[:3]  # more variants only add
    assert len(variants(Q, 10, seed="size-exchange")) == 10  # pairs of rules after the single ones
    assert variants(Q, 6, seed="other-case") != six  # the seed picks frames, synonyms, typos
    assert variants(Q, 0, seed="x") == []
    assert Q not in [v.text for v in variants(Q, 4, seed="x", exclude=(Q,))]


def test_each_rule() -> None:
    syn = apply("synonyms", Q, "s")
    assert syn is not None and syn != Q and any(w in syn for w in ("not big enough", "exchange", "larger", "extra"))
    assert apply("reorder", Q, "s") == ("Can I swap them for a bigger size, and does it cost anything? "
                                        "My boots are too small.")
    assert apply("reorder", "Can I swap them for a bigger size, and does it cost anything?", "s") == \
        "Does it cost anything, and can I swap them for a bigger size?"
    assert apply("reorder", "Do I pay for shipping on a 40 euro order?", "s") == \
        "For shipping on a 40 euro order, do I pay?"
    assert apply("reorder", "How tall is it?", "s") is None  # nothing to move
    formal = apply("formal", "I don't know what's in it.", "s")
    assert formal is not None and "do not know what is in it" in formal
    informal = apply("informal", "I do not know what is in it.", "s")
    assert informal is not None and "don't know what's in it" in informal
    typo = apply("typo", "Grace Hopper wrote compilers", "s")
    assert typo is not None and typo != "Grace Hopper wrote compilers"
    assert sorted(typo) == sorted("Grace Hopper wrote compilers")  # two letters swapped, nothing else
    assert sum(a != b for a, b in zip(typo, "Grace Hopper wrote compilers", strict=True)) == 2
    assert apply("typo", "Hi, it is me", "s") is None  # no word long enough
    distracted = apply("distractor", Q, "s")
    assert distracted is not None and distracted.endswith(Q) and distracted[: -len(Q)].strip() in paraphrase.DISTRACTORS


@pytest.mark.parametrize("text", ["", "?", "Ok.", "x" * 500])
def test_odd_texts_do_not_break(text: str) -> None:
    for v in variants(text, 8, seed="odd"):
        assert isinstance(v.text, str)
