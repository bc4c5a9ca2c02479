"""Structured outputs through the proxy with the official SDK: json_object, json_schema and the
SDK's parse() helper, tool calls, streaming block (partial and fully buffered) and retry."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel

from tests.conftest import b64, eventually, metric_value, proxy_config


class Person(BaseModel):
    name: str
    born: int
    occupation: str
    known_for: list[str]
    verified: bool


def person_schema() -> dict:
    schema = Person.model_json_schema()
    schema["additionalProperties"] = False
    schema["required"] = list(schema["properties"])
    return {"type": "json_schema", "json_schema": {"name": "Person", "schema": schema, "strict": True}}


def start(start_proxy, sim, action="block", **policy):
    det = {"schema": {"action": action, **policy.pop("schema_opts", {})}}
    return start_proxy(proxy_config(sim.url, policies={"default": {"detectors": det, **policy}}))


MSG = [{"role": "user", "content": "Who was Ada Lovelace? Answer as JSON."}]


def test_valid_json_and_parse_helper(start_proxy, sim):
    p = start(start_proxy, sim)
    client = p.client()
    r = client.chat.completions.create(model="sim-json-valid", messages=MSG, response_format={"type": "json_object"})
    assert json.loads(r.choices[0].message.content)["born"] == 1815
    parsed = client.chat.completions.parse(model="sim-json-valid", messages=MSG, response_format=Person)
    assert parsed.choices[0].message.parsed == Person(name="Ada Lovelace", born=1815, occupation="mathematician",
                                                      known_for=["notes on the Analytical Engine",
                                                                 "first published algorithm"], verified=True)
    assert eventually(lambda: metric_value(p.metrics.registry, "gapwatch_responses_checked_total",
                                           detector="schema", verdict="pass") == 2)


@pytest.mark.parametrize("model", ["sim-json-invalid", "sim-json-fenced", "sim-json-truncated"])
def test_invalid_json_blocked_non_streaming(start_proxy, sim, model):
    p = start(start_proxy, sim)
    with pytest.raises(openai.BadRequestError) as ei:
        p.client().chat.completions.create(model=model, messages=MSG, response_format={"type": "json_object"})
    body = ei.value.body
    assert body["code"] == "output_blocked" and body["detectors"] == ["schema"]


def test_schema_violation_message_names_path(start_proxy, sim):
    p = start(start_proxy, sim, action="annotate")
    bad = json.dumps({"name": "Ada", "born": "1815", "occupation": "x", "known_for": [], "verified": True})
    raw = p.client().chat.completions.with_raw_response.create(
        model="sim-echo", messages=MSG, response_format=person_schema(), extra_headers={"x-sim-output": b64(bad)})
    findings = json.loads(raw.headers["x-gapwatch-findings"])
    assert findings[0]["detector"] == "schema" and findings[0]["category"] == "schema"


def test_stream_block_sends_text_up_to_failure(start_proxy, sim):
    p = start(start_proxy, sim)
    got, finish = [], []
    with pytest.raises(openai.APIError) as ei:
        for chunk in p.client().chat.completions.create(
                model="sim-json-invalid", messages=MSG, stream=True, response_format={"type": "json_object"},
                extra_headers={"x-sim-chunk-chars": "5"}):
            for c in chunk.choices:
                got.append(c.delta.content or "")
                finish += [c.finish_reason] if c.finish_reason else []
    assert ei.value.body["code"] == "output_blocked"
    text = "".join(got)
    # the prefix before the missing comma arrived; nothing after the failure point
    assert text.startswith('{"name": "Ada Lovelace"') and "known_for" not in text
    assert finish == ["content_filter"]


def test_stream_block_fully_buffered_sends_nothing(start_proxy, sim):
    p = start(start_proxy, sim, buffer="full")
    got = []
    with pytest.raises(openai.APIError):
        for chunk in p.client().chat.completions.create(
                model="sim-json-invalid", messages=MSG, stream=True, response_format={"type": "json_object"}):
            got.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(got) == ""


def test_retry_until_valid_streaming_buffered_and_not(start_proxy, sim):
    p = start(start_proxy, sim, action="retry", buffer="full")
    outputs = ['{"name": "Ada" "born": 1815}', json.dumps({"name": "Ada Lovelace", "born": 1815,
                                                           "occupation": "m", "known_for": [], "verified": True})]
    for i, stream in enumerate((False, True)):
        hdr = {"x-sim-sequence": f"schema-retry-{i}", "x-sim-outputs": b64(json.dumps(outputs))}
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in p.client().chat.completions.create(
                model="sim-echo", messages=MSG, stream=True, response_format=person_schema(), extra_headers=hdr)
                if c.choices)
        else:
            text = p.client().chat.completions.create(model="sim-echo", messages=MSG, response_format=person_schema(),
                                                      extra_headers=hdr).choices[0].message.content
        assert json.loads(text)["born"] == 1815


def test_tool_call_arguments_validated(start_proxy, sim):
    p = start(start_proxy, sim)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
        "required": ["city"], "additionalProperties": False}}}]
    client = p.client()
    ok = client.chat.completions.create(model="sim-echo", messages=MSG, tools=tools,
                                        extra_headers={"x-sim-output": b64('{"city": "Oslo", "unit": "C"}'),
                                                       "x-sim-tool-call": "get_weather"})
    assert ok.choices[0].message.tool_calls[0].function.name == "get_weather"
    for name, args in (("get_weather", '{"city": "Oslo", "unit": "K"}'), ("get_weather", '{"town": "Oslo"}'),
                       ("delete_everything", "{}")):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="sim-echo", messages=MSG, tools=tools,
                                           extra_headers={"x-sim-output": b64(args), "x-sim-tool-call": name})
    calls = [{"name": "get_weather", "arguments": '{"city": "Oslo"}'},
             {"name": "get_weather", "arguments": '{"city": 5}'}]
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="sim-echo", messages=MSG, tools=tools, stream=True,
                                                extra_headers={"x-sim-tool-calls": b64(json.dumps(calls))}):
            pass


def test_responses_api_text_format(start_proxy, sim):
    p = start(start_proxy, sim)
    fmt = {"format": {"type": "json_schema", "name": "Person", "schema": person_schema()["json_schema"]["schema"],
                      "strict": True}}
    with pytest.raises(openai.BadRequestError):
        p.client().responses.create(model="sim-echo", input="q", text=fmt,
                                    extra_headers={"x-sim-output": b64('{"name": 1}')})
