"""Alert delivery: Alertmanager v2, Slack, PagerDuty Events v2, signed JSON webhooks, logs.

Why a queue per sink: the alert engine decides *what* to send on its evaluation tick and must
never wait for a slow receiver, and one dead receiver must not delay the others. ``submit`` is
synchronous and never blocks: it puts the notification on each sink's bounded queue, and a
queue that is full drops it (counted in ``gapwatch_alert_sink_failures_total{sink}``). One
worker task per sink delivers with a per-attempt timeout, retries transient failures (network
errors, 408/425/429, 5xx) with exponential backoff and jitter, gives up at once on other 4xx
(the payload or the credential is wrong: retrying cannot help), and counts every notification
it could not deliver. Nothing here runs on a request's path.

Wire formats (one notification is one alert changing state):

- ``alertmanager``: ``POST {url}/api/v2/alerts`` with a JSON list of postable alerts (labels,
  annotations, startsAt, endsAt). A firing alert carries ``endsAt`` a few resend intervals
  ahead, and the engine re-posts firing alerts every resend interval (``refresh``), as
  Prometheus does: if gapwatch dies, Alertmanager resolves the alert by itself.
- ``slack``: an incoming-webhook body (``text`` fallback plus ``blocks``).
- ``pagerduty``: an Events API v2 ``trigger``/``resolve`` event; ``dedup_key`` is the alert's
  fingerprint, so PagerDuty folds re-notifications into one incident.
- ``webhook``: ``{"version": "1", "status", "alerts": [...]}`` signed with HMAC-SHA256 over
  ``"{timestamp}.{body}"``; headers ``x-gapwatch-timestamp`` (Unix seconds),
  ``x-gapwatch-signature`` (``v1=<hex>``) and ``x-gapwatch-delivery`` (the same id on every
  retry of one notification, so a receiver can drop duplicates). Receivers verify with
  ``verify_signature`` and reject timestamps outside a tolerance window (replay protection);
  see docs/alerts.md.
- ``log``: one JSON line on the ``gapwatch.alerts`` logger.

Credentials (the webhook secret, the PagerDuty routing key, the Slack URL itself) never
appear in logs: failures are logged by sink type and index, with the HTTP status only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import orjson

log = logging.getLogger("gapwatch.alerts")

SIGNATURE_HEADER = "x-gapwatch-signature"
TIMESTAMP_HEADER = "x-gapwatch-timestamp"
DELIVERY_HEADER = "x-gapwatch-delivery"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_SECONDS = 300.0
PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"

DEFAULT_QUEUE_SIZE = 1000
DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_MAX_RETRIES = 5
DEFAULT_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
MAX_BATCH = 64  # Alertmanager accepts a list: queued notifications go out together
RETRYABLE_4XX = frozenset({408, 425, 429})


@dataclass(frozen=True)
class Notification:
    """One alert changing state (or, with ``refresh``, a keep-alive re-post of a firing alert
    for sinks that expire alerts themselves). ``alert`` is the engine's canonical dict:
    fingerprint, status, labels, annotations, startsAt, endsAt (None while firing) and
    expiresAt (firing only: when a receiver may consider it stale)."""

    status: Literal["firing", "resolved"]
    alert: Mapping[str, Any]
    refresh: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


# --- webhook signatures -----------------------------------------------------------------------


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """``v1=<hex HMAC-SHA256(secret, "{timestamp}." + body)>``. The timestamp is inside the
    MAC, so a captured request cannot be replayed later with a fresh timestamp."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={mac}"


def verify_signature(secret: bytes, body: bytes, timestamp: str | None, signature: str | None, *,
                     tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS, now: float | None = None) -> bool:
    """True when ``signature`` is a valid ``v1`` signature of ``body`` at ``timestamp`` and the
    timestamp is within ``tolerance_seconds`` of ``now`` (replay window). Constant-time."""
    if not timestamp or not signature:
        return False
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_seconds:
        return False
    expected = sign(secret, ts, body)
    return any(hmac.compare_digest(expected, part.strip()) for part in signature.split(","))


# --- sinks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    url: str
    headers: dict[str, str]
    body: bytes


class Sink:
    """A receiver: turns notifications into an HTTP request (or a log line).

    ``name`` is the metric label (the sink type: bounded), ``where`` the log name
    (``webhook[1]``), ``refresh`` whether the sink wants keep-alive re-posts of firing alerts,
    ``batch`` whether several notifications fit one request."""

    type = "sink"
    refresh = False
    batch = False

    def __init__(self, index: int, cfg: Any) -> None:
        self.name = self.type
        self.where = f"{self.type}[{index}]"
        self.timeout_seconds = float(getattr(cfg, "timeout_seconds", DEFAULT_TIMEOUT_SECONDS))
        self.max_retries = int(getattr(cfg, "max_retries", DEFAULT_MAX_RETRIES))
        self.backoff_seconds = float(getattr(cfg, "backoff_seconds", DEFAULT_BACKOFF_SECONDS))
        self.send_resolved = bool(getattr(cfg, "send_resolved", True))
        self.extra_headers = dict(getattr(cfg, "headers", None) or {})

    def wants(self, note: Notification) -> bool:
        if note.refresh:
            return self.refresh
        return note.status == "firing" or self.send_resolved

    def request(self, notes: Sequence[Notification], now: float) -> Request | None:
        raise NotImplementedError


def _labels(alert: Mapping[str, Any]) -> dict[str, str]:
    return dict(alert.get("labels") or {})


def _annotations(alert: Mapping[str, Any]) -> dict[str, str]:
    return dict(alert.get("annotations") or {})


class AlertmanagerSink(Sink):
    type = "alertmanager"
    refresh = True
    batch = True

    def __init__(self, index: int, cfg: Any) -> None:
        super().__init__(index, cfg)
        url = str(cfg.url).rstrip("/")
        self.url = url if url.endswith("/api/v2/alerts") else url + "/api/v2/alerts"

    def request(self, notes: Sequence[Notification], now: float) -> Request:
        out = []
        for n in notes:
            a = n.alert
            ends = a.get("endsAt") if n.status == "resolved" else a.get("expiresAt")
            item: dict[str, Any] = {"labels": _labels(a), "annotations": _annotations(a), "startsAt": a["startsAt"]}
            if ends:
                item["endsAt"] = ends
            if a.get("generatorURL"):
                item["generatorURL"] = a["generatorURL"]
            out.append(item)
        return Request(self.url, {"content-type": "application/json", **self.extra_headers}, orjson.dumps(out))


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


SLACK_ICONS = {"critical": ":red_circle:", "warning": ":large_orange_circle:", "info": ":large_blue_circle:"}


class SlackSink(Sink):
    type = "slack"

    def __init__(self, index: int, cfg: Any) -> None:
        super().__init__(index, cfg)
        self.url = str(cfg.url)

    def request(self, notes: Sequence[Notification], now: float) -> Request:
        (n,) = notes
        labels, ann = _labels(n.alert), _annotations(n.alert)
        sev = labels.get("severity", "warning")
        icon = ":white_check_mark:" if n.status == "resolved" else SLACK_ICONS.get(sev, ":warning:")
        title = f"[{n.status.upper()}] {labels.get('alertname', 'gapwatch alert')}"
        summary = ann.get("summary", "")
        context = " · ".join(f"{k} `{_slack_escape(v)}`" for k, v in labels.items()
                             if k in ("route", "model", "detector", "signal", "severity"))
        blocks = [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"{icon} *{_slack_escape(title)}*\n"
                                         f"{_slack_escape(summary)}"}},
        ]
        if ann.get("description"):
            blocks.append({"type": "section", "text": {"type": "mrkdwn",
                                                       "text": _slack_escape(ann["description"])[:2900]}})
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": context or "gapwatch"}]})
        body = {"text": f"{title}: {summary}"[:3000], "blocks": blocks}
        return Request(self.url, {"content-type": "application/json", **self.extra_headers}, orjson.dumps(body))


PAGERDUTY_SEVERITY = {"critical": "critical", "warning": "warning", "info": "info"}


class PagerDutySink(Sink):
    type = "pagerduty"

    def __init__(self, index: int, cfg: Any, routing_key: str) -> None:
        super().__init__(index, cfg)
        self.url = str(cfg.url or PAGERDUTY_URL)
        self._key = routing_key

    def request(self, notes: Sequence[Notification], now: float) -> Request:
        (n,) = notes
        a = n.alert
        labels, ann = _labels(a), _annotations(a)
        body: dict[str, Any] = {"routing_key": self._key, "dedup_key": a["fingerprint"], "client": "gapwatch"}
        if n.status == "resolved":
            body["event_action"] = "resolve"
        else:
            body["event_action"] = "trigger"
            body["payload"] = {
                "summary": (ann.get("summary") or labels.get("alertname", "gapwatch alert"))[:1024],
                "source": labels.get("route", "gapwatch"),
                "severity": PAGERDUTY_SEVERITY.get(labels.get("severity", ""), "warning"),
                "timestamp": a["startsAt"],
                "component": labels.get("model", ""),
                "group": labels.get("route", ""),
                "class": labels.get("signal", ""),
                "custom_details": {"labels": labels, "annotations": ann},
            }
        return Request(self.url, {"content-type": "application/json", **self.extra_headers}, orjson.dumps(body))


class WebhookSink(Sink):
    type = "webhook"

    def __init__(self, index: int, cfg: Any, secret: bytes | None) -> None:
        super().__init__(index, cfg)
        self.url = str(cfg.url)
        self._secret = secret
        self.signature_header = str(getattr(cfg, "signature_header", SIGNATURE_HEADER)).lower()
        self.timestamp_header = str(getattr(cfg, "timestamp_header", TIMESTAMP_HEADER)).lower()

    def request(self, notes: Sequence[Notification], now: float) -> Request:
        (n,) = notes
        body = orjson.dumps({"version": "1", "source": "gapwatch", "status": n.status,
                             "alerts": [dict(n.alert)]})
        headers = {"content-type": "application/json", DELIVERY_HEADER: n.id, **self.extra_headers}
        if self._secret is not None:
            ts = int(now)
            headers[self.timestamp_header] = str(ts)
            headers[self.signature_header] = sign(self._secret, ts, body)
        return Request(self.url, headers, body)


class LogSink(Sink):
    type = "log"

    def request(self, notes: Sequence[Notification], now: float) -> None:
        for n in notes:
            log.warning("alert %s", orjson.dumps({"status": n.status, **n.alert}).decode())
        return None


def build_sinks(configs: Sequence[Any], env: Mapping[str, str] | None = None) -> list[Sink]:
    """Sinks from ``alerts.sinks``. Raises ValueError naming the config path when a credential
    the sink needs is missing (a webhook never goes out unsigned when a secret is configured)."""
    env = os.environ if env is None else env
    sinks: list[Sink] = []
    for i, cfg in enumerate(configs):
        where = f"alerts.sinks[{i}]"
        if cfg.type == "log":
            sinks.append(LogSink(i, cfg))
            continue
        if not cfg.url and cfg.type != "pagerduty":
            raise ValueError(f"{where}.url: a {cfg.type} sink needs a url")
        if cfg.type == "alertmanager":
            sinks.append(AlertmanagerSink(i, cfg))
        elif cfg.type == "slack":
            sinks.append(SlackSink(i, cfg))
        elif cfg.type == "pagerduty":
            if not cfg.routing_key_env or not env.get(cfg.routing_key_env):
                raise ValueError(f"{where}.routing_key_env: set it to the name of an environment variable "
                                 "holding the PagerDuty integration (routing) key")
            sinks.append(PagerDutySink(i, cfg, env[cfg.routing_key_env]))
        elif cfg.type == "webhook":
            secret: bytes | None = None
            if cfg.secret_env:
                value = env.get(cfg.secret_env)
                if not value:
                    raise ValueError(f"{where}.secret_env: environment variable {cfg.secret_env} is not set")
                secret = value.encode()
            sinks.append(WebhookSink(i, cfg, secret))
        else:  # pragma: no cover - the config model's Literal forbids it
            raise ValueError(f"{where}.type: unknown sink type {cfg.type!r}")
    return sinks


# --- delivery ---------------------------------------------------------------------------------


class Dispatcher:
    """Bounded queue and worker task per sink. ``submit`` never blocks; ``stop`` drains for a
    short grace period, then cancels."""

    def __init__(self, sinks: Sequence[Sink], metrics: Any, queue_size: int = DEFAULT_QUEUE_SIZE,
                 transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Any = asyncio.sleep) -> None:
        self.sinks = list(sinks)
        self.metrics = metrics
        self.queue_size = queue_size
        self._transport = transport
        self._sleep = sleep
        self._queues: list[asyncio.Queue[Notification]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None
        self._stopping = False
        self.delivered = 0
        self.failed = 0
        self._logged: set[str] = set()

    def start(self) -> None:
        if self._tasks or not self.sinks:
            return
        self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False, transport=self._transport,
                                         headers={"user-agent": "gapwatch-alerts"})
        loop = asyncio.get_running_loop()
        self._queues = [asyncio.Queue(self.queue_size) for _ in self.sinks]
        self._tasks = [loop.create_task(self._worker(s, q), name=f"gapwatch-alert-sink-{s.where}")
                       for s, q in zip(self.sinks, self._queues, strict=True)]

    async def stop(self, grace_seconds: float = 2.0) -> None:
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_seconds):
                    for q in self._queues:
                        await q.join()
            self._stopping = True  # with the cancel: see AlertEngine.stop
            for t in self._tasks:
                t.cancel()
            await asyncio.wait(self._tasks, timeout=2.0)
            self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def submit(self, note: Notification) -> None:
        for sink, q in zip(self.sinks, self._queues, strict=False):
            if not sink.wants(note):
                continue
            try:
                q.put_nowait(note)
            except asyncio.QueueFull:
                self._failed(sink, 1, "queue full")

    def pending(self) -> int:
        return sum(q.qsize() for q in self._queues)

    def _failed(self, sink: Sink, count: int, why: str) -> None:
        self.failed += count
        self.metrics.alert_sink_failures.labels(sink.name).inc(count)
        key = f"{sink.where}:{why}"
        if key not in self._logged:  # once per sink and reason: a dead receiver must not flood logs
            self._logged.add(key)
            log.warning("alert sink %s could not deliver %d notification(s): %s (counted in "
                        "gapwatch_alert_sink_failures_total; logged once per reason)", sink.where, count, why)

    async def _worker(self, sink: Sink, q: asyncio.Queue[Notification]) -> None:
        while not self._stopping:
            batch = [await q.get()]
            if sink.batch:
                while len(batch) < MAX_BATCH and not q.empty():
                    batch.append(q.get_nowait())
            try:
                await self._deliver(sink, batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a sink bug must not kill its worker
                self._failed(sink, len(batch), f"internal error {type(exc).__name__}")
            finally:
                for _ in batch:
                    q.task_done()

    async def _deliver(self, sink: Sink, batch: list[Notification]) -> None:
        assert self._client is not None
        attempt = 0
        while True:
            req = sink.request(batch, time.time())
            if req is None:  # local sink: done
                self.delivered += len(batch)
                return
            why: str
            retry_after: float | None = None
            try:
                resp = await self._client.post(req.url, content=req.body, headers=req.headers,
                                               timeout=sink.timeout_seconds)
            except httpx.HTTPError as exc:
                why, retryable = f"{type(exc).__name__}", True
            else:
                code = resp.status_code
                if 200 <= code < 300:
                    self.delivered += len(batch)
                    return
                why = f"HTTP {code}"
                retryable = code >= 500 or code in RETRYABLE_4XX
                ra = resp.headers.get("retry-after")
                if ra and ra.isdigit():
                    retry_after = float(ra)
            if not retryable or attempt >= sink.max_retries:
                self._failed(sink, len(batch), why)
                return
            delay = min(MAX_BACKOFF_SECONDS, sink.backoff_seconds * 2**attempt) * (0.5 + random.random() / 2)
            if retry_after is not None:
                delay = max(delay, min(retry_after, MAX_BACKOFF_SECONDS))
            attempt += 1
            await self._sleep(delay)
