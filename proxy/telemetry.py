"""Turns each finished exchange (the one "request finished" event) into metrics, spans and
incident records. Called once per request at the end, after the client has its response;
cheap and non-blocking (incident writing is queued, span export is batched on a thread).

Nothing here may fail a request: a tracing error is counted in
``gapwatch_telemetry_errors_total`` and logged once per kind, never raised.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from proxy.capture import CaptureSink
from proxy.config import Config
from proxy.exchange import Exchange
from proxy.incidents import IncidentLog
from proxy.metrics import ENFORCING_ACTIONS, UPSTREAM_ERROR_KINDS, BoundedLabel, Metrics
from proxy.tracing import Tracing

log = logging.getLogger("gapwatch.telemetry")


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "none"


def route_names(config: Config) -> list[str]:
    """The route label values (``proxy.routing.Router.route_name``)."""
    return [r.name or f"route{i}" for i, r in enumerate(config.routes)]


class Telemetry:
    def __init__(self, config: Config, metrics: Metrics, tracing: Tracing | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.incidents = IncidentLog(config.incidents, metrics)
        self.tracing = tracing if tracing is not None else Tracing(config)
        self._metrics_on = config.telemetry.metrics.enabled
        self._category = BoundedLabel()
        self._logged: set[str] = set()
        cap = config.telemetry.capture
        self.capture = CaptureSink(cap, metrics) if cap.enabled else None
        if self._metrics_on:
            self._initialise_series()

    def _initialise_series(self) -> None:
        """Zero-valued series for label values known from config, so rates and error panels
        read 0 (not "no data") before the first event."""
        m = self.metrics
        for route in route_names(self.config):
            for kind in UPSTREAM_ERROR_KINDS:
                m.upstream_errors.labels(route, kind)
            for action in ENFORCING_ACTIONS:
                m.actions.labels(route, action)
            m.retries.labels(route)
        for sink in {s.type for s in self.config.incidents.sinks} | {"queue_full"}:
            m.incident_sink_failures.labels(sink)
        for alert_sink in {s.type for s in self.config.alerts.sinks}:
            m.alert_sink_failures.labels(alert_sink)
        m.telemetry_errors.labels("tracing")
        m.telemetry_errors.labels("capture")

    def use_tracing(self, tracing: Tracing) -> None:
        """Swap the span builder (tests and benchmarks install an in-memory exporter)."""
        old, self.tracing = self.tracing, tracing
        if old is not tracing:
            old.shutdown()

    def start(self) -> None:
        self.incidents.start()
        if self.capture is not None:
            self.capture.start()

    async def stop(self) -> None:
        if self.capture is not None:
            await self.capture.stop()
        await self.incidents.stop()
        self.tracing.shutdown()
        self.metrics.close()

    def trace_headers(self, ex: Exchange, raw_headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
        """W3C trace context for the upstream request (empty when tracing is off)."""
        if not self.tracing.enabled:
            return {}
        try:
            return self.tracing.trace_headers(ex, raw_headers)
        except Exception as exc:  # noqa: BLE001 - tracing must never fail a request
            self._telemetry_error("tracing", exc)
            return {}

    def finished(self, ex: Exchange) -> None:
        end = ex.ended or time.perf_counter()
        if self._metrics_on:
            self._metrics(ex, end)
        if self.tracing.enabled:
            try:
                self.tracing.record(ex, end)
            except Exception as exc:  # noqa: BLE001 - tracing must never fail a request
                self._telemetry_error("tracing", exc)
        self._incidents(ex)
        if self.capture is not None:
            self.capture.record(ex)

    def failed(self, component: str, exc: Exception) -> None:
        """A failure in bookkeeping after a response (``component``): counted in
        ``gapwatch_telemetry_errors_total`` and logged once per error type, never raised."""
        self._telemetry_error(component, exc)

    def _telemetry_error(self, component: str, exc: Exception) -> None:
        self.metrics.telemetry_errors.labels(component).inc()
        key = f"{component}:{type(exc).__name__}"
        if key not in self._logged:
            self._logged.add(key)
            log.exception("%s failed (logged once per error type; counted in "
                          "gapwatch_telemetry_errors_total)", component)

    def _metrics(self, ex: Exchange, end: float) -> None:
        m = self.metrics
        c = m.child
        route, model, ep = ex.route, ex.model_label, ex.endpoint
        streamed = "true" if ex.stream else "false"
        total = end - ex.started
        c(m.requests, route, model, ep, streamed, status_class(ex.status), ex.outcome).inc()
        c(m.request_duration, route, model, ep, streamed).observe(total)
        if ex.upstream_started is not None:
            up_end = ex.upstream_ended or end
            c(m.upstream_duration, route, model, ep).observe(max(0.0, up_end - ex.upstream_started))
            c(m.overhead, route, streamed).observe(max(0.0, total - ex.upstream_wait))
        if ex.upstream_error:
            c(m.upstream_errors, route, ex.upstream_error).inc()
        if ex.attempts > 1:
            c(m.retries, route).inc(ex.attempts - 1)
        if ex.upstream_first_token_at is not None and ex.upstream_started is not None:
            ttft = ex.upstream_first_token_at - ex.upstream_started
            c(m.ttft, route, model).observe(ttft)
        usage = ex.usage or {}
        tin = usage.get("prompt_tokens", usage.get("input_tokens"))
        tout = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(tin, int):
            c(m.tokens, route, model, "input").inc(tin)
            c(m.token_usage, route, model, "input").observe(tin)
        if isinstance(tout, int):
            c(m.tokens, route, model, "output").inc(tout)
            c(m.token_usage, route, model, "output").observe(tout)
            if tout > 1 and ex.upstream_first_token_at is not None and ex.stream:
                # the detector relay does not stamp upstream_ended; the exchange ends right
                # after the upstream's last event there
                last = ex.upstream_ended or end
                c(m.tpot, route, model).observe(max(0.0, last - ex.upstream_first_token_at) / (tout - 1))
        policy = ex.policy
        if policy is None or not ex.outcomes:
            return
        bounded = self._category
        flagged: set[str] = set()
        acted: set[str] = set()
        for o in ex.outcomes:
            for a in o.applied:
                f = a.finding
                flagged.add(f.detector)
                c(m.findings, route, model, f.detector, bounded(f.detector, f.category), f.severity.label,
                                  a.action).inc()
                if a.action != "observe":
                    acted.add(a.action)
            for det, ns in o.detector_ns.items():
                c(m.detector_seconds, det).inc(ns / 1e9)
            for err in o.detector_errors:
                det, _, kind = err.partition(":")
                c(m.detector_errors, det, bounded("error:" + det, kind)).inc()
            if o.late_redactions:
                c(m.late_redactions, route, "any").inc(o.late_redactions)
        for action in acted:
            c(m.actions, route, action).inc()
        if ex.status < 400 or ex.outcome == "blocked":
            # a detector that did not apply (schema without a response format) checked nothing:
            # it must not dilute its pass rate (Outcome.not_applicable, when the pipeline fills it)
            skip = getattr(ex.outcomes[-1], "not_applicable", ())
            for e in policy.entries:
                if e.name in flagged or e.name not in skip:
                    c(m.responses_checked, route, model, e.name,
                                               "flagged" if e.name in flagged else "pass").inc()
        for o in ex.outcomes[-1:]:
            for key, value in o.signals.items():
                det, _, kind = key.partition(".")
                if kind == "response_score" and det == "grounding" and isinstance(value, int | float):
                    c(m.grounding_score, route, model).observe(float(value))
                elif kind == "response_stats" and isinstance(getattr(value, "confidence", None), float):
                    c(m.response_confidence, route, model).observe(value.confidence)
                elif kind == "classification" and isinstance(value, str):
                    c(m.responses_classified, route, model, det, bounded("class:" + det, value)).inc()

    def _incidents(self, ex: Exchange) -> None:
        policy = ex.policy
        if policy is None or not ex.outcomes:
            return
        include_observe = policy.config.incidents_for_observe
        for o in ex.outcomes:
            for a in o.applied:
                if a.action == "observe" and a.intended == "observe" and not include_observe:
                    continue
                f = a.finding
                rec: dict[str, Any] = {
                    "ts": round(ex.started_wall, 3), "request_id": ex.request_id, "route": ex.route,
                    "tenant": ex.tenant, "model": ex.model_label, "policy": policy.name,
                    "detector": f.detector, "category": f.category, "severity": f.severity.label,
                    "score": round(f.score, 4), "action": a.action, "intended_action": a.intended,
                    "shadow": policy.config.shadow, "streamed": ex.stream, "channel": f.channel.key,
                    "span": list(f.span) if f.span else None, "message": f.message,
                    "evidence": f.evidence, "attrs": dict(f.attrs),
                }
                self.incidents.submit(rec)
