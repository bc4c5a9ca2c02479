"""The simulated upstream, driven by the official OpenAI SDK over real loopback HTTP.

The simulator is the upstream of every proxy test and benchmark, so these tests pin its wire
format to what the SDK parses, and pin each ``x-sim-*`` aid that other tests rely on.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import time
import zlib
from collections.abc import Iterator

import httpx
import httpx2
import openai
import orjson
import phonenumbers
import pytest
from stdnum import iban, luhn

from proxy.simulate import (
    EXFIL_URL,
    INJECTION_PHRASE,
    PII_VALUES,
    SCENARIO_OUTPUTS,
    SECRET_VALUES,
    SIM_MODELS,
    RunningSimulator,
    create_app,
    serve_in_thread,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode()


@pytest.fixture(scope="module")
def sim() -> Iterator[RunningSimulator]:
    with serve_in_thread() as running:
        yield running


@pytest.fixture
def client(sim: RunningSimulator) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0, timeout=10) as c:
        yield c


@pytest.fixture
def raw(sim: RunningSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, timeout=10) as c:
        yield c


def sse_data(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi to Zoë 👋"}]


# -- chat completions ---------------------------------------------------------------------------


def test_chat_echo_non_streaming(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="sim-echo", messages=USER)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "sim-echo" and r.system_fingerprint == "fp_sim"
    choice = r.choices[0]
    assert choice.message.content == "Say hi to Zoë 👋"
    assert choice.message.role == "assistant" and choice.message.refusal is None
    assert choice.finish_reason == "stop" and choice.logprobs is None
    assert r.usage is not None
    assert r.usage.completion_tokens == 4  # ceil(15 chars / 4)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_echo_content_parts_and_any_model_name(client: openai.OpenAI) -> None:
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}],
        },
    ]
    r = client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "part one, two"
    assert r.model == "gpt-4o-mini"


def test_chat_output_header_overrides_and_n(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="sim-echo", messages=USER, n=2, extra_headers={"x-sim-output": b64("naïve ✓ output")}
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert {c.message.content for c in r.choices} == {"naïve ✓ output"}
    assert r.usage is not None and r.usage.completion_tokens == 2 * 4


def test_chat_streaming_chunks_by_code_point(client: openai.OpenAI) -> None:
    text = "ab€😀cdé"
    stream = client.chat.completions.create(
        model="sim-echo",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-sim-output": b64(text), "x-sim-chunk-chars": "3"},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    pieces = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert pieces == ["ab€", "😀cd", "é"]
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_chat_streaming_raw_wire_format(raw: httpx.Client) -> None:
    body = {"model": "sim-echo", "messages": USER, "stream": True}
    r = raw.post("/chat/completions", json=body, headers={"x-sim-output": b64("hello")})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_data(r.text)
    assert events[-1] == "[DONE]"
    assert r.text.endswith("data: [DONE]\n\n")
    first = json.loads(events[0])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert "usage" not in first  # only present when include_usage is requested
    last = json.loads(events[-2])
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_chat_streaming_n2_interleaves_choices(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="sim-echo", messages=USER, n=2, stream=True, extra_headers={"x-sim-output": b64("abcdefgh")}
    )
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {0: "abcdefgh", 1: "abcdefgh"}
    assert finishes == {0: "stop", 1: "stop"}


def test_chat_tool_call_non_streaming(client: openai.OpenAI) -> None:
    args = '{"city": "Zürich"}'
    r = client.chat.completions.create(
        model="sim-echo",
        messages=USER,
        extra_headers={"x-sim-tool-call": "get_weather", "x-sim-output": b64(args)},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and call.function.arguments == args  # type: ignore[union-attr]


def test_chat_tool_call_streaming_through_sdk_accumulator(client: openai.OpenAI) -> None:
    args = '{"city": "Zürich", "unit": "c"}'
    headers = {"x-sim-tool-call": "get_weather", "x-sim-output": b64(args), "x-sim-chunk-chars": "5"}
    raw_chunks = list(
        client.chat.completions.create(model="sim-echo", messages=USER, stream=True, extra_headers=headers)
    )
    first = raw_chunks[0].choices[0].delta
    assert first.role == "assistant" and first.tool_calls is not None
    head = first.tool_calls[0]
    assert head.index == 0 and head.id and head.type == "function"
    assert head.function is not None and head.function.name == "get_weather" and head.function.arguments == ""
    later = [c.choices[0].delta.tool_calls[0] for c in raw_chunks[1:-1]]  # type: ignore[index]
    assert all(t.id is None and t.function is not None and t.function.name is None for t in later)
    assert "".join(t.function.arguments or "" for t in later) == args  # type: ignore[union-attr]
    assert raw_chunks[-1].choices[0].finish_reason == "tool_calls"

    with client.chat.completions.stream(model="sim-echo", messages=USER, extra_headers=headers) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == args  # type: ignore[index]


TOOLS = [{"type": "function", "function": {"name": "Product", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "other_tool", "parameters": {"type": "object"}}}]


def test_forced_tool_choice_gets_exactly_one_call_to_it(client: openai.OpenAI) -> None:
    """What instructor, langchain and litellm rely on: a ``tool_choice`` naming a function gets
    one call to it, carrying the output as its arguments (streamed or not, chat or Responses)."""
    args = '{"product": "pen", "price": 1.5}'
    msgs = [{"role": "user", "content": args}]  # sim-echo: the output is the last user message
    forced = {"type": "function", "function": {"name": "Product"}}
    r = client.chat.completions.create(model="sim-echo", messages=msgs, tools=TOOLS, tool_choice=forced)  # type: ignore[arg-type]
    (call,) = r.choices[0].message.tool_calls or []
    assert (call.function.name, call.function.arguments) == ("Product", args)  # type: ignore[union-attr]
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    with client.chat.completions.stream(model="sim-echo", messages=msgs, tools=TOOLS,  # type: ignore[arg-type]
                                        tool_choice=forced) as s:
        final = s.get_final_completion()
    assert [(t.function.name, t.function.arguments) for t in final.choices[0].message.tool_calls or []] == [
        ("Product", args)]
    one = client.chat.completions.create(model="sim-echo", messages=msgs, tools=TOOLS[:1], tool_choice="required")  # type: ignore[arg-type]
    assert [t.function.name for t in one.choices[0].message.tool_calls or []] == ["Product"]  # type: ignore[union-attr]
    # "required" among several tools, or "auto": the model may answer in text, as here
    for choice in ("required", "auto"):
        r = client.chat.completions.create(model="sim-echo", messages=msgs, tools=TOOLS, tool_choice=choice)  # type: ignore[arg-type]
        assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == args
    tool = {"type": "function", "name": "Product", "parameters": {"type": "object"}}
    resp = client.responses.create(model="sim-echo", input=args, tools=[tool],  # type: ignore[list-item]
                                   tool_choice={"type": "function", "name": "Product"})
    calls = [o for o in resp.output if o.type == "function_call"]
    assert [(c.name, c.arguments) for c in calls] == [("Product", args)]  # type: ignore[union-attr]


def test_chat_parallel_tool_calls(client: openai.OpenAI) -> None:
    calls = [{"name": "lookup", "arguments": '{"q": "a"}'}, {"name": "fetch", "arguments": '{"id": 7}'}]
    headers = {"x-sim-tool-calls": b64(json.dumps(calls)), "x-sim-chunk-chars": "4"}
    r = client.chat.completions.create(model="sim-echo", messages=USER, extra_headers=headers)
    got = [(t.function.name, t.function.arguments) for t in r.choices[0].message.tool_calls or []]  # type: ignore[union-attr]
    assert got == [("lookup", '{"q": "a"}'), ("fetch", '{"id": 7}')]

    by_index: dict[int, dict[str, str]] = {}
    for chunk in client.chat.completions.create(model="sim-echo", messages=USER, stream=True, extra_headers=headers):
        for c in chunk.choices:
            for t in c.delta.tool_calls or []:
                slot = by_index.setdefault(t.index, {"name": "", "arguments": "", "id": ""})
                if t.id:
                    assert not slot["id"], "id is sent once per tool call"
                    slot["id"] = t.id
                if t.function and t.function.name:
                    slot["name"] = t.function.name
                slot["arguments"] += (t.function.arguments or "") if t.function else ""
    assert [(v["name"], v["arguments"]) for _, v in sorted(by_index.items())] == [
        ("lookup", '{"q": "a"}'),
        ("fetch", '{"id": 7}'),
    ]
    assert by_index[0]["id"] != by_index[1]["id"]


def test_chat_logprobs_deterministic(client: openai.OpenAI) -> None:
    headers = {"x-sim-output": b64("The quick brown fox jumps over the lazy dog, twice.")}
    r1 = client.chat.completions.create(
        model="sim-echo", messages=USER, logprobs=True, top_logprobs=3, extra_headers=headers
    )
    r2 = client.chat.completions.create(
        model="sim-echo", messages=USER, logprobs=True, top_logprobs=3, extra_headers=headers
    )
    content = r1.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and "".join(t.token for t in content) == r1.choices[0].message.content
    assert [t.logprob for t in content] == [t.logprob for t in r2.choices[0].logprobs.content]  # type: ignore[union-attr]
    for t in content:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 3
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert t.token in {x.token for x in t.top_logprobs}

    stream = client.chat.completions.create(
        model="sim-echo", messages=USER, logprobs=True, stream=True, extra_headers=headers
    )
    streamed = [c.choices[0].logprobs.content[0] for c in stream if c.choices and c.choices[0].delta.content]  # type: ignore[index,union-attr]
    assert [t.logprob for t in streamed] == [t.logprob for t in content]


def test_logprobs_mostly_confident_sometimes_not() -> None:
    from proxy.simulate import _logprob_of

    values = [_logprob_of(f"tok{i}") for i in range(2000)]
    confident = sum(v > -0.06 for v in values)
    assert 0.8 * len(values) < confident < 0.97 * len(values)
    assert min(values) < -0.7


def test_max_tokens_truncates_with_length(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="sim-echo", messages=USER, max_tokens=2, extra_headers={"x-sim-output": b64("x" * 40)}
    )
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == "x" * 8


# -- completions, responses, embeddings, models ---------------------------------------------------


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="sim-echo", prompt="Once upon a time")
    assert r.object == "text_completion" and r.choices[0].text == "Once upon a time"
    assert r.choices[0].finish_reason == "stop" and r.usage is not None

    stream = client.completions.create(
        model="sim-echo", prompt="Once upon a time", stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Once upon a time"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None

    lp = client.completions.create(model="sim-echo", prompt="abcdefgh", logprobs=2)
    assert lp.choices[0].logprobs is not None and lp.choices[0].logprobs.tokens == ["abcd", "efgh"]
    assert lp.choices[0].logprobs.text_offset == [0, 4]


def test_responses_non_streaming(client: openai.OpenAI) -> None:
    r = client.responses.create(model="sim-echo", instructions="Be brief.", input="Hello there ☀")
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert r.output_text == "Hello there ☀"
    msg = r.output[0]
    assert msg.type == "message" and msg.id.startswith("msg_") and msg.status == "completed"
    assert r.usage is not None and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens

    items = [
        {"role": "developer", "content": "System rules."},
        {"role": "user", "content": [{"type": "input_text", "text": "last question"}]},
    ]
    r2 = client.responses.create(model="sim-echo", input=items)  # type: ignore[arg-type]
    assert r2.output_text == "last question"


def test_responses_streaming_events(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model="sim-echo", input="stream me please", stream=True, extra_headers={"x-sim-chunk-chars": "6"}
        )
    )
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [d.delta for d in deltas] == ["stream", " me pl", "ease"]  # type: ignore[union-attr]
    item_id = events[2].item.id  # type: ignore[union-attr]
    assert all(d.item_id == item_id and d.output_index == 0 and d.content_index == 0 for d in deltas)  # type: ignore[union-attr]
    assert events[-1].response.output_text == "stream me please"  # type: ignore[union-attr]

    with client.responses.stream(model="sim-pii", input="customer details?") as s:
        text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
        final = s.get_final_response()
    assert text == final.output_text == SCENARIO_OUTPUTS["sim-pii"]


def test_responses_raw_event_lines(raw: httpx.Client) -> None:
    r = raw.post("/responses", json={"model": "sim-echo", "input": "hi", "stream": True})
    blocks = [b for b in r.text.split("\n\n") if b]
    for block in blocks:
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        assert json.loads(data_line[6:])["type"] == event_line[7:]
    assert "[DONE]" not in r.text


def test_responses_function_call(client: openai.OpenAI) -> None:
    headers = {"x-sim-tool-call": "search", "x-sim-output": b64('{"q": "gapwatch"}')}
    r = client.responses.create(model="sim-echo", input="find it", extra_headers=headers)
    (item,) = r.output
    assert item.type == "function_call" and item.name == "search" and item.arguments == '{"q": "gapwatch"}'
    assert item.call_id.startswith("call_")

    with client.responses.stream(model="sim-echo", input="find it", extra_headers=headers) as s:
        types = [e.type for e in s]
        final = s.get_final_response()
    assert "response.function_call_arguments.delta" in types
    assert final.output[0].arguments == '{"q": "gapwatch"}'  # type: ignore[union-attr]


def test_embeddings(client: openai.OpenAI, raw: httpx.Client) -> None:
    r = client.embeddings.create(model="sim-embed", input=["alpha", "beta", "alpha"])
    vecs = [d.embedding for d in r.data]
    assert [len(v) for v in vecs] == [8, 8, 8]
    assert vecs[0] == vecs[2] and vecs[0] != vecs[1]
    assert abs(sum(x * x for x in vecs[0]) - 1.0) < 1e-5
    r16 = client.embeddings.create(model="sim-embed", input="alpha", dimensions=16, encoding_format="float")
    assert len(r16.data[0].embedding) == 16
    body = raw.post("/embeddings", json={"model": "m", "input": "alpha", "encoding_format": "base64"}).json()
    assert len(base64.b64decode(body["data"][0]["embedding"])) == 8 * 4


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == list(SIM_MODELS)
    assert {"sim-echo", "sim-drop", "sim-slow", "sim-error-500", "sim-pii"} <= set(ids)
    assert client.models.retrieve("sim-pii").id == "sim-pii"


# -- errors and faults ---------------------------------------------------------------------------


def test_sim_error_500(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="sim-error-500", messages=USER)
    assert info.value.status_code == 500
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "server_error" and body["code"] is None
    assert body["param"] is None and body["message"]


@pytest.mark.parametrize(("status", "exc"), [(429, openai.RateLimitError), (503, openai.InternalServerError)])
def test_status_header_with_retry_after(client: openai.OpenAI, status: int, exc: type[Exception]) -> None:
    with pytest.raises(exc) as info:
        client.chat.completions.create(model="sim-echo", messages=USER, extra_headers={"x-sim-status": str(status)})
    err = info.value
    assert isinstance(err, openai.APIStatusError) and err.status_code == status
    assert err.response.headers["retry-after"] == "7"
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.response.headers["content-type"] == "application/json"


def test_malformed_json_is_400(raw: httpx.Client) -> None:
    r = raw.post(
        "/chat/completions",
        content=b'{"model": "sim-echo", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert raw.post("/chat/completions", json={"model": "sim-echo"}).json()["error"]["param"] == "messages"
    assert raw.post("/nope", json={}).status_code == 404
    assert raw.get("/chat/completions").status_code == 405
    assert (
        raw.post("/chat/completions", json={"model": "m", "messages": []}, headers={"x-sim-output": "%%"}).status_code
        == 400
    )


def test_sim_drop_streaming_breaks_connection(client: openai.OpenAI, raw: httpx.Client, sim: RunningSimulator) -> None:
    headers = {"x-sim-output": b64("0123456789abcdefghij"), "x-sim-chunk-chars": "2"}
    stream = client.chat.completions.create(model="sim-drop", messages=USER, stream=True, extra_headers=headers)
    got = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)
    assert got == ["", "01", "23", "45"]
    assert sim.app.requests(1)[0]["outcome"] == "dropped"

    received = bytearray()
    with (
        pytest.raises(httpx.RemoteProtocolError),
        raw.stream("POST", "/chat/completions", json={"model": "sim-drop", "messages": USER, "stream": True}) as r,
    ):
        for part in r.iter_raw():
            received += part
    assert b"data: " in received and b"[DONE]" not in received


def test_sim_drop_non_streaming(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="sim-drop", messages=USER)


def test_sim_slow_first_token(client: openai.OpenAI) -> None:
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model="sim-slow", messages=USER, stream=True, extra_headers={"x-sim-first-token-ms": "150"}
    )
    first = next(iter(stream))
    assert time.perf_counter() - t0 >= 0.15
    assert first.choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "Say hi to Zoë 👋"


def test_client_disconnect_is_recorded(sim: RunningSimulator) -> None:
    headers = {"x-sim-delay-ms": "50", "x-sim-output": b64("x" * 200), "x-sim-chunk-chars": "1"}
    body = {"model": "sim-echo", "messages": USER, "stream": True}
    with (
        httpx.Client(base_url=sim.base_url) as c,
        c.stream("POST", "/chat/completions", json=body, headers=headers) as r,
    ):
        next(r.iter_raw())
    deadline = time.monotonic() + 2
    while sim.app.requests(1)[0]["outcome"] is None and time.monotonic() < deadline:
        time.sleep(0.02)
    entry = sim.app.requests(1)[0]
    assert entry["outcome"] == "client_disconnected"
    assert entry["ended_at"] - entry["received_at"] < 1.0


def test_delay_paces_chunks(raw: httpx.Client) -> None:
    headers = {"x-sim-delay-ms": "20", "x-sim-output": b64("abcdefghijkl")}
    t0 = time.perf_counter()
    r = raw.post("/chat/completions", json={"model": "sim-echo", "messages": USER, "stream": True}, headers=headers)
    assert time.perf_counter() - t0 >= 0.08  # 3 content chunks + closing, 20 ms apart
    assert (
        "".join(json.loads(d)["choices"][0]["delta"].get("content") or "" for d in sse_data(r.text)[:-1])
        == "abcdefghijkl"
    )


# -- test aids -----------------------------------------------------------------------------------


def test_sequence_outputs_and_statuses(client: openai.OpenAI) -> None:
    outputs = b64(json.dumps(["{not json", '{"ok": true}']))
    headers = {"x-sim-sequence": "seq-1", "x-sim-outputs": outputs}
    got = [
        client.chat.completions.create(model="sim-echo", messages=USER, extra_headers=headers)
        .choices[0]
        .message.content
        for _ in range(3)
    ]
    assert got == ["{not json", '{"ok": true}', '{"ok": true}']

    headers = {"x-sim-sequence": "seq-2", "x-sim-statuses": "500,200"}
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="sim-echo", messages=USER, extra_headers=headers)
    assert (
        client.chat.completions.create(model="sim-echo", messages=USER, extra_headers=headers)
        .choices[0]
        .message.content
    )


def test_gzip(raw: httpx.Client, client: openai.OpenAI) -> None:
    body = {"model": "sim-echo", "messages": USER}
    r = raw.post("/chat/completions", json=body, headers={"x-sim-gzip": "1"})
    assert r.headers["content-encoding"] == "gzip"
    assert int(r.headers["content-length"]) < len(r.content)  # httpx decoded it
    assert r.json()["choices"][0]["message"]["content"] == "Say hi to Zoë 👋"
    with raw.stream("POST", "/chat/completions", json=body, headers={"x-sim-gzip": "1"}) as s:
        compressed = b"".join(s.iter_raw())
    assert orjson.loads(gzip.decompress(compressed))["object"] == "chat.completion"
    assert client.chat.completions.create(model="sim-echo", messages=USER, extra_headers={"x-sim-gzip": "1"}).choices


def test_request_ring(raw: httpx.Client, client: openai.OpenAI) -> None:
    assert raw.delete("/sim/requests").status_code == 200
    assert raw.get("/sim/requests").json()["data"] == []
    client.chat.completions.create(model="sim-echo", messages=USER, extra_headers={"x-custom": "v1"})
    client.completions.create(model="sim-echo", prompt="p")
    data = raw.get("/sim/requests", params={"n": 1}).json()["data"]
    assert len(data) == 1 and data[0]["path"] == "/v1/completions" and data[0]["body"]["prompt"] == "p"
    both = raw.get("/sim/requests").json()["data"]
    assert [d["path"] for d in both] == ["/v1/chat/completions", "/v1/completions"]
    headers = dict(both[0]["headers"])
    assert headers["x-custom"] == "v1" and headers["authorization"] == "Bearer sk-test"
    assert both[0]["method"] == "POST" and both[0]["body"]["messages"] == USER
    assert both[0]["status"] == 200 and both[0]["outcome"] == "completed"


def test_ring_is_bounded() -> None:
    app = create_app()
    assert app.ring.maxlen == 256


async def test_async_client_and_asgi_transport() -> None:
    app = create_app()
    # The SDK's HTTP stack is httpx2, so its own ASGI transport is the one that fits.
    http_client = openai.DefaultAsyncHttpxClient(transport=httpx2.ASGITransport(app=app))
    async with openai.AsyncOpenAI(base_url="http://sim/v1", api_key="k", http_client=http_client) as c:
        r = await c.chat.completions.create(model="sim-clean", messages=USER)
        assert r.choices[0].message.content == SCENARIO_OUTPUTS["sim-clean"]
        parts = [
            ch.choices[0].delta.content
            async for ch in await c.chat.completions.create(model="sim-refusal", messages=USER, stream=True)
            if ch.choices
        ]
        assert "".join(p or "" for p in parts) == "I'm sorry, but I can't help with that."


async def test_async_client_over_http(sim: RunningSimulator) -> None:
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="k", max_retries=0) as c:
        stream = await c.responses.create(model="sim-echo", input="async hello", stream=True)
        text = "".join([e.delta async for e in stream if e.type == "response.output_text.delta"])
        assert text == "async hello"


# -- scenario outputs ----------------------------------------------------------------------------


def test_scenario_values_are_format_valid() -> None:
    assert luhn.is_valid(PII_VALUES["card"].replace(" ", ""))
    assert iban.is_valid(PII_VALUES["iban"])
    assert phonenumbers.is_valid_number(phonenumbers.parse(PII_VALUES["phone"], None))
    assert re.fullmatch(r"[\w.]+@[\w-]+\.\w+", PII_VALUES["email"])
    assert re.fullmatch(r"AKIA[A-Z2-7]{16}", SECRET_VALUES["aws_access_key_id"])
    assert re.fullmatch(r"[A-Za-z0-9/+]{40}", SECRET_VALUES["aws_secret_access_key"])
    token = SECRET_VALUES["github_token"]
    assert re.fullmatch(r"ghp_[A-Za-z0-9]{36}", token)
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    crc, digits = zlib.crc32(token[4:34].encode()), ""
    while crc:
        crc, d = divmod(crc, 62)
        digits = alphabet[d] + digits
    assert token[34:] == digits.rjust(6, "0")
    for value in PII_VALUES.values():
        assert value in SCENARIO_OUTPUTS["sim-pii"]
    for value in SECRET_VALUES.values():
        assert value in SCENARIO_OUTPUTS["sim-secret"]
    assert INJECTION_PHRASE in SCENARIO_OUTPUTS["sim-injection"]
    assert f"![x]({EXFIL_URL})" in SCENARIO_OUTPUTS["sim-injection"]


def test_scenario_json_models(client: openai.OpenAI) -> None:
    def ask(model: str) -> tuple[str, str]:
        r = client.chat.completions.create(model=model, messages=USER)
        return r.choices[0].message.content or "", r.choices[0].finish_reason

    valid, _ = ask("sim-json-valid")
    assert isinstance(json.loads(valid), dict)
    invalid, _ = ask("sim-json-invalid")
    with pytest.raises(json.JSONDecodeError):
        json.loads(invalid)
    fenced, _ = ask("sim-json-fenced")
    inner = re.search(r"```json\n(.*)\n```", fenced, re.S)
    assert inner and json.loads(inner.group(1)) == json.loads(valid)
    truncated, finish = ask("sim-json-truncated")
    assert finish == "length" and valid.startswith(truncated) and truncated != valid


def test_scenario_grounded_and_system_leak(client: openai.OpenAI) -> None:
    system = "Use this context. The Rhine flows through six countries and is 1,230 km long. Answer briefly."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "How long is the Rhine?"}]
    grounded = client.chat.completions.create(model="sim-grounded", messages=messages).choices[0].message.content
    assert (
        grounded == 'Based on the context you provided: "The Rhine flows through six countries and is 1,230 km long."'
    )
    leak = client.chat.completions.create(model="sim-system-leak", messages=messages).choices[0].message.content
    assert leak is not None and leak.endswith(system) and leak != system
    no_system = client.chat.completions.create(
        model="sim-grounded", messages=[{"role": "user", "content": "Quote me."}]
    )
    assert no_system.choices[0].message.content == 'Based on the context you provided: "Quote me."'
    ungrounded = client.chat.completions.create(model="sim-ungrounded", messages=messages).choices[0].message.content
    assert ungrounded is not None and "1,230" not in ungrounded and re.search(r"\d", ungrounded)


def test_healthz(raw: httpx.Client, sim: RunningSimulator) -> None:
    assert httpx.get(f"http://{sim.host}:{sim.port}/healthz").json() == {"status": "ok"}


ODD_VALUES = [None, True, 0, -1, 3.5, "x", [], {}, [1, "a", None], {"a": 1}, [{"type": "text"}], [{"role": "user"}]]
ODD_FIELDS = {
    "/v1/chat/completions": ["messages", "n", "stream_options", "logprobs", "top_logprobs", "max_tokens", "model"],
    "/v1/completions": ["prompt", "n", "logprobs", "max_tokens", "stream_options"],
    "/v1/responses": ["input", "instructions", "include", "top_logprobs", "max_output_tokens", "tools", "text"],
    "/v1/embeddings": ["input", "dimensions", "encoding_format"],
}


async def test_odd_field_values_never_500() -> None:
    """Wrong types get a 400 or are ignored, never a crash (the proxy's error tests rely on it)."""
    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:
        for path, fields in ODD_FIELDS.items():
            for name in fields:
                for value in ODD_VALUES:
                    for model in ("sim-echo", "sim-grounded"):
                        body = {"model": model, "messages": USER, "input": "hi", "prompt": "hi", "stream": True}
                        body[name] = value
                        r = await c.post(path, json=body)
                        assert r.status_code in (200, 400), (path, name, value, r.text)
                        if r.status_code == 400:
                            assert r.json()["error"]["type"] == "invalid_request_error"
