"""The built-in dashboard's data: the panels of the shipped Grafana dashboards, computed from
the proxy's own state, so a newcomer sees charts without Grafana (which these machines cannot
install), Prometheus or Docker.

A sampler reads this process's metric registry every ``refresh_seconds`` (in multiprocess
mode the registry sums every worker's values) and keeps a bounded ring of snapshots of the
counters and histograms the panels need; ``data()`` turns the ring into rates, quantiles and
a per-model scorecard over the window it covers, and adds the recent incidents (masked
evidence only) and the firing alerts. Sampling is off the request path (a timer on the event
loop) and exists only when ``dashboard.enabled`` is true.

Nothing here carries prompt or output text: metric labels are bounded names, incident rows
are projected to detector, category, action, masked evidence and ids, and alert rows to their
labels and figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.config import DashboardConfig

QUANTILE_WINDOW_POINTS = 5  # latency quantiles over the last few samples: smooth, still live
LEAK_DETECTORS = frozenset({"pii", "secrets", "system_prompt_leak", "canary", "cross_tenant"})
INF = math.inf

Buckets = dict[float, float]  # upper bound -> cumulative count


@dataclass
class Snapshot:
    """Cumulative values of the metrics the panels read, at one instant."""

    at: float
    requests: dict[tuple[str, str, str], float] = field(default_factory=dict)  # model, status class, outcome
    findings: dict[tuple[str, str, str], float] = field(default_factory=dict)  # model, detector, action
    actions: dict[str, float] = field(default_factory=dict)
    upstream_errors: dict[str, float] = field(default_factory=dict)
    latency: dict[str, Buckets] = field(default_factory=dict)  # model -> buckets
    overhead: Buckets = field(default_factory=dict)
    checked: dict[tuple[str, str, str], float] = field(default_factory=dict)  # model, detector, verdict
    classified: dict[tuple[str, str, str], float] = field(default_factory=dict)  # model, detector, class
    grounding: dict[str, list[float]] = field(default_factory=dict)  # model -> [sum, count]
    in_flight: float = 0.0


def _add(d: dict[Any, float], key: Any, value: float) -> None:
    d[key] = d.get(key, 0.0) + value


def _bucket(buckets: Buckets, le: str, value: float) -> None:
    bound = INF if le in ("+Inf", "inf") else float(le)
    buckets[bound] = buckets.get(bound, 0.0) + value


def _read_sample(snap: Snapshot, name: str, labels: Mapping[str, str], value: float) -> None:
    """One exposition sample into the snapshot (unknown names are ignored)."""
    model = labels.get("model", "other")
    if name == "gapwatch_requests_total":
        _add(snap.requests, (model, labels["status_class"], labels["outcome"]), value)
    elif name == "gapwatch_findings_total":
        _add(snap.findings, (model, labels["detector"], labels["action"]), value)
    elif name == "gapwatch_actions_total":
        _add(snap.actions, labels["action"], value)
    elif name == "gapwatch_upstream_errors_total":
        _add(snap.upstream_errors, labels["kind"], value)
    elif name == "gapwatch_request_duration_seconds_bucket":
        _bucket(snap.latency.setdefault(model, {}), labels["le"], value)
    elif name == "gapwatch_proxy_overhead_seconds_bucket":
        _bucket(snap.overhead, labels["le"], value)
    elif name == "gapwatch_responses_checked_total":
        _add(snap.checked, (model, labels["detector"], labels["verdict"]), value)
    elif name == "gapwatch_responses_classified_total":
        _add(snap.classified, (model, labels["detector"], labels["class"]), value)
    elif name == "gapwatch_grounding_score_sum":
        snap.grounding.setdefault(model, [0.0, 0.0])[0] += value
    elif name == "gapwatch_grounding_score_count":
        snap.grounding.setdefault(model, [0.0, 0.0])[1] += value
    elif name == "gapwatch_in_flight_requests":
        snap.in_flight += value


def read_snapshot(registry: Any, at: float) -> Snapshot:
    snap = Snapshot(at=at)
    for family in registry.collect():
        if not family.name.startswith("gapwatch_"):
            continue
        for s in family.samples:
            _read_sample(snap, s.name, s.labels, float(s.value))
    return snap


# -- arithmetic over snapshots -------------------------------------------------------------------

def delta(new: Mapping[Any, float], old: Mapping[Any, float]) -> dict[Any, float]:
    """Per-key increase; a key that shrank (a restarted worker's counters) counts from zero."""
    return {k: v - old.get(k, 0.0) if v >= old.get(k, 0.0) else v for k, v in new.items()}


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """``histogram_quantile`` (Prometheus's linear interpolation) over cumulative buckets."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if le == INF:
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def merged(per_model: Mapping[str, Buckets]) -> Buckets:
    out: Buckets = {}
    for b in per_model.values():
        for le, c in b.items():
            out[le] = out.get(le, 0.0) + c
    return out


def _sum(d: Mapping[Any, float], keep: Callable[[Any], bool]) -> float:
    return sum(v for k, v in d.items() if keep(k))


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _rounded(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(v, digits)


# -- panels ----------------------------------------------------------------------------------------

def traffic_series(hist: list[Snapshot]) -> dict[str, list[Any]]:
    """Rates between consecutive samples: requests, server errors, upstream errors, blocked
    responses and redactions per second."""
    out: dict[str, list[Any]] = {"t": [], "requests": [], "errors_5xx": [], "upstream_errors": [],
                                 "blocked": [], "redacted": []}
    for old, new in itertools.pairwise(hist):
        dt = new.at - old.at
        if dt <= 0:
            continue
        req = delta(new.requests, old.requests)
        out["t"].append(round(new.at, 3))
        out["requests"].append(round(_sum(req, lambda k: True) / dt, 3))
        out["errors_5xx"].append(round(_sum(req, lambda k: k[1] == "5xx") / dt, 3))
        out["upstream_errors"].append(round(sum(delta(new.upstream_errors, old.upstream_errors).values()) / dt, 3))
        acts = delta(new.actions, old.actions)
        out["blocked"].append(round(acts.get("block", 0.0) / dt, 3))
        out["redacted"].append(round(acts.get("redact", 0.0) / dt, 3))
    return out


def latency_series(hist: list[Snapshot], window: int = QUANTILE_WINDOW_POINTS) -> dict[str, list[Any]]:
    """End-to-end p50/p95 and proxy-overhead p50/p99 (seconds) over the last ``window``
    samples at each point; None where nothing was observed."""
    out: dict[str, list[Any]] = {"t": [], "p50": [], "p95": [], "overhead_p50": [], "overhead_p99": []}
    for i in range(1, len(hist)):
        new, old = hist[i], hist[max(0, i - window)]
        lat = delta(merged(new.latency), merged(old.latency))
        over = delta(new.overhead, old.overhead)
        out["t"].append(round(new.at, 3))
        out["p50"].append(_rounded(quantile(0.5, lat), 5))
        out["p95"].append(_rounded(quantile(0.95, lat), 5))
        out["overhead_p50"].append(_rounded(quantile(0.5, over), 6))
        out["overhead_p99"].append(_rounded(quantile(0.99, over), 6))
    return out


def findings_by_detector(new: Snapshot, old: Snapshot) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (_model, det, action), n in delta(new.findings, old.findings).items():
        if n > 0:
            acts = out.setdefault(det, {})
            acts[action] = acts.get(action, 0) + round(n)
    return dict(sorted(out.items()))


def _per_model(counts: Mapping[tuple[str, str, str], float]) -> dict[str, dict[tuple[str, str], float]]:
    """(model, a, b) -> n regrouped as model -> (a, b) -> n."""
    out: dict[str, dict[tuple[str, str], float]] = {}
    for (model, a, b), n in counts.items():
        out.setdefault(model, {})[(a, b)] = n
    return out


def _share(counts: Mapping[tuple[str, str], float], first: frozenset[str], second: str) -> float | None:
    """Share of ``second`` among the entries whose first key is in ``first``."""
    rows = [(k, n) for k, n in counts.items() if k[0] in first]
    return _ratio(sum(n for k, n in rows if k[1] == second), sum(n for _, n in rows))


def scorecard(new: Snapshot, old: Snapshot) -> list[dict[str, Any]]:
    """The Grafana scorecard's columns per model, over the window between the snapshots."""
    req = _per_model(delta(new.requests, old.requests))
    checked = _per_model(delta(new.checked, old.checked))
    classified = _per_model(delta(new.classified, old.classified))
    rows = []
    for model in sorted(m for m, by in req.items() if sum(by.values()) > 0):
        by_status: dict[str, float] = {}
        for (status, _outcome), n in req[model].items():
            by_status[status] = by_status.get(status, 0.0) + n
        ch, cl = checked.get(model, {}), classified.get(model, {})
        g_new, g_old = new.grounding.get(model, [0.0, 0.0]), old.grounding.get(model, [0.0, 0.0])
        lat = delta(new.latency.get(model, {}), old.latency.get(model, {}))
        total = sum(by_status.values())
        rows.append({
            "model": model, "requests": round(total),
            "error_rate": _rounded(_ratio(by_status.get("5xx", 0.0), total)),
            "schema_valid": _rounded(_share(ch, frozenset({"schema"}), "pass")),
            "unsupported_claims": _rounded(_share(ch, frozenset({"grounding"}), "flagged")),
            "leak_rate": _rounded(_share(ch, LEAK_DETECTORS, "flagged")),
            "injection_rate": _rounded(_share(ch, frozenset({"injection"}), "flagged")),
            "abstention_rate": _rounded(_share(cl, frozenset({"transparency"}), "abstained")),
            "grounding_mean": _rounded(_ratio(g_new[0] - g_old[0], g_new[1] - g_old[1])),
            "p90_latency": _rounded(quantile(0.9, lat), 5),
        })
    return rows


def incident_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Incident records reduced to what the panel shows: never the message (a schema message
    may quote part of a value) or anything but the already-masked evidence."""
    rows = []
    for r in records:
        attrs = r.get("attrs") if isinstance(r.get("attrs"), dict) else {}
        path = attrs.get("path") if isinstance(attrs.get("path"), str) else None
        rows.append({k: r.get(k) for k in ("ts", "request_id", "route", "model", "detector", "category",
                                            "severity", "action")}
                    | {"evidence": r.get("evidence") or "", "path": path})
    return rows


def model_change_rows(changes: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``proxy.model_watch`` changes (newest first) as the panel and the chart annotations show
    them: when, which route and requested model, and the reported identity before and after."""
    rows = []
    for c in changes:
        before, after = c.get("before") or {}, c.get("after") or {}
        rows.append({"at": c.get("at"), "route": c.get("route"), "model": c.get("model"),
                     "before_model": before.get("response_model"),
                     "before_fingerprint": before.get("system_fingerprint"),
                     "after_model": after.get("response_model"),
                     "after_fingerprint": after.get("system_fingerprint")})
    return rows


def alert_rows(active: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for a in active:
        labels = a.get("labels") or {}
        ann = a.get("annotations") or {}
        rows.append({"alertname": labels.get("alertname"), "severity": labels.get("severity"),
                     "route": labels.get("route"), "model": labels.get("model"), "signal": labels.get("signal"),
                     "value": ann.get("value"), "summary": ann.get("summary"), "since": a.get("startsAt")})
    return rows


# -- the sampler ---------------------------------------------------------------------------------

class Dashboard:
    """Samples the metrics on a timer and answers ``/dashboard/data``."""

    def __init__(self, cfg: DashboardConfig, registry: Any, incidents: Any, alerts: Any, model_watch: Any,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self._registry = registry
        self._incidents = incidents
        self._alerts = alerts
        self._model_watch = model_watch
        self._clock = clock
        self._history: deque[Snapshot] = deque(maxlen=cfg.history_points)
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        self._history.append(read_snapshot(self._registry, self._clock()))

    def start(self) -> None:
        self.sample()  # the baseline: everything after start-up counts
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gapwatch-dashboard")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.refresh_seconds)
            self.sample()

    def data(self) -> dict[str, Any]:
        hist = list(self._history)
        now = read_snapshot(self._registry, self._clock())  # the panels' totals are current
        hist = [*hist, now] if not hist or now.at > hist[-1].at else hist
        first = hist[0]
        req = delta(now.requests, first.requests)
        acts = delta(now.actions, first.actions)
        return {
            "generated_at": round(now.at, 3),
            "refresh_seconds": self.cfg.refresh_seconds,
            "window_seconds": round(now.at - first.at, 1),
            "totals": {
                "requests": round(sum(req.values())),
                "errors_5xx": round(_sum(req, lambda k: k[1] == "5xx")),
                "upstream_errors": round(sum(delta(now.upstream_errors, first.upstream_errors).values())),
                "blocked": round(acts.get("block", 0.0)),
                "redacted": round(acts.get("redact", 0.0)),
                "annotated": round(acts.get("annotate", 0.0)),
                "in_flight": round(now.in_flight),
            },
            "traffic": traffic_series(hist),
            "latency": latency_series(hist),
            "findings": findings_by_detector(now, first),
            "scorecard": scorecard(now, first),
            "incidents": incident_rows(self._incidents.recent(self.cfg.recent_incidents)),
            "alerts": alert_rows(self._alerts.active()),
            "model_changes": model_change_rows(self._model_watch.changes(self.cfg.recent_incidents)),
        }
