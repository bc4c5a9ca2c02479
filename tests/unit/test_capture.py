"""Traffic capture: sampling, content modes and redaction, rotation, the background writer."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest
from pydantic import ValidationError

from detectors.base import Channel, Finding, Severity
from detectors.redaction import mask, placeholder
from proxy.capture import (
    CaptureConfig,
    CaptureSink,
    Redactor,
    RotatingJsonl,
    apply_spans,
    read_rows,
    redact_row,
    snapshot,
)
from proxy.exchange import Exchange
from proxy.pipeline import Applied, Outcome
from proxy.simulate import PII_VALUES, SECRET_VALUES

EMAIL = PII_VALUES["email"]
CARD = PII_VALUES["card"]
KEY = SECRET_VALUES["aws_access_key_id"]


def _exchange(output: str = f"Mail {EMAIL} or use card {CARD}. Code ACCT-12345678.") -> Exchange:
    ex = Exchange(request_id="req-1", method="POST", path="/v1/chat/completions", endpoint="chat",
                  body={"model": "m", "temperature": 0,
                        "messages": [{"role": "system", "content": f"Key {KEY} is internal."},
                                     {"role": "user", "content": f"I am {EMAIL}", "name": "jane"}],
                        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                        "response_format": {"type": "json_object"}},
                  model="m", route="r0", tenant="t1", status=200)
    ex.outputs = {}
    ex.record_output(Channel(), output)
    ex.record_output(Channel(kind="tool_call", tool_index=0, tool_name="f"), '{"a": 1}')
    ex.finish_reasons.append("stop")
    ex.usage = {"prompt_tokens": 10, "completion_tokens": 5}
    start = output.index("ACCT")
    f = Finding(detector="regex", category="acct", severity=Severity.high, score=1.0, message="m",
                span=(start, start + 13), evidence=mask("ACCT-12345678"), replacement=placeholder("acct"))
    o = Outcome()
    o.applied.append(Applied(f, "redact", "redact"))
    o.signals["grounding.response_score"] = 0.5
    ex.outcomes.append(o)
    ex.ended = ex.started + 0.25
    return ex


def test_apply_spans_merges_overlaps_and_keeps_first_placeholder():
    text = "0123456789abcdef"
    assert apply_spans(text, [(2, 5, "[A]"), (4, 8, "[B]"), (10, 12, "[C]")]) == "01[A]89[C]cdef"
    assert apply_spans(text, []) == text
    assert apply_spans(text, [(5, 5, "[X]"), (-3, 1, "[Y]"), (15, 99, "[Z]")]) == "[Y]123456789abcde[Z]"


def test_redactor_replaces_pii_and_secrets_with_placeholders():
    red = Redactor(["pii", "secrets"])
    out = red.redact(f"write to {EMAIL}, card {CARD}, key {KEY}")
    assert EMAIL not in out and CARD not in out and KEY not in out
    assert "[REDACTED:email]" in out and "[REDACTED:" in out.split("card", 1)[1]
    assert red.redact("nothing sensitive here") == "nothing sensitive here"


def test_unknown_redaction_detector_fails_at_construction():
    with pytest.raises(ValueError, match="unknown detector 'nope'"):
        Redactor(["nope"])
    with pytest.raises(ValueError):
        CaptureSink(CaptureConfig(enabled=True, redact_detectors=["nope"]))


def test_config_defaults_are_off_and_strict():
    cfg = CaptureConfig()
    assert cfg.enabled is False and cfg.content == "redacted" and cfg.redact_detectors == ["pii", "secrets"]
    with pytest.raises(ValidationError):
        CaptureConfig(sample_rat=1.0)
    with pytest.raises(ValidationError):
        CaptureConfig(sample_rate=1.5)


def test_snapshot_holds_the_whole_exchange():
    row = snapshot(_exchange(), headers={"x-gapwatch-schema": "orders"}, canaries=("gwc-abc",))
    assert row["v"] == 1 and row["request_id"] == "req-1" and row["route"] == "r0" and row["tenant"] == "t1"
    assert row["output"]["0:text"].startswith("Mail ") and row["output"]["0:tool:0"] == '{"a": 1}'
    assert row["tool_names"] == {"0:tool:0": "f"}
    assert row["request"]["tools"][0]["function"]["name"] == "f"
    assert row["request"]["response_format"] == {"type": "json_object"}
    assert row["usage"]["completion_tokens"] == 5 and row["latency"]["total_ms"] == pytest.approx(250.0)
    (f,) = row["findings"]
    assert f["detector"] == "regex" and f["action"] == "redact" and f["replacement"] == "[REDACTED:acct]"
    assert f["evidence"] != "ACCT-12345678"
    assert row["signals"] == {"grounding.response_score": 0.5}
    assert row["headers"] == {"x-gapwatch-schema": "orders"} and row["canaries"] == ["gwc-abc"]


def test_content_modes():
    raw = snapshot(_exchange(), canaries=("gwc-abc",))
    full = redact_row(raw, "full", None)
    assert full["content"] == "full" and EMAIL in full["output"]["0:text"] and full["canaries"] == ["gwc-abc"]

    red = redact_row(raw, "redacted", Redactor(["pii", "secrets"]))
    text = orjson.dumps(red).decode()
    for secret in (EMAIL, CARD, KEY, "ACCT-12345678"):
        assert secret not in text
    assert red["output"]["0:text"].startswith("Mail [REDACTED:email]")
    assert "[REDACTED:acct]" in red["output"]["0:text"]  # the live finding's span
    assert red["request"]["messages"][1]["role"] == "user" and red["request"]["messages"][1]["name"] == "jane"
    assert red["request"]["temperature"] == 0 and red["canaries"] == []
    assert raw["output"]["0:text"].startswith("Mail " + EMAIL)  # the raw row is untouched

    none = redact_row(raw, "none", None)
    assert none["output"] == {} and "messages" not in none["request"]
    assert none["request"]["tools"] and none["findings"] and none["usage"]


def test_rotation_by_size(tmp_path):
    f = RotatingJsonl(tmp_path / "cap.jsonl", max_bytes=1024, keep_files=2)
    line = b"x" * 300
    for _ in range(20):
        f.write([line])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["cap.jsonl", "cap.jsonl.1", "cap.jsonl.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 1024
    assert len((tmp_path / "cap.jsonl.1").read_bytes().splitlines()) == 3


def test_pid_in_path(tmp_path):
    import os

    f = RotatingJsonl(tmp_path / "cap-{pid}.jsonl", 4096, 1)
    assert f.path.name == f"cap-{os.getpid()}.jsonl"


def test_sampling():
    ex = _exchange()
    assert not CaptureSink(CaptureConfig(sample_rate=1.0)).should_capture(ex)  # disabled
    assert not CaptureSink(CaptureConfig(enabled=True, sample_rate=0.0)).should_capture(ex)
    assert CaptureSink(CaptureConfig(enabled=True, sample_rate=1.0)).should_capture(ex)
    assert not CaptureSink(CaptureConfig(enabled=True, sample_rate=1.0, routes=["other"])).should_capture(ex)
    assert CaptureSink(CaptureConfig(enabled=True, sample_rate=1.0, routes=["r0"])).should_capture(ex)
    sink = CaptureSink(CaptureConfig(enabled=True, sample_rate=0.25), rng=random.Random(7))
    hits = sum(sink.should_capture(ex) for _ in range(4000))
    assert 900 < hits < 1100


def test_begin_marks_the_exchange_and_keeps_context_facts():
    from detectors.base import RequestContext

    sink = CaptureSink(CaptureConfig(enabled=True, sample_rate=1.0, content="full"))
    ex = _exchange()
    ex.outputs = None
    ctx = RequestContext(headers={"x-gapwatch-schema": "s"}, canaries=("gwc-token",))
    assert sink.begin(ex, ctx) is True and ex.outputs == {}
    off = CaptureSink(CaptureConfig(enabled=True, sample_rate=0.0))
    ex2 = _exchange()
    ex2.outputs = None
    assert off.begin(ex2, ctx) is False and ex2.outputs is None


async def test_sink_writes_redacted_rows_in_the_background(tmp_path):
    from proxy.metrics import Metrics

    path = tmp_path / "capture.jsonl"
    metrics = Metrics()
    sink = CaptureSink(CaptureConfig(enabled=True, sample_rate=1.0, path=str(path)), metrics)
    sink.start()
    for i in range(5):
        ex = _exchange()
        ex.request_id = f"req-{i}"
        sink.record(ex)
    unsampled = _exchange()
    unsampled.outputs = None
    sink.record(unsampled)  # not sampled: ignored
    await sink.stop()
    rows = read_rows(path)
    assert [r["request_id"] for r in rows] == [f"req-{i}" for i in range(5)]
    assert all(r["content"] == "redacted" for r in rows)
    assert EMAIL not in path.read_text() and CARD not in path.read_text()
    assert sink.written == 5 and sink.dropped == 0


async def test_full_queue_drops_and_counts(tmp_path):
    from proxy.metrics import Metrics
    from tests.conftest import metric_value

    metrics = Metrics()
    sink = CaptureSink(CaptureConfig(enabled=True, sample_rate=1.0, path=str(tmp_path / "c.jsonl"),
                                     queue_size=2, content="none"), metrics)
    sink.start()
    for _ in range(5):  # no await in between: the writer cannot drain
        sink.record(_exchange())
    assert sink.dropped == 3
    assert metric_value(metrics.registry, "gapwatch_telemetry_errors_total", component="capture") == 3
    await sink.stop()
    assert len(read_rows(tmp_path / "c.jsonl")) == 2


async def test_write_failure_is_counted_not_raised(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    sink = CaptureSink(CaptureConfig(enabled=True, sample_rate=1.0, path=str(blocker / "c.jsonl"), content="none"))
    sink.start()
    sink.record(_exchange())
    await asyncio.wait_for(sink.stop(), 5)
    assert sink.failed == 1 and sink.written == 0
