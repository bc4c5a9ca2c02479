"""Shared state on a real Redis: registries and baselines replicate between replicas, the
alert de-duplication protocol holds across replicas, losing Redis degrades to per-process
state without failing anything, and it recovers when Redis returns.

A real ``redis-server`` (Debian package; .ci/run installs it) runs on a free loopback port
with persistence off (``--save '' --appendonly no``). The end-to-end test runs two proxy
*processes* sharing it in front of the simulated provider, with a signed-webhook receiver in
the test: a burst that trips the alert on both replicas produces exactly one firing and one
resolved notification, a canary planted by one replica is recognised by the other, and
killing Redis mid-run loses no request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.alert_sinks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from proxy.config import load_dict
from proxy.metrics import Metrics
from proxy.state_redis import RedisState, build_state
from tests.conftest import b64, metric_value
from tests.integration.alerting import CLEAN, LEAK, chat, pii_detector
from tests.servers import ThreadServer, free_port, wait_http

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec-replicas-7f3a"


class RedisServer:
    """``redis-server`` on a fixed loopback port that the test can kill and bring back."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("'redis-server' is not installed: apt-get install -y redis-server (.ci/run installs it in CI)")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="gapwatch-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self._dir.name, "--loglevel", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        pytest.fail("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def close(self) -> None:
        self.kill()
        self._dir.cleanup()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    yield srv
    srv.close()


def state_config(url: str, prefix: str | None = None) -> Any:
    return load_dict({"upstreams": {"u": {"base_url": "http://127.0.0.1:9/v1"}}, "routes": [{"upstream": "u"}],
                      "state": {"backend": "redis", "url": url,
                                "key_prefix": prefix or f"gw-test-{uuid.uuid4().hex[:8]}:"}}).config


def replicas(url: str, metrics: Metrics | None = None, **kw: Any) -> tuple[RedisState, RedisState]:
    cfg = state_config(url)
    a = build_state(cfg, metrics, replica_id="a", sync_interval_seconds=0.1, **kw)
    b = build_state(cfg, metrics, replica_id="b", sync_interval_seconds=0.1, **kw)
    assert isinstance(a, RedisState) and isinstance(b, RedisState)
    return a, b


# --- in-process replicas -----------------------------------------------------------------------


async def test_registries_and_baselines_replicate(redis_server: RedisServer) -> None:
    a, b = replicas(redis_server.url)
    a.start()
    b.start()
    try:
        await a.sync_once()
        await b.sync_once()
        token = "gwc-" + "Q" * 20
        a.canaries.register(token)  # what the proxy does before the upstream call: local, at once
        assert a.canaries.is_registered(token) and not b.canaries.is_registered(token)
        big = 2**64 - 1  # shingle hashes are unsigned 64-bit
        a.fingerprints.add("alpha", {1, 2, big})
        a.fingerprints.add("alpha", {1, 2, big})  # the same prompt again: sent to Redis once
        assert list(a.outbox).count(("f", "alpha", tuple(sorted({1, 2, big})))) <= 1
        await a.sync_once()
        await b.sync_once()
        assert b.canaries.is_registered(token)
        assert b.fingerprints.owners(big) == {"alpha"} and b.fingerprints.owners(3) == frozenset()
        assert b.pulled == 2 and a.pulled == 0  # a never re-reads its own entries
        b.canaries.register("gwc-" + "R" * 20)
        await b.sync_once()
        await a.sync_once()
        assert a.canaries.is_registered("gwc-" + "R" * 20)
        await a.save_baseline("PIILeak|chat|m|findings.pii", {"mean": 0.01, "var": 1e-5, "n": 40, "samples": 90},
                              ttl_seconds=60)
        assert await b.load_baseline("PIILeak|chat|m|findings.pii") == {"mean": 0.01, "var": 1e-5, "n": 40,
                                                                         "samples": 90}
        assert await b.load_baseline("missing") is None
    finally:
        await a.stop()
        await b.stop()


async def test_alert_protocol_across_replicas(redis_server: RedisServer) -> None:
    a, b = replicas(redis_server.url)
    a.start()
    b.start()
    try:
        await a.sync_once()
        await b.sync_once()
        kw = {"heartbeat_seconds": 5.0, "renotify_seconds": 0.3}
        first = await a.alert_firing("fp1", "a", starts_at=100.0, **kw)
        second = await b.alert_firing("fp1", "b", starts_at=101.5, **kw)
        assert first == ("notify", 100.0)
        assert second == ("quiet", 100.0)  # b adopts the episode's start
        assert (await a.alert_firing("fp1", "a", starts_at=100.0, **kw)).result == "quiet"
        await asyncio.sleep(0.35)
        claims = [await a.alert_firing("fp1", "a", starts_at=100.0, **kw),
                  await b.alert_firing("fp1", "b", starts_at=100.0, **kw)]
        assert sorted(c.result for c in claims) == ["quiet", "renotify"]  # one re-notification per interval
        assert await a.alert_resolved("fp1", "a", cooldown_seconds=0.3) == "others"
        assert await b.alert_resolved("fp1", "b", cooldown_seconds=0.3) == "notify"  # the last one out
        assert (await a.alert_firing("fp1", "a", starts_at=200.0, **kw)).result == "cooldown"
        await asyncio.sleep(0.35)
        assert (await a.alert_firing("fp1", "a", starts_at=200.0, **kw)) == ("notify", 200.0)
        assert await a.alert_resolved("fp1", "a", cooldown_seconds=0) == "notify"
        assert await a.alert_resolved("fp1", "a", cooldown_seconds=0) == "none"
    finally:
        await a.stop()
        await b.stop()


async def test_losing_redis_degrades_and_recovers(redis_server: RedisServer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    a, b = replicas(redis_server.url, metrics, operation_timeout_seconds=0.3)
    a.start()
    b.start()
    try:
        await a.sync_once()
        await b.sync_once()
        assert metric_value(metrics.registry, "gapwatch_state_backend_up", backend="redis") == 1
        with caplog.at_level(logging.WARNING, logger="gapwatch.state"):
            redis_server.kill()
            t0 = time.monotonic()
            a.canaries.register("gwc-" + "D" * 20)  # never waits on Redis
            assert time.monotonic() - t0 < 0.01
            for _ in range(50):  # the sync task notices within an interval or two
                if not a.up:
                    break
                await asyncio.sleep(0.05)
            assert not a.up
            t0 = time.monotonic()
            claim = await a.alert_firing("fp2", "a", starts_at=1.0, heartbeat_seconds=5, renotify_seconds=60)
            assert claim.result == "notify"  # per-process de-duplication meanwhile
            assert await a.alert_resolved("fp2", "a", cooldown_seconds=0) == "notify"
            await a.save_baseline("k", {"mean": 1.0, "var": 0.0, "n": 1}, ttl_seconds=60)
            assert await a.load_baseline("k") == {"mean": 1.0, "var": 0.0, "n": 1}
            assert time.monotonic() - t0 < 0.1  # while down nothing waits for a timeout
            assert metric_value(metrics.registry, "gapwatch_state_backend_up", backend="redis") == 0
        warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(warnings) == 2  # one per replica, not one per operation
        assert "per-process state" in warnings[0] and "redis://127.0.0.1" in warnings[0]

        redis_server.start()  # Redis returns (empty: it kept nothing)
        for _ in range(60):
            if a.up and b.up:
                break
            await asyncio.sleep(0.05)
        assert a.up and b.up
        assert metric_value(metrics.registry, "gapwatch_state_backend_up", backend="redis") == 1
        for _ in range(40):  # what a registered while Redis was down reaches b after recovery
            if b.canaries.is_registered("gwc-" + "D" * 20):
                break
            await asyncio.sleep(0.05)
        assert b.canaries.is_registered("gwc-" + "D" * 20)
        assert (await b.alert_firing("fp3", "b", starts_at=1.0, heartbeat_seconds=5,
                                     renotify_seconds=60)).result == "notify"
    finally:
        await a.stop()
        await b.stop()


# --- two proxy processes ---------------------------------------------------------------------


class WebhookReceiver:
    """A loopback HTTP server that records each notification and whether its signature holds."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                ok = verify_signature(SECRET.encode(), body, self.headers.get(TIMESTAMP_HEADER),
                                      self.headers.get(SIGNATURE_HEADER))
                doc = json.loads(body)
                received.append({"valid": ok, "status": doc["status"],
                                 "alertname": doc["alerts"][0]["labels"]["alertname"],
                                 "delivery": self.headers.get("x-gapwatch-delivery")})
                self.send_response(200 if ok else 401)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


class ProxyProcess:
    def __init__(self, config: dict[str, Any], replica: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "GAPWATCH_TEST_CONFIG": json.dumps(config), "GAPWATCH_TEST_PORT": str(self.port),
               "GAPWATCH_TEST_OPTIONS": json.dumps({"state": {"replica_id": replica, "sync_interval_seconds": 0.2,
                                                              "operation_timeout_seconds": 0.3}}),
               "GW_HOOK_SECRET": SECRET, "PYTHONPATH": str(ROOT)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen([sys.executable, "-c", "from tests.integration.alerting import serve; serve()"],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self) -> None:
        try:
            wait_http(f"{self.url}/readyz", timeout=30)
        except RuntimeError:
            self.proc.kill()
            err = self.proc.stderr.read().decode()[-3000:] if self.proc.stderr else ""
            pytest.fail(f"proxy process did not start:\n{err}")

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def until(fn: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}")


def drive(urls: list[str], text_of: Any, stop: threading.Event, statuses: list[int], pause: float = 0.02) -> None:
    """Round-robin chat requests to the replicas until ``stop``; ``text_of()`` picks the answer."""
    with httpx.Client(timeout=10) as client:
        i = 0
        while not stop.is_set():
            try:
                statuses.append(chat(client, urls[i % len(urls)], text_of()))
            except httpx.HTTPError:
                statuses.append(0)
            i += 1
            time.sleep(pause)


def test_two_replicas_one_notification_and_redis_loss(sim: ThreadServer, redis_server: RedisServer) -> None:
    det, settings = pii_detector()
    config = {
        "upstreams": {"sim": {"base_url": f"{sim.url}/v1"}},
        "routes": [{"match": {"model": "*"}, "upstream": "sim", "policy": "default", "name": "chat"}],
        "policies": {"default": {"detectors": {det: settings, "canary": {"action": "block"}}}},
        "incidents": {"sinks": []},
        "telemetry": {"metrics": {"model_allowlist": ["sim-*"]}, "tracing": {"enabled": False}},
        "state": {"backend": "redis", "url": redis_server.url, "key_prefix": f"gw-{uuid.uuid4().hex[:8]}:"},
        "alerts": {"rules": [{"name": "GapwatchPIILeakRate", "signal": f"findings.{det}", "threshold": 0.5,
                              "window": "2s", "min_samples": 5, "severity": "critical"}]},
    }
    t_start = time.monotonic()
    with WebhookReceiver() as hook:
        config["alerts"]["sinks"] = [{"type": "webhook", "url": hook.url, "secret_env": "GW_HOOK_SECRET"}]
        procs = [ProxyProcess(config, "replica-a"), ProxyProcess(config, "replica-b")]
        try:
            for p in procs:
                p.wait_ready()
            a, b = procs
            until(lambda: all(p.metric("gapwatch_state_backend_up", backend="redis") == 1 for p in procs), 5,
                  "both replicas to reach Redis")
            urls = [p.url for p in procs]
            t_ready = time.monotonic()

            # 1. a burst of leaking answers on both replicas: one firing notification
            mode = {"text": LEAK}
            stop, statuses = threading.Event(), []
            workers = [threading.Thread(target=drive, args=(urls, lambda: mode["text"], stop, statuses))
                       for _ in range(2)]
            for w in workers:
                w.start()
            until(lambda: all(p.metric("gapwatch_alerts_firing", rule="GapwatchPIILeakRate") == 1 for p in procs),
                  10, "the alert to fire on both replicas")
            until(lambda: hook.received, 5, "the firing notification")
            mode["text"] = CLEAN
            until(lambda: all(p.metric("gapwatch_alerts_firing", rule="GapwatchPIILeakRate") == 0 for p in procs),
                  10, "the alert to resolve on both replicas")
            until(lambda: len(hook.received) >= 2, 5, "the resolved notification")
            time.sleep(0.6)  # anything else would have arrived by now (eval interval 0.4 s)
            assert [(r["status"], r["alertname"]) for r in hook.received] == [
                ("firing", "GapwatchPIILeakRate"), ("resolved", "GapwatchPIILeakRate")]
            assert all(r["valid"] for r in hook.received)
            sent = [p.metric("gapwatch_alert_notifications_total", sink="webhook") for p in procs]
            assert sum(sent) == 2, sent  # one replica sent firing, the last one out sent resolved

            # 2. a canary planted by replica a is recognised in replica b's output
            rid = f"canary-{uuid.uuid4().hex[:8]}"
            with httpx.Client(timeout=10) as client:
                r = client.post(f"{a.url}/v1/chat/completions", headers={"x-request-id": rid},
                                json={"model": "sim-echo", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200
                recent = httpx.get(f"{sim.url}/v1/sim/requests", params={"n": 20}, timeout=5).json()["data"]
                mine = [x for x in recent if ["x-request-id", rid] in x["headers"]]
                token = re.search(r"gwc-[A-Za-z0-9]{20}", json.dumps(mine[-1]["body"])).group(0)  # type: ignore[union-attr]

                def leaked_on_b() -> bool:
                    resp = client.post(f"{b.url}/v1/chat/completions", headers={"x-sim-output": b64(f"ok {token}")},
                                       json={"model": "sim-echo", "messages": [{"role": "user", "content": "hi"}]})
                    return resp.status_code == 400 and resp.json()["error"]["code"] == "output_blocked"

                until(leaked_on_b, 5, "replica b to know replica a's canary")

            # 3. Redis dies mid-run: no request fails; both replicas report it; then it returns
            redis_server.kill()
            until(lambda: all(p.metric("gapwatch_state_backend_up", backend="redis") == 0 for p in procs), 5,
                  "both replicas to notice Redis is gone")
            time.sleep(1.0)
            redis_server.start()
            until(lambda: all(p.metric("gapwatch_state_backend_up", backend="redis") == 1 for p in procs), 5,
                  "both replicas to reconnect")
            time.sleep(0.5)
            stop.set()
            for w in workers:
                w.join(10)
            assert len(statuses) > 100
            assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
            print(f"\n{len(statuses)} requests, none failed; start-up {t_ready - t_start:.1f}s, "
                  f"scenario {time.monotonic() - t_ready:.1f}s")
        finally:
            for p in procs:
                p.stop()
