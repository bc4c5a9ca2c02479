"""The user-configured detectors pass the shared compliance test and find split matches."""

from __future__ import annotations

from detectors.base import RequestContext
from detectors.custom import BannedSubstringsConfig, MaxOutputCharsConfig, RegexConfig
from tests.unit.compliance import assert_compliant, run

TEXT = ("Ticket TICKET-123456 was opened. Project Blue  Falcon is internal use only; "
        "ticket-000001 too. Contact ops. " * 3)


def test_regex_compliant_and_finds_all():
    det = RegexConfig(patterns={"ticket": "(?i)ticket-[0-9]{6}", "codename": "(?i)blue\\s*falcon"}).build()
    found = assert_compliant(det, RequestContext(), TEXT)
    assert sorted({f.category for f in found}) == ["codename", "ticket"]
    assert len(found) == 9
    assert det.lookback_chars >= 128


def test_regex_split_one_char_at_a_time():
    det = RegexConfig(patterns={"ticket": "TICKET-[0-9]{6}"}).build()
    found = run(det, RequestContext(), TEXT, [1] * len(TEXT))
    assert [TEXT[f.span[0]:f.span[1]] for f in found] == ["TICKET-123456"] * 3


def test_banned_substrings_and_length():
    det = BannedSubstringsConfig(substrings=["internal use only", "ops"]).build()
    found = assert_compliant(det, RequestContext(), TEXT)
    assert len(found) == 6
    long = MaxOutputCharsConfig(max_chars=50).build()
    assert len(assert_compliant(long, RequestContext(), TEXT)) == 1


def test_optional_tail_is_chunking_independent():
    det = RegexConfig(patterns={"ext": "abc(?:def)?"}, max_match_chars=16).build()
    text = "xx abcdef yy abc zz"
    for sizes in ([len(text)], [1] * len(text), [4, 1, 1, 1, 1, 20]):
        found = run(det, RequestContext(), text, sizes)
        assert [text[f.span[0]:f.span[1]] for f in found] == ["abcdef", "abc"], sizes


def test_banned_substrings_survive_length_changing_case_folds():
    det = BannedSubstringsConfig(substrings=["project falcon"]).build()
    text = "Straße: Project FALCON launches"
    found = run(det, RequestContext(), text)
    assert [text[f.span[0]:f.span[1]] for f in found] == ["Project FALCON"]
