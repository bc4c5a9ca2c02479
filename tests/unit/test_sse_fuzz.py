"""Fuzzing the byte path: SSE parser -> delta extraction -> StreamRelay, seeded with the
recorded stream corpus in ``tests/data/streams``.

Properties (each a plain ``check_*`` function so ``tests/bench/fuzz_long.py`` can run the
same targets for minutes):

- the parser gives the same events for any split of the bytes, its events' raw bytes add up
  to the input, it agrees with a reference implementation of the WHATWG algorithm on valid
  UTF-8, and its line cap fires the same way whatever the split;
- delta extraction never raises on any JSON and returns well-typed pieces;
- the relay never raises, always emits valid UTF-8 that parses as SSE, forwards events byte
  for byte when it does not rewrite, keeps a well-formed stream's text unchanged when a
  rewriting policy finds nothing, and lets no byte of a redacted span through.

A failing example found by the long run is written to the corpus (``fuzz-*.sse``), which
``test_corpus_file`` replays: every crash becomes a regression test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors.base import Channel, RequestContext
from proxy import deltas
from proxy.config import load_dict
from proxy.exchange import Exchange
from proxy.pipeline import Policy, ResponsePipeline
from proxy.relay import StreamRelay
from proxy.sse import LineTooLong, SSEEvent, SSEParser

CORPUS_DIR = Path(__file__).resolve().parents[1] / "data" / "streams"
CORPUS: dict[str, bytes] = {p.name: p.read_bytes() for p in sorted(CORPUS_DIR.glob("*.sse"))}
EXAMPLES = int(os.environ.get("GAPWATCH_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                               HealthCheck.data_too_large])
ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses"}


def endpoint_of(name: str) -> str:
    return name.split("__", 1)[0]


# -- strategies ---------------------------------------------------------------------------------

SSE_TOKENS = [b"data:", b"data: ", b"event: ", b"event:x", b"event: error", b":", b": c", b" ", b"\n", b"\r",
              b"\r\n", b"\n\n", b"\xef\xbb\xbf", b"{", b"}", b'"', b"[DONE]", b"id: 1", b"retry: 5", b"x", b"data",
              b"\xc3\xa9", b"\xf0\x9f\x98\x80", b"\xff", b"\xc3", b"\x00", b'{"choices":[]}']
sse_bytes = st.lists(st.sampled_from(SSE_TOKENS) | st.binary(max_size=6), max_size=60).map(b"".join)


@st.composite
def mutated_corpus(draw: Any) -> bytes:
    """A corpus stream with a few byte-level edits (insert, delete, replace, truncate)."""
    data = bytearray(CORPUS[draw(st.sampled_from(sorted(CORPUS)))])
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        if op == "insert":
            data[i:i] = draw(st.sampled_from(SSE_TOKENS))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 8))]
        elif op == "replace" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[i:]
    return bytes(data)


any_stream = st.one_of(sse_bytes, st.sampled_from(sorted(CORPUS.values())), mutated_corpus())

KEYS = ["choices", "delta", "content", "index", "finish_reason", "tool_calls", "function", "arguments", "name",
        "id", "model", "usage", "error", "message", "type", "text", "logprobs", "token", "logprob", "output_index",
        "item", "response", "output", "refusal", "role", "status", "prompt_tokens", "completion_tokens"]
TYPES = ["response.output_text.delta", "response.completed", "response.failed", "response.incomplete",
         "response.output_item.added", "response.function_call_arguments.delta", "response.output_text.done",
         "response.function_call_arguments.done", "response.output_item.done", "response.content_part.done",
         "error", "function_call", "message", "output_text"]
json_scalars = (st.none() | st.booleans() | st.integers(-3, 1 << 40) | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(max_size=12) | st.sampled_from([*TYPES, "stop", "length", "tool_calls", ""]))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner,
                                                                 max_size=5),
    max_leaves=25,
)


@st.composite
def corpus_objects(draw: Any) -> tuple[str, dict[str, Any]]:
    """A real event payload from the corpus with one subtree replaced by arbitrary JSON."""
    name = draw(st.sampled_from(sorted(CORPUS)))
    objs = [o for o in _json_events(CORPUS[name]) if isinstance(o, dict)]
    if not objs:
        return endpoint_of(name), {}
    obj = json.loads(json.dumps(draw(st.sampled_from(objs))))
    node: Any = obj
    for _ in range(draw(st.integers(0, 4))):
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node)))
            if draw(st.booleans()):
                node[key] = draw(json_values)
                break
            node = node[key]
        elif isinstance(node, list) and node:
            i = draw(st.integers(0, len(node) - 1))
            if draw(st.booleans()):
                node[i] = draw(json_values)
                break
            node = node[i]
        else:
            break
    return endpoint_of(name), obj


@st.composite
def event_streams(draw: Any) -> tuple[str, bytes]:
    """An endpoint and a stream of events: corpus events, mutated payloads, garbage."""
    name = draw(st.sampled_from(sorted(CORPUS)))
    endpoint = endpoint_of(name)
    events = [e.raw for e in _parse_all(CORPUS[name])]
    out: list[bytes] = []
    for raw in events:
        choice = draw(st.integers(0, 9))
        if choice == 0:
            continue  # dropped
        if choice == 1:
            _, obj = draw(corpus_objects())
            out.append(b"data: " + orjson.dumps(obj) + b"\n\n")
        elif choice == 2:
            out.append(b"data: " + orjson.dumps(draw(json_values)) + b"\n\n")
        elif choice == 3:
            out.append(draw(sse_bytes))
        out.append(raw)
    return endpoint, b"".join(out)


def splits_of(data: bytes) -> Any:
    return st.lists(st.integers(0, len(data)), max_size=24).map(sorted)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


# -- the parser ---------------------------------------------------------------------------------

def _parse_all(data: bytes, parts: list[bytes] | None = None, cap: int = 1 << 30) -> list[SSEEvent]:
    parser = SSEParser(cap)
    out: list[SSEEvent] = []
    for part in parts if parts is not None else [data]:
        out += parser.feed(part)
    return out + parser.flush()


def _json_events(data: bytes) -> list[Any]:
    out = []
    for ev in _parse_all(data):
        if ev.data and not ev.is_done:
            try:
                out.append(json.loads(ev.data))
            except ValueError:
                pass
    return out


def reference_events(data: bytes) -> list[tuple[str | None, str]]:
    """The WHATWG event-stream algorithm on decoded text (plus dispatch at end of stream,
    which gapwatch does so a final event without a blank line is not lost)."""
    text = data.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = re.split(r"\r\n|\r|\n", text)
    out: list[tuple[str | None, str]] = []
    buf: list[str] | None = None
    event: str | None = None
    for line in [*lines, ""]:
        if line == "":
            if buf is not None:
                out.append((event, "\n".join(buf)))
            buf, event = None, None
            continue
        if line.startswith(":"):
            continue
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            buf = [*(buf or []), value]
        elif name == "event":
            event = value
    return out


def check_parser(data: bytes, points: list[int]) -> None:
    whole = _parse_all(data)
    split = _parse_all(data, cut(data, points))
    key = [(e.raw, e.data, e.event, e.comment) for e in whole]
    assert [(e.raw, e.data, e.event, e.comment) for e in split] == key
    assert b"".join(e.raw for e in whole) == data
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return
    assert [(e.event, e.data) for e in whole if e.data is not None] == reference_events(data)


def check_line_cap(data: bytes, points: list[int], cap: int) -> None:
    def outcome(parts: list[bytes]) -> str:
        try:
            _parse_all(data, parts, cap)
        except LineTooLong:
            return "too long"
        return "ok"

    assert outcome([data]) == outcome(cut(data, points))


@FUZZ
@given(st.data())
def test_parser_split_invariance_and_reference(data: Any) -> None:
    stream = data.draw(any_stream)
    check_parser(stream, data.draw(splits_of(stream)))


@FUZZ
@given(st.data())
def test_parser_line_cap_independent_of_splits(data: Any) -> None:
    stream = data.draw(any_stream)
    check_line_cap(stream, data.draw(splits_of(stream)), data.draw(st.integers(1, 64)))


def test_parser_line_cap_bounds_memory() -> None:
    parser = SSEParser(1024)
    parser.feed(b"data: " + b"a" * 1000)
    with pytest.raises(LineTooLong):
        parser.feed(b"a" * 100)
    parser = SSEParser(1024)
    with pytest.raises(LineTooLong):  # a complete line over the cap, even in one piece
        parser.feed(b"data: " + b"a" * 2000 + b"\n\n")
    parser = SSEParser(1024)
    assert parser.feed(b"data: " + b"a" * 1018 + b"\r") == []  # exactly the cap, CR pending
    assert [e.data for e in parser.feed(b"\n\n")] == ["a" * 1018]


# -- delta extraction ---------------------------------------------------------------------------

def check_deltas(obj: Any) -> None:
    if not isinstance(obj, dict):
        return
    tools = deltas.ToolNames()
    for ex in (deltas.chat_chunk(obj, tools), deltas.completion_chunk(obj), deltas.responses_event(obj, tools),
               deltas.chat_body(obj), deltas.responses_body(obj)):
        for ch, text in ex.pieces:
            assert isinstance(ch, Channel) and isinstance(text, str)
            assert isinstance(ch.choice, int)
        for ch, items in ex.logprobs:
            assert isinstance(ch, Channel)
            assert all(isinstance(t, str) and isinstance(v, float) for t, v in items)
        assert all(isinstance(i, int) and isinstance(r, str) for i, r in ex.finished)
        assert ex.usage is None or isinstance(ex.usage, dict)
        assert ex.error is None or isinstance(ex.error, dict)
        assert ex.response_model is None or isinstance(ex.response_model, str)


@FUZZ
@given(json_values | corpus_objects().map(lambda t: t[1]))
def test_delta_extraction_never_raises(obj: Any) -> None:
    check_deltas(obj)
    check_deltas({"choices": [obj]} if not isinstance(obj, dict) else {"choices": [obj], "type": TYPES[0]})


# -- the relay ----------------------------------------------------------------------------------

def _policy(detectors: dict[str, Any]) -> Policy:
    loaded = load_dict({"upstreams": {"u": {"base_url": "http://127.0.0.1:1/v1"}}, "routes": [{"upstream": "u"}],
                        "policies": {"default": {"detectors": detectors}}})
    return Policy.build("default", loaded.config.policies["default"], loaded.detectors["default"])


POLICIES: dict[str, Policy | None] = {
    "none": None,
    "observe": _policy({"banned_substrings": {"action": "observe", "substrings": ["the", "é"]},
                        "max_output_chars": {"action": "observe", "max_chars": 40}}),
    "quiet-rewrite": _policy({"regex": {"action": "redact", "patterns": {"q": "zq{5}x"}, "max_match_chars": 7},
                              "banned_substrings": {"action": "block", "substrings": ["qqqqzzzz"]}}),
    "redact-digits": _policy({"regex": {"action": "redact", "patterns": {"num": "[0-9]{3}"}, "max_match_chars": 3},
                              "banned_substrings": {"action": "annotate", "substrings": ["the"]}}),
    "block": _policy({"banned_substrings": {"action": "block", "substrings": ["o"]}}),
}


def run_relay(endpoint: str, data: bytes, parts: list[bytes], policy: Policy | None) -> bytes:
    """What ``proxy.server`` does with one upstream stream, minus the network."""
    ex = Exchange(request_id="fuzz", method="POST", path=ENDPOINT_PATHS[endpoint], endpoint=endpoint)
    pl = ResponsePipeline(policy, RequestContext()) if policy is not None else None
    relay = StreamRelay(ex, pl, policy.rewrites if policy is not None else False)
    parser = SSEParser()
    out = bytearray()
    for part in parts:
        if relay.done:
            break
        for ev in parser.feed(part):
            out += relay.on_event(ev, 0.0)
    if not relay.done:
        for ev in parser.flush():
            out += relay.on_event(ev, 0.0)
    tail, _clean = relay.on_eof()
    return bytes(out + tail)


def texts_by_choice(endpoint: str, data: bytes) -> dict[int, str]:
    out: dict[int, str] = {}
    for obj in _json_events(data):
        if not isinstance(obj, dict):
            continue
        if endpoint == "responses":
            if obj.get("type") == "response.output_text.delta" and isinstance(obj.get("delta"), str):
                out[0] = out.get(0, "") + obj["delta"]
            continue
        for ch in deltas.items(obj.get("choices")):
            if not isinstance(ch, dict):
                continue
            idx = ch.get("index", 0) if isinstance(ch.get("index", 0), int) else 0
            delta = ch.get("delta") if isinstance(ch.get("delta"), dict) else {}
            piece = delta.get("content") if endpoint == "chat" else ch.get("text")
            if isinstance(piece, str):
                out[idx] = out.get(idx, "") + piece
    return {k: v for k, v in out.items() if v}


def check_relay(endpoint: str, data: bytes, points: list[int], policy_name: str, well_formed: bool) -> None:
    policy = POLICIES[policy_name]
    parts = cut(data, points)
    out = run_relay(endpoint, data, parts, policy)
    out.decode("utf-8")  # never invalid UTF-8 towards the client
    events = _parse_all(out)
    assert b"".join(e.raw for e in events) == out
    if policy is None or not policy.rewrites:
        # events go out as they came (up to the end of the response), unless repaired
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return
        if policy_name in ("none", "observe"):
            assert data.startswith(out), "a non-rewriting relay changed bytes"
    if well_formed and policy_name == "quiet-rewrite":
        assert texts_by_choice(endpoint, out) == texts_by_choice(endpoint, data)
    if policy_name == "redact-digits" and endpoint in ("chat", "completions"):
        for text in texts_by_choice(endpoint, out).values():
            assert not re.search("[0-9]{3}", text), text


@FUZZ
@given(st.data())
def test_relay_on_corpus_streams(data: Any) -> None:
    name = data.draw(st.sampled_from(sorted(CORPUS)))
    stream = CORPUS[name]
    well_formed = "__sim-" in name or name.endswith(("-lf.sse", "-crlf.sse", "-cr.sse", "-bom.sse"))
    check_relay(endpoint_of(name), stream, data.draw(splits_of(stream)), data.draw(st.sampled_from(sorted(POLICIES))),
                well_formed)


@FUZZ
@given(st.data())
def test_relay_on_mutated_streams(data: Any) -> None:
    endpoint, stream = data.draw(event_streams() | st.tuples(st.sampled_from(sorted(ENDPOINT_PATHS)), any_stream))
    check_relay(endpoint, stream, data.draw(splits_of(stream)), data.draw(st.sampled_from(sorted(POLICIES))), False)


# -- the corpus, replayed whole (fuzz crashes land here as files) -------------------------------

@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_file(name: str) -> None:
    data = CORPUS[name]
    endpoint = endpoint_of(name)
    check_parser(data, [len(data) // 2])
    check_parser(data, list(range(0, len(data), 7)))
    for policy_name in POLICIES:
        check_relay(endpoint, data, [len(data) // 3], policy_name, "__sim-" in name)


def save_crash(data: bytes, endpoint: str = "chat") -> Path:
    """Write a failing input into the corpus (``<endpoint>__fuzz-<sha>.sse``)."""
    path = CORPUS_DIR / f"{endpoint}__fuzz-{hashlib.sha256(data).hexdigest()[:12]}.sse"
    path.write_bytes(data)
    return path


# -- regressions found by the fuzzer (their inputs are corpus files too) ------------------------

def test_regression_match_confirmed_at_done_is_redacted_before_release() -> None:
    """The relay released the held text at [DONE] before detectors finished: a match a
    detector only confirms at the end (``024`` followed by more text) went out unredacted."""
    out = run_relay("chat", CORPUS["chat__fuzz-2c096d905901.sse"], [CORPUS["chat__fuzz-2c096d905901.sse"]],
                    POLICIES["redact-digits"])
    assert texts_by_choice("chat", out) == {0: "[REDACTED:num]x"}


def test_regression_text_after_finish_reason_is_not_released_unchecked() -> None:
    """Content for a choice after its finish_reason reached a finished channel (no hold-back,
    no detector) and went out as it came. It is now dropped and counted."""
    data = CORPUS["chat__fuzz-03f496a29e76.sse"]
    out = run_relay("chat", data, [data], POLICIES["redact-digits"])
    assert texts_by_choice("chat", out) == {0: "GrüfJBd"}


# -- non-streaming bodies ---------------------------------------------------------------------

def check_unary(endpoint: str, obj: Any, policy_name: str) -> None:
    """What ``proxy.server`` does with a whole JSON body: scan, redact, strip logprobs."""
    from proxy.relay import _strip_logprobs, redact_body, scan_body

    policy = POLICIES[policy_name]
    if policy is None or not isinstance(obj, dict):
        return
    ex = Exchange(request_id="fuzz", method="POST", path=ENDPOINT_PATHS[endpoint], endpoint=endpoint)
    pl = ResponsePipeline(policy, RequestContext())
    redact_body(endpoint, obj, pl, scan_body(endpoint, obj, ex, pl))
    _strip_logprobs(obj)
    orjson.dumps(obj)


@st.composite
def unary_bodies(draw: Any) -> tuple[str, Any]:
    endpoint = draw(st.sampled_from(sorted(ENDPOINT_PATHS)))
    text = draw(st.text(max_size=30) | st.sampled_from(["the 123 and 4567", "é 999 the"]))
    base: dict[str, Any] = {
        "chat": {"choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": [
            {"id": "t", "type": "function", "function": {"name": "f", "arguments": text}}]}, "finish_reason": "stop"}]},
        "completions": {"choices": [{"index": 0, "text": text, "finish_reason": "stop"}]},
        "responses": {"output": [{"type": "message", "content": [{"type": "output_text", "text": text}]},
                                 {"type": "function_call", "name": "f", "arguments": text}], "output_text": text},
    }[endpoint]
    node: Any = base
    for _ in range(draw(st.integers(0, 5))):
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node)))
            if draw(st.booleans()):
                node[key] = draw(json_values)
                break
            node = node[key]
        elif isinstance(node, list) and node:
            i = draw(st.integers(0, len(node) - 1))
            if draw(st.booleans()):
                node[i] = draw(json_values)
                break
            node = node[i]
    return endpoint, base


@FUZZ
@given(unary_bodies(), st.sampled_from(sorted(POLICIES)))
def test_unary_bodies_never_raise(body: tuple[str, Any], policy_name: str) -> None:
    check_unary(body[0], body[1], policy_name)


def test_regression_non_array_fields_do_not_raise() -> None:
    """``"choices": true`` (and other arrays that are not) raised TypeError in extraction,
    which became a 500 (non-streaming) or an internal-error event."""
    for obj in ({"choices": True}, {"output": True}, {"choices": [{"message": {"tool_calls": 5}}]},
                {"output": [{"type": "message", "content": 7}]}):
        check_deltas(obj)
        for endpoint in ENDPOINT_PATHS:
            check_unary(endpoint, dict(obj), "redact-digits")
