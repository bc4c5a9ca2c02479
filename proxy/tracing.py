"""OpenTelemetry traces: one server span per proxied request, a client span for the upstream
call, and each detector's verdict as a ``gen_ai.guardrail.result`` span event.

Why spans are built after the fact: the data path must not pay for tracing while it streams.
``trace_headers`` (called once, where the upstream request headers are built) only draws the
ids and returns the W3C ``traceparent`` naming the upstream client span as the parent, so the
provider's own traces join ours. ``record`` runs once the exchange has finished (from
``Telemetry.finished``) and creates both spans with explicit start/end times converted from
the exchange's ``perf_counter`` stamps to wall-clock nanoseconds, with exactly those pre-drawn
ids (``_PresetIds``). With no exporter configured nothing is imported or created: tracing
costs one attribute check per request.

Span layout (names from the semantic conventions)::

    POST /v1/chat/completions   SERVER   http.* + gen_ai.* + gapwatch.*
    │  events: gen_ai.guardrail.result (one per finding, one "pass" per clean detector)
    └── chat gpt-4o             CLIENT   gen_ai.* + server.address/port (the upstream call,
                                         all attempts when the policy retried)

Conventions used (OpenTelemetry semantic-conventions-genai, status Development, read from
``docs/gen-ai/gen-ai-spans.md``, ``gen-ai-guardrails.md`` and ``gen-ai-metrics.md`` of
github.com/open-telemetry/semantic-conventions-genai):

- inference client span: name ``{gen_ai.operation.name} {gen_ai.request.model}``, kind CLIENT;
  ``gen_ai.operation.name`` (``chat``, ``text_completion``, ``embeddings``),
  ``gen_ai.provider.name`` (well-known values such as ``openai``, ``azure.ai.openai``; else
  the configured upstream name), ``gen_ai.request.model``, ``gen_ai.request.stream``,
  ``gen_ai.request.max_tokens``/``temperature``/``top_p``/``seed``/``choice.count``/
  ``stop_sequences``, ``gen_ai.output.type``, ``gen_ai.response.model``, ``gen_ai.response.id``,
  ``gen_ai.response.finish_reasons``, ``gen_ai.response.time_to_first_chunk``,
  ``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens`` (the current names; the
  deprecated ``gen_ai.system`` and ``gen_ai.usage.prompt_tokens`` are not emitted).
- guardrails: the event ``gen_ai.guardrail.result`` is the form the conventions give for
  results of "dedicated in-process guardrail APIs" (``apply_guardrail`` client spans are for
  remote guardrail services). Attributes: ``gen_ai.guardrail.component.name`` = ``gapwatch``
  (the conventions define it as the evaluating component, not the policy or rule),
  ``gen_ai.guardrail.policy.id`` = the gapwatch policy, ``gen_ai.guardrail.policy.rule.id`` =
  the detector ("identifier of a rule, filter, or detector that produced the result"),
  ``gen_ai.guardrail.source`` = ``output``, ``gen_ai.guardrail.result.type`` = ``action`` with
  ``gen_ai.guardrail.result.value`` = the action taken (observe/annotate/redact/block/retry),
  or ``verdict``/``pass`` for a detector that found nothing, ``gen_ai.guardrail.risk.category``
  = the finding's category and ``gen_ai.guardrail.risk.score`` = its score (0..1).
- content is opt-in (``telemetry.tracing.capture_content: true``): ``gen_ai.input.messages``
  and ``gen_ai.system_instructions`` on the server span (JSON, the conventions' parts format),
  and on guardrail events ``gen_ai.guardrail.result.reason`` (the finding message) and
  ``gen_ai.guardrail.content.output.value`` (the masked evidence). Without it no request or
  output text, message or evidence is recorded.

A request rejected before its upstream headers were built (bad JSON, auth) still gets a
server span, as a new root: the incoming ``traceparent`` is only read in ``trace_headers``.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from opentelemetry.sdk.trace.id_generator import IdGenerator

from proxy.config import Config
from proxy.exchange import Exchange, request_messages

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("gapwatch.tracing")

OPERATIONS = {"chat": "chat", "responses": "chat", "completions": "text_completion", "embeddings": "embeddings"}
HTTP_ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses",
               "embeddings": "/v1/embeddings", "models": "/v1/models"}

# gen_ai.provider.name well-known values by upstream host (suffix match)
PROVIDER_HOSTS: tuple[tuple[str, str], ...] = (
    ("api.openai.com", "openai"),
    (".openai.azure.com", "azure.ai.openai"),
    (".services.ai.azure.com", "azure.ai.inference"),
    ("api.anthropic.com", "anthropic"),
    ("api.groq.com", "groq"),
    ("api.mistral.ai", "mistral_ai"),
    ("api.deepseek.com", "deepseek"),
    ("api.x.ai", "x_ai"),
    ("api.perplexity.ai", "perplexity"),
    ("api.cohere.com", "cohere"),
    ("api.cohere.ai", "cohere"),
    ("api.moonshot.ai", "moonshot_ai"),
    ("generativelanguage.googleapis.com", "gcp.gemini"),
    ("aiplatform.googleapis.com", "gcp.vertex_ai"),
)

COMPONENT = "gapwatch"
MAX_GUARDRAIL_EVENTS = 64
MAX_STR = 256  # user-controlled strings (model names, paths) in attributes
MAX_CONTENT_CHARS = 65536
_EMPTY: dict[str, str] = {}


def provider_name(upstream_name: str, base_url: str) -> str:
    host = (urlsplit(base_url).hostname or "").lower()
    for suffix, name in PROVIDER_HOSTS:
        if host == suffix.lstrip(".") or host.endswith(suffix):
            return name
    return upstream_name


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """``00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`` -> (trace id, span id, flags);
    None for anything malformed or all-zero ids (W3C Trace Context, level 1)."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 or len(parts[2]) != 16 \
            or len(parts[3]) != 2 or (parts[0] == "00" and len(parts) != 4):
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id or parts[1] != parts[1].lower() or parts[2] != parts[2].lower():
        return None
    return trace_id, span_id, flags


@dataclass(slots=True)
class _Ids:
    trace_id: int
    parent_span_id: int  # 0: the server span is a root
    server_span_id: int
    client_span_id: int
    sampled: bool
    tracestate: str | None


def _new_ids(parent: tuple[int, int, int] | None, tracestate: str | None) -> _Ids:
    # random.getrandbits, as the SDK's RandomIdGenerator: ids need to be unique, not secret, and
    # the module generator is re-seeded in forked children
    rand = random.getrandbits
    if parent is None:
        return _Ids(rand(128) or 1, 0, rand(64) or 1, rand(64) or 1, True, None)
    return _Ids(parent[0], parent[1], rand(64) or 1, rand(64) or 1, bool(parent[2] & 1), tracestate)


def _clip(s: str, n: int = MAX_STR) -> str:
    return s if len(s) <= n else s[:n]


class Tracing:
    """Span building for one gateway. ``enabled`` is false (and nothing is set up) unless an
    OTLP endpoint is configured or an exporter is passed in (tests, benchmarks)."""

    def __init__(self, config: Config, exporter: SpanExporter | None = None, *, batch: bool | None = None) -> None:
        tc = config.telemetry.tracing
        self.capture_content = tc.capture_content
        self.enabled = bool(tc.enabled and (exporter is not None or tc.otlp_endpoint))
        self.provider: TracerProvider | None = None
        self._pending: dict[int, _Ids] = {}
        self._providers = {name: provider_name(name, u.base_url) for name, u in config.upstreams.items()}
        self._servers: dict[str, tuple[str, int]] = {}
        for name, u in config.upstreams.items():
            parts = urlsplit(u.base_url)
            self._servers[name] = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        if not self.enabled:
            return
        self._setup(config, exporter, batch)

    def _setup(self, config: Config, exporter: SpanExporter | None, batch: bool | None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        from proxy.metrics import _version

        tc = config.telemetry.tracing
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            assert tc.otlp_endpoint is not None
            endpoint = tc.otlp_endpoint.rstrip("/")
            if not endpoint.endswith("/v1/traces"):
                endpoint += "/v1/traces"
            exporter = OTLPSpanExporter(endpoint=endpoint, timeout=5)
            batch = True if batch is None else batch
        resource = Resource.create({"service.name": tc.service_name, "service.version": _version(),
                                    "service.instance.id": f"{os.uname().nodename}-{os.getpid()}"})
        self._ids = _PresetIds()
        self.provider = TracerProvider(resource=resource, id_generator=self._ids)
        processor = BatchSpanProcessor(exporter, max_queue_size=4096, schedule_delay_millis=1000) if batch \
            else SimpleSpanProcessor(exporter)
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("gapwatch", _version())

    # -- the data path: ids and headers for the upstream request ---------------------------------

    def trace_headers(self, ex: Exchange, raw_headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
        """``traceparent`` (and the client's ``tracestate``) for the upstream request: the
        upstream's parent is our client span, whose parent is our server span, whose parent is
        the client's ``traceparent`` when it sent a valid one."""
        if not self.enabled:
            return _EMPTY
        parent = None
        tracestate = None
        for k, v in raw_headers:
            if k == b"traceparent":
                parent = parse_traceparent(v.decode("latin-1"))
            elif k == b"tracestate":
                tracestate = v.decode("latin-1")[:512]
        ids = _new_ids(parent, tracestate if parent else None)
        self._pending[id(ex)] = ids
        out = {"traceparent": f"00-{ids.trace_id:032x}-{ids.client_span_id:016x}-{'01' if ids.sampled else '00'}"}
        if ids.tracestate:
            out["tracestate"] = ids.tracestate
        return out

    # -- after the exchange: spans -------------------------------------------------------------

    def record(self, ex: Exchange, end: float) -> None:
        """Build and end the spans of a finished exchange (``end`` = its perf_counter end)."""
        ids = self._pending.pop(id(ex), None)
        if ids is None:
            ids = _new_ids(None, None)
        if not ids.sampled:
            return
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
        from opentelemetry.trace.span import TraceState

        base_ns = int(ex.started_wall * 1e9)

        def ns(t: float) -> int:
            return base_ns + int((t - ex.started) * 1e9)

        if ids.parent_span_id:
            state = TraceState.from_header([ids.tracestate]) if ids.tracestate else TraceState()
            parent = trace.set_span_in_context(NonRecordingSpan(SpanContext(
                ids.trace_id, ids.parent_span_id, is_remote=True, trace_flags=TraceFlags(1), trace_state=state)))
        else:
            from opentelemetry.context import Context

            parent = Context()
        op = OPERATIONS.get(ex.endpoint)
        route = HTTP_ROUTES.get(ex.endpoint)
        gen_ai = self._gen_ai_attributes(ex, op)
        attrs: dict[str, Any] = {
            "http.request.method": ex.method,
            "gapwatch.request_id": ex.request_id,
            "gapwatch.route": ex.route,
            "gapwatch.outcome": ex.outcome,
            **gen_ai,
        }
        if route:
            attrs["http.route"] = route
        else:
            attrs["url.path"] = _clip(ex.path)
        if ex.attempts > 1:
            attrs["gapwatch.attempts"] = ex.attempts
        if ex.status:
            attrs["http.response.status_code"] = ex.status
        if ex.policy is not None:
            attrs["gapwatch.policy"] = ex.policy.name
            attrs["gapwatch.shadow"] = ex.policy.config.shadow
        if ex.tenant:
            attrs["gapwatch.tenant"] = ex.tenant
        if ex.client_disconnected:
            attrs["gapwatch.client_disconnected"] = True
        error = ex.status >= 500 or ex.outcome == "error"
        if error:
            attrs["error.type"] = ex.upstream_error or str(ex.status or "_OTHER")
        if self.capture_content and ex.body is not None:
            attrs.update(_content_attributes(ex))
        self._ids.trace_id, self._ids.span_id = ids.trace_id, ids.server_span_id
        server = self.tracer.start_span(f"{ex.method} {route}" if route else ex.method, context=parent,
                                        kind=SpanKind.SERVER, attributes=attrs, start_time=ns(ex.started))
        try:
            self._guardrail_events(server, ex, ns(ex.upstream_ended or end))
            if ex.upstream_started is not None:
                self._ids.span_id = ids.client_span_id
                # the call's identity only: the full gen_ai.* set is on the server span (attribute
                # validation in the SDK is most of the cost of a span)
                client_attrs: dict[str, Any] = {"http.request.method": ex.method, "gapwatch.upstream": ex.upstream}
                for k in ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
                          "gen_ai.response.model", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"):
                    if k in gen_ai:
                        client_attrs[k] = gen_ai[k]
                if ex.attempts > 1:
                    client_attrs["gapwatch.attempts"] = ex.attempts
                host, port = self._servers.get(ex.upstream, ("", 0))
                if host:
                    client_attrs["server.address"] = host
                    client_attrs["server.port"] = port
                if ex.status and not ex.upstream_error:
                    client_attrs["http.response.status_code"] = ex.status
                if ex.upstream_error:
                    client_attrs["error.type"] = ex.upstream_error
                name = f"{op} {_clip(ex.model)}" if op and ex.model else (op or ex.method)
                client = self.tracer.start_span(name, context=trace.set_span_in_context(server), kind=SpanKind.CLIENT,
                                                attributes=client_attrs, start_time=ns(ex.upstream_started))
                if ex.upstream_error:
                    client.set_status(Status(StatusCode.ERROR, ex.upstream_error))
                client.end(end_time=ns(ex.upstream_ended or end))
        finally:
            if error:
                server.set_status(Status(StatusCode.ERROR))
            server.end(end_time=ns(end))

    def _gen_ai_attributes(self, ex: Exchange, op: str | None) -> dict[str, Any]:
        if op is None:
            return {}
        a: dict[str, Any] = {"gen_ai.operation.name": op,
                             "gen_ai.provider.name": self._providers.get(ex.upstream, ex.upstream or "openai")}
        if ex.model:
            a["gen_ai.request.model"] = _clip(ex.model)
        body = ex.body
        if body is not None:
            a["gen_ai.request.stream"] = ex.stream
            for key, attr in (("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p"),
                              ("frequency_penalty", "gen_ai.request.frequency_penalty"),
                              ("presence_penalty", "gen_ai.request.presence_penalty")):
                v = body.get(key)
                if isinstance(v, int | float) and not isinstance(v, bool):
                    a[attr] = float(v)
            for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
                v = body.get(key)
                if isinstance(v, int) and not isinstance(v, bool):
                    a["gen_ai.request.max_tokens"] = v
                    break
            seed = body.get("seed")
            if isinstance(seed, int) and not isinstance(seed, bool):
                a["gen_ai.request.seed"] = seed
            n = body.get("n")
            if isinstance(n, int) and not isinstance(n, bool) and n != 1:
                a["gen_ai.request.choice.count"] = n
            stop = body.get("stop")
            if isinstance(stop, str):
                stop = [stop]
            if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and self.capture_content:
                a["gen_ai.request.stop_sequences"] = stop[:8]
            rf = body.get("response_format") if ex.endpoint == "chat" else None
            if ex.endpoint == "responses" and isinstance(body.get("text"), dict):
                rf = body["text"].get("format")
            if isinstance(rf, dict) and isinstance(rf.get("type"), str):
                a["gen_ai.output.type"] = "json" if rf["type"] in ("json_object", "json_schema") else "text"
        if ex.response_model:
            a["gen_ai.response.model"] = _clip(ex.response_model)
        if ex.response_id:
            a["gen_ai.response.id"] = _clip(ex.response_id)
        if ex.finish_reasons:
            a["gen_ai.response.finish_reasons"] = [_clip(r, 32) for r in ex.finish_reasons[:16]]
        usage = ex.usage or {}
        tin = usage.get("prompt_tokens", usage.get("input_tokens"))
        tout = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(tin, int):
            a["gen_ai.usage.input_tokens"] = tin
        if isinstance(tout, int):
            a["gen_ai.usage.output_tokens"] = tout
        if ex.stream and ex.upstream_first_token_at is not None and ex.upstream_started is not None:
            a["gen_ai.response.time_to_first_chunk"] = max(0.0, ex.upstream_first_token_at - ex.upstream_started)
        return a

    def _guardrail_events(self, span: Any, ex: Exchange, ts: int) -> None:
        policy = ex.policy
        if policy is None or not ex.outcomes:
            return
        base = {"gen_ai.guardrail.component.name": COMPONENT, "gen_ai.guardrail.policy.id": policy.name,
                "gen_ai.guardrail.source": "output"}
        budget = MAX_GUARDRAIL_EVENTS
        flagged: set[str] = set()
        dropped = 0
        for attempt, o in enumerate(ex.outcomes):
            for a in o.applied:
                f = a.finding
                flagged.add(f.detector)
                if budget <= 0:
                    dropped += 1
                    continue
                budget -= 1
                ev: dict[str, Any] = {
                    **base, "gen_ai.guardrail.policy.rule.id": f.detector,
                    "gen_ai.guardrail.result.type": "action", "gen_ai.guardrail.result.value": a.action,
                    "gen_ai.guardrail.risk.category": f.category, "gen_ai.guardrail.risk.score": float(f.score),
                    "gapwatch.finding.severity": f.severity.label,
                }
                if f.channel.key != "0:text":
                    ev["gapwatch.finding.channel"] = f.channel.key
                if attempt:
                    ev["gapwatch.attempt"] = attempt
                if a.intended != a.action:
                    ev["gapwatch.intended_action"] = a.intended
                if self.capture_content:
                    ev["gen_ai.guardrail.result.reason"] = f.message
                    if f.evidence:
                        ev["gen_ai.guardrail.content.output.value"] = f.evidence
                span.add_event("gen_ai.guardrail.result", ev, timestamp=ts)
            for err in o.detector_errors:
                det, _, kind = err.partition(":")
                flagged.add(det)
                if budget > 0:
                    budget -= 1
                    span.add_event("gen_ai.guardrail.result", {
                        **base, "gen_ai.guardrail.policy.rule.id": det, "error.type": kind or "_OTHER",
                        "gapwatch.attempt": attempt}, timestamp=ts)
        skip = getattr(ex.outcomes[-1], "not_applicable", ())
        for e in policy.entries:
            if e.name not in flagged and e.name not in skip and budget > 0:
                budget -= 1
                span.add_event("gen_ai.guardrail.result", {
                    **base, "gen_ai.guardrail.policy.rule.id": e.name,
                    "gen_ai.guardrail.result.type": "verdict", "gen_ai.guardrail.result.value": "pass"},
                    timestamp=ts)
        if dropped:
            span.set_attribute("gapwatch.guardrail.events_dropped", dropped)

    # -- lifecycle -----------------------------------------------------------------------------

    def force_flush(self, timeout_millis: int = 5000) -> bool:
        return self.provider.force_flush(timeout_millis) if self.provider is not None else True

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()
            self.provider = None
            self.enabled = False


def _content_attributes(ex: Exchange) -> dict[str, str]:
    """Opt-in request content in the conventions' parts format, as JSON strings (span
    attributes cannot hold structures), each capped at MAX_CONTENT_CHARS."""
    assert ex.body is not None
    msgs = request_messages(ex.endpoint, ex.body)
    system = [{"type": "text", "content": m.text} for m in msgs if m.role in ("system", "developer")]
    inputs = [{"role": m.role, "parts": [{"type": "text", "content": m.text}]}
              for m in msgs if m.role not in ("system", "developer")]
    out: dict[str, str] = {}
    if inputs:
        out["gen_ai.input.messages"] = orjson.dumps(inputs).decode()[:MAX_CONTENT_CHARS]
    if system:
        out["gen_ai.system_instructions"] = orjson.dumps(system).decode()[:MAX_CONTENT_CHARS]
    return out


class _PresetIds(IdGenerator):
    """IdGenerator that hands out the ids drawn in ``trace_headers`` (set just before each
    ``start_span``; spans are only started on the event-loop thread), random ones otherwise."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_span_id(self) -> int:
        v, self.span_id = self.span_id, 0
        return v or random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        v, self.trace_id = self.trace_id, 0
        return v or random.getrandbits(128) or 1

    def is_trace_id_random(self) -> bool:
        return True  # drawn with random.getrandbits (W3C Trace Context level 2 "random" flag)
