"""Writes grafana/dashboards/{overview,detectors,scorecard}.json.

The dashboards are generated so that every panel uses the same label filters, the same
rate()/histogram_quantile() shapes and the same detector-name sets, and so that the JSON stays
reviewable. Run ``python grafana/generate.py`` after changing a panel; the Prometheus
integration test (tests/integration/test_prometheus.py) fails when the JSON files and this
script disagree, and it evaluates every query below against a real Prometheus.

Query shapes (why they look the way they do):
- counters are always wrapped in ``rate(...[$__rate_interval])`` (time series) or
  ``increase(...[$__range])`` (tables over the dashboard range), then summed by the labels
  the panel shows: never a sum of raw counters, never rate() of a sum;
- percentiles are ``histogram_quantile(q, sum by (le, ...) (rate(X_bucket[...])))`` — ``le``
  is kept through the aggregation, as histogram_quantile needs it;
- ratios whose numerator may have no series yet (no 5xx so far, no flagged response) use
  ``(num or den * 0) / den``: a model with traffic and no errors reads 0, not "no data",
  and a model without traffic stays absent (0/0 is never invented).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DASHBOARDS = HERE / "dashboards"

DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
RANGE = "$__range"
F = 'route=~"$route",model=~"$model"'
FR = 'route=~"$route"'

# Detector names (the registry's names, detectors/registry.py) behind each scorecard column.
LEAKAGE = "pii|secrets|system_prompt_leak|canary|cross_tenant"
INJECTION = "injection"
SCHEMA = "schema"
GROUNDING = "grounding"
TRANSPARENCY = "transparency"


# -- query helpers -----------------------------------------------------------------------------

def rate(metric: str, sel: str, by: str = "", window: str = RI, fn: str = "rate") -> str:
    agg = f"sum by ({by}) " if by else "sum"
    braces = f"{{{sel}}}" if sel else ""
    return f"{agg}({fn}({metric}{braces}[{window}]))"


def ratio(metric: str, num_sel: str, den_sel: str, by: str = "", window: str = RI, fn: str = "rate",
          den_metric: str | None = None) -> str:
    num = rate(metric, num_sel, by, window, fn)
    den = rate(den_metric or metric, den_sel, by, window, fn)
    return f"({num} or {den} * 0) / {den}"


def quantile(q: float, metric: str, sel: str, by: str = "", window: str = RI, fn: str = "rate") -> str:
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({fn}({metric}_bucket{{{sel}}}[{window}])))"


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, table: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "refId": ref, "legendFormat": legend or "__auto",
                         "range": not instant, "instant": instant, "editorMode": "code"}
    if table:
        t["format"] = "table"
    return t


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


GREEN = ((None, "green"),)


class Layout:
    """Places panels left to right on Grafana's 24-column grid."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def place(self, panel: dict[str, Any], w: int, h: int) -> dict[str, Any]:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": w, "h": h}
        panel["id"] = self.next_id
        self.next_id += 1
        self.x += w
        self.row_h = max(self.row_h, h)
        return panel

    def row(self, title: str) -> dict[str, Any]:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel = {"type": "row", "title": title, "collapsed": False, "panels": [],
                 "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}, "id": self.next_id}
        self.next_id += 1
        self.y += 1
        return panel


def timeseries(title: str, targets: list[dict[str, Any]], unit: str, desc: str,
               th: tuple[tuple[float | None, str], ...] = GREEN, stack: bool = False,
               max_: float | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit, "thresholds": thresholds(*th), "color": {"mode": "palette-classic"},
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                   "spanNulls": False, "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                   "thresholdsStyle": {"mode": "off" if th == GREEN else "line"}},
    }
    if max_ is not None:
        defaults["max"] = max_
        defaults["min"] = 0
    return {"type": "timeseries", "title": title, "description": desc, "datasource": DS, "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title: str, expr: str, unit: str, desc: str, th: tuple[tuple[float | None, str], ...] = GREEN,
         legend: str = "", text_mode: str = "auto", no_value: str | None = "0") -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "thresholds": thresholds(*th), "color": {"mode": "thresholds"}}
    if no_value is not None:
        defaults["noValue"] = no_value
    return {"type": "stat", "title": title, "description": desc, "datasource": DS,
            "targets": [target(expr, legend)],
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "textMode": text_mode, "justifyMode": "auto"}}


def bargauge(title: str, expr: str, legend: str, unit: str, desc: str) -> dict[str, Any]:
    return {"type": "bargauge", "title": title, "description": desc, "datasource": DS,
            "targets": [target(expr, legend, instant=True)],
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": thresholds(*GREEN),
                                         "color": {"mode": "continuous-GrYlRd"}}, "overrides": []},
            "options": {"orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True,
                        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}}


def variables(with_model: bool = True) -> dict[str, Any]:
    out: list[dict[str, Any]] = [
        {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
        {"type": "query", "name": "route", "label": "Route", "datasource": DS,
         "query": {"query": "label_values(gapwatch_requests_total, route)", "refId": "route"},
         "definition": "label_values(gapwatch_requests_total, route)",
         "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
         "refresh": 2, "sort": 1, "hide": 0, "options": [], "regex": ""},
    ]
    if with_model:
        out.append({"type": "query", "name": "model", "label": "Model", "datasource": DS,
                    "query": {"query": 'label_values(gapwatch_requests_total{route=~"$route"}, model)',
                              "refId": "model"},
                    "definition": 'label_values(gapwatch_requests_total{route=~"$route"}, model)',
                    "includeAll": True, "multi": True, "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2, "sort": 1, "hide": 0, "options": [], "regex": ""})
    return {"list": out}


def dashboard(uid: str, title: str, desc: str, panels: list[dict[str, Any]],
              annotations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "description": desc, "tags": ["gapwatch"], "timezone": "browser",
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
        "templating": variables(), "annotations": {"list": annotations or []},
        "links": [{"title": "gapwatch", "type": "dashboards", "tags": ["gapwatch"], "asDropdown": True,
                   "includeVars": True, "keepTime": True}],
        "panels": panels,
    }


# -- overview ----------------------------------------------------------------------------------

def overview() -> dict[str, Any]:
    L = Layout()
    req = "gapwatch_requests_total"
    p: list[dict[str, Any]] = [L.row("Traffic and errors")]
    p.append(L.place(stat("Requests per second", rate(req, F), "reqps",
                          "All proxied requests on the selected routes and models."), 4, 4))
    p.append(L.place(stat("Server errors (5xx)", ratio(req, F + ',status_class="5xx"', F), "percentunit",
                          "Share of requests answered with a 5xx status (upstream failures, proxy errors).",
                          ((None, "green"), (0.01, "yellow"), (0.05, "red"))), 4, 4))
    p.append(L.place(stat("p95 latency", quantile(0.95, "gapwatch_request_duration_seconds", F), "s",
                          "95th percentile of end-to-end request duration.",
                          ((None, "green"), (10, "yellow"), (30, "red")), no_value=None), 4, 4))
    p.append(L.place(stat("p99 proxy overhead", quantile(0.99, "gapwatch_proxy_overhead_seconds", FR), "s",
                          "Latency gapwatch itself adds (end-to-end minus time spent waiting on the upstream).",
                          ((None, "green"), (0.01, "yellow"), (0.05, "red")), no_value=None), 4, 4))
    p.append(L.place(stat("In flight", "sum(gapwatch_in_flight_requests)", "short",
                          "Requests being proxied right now (all workers)."), 4, 4))
    p.append(L.place(stat("Version", "count by (version) (gapwatch_build_info)", "short",
                          "gapwatch versions reporting (one per version; more than one during a rollout).",
                          legend="{{version}}", text_mode="name", no_value=None), 4, 4))
    p.append(L.place(timeseries("Requests by outcome", [target(rate(req, F, "outcome"), "{{outcome}}")], "reqps",
                                "ok, blocked, redacted, upstream_error, truncated, client_disconnected, ...",
                                stack=True), 8, 8))
    p.append(L.place(timeseries("Requests by status class", [target(rate(req, F, "status_class"), "{{status_class}}")],
                                "reqps", "HTTP status class of the answers gapwatch sent.", stack=True), 8, 8))
    p.append(L.place(timeseries("Upstream errors by kind",
                                [target(rate("gapwatch_upstream_errors_total", FR, "kind"), "{{kind}}")], "reqps",
                                "connect, timeouts, resets, protocol errors and 4xx/5xx statuses from upstreams.",
                                stack=True), 8, 8))
    p.append(L.row("Latency"))
    for title, metric, sel, desc in (
        ("End-to-end latency", "gapwatch_request_duration_seconds", F, "Request duration as the client sees it."),
        ("Upstream latency", "gapwatch_upstream_duration_seconds", F, "From sending to the upstream to its last byte."),
        ("Time to first token", "gapwatch_time_to_first_token_seconds", F,
         "From sending to the upstream to its first output token (gen_ai.server.time_to_first_token)."),
    ):
        p.append(L.place(timeseries(title, [target(quantile(q, metric, sel), f"p{int(q * 100)}", ref)
                                            for q, ref in ((0.5, "A"), (0.9, "B"), (0.99, "C"))], "s", desc), 8, 8))
    p.append(L.place(timeseries("Time per output token", [
        target(quantile(0.5, "gapwatch_time_per_output_token_seconds", F), "p50", "A"),
        target(quantile(0.9, "gapwatch_time_per_output_token_seconds", F), "p90", "B")], "s",
        "Streaming responses: generation time after the first token divided by the output tokens after it."), 8, 8))
    p.append(L.place(timeseries("Proxy overhead", [
        target(quantile(0.5, "gapwatch_proxy_overhead_seconds", FR, "streamed"), "p50 streamed={{streamed}}", "A"),
        target(quantile(0.99, "gapwatch_proxy_overhead_seconds", FR, "streamed"), "p99 streamed={{streamed}}", "B")],
        "s", "Latency gapwatch adds: parsing, detectors, hold-back. Streams include the hold-back window.",
        ((None, "green"), (0.05, "red"))), 8, 8))
    p.append(L.place(timeseries("p90 latency by model", [
        target(quantile(0.9, "gapwatch_request_duration_seconds", F, "model"), "{{model}}")], "s",
        "90th percentile of end-to-end duration per model."), 8, 8))
    p.append(L.row("Tokens"))
    p.append(L.place(timeseries("Tokens per second", [
        target(rate("gapwatch_tokens_total", F, "type"), "{{type}}")], "short",
        "Input and output tokens as reported by the upstream's usage (gen_ai.client.token.usage).", stack=True),
        8, 8))
    p.append(L.place(timeseries("Tokens per request (p50, p90)", [
        target(quantile(0.5, "gapwatch_token_usage_tokens", F, "type"), "p50 {{type}}", "A"),
        target(quantile(0.9, "gapwatch_token_usage_tokens", F, "type"), "p90 {{type}}", "B")], "short",
        "Distribution of tokens per request by type."), 8, 8))
    p.append(L.place(timeseries("Requests by model", [target(rate(req, F, "model"), "{{model}}")], "reqps",
                                "Models outside telemetry.metrics.model_allowlist count as 'other'.", stack=True),
                     8, 8))
    p.append(L.row("Side effects"))
    p.append(L.place(timeseries("Sink and telemetry failures", [
        target(rate("gapwatch_incident_sink_failures_total", "", "sink"), "incident sink {{sink}}", "A"),
        target(rate("gapwatch_alert_sink_failures_total", "", "sink"), "alert sink {{sink}}", "B"),
        target(rate("gapwatch_telemetry_errors_total", "", "component"), "telemetry {{component}}", "C")], "ops",
        "Incident records or alerts that could not be delivered, and telemetry failures. Requests are never "
        "affected; anything above zero needs a look.", ((None, "green"), (0.0001, "red"))), 8, 8))
    p.append(L.place(timeseries("Upstream stream anomalies", [
        target(rate("gapwatch_stream_anomalies_total", "", "kind"), "{{kind}}")], "ops",
        "Malformed upstream streams: non-JSON data, events after [DONE], overlong lines."), 8, 8))
    p.append(L.place(timeseries("Retries", [target(rate("gapwatch_retries_total", FR, "route"), "{{route}}")],
                                "reqps", "Requests sent to the upstream again because a policy asked for a retry."),
                     8, 8))
    return dashboard("gapwatch-overview", "gapwatch / Overview",
                     "Traffic, errors, latency percentiles, time to first token and tokens through gapwatch.", p)


# -- detectors ---------------------------------------------------------------------------------

def detectors() -> dict[str, Any]:
    L = Layout()
    fnd = "gapwatch_findings_total"
    chk = "gapwatch_responses_checked_total"
    act = "gapwatch_actions_total"
    p: list[dict[str, Any]] = [L.row("Findings and actions")]
    p.append(L.place(stat("Findings per second", rate(fnd, F), "ops", "Detector findings, any action."), 6, 4))
    p.append(L.place(stat("Blocked responses",
                          ratio(act, FR + ',action="block"', FR, den_metric="gapwatch_requests_total"),
                          "percentunit", "Share of requests whose output a policy blocked.",
                          ((None, "green"), (0.01, "yellow"), (0.05, "red"))), 6, 4))
    p.append(L.place(stat("Redacted responses", ratio(act, FR + ',action="redact"', FR,
                                                      den_metric="gapwatch_requests_total"),
                          "percentunit", "Share of requests in which a policy redacted a span.",
                          ((None, "green"), (0.01, "yellow"), (0.05, "red"))), 6, 4))
    p.append(L.place(stat("Late redactions", rate("gapwatch_late_redactions_total", FR), "ops",
                          "Redactions that began before the hold-back window: part of the span already left. "
                          "Raise holdback_chars.", ((None, "green"), (0.0001, "red"))), 6, 4))
    p.append(L.place(timeseries("Findings by detector", [target(rate(fnd, F, "detector"), "{{detector}}")], "ops",
                                "Findings per second per detector.", stack=True), 8, 8))
    p.append(L.place(timeseries("Findings by severity", [target(rate(fnd, F, "severity"), "{{severity}}")], "ops",
                                "Findings per second per severity (low, medium, high, critical).", stack=True), 8, 8))
    p.append(L.place(timeseries("Blocks, redactions, retries, annotations",
                                [target(rate(act, FR, "action"), "{{action}}")], "reqps",
                                "Responses a policy changed, by the action it took.", stack=True), 8, 8))
    p.append(L.place({
        "type": "table", "title": "Findings by detector, category, severity and action",
        "description": "Findings over the dashboard's time range.", "datasource": DS,
        "targets": [target(f"sum by (detector, category, severity, action) (increase({fnd}{{{F}}}[{RANGE}]))",
                           instant=True, table=True)],
        "fieldConfig": {"defaults": {"unit": "short", "decimals": 0, "thresholds": thresholds(*GREEN)},
                        "overrides": []},
        "options": {"showHeader": True, "sortBy": [{"displayName": "Value", "desc": True}]},
        "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True},
                                                           "renameByName": {"Value": "findings"}}}],
    }, 12, 9))
    p.append(L.place(bargauge("Top routes by findings",
                              f"topk(10, sum by (route) (increase({fnd}{{model=~\"$model\"}}[{RANGE}])))",
                              "{{route}}", "short", "Routes with the most findings over the time range."), 6, 9))
    p.append(L.place(bargauge("Top routes by blocked responses",
                              f"topk(10, sum by (route) (increase({act}{{action=\"block\"}}[{RANGE}])))",
                              "{{route}}", "short", "Routes with the most blocked outputs over the time range."), 6, 9))
    p.append(L.row("Detectors"))
    p.append(L.place(timeseries("Flag rate by detector", [
        target(ratio(chk, F + ',verdict="flagged"', F, "detector"), "{{detector}}")], "percentunit",
        "Share of checked responses in which each detector found something.", max_=1), 8, 8))
    p.append(L.place(timeseries("Detector time per response", [
        target(f"sum by (detector) (rate(gapwatch_detector_seconds_total[{RI}])) / "
               f"sum by (detector) (rate({chk}[{RI}]))", "{{detector}}")], "s",
        "Mean CPU time each detector spends on one response.", ((None, "green"), (0.05, "red"))), 8, 8))
    p.append(L.place(timeseries("Detector CPU", [
        target(f"sum by (detector) (rate(gapwatch_detector_seconds_total[{RI}]))", "{{detector}}")], "percentunit",
        "Share of one CPU core each detector uses (all workers).", stack=True), 8, 8))
    p.append(L.place(timeseries("Detector errors and budget overruns", [
        target(f"sum by (detector, kind) (rate(gapwatch_detector_errors_total[{RI}]))", "{{detector}} {{kind}}")],
        "ops", "Detector exceptions and time-budget overruns (policy detector_budget_ms). The detector fails open "
        "or closed as configured.", ((None, "green"), (0.0001, "red"))), 8, 8))
    p.append(L.place(timeseries("Late redactions by route", [
        target(rate("gapwatch_late_redactions_total", FR, "route"), "{{route}}")], "ops",
        "Redactions whose span had partly been sent already."), 8, 8))
    p.append(L.place(timeseries("Findings by category", [
        target(f"topk(15, {rate(fnd, F, 'detector, category')})", "{{detector}}: {{category}}")], "ops",
        "The 15 most frequent detector categories."), 8, 8))
    return dashboard("gapwatch-detectors", "gapwatch / Detectors",
                     "What the detectors find, what the policies do about it, and what the detectors cost.", p)


# -- scorecard ---------------------------------------------------------------------------------

# The identity each (route, model) switched to, at the evaluation steps within two minutes after
# a confirmed change: Grafana draws an annotation where the query has a value (>= 1), with the
# new model name and fingerprint in its text. (The counter series starts at 0 when a route and
# model are first seen, so changes() sees the step to 1.)
MODEL_CHANGE_ANNOTATION = (
    f"max by (route, model, response_model, system_fingerprint) (gapwatch_upstream_model_info{{{F}}} == 1) "
    f"and on (route, model) (sum by (route, model) (changes(gapwatch_model_changes_total{{{F}}}[2m])) > 0)")


def model_change_annotation() -> dict[str, Any]:
    return {"name": "Model changes", "datasource": DS, "enable": True, "hide": False, "iconColor": "orange",
            "expr": MODEL_CHANGE_ANNOTATION, "step": "60s",
            "titleFormat": "Upstream model changed: {{route}} / {{model}}",
            "textFormat": "now {{response_model}}, system_fingerprint {{system_fingerprint}} (run the evaluation "
                          "suite again: gapwatch eval --baseline)",
            "tagKeys": "route,model", "useValueForTime": False}


def _score_columns() -> list[tuple[str, str, str, tuple[tuple[float | None, str], ...], str]]:
    """(column, expr over $__range by model, unit, thresholds, description)."""
    chk = "gapwatch_responses_checked_total"
    cls = "gapwatch_responses_classified_total"
    w, fn = RANGE, "increase"
    good_high = ((None, "red"), (0.95, "yellow"), (0.99, "green"))
    bad_high = ((None, "green"), (0.01, "yellow"), (0.05, "red"))
    bad_any = ((None, "green"), (0.001, "red"))
    leak = ratio(chk, F + f',detector=~"{LEAKAGE}",verdict="flagged"', F + f',detector=~"{LEAKAGE}"',
                 "model, detector", w, fn)
    return [
        ("Requests", rate("gapwatch_requests_total", F, "model", w, fn), "short", GREEN, "Requests in range."),
        ("Error rate", ratio("gapwatch_requests_total", F + ',status_class="5xx"', F, "model", w, fn),
         "percentunit", bad_high, "Share of requests answered with 5xx."),
        ("Schema-valid rate", ratio(chk, F + f',detector="{SCHEMA}",verdict="pass"', F + f',detector="{SCHEMA}"',
                                    "model", w, fn), "percentunit", good_high,
         "Structured outputs and tool calls that validated against their schema."),
        ("Unsupported-claim rate", ratio(chk, F + f',detector="{GROUNDING}",verdict="flagged"',
                                         F + f',detector="{GROUNDING}"', "model", w, fn), "percentunit", bad_high,
         "Responses with a claim (number, entity, quote, URL, citation) the supplied context does not support."),
        ("Grounding score", f"sum by (model) (increase(gapwatch_grounding_score_sum{{{F}}}[{w}])) / "
                            f"sum by (model) (increase(gapwatch_grounding_score_count{{{F}}}[{w}]))", "percentunit",
         ((None, "red"), (0.5, "yellow"), (0.8, "green")),
         "Mean response-level grounding score (1 = fully supported)."),
        ("Leakage rate", f"max by (model) ({leak})", "percentunit", bad_any,
         "Worst leakage detector (PII, secrets, system prompt, canary, cross-tenant): its share of flagged responses."),
        ("Injection-echo rate", ratio(chk, F + f',detector="{INJECTION}",verdict="flagged"',
                                      F + f',detector="{INJECTION}"', "model", w, fn), "percentunit", bad_any,
         "Responses that echo or obey instructions planted in retrieved content."),
        ("Abstention rate", ratio(cls, F + f',detector="{TRANSPARENCY}",class="abstained"',
                                  F + f',detector="{TRANSPARENCY}"', "model", w, fn), "percentunit", GREEN,
         "Responses that say the answer is not known or not in the context (transparent failure)."),
        ("Refusal rate", ratio(cls, F + f',detector="{TRANSPARENCY}",class="refused"',
                               F + f',detector="{TRANSPARENCY}"', "model", w, fn), "percentunit", bad_high,
         "Responses that refuse."),
        ("p90 latency", quantile(0.9, "gapwatch_request_duration_seconds", F, "model", w, fn), "s",
         ((None, "green"), (10, "yellow"), (30, "red")), "90th percentile end-to-end duration."),
        ("p90 TTFT", quantile(0.9, "gapwatch_time_to_first_token_seconds", F, "model", w, fn), "s",
         ((None, "green"), (2, "yellow"), (5, "red")), "90th percentile time to first token."),
        ("Mean confidence", f"sum by (model) (increase(gapwatch_response_confidence_score_sum{{{F}}}[{w}])) / "
                            f"sum by (model) (increase(gapwatch_response_confidence_score_count{{{F}}}[{w}]))",
         "percentunit", GREEN, "Mean response confidence from token logprobs (where the upstream returned them); "
                               "compare it with the evaluation's calibration before trusting it."),
    ]


def scorecard() -> dict[str, Any]:
    L = Layout()
    chk = "gapwatch_responses_checked_total"
    cls = "gapwatch_responses_classified_total"
    cols = _score_columns()
    refs = [chr(ord("A") + i) for i in range(len(cols))]
    overrides = []
    rename = {}
    for (name, _expr, unit, th, desc), ref in zip(cols, refs, strict=True):
        rename[f"Value #{ref}"] = name
        props: list[dict[str, Any]] = [{"id": "unit", "value": unit}, {"id": "description", "value": desc}]
        if th != GREEN:
            props += [{"id": "thresholds", "value": thresholds(*th)},
                      {"id": "custom.cellOptions", "value": {"type": "color-background", "mode": "basic"}}]
        overrides.append({"matcher": {"id": "byName", "options": name}, "properties": props})
    p: list[dict[str, Any]] = [L.row("Per-model reliability scorecard (over the dashboard time range)")]
    p.append(L.place({
        "type": "table", "title": "Reliability scorecard by model",
        "description": "One row per model (models outside telemetry.metrics.model_allowlist are 'other'). Rates "
                       "are shares of the responses each detector checked; an empty cell means no detector of "
                       "that kind ran for the model.",
        "datasource": DS,
        "targets": [target(expr, ref=ref, instant=True, table=True) for (_n, expr, *_r), ref in
                    zip(cols, refs, strict=True)],
        "fieldConfig": {"defaults": {"decimals": 3, "thresholds": thresholds(*GREEN),
                                     "custom": {"align": "auto", "cellOptions": {"type": "auto"}}},
                        "overrides": overrides},
        "options": {"showHeader": True, "sortBy": [{"displayName": "Requests", "desc": True}]},
        "transformations": [
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": rename,
                                           "indexByName": {"model": 0, **{n: i + 1 for i, n in
                                                                           enumerate(c[0] for c in cols)}}}},
        ],
    }, 24, 10))
    p.append(L.row("Trends by model"))
    trends = [
        ("Schema-valid rate", ratio(chk, F + f',detector="{SCHEMA}",verdict="pass"', F + f',detector="{SCHEMA}"',
                                    "model"), ((None, "red"), (0.95, "yellow"), (0.99, "green")),
         "Share of responses whose structured output validated."),
        ("Unsupported-claim rate", ratio(chk, F + f',detector="{GROUNDING}",verdict="flagged"',
                                         F + f',detector="{GROUNDING}"', "model"), GREEN,
         "Share of responses with a claim the context does not support."),
        ("Leakage rate by detector", ratio(chk, F + f',detector=~"{LEAKAGE}",verdict="flagged"',
                                           F + f',detector=~"{LEAKAGE}"', "model, detector"), GREEN,
         "Share of responses each leakage detector flagged, per model."),
        ("Injection-echo rate", ratio(chk, F + f',detector="{INJECTION}",verdict="flagged"',
                                      F + f',detector="{INJECTION}"', "model"), GREEN,
         "Share of responses echoing or obeying planted instructions."),
        ("Abstention rate", ratio(cls, F + f',detector="{TRANSPARENCY}",class="abstained"',
                                  F + f',detector="{TRANSPARENCY}"', "model"), GREEN,
         "Share of responses that abstain."),
        ("Error rate", ratio("gapwatch_requests_total", F + ',status_class="5xx"', F, "model"), GREEN,
         "Share of requests answered with 5xx."),
    ]
    for title, expr, th, desc in trends:
        p.append(L.place(timeseries(title, [target(expr, "{{model}} {{detector}}" if "detector" in title
                                                   else "{{model}}")], "percentunit", desc, th, max_=1), 8, 8))
    p.append(L.place(timeseries("Mean grounding score", [target(
        f"sum by (model) (rate(gapwatch_grounding_score_sum{{{F}}}[{RI}])) / "
        f"sum by (model) (rate(gapwatch_grounding_score_count{{{F}}}[{RI}]))", "{{model}}")], "percentunit",
        "Mean response-level grounding score (1 = fully supported by the context).", max_=1), 8, 8))
    p.append(L.place(timeseries("p90 latency", [
        target(quantile(0.9, "gapwatch_request_duration_seconds", F, "model"), "{{model}}")], "s",
        "90th percentile end-to-end duration."), 8, 8))
    p.append(L.row("Confidence and model identity (annotations mark upstream model changes)"))
    conf = "gapwatch_response_confidence_score"
    p.append(L.place(timeseries("Response confidence", [
        target(f"sum by (model) (rate({conf}_sum{{{F}}}[{RI}])) / sum by (model) (rate({conf}_count{{{F}}}[{RI}]))",
               "mean {{model}}", "A"),
        target(quantile(0.1, conf, F, "model"), "p10 {{model}}", "B")], "percentunit",
        "Response-level confidence from token logprobs (geometric mean of the token probabilities), where "
        "the upstream returned them. A drop after a model change (the orange annotations) means the new "
        "model is less sure; a rise means nothing until the evaluation says it is calibrated.", max_=1), 12, 8))
    p.append(L.place({
        "type": "table", "title": "Upstream model identity",
        "description": "The model name and system_fingerprint the upstream reports per route and requested "
                       "model (gapwatch_upstream_model_info): 1 = in use now, 0 = changed from.",
        "datasource": DS,
        "targets": [target(f"max by (route, model, response_model, system_fingerprint) "
                           f"(gapwatch_upstream_model_info{{{F}}})", instant=True, table=True)],
        "fieldConfig": {"defaults": {"decimals": 0, "thresholds": thresholds(*GREEN)}, "overrides": []},
        "options": {"showHeader": True, "sortBy": [{"displayName": "Value", "desc": True}]},
        "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True},
                                                           "renameByName": {"Value": "in use"}}}],
    }, 12, 8))
    return dashboard("gapwatch-scorecard", "gapwatch / Model reliability scorecard",
                     "Per-model reliability: schema validity, grounding, leakage, injection echo, abstention, "
                     "confidence and latency, measured on live traffic; upstream model changes as annotations.",
                     p, [model_change_annotation()])


BUILDERS = {"overview": overview, "detectors": detectors, "scorecard": scorecard}


def render(name: str) -> str:
    return json.dumps(BUILDERS[name](), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    DASHBOARDS.mkdir(exist_ok=True)
    for name in BUILDERS:
        (DASHBOARDS / f"{name}.json").write_text(render(name), encoding="utf-8")
        print(f"wrote {DASHBOARDS / f'{name}.json'}")


if __name__ == "__main__":
    main()
