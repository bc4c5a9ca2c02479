"""Incident records: structured, redacted, off the critical path; admin endpoint needs a token."""

from __future__ import annotations

import json

import httpx

from tests.conftest import b64, eventually, proxy_config


def test_incident_records_jsonl_and_admin(start_proxy, sim, tmp_path):
    path = tmp_path / "incidents.jsonl"
    cfg = proxy_config(
        sim.url,
        server={"admin_token": "admin-secret-token"},
        incidents={"sinks": [{"type": "jsonl", "path": str(path)}]},
        policies={"default": {"detectors": {
            "regex": {"action": "redact", "patterns": {"acct": "ACCT-[0-9]{8}"}}}}},
    )
    p = start_proxy(cfg)
    r = p.client().chat.completions.create(
        model="sim-echo", messages=[{"role": "user", "content": "q"}],
        extra_headers={"x-sim-output": b64("your account is ACCT-12345678, thanks"), "x-request-id": "req-77"})
    assert r.choices[0].message.content == "your account is [REDACTED:acct], thanks"
    lines = eventually(lambda: path.exists() and path.read_text().splitlines())
    rec = json.loads(lines[0])
    assert rec["request_id"] == "req-77" and rec["detector"] == "regex" and rec["action"] == "redact"
    assert rec["category"] == "acct" and rec["span"] == [16, 29]
    assert "12345678" not in json.dumps(rec)  # evidence is masked
    assert httpx.get(f"{p.url}/admin/incidents").status_code == 401
    assert httpx.get(f"{p.url}/admin/incidents", headers={"authorization": "Bearer wrong"}).status_code == 401
    got = httpx.get(f"{p.url}/admin/incidents", headers={"authorization": "Bearer admin-secret-token"}).json()
    assert got["incidents"][0]["request_id"] == "req-77"


def test_admin_disabled_without_token(start_proxy):
    p = start_proxy()
    assert httpx.get(f"{p.url}/admin/incidents", headers={"authorization": "Bearer x"}).status_code == 403
    assert httpx.get(f"{p.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{p.url}/readyz").status_code == 200


def test_tenant_policy_override(start_proxy, sim):
    import hashlib

    cfg = proxy_config(
        sim.url,
        tenants=[{"name": "strict-app", "key_sha256": hashlib.sha256(b"k-strict").hexdigest(), "policy": "strict"},
                 {"name": "lax-app", "key_sha256": hashlib.sha256(b"k-lax").hexdigest()}],
        policies={"default": {"detectors": {}},
                  "strict": {"detectors": {"banned_substrings": {"action": "redact", "substrings": ["alpha"]}}}},
    )
    p = start_proxy(cfg)
    hdr = {"x-sim-output": b64("alpha beta")}
    strict = p.client(api_key="k-strict").chat.completions.create(
        model="sim-echo", messages=[{"role": "user", "content": "q"}], extra_headers=hdr)
    lax = p.client(api_key="k-lax").chat.completions.create(
        model="sim-echo", messages=[{"role": "user", "content": "q"}], extra_headers=hdr)
    assert strict.choices[0].message.content == "[REDACTED:banned] beta"
    assert lax.choices[0].message.content == "alpha beta"
    # the tenant's proxy key is never forwarded upstream
    reqs = httpx.get(f"{sim.url}/v1/sim/requests", params={"n": 2}).json()["data"]
    for r in reqs:
        assert not any(k.lower() == "authorization" for k, _ in r["headers"])


def test_admin_alerts_endpoint(start_proxy, sim):
    p = start_proxy(proxy_config(sim.url, server={"admin_token": "admin-secret-token"}))
    assert httpx.get(f"{p.url}/admin/alerts").status_code == 401
    got = httpx.get(f"{p.url}/admin/alerts", headers={"authorization": "Bearer admin-secret-token"}).json()
    assert got == {"active": [], "history": []}


def test_findings_of_a_stream_the_client_left_still_become_incidents(start_proxy, sim):
    """An annotate policy feeds its detectors per batch of text; when the client disconnects
    mid-stream, the detectors still finish on what arrived and the incident is recorded."""
    cfg = proxy_config(
        sim.url, server={"admin_token": "admin-secret-token"},
        policies={"default": {"detectors": {
            "regex": {"action": "annotate", "patterns": {"acct": "ACCT-[0-9]{8}"}}}}},
    )
    p = start_proxy(cfg)
    text = "your account is ACCT-12345678. " + "More words follow here. " * 40
    client = p.client()
    stream = client.chat.completions.create(
        model="sim-echo", messages=[{"role": "user", "content": "q"}], stream=True,
        extra_headers={"x-sim-output": b64(text), "x-sim-chunk-chars": "4", "x-sim-delay-ms": "20",
                       "x-request-id": "req-left"})
    got = ""
    for chunk in stream:
        got += chunk.choices[0].delta.content or "" if chunk.choices else ""
        if len(got) > 40:
            break
    stream.close()  # the client goes away with most of the answer unsent
    assert "ACCT-12345678" in got  # annotate changes nothing: the text went out

    def recorded():
        r = httpx.get(f"{p.url}/admin/incidents", headers={"authorization": "Bearer admin-secret-token"}).json()
        return [i for i in r["incidents"] if i["request_id"] == "req-left"]

    inc = eventually(recorded, timeout=5)
    assert inc[0]["detector"] == "regex" and inc[0]["category"] == "acct" and inc[0]["action"] == "annotate"
