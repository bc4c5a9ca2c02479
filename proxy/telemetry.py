"""Turns each finished exchange (the one "request finished" event) into metrics and incident
records. Called once per request at the end, after the client has its response; cheap and
non-blocking (incident writing is queued)."""

from __future__ import annotations

import time
from typing import Any

from proxy.config import Config
from proxy.exchange import Exchange
from proxy.incidents import IncidentLog
from proxy.metrics import Metrics


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "none"


class Telemetry:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.incidents = IncidentLog(config.incidents, metrics)
        self._metrics_on = config.telemetry.metrics.enabled

    def start(self) -> None:
        self.incidents.start()

    async def stop(self) -> None:
        await self.incidents.stop()

    def finished(self, ex: Exchange) -> None:
        if self._metrics_on:
            self._metrics(ex)
        self._incidents(ex)

    def _metrics(self, ex: Exchange) -> None:
        m = self.metrics
        route, model, ep = ex.route, ex.model_label, ex.endpoint
        streamed = "true" if ex.stream else "false"
        end = ex.ended or time.perf_counter()
        total = end - ex.started
        m.requests.labels(route, model, ep, streamed, status_class(ex.status), ex.outcome).inc()
        m.request_duration.labels(route, model, ep, streamed).observe(total)
        if ex.upstream_started is not None:
            up_end = ex.upstream_ended or end
            m.upstream_duration.labels(route, model, ep).observe(max(0.0, up_end - ex.upstream_started))
            m.overhead.labels(route, streamed).observe(max(0.0, total - ex.upstream_wait))
        if ex.upstream_error:
            m.upstream_errors.labels(route, ex.upstream_error).inc()
        if ex.upstream_first_token_at is not None and ex.upstream_started is not None:
            ttft = ex.upstream_first_token_at - ex.upstream_started
            m.ttft.labels(route, model).observe(ttft)
        usage = ex.usage or {}
        tin = usage.get("prompt_tokens", usage.get("input_tokens"))
        tout = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(tin, int):
            m.tokens.labels(route, model, "input").inc(tin)
        if isinstance(tout, int):
            m.tokens.labels(route, model, "output").inc(tout)
            if (tout > 1 and ex.upstream_first_token_at is not None and ex.upstream_ended is not None
                    and ex.stream):
                m.tpot.labels(route, model).observe(
                    max(0.0, ex.upstream_ended - ex.upstream_first_token_at) / (tout - 1))
        policy = ex.policy
        if policy is None or not ex.outcomes:
            return
        flagged: set[str] = set()
        acted: set[str] = set()
        for o in ex.outcomes:
            for a in o.applied:
                f = a.finding
                flagged.add(f.detector)
                m.findings.labels(route, model, f.detector, f.category, f.severity.label, a.action).inc()
                if a.action != "observe":
                    acted.add(a.action)
            for det, ns in o.detector_ns.items():
                m.detector_seconds.labels(det).inc(ns / 1e9)
            for err in o.detector_errors:
                det, _, kind = err.partition(":")
                m.detector_errors.labels(det, kind).inc()
            if o.late_redactions:
                m.late_redactions.labels(route, "any").inc(o.late_redactions)
        for action in acted:
            m.actions.labels(route, action).inc()
        if ex.status < 400 or ex.outcome == "blocked":
            for e in policy.entries:
                m.responses_checked.labels(route, model, e.name,
                                           "flagged" if e.name in flagged else "pass").inc()
        for o in ex.outcomes[-1:]:
            score = o.signals.get("grounding.response_score")
            if isinstance(score, int | float):
                m.grounding_score.labels(route, model).observe(float(score))

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
