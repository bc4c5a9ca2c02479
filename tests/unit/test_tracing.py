"""OpenTelemetry spans: attributes from the GenAI conventions, W3C propagation to the upstream,
guardrail events, no content unless asked for, nothing set up without an exporter, and OTLP
over HTTP to a real receiver on loopback."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from proxy.config import load_dict
from proxy.tracing import Tracing, parse_traceparent, provider_name
from tests.conftest import b64, eventually, proxy_config

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"

POLICY = {"detectors": {
    "regex": {"action": "annotate", "patterns": {"codename": "(?i)blue\\s*falcon"}},
    "max_output_chars": {"action": "observe", "max_chars": 10000},
}}


def _start(start_proxy: Any, sim: Any, capture: bool = False, **extra: Any) -> tuple[Any, InMemorySpanExporter]:
    cfg = proxy_config(sim.url, policies={"default": POLICY},
                       telemetry={"tracing": {"capture_content": capture}}, **extra)
    p = start_proxy(cfg)
    exporter = InMemorySpanExporter()
    p.gateway.telemetry.use_tracing(Tracing(p.gateway.config, exporter=exporter))
    return p, exporter


def _chat(p: Any, output: str, stream: bool = False, headers: dict[str, str] | None = None,
          model: str = "sim-echo") -> httpx.Response:
    body: dict[str, Any] = {"model": model, "stream": stream, "temperature": 0.2, "max_tokens": 64,
                            "messages": [{"role": "system", "content": "You are terse. SECRET-SYSTEM-TEXT"},
                                         {"role": "user", "content": "say something USER-TEXT"}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    h = {"x-sim-output": b64(output), "authorization": "Bearer sk-test", **(headers or {})}
    r = httpx.post(f"{p.base_url}/chat/completions", json=body, headers=h, timeout=10)
    if stream:
        r.read()
    return r


def _spans(exporter: InMemorySpanExporter, n: int = 2) -> dict[SpanKind, Any]:
    spans = eventually(lambda: (s := exporter.get_finished_spans()) and len(s) >= n and s)
    assert spans, "no spans exported"
    return {s.kind: s for s in spans}


def _upstream_headers(sim: Any) -> dict[str, str]:
    data = httpx.get(f"{sim.url}/v1/sim/requests?n=1").json()["data"]
    return dict(data[-1]["headers"])


@pytest.mark.parametrize("stream", [False, True])
def test_server_and_upstream_spans_carry_gen_ai_attributes_and_join_the_callers_trace(
        start_proxy: Any, sim: Any, stream: bool) -> None:
    p, exporter = _start(start_proxy, sim)
    r = _chat(p, "The blue falcon flies at dawn.", stream=stream,
              headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01", "tracestate": "vendor=1"})
    assert r.status_code == 200
    spans = _spans(exporter)
    server, client = spans[SpanKind.SERVER], spans[SpanKind.CLIENT]

    # one trace: caller -> server span -> upstream client span -> the upstream's own spans
    assert f"{server.context.trace_id:032x}" == PARENT_TRACE
    assert f"{server.parent.span_id:016x}" == PARENT_SPAN and server.parent.is_remote
    assert client.context.trace_id == server.context.trace_id
    assert client.parent.span_id == server.context.span_id
    up = _upstream_headers(sim)
    assert up["traceparent"] == f"00-{PARENT_TRACE}-{client.context.span_id:016x}-01"
    assert up["tracestate"] == "vendor=1"

    assert server.name == "POST /v1/chat/completions"
    assert client.name == "chat sim-echo"
    a = server.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "sim"  # not a well-known host: the upstream's name
    assert a["gen_ai.request.model"] == "sim-echo"
    assert a["gen_ai.request.stream"] is stream
    assert a["gen_ai.request.temperature"] == 0.2 and a["gen_ai.request.max_tokens"] == 64
    assert a["gen_ai.response.model"] and a["gen_ai.response.id"]
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["http.response.status_code"] == 200 and a["gapwatch.policy"] == "default"
    assert "gen_ai.system" not in a and "gen_ai.usage.prompt_tokens" not in a  # deprecated names
    if stream:
        assert a["gen_ai.response.time_to_first_chunk"] >= 0
    ca = client.attributes
    assert ca["server.address"] == "127.0.0.1" and ca["server.port"] == int(sim.url.rsplit(":", 1)[1])
    assert ca["gen_ai.usage.output_tokens"] == a["gen_ai.usage.output_tokens"]
    # the child lies within the parent
    assert server.start_time <= client.start_time <= client.end_time <= server.end_time

    events = [e for e in server.events if e.name == "gen_ai.guardrail.result"]
    hit = [e.attributes for e in events if e.attributes.get("gen_ai.guardrail.result.type") == "action"]
    assert len(hit) == 1
    assert hit[0]["gen_ai.guardrail.component.name"] == "gapwatch"
    assert hit[0]["gen_ai.guardrail.policy.id"] == "default"
    assert hit[0]["gen_ai.guardrail.policy.rule.id"] == "regex"
    assert hit[0]["gen_ai.guardrail.result.value"] == "annotate"
    assert hit[0]["gen_ai.guardrail.risk.category"] == "codename"
    assert hit[0]["gen_ai.guardrail.risk.score"] == 1.0
    assert hit[0]["gen_ai.guardrail.source"] == "output"
    passed = [e.attributes for e in events if e.attributes.get("gen_ai.guardrail.result.type") == "verdict"]
    assert [(e["gen_ai.guardrail.policy.rule.id"], e["gen_ai.guardrail.result.value"]) for e in passed] == \
        [("max_output_chars", "pass")]


def test_no_content_unless_capture_content(start_proxy: Any, sim: Any) -> None:
    p, exporter = _start(start_proxy, sim)
    _chat(p, "blue falcon")
    spans = _spans(exporter)
    dump = repr([(s.attributes, [e.attributes for e in s.events]) for s in spans.values()])
    for text in ("SECRET-SYSTEM-TEXT", "USER-TEXT", "blue falcon", "gen_ai.input.messages", "result.reason"):
        assert text not in dump

    p2, exporter2 = _start(start_proxy, sim, capture=True)
    _chat(p2, "blue falcon")
    server = _spans(exporter2)[SpanKind.SERVER]
    assert "USER-TEXT" in server.attributes["gen_ai.input.messages"]
    assert "SECRET-SYSTEM-TEXT" in server.attributes["gen_ai.system_instructions"]
    ev = next(e.attributes for e in server.events if e.attributes.get("gen_ai.guardrail.result.type") == "action")
    assert ev["gen_ai.guardrail.result.reason"]
    assert "blue falcon" not in ev.get("gen_ai.guardrail.content.output.value", "")  # evidence is masked


def test_root_span_without_traceparent_and_unsampled_parent_records_nothing(start_proxy: Any, sim: Any) -> None:
    p, exporter = _start(start_proxy, sim)
    _chat(p, "hello")
    spans = _spans(exporter)
    server = spans[SpanKind.SERVER]
    assert server.parent is None
    assert _upstream_headers(sim)["traceparent"] == \
        f"00-{server.context.trace_id:032x}-{spans[SpanKind.CLIENT].context.span_id:016x}-01"
    exporter.clear()
    _chat(p, "hello", headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-00"})
    assert _upstream_headers(sim)["traceparent"].startswith(f"00-{PARENT_TRACE}-")
    assert _upstream_headers(sim)["traceparent"].endswith("-00")
    assert not eventually(lambda: exporter.get_finished_spans(), timeout=0.3)


def test_upstream_failure_marks_both_spans(start_proxy: Any, sim: Any) -> None:
    p, exporter = _start(start_proxy, sim)
    r = _chat(p, "x", model="sim-error-500")
    assert r.status_code == 500
    spans = _spans(exporter)
    assert spans[SpanKind.SERVER].status.status_code is StatusCode.ERROR
    assert spans[SpanKind.SERVER].attributes["error.type"] == "status_5xx"
    assert spans[SpanKind.CLIENT].status.status_code is StatusCode.ERROR


def test_disabled_without_exporter_costs_nothing(start_proxy: Any, sim: Any) -> None:
    cfg = load_dict(proxy_config(sim.url)).config
    t = Tracing(cfg)
    assert not t.enabled and t.provider is None
    assert t.trace_headers(object(), [(b"traceparent", f"00-{PARENT_TRACE}-{PARENT_SPAN}-01".encode())]) == {}  # type: ignore[arg-type]
    p = start_proxy(proxy_config(sim.url))
    assert not p.gateway.telemetry.tracing.enabled
    _chat(p, "hello", headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"})
    # the client's own trace context passes through untouched
    assert _upstream_headers(sim)["traceparent"] == f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"


def test_traceparent_parsing_and_provider_names() -> None:
    assert parse_traceparent(f"00-{PARENT_TRACE}-{PARENT_SPAN}-01") == (int(PARENT_TRACE, 16), int(PARENT_SPAN, 16), 1)
    for bad in ("", "00-xyz", f"00-{'0' * 32}-{PARENT_SPAN}-01", f"00-{PARENT_TRACE}-{'0' * 16}-01",
                f"ff-{PARENT_TRACE}-{PARENT_SPAN}-01", f"00-{PARENT_TRACE.upper()}-{PARENT_SPAN}-01",
                f"00-{PARENT_TRACE}-{PARENT_SPAN}-01-extra"):
        assert parse_traceparent(bad) is None, bad
    assert parse_traceparent(f"01-{PARENT_TRACE}-{PARENT_SPAN}-01-future") is not None  # newer versions
    assert provider_name("x", "https://api.openai.com/v1") == "openai"
    assert provider_name("x", "https://my.openai.azure.com/openai") == "azure.ai.openai"
    assert provider_name("local", "http://127.0.0.1:9000/v1") == "local"


# -- OTLP over HTTP to a real receiver ------------------------------------------------------------

class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        self.server.received.append((self.path, self.headers.get("content-type", ""), body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[Any]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    srv.received = []  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_otlp_http_export_to_a_real_receiver(start_proxy: Any, sim: Any, otlp_receiver: Any) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    endpoint = f"http://127.0.0.1:{otlp_receiver.server_address[1]}"
    p = start_proxy(proxy_config(sim.url, policies={"default": POLICY},
                                 telemetry={"tracing": {"otlp_endpoint": endpoint, "service_name": "gw-test"}}))
    tracing = p.gateway.telemetry.tracing
    assert tracing.enabled
    _chat(p, "blue falcon", headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"})
    assert eventually(lambda: tracing._pending == {} and tracing.force_flush() and otlp_receiver.received, timeout=10)
    path, ctype, body = otlp_receiver.received[0]
    assert path == "/v1/traces" and ctype == "application/x-protobuf"
    req = ExportTraceServiceRequest.FromString(body)
    rs = req.resource_spans[0]
    resource = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
    assert resource["service.name"] == "gw-test"
    spans = [s for ss in rs.scope_spans for s in ss.spans]
    server = next(s for s in spans if s.name == "POST /v1/chat/completions")
    client = next(s for s in spans if s.name == "chat sim-echo")
    assert server.trace_id.hex() == PARENT_TRACE and server.parent_span_id.hex() == PARENT_SPAN
    assert client.parent_span_id == server.span_id
    attrs = {kv.key: kv.value for kv in server.attributes}
    assert attrs["gen_ai.operation.name"].string_value == "chat"
    assert attrs["gen_ai.usage.output_tokens"].int_value > 0
    ev = [e for e in server.events if e.name == "gen_ai.guardrail.result"]
    values = {kv.key: kv.value.string_value for e in ev for kv in e.attributes
              if kv.key == "gen_ai.guardrail.result.value"}
    assert values
    assert any(kv.value.string_value == "annotate" for e in ev for kv in e.attributes)
