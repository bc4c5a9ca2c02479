"""Alert sinks: wire formats, webhook signatures (and the documented verification example),
retries with backoff, the bounded queue and failure counting."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest

from proxy.alert_sinks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    AlertmanagerSink,
    Dispatcher,
    Notification,
    PagerDutySink,
    SlackSink,
    WebhookSink,
    build_sinks,
    sign,
    verify_signature,
)
from proxy.metrics import Metrics
from tests.conftest import metric_value

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"whsec-test-4c1e"
ALERT = {
    "fingerprint": "0123456789abcdef", "status": "firing",
    "labels": {"alertname": "PIILeak", "severity": "critical", "route": "chat", "model": "sim-echo",
               "signal": "findings.pii", "detector": "pii", "source": "gapwatch"},
    "annotations": {"summary": "findings.pii is 40.00% on route chat, model sim-echo",
                    "description": "findings.pii was 40.00% over the last 300s (80 samples; threshold 1.00%)."},
    "startsAt": "2024-05-01T10:00:00.000Z", "endsAt": None, "expiresAt": "2024-05-01T10:04:00.000Z",
}
RESOLVED = {**ALERT, "status": "resolved", "endsAt": "2024-05-01T10:20:00.000Z"}


def sink_cfg(type_: str, url: str | None = "http://receiver.test/hook", **kw: Any) -> Any:
    base = {"type": type_, "url": url, "secret_env": None, "routing_key_env": None}
    return SimpleNamespace(**{**base, **kw})


# --- signatures ---------------------------------------------------------------------------------


def test_sign_and_verify() -> None:
    body = b'{"a":1}'
    now = 1_700_000_000
    sig = sign(SECRET, now, body)
    assert re.fullmatch(r"v1=[0-9a-f]{64}", sig)
    assert verify_signature(SECRET, body, str(now), sig, now=now + 10)
    assert not verify_signature(SECRET, body + b" ", str(now), sig, now=now)  # body changed
    assert not verify_signature(b"other", body, str(now), sig, now=now)  # wrong secret
    assert not verify_signature(SECRET, body, str(now + 1), sig, now=now)  # timestamp changed
    assert not verify_signature(SECRET, body, str(now), sig, now=now + 301)  # replayed too late
    assert not verify_signature(SECRET, body, str(now), sig, now=now - 301)  # from the future
    assert not verify_signature(SECRET, body, "soon", sig, now=now)
    assert not verify_signature(SECRET, body, None, sig, now=now)
    assert verify_signature(SECRET, body, str(now), f"v1=deadbeef, {sig}", now=now)  # rotation: any match


def _doc_example() -> dict[str, Any]:
    """The verification example from the docs, executed as written (README once merged)."""
    for path in (ROOT / "README.md", ROOT / "docs" / "alerts.md"):
        if not path.exists():
            continue
        for block in re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
            if "def verify_gapwatch_signature" in block:
                ns: dict[str, Any] = {}
                exec(compile(block, str(path), "exec"), ns)
                return ns
    pytest.fail("no ```python block defining verify_gapwatch_signature in README.md or docs/alerts.md")


def test_documented_verification_example_accepts_what_the_sink_sends() -> None:
    ns = _doc_example()
    verify = ns["verify_gapwatch_signature"]
    sink = WebhookSink(0, sink_cfg("webhook"), SECRET)
    note = Notification("firing", ALERT)
    req = sink.request([note], time.time())
    headers = dict(req.headers)
    assert verify(SECRET, headers, req.body) is True
    assert verify(b"wrong-secret", headers, req.body) is False
    assert verify(SECRET, headers, req.body.replace(b"PIILeak", b"Harmless")) is False
    stale = sink.request([note], time.time() - 3600)
    assert verify(SECRET, dict(stale.headers), stale.body) is False  # outside the replay window
    if "DeliveryLog" in ns:  # the replay cache in the example refuses the same delivery twice
        seen = ns["DeliveryLog"]()
        assert seen.first_time(headers[DELIVERY_HEADER]) is True
        assert seen.first_time(headers[DELIVERY_HEADER]) is False


# --- wire formats -------------------------------------------------------------------------------


def test_alertmanager_format() -> None:
    sink = AlertmanagerSink(0, sink_cfg("alertmanager", "http://am:9093/"))
    assert sink.url == "http://am:9093/api/v2/alerts"
    req = sink.request([Notification("firing", ALERT), Notification("resolved", RESOLVED)], time.time())
    body = orjson.loads(req.body)
    assert body[0] == {"labels": ALERT["labels"], "annotations": ALERT["annotations"],
                       "startsAt": ALERT["startsAt"], "endsAt": ALERT["expiresAt"]}
    assert body[1]["endsAt"] == RESOLVED["endsAt"]
    assert sink.refresh and sink.batch
    assert AlertmanagerSink(0, sink_cfg("alertmanager", "http://am/api/v2/alerts")).url == "http://am/api/v2/alerts"


def test_slack_format() -> None:
    sink = SlackSink(0, sink_cfg("slack", "https://hooks.slack.com/services/T/B/x"))
    body = orjson.loads(sink.request([Notification("firing", {**ALERT, "annotations": {
        "summary": "a <b> & c"}})], time.time()).body)
    assert body["text"].startswith("[FIRING] PIILeak")
    assert body["blocks"][0]["text"]["type"] == "mrkdwn"
    assert "a &lt;b&gt; &amp; c" in body["blocks"][0]["text"]["text"]
    assert "route `chat`" in body["blocks"][-1]["elements"][0]["text"]
    resolved = orjson.loads(sink.request([Notification("resolved", RESOLVED)], time.time()).body)
    assert resolved["text"].startswith("[RESOLVED]") and ":white_check_mark:" in resolved["blocks"][0]["text"]["text"]


def test_pagerduty_format() -> None:
    sink = PagerDutySink(0, sink_cfg("pagerduty", None), "R0UTINGKEY")
    assert sink.url == "https://events.pagerduty.com/v2/enqueue"
    trig = orjson.loads(sink.request([Notification("firing", ALERT)], time.time()).body)
    assert trig["event_action"] == "trigger" and trig["routing_key"] == "R0UTINGKEY"
    assert trig["dedup_key"] == ALERT["fingerprint"]
    p = trig["payload"]
    assert p["severity"] == "critical" and p["summary"] == ALERT["annotations"]["summary"]
    assert p["source"] == "chat" and p["timestamp"] == ALERT["startsAt"]
    res = orjson.loads(sink.request([Notification("resolved", RESOLVED)], time.time()).body)
    assert res == {"routing_key": "R0UTINGKEY", "dedup_key": ALERT["fingerprint"], "client": "gapwatch",
                   "event_action": "resolve"}


def test_webhook_format_and_headers() -> None:
    sink = WebhookSink(0, sink_cfg("webhook"), SECRET)
    note = Notification("firing", ALERT)
    now = time.time()
    req = sink.request([note], now)
    assert orjson.loads(req.body) == {"version": "1", "source": "gapwatch", "status": "firing", "alerts": [ALERT]}
    assert req.headers[DELIVERY_HEADER] == note.id
    assert req.headers[TIMESTAMP_HEADER] == str(int(now))
    assert verify_signature(SECRET, req.body, req.headers[TIMESTAMP_HEADER], req.headers[SIGNATURE_HEADER])
    unsigned = WebhookSink(0, sink_cfg("webhook"), None).request([note], now)
    assert SIGNATURE_HEADER not in unsigned.headers


def test_build_sinks_requires_credentials() -> None:
    with pytest.raises(ValueError, match=r"alerts.sinks\[0\].secret_env: environment variable GW_S is not set"):
        build_sinks([sink_cfg("webhook", secret_env="GW_S")], env={})
    with pytest.raises(ValueError, match=r"alerts.sinks\[1\].routing_key_env"):
        build_sinks([sink_cfg("log", None), sink_cfg("pagerduty", None)], env={})
    sinks = build_sinks([sink_cfg("webhook", secret_env="GW_S"), sink_cfg("pagerduty", None, routing_key_env="PD"),
                         sink_cfg("slack"), sink_cfg("alertmanager"), sink_cfg("log", None)],
                        env={"GW_S": "s3cret", "PD": "key"})
    assert [s.name for s in sinks] == ["webhook", "pagerduty", "slack", "alertmanager", "log"]
    assert [s.where for s in sinks][:2] == ["webhook[0]", "pagerduty[1]"]


# --- delivery -----------------------------------------------------------------------------------


class Receiver:
    """A scripted HTTP receiver for httpx.MockTransport."""

    def __init__(self, *responses: int | type[Exception]) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        r = self.responses.pop(0) if self.responses else 200
        if isinstance(r, type):
            raise r("boom", request=request)
        return httpx.Response(r, headers={"retry-after": "0"} if r == 429 else {})


def dispatcher(sinks: list[Any], receiver: Receiver, metrics: Metrics, sleeps: list[float],
               queue_size: int = 100) -> Dispatcher:
    async def fake_sleep(d: float) -> None:
        sleeps.append(d)

    return Dispatcher(sinks, metrics, queue_size, transport=httpx.MockTransport(receiver), sleep=fake_sleep)


async def drain(d: Dispatcher) -> None:
    await d.stop(grace_seconds=5)


async def test_retries_with_exponential_backoff_then_delivers() -> None:
    metrics, sleeps = Metrics(), []
    recv = Receiver(500, 503, httpx.ConnectError, 200)
    sink = WebhookSink(0, sink_cfg("webhook"), SECRET)
    d = dispatcher([sink], recv, metrics, sleeps)
    d.start()
    note = Notification("firing", ALERT)
    d.submit(note)
    await drain(d)
    assert len(recv.requests) == 4 and d.delivered == 1 and d.failed == 0
    assert [0.25 <= s <= 0.5 for s in sleeps[:1]] == [True]
    assert all(lo / 2 <= s <= lo for s, lo in zip(sleeps, (0.5, 1.0, 2.0), strict=True))
    # every attempt is signed afresh, and carries the same delivery id
    assert {r.headers[DELIVERY_HEADER] for r in recv.requests} == {note.id}
    assert all(verify_signature(SECRET, r.content, r.headers[TIMESTAMP_HEADER], r.headers[SIGNATURE_HEADER])
               for r in recv.requests)
    assert metric_value(metrics.registry, "gapwatch_alert_sink_failures_total", sink="webhook") == 0


async def test_permanent_client_error_is_not_retried_and_counted() -> None:
    metrics, sleeps = Metrics(), []
    recv = Receiver(400)
    d = dispatcher([SlackSink(0, sink_cfg("slack"))], recv, metrics, sleeps)
    d.start()
    d.submit(Notification("firing", ALERT))
    await drain(d)
    assert len(recv.requests) == 1 and sleeps == []
    assert metric_value(metrics.registry, "gapwatch_alert_sink_failures_total", sink="slack") == 1


async def test_gives_up_after_max_retries_and_counts() -> None:
    metrics, sleeps = Metrics(), []
    recv = Receiver(*([httpx.ConnectTimeout] * 10))
    sink = PagerDutySink(0, sink_cfg("pagerduty", max_retries=2), "k")
    d = dispatcher([sink], recv, metrics, sleeps)
    d.start()
    d.submit(Notification("firing", ALERT))
    d.submit(Notification("resolved", RESOLVED))
    await drain(d)
    assert len(recv.requests) == 6  # 1 + 2 retries, twice
    assert metric_value(metrics.registry, "gapwatch_alert_sink_failures_total", sink="pagerduty") == 2


async def test_429_is_retried() -> None:
    metrics, sleeps = Metrics(), []
    recv = Receiver(429, 200)
    d = dispatcher([WebhookSink(0, sink_cfg("webhook"), None)], recv, metrics, sleeps)
    d.start()
    d.submit(Notification("firing", ALERT))
    await drain(d)
    assert len(recv.requests) == 2 and d.delivered == 1


async def test_full_queue_drops_and_counts_without_blocking() -> None:
    metrics = Metrics()
    gate = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await gate.wait()
        return httpx.Response(200)

    sink = WebhookSink(0, sink_cfg("webhook"), None)
    d = Dispatcher([sink], metrics, queue_size=3, transport=httpx.MockTransport(slow))
    d.start()
    t0 = time.perf_counter()
    for _ in range(10):
        d.submit(Notification("firing", ALERT))
    assert time.perf_counter() - t0 < 0.05  # submit never waits for the receiver
    await asyncio.sleep(0.01)
    dropped = metric_value(metrics.registry, "gapwatch_alert_sink_failures_total", sink="webhook")
    assert 6 <= dropped <= 7  # 3 queued (+1 in flight)
    gate.set()
    await drain(d)
    assert d.delivered + dropped == 10


async def test_alertmanager_batches_and_refresh_goes_only_to_alertmanager() -> None:
    metrics, sleeps = Metrics(), []
    recv = Receiver()
    am = AlertmanagerSink(0, sink_cfg("alertmanager", "http://am"))
    hook = WebhookSink(1, sink_cfg("webhook", "http://hook"), None)
    quiet = WebhookSink(2, sink_cfg("webhook", "http://quiet", send_resolved=False), None)
    d = dispatcher([am, hook, quiet], recv, metrics, sleeps)
    d.start()
    d.submit(Notification("firing", ALERT, refresh=True))
    d.submit(Notification("firing", ALERT))
    d.submit(Notification("resolved", RESOLVED))
    await drain(d)
    by_host: dict[str, list[Any]] = {}
    for r in recv.requests:
        by_host.setdefault(r.url.host, []).append(orjson.loads(r.content))
    assert sum(len(b) for b in by_host["am"]) == 3  # the keep-alive too; batched into lists
    assert [b["status"] for b in by_host["hook"]] == ["firing", "resolved"]
    assert [b["status"] for b in by_host["quiet"]] == ["firing"]


async def test_log_sink_logs_without_http(caplog: pytest.LogCaptureFixture) -> None:
    metrics, sleeps = Metrics(), []
    recv = Receiver()
    (sink,) = build_sinks([sink_cfg("log", None)], env={})
    d = dispatcher([sink], recv, metrics, sleeps)
    d.start()
    with caplog.at_level("WARNING", logger="gapwatch.alerts"):
        d.submit(Notification("firing", ALERT))
        await drain(d)
    assert recv.requests == [] and d.delivered == 1
    assert '"alertname":"PIILeak"' in caplog.text


async def test_failure_logs_never_carry_the_url_or_secret(caplog: pytest.LogCaptureFixture) -> None:
    metrics, sleeps = Metrics(), []
    recv = Receiver(403)
    url = "https://hooks.slack.com/services/T000/B000/SECRETPATHxyz"
    d = dispatcher([SlackSink(3, sink_cfg("slack", url))], recv, metrics, sleeps)
    d.start()
    with caplog.at_level("WARNING", logger="gapwatch.alerts"):
        d.submit(Notification("firing", ALERT))
        await drain(d)
    assert "slack[3]" in caplog.text and "HTTP 403" in caplog.text
    assert "SECRETPATH" not in caplog.text and "hooks.slack.com" not in caplog.text
