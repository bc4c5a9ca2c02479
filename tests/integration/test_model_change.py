"""Live model-change detection: the simulated provider switches its ``system_fingerprint`` in
the middle of a run (a provider's silent model update); exactly one ``model_changed`` alert
reaches a signed webhook on loopback, with the before and after values; the info metric shows
both identities; ``/admin/model-changes`` lists the change; Prometheus evaluates the Grafana
scorecard's annotation query to the new identity; and the live confidence histogram holds the
answers' token-logprob confidence.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.alert_sinks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from proxy.simulate import create_app as sim_app
from tests.conftest import eventually, metric_value
from tests.integration.test_prometheus import prometheus  # noqa: F401 - the fixture
from tests.servers import ThreadServer

ROOT = Path(__file__).resolve().parents[2]
SECRET = "model-change-hook-secret"
ADMIN = "admin-token-model-change"
QUESTION = [{"role": "system", "content": "The code for item 7 is QX-70."},
            {"role": "user", "content": "What is the code for item 7?"}]


class Hook:
    """A loopback webhook receiver that keeps every notification and whether it was signed."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                ok = verify_signature(SECRET.encode(), body, self.headers.get(TIMESTAMP_HEADER),
                                      self.headers.get(SIGNATURE_HEADER))
                received.append({"valid": ok, **json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


@pytest.fixture
def own_sim() -> Iterator[ThreadServer]:
    srv = ThreadServer(sim_app()).start()
    yield srv
    srv.stop()


def _config(sim_url: str, hook_url: str) -> dict[str, Any]:
    return {
        "server": {"admin_token": ADMIN},
        "upstreams": {"sim": {"base_url": f"{sim_url}/v1"}},
        "routes": [{"name": "chat", "match": {"model": "*"}, "upstream": "sim", "policy": "default"}],
        "policies": {"default": {"request_logprobs": True, "detectors": {
            "transparency": {"action": "observe"}, "uncertainty": {"action": "observe"}}}},
        "telemetry": {"metrics": {"model_allowlist": ["sim-*"]}},
        "incidents": {"sinks": []},
        "alerts": {"sinks": [{"type": "webhook", "url": hook_url, "secret_env": "GW_MODEL_HOOK_SECRET"}],
                   "default_rules": False, "model_change": {"confirm_responses": 2}},
    }


def _ask(client: Any, n: int, stream_every: int = 2) -> None:
    for i in range(n):
        if i % stream_every:
            with client.chat.completions.create(model="sim-calibrated", messages=QUESTION, stream=True) as s:
                assert "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        else:
            r = client.chat.completions.create(model="sim-calibrated", messages=QUESTION)
            assert r.choices[0].logprobs is None  # asked for by the proxy, stripped for the client


def _info(registry: Any, fp: str) -> float:
    return metric_value(registry, "gapwatch_upstream_model_info", route="chat", model="sim-calibrated",
                        response_model="sim-calibrated", system_fingerprint=fp)


def _wait_scrapes(prom: str, n: int) -> None:
    def count() -> float:
        res = httpx.get(f"{prom}/api/v1/query", params={"query": 'count_over_time(up{job="gapwatch"}[10m])'}).json()
        data = res["data"]["result"]
        return float(data[0]["value"][1]) if data else 0.0

    target = count() + n
    deadline = time.monotonic() + 20
    while count() < target:
        assert time.monotonic() < deadline, "prometheus is not scraping the proxy"
        time.sleep(0.2)


def test_fingerprint_switch_raises_one_model_changed_alert(start_proxy, own_sim, hook, prometheus,  # noqa: F811
                                                           monkeypatch):
    monkeypatch.setenv("GW_MODEL_HOOK_SECRET", SECRET)
    p = start_proxy(_config(own_sim.url, hook.url))
    prom = prometheus(f"127.0.0.1:{p.server.port}")
    client = p.client()
    reg = p.metrics.registry

    _ask(client, 4)
    assert eventually(lambda: _info(reg, "fp_sim") == 1.0)
    assert metric_value(reg, "gapwatch_model_changes_total", route="chat", model="sim-calibrated") == 0
    _wait_scrapes(prom, 1)

    httpx.post(f"{own_sim.url}/v1/sim/identity", json={"system_fingerprint": "fp_new"}).raise_for_status()
    _ask(client, 1)  # one response is not a change yet (confirm_responses: 2)
    time.sleep(0.3)
    assert hook.received == [] and _info(reg, "fp_sim") == 1.0
    _ask(client, 5)

    assert eventually(lambda: hook.received, timeout=5), "no model_changed notification"
    time.sleep(0.5)  # later responses with the new fingerprint are no further change
    assert len(hook.received) == 1, hook.received
    note = hook.received[0]
    assert note["valid"] and note["status"] == "firing" and len(note["alerts"]) == 1
    alert = note["alerts"][0]
    assert alert["labels"]["alertname"] == "model_changed"
    assert {k: alert["labels"][k] for k in ("route", "model", "system_fingerprint", "source")} == {
        "route": "chat", "model": "sim-calibrated", "system_fingerprint": "fp_new", "source": "gapwatch"}
    ann = alert["annotations"]
    assert (ann["before_system_fingerprint"], ann["after_system_fingerprint"]) == ("fp_sim", "fp_new")
    assert ann["before_model"] == ann["after_model"] == "sim-calibrated" and ann["responses"] == "2"
    assert "fp_sim" in ann["summary"] and "fp_new" in ann["summary"]

    # the info metric shows both identities: the one in use and the one it changed from
    assert _info(reg, "fp_new") == 1.0 and _info(reg, "fp_sim") == 0.0
    assert metric_value(reg, "gapwatch_model_changes_total", route="chat", model="sim-calibrated") == 1
    text = httpx.get(f"{p.url}/metrics").text
    assert 'system_fingerprint="fp_sim"} 0.0' in text and 'system_fingerprint="fp_new"} 1.0' in text

    # the admin endpoint the built-in dashboard reads (token required)
    assert httpx.get(f"{p.url}/admin/model-changes").status_code == 401
    got = httpx.get(f"{p.url}/admin/model-changes", headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert [(c["route"], c["model"], c["before"]["system_fingerprint"], c["after"]["system_fingerprint"])
            for c in got["changes"]] == [("chat", "sim-calibrated", "fp_sim", "fp_new")]
    assert [{k: c[k] for k in ("route", "model", "response_model", "system_fingerprint")} for c in got["current"]] \
        == [{"route": "chat", "model": "sim-calibrated", "response_model": "sim-calibrated",
             "system_fingerprint": "fp_new"}]
    alerts = httpx.get(f"{p.url}/admin/alerts", headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert [a["labels"]["alertname"] for a in alerts["active"]] == ["model_changed"]

    # live calibration signal: every answer's confidence, exp(mean token logprob), is the
    # calibrated model's confidence level for this question
    count = metric_value(reg, "gapwatch_response_confidence_score_count", route="chat", model="sim-calibrated")
    total = metric_value(reg, "gapwatch_response_confidence_score_sum", route="chat", model="sim-calibrated")
    from proxy.simulate import behaviour_answer

    _, lp = behaviour_answer("sim-calibrated", QUESTION[0]["content"], QUESTION[0]["content"], QUESTION[1]["content"])
    assert lp is not None and count == 10 and total / count == pytest.approx(math.exp(lp), abs=1e-4)

    # the Grafana scorecard's annotation query, evaluated by Prometheus, marks the change with
    # the new identity
    _wait_scrapes(prom, 1)
    dash = json.loads((ROOT / "grafana" / "dashboards" / "scorecard.json").read_text())
    (ann_q,) = [a for a in dash["annotations"]["list"] if a["name"] == "Model changes"]
    expr = ann_q["expr"].replace("$route", ".*").replace("$model", ".*")
    res = httpx.get(f"{prom}/api/v1/query", params={"query": expr}).json()
    assert res["status"] == "success", res
    marks = [(s["metric"]["route"], s["metric"]["system_fingerprint"], float(s["value"][1]))
             for s in res["data"]["result"]]
    assert marks == [("chat", "fp_new", 1.0)], res
