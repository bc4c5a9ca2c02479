"""The dashboard's arithmetic over metric snapshots: rates between samples, Prometheus-style
quantiles, a worker restart that shrinks counters, the scorecard's columns, and rows that
carry nothing but bounded names and masked evidence."""

from __future__ import annotations

import math

import pytest

from proxy.dashboard import (
    Snapshot,
    delta,
    incident_rows,
    model_change_rows,
    quantile,
    scorecard,
    traffic_series,
)


def test_quantile_interpolates_like_histogram_quantile():
    buckets = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, math.inf: 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.1 + 0.4 * 20 / 40)
    assert quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    assert quantile(0.99, {0.1: 1.0, math.inf: 10.0}) == 0.1  # in +Inf: the last finite bound


def test_a_counter_that_shrank_counts_from_zero():
    assert delta({"a": 5.0, "b": 2.0}, {"a": 3.0, "b": 7.0}) == {"a": 2.0, "b": 2.0}


def test_traffic_rates_between_samples():
    old = Snapshot(at=10.0, requests={("m", "2xx", "ok"): 10.0}, actions={"block": 1.0})
    new = Snapshot(at=12.0, requests={("m", "2xx", "ok"): 16.0, ("m", "5xx", "error"): 2.0},
                   actions={"block": 3.0, "redact": 4.0})
    t = traffic_series([old, new])
    assert t["requests"] == [4.0] and t["errors_5xx"] == [1.0]
    assert t["blocked"] == [1.0] and t["redacted"] == [2.0]
    assert traffic_series([new, new])["t"] == []  # no time passed: no rate


def test_scorecard_columns_per_model():
    old = Snapshot(at=0.0)
    new = Snapshot(at=10.0, requests={("a", "2xx", "ok"): 8.0, ("a", "5xx", "error"): 2.0, ("b", "2xx", "ok"): 1.0},
                   checked={("a", "schema", "pass"): 3.0, ("a", "schema", "flagged"): 1.0,
                            ("a", "pii", "flagged"): 1.0, ("a", "secrets", "pass"): 3.0},
                   classified={("a", "transparency", "abstained"): 1.0, ("a", "transparency", "answered"): 3.0},
                   grounding={"a": [3.0, 4.0]})
    a, b = scorecard(new, old)
    assert (a["model"], a["requests"], a["error_rate"]) == ("a", 10, 0.2)
    assert a["schema_valid"] == 0.75 and a["leak_rate"] == 0.25 and a["abstention_rate"] == 0.25
    assert a["grounding_mean"] == 0.75 and a["injection_rate"] is None
    assert b["model"] == "b" and b["schema_valid"] is None


def test_rows_hold_no_message_or_text():
    record = {"ts": 1.0, "request_id": "gw-1", "route": "r", "model": "m", "detector": "schema",
              "category": "schema", "severity": "high", "action": "block", "evidence": "",
              "message": '$.price: expected number, got string "twelve euros"',
              "attrs": {"path": "$.price", "value": "twelve euros"}}
    [row] = incident_rows([record])
    assert row["path"] == "$.price" and "twelve" not in str(row)
    [change] = model_change_rows([{"at": "2026-01-01T00:00:00Z", "route": "r", "model": "m",
                                   "before": {"response_model": "m-1", "system_fingerprint": "fp_a"},
                                   "after": {"response_model": "m-2", "system_fingerprint": "fp_b"}}])
    assert (change["before_fingerprint"], change["after_model"]) == ("fp_a", "m-2")
