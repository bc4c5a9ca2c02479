"""cross_tenant: one tenant's registered documents in another tenant's output fire (naming the
source tenant, never quoting it); own, shared, public and request-supplied text does not."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from detectors.base import Channel, Message, RequestContext, Severity, StreamEnd
from detectors.cross_tenant import (
    CONFIGS,
    CrossTenantConfig,
    FingerprintIndex,
    MemoryFingerprintIndex,
    fingerprints_for_request,
)
from tests.unit.compliance import assert_compliant, run

# tenant "acme-legal": a confidential memo in its RAG context
ACME_DOC = (
    "Privileged and confidential. Settlement strategy for Harlow v. Acme Logistics: the board "
    "has authorised an offer of up to 1.8 million dollars, but counsel should open at 650 "
    "thousand and reference the March warehouse inspection report only if the plaintiff raises "
    "the forklift maintenance logs. The insurer Northgate has agreed to cover sixty percent of "
    "any amount above one million. Do not disclose the authorised ceiling to opposing counsel."
)
ACME_SYSTEM = (
    "You are the Acme Logistics legal research assistant. Use the case documents provided in "
    "tool results. Cite the document title for every claim and flag anything privileged."
)
# tenant "beta-hr": its own handbook
BETA_DOC = (
    "Employees accrue 2.08 days of paid leave per month of service, up to 25 days per year. "
    "Unused leave above five days expires on 31 March unless your manager approves a carry-over "
    "in writing. Parental leave requests must be submitted through the HR portal at least eight "
    "weeks before the expected start date."
)
# public text that every tenant might send (a licence paragraph)
PUBLIC = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this "
    "software and associated documentation files, to deal in the Software without restriction, "
    "including without limitation the rights to use, copy, modify, merge, publish, distribute, "
    "sublicense, and/or sell copies of the Software."
)

LEAK_ANSWER = (
    "Based on the documents I have, here is a summary of the Harlow matter. " + ACME_DOC[28:300]
    + " Let me know if you need more detail."
)
NORMAL_ANSWER = (
    "You accrue 2.08 days of paid leave for each month you work, capped at 25 days a year. "
    "Up to five unused days carry over automatically; anything above that expires at the end of "
    "March unless your manager agrees otherwise in writing."
)


def request(tenant: str | None, *msgs: tuple[str, str]) -> RequestContext:
    return RequestContext(tenant=tenant, messages=tuple(Message(r, t, i) for i, (r, t) in enumerate(msgs)))


DET = CrossTenantConfig().build()


def index_with(*registrations: tuple[str, RequestContext]) -> MemoryFingerprintIndex:
    index = MemoryFingerprintIndex()
    for tenant, c in registrations:
        index.add(tenant, DET.fingerprints_for_request(c))
    return index


def beta_ctx(index: FingerprintIndex | None, user: str = "How much leave do I get?",
             tenant: str | None = "beta-hr") -> RequestContext:
    shared = {"cross_tenant": index} if index is not None else {}
    return RequestContext(tenant=tenant, shared=shared, messages=(
        Message("system", "You are the Beta Corp HR helper. Answer from the handbook.", 0),
        Message("tool", BETA_DOC, 1, name="search_handbook"),
        Message("user", user, 2),
    ))


ACME_REQ = request("acme-legal", ("system", ACME_SYSTEM), ("tool", ACME_DOC),
                   ("user", "Summarise the settlement position."))
BETA_REQ = request("beta-hr", ("system", "You are the Beta Corp HR helper."), ("tool", BETA_DOC),
                   ("user", "How much leave do I get?"))


def test_config() -> None:
    assert {"cross_tenant": CrossTenantConfig} == CONFIGS
    with pytest.raises(ValidationError):
        CrossTenantConfig(ttl=5)  # type: ignore[call-arg]
    cfg = CrossTenantConfig(roles=["tool"], min_shingles=12)
    assert cfg.roles == ("tool",) and cfg.build().lookback_chars == 0


def test_fingerprints_for_request() -> None:
    fp = fingerprints_for_request(ACME_REQ)
    assert fp and all(isinstance(h, int) for h in fp)
    # user messages and short messages are not registered by default
    only_user = request("t", ("user", ACME_DOC))
    assert fingerprints_for_request(only_user) == set()
    assert fingerprints_for_request(only_user, roles=["user"])
    short = request("t", ("system", "You are a helpful assistant. Be brief and friendly."))
    assert fingerprints_for_request(short) == set()
    assert fingerprints_for_request(request(None, ("tool", ACME_DOC))) == set()
    # boilerplate is left out even inside a long message
    boiler = ("You are a helpful assistant. Use the following pieces of context to answer the "
              "question at the end. If you don't know the answer, just say that you don't know, "
              "don't try to make up an answer.")
    assert fingerprints_for_request(request("t", ("system", boiler))) == set()
    assert DET.fingerprints_for_request(ACME_REQ) == fp


def test_leak_of_another_tenants_document_fires() -> None:
    index = index_with(("acme-legal", ACME_REQ), ("beta-hr", BETA_REQ))
    findings = assert_compliant(DET, beta_ctx(index), LEAK_ANSWER)
    assert [f.attrs["stage"] for f in findings] == ["threshold", "final"]
    first, final = findings
    leaked_at = LEAK_ANSWER.index("Settlement strategy")
    assert first.span is not None and first.span[0] == leaked_at
    assert first.attrs == {"source_tenant": "acme-legal", "matched_shingles": 8,
                           "other_tenants": 1, "stage": "threshold"}
    assert int(final.attrs["matched_shingles"]) > 30
    for f in findings:
        assert (f.detector, f.category, f.severity) == ("cross_tenant", "cross_tenant", Severity.critical)
        assert f.replacement == "[REDACTED:cross_tenant]"
        for secret in ("Harlow", "1.8 million", "settlement", "acme"):
            assert secret.lower() not in (f.evidence + f.message).lower()


def test_finding_arrives_mid_stream() -> None:
    index = index_with(("acme-legal", ACME_REQ))
    state = DET.start(beta_ctx(index))
    for i in range(0, len(LEAK_ANSWER), 5):
        if state.feed(Channel(), LEAK_ANSWER[i : i + 5]):
            assert i < len(LEAK_ANSWER) // 2
            break
    else:
        pytest.fail("no finding while streaming")
    assert [f.attrs["stage"] for f in state.finish(Channel(), StreamEnd())] == ["final"]


def test_own_documents_echoed_do_not_fire() -> None:
    index = index_with(("acme-legal", ACME_REQ), ("beta-hr", BETA_REQ))
    assert assert_compliant(DET, beta_ctx(index), "From the handbook: " + BETA_DOC) == []
    assert assert_compliant(DET, beta_ctx(index), NORMAL_ANSWER) == []
    # acme echoing its own memo is fine too
    acme = RequestContext(tenant="acme-legal", shared={"cross_tenant": index}, messages=ACME_REQ.messages)
    assert run(DET, acme, ACME_DOC) == []


def test_text_brought_by_this_request_does_not_fire() -> None:
    """Beta's user pastes text that Acme also registered: echoing it is no leak of Acme's."""
    index = index_with(("acme-legal", ACME_REQ))
    assert run(DET, beta_ctx(index, user="Summarise this: " + ACME_DOC), ACME_DOC) == []


def test_shared_and_public_text() -> None:
    both = index_with(("acme-legal", request("acme-legal", ("tool", PUBLIC))),
                      ("beta-hr", request("beta-hr", ("tool", PUBLIC))))
    assert run(DET, beta_ctx(both), "The licence says: " + PUBLIC) == []
    # registered by three other tenants: public, even though beta never registered it
    three = index_with(*((t, request(t, ("tool", PUBLIC))) for t in ("a", "b", "c")))
    assert run(DET, beta_ctx(three), PUBLIC) == []
    assert run(CrossTenantConfig(common_owner_count=0).build(), beta_ctx(three), PUBLIC)
    # registered by a single other tenant: flagged (the honest limit of fingerprints)
    one = index_with(("a", request("a", ("tool", PUBLIC))))
    assert run(DET, beta_ctx(one), PUBLIC)


def test_two_source_tenants_one_finding_each() -> None:
    gamma_doc = ("Project Kestrel launch plan: the new tariff goes live on 4 November in the north "
                 "west region first, priced at 19.9 pence per kilowatt hour, with a press embargo "
                 "until the regulator confirms the filing on 28 October.")
    index = index_with(("acme-legal", ACME_REQ),
                       ("gamma-energy", request("gamma-energy", ("system", gamma_doc))))
    text = ACME_DOC + "\n\nAlso: " + gamma_doc
    got = assert_compliant(DET, beta_ctx(index), text)
    threshold = [f for f in got if f.attrs["stage"] == "threshold"]
    assert [f.attrs["source_tenant"] for f in threshold] == ["acme-legal", "gamma-energy"]
    assert threshold[1].attrs["other_tenants"] == 2


def test_a_short_overlap_does_not_fire() -> None:
    index = index_with(("acme-legal", ACME_REQ))
    snippet = " ".join(ACME_DOC.split()[10:20])  # 10 words = 6 shingles < 8
    assert run(DET, beta_ctx(index), f"Generic answer mentioning {snippet} in passing.") == []
    assert run(CrossTenantConfig(min_shingles=5).build(), beta_ctx(index), snippet)


def test_pass_through_and_missing_index_do_nothing() -> None:
    index = index_with(("acme-legal", ACME_REQ))
    assert DET.prepare(beta_ctx(index, tenant=None)) is None
    assert run(DET, beta_ctx(index, tenant=None), ACME_DOC) == []
    assert run(DET, beta_ctx(None), ACME_DOC) == []


def test_memory_index_ttl_generations_and_bound() -> None:
    now = [0.0]
    index = MemoryFingerprintIndex(ttl_seconds=90, generations=4, max_entries=1000, clock=lambda: now[0])
    assert isinstance(index, FingerprintIndex)
    index.add("a", [1, 2, 3])
    index.add("b", [3])
    assert index.owners(3) == frozenset({"a", "b"}) and index.owners(1) == frozenset({"a"})
    assert index.owners(99) == frozenset()
    now[0] = 89.0
    assert index.owners(1) == frozenset({"a"})  # within the TTL
    index.add("b", [1])  # refreshed by b in a newer generation
    now[0] = 125.0  # > ttl + generation span (30 s) after the first add
    assert index.owners(1) == frozenset({"b"}) and index.owners(2) == frozenset()
    now[0] = 300.0
    assert index.owners(1) == frozenset() and len(index) == 0
    small = MemoryFingerprintIndex(max_entries=100, clock=lambda: now[0])
    small.add("a", range(250))
    assert len(small) <= 100 and small.owners(249) == frozenset({"a"})


def test_memory_per_response_is_bounded() -> None:
    """A huge output made of another tenant's text keeps counting within the caps."""
    index = index_with(("acme-legal", ACME_REQ))
    state = DET.start(beta_ctx(index))
    for _ in range(200):
        state.feed(Channel(), ACME_DOC + " ")
    got = state.finish(Channel(), StreamEnd())
    assert [f.attrs["stage"] for f in got] == ["final"]
