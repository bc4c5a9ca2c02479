"""pii detector: validated kinds fire, near-misses stay quiet, streams agree with whole text,
the request check, masking, config, and the evaluation targets on a subset."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from detectors.base import TEXT, Message, RequestContext, Severity, StreamEnd
from detectors.pii import CONFIGS, KINDS, PiiConfig, PiiDetector
from tests.unit.compliance import assert_compliant, run

ALL = PiiConfig(kinds=KINDS).build()
DEFAULT = PiiConfig().build()
CTX = RequestContext()


def found(text: str, detector: PiiDetector = ALL, ctx: RequestContext = CTX) -> list[tuple[str, str]]:
    return [(f.category, text[f.span[0] : f.span[1]]) for f in run(detector, ctx, text) if f.span]


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("Please contact jane.doe+billing@mail.example.co.uk about the refund.", "email",
         "jane.doe+billing@mail.example.co.uk"),
        ('{"user": {"email": "o.connor@uni-mannheim.de"}}', "email", "o.connor@uni-mannheim.de"),
        ("Call me on (202) 555-0143 after six.", "phone", "(202) 555-0143"),
        ("Büro: +49 30 901820, Fax folgt.", "phone", "+49 30 901820"),
        ("UK office: +44 20 7946 0958.", "phone", "+44 20 7946 0958"),
        ("Standard: 01 45 67 89 10 (Paris).", "phone", "01 45 67 89 10"),
        ("Her mobile is 9876543210, call after 5.", "phone", "9876543210"),
        ("Reach support at 1-800-555-0199 ext. 42 today.", "phone", "1-800-555-0199 ext. 42"),
        ("The card on file is 4111 1111 1111 1111, exp 09/27.", "card", "4111 1111 1111 1111"),
        ("Amex 3782-822463-10005 was declined.", "card", "3782-822463-10005"),
        ("cc=5555555555554444;", "card", "5555555555554444"),
        ("Wire to DE89 3704 0044 0532 0130 00 by Friday.", "iban", "DE89 3704 0044 0532 0130 00"),
        ("IBAN: GB82WEST12345698765432", "iban", "GB82WEST12345698765432"),
        ("Her SSN is 536-90-4399.", "ssn", "536-90-4399"),
        ("SSN 536904399 on the W-2.", "ssn", "536904399"),
        ("NIR 1 84 12 76 451 089 46 sur la carte.", "national_id", "1 84 12 76 451 089 46"),
        ("DNI 12345678Z y NIE X1234567L.", "national_id", "12345678Z"),
        ("Codice fiscale RSSMRA85T10A562S allegato.", "national_id", "RSSMRA85T10A562S"),
        ("Aadhaar 2345 6789 0124 verified.", "national_id", "2345 6789 0124"),
        ("Meine Steuer-ID: 86095742719.", "national_id", "86095742719"),
        ("The login came from 81.2.69.160 at 03:12.", "ip", "81.2.69.160"),
        ("Upstream 2a00:1450:4001:81c::200e timed out.", "ip", "2a00:1450:4001:81c::200e"),
        ("Ship it to 1600 Pennsylvania Avenue NW, Washington.", "address", "1600 Pennsylvania Avenue"),
        ("She moved to 742 Evergreen Terrace Apt. 2 last May.", "address", "742 Evergreen Terrace Apt. 2"),
    ],
)
def test_fires_on_validated_values(text: str, kind: str, value: str) -> None:
    assert (kind, value) in found(text)


@pytest.mark.parametrize(
    "text",
    [
        "Order #4111111111111111 ships tomorrow.",  # Luhn-valid, but an order number
        "Your order number is 4532015112830366.",
        "Invoice 2024000123 is attached.",
        "Tracking: 1Z999AA10123456784 (UPS), 9400 1000 0000 0000 0000 00 (USPS).",
        "FedEx tracking number 123456789012345.",
        "Upgrade to v1.2.3.4 or release 2.10.0.14, not 10.15.7.2024.",
        "Fixed in commit 9fceb02d0ae598e95dc970b74767f19372d61af8 (short 9fceb02).",
        "Request id 123e4567-e89b-12d3-a456-426614174000 failed.",
        "ISBN 978-3-16-148410-0 and 0-306-40615-2.",
        "Started 2024-01-15T10:30:00Z, epoch 1705314600, ms 1705314600000.",
        "Due 15/01/2024 or 01.02.2024, paid $1,299.99 and € 12.345.678.",
        "SKU 555-123-4567 and part no. 0049-3012-44 are in stock.",
        "Card-like but invalid: 4111 1111 1111 1112.",
        "Broken IBAN DE88 3704 0044 0532 0130 00.",
        "Internal hosts 10.0.3.17, 192.168.1.254, 127.0.0.1 and ::1.",
        "Use 8.8.8.8 or 1.1.1.1 as resolvers.",
        "Coordinates -27.394692, 30.201664.",
        "Steps: 5397 2976 5568 5202 in that order.",
        "Compile with std::vector<int> at 12:30:45, MAC 00:1a:2b:3c:4d:5e.",
        "Advertised SSN 078-05-1120 is not a real one.",
        "Connect to postgres://app:hunter2@db.example.com/prod.",  # credentials, not an email
        "There are 3 Main Points to cover.",
        "Telefonnummer fehlt, Kundennummer 12345678901.",
    ],
)
def test_near_misses_do_not_fire(text: str) -> None:
    assert found(text) == []


def test_evidence_is_masked_and_replacement_is_typed() -> None:
    text = "Mail jdoe@example.com, card 4111111111111111."
    fs = {f.category: f for f in run(DEFAULT, CTX, text)}
    assert fs["email"].evidence == "j***@example.com"
    assert fs["card"].evidence == "411...1111"
    assert fs["card"].replacement == "[REDACTED:card]"
    assert fs["card"].severity is Severity.critical
    assert fs["card"].attrs["brand"] == "visa"
    for f in fs.values():
        assert "jdoe" not in f.evidence and "4111111111111111" not in f.evidence and f.detector == "pii"


def test_kinds_switch_and_severity_override() -> None:
    text = "jdoe@example.com 4111111111111111 +44 20 7946 0958"
    only_email = PiiConfig(kinds=("email",), severity={"email": "critical"}).build()
    fs = run(only_email, CTX, text)
    assert [(f.category, f.severity) for f in fs] == [("email", Severity.critical)]
    assert "address" not in PiiConfig().kinds


def test_private_ips_are_an_option() -> None:
    text = "db at 10.0.3.17 and 81.2.69.160"
    assert [v for _, v in found(text, DEFAULT)] == ["81.2.69.160"]
    strict = PiiConfig(ip_ignore_private=False).build()
    assert [v for _, v in found(text, strict)] == ["10.0.3.17", "81.2.69.160"]


def _ctx(*messages: tuple[str, str]) -> RequestContext:
    return RequestContext(messages=tuple(Message(role, text, i) for i, (role, text) in enumerate(messages)))


def test_values_from_the_request_are_not_leaks() -> None:
    ctx = _ctx(("system", "You are a helpful assistant."),
               ("user", "My email is Jane.Doe@Example.com, card 4111-1111-1111-1111, phone (202) 555-0143."))
    out = "Sure, jane.doe@example.com. Card 4111 1111 1111 1111 and +1 202-555-0143 are on file; " \
          "also bob@example.org."
    assert found(out, DEFAULT, ctx) == [("email", "bob@example.org")]
    off = PiiConfig(ignore_if_in_request=False).build()
    assert len(found(out, off, ctx)) == 4


def test_request_roles_limit_what_counts_as_the_users_own() -> None:
    ctx = _ctx(("system", "Customer record: ann@corp.example"), ("user", "What is Ann's email?"))
    users_only = PiiConfig(ignore_if_in_request_roles=("user",)).build()
    assert found("It is ann@corp.example.", users_only, ctx) == [("email", "ann@corp.example")]
    assert found("It is ann@corp.example.", DEFAULT, ctx) == []


def test_config_rejects_unknown_keys_kinds_and_regions() -> None:
    with pytest.raises(ValidationError):
        PiiConfig(kinds=("email", "passport"))  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        PiiConfig(phone_regions=("XX",))
    with pytest.raises(ValidationError):
        PiiConfig(action="redact")  # type: ignore[call-arg]
    assert CONFIGS["pii"] is PiiConfig
    assert isinstance(PiiConfig().build(), PiiDetector)


def test_lookback_is_the_reach_of_the_enabled_kinds() -> None:
    # email is the longest: local 64 + "@" + domain 63 + "." + TLD 18, plus 2 of lookahead
    assert DEFAULT.lookback_chars == 64 + 1 + 63 + 1 + 18 + 2
    no_email = PiiConfig(kinds=("card", "iban", "phone")).build()
    assert no_email.lookback_chars < DEFAULT.lookback_chars
    assert PiiConfig(kinds=()).build().lookback_chars == 0
    # skip_word's bounded blob step must be decidable for every settled match
    from detectors.pii import _BLOB_CHARS

    assert min(PiiConfig(kinds=(k,)).build().lookback_chars for k in KINDS) > _BLOB_CHARS


REALISTIC = [
    "Hi Jane,\n\nI've updated your profile. Your contact email is jane.doe@example.com and the "
    "phone number on file is +44 20 7946 0958. The refund went to IBAN GB82 WEST 1234 5698 7654 32; "
    "the card ending 1111 (4111-1111-1111-1111) was not charged. Order #4532015112830366 is closed.\n",
    "| name | email | phone | ip |\n|---|---|---|---|\n| Ann | ann@corp.example | (202) 555-0143 | "
    "81.2.69.160 |\n| Bob | bob@corp.example | +33 1 45 67 89 10 | 2a00:1450:4001:81c::200e |\n",
    '{"customer": {"ssn": "536-90-4399", "nir": "1 84 12 76 451 089 46", "aadhaar": "2345 6789 0124",'
    ' "version": "v1.2.3.4", "build": "2024-01-15T10:30:00Z", "sha": "9fceb02d0ae598e95dc970b74767f19372d61af8"}}',
    "Ship to 742 Evergreen Terrace Apt. 2, Springfield. Call 1-800-555-0199 ext. 42 or mail "
    "a.b@sub.example.org.",
    "Grüße aus Köln 🌧️ — Frau Müller (mueller@example.de, +49 221 1234567) zahlt per Karte "
    "5555 5555 5555 4444; 订单号 2024-01-15 已确认, Привет 81.2.69.160 «DE89370400440532013000».",
]


def test_offsets_are_characters_in_non_ascii_text() -> None:
    text = REALISTIC[-1]
    got = found(text)
    assert ("email", "mueller@example.de") in got and ("card", "5555 5555 5555 4444") in got
    assert ("iban", "DE89370400440532013000") in got and ("ip", "81.2.69.160") in got


@pytest.mark.parametrize("text", REALISTIC)
def test_compliant_whole_char_by_char_random_splits(text: str) -> None:
    assert assert_compliant(ALL, CTX, text)


def _assert_never_partly_released(detector: PiiDetector, text: str, sizes: list[int]) -> list[str]:
    """Feed chunks; a finding reported by a feed must start at or after what the proxy could
    already have released before that feed (total fed minus lookback)."""
    state = detector.start(CTX)
    fed = 0
    seen: list[str] = []
    i = 0
    for n in sizes:
        if i >= len(text):
            break
        chunk = text[i : i + n]
        for f in state.feed(TEXT, chunk):
            assert f.span and f.span[0] >= fed - detector.lookback_chars, (f, fed)
            seen.append(text[f.span[0] : f.span[1]])
        fed += len(chunk)
        i += n
    seen += [text[f.span[0] : f.span[1]] for f in state.finish(TEXT, StreamEnd("stop")) if f.span]
    return seen


def test_card_split_across_chunks_is_caught_before_release() -> None:
    text = "Use card 4111 1111 1111 1111 for the deposit and email jane.doe@example.com today."
    for cut in range(len("Use card "), len("Use card 4111 1111 1111 1111") + 1):
        seen = _assert_never_partly_released(DEFAULT, text, [cut, 3, 200])
        assert "4111 1111 1111 1111" in seen and "jane.doe@example.com" in seen
    rng = random.Random(3)
    for _ in range(20):
        seen = _assert_never_partly_released(DEFAULT, text * 3, [rng.randint(1, 12) for _ in range(300)])
        assert seen.count("4111 1111 1111 1111") == 3


def test_finish_is_idempotent_and_channels_are_independent() -> None:
    state = DEFAULT.start(CTX)
    other = TEXT.__class__(choice=1)
    assert state.feed(TEXT, "mail jdoe@example.co") == []
    assert state.feed(other, "card 4111 1111 1111 1111 ") == []
    first = state.finish(TEXT, StreamEnd("stop"))
    assert [f.category for f in first] == ["email"]
    assert state.finish(TEXT, StreamEnd("stop")) == []
    assert [f.category for f in state.finish(other, StreamEnd("stop"))] == ["card"]


def test_evaluation_targets_hold_on_a_subset() -> None:
    from tests.eval.leakage_eval import TARGET, evaluate, load

    scores = evaluate(load()[::2], pii_detector=ALL)
    for kind in ("card", "email", "iban"):
        assert scores[kind].labels >= 50
        assert scores[kind].precision >= TARGET, (kind, scores[kind])
        assert scores[kind].recall >= TARGET, (kind, scores[kind])
