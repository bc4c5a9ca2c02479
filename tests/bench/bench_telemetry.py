"""What metrics and tracing add per request, side by side in one run.

    .venv/bin/python -m tests.bench.bench_telemetry        (also part of ``make bench``)

In-process: the per-request telemetry work is ``Telemetry.trace_headers`` (when the upstream
request is built) plus ``Telemetry.finished`` (after the response), both on the event loop.
They are timed for one realistic exchange — a streamed chat response with usage, timings, three
findings (two redactions, one annotation) from a policy of four detectors, response signals —
with metrics on or off and tracing on (SDK ``BatchSpanProcessor`` into an
``InMemorySpanExporter``) or off. The baseline (both off) still writes the incident records.

Columns: wall µs per request on the calling thread (median of batches), what that adds over
the baseline, and process CPU µs per request including the span processor's export thread
(after a final flush). A last row repeats "metrics on" in prometheus-client's multiprocess
mode (``gapwatch serve --workers N``), in a subprocess because the mode is fixed at import.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from detectors.base import TEXT, Message, RequestContext
from detectors.registry import names as registered
from proxy.config import LoadedConfig, load_dict
from proxy.exchange import Exchange
from proxy.metrics import Metrics
from proxy.pipeline import Policy, ResponsePipeline
from proxy.telemetry import Telemetry
from proxy.tracing import Tracing

BATCHES = 7
PER_BATCH = 1500
OUTPUT = ("Sure. Ticket TCK-48213 covers the refund; the blue falcon review is internal. I don't know "
          "who approved ticket TCK-50012, the context does not say.")
RAW_HEADERS = [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-x"),
               (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]


def _loaded(metrics_on: bool) -> LoadedConfig:
    detectors: dict[str, Any] = {
        "regex": {"action": "redact", "patterns": {"ticket": "TCK-[0-9]{5}"}},
        "banned_substrings": {"action": "annotate", "substrings": ["blue falcon"]},
        "max_output_chars": {"action": "observe", "max_chars": 10000},
    }
    if "transparency" in registered():
        detectors["transparency"] = {"action": "observe"}
    return load_dict({
        "upstreams": {"openai": {"base_url": "https://api.openai.com/v1"}},
        "routes": [{"match": {"model": "gpt-4o*"}, "upstream": "openai", "name": "chat"}],
        "policies": {"default": {"detectors": detectors}},
        "telemetry": {"metrics": {"enabled": metrics_on, "model_allowlist": ["gpt-4o*"]}},
        "incidents": {"sinks": []},
    })


def exchange(loaded: LoadedConfig) -> Exchange:
    policy = Policy.build("default", loaded.config.policies["default"], loaded.detectors["default"])
    body = {"model": "gpt-4o-mini", "stream": True, "temperature": 0.3, "max_tokens": 256,
            "messages": [{"role": "system", "content": "Answer from the context."},
                         {"role": "user", "content": "Who approved the refund?"}]}
    ex = Exchange(request_id="gw-bench", method="POST", path="/v1/chat/completions", endpoint="chat",
                  model="gpt-4o-mini", model_label="gpt-4o-mini", stream=True, route="chat", upstream="openai",
                  policy=policy, status=200, body=body, outcome="redacted")
    t0 = ex.started
    ex.upstream_started, ex.upstream_headers_at = t0 + 0.0004, t0 + 0.180
    ex.upstream_first_token_at, ex.upstream_ended, ex.ended = t0 + 0.210, t0 + 1.450, t0 + 1.452
    ex.upstream_wait, ex.attempts = 1.44, 1
    ex.usage = {"prompt_tokens": 412, "completion_tokens": 38, "total_tokens": 450}
    ex.response_model, ex.response_id, ex.finish_reasons = "gpt-4o-mini-2024-07-18", "chatcmpl-abc123", ["stop"]
    ctx = RequestContext(route="chat", model="gpt-4o-mini", messages=(
        Message(role="system", text="Answer from the context.", index=0),
        Message(role="user", text="Who approved the refund?", index=1)))
    pl = ResponsePipeline(policy, ctx)
    for i in range(0, len(OUTPUT), 8):
        pl.feed(TEXT, OUTPUT[i:i + 8])
    pl.finish(finish_reason="stop")
    ex.outcomes.append(pl.outcome)
    return ex


def _variant(metrics_on: bool, tracing_on: bool) -> tuple[Telemetry, Exchange, Any]:
    loaded = _loaded(metrics_on)
    tel = Telemetry(loaded.config, Metrics())
    exporter = None
    if tracing_on:
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        exporter = InMemorySpanExporter()
        tel.use_tracing(Tracing(loaded.config, exporter=exporter, batch=True))
    return tel, exchange(loaded), exporter


def measure(metrics_on: bool, tracing_on: bool) -> dict[str, float]:
    """Per request: ``loop`` = CPU µs of the calling thread (the event loop's cost; median of
    batches, immune to other processes), ``wall`` = elapsed µs (median of batches; inflated
    when the machine is busy), ``cpu`` = process CPU µs including the span export thread."""
    tel, ex, exporter = _variant(metrics_on, tracing_on)
    for _ in range(300):  # warm caches, label children, the processor thread
        tel.trace_headers(ex, RAW_HEADERS)
        tel.finished(ex)
    tel.tracing.force_flush()
    if exporter is not None:
        exporter.clear()
    walls, loops = [], []
    cpu0 = time.process_time()
    for _ in range(BATCHES):
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(PER_BATCH):
            tel.trace_headers(ex, RAW_HEADERS)
            tel.finished(ex)
        loops.append((time.thread_time() - c0) / PER_BATCH * 1e6)
        walls.append((time.perf_counter() - t0) / PER_BATCH * 1e6)
    tel.tracing.force_flush()
    cpu = (time.process_time() - cpu0) / (BATCHES * PER_BATCH) * 1e6
    finished = exporter.get_finished_spans() if exporter is not None else ()
    events = sum(len(sp.events) for sp in finished) / (BATCHES * PER_BATCH)
    tel.tracing.shutdown()
    return {"loop": statistics.median(loops), "wall": statistics.median(walls), "cpu": cpu,
            "spans": len(finished), "events": events}


def _multiprocess_row() -> dict[str, float] | None:
    """'metrics on' in multiprocess mode, measured in a child whose prometheus-client sees
    PROMETHEUS_MULTIPROC_DIR at import."""
    with tempfile.TemporaryDirectory(prefix="gapwatch-bench-mp-") as d:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": d}
        proc = subprocess.run([sys.executable, "-m", "tests.bench.bench_telemetry", "--child-multiprocess"],
                              env=env, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        return None
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> dict[str, float]:
    print("telemetry added per request: Telemetry.trace_headers + Telemetry.finished, in-process")
    print(f"  exchange: streamed chat, usage, 3 findings from a policy of {len(_loaded(True).detectors['default'])} "
          f"detectors; {BATCHES} batches x {PER_BATCH} requests; command: {sys.executable} -m "
          f"tests.bench.bench_telemetry; load average {os.getloadavg()[0]:.2f}")
    rows: list[tuple[str, dict[str, float] | None]] = [
        ("metrics off, tracing off", measure(False, False)),
        ("metrics on,  tracing off", measure(True, False)),
        ("metrics off, tracing on", measure(False, True)),
        ("metrics on,  tracing on", measure(True, True)),
        ("metrics on (multiprocess)", _multiprocess_row()),
    ]
    print(f"  {'variant':<28}{'loop CPU µs':>12}{'added':>9}{'wall µs':>10}{'CPU µs incl. export':>21}{'spans':>7}")
    base = rows[0][1]
    assert base is not None
    out: dict[str, float] = {}
    for label, r in rows:
        if r is None:
            print(f"  {label:<28}  (failed)")
            continue
        print(f"  {label:<28}{r['loop']:>12.1f}{r['loop'] - base['loop']:>+9.1f}{r['wall']:>10.1f}{r['cpu']:>21.1f}"
              f"{int(r.get('spans', 0)):>7}")
        key = label.replace(",", "").replace("  ", " ").replace(" ", "_").replace("(", "").replace(")", "")
        out[f"telemetry.{key}.loop_us"] = r["loop"]
    events = max(r["events"] for _, r in rows if r is not None)
    print("  added = event-loop CPU over 'metrics off, tracing off' (which still records incident records). "
          "All of it runs after the response is complete: it delays no byte to the client, it costs CPU. "
          f"Spans: 2 per request (server + upstream), {events:.0f} gen_ai.guardrail.result events.")
    return out


if __name__ == "__main__":
    if "--child-multiprocess" in sys.argv:
        from proxy.metrics import multiprocess_active

        assert multiprocess_active(), "PROMETHEUS_MULTIPROC_DIR was not seen at import"
        print(json.dumps(measure(True, False)))
    else:
        main()
