"""gapwatch's anomaly alerts reach a real Alertmanager and resolve there.

A real ``prometheus-alertmanager`` (Debian package; .ci/run installs it) runs on a free
loopback port with a temporary config and storage directory. The simulated provider first
answers cleanly, then starts leaking an e-mail address in every answer, then recovers. With a
static rule over a 2 s window (at least 5 samples), Alertmanager's API must show the alert
firing with the right labels within a bounded time, and not firing once the provider
recovers. No request fails along the way.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.alerts import AlertSettings
from proxy.app import create_app
from proxy.config import load_dict
from proxy.metrics import Metrics
from tests.conftest import metric_value
from tests.integration.alerting import CLEAN, LEAK, chat, pii_detector, wire_alerts
from tests.servers import ThreadServer, free_port, wait_http

pytestmark = pytest.mark.slow

AM_CONFIG = """
route:
  receiver: blackhole
  group_by: [alertname, route, detector]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: blackhole
"""


@pytest.fixture
def alertmanager() -> Iterator[str]:
    binary = shutil.which("prometheus-alertmanager")
    if binary is None:
        pytest.fail("'prometheus-alertmanager' is not installed: apt-get install -y prometheus-alertmanager "
                    "(.ci/run installs it in CI)")
    with tempfile.TemporaryDirectory(prefix="gapwatch-am-") as tmp:
        cfg = Path(tmp) / "alertmanager.yml"
        cfg.write_text(AM_CONFIG)
        port = free_port()
        proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.path={tmp}/data", f"--web.listen-address=127.0.0.1:{port}",
             "--cluster.listen-address=", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_http(f"{url}/-/ready", timeout=15)
            except RuntimeError:
                proc.kill()
                pytest.fail(f"alertmanager did not start: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


class Traffic:
    """Sends chat requests in a thread at a steady pace; ``text`` picks what the simulated
    provider answers. Every status code is kept, so the test can prove none failed."""

    def __init__(self, base_url: str, per_second: float = 25.0) -> None:
        self.base_url = base_url
        self.text = CLEAN
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._pause = 1.0 / per_second
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    self.statuses.append(chat(client, self.base_url, self.text))
                except httpx.HTTPError:
                    self.statuses.append(0)
                time.sleep(self._pause)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)


def am_alerts(am: str, name: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{am}/api/v2/alerts", params={"filter": f'alertname="{name}"'}, timeout=5)
    r.raise_for_status()
    return [a for a in r.json() if a["status"]["state"] == "active"]


def wait_for(fn: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}")


def test_pii_leak_fires_and_resolves_in_alertmanager(sim: ThreadServer, alertmanager: str) -> None:
    det, settings = pii_detector()
    cfg = {
        "upstreams": {"sim": {"base_url": f"{sim.url}/v1"}},
        "routes": [{"match": {"model": "*"}, "upstream": "sim", "policy": "default", "name": "chat"}],
        "policies": {"default": {"detectors": {det: settings}}},
        "incidents": {"sinks": []},
        "telemetry": {"metrics": {"model_allowlist": ["sim-*"]}},
        "alerts": {
            "sinks": [{"type": "alertmanager", "url": alertmanager}],
            "rules": [{"name": "GapwatchPIILeakRate", "signal": f"findings.{det}", "threshold": 0.2,
                       "window": "2s", "min_samples": 5, "severity": "critical"}],
        },
    }
    app = create_app(load_dict(cfg), Metrics())
    engine = wire_alerts(app, AlertSettings.from_config(app.gw.config, cooldown_seconds=0))
    srv = ThreadServer(app).start()
    t0 = time.monotonic()
    try:
        with Traffic(srv.url) as traffic:
            time.sleep(2.5)  # clean answers fill the window: nothing fires
            assert am_alerts(alertmanager, "GapwatchPIILeakRate") == []
            assert engine.active() == []

            traffic.text = LEAK
            switched = time.monotonic()
            (alert,) = wait_for(lambda: am_alerts(alertmanager, "GapwatchPIILeakRate"), 10,
                                "the alert to fire in Alertmanager")
            fired_after = time.monotonic() - switched
            labels = alert["labels"]
            assert labels == {"alertname": "GapwatchPIILeakRate", "severity": "critical", "route": "chat",
                              "model": "sim-echo", "signal": f"findings.{det}", "detector": det,
                              "source": "gapwatch"}
            assert "findings" in alert["annotations"]["summary"]
            assert "route chat" in alert["annotations"]["summary"]
            assert "jane.doe" not in str(alert)  # never the leaked text itself

            traffic.text = CLEAN
            recovered = time.monotonic()
            wait_for(lambda: not am_alerts(alertmanager, "GapwatchPIILeakRate"), 10,
                     "the alert to resolve in Alertmanager")
            resolved_after = time.monotonic() - recovered
        assert traffic.statuses and set(traffic.statuses) == {200}
        events = [e["event"] for e in engine.history(10)]
        assert events == ["resolved", "firing"]
        assert engine.active() == []
        m = app.gw.metrics.registry
        assert metric_value(m, "gapwatch_alert_sink_failures_total", sink="alertmanager") == 0
        assert metric_value(m, "gapwatch_alert_notifications_total", sink="alertmanager") == 2
        print(f"\nfired {fired_after:.1f}s after the switch, resolved {resolved_after:.1f}s after recovery; "
              f"{len(traffic.statuses)} requests; total {time.monotonic() - t0:.1f}s")
    finally:
        srv.stop()
