"""Every Prometheus metric gapwatch exports, declared in one place with bounded labels.

Label values come from bounded sets: routes and policies from config, models through the
configured allow-list (anything else is ``other``), detectors from the registry, categories
from detector code, severities and actions from enums. No user content, key or tenant
secret ever becomes a label value.

Names follow Prometheus conventions (base units, ``_total`` counters, ``_seconds``) and map
to the OpenTelemetry GenAI metrics where one exists: ``gen_ai.client.operation.duration`` ->
``gapwatch_request_duration_seconds``, ``gen_ai.server.time_to_first_token`` ->
``gapwatch_time_to_first_token_seconds``, ``gen_ai.server.time_per_output_token`` ->
``gapwatch_time_per_output_token_seconds``, ``gen_ai.client.token.usage`` ->
``gapwatch_tokens_total`` (counter by ``type``).
"""

from __future__ import annotations

import fnmatch
from functools import lru_cache

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# LLM latencies: tens of milliseconds to minutes
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class ModelLabel:
    """Maps a model name to a bounded label value: allow-listed globs keep the name (capped
    in length), everything else is ``other``."""

    def __init__(self, allowlist: list[str]) -> None:
        self._allow = tuple(allowlist)
        self._cache = lru_cache(maxsize=4096)(self._compute)

    def _compute(self, model: str) -> str:
        if len(model) <= 64 and any(fnmatch.fnmatchcase(model, p) for p in self._allow):
            return model
        return "other"

    def __call__(self, model: str) -> str:
        return self._cache(model)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "gapwatch_requests", "Proxied requests by route, model, endpoint, status class and outcome.",
            ["route", "model", "endpoint", "streamed", "status_class", "outcome"], registry=r)
        self.request_duration = Histogram(
            "gapwatch_request_duration_seconds",
            "End-to-end duration of proxied requests (gen_ai.client.operation.duration).",
            ["route", "model", "endpoint", "streamed"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_duration = Histogram(
            "gapwatch_upstream_duration_seconds", "Duration of the upstream call, from send to last byte.",
            ["route", "model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "gapwatch_time_to_first_token_seconds",
            "Time from request to the first output token received from upstream "
            "(gen_ai.server.time_to_first_token).", ["route", "model"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(
            "gapwatch_time_per_output_token_seconds",
            "Time per output token after the first (gen_ai.server.time_per_output_token).",
            ["route", "model"], buckets=TPOT_BUCKETS, registry=r)
        self.overhead = Histogram(
            "gapwatch_proxy_overhead_seconds",
            "Latency the proxy itself added: end-to-end minus time waiting on the upstream.",
            ["route", "streamed"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.tokens = Counter(
            "gapwatch_tokens", "Tokens by type (input/output) as reported by the upstream's usage.",
            ["route", "model", "type"], registry=r)
        self.upstream_errors = Counter(
            "gapwatch_upstream_errors", "Upstream failures by kind.", ["route", "kind"], registry=r)
        self.findings = Counter(
            "gapwatch_findings", "Detector findings by detector, category, severity and the action taken.",
            ["route", "model", "detector", "category", "severity", "action"], registry=r)
        self.actions = Counter(
            "gapwatch_actions", "Responses changed by policy: block, redact, retry, annotate.",
            ["route", "action"], registry=r)
        self.responses_checked = Counter(
            "gapwatch_responses_checked", "Responses that ran through a policy's detectors, by detector "
            "and verdict (pass/flagged), for per-model rates.", ["route", "model", "detector", "verdict"],
            registry=r)
        self.detector_seconds = Counter(
            "gapwatch_detector_seconds", "Time spent inside each detector (single-threaded event loop, so "
            "this is CPU time).", ["detector"], registry=r)
        self.detector_errors = Counter(
            "gapwatch_detector_errors", "Detector failures and time-budget overruns.", ["detector", "kind"],
            registry=r)
        self.grounding_score = Histogram(
            "gapwatch_grounding_score", "Response-level grounding score (1 = fully supported by context).",
            ["route", "model"], buckets=SCORE_BUCKETS, registry=r)
        self.in_flight = Gauge(
            "gapwatch_in_flight_requests", "Requests being proxied right now.", registry=r,
            multiprocess_mode="livesum")
        self.late_redactions = Counter(
            "gapwatch_late_redactions", "Redactions that began before the hold-back window (part of the "
            "span had already been sent; raise holdback_chars).", ["route", "detector"], registry=r)
        self.incident_sink_failures = Counter(
            "gapwatch_incident_sink_failures", "Incident records a sink failed to write or dropped.",
            ["sink"], registry=r)
        self.alert_sink_failures = Counter(
            "gapwatch_alert_sink_failures", "Alert notifications a sink failed to deliver.", ["sink"],
            registry=r)
        self.stream_events = Counter(
            "gapwatch_stream_anomalies", "Malformed or unexpected upstream stream content (non-JSON data, "
            "events after [DONE], overlong lines).", ["kind"], registry=r)
