"""Model labels with zero config (no ``model_allowlist``): the metrics name the model the
upstream reports, so ``gapwatch serve --upstream URL`` fills the per-model panels, and a flood
of made-up names still leaves a bounded number of series (first 50 names, then ``other``)."""

from __future__ import annotations

import re
import secrets

import httpx
import pytest

from proxy.config import zero_config
from proxy.metrics import MAX_MODEL_LABELS
from proxy.simulate import create_app as sim_app
from tests.servers import ThreadServer


@pytest.fixture
def own_sim():
    """A simulator of this test's own: it changes the model name the answers report."""
    srv = ThreadServer(sim_app()).start()
    yield srv
    srv.stop()


def zero(sim: ThreadServer, **overrides: object) -> dict[str, object]:
    """What ``gapwatch serve --upstream URL`` runs (its default policy), plus ``overrides``."""
    return {**zero_config(f"{sim.url}/v1"), "incidents": {"sinks": []}, **overrides}


def model_labels(url: str, family: str = "gapwatch_requests_total") -> set[str]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return set(re.findall(rf'^{family}\{{[^}}]*model="([^"]*)"', text, re.M))


def test_labels_are_the_upstream_reported_models(start_proxy, own_sim):
    httpx.post(f"{own_sim.url}/v1/sim/identity", json={"model_suffix": "-2025-06-01"}, timeout=5).raise_for_status()
    proxy = start_proxy(zero(own_sim))
    client = proxy.client()
    for model in ("sim-clean", "sim-echo"):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert r.model == f"{model}-2025-06-01"
    stream = client.chat.completions.create(model="sim-echo", messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert model_labels(proxy.url) == {"sim-clean-2025-06-01", "sim-echo-2025-06-01"}
    assert {"sim-clean-2025-06-01", "sim-echo-2025-06-01"} <= model_labels(proxy.url,
                                                                            "gapwatch_request_duration_seconds_count")


def test_a_thousand_random_names_leave_the_series_bounded(start_proxy, sim):
    proxy = start_proxy(zero(sim))
    client = proxy.client()
    for _ in range(1000):
        client.completions.create(model=f"m-{secrets.token_hex(6)}", prompt="q", max_tokens=4)
    labels = model_labels(proxy.url)
    assert len(labels) == MAX_MODEL_LABELS + 1 and "other" in labels
    text = httpx.get(f"{proxy.url}/metrics", timeout=5).text
    series = [line for line in text.splitlines() if line.startswith("gapwatch_requests_total{")]
    assert len(series) <= MAX_MODEL_LABELS + 1
    other = sum(float(line.rsplit(" ", 1)[1]) for line in series if 'model="other"' in line)
    assert other == 1000 - MAX_MODEL_LABELS


def test_max_model_labels_is_configurable_and_an_allowlist_wins(start_proxy, sim):
    few = start_proxy(zero(sim, telemetry={"metrics": {"max_model_labels": 2}}))
    for model in ("sim-a", "sim-b", "sim-c"):
        few.client().completions.create(model=model, prompt="q", max_tokens=4)
    assert model_labels(few.url) == {"sim-a", "sim-b", "other"}
    listed = start_proxy(zero(sim, telemetry={"metrics": {"model_allowlist": ["sim-b"]}}))
    for model in ("sim-a", "sim-b"):
        listed.client().completions.create(model=model, prompt="q", max_tokens=4)
    assert model_labels(listed.url) == {"sim-b", "other"}
