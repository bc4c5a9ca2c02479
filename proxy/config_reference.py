"""The configuration reference (``docs/config-reference.md``), generated from the models.

Every key of the YAML file, its type, default and meaning comes from the pydantic models in
``proxy/config.py`` and from each registered detector's config class, so the reference cannot
drift from what ``gapwatch check-config`` accepts: a test runs ``--check`` and fails when the
file is stale.

A key's meaning is taken, in order, from the field's ``description``, from ``DESCRIPTIONS``
below (the core models carry no descriptions yet), from an attribute docstring, or from the
comment on the field's line or the comment block just above it. ``--missing`` lists the keys
that have none of these.

    python -m proxy.config_reference            # rewrite docs/config-reference.md
    python -m proxy.config_reference --check    # exit 1 if the file is stale
    python -m proxy.config_reference --missing  # keys without a description
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import re
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union

import annotated_types
import yaml
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from proxy import config as cfg

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "config-reference.md"
MAX_DEFAULT_CHARS = 100

# Meanings of the core keys, by dotted path. proxy/config.py declares no Field descriptions;
# a description added there takes precedence over this table.
DESCRIPTIONS: dict[str, str] = {
    "server": "The HTTP listener and its limits.",
    "server.host": "Address to listen on. `--host` overrides it.",
    "server.port": "Port of the API (`/v1/*`), and of `/metrics`, `/healthz`, `/readyz` and `/admin/*` "
                   "unless `metrics_port` is set. `--port` overrides it.",
    "server.admin_token": "Bearer token for `/admin/*`. Unset: admin endpoints answer 403. Use `${VAR}` "
                          "to read it from the environment.",
    "server.max_body_bytes": "Largest request body accepted; larger requests get 413 before the body is read.",
    "server.max_concurrency": "Requests proxied at once per process; beyond it a fast 503 with `Retry-After`.",
    "server.max_sse_line_bytes": "Longest SSE line accepted from an upstream; a longer one ends the stream "
                                 "with an error event.",
    "server.metrics_host": "Address of the separate metrics/admin listener (used when `metrics_port` is set).",
    "server.metrics_port": "Serve `/metrics`, health and admin routes on this separate port instead of "
                           "the API port.",
    "server.shutdown_grace_seconds": "On SIGTERM, stop accepting connections and let in-flight requests and "
                                     "streams finish for up to this long, then exit.",
    "server.workers": "Worker processes. `--workers` and the `GAPWATCH_WORKERS` environment variable override it.",
    "upstreams": "Model providers by name; routes refer to them. At least one.",
    "upstreams.<name>.base_url": "The provider's OpenAI-compatible base URL, e.g. `https://api.openai.com/v1`.",
    "upstreams.<name>.api_key_env": "Environment variable holding the provider key, which gapwatch sends "
                                    "instead of the client's. Unset: the client's `Authorization` passes "
                                    "through (without tenants).",
    "upstreams.<name>.auth_header": "Header that carries the key: `authorization` sends `Bearer KEY`; any "
                                    "other name (e.g. `api-key`) sends the bare key.",
    "upstreams.<name>.headers": "Extra headers sent with every request to this upstream.",
    "upstreams.<name>.query": "Extra query parameters sent with every request (e.g. `api-version`).",
    "upstreams.<name>.connect_timeout_seconds": "Time allowed to open a connection to the upstream.",
    "upstreams.<name>.first_byte_timeout_seconds": "Time allowed until the upstream's first response byte; "
                                                   "then 504.",
    "upstreams.<name>.idle_timeout_seconds": "Longest silence allowed between two reads of a response; a "
                                             "stall ends the stream with an error event.",
    "upstreams.<name>.max_stream_duration_seconds": "Longest a single response may take in total.",
    "upstreams.<name>.max_connections": "Connection pool size towards this upstream.",
    "upstreams.<name>.connect_retries": "Retries of a failed connection attempt (never after a byte was sent).",
    "upstreams.<name>.keepalive_expiry_seconds": "Idle upstream connections older than this are not reused (keep it "
                                                 "below the upstream's own keep-alive timeout).",
    "upstreams.<name>.tls_ca_file": "PEM CA bundle to verify an https upstream with (an internal CA); default: "
                                    "certifi's public bundle.",
    "routes": "Which upstream and policy serve a request; the first route whose `match` fits wins.",
    "routes[].match": "Conditions a request must meet; all given ones must match.",
    "routes[].match.model": "Glob on the request's `model`, e.g. `gpt-4o*`.",
    "routes[].match.path": "Glob on the request path, e.g. `/v1/chat/completions`. Unset: any path.",
    "routes[].match.tenant": "Glob on the authenticated tenant's name. Unset: any tenant (or none).",
    "routes[].upstream": "Name of the upstream (a key of `upstreams`).",
    "routes[].policy": "Name of the policy (a key of `policies`; `default` always exists).",
    "routes[].name": "Route label in metrics and logs. Unset: `route<index>`.",
    "tenants": "Proxy API keys. With tenants configured, clients must send one of these keys, and the "
               "upstream key comes from `api_key_env`. Empty: the client's `Authorization` passes through.",
    "tenants[].name": "Tenant name (in routes, incidents and cross-tenant checks; never a metric label).",
    "tenants[].key_sha256": "SHA-256 (hex) of the tenant's key; the key itself is never stored.",
    "tenants[].key_env": "Environment variable holding the tenant's key (instead of `key_sha256`).",
    "tenants[].policy": "Policy for this tenant's requests, overriding the route's.",
    "policies": "Detector policies by name. `default` is built in (measure everything, redact secrets) "
                "unless you define it.",
    "policies.<name>.shadow": "Measure as if enforcing, change nothing: actions are counted, not applied.",
    "policies.<name>.holdback_chars": "The bound on hold-back per channel: text is released as soon as every "
                                      "enforcing detector proves it safe, and never held longer than this "
                                      "many characters; `auto` is the longest match an enforcing detector "
                                      "must see whole.",
    "policies.<name>.buffer": "`full` buffers the whole response before releasing it (e.g. strict JSON "
                              "that must be valid before the app sees it).",
    "policies.<name>.hold_tool_calls": "`until_valid` holds a tool call's argument deltas until the detectors "
                                       "that judge the call (schema, injection) have passed or acted; `stream` "
                                       "releases them by proof like text; `auto` is `until_valid` when schema "
                                       "or injection can block or redact in this policy.",
    "policies.<name>.block_status": "HTTP status of a blocked non-streaming response.",
    "policies.<name>.incidents_for_observe": "Also write incident records for findings whose action is "
                                             "`observe`.",
    "policies.<name>.detector_budget_ms": "Time budget per detector call; an overrun counts as a detector "
                                          "error (`on_error` decides).",
    "policies.<name>.request_logprobs": "Ask the upstream for token logprobs on chat requests when a "
                                        "detector of the policy uses them (e.g. `uncertainty`).",
    "policies.<name>.detectors": "Detectors this policy runs, by registered name, each with its policy keys "
                                 "below and its own settings (see Detector settings).",
    "policies.<name>.detectors.<detector>.action": "What a finding does: `observe`, `annotate`, `redact`, "
                                                   "`block` or `retry`.",
    "policies.<name>.detectors.<detector>.then": "Action after `retry` attempts run out.",
    "policies.<name>.detectors.<detector>.max_attempts": "Upstream attempts in all for `retry`, the first "
                                                         "included.",
    "policies.<name>.detectors.<detector>.min_severity": "Findings below this severity get `below_min_severity` "
                                                         "instead of `action`.",
    "policies.<name>.detectors.<detector>.below_min_severity": "What findings below `min_severity` get: `observe` "
                                                               "or `annotate` (e.g. block exfiltration links, "
                                                               "annotate injection echoes).",
    "policies.<name>.detectors.<detector>.on_error": "If the detector fails or overruns its budget: `open` "
                                                     "lets the response through, `closed` blocks it.",
    "policies.<name>.detectors.<detector>.retry_guidance": "On `retry`, append the findings' messages to "
                                                           "the request so the model can correct itself.",
    "policies.<name>.detectors.<detector>.enabled": "`false` keeps the entry in the file but does not run it.",
    "state": "Where shared state lives (alert de-duplication, anomaly baselines, canary and fingerprint "
             "registries).",
    "state.backend": "`memory` (one process) or `redis` (shared by replicas and workers).",
    "state.url": "Redis URL for the `redis` backend, e.g. `redis://redis:6379/0`.",
    "state.key_prefix": "Prefix of every Redis key gapwatch writes.",
    "telemetry.metrics.enabled": "Export Prometheus metrics on `/metrics`.",
    "telemetry.metrics.model_allowlist": "Globs of the requested model names kept as the `model` label; any "
                                         "other model is labelled `other`. Empty: the label is the model the "
                                         "upstream reports in its response.",
    "telemetry.metrics.max_model_labels": "Distinct `model` label values admitted per process, first come first "
                                          "served (with or without an allow-list); later names count as `other`, "
                                          "so every metric's series stay bounded.",
    "telemetry.tracing.enabled": "Emit OpenTelemetry spans (needs `otlp_endpoint`).",
    "telemetry.tracing.otlp_endpoint": "OTLP/HTTP collector URL, e.g. `http://otel-collector:4318`.",
    "telemetry.tracing.capture_content": "Put prompt and output text on spans (off: no content leaves "
                                         "gapwatch in traces).",
    "telemetry.tracing.service_name": "The `service.name` resource attribute.",
    "alerts.sinks": "Where gapwatch's own alerts go.",
    "policies.<name>.consistency.enabled": "Re-ask sampled temperature-0 non-streaming requests in the background "
                                           "and compare the answers (costs tokens; off by default).",
    "policies.<name>.consistency.sample_rate": "Fraction of eligible requests that are asked again.",
    "policies.<name>.consistency.max_in_flight": "Background re-asks running at once; beyond it a sample is skipped.",
    "server.allow_anonymous": "Allow requests without a proxy key while an upstream key is configured (no tenants): "
                              "only where untrusted clients cannot reach the proxy.",
    "state.sync_interval_seconds": "How often a replica pulls other replicas' shared state from Redis.",
    "state.operation_timeout_seconds": "Timeout of one Redis operation; slower means Redis is down.",
    "state.replica_id": "This replica's name in shared state; default hostname:pid.",
    "alerts.sinks[].timeout_seconds": "Timeout of one delivery attempt.",
    "alerts.sinks[].max_retries": "Delivery retries (exponential backoff) before a notification counts as failed.",
    "alerts.sinks[].backoff_seconds": "First retry delay; doubles on each retry.",
    "alerts.sinks[].send_resolved": "Also notify when an alert resolves.",
    "alerts.sinks[].headers": "Extra HTTP headers sent with each notification.",
    "alerts.sinks[].signature_header": "Webhook header carrying the HMAC-SHA256 signature (`v1=<hex>`).",
    "alerts.sinks[].timestamp_header": "Webhook header carrying the signed Unix timestamp (replay protection).",
    "alerts.rules[].direction": "Which deviation fires: `above`, `below`, `both`, or `auto` (by signal).",
    "alerts.rules[].warmup_windows": "Windows an adaptive baseline learns before it may fire.",
    "alerts.rules[].alpha": "EWMA smoothing factor of the adaptive baseline.",
    "alerts.rules[].relative_floor": "Smallest deviation, relative to the baseline, that may fire.",
    "alerts.rules[].resolve_threshold": "Static rules resolve below this (hysteresis); default 0.8 x threshold.",
    "alerts.rules[].labels": "Extra labels on the alert.",
    "alerts.default_rules": "Run the built-in adaptive rules.",
    "alerts.model_change": "The `model_changed` alert: per route and requested model, the upstream now "
                           "reports another model name or `system_fingerprint` (a provider's silent model "
                           "update). The identities are exported as `gapwatch_upstream_model_info` either way.",
    "alerts.model_change.enabled": "Raise `model_changed` alerts through the sinks.",
    "alerts.model_change.confirm_responses": "Consecutive responses that must report the new identity before "
                                             "it counts as a change (one odd response is not a model update).",
    "alerts.model_change.severity": "`info`, `warning` or `critical`.",
    "alerts.model_change.hold_seconds": "How long a `model_changed` alert stays firing before it resolves "
                                        "(it is an event: nothing else resolves it).",
    "alerts.model_change.labels": "Extra labels on the alert.",
    "alerts.renotify_interval_seconds": "Re-notify a still-firing alert this often.",
    "alerts.cooldown_seconds": "After an alert resolves, the same alert does not fire again for this long.",
    "alerts.resend_interval_seconds": "How often firing alerts are re-sent to Alertmanager (it expires silent ones).",
    "alerts.evaluation_interval_seconds": "How often rules are evaluated; default shortest window / 5.",
    "alerts.history_size": "Resolved alerts kept for `GET /admin/alerts`.",
    "alerts.queue_size": "Notifications waiting for delivery; beyond it they are dropped and counted.",
    "alerts.sinks[].type": "`alertmanager`, `webhook` (signed), `slack`, `pagerduty` or `log`.",
    "alerts.sinks[].url": "Sink URL (Alertmanager base URL, webhook or Slack URL). Required except for `log`.",
    "alerts.sinks[].secret_env": "Environment variable with the webhook signing secret.",
    "alerts.sinks[].routing_key_env": "Environment variable with the PagerDuty routing key.",
    "alerts.rules": "Alert rules evaluated on rolling windows.",
    "alerts.rules[].name": "Alert name.",
    "alerts.rules[].signal": "What is measured, e.g. `findings.pii` (share of responses with a pii finding).",
    "alerts.rules[].threshold": "Static threshold on the signal's rate; fires above it.",
    "alerts.rules[].window": "Rolling window, e.g. `5m`.",
    "alerts.rules[].min_samples": "Responses needed in the window before the rule can fire.",
    "alerts.rules[].severity": "`info`, `warning` or `critical`.",
    "alerts.rules[].adaptive": "Fire on deviation from the learned baseline instead of (or as well as) the "
                               "threshold.",
    "alerts.rules[].sigmas": "Standard deviations from the baseline that count as an anomaly (`adaptive`).",
    "incidents.sinks": "Where incident records (one per finding that changed or flagged a response) go.",
    "incidents.sinks[].type": "`log` (stdout, JSON) or `jsonl` (a file).",
    "incidents.sinks[].path": "File of a `jsonl` sink.",
    "incidents.sinks[].max_bytes": "A `jsonl` file is rotated to `.1` past this size.",
    "incidents.queue_size": "Records waiting for the sinks; beyond it records are dropped and counted.",
    "incidents.keep_recent": "Recent records kept in memory for `/admin/incidents`.",
    "incidents.capture_evidence": "Include the (already masked) evidence in records.",
    "dashboard": "The built-in live dashboard (`GET /dashboard`): the panels of the Grafana dashboards from "
                 "this process's own metrics, incidents and alerts, with no other service.",
    "dashboard.enabled": "Serve `/dashboard` and `/dashboard/data` (next to `/admin/*`). Off in `serve`, on in "
                         "`gapwatch demo`. Needs `server.admin_token`: the data endpoint requires it.",
    "dashboard.refresh_seconds": "How often the metrics are sampled for the charts and the page reloads its data.",
    "dashboard.history_points": "Samples kept for the charts (history_points x refresh_seconds of history).",
    "dashboard.recent_incidents": "Incident records shown (detector, category, masked evidence, request id).",
}

# Fallback meanings of detector settings, used when the detector's config class says nothing
# (no Field description, attribute docstring or comment): "detector.key" first, then "*.key".
SETTING_DESCRIPTIONS: dict[str, str] = {
    "*.severity": "Severity of this detector's findings: `low`, `medium`, `high` or `critical`.",
    "*.lookback_chars": "Characters the detector must see whole before they are released (part of the "
                        "hold-back window); 0: none.",
    "*.roles": "Request message roles whose text the detector compares the output against.",
    "*.shingle_words": "Words per shingle, the overlapping word windows that are compared.",
    "*.min_shingles": "Matching shingles needed before a finding is raised.",
    "*.max_gap_words": "Unmatched words allowed between matching shingles of one passage.",
    "*.ignore_builtin_boilerplate": "Do not count stock phrases (\"You are a helpful assistant\") as matches.",
    "*.ignore_phrases": "Extra phrases never counted as matches.",
    "*.channels": "Output channels scanned: `text`, `tool_call`.",
    "regex.patterns": "Name -> RE2 pattern; the name is the finding's kind.",
    "pii.kinds": "PII kinds to detect: email, phone, card, iban, ssn, national_id, ip, address.",
    "pii.phone_regions": "Regions whose national phone formats are recognised (international +NN numbers always are).",
    "pii.national_ids": "National identifiers checked with python-stdnum (e.g. fr_nir, es_dni, in_aadhaar).",
    "pii.ip_ignore_private": "Do not flag private, loopback and link-local IP addresses.",
    "pii.ignore_if_in_request": "A value that also appears in the request is not a leak (the user's own data).",
    "pii.ignore_if_in_request_roles": "Roles whose messages count for ignore_if_in_request; empty: all.",
    "secrets.entropy": "Also flag high-entropy tokens that match no known credential format.",
    "secrets.entropy_threshold": "Shannon entropy (bits per character) above which a token counts as random.",
    "secrets.entropy_min_length_chars": "Shortest token the entropy heuristic considers.",
    "secrets.exclude_categories": "Credential categories never reported.",
    "secrets.ignore_if_in_request": "A credential that also appears in the request is not reported.",
    "injection.echo_min_fraction": "Share of a planted span's shingles the output must repeat to count as an echo.",
    "injection.echo_min_shingles": "Fewest repeated shingles of a planted span that can count as an echo.",
    "injection.echo_enough_shingles": "Repeated shingles that count as an echo whatever the fraction.",
    "regex.max_match_chars": "Longest match a pattern may produce; also bounds the hold-back window.",
    "banned_substrings.substrings": "Substrings that must not appear in the output.",
    "banned_substrings.case_sensitive": "Match case exactly.",
    "max_output_chars.max_chars": "Output length in characters above which a finding is raised.",
    "canary.prefix": "Prefix of planted canary tokens.",
    "canary.token_chars": "Random characters in a canary token.",
    "canary.registry_ttl_seconds": "How long a planted canary stays registered.",
    "cross_tenant.min_message_words": "Messages shorter than this many words are not fingerprinted.",
    "cross_tenant.fingerprint_ttl_seconds": "How long a tenant's fingerprints are kept.",
    "cross_tenant.index_max_entries": "Largest number of fingerprints kept; the oldest go first.",
    "system_prompt_leak.min_overlap_fraction": "Share of the prompt's shingles that must appear in the "
                                               "output (see the threshold formula above).",
    "system_prompt_leak.sufficient_shingles": "Matching shingles that always suffice, however long the "
                                              "prompt; null: no cap.",
    "transparency.categories": "Which classes of phrases are detected (refusal, abstention, hedge, ...).",
    "transparency.classify_within_chars": "A phrase within this many characters of the start classifies "
                                          "the whole response.",
    "transparency.extra_phrases": "Category -> extra phrases to detect.",
    "uncertainty.min_run_tokens": "Consecutive low-confidence tokens that make a finding.",
    "uncertainty.max_low_share": "Share of low-confidence tokens above which the response is flagged.",
    "uncertainty.min_tokens": "Responses with fewer tokens are not judged.",
}

# DetectorEntry fields that are not YAML keys
_INTERNAL_ENTRY_FIELDS = frozenset({"name", "settings"})


@dataclass(frozen=True)
class Row:
    path: str
    type: str
    default: str
    description: str


# --- types, defaults, constraints -------------------------------------------------------------

def type_name(ann: Any) -> str:
    """A reader's name for a field type: ``int``, ``string or null``, ``"memory" or "redis"``."""
    if ann is type(None):
        return "null"
    if ann is Any:
        return "any"
    if ann is SecretStr:
        return "string (secret)"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "mapping"
    simple = {str: "string", int: "int", float: "float", bool: "bool"}
    if ann in simple:
        return simple[ann]
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return " or ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        if type(None) in args:
            names.append("null")
        return " or ".join(names)
    if origin in (list, tuple, set, frozenset):
        inner = [a for a in args if a is not Ellipsis]
        return f"list of {type_name(inner[0])}" if inner else "list"
    if origin is dict:
        if not args:
            return "map"
        value = type_name(args[1])
        return f"map of {type_name(args[0])} to " + (f"({value})" if " or " in value else value)
    if origin is typing.Annotated:
        return type_name(args[0])
    return getattr(ann, "__name__", str(ann))


def _constraint_text(info: FieldInfo) -> str:
    bounds: dict[str, Any] = {}
    extra: list[str] = []
    for m in info.metadata:
        for attr in ("ge", "gt", "le", "lt"):
            if isinstance(m, getattr(annotated_types, attr.capitalize())):
                bounds[attr] = getattr(m, attr)
        if isinstance(m, annotated_types.MinLen):
            extra.append(f"at least {m.min_length} long")
        if isinstance(m, annotated_types.MaxLen):
            extra.append(f"at most {m.max_length} long")
        pattern = getattr(m, "pattern", None)
        if isinstance(pattern, str):
            extra.append(f"matches `{pattern}`")
    parts = []
    if "ge" in bounds and "le" in bounds:
        parts.append(f"{bounds['ge']}–{bounds['le']}")
    else:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if attr in bounds:
                parts.append(f"{sym} {bounds[attr]}")
    return ", ".join(parts + extra)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, tuple | list | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    factory = info.default_factory
    value = factory() if factory is not None else info.default  # type: ignore[call-arg]
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel) and not value.model_dump(exclude_defaults=True):
        return ""  # a section whose keys are listed one by one
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000, allow_unicode=True).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    text = text.removesuffix("...").strip()
    if len(text) > MAX_DEFAULT_CHARS:
        text = text[: MAX_DEFAULT_CHARS - 1] + "…"
    return f"`{text}`"


# --- descriptions from source -----------------------------------------------------------------

@cache
def _source_notes(model: type) -> dict[str, str]:
    """Field name -> attribute docstring, same-line comment or the comment block above it."""
    try:
        src = textwrap.dedent(inspect.getsource(model))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = src.splitlines()
    cls = ast.parse(src).body[0]
    if not isinstance(cls, ast.ClassDef):
        return {}
    notes: dict[str, str] = {}
    body = cls.body
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        nxt = body[i + 1] if i + 1 < len(body) else None
        if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            notes[name] = " ".join(nxt.value.value.split())
            continue
        end = node.end_lineno or node.lineno
        if end in comments and not lines[end - 1].lstrip().startswith("#"):
            notes[name] = comments[end]
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments.get(line, ""))
            line -= 1
        if above:
            notes[name] = " ".join(a for a in above if a)
    return notes


def _markdown(text: str) -> str:
    """One table-cell line: RST ``code`` -> `code`; ``|`` escaped everywhere (GFM splits cells on
    pipes inside code spans too), ``<`` and ``>`` outside code spans (else they read as HTML)."""
    text = re.sub(r"``([^`]+)``", r"`\1`", " ".join(text.split())).replace("```", "&#96;&#96;&#96;")
    parts = text.replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _describe(path: str, model: type, name: str, info: FieldInfo) -> str:
    return _markdown(info.description or DESCRIPTIONS.get(path) or _source_notes(model).get(name, ""))


def _describe_setting(detector: str, model: type, name: str, info: FieldInfo) -> str:
    text = (info.description or _source_notes(model).get(name) or SETTING_DESCRIPTIONS.get(f"{detector}.{name}")
            or SETTING_DESCRIPTIONS.get(f"*.{name}", ""))
    return _markdown(text)


# --- walking the models -----------------------------------------------------------------------

def _unwrap_optional(ann: Any) -> Any:
    if typing.get_origin(ann) in (Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def walk(model: type[BaseModel], prefix: str = "") -> Iterator[Row]:
    """Every key of ``model`` and its nested models, depth first, in declaration order."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = _unwrap_optional(info.annotation)
        origin, args = typing.get_origin(ann), typing.get_args(ann)
        constraint = _constraint_text(info)
        tname = type_name(info.annotation) + (f" ({constraint})" if constraint else "")
        row = Row(path, tname, default_text(info), _describe(path, model, name, info))
        if _is_model(ann):
            if row.description:
                yield row
            yield from walk(ann, f"{path}.")
        elif origin is dict and args and _is_model(args[1]):
            yield Row(path, "map of name to mapping", row.default, row.description)
            yield from walk(args[1], f"{path}.<name>.")
        elif origin in (list, tuple) and args and _is_model(args[0]):
            yield Row(path, "list of mappings", row.default, row.description)
            yield from walk(args[0], f"{path}[].")
        elif model is cfg.PolicyConfig and name == "detectors":
            yield Row(path, "map of detector name to mapping", row.default, row.description)
            yield from _detector_entry_rows(f"{path}.<detector>.")
        else:
            yield row


def _detector_entry_rows(prefix: str) -> Iterator[Row]:
    for name, info in cfg.DetectorEntry.model_fields.items():
        if name in _INTERNAL_ENTRY_FIELDS:
            continue
        path = prefix + name
        yield Row(path, type_name(info.annotation) + (f" ({c})" if (c := _constraint_text(info)) else ""),
                  default_text(info), _describe(path, cfg.DetectorEntry, name, info))
    declared = set(cfg.DetectorEntry.model_fields)
    for name in sorted(cfg.POLICY_KEYS - declared):
        # policy-layer keys that load_dict handles itself (not DetectorEntry fields)
        path = prefix + name
        default = "`true`" if name == "enabled" else ""
        yield Row(path, "bool" if name == "enabled" else "any", default, DESCRIPTIONS.get(path, ""))


def detector_rows() -> dict[str, tuple[str, list[Row]]]:
    """Registered detector name -> (summary, rows of its own settings)."""
    from detectors import registry

    out: dict[str, tuple[str, list[Row]]] = {}
    for det, model in sorted(registry.configs().items()):
        doc = inspect.getdoc(model) or ""
        summary = _markdown(doc.split("\n\n")[0]) if doc else ""
        rows = []
        for name, info in model.model_fields.items():
            constraint = _constraint_text(info)
            rows.append(Row(name, type_name(info.annotation) + (f" ({constraint})" if constraint else ""),
                            default_text(info), _describe_setting(det, model, name, info)))
        out[det] = (summary, rows)
    return out


# --- rendering --------------------------------------------------------------------------------

def _table(rows: list[Row], key_header: str) -> list[str]:
    out = [f"| {key_header} | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
    for r in rows:
        # GFM splits cells on every unescaped pipe, code spans included
        default = r.default.replace("|", "\\|")
        out.append(f"| `{r.path}` | {r.type} | {default} | {r.description} |")
    return out


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m proxy.config_reference` from proxy/config.py and the detector",
        "     config classes; do not edit by hand. tests/unit/test_config_reference.py fails when stale. -->",
        "",
        "Every key of the YAML file that `gapwatch serve --config` and `gapwatch check-config` read.",
        "`<name>` stands for a name you choose, `[]` for each item of a list, `<detector>` for a",
        "registered detector name. Unknown keys are errors. String values may use `${VAR}` or",
        "`${VAR:-default}` to read the environment.",
        "",
        *_table(list(walk(cfg.Config)), "Key"),
        "",
        "## Detector settings",
        "",
        "Each detector entry under `policies.<name>.detectors` takes the policy keys above plus the",
        "detector's own settings below, side by side, e.g.",
        "`regex: {action: block, patterns: {codename: \"(?i)blue\\\\s*falcon\"}}`.",
    ]
    for det, (summary, rows) in detector_rows().items():
        lines += ["", f"### `{det}`", ""]
        if summary:
            lines += [summary, ""]
        if rows:
            lines += _table(rows, "Setting")
        else:
            lines.append("No settings of its own.")
    return "\n".join(lines) + "\n"


def missing() -> list[str]:
    """Keys that have no description anywhere (for whoever adds Field descriptions)."""
    out = [r.path for r in walk(cfg.Config) if not r.description]
    for det, (_, rows) in detector_rows().items():
        out += [f"{det}.{r.path}" for r in rows if not r.description]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m proxy.config_reference", description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be generated")
    p.add_argument("--missing", action="store_true", help="list keys without a description")
    args = p.parse_args(argv)
    if args.missing:
        print("\n".join(missing()))
        return 0
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run `python -m proxy.config_reference` and commit the result",
                  file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
