"""Metric names and exact values from one finished exchange; bounded labels under a flood of
10,000 requests with random model names and paths."""

from __future__ import annotations

import asyncio
import random
import re
import string
import time
from collections import defaultdict
from typing import Any

import orjson
import pytest

from detectors.base import TEXT, RequestContext
from proxy.app import create_app
from proxy.config import load_dict
from proxy.exchange import Exchange
from proxy.metrics import MAX_MODEL_LABELS, BoundedLabel, Metrics, ModelLabel
from proxy.pipeline import Policy, ResponsePipeline
from proxy.telemetry import Telemetry
from tests.conftest import metric_value

PROM_NAME = re.compile(r"^gapwatch_[a-z0-9_]+$")


def _config(sim_url: str = "http://127.0.0.1:9", **extra: Any) -> Any:
    cfg = {
        "upstreams": {"sim": {"base_url": f"{sim_url}/v1"}},
        "routes": [{"match": {"model": "sim-*"}, "upstream": "sim", "name": "chat"}],
        "policies": {"default": {"detectors": {
            "regex": {"action": "redact", "patterns": {"ticket": "ticket-[0-9]{4}", "codename": "blue falcon"}},
            "max_output_chars": {"action": "observe", "max_chars": 100000},
        }}},
        "telemetry": {"metrics": {"model_allowlist": ["sim-*", "gpt-4o*"]}},
        "incidents": {"sinks": []},
        **extra,
    }
    return load_dict(cfg)


def finished_exchange(loaded: Any, text: str = "see ticket-1234 and ticket-9876", stream: bool = True) -> Exchange:
    """An exchange as the relay leaves it: timings, usage, and the real pipeline's outcome."""
    cfg = loaded.config
    policy = Policy.build("default", cfg.policies["default"], loaded.detectors["default"])
    ex = Exchange(request_id="gw-test", method="POST", path="/v1/chat/completions", endpoint="chat",
                  model="sim-echo", model_label="sim-echo", stream=stream, route="chat", upstream="sim",
                  policy=policy, status=200, body={"model": "sim-echo", "messages": []})
    t0 = ex.started
    ex.upstream_started = t0 + 0.001
    ex.upstream_headers_at = t0 + 0.010
    ex.upstream_first_token_at = t0 + 0.020
    ex.upstream_ended = t0 + 0.120
    ex.upstream_wait = 0.115
    ex.ended = t0 + 0.125
    ex.attempts = 2
    ex.usage = {"prompt_tokens": 12, "completion_tokens": 11}
    ex.response_model, ex.response_id, ex.finish_reasons = "sim-echo", "chatcmpl-1", ["stop"]
    pl = ResponsePipeline(policy, RequestContext(route="chat", model="sim-echo"))
    pl.feed(TEXT, text)
    pl.finish(finish_reason="stop")
    ex.outcomes.append(pl.outcome)
    ex.outcome = "redacted"
    return ex


def test_one_exchange_exact_values() -> None:
    loaded = _config()
    m = Metrics()
    tel = Telemetry(loaded.config, m)
    tel.finished(finished_exchange(loaded))
    r = m.registry
    assert metric_value(r, "gapwatch_requests_total", route="chat", model="sim-echo", endpoint="chat",
                        streamed="true", status_class="2xx", outcome="redacted") == 1
    assert metric_value(r, "gapwatch_request_duration_seconds_count", route="chat") == 1
    assert metric_value(r, "gapwatch_request_duration_seconds_sum") == pytest.approx(0.125, abs=1e-6)
    assert metric_value(r, "gapwatch_upstream_duration_seconds_sum") == pytest.approx(0.119, abs=1e-6)
    assert metric_value(r, "gapwatch_proxy_overhead_seconds_sum") == pytest.approx(0.010, abs=1e-6)
    assert metric_value(r, "gapwatch_time_to_first_token_seconds_sum") == pytest.approx(0.019, abs=1e-6)
    assert metric_value(r, "gapwatch_time_per_output_token_seconds_sum") == pytest.approx(0.010, abs=1e-6)
    assert metric_value(r, "gapwatch_tokens_total", type="input") == 12
    assert metric_value(r, "gapwatch_tokens_total", type="output") == 11
    assert metric_value(r, "gapwatch_token_usage_tokens_count", type="output") == 1
    assert metric_value(r, "gapwatch_token_usage_tokens_bucket", type="output", le="16.0") == 1
    assert metric_value(r, "gapwatch_token_usage_tokens_bucket", type="output", le="4.0") == 0
    assert metric_value(r, "gapwatch_retries_total", route="chat") == 1
    assert metric_value(r, "gapwatch_findings_total", detector="regex", category="ticket", severity="high",
                        action="redact", model="sim-echo", route="chat") == 2
    assert metric_value(r, "gapwatch_actions_total", route="chat", action="redact") == 1
    assert metric_value(r, "gapwatch_actions_total", route="chat", action="block") == 0  # pre-initialised
    assert metric_value(r, "gapwatch_responses_checked_total", detector="regex", verdict="flagged") == 1
    assert metric_value(r, "gapwatch_responses_checked_total", detector="max_output_chars", verdict="pass") == 1
    assert metric_value(r, "gapwatch_detector_seconds_total", detector="regex") > 0
    assert metric_value(r, "gapwatch_build_info") == 1
    assert metric_value(r, "gapwatch_in_flight_requests") == 0


def test_signals_become_grounding_histogram_and_classes() -> None:
    loaded = _config()
    m = Metrics()
    tel = Telemetry(loaded.config, m)
    ex = finished_exchange(loaded, text="nothing to see")
    ex.outcomes[-1].signals.update({"grounding.response_score": 0.42, "transparency.classification": "abstained",
                                    "uncertainty.response_stats": {"mean": 1.0}})
    tel.finished(ex)
    r = m.registry
    assert metric_value(r, "gapwatch_grounding_score_count", model="sim-echo") == 1
    assert metric_value(r, "gapwatch_grounding_score_bucket", le="0.5") == 1
    assert metric_value(r, "gapwatch_grounding_score_bucket", le="0.4") == 0
    classes = {"class": "abstained"}
    assert metric_value(r, "gapwatch_responses_classified_total", detector="transparency", **classes) == 1


def test_detectors_that_did_not_apply_are_not_counted_as_checked() -> None:
    loaded = _config()
    m = Metrics()
    ex = finished_exchange(loaded)
    ex.outcomes[-1].not_applicable = {"max_output_chars", "regex"}  # type: ignore[attr-defined]
    Telemetry(loaded.config, m).finished(ex)
    assert metric_value(m.registry, "gapwatch_responses_checked_total", detector="max_output_chars") == 0
    # a detector that found something did apply, whatever the set says
    assert metric_value(m.registry, "gapwatch_responses_checked_total", detector="regex", verdict="flagged") == 1


def test_zero_series_exist_before_any_traffic() -> None:
    loaded = _config(incidents={"sinks": [{"type": "jsonl", "path": "/tmp/x.jsonl"}]})
    m = Metrics()
    Telemetry(loaded.config, m)
    names = {(s.name, tuple(sorted(s.labels.items()))) for fam in m.registry.collect() for s in fam.samples}
    assert ("gapwatch_upstream_errors_total", (("kind", "connect"), ("route", "chat"))) in names
    assert ("gapwatch_incident_sink_failures_total", (("sink", "jsonl"),)) in names
    assert ("gapwatch_stream_anomalies_total", (("kind", "non_json"),)) in names


def test_metrics_off_records_nothing_per_request() -> None:
    loaded = _config(telemetry={"metrics": {"enabled": False}})
    m = Metrics()
    Telemetry(loaded.config, m).finished(finished_exchange(loaded))
    assert metric_value(m.registry, "gapwatch_requests_total") == 0


def test_every_metric_is_named_by_the_rules() -> None:
    m = Metrics()
    for fam in m.registry.collect():
        if fam.name.startswith("process_"):
            continue
        assert PROM_NAME.match(fam.name), fam.name
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples)
        if fam.type == "histogram":
            assert fam.name.endswith(("_seconds", "_tokens", "_score")), fam.name
        assert fam.documentation


def test_model_label_bounds() -> None:
    ml = ModelLabel(["gpt-4o*", "sim-*"], max_models=3)
    assert ml("gpt-4o") == "gpt-4o"
    assert ml("llama-3") == "other"
    assert ml("gpt-4o" + "x" * 80) == "other"  # too long
    assert ml("sim-a") == "sim-a" and ml("sim-b") == "sim-b"
    assert ml("sim-c") == "other"  # the cap: a glob cannot admit unbounded names
    assert ml("gpt-4o") == "gpt-4o" and ml("sim-a") == "sim-a"  # admitted names stay admitted
    b = BoundedLabel(limit=2)
    assert [b("d", v) for v in ("a", "b", "c", "a")] == ["a", "b", "other", "a"]
    assert b("e", "c") == "c"  # per key


# -- the flood ---------------------------------------------------------------------------------

async def _asgi(app: Any, method: str, path: str, body: bytes = b"") -> int:
    """One request straight into the ASGI app (no client library: 10,000 of them stay fast)."""
    status = 0
    done = asyncio.Event()
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        nonlocal status
        if msg["type"] == "http.response.start":
            status = msg["status"]
        elif not msg.get("more_body"):
            done.set()

    scope = {"type": "http", "method": method, "path": path, "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-x"),
                         (b"content-length", str(len(body)).encode())]}
    await app(scope, receive, send)
    return status


def _series(registry: Any) -> dict[str, set[tuple[tuple[str, str], ...]]]:
    out: dict[str, set[tuple[tuple[str, str], ...]]] = defaultdict(set)
    for fam in registry.collect():
        if fam.name.startswith("gapwatch_"):
            for s in fam.samples:
                out[s.name].add(tuple(sorted(s.labels.items())))
    return out


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.printable + "äö€𝔘\u200b", k=n))


async def _flood(app: Any, rng: random.Random, n: int) -> dict[int, int]:
    statuses: dict[int, int] = defaultdict(int)
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        async with sem:
            k = i % 10
            if k < 2:  # random paths: no route (model "") -> 404 from the proxy
                path = "/v1/" + "/".join(_random_text(rng, rng.randint(1, 20)).replace("/", "") for _ in range(2))
                st = await _asgi(app, rng.choice(["GET", "POST", "DELETE"]), path)
            else:
                if k == 2:  # routed to the simulator, allow-listed glob with a made-up suffix
                    model = "sim-" + _random_text(rng, rng.randint(1, 40))
                elif k == 3:  # allow-listed glob, no route
                    model = "gpt-4o-" + _random_text(rng, rng.randint(1, 40))
                else:
                    model = _random_text(rng, rng.randint(1, 120))
                body = {"model": model, "max_tokens": 1, "stream": k == 2 and i % 20 == 2,
                        "messages": [{"role": "user", "content": "ticket-1234"}]}
                st = await _asgi(app, "POST", "/v1/chat/completions", orjson.dumps(body))
            statuses[st] += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return statuses


def test_flood_of_random_models_and_paths_keeps_series_bounded(sim: Any) -> None:
    loaded = _config(sim.url)
    app = create_app(loaded, Metrics())
    registry = app.gw.metrics.registry
    rng = random.Random(8)

    async def run() -> tuple[dict[int, int], dict[str, set[Any]], dict[int, int], dict[str, set[Any]]]:
        await app.gw.startup()
        try:
            first = await _flood(app, rng, 10_000)
            after_first = _series(registry)
            second = await _flood(app, rng, 2_000)
            return first, after_first, second, _series(registry)
        finally:
            await app.gw.shutdown()

    t0 = time.perf_counter()
    first, after_first, _second, after_second = asyncio.run(run())
    elapsed = time.perf_counter() - t0
    assert sum(first.values()) == 10_000 and first[404] >= 7_000 and first[200] >= 900, dict(first)
    assert metric_value(registry, "gapwatch_requests_total") == 12_000

    labels: dict[str, set[str]] = defaultdict(set)
    for series in after_second.values():
        for s in series:
            for k, v in s:
                labels[k].add(v)
    assert labels["route"] <= {"chat", "none"}
    assert len(labels["model"]) <= MAX_MODEL_LABELS + 1 and "other" in labels["model"]
    assert all(len(v) <= 64 for v in labels["model"])
    assert labels["endpoint"] <= {"chat", "completions", "responses", "embeddings", "models", "other"}
    assert labels["status_class"] <= {"1xx", "2xx", "3xx", "4xx", "5xx", "none"}
    assert len(labels["outcome"]) <= 12
    assert "path" not in labels
    # saturated: 2,000 more random names and paths add no series at all
    assert {k: len(v) for k, v in after_second.items()} == {k: len(v) for k, v in after_first.items()}
    total = sum(len(v) for v in after_second.values())
    assert total < 6_000, total
    print(f"flood: 12,000 requests in {elapsed:.1f}s, {total} series, {len(labels['model'])} model labels")


def test_zero_config_labels_are_the_reported_models_first_n_then_other() -> None:
    ml = ModelLabel([], max_models=2)
    assert ml.from_response
    assert ml("gpt-4o") == "other"  # before any response: a request's name is free text
    assert ml.for_response("gpt-4o", "gpt-4o-2024-08-06") == "gpt-4o-2024-08-06"
    assert ml.for_response("made-up", None) == "other"  # no response, never reported
    assert ml.for_response("x", "claude-3") == "claude-3"
    assert ml.for_response("y", "llama-3") == "other"  # the cap
    assert ml("claude-3") == "claude-3" and ml.for_response("z", "gpt-4o-2024-08-06") == "gpt-4o-2024-08-06"
    assert ml.for_response("w", "bad name{}") == "other"  # not a model name
    explicit = ModelLabel(["sim-*"])
    assert explicit.for_response("sim-a", "gpt-4o") == "sim-a"  # an allow-list wins: the request's name
    assert explicit.for_response("gpt-4o", "gpt-4o") == "other"
