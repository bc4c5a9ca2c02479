"""Every Prometheus metric gapwatch exports, declared in one place with bounded labels.

Label values come from bounded sets: routes and policies from config, models through the
configured allow-list (anything else is ``other``), detectors from the registry, categories
and classes from detector code (capped per detector by ``BoundedLabel`` in case a detector
ever emits free text), severities and actions from enums. No user content, key or tenant
secret ever becomes a label value.

Names follow the Prometheus conventions (``gapwatch_`` prefix, base units, ``_total`` on
counters, ``_seconds`` on durations) and map to the OpenTelemetry GenAI metrics where one
exists (semantic-conventions-genai ``docs/gen-ai/gen-ai-metrics.md``):

- ``gen_ai.server.request.duration`` / ``gen_ai.client.operation.duration`` ->
  ``gapwatch_request_duration_seconds`` (and ``gapwatch_upstream_duration_seconds`` for the
  proxy's own client call)
- ``gen_ai.server.time_to_first_token`` -> ``gapwatch_time_to_first_token_seconds``
- ``gen_ai.server.time_per_output_token`` -> ``gapwatch_time_per_output_token_seconds``
- ``gen_ai.client.token.usage`` (histogram by ``gen_ai.token.type``) ->
  ``gapwatch_token_usage_tokens`` (same buckets, powers of 4) plus the counter
  ``gapwatch_tokens_total`` for cheap rates

Several worker processes: prometheus-client's multiprocess mode. When
``PROMETHEUS_MULTIPROC_DIR`` is set before ``prometheus_client`` is imported (``gapwatch serve
--workers N`` does this), every value lives in a per-process mmap file; the metrics are then
declared without a registry and ``Metrics.registry`` is a fresh registry holding only a
``MultiProcessCollector``, which sums the files of all workers at scrape time. In single
process mode each ``Metrics()`` owns a fresh ``CollectorRegistry``, so tests can build one per
proxy and assert exact values.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    values,
)

# No ``*_created`` series: they double the series count and no dashboard or rule uses them.
disable_created_metrics()

# LLM latencies: tens of milliseconds to minutes
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# response confidence (geometric mean of token probabilities): the top decile is finer, where
# most answers of a healthy model sit and where an overconfident shift shows first
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)
# gen_ai.client.token.usage recommends powers of 4 up to 4^13; 4^11 (4M tokens) is plenty here
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)

# Label values known in advance. Series for them are created at start-up with value 0, so
# dashboards show a flat zero instead of "no data" until the first event (Prometheus practice:
# initialise metrics whose label values are known).
UPSTREAM_ERROR_KINDS = ("connect", "connect_timeout", "first_byte_timeout", "idle_timeout", "reset",
                        "protocol", "max_duration", "line_too_long", "status_4xx", "status_5xx")
STREAM_ANOMALY_KINDS = ("after_done", "non_json", "non_object", "missing_choices", "line_too_long")
ENFORCING_ACTIONS = ("annotate", "redact", "block", "retry")

MAX_MODEL_LABELS = 50  # default distinct model label values (telemetry.metrics.max_model_labels)
MEMO_ENTRIES = 8192
CHILD_CACHE = 65536

MULTIPROC_ENV = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")


def multiprocess_dir() -> str | None:
    for name in MULTIPROC_ENV:
        v = os.environ.get(name)
        if v:
            return v
    return None


def multiprocess_active() -> bool:
    """True when this process writes metric values to mmap files. prometheus-client decides
    once, when it is first imported, so the environment variable alone is not enough."""
    return bool(getattr(values.ValueClass, "_multiprocess", False)) and multiprocess_dir() is not None


@contextlib.contextmanager
def multiprocess_directory() -> Iterator[str]:
    """For ``gapwatch serve --workers N``, in the supervisor before any worker starts: the
    directory where every worker writes its metric values, exported as
    ``PROMETHEUS_MULTIPROC_DIR`` so the spawned workers inherit it.

    A directory the operator chose is emptied of ``*.db`` files first (prometheus-client
    requires a clean directory per run: stale files from a previous run would be added to the
    new totals); otherwise a private temporary directory is created and removed on exit."""
    chosen = multiprocess_dir()
    if chosen:
        path = Path(chosen)
        path.mkdir(parents=True, exist_ok=True)
        for f in path.glob("*.db"):
            f.unlink(missing_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
        yield str(path)
        return
    tmp = tempfile.mkdtemp(prefix="gapwatch-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tmp
    try:
        yield tmp
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(tmp, ignore_errors=True)


def serve_multiprocess_metrics(host: str, port: int, path: str) -> None:
    """Serve ``/metrics`` (every worker's values summed) from the supervisor process on the
    configured ``server.metrics_port``; a daemon thread, it ends with the process."""
    from prometheus_client import multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    start_http_server(port, addr=host, registry=registry)


def _version() -> str:
    try:
        return metadata.version("gapwatch")
    except metadata.PackageNotFoundError:
        return "unknown"


class ModelLabel:
    """Maps a model name to a bounded label value.

    With an allow-list, globs match the model the client asked for (names capped in length);
    everything else is ``other``. Without one (the zero-config start), the label is the model
    the *upstream* reports in its response: providers answer with their own canonical names
    (``gpt-4o`` comes back as ``gpt-4o-2024-08-06``), which a client cannot make up, while the
    request's ``model`` field is free text.

    Either way at most ``max_models`` distinct names are ever admitted, first come first
    served; later ones count as ``other``. That is what bounds the series: every metric with a
    ``model`` label has at most ``max_models + 1`` values of it per process, whatever the
    traffic (a glob such as ``gpt-4o*`` still admits names a client makes up, and an upstream
    may echo any name back). The memo of decisions is bounded too: a flood of random names
    costs one check each, never memory."""

    def __init__(self, allowlist: Iterable[str], max_models: int = MAX_MODEL_LABELS) -> None:
        self._allow = tuple(allowlist)
        self._max = max_models
        self._admitted: set[str] = set()
        self._memo: dict[str, str] = {}

    @property
    def from_response(self) -> bool:
        """True when labels come from the upstream's reported model (no allow-list)."""
        return not self._allow

    def _eligible(self, model: str) -> bool:
        if len(model) > 64:
            return False
        if self._allow:
            return any(fnmatch.fnmatchcase(model, p) for p in self._allow)
        return _MODEL_NAME.fullmatch(model) is not None

    def _admit(self, model: str) -> str:
        label = self._memo.get(model)
        if label is not None:
            return label
        label = "other"
        if self._eligible(model) and (model in self._admitted or len(self._admitted) < self._max):
            self._admitted.add(model)
            label = model
        if len(self._memo) < MEMO_ENTRIES:
            self._memo[model] = label
        return label

    def __call__(self, model: str) -> str:
        """The label for the model a client asked for, before any response: allow-listed
        names, or (without an allow-list) a name the upstream has already reported."""
        if self._allow:
            return self._admit(model)
        return model if model in self._admitted else "other"

    def for_response(self, requested: str, reported: str | None) -> str:
        """The label once the response is known. Without an allow-list the upstream's
        reported model is admitted (first ``max_models`` names); an exchange that got no
        response (an upstream error, a passthrough body) keeps the requested name only if the
        upstream has reported it before."""
        if self._allow or not reported:
            return self(requested)
        return self._admit(reported)


# what an upstream may report as a model name for it to become a label value
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*")


class BoundedLabel:
    """At most ``limit`` distinct values per key (e.g. categories per detector); later new
    values become ``other``. Values come from detector code and are bounded by design; this is
    the backstop that keeps one faulty detector from blowing up the series count."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int = 64) -> None:
        self._limit = limit
        self._seen: dict[str, set[str]] = {}

    def __call__(self, key: str, value: str) -> str:
        seen = self._seen.get(key)
        if seen is None:
            seen = self._seen[key] = set()
        if value in seen:
            return value
        if len(seen) >= self._limit or len(value) > 64:
            return "other"
        seen.add(value)
        return value


class Metrics:
    """The metric objects. ``registry`` is what ``/metrics`` exposes (``payload()``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess = multiprocess_active()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        if self.multiprocess:
            from prometheus_client import multiprocess

            self.registry = registry if registry is not None else CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry)
            r: CollectorRegistry | None = None  # values live in the mmap files
        else:
            r = self.registry = registry if registry is not None else CollectorRegistry()
            ProcessCollector(registry=r)
        self.build_info = Gauge(
            "gapwatch_build_info", "Always 1; the labels say which gapwatch and Python are running.",
            ["version", "python_version"], registry=r, multiprocess_mode="max")
        self.requests = Counter(
            "gapwatch_requests", "Proxied requests by route, model, endpoint, status class and outcome.",
            ["route", "model", "endpoint", "streamed", "status_class", "outcome"], registry=r)
        self.request_duration = Histogram(
            "gapwatch_request_duration_seconds",
            "End-to-end duration of proxied requests (gen_ai.server.request.duration).",
            ["route", "model", "endpoint", "streamed"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_duration = Histogram(
            "gapwatch_upstream_duration_seconds",
            "Duration of the upstream call, from send to last byte (gen_ai.client.operation.duration).",
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
        self.token_usage = Histogram(
            "gapwatch_token_usage_tokens", "Tokens per request by type (gen_ai.client.token.usage).",
            ["route", "model", "type"], buckets=TOKEN_BUCKETS, registry=r)
        self.upstream_errors = Counter(
            "gapwatch_upstream_errors", "Upstream failures by kind.", ["route", "kind"], registry=r)
        self.retries = Counter(
            "gapwatch_retries", "Requests sent to the upstream again because a policy asked for a retry.",
            ["route"], registry=r)
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
        self.responses_classified = Counter(
            "gapwatch_responses_classified", "Response-level classes detectors report (transparency: "
            "answered, abstained, refused), for per-model rates.", ["route", "model", "detector", "class"],
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
        self.response_confidence = Histogram(
            "gapwatch_response_confidence_score", "Response-level confidence from token logprobs (geometric mean "
            "of the token probabilities), where the upstream returned logprobs (the uncertainty detector).",
            ["route", "model"], buckets=CONFIDENCE_BUCKETS, registry=r)
        self.model_info = Gauge(
            "gapwatch_upstream_model_info", "The model name and system_fingerprint the upstream reports per "
            "route and requested model: 1 for the identity in use now, 0 for the ones it changed from.",
            ["route", "model", "response_model", "system_fingerprint"], registry=r,
            multiprocess_mode="mostrecent")
        self.model_changes = Counter(
            "gapwatch_model_changes", "Confirmed changes of the upstream-reported model name or "
            "system_fingerprint (alerts.model_change.confirm_responses consecutive responses).",
            ["route", "model"], registry=r)
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
        self.consistency = Counter(
            "gapwatch_consistency_checks", "Background re-asks of deterministic requests, by result "
            "(agree, disagree, error, skipped).", ["route", "model", "result"], registry=r)
        self.telemetry_errors = Counter(
            "gapwatch_telemetry_errors", "Failures inside telemetry itself (span building, export set-up); "
            "the request is never affected.", ["component"], registry=r)
        self.build_info.labels(_version(), platform.python_version()).set(1)
        for kind in STREAM_ANOMALY_KINDS:
            self.stream_events.labels(kind)

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, memoised: prometheus-client re-validates and locks on
        every ``labels()`` call, which was most of the per-request metrics cost. Label values
        are bounded, so the memo is too (and stops growing at CHILD_CACHE entries)."""
        key = (id(metric), values)
        c = self._children.get(key)
        if c is None:
            c = metric.labels(*values)
            if len(self._children) < CHILD_CACHE:
                self._children[key] = c
        return c

    def payload(self) -> bytes:
        """The text exposition for ``/metrics``: this process's registry, or the sum over
        every worker's files in multiprocess mode."""
        return generate_latest(self.registry)

    def close(self) -> None:
        """On worker shutdown in multiprocess mode: drop this pid's live-gauge files so the
        in-flight gauge does not keep counting a dead worker."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())
