"""Policy actions end to end with the official SDK: annotate, redact, block, retry, shadow."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import b64, eventually, metric_value, proxy_config

CODENAME = {"regex": {"action": "block", "patterns": {"codename": "(?i)blue\\s*falcon"}}}


def policy(sim, detectors, **extra):
    return proxy_config(sim.url, policies={"default": {"detectors": detectors, **extra}})


def out(text):
    return {"x-sim-output": b64(text)}


def stream_text(client, headers, **kw):
    parts, finish = [], None
    for chunk in client.chat.completions.create(model="sim-echo", stream=True, extra_headers=headers,
                                                messages=[{"role": "user", "content": "q"}], **kw):
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return "".join(parts), finish


def test_annotate_non_streaming_header(start_proxy, sim):
    p = start_proxy(policy(sim, {"regex": {"action": "annotate", "patterns": {"codename": "blue falcon"}}}))
    raw = p.client().chat.completions.with_raw_response.create(
        model="sim-echo", messages=[{"role": "user", "content": "q"}], extra_headers=out("it is blue falcon."))
    summary = json.loads(raw.headers["x-gapwatch-findings"])
    assert summary == [{"detector": "regex", "category": "codename", "severity": "high", "action": "annotate"}]
    assert raw.parse().choices[0].message.content == "it is blue falcon."


def test_annotate_streaming_comment_lines(start_proxy, sim):
    p = start_proxy(policy(sim, {"regex": {"action": "annotate", "patterns": {"codename": "blue falcon"}}}))
    body = {"model": "sim-echo", "stream": True, "messages": [{"role": "user", "content": "q"}]}
    raw = httpx.post(f"{p.base_url}/chat/completions", json=body, headers=out("it is blue falcon, ok")).text
    assert ': gapwatch {"findings":[{"detector":"regex","category":"codename"' in raw
    text, finish = stream_text(p.client(), out("it is blue falcon, ok"))
    assert text == "it is blue falcon, ok" and finish == "stop"


@pytest.mark.parametrize("chunk", ["1", "3", "50"])
def test_redact_streaming_split_across_chunks(start_proxy, sim, chunk):
    det = {"regex": {"action": "redact", "patterns": {"codename": "(?i)blue\\s*falcon"}}}
    p = start_proxy(policy(sim, det))
    secret_text = "Project Blue Falcon launches. Also blue  falcon again."
    text, finish = stream_text(p.client(), {**out(secret_text), "x-sim-chunk-chars": chunk})
    assert text == "Project [REDACTED:codename] launches. Also [REDACTED:codename] again."
    assert finish == "stop"


def test_redact_non_streaming(start_proxy, sim):
    p = start_proxy(policy(sim, {"regex": {"action": "redact", "patterns": {"codename": "blue falcon"}}}))
    r = p.client().chat.completions.create(model="sim-echo", messages=[{"role": "user", "content": "q"}],
                                           extra_headers=out("say blue falcon now"))
    assert r.choices[0].message.content == "say [REDACTED:codename] now"


def test_block_non_streaming(start_proxy, sim):
    p = start_proxy(policy(sim, CODENAME))
    with pytest.raises(openai.BadRequestError) as ei:
        p.client().chat.completions.create(model="sim-echo", messages=[{"role": "user", "content": "q"}],
                                           extra_headers=out("the blue falcon plan"))
    err = ei.value.body
    assert err["code"] == "output_blocked" and err["detectors"] == ["regex"]
    assert "falcon" not in json.dumps(err).lower()


def test_block_streaming_ends_with_content_filter_and_error(start_proxy, sim):
    p = start_proxy(policy(sim, CODENAME))
    seen, finishes = [], []
    with pytest.raises(openai.APIError) as ei:
        for chunk in p.client().chat.completions.create(
                model="sim-echo", stream=True, messages=[{"role": "user", "content": "q"}],
                extra_headers={**out("harmless start. then blue falcon appears. tail"), "x-sim-chunk-chars": "2"}):
            for c in chunk.choices:
                seen.append(c.delta.content or "")
                if c.finish_reason:
                    finishes.append(c.finish_reason)
    assert finishes == ["content_filter"]
    assert ei.value.body["code"] == "output_blocked"
    assert "falcon" not in "".join(seen).lower() and "blue" not in "".join(seen).lower()


def test_block_tool_call(start_proxy, sim):
    det = {"regex": {"action": "block", "patterns": {"rm": "rm\\s+-rf"}}}
    p = start_proxy(policy(sim, det))
    tools = [{"type": "function", "function": {"name": "shell", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError):
        p.client().chat.completions.create(model="sim-echo", tools=tools, messages=[{"role": "user", "content": "q"}],
                                           extra_headers={**out('{"cmd": "rm -rf /"}'), "x-sim-tool-call": "shell"})


def test_retry_non_streaming_then_success(start_proxy, sim):
    det = {"regex": {"action": "retry", "max_attempts": 3, "patterns": {"bad": "BAD"}}}
    p = start_proxy(policy(sim, det))
    seq = {"x-sim-sequence": "retry-1", "x-sim-outputs": b64(json.dumps(["BAD one", "BAD two", "good three"]))}
    r = p.client().chat.completions.create(model="sim-echo", messages=[{"role": "user", "content": "q"}],
                                           extra_headers=seq)
    assert r.choices[0].message.content == "good three"


def test_retry_exhausted_falls_back_to_block(start_proxy, sim):
    det = {"regex": {"action": "retry", "max_attempts": 2, "then": "block", "patterns": {"bad": "BAD"}}}
    p = start_proxy(policy(sim, det))
    seq = {"x-sim-sequence": "retry-2", "x-sim-outputs": b64(json.dumps(["BAD", "BAD", "fine"]))}
    with pytest.raises(openai.BadRequestError):
        p.client().chat.completions.create(model="sim-echo", messages=[{"role": "user", "content": "q"}],
                                           extra_headers=seq)


def test_retry_buffered_stream(start_proxy, sim):
    det = {"regex": {"action": "retry", "max_attempts": 3, "patterns": {"bad": "BAD"}}}
    p = start_proxy(policy(sim, det, buffer="full"))
    seq = {"x-sim-sequence": "retry-3", "x-sim-outputs": b64(json.dumps(["BAD answer", "clean answer"]))}
    text, finish = stream_text(p.client(), seq)
    assert text == "clean answer" and finish == "stop"


def test_shadow_mode_changes_nothing(start_proxy, sim):
    p = start_proxy(policy(sim, CODENAME, shadow=True))
    text, finish = stream_text(p.client(), out("the blue falcon plan"))
    assert text == "the blue falcon plan" and finish == "stop"
    assert eventually(lambda: metric_value(p.metrics.registry, "gapwatch_findings_total",
                                           detector="regex", action="observe") == 1)


def test_banned_substrings_and_max_chars(start_proxy, sim):
    det = {"banned_substrings": {"action": "redact", "substrings": ["Acme Internal"]},
           "max_output_chars": {"action": "block", "max_chars": 40}}
    p = start_proxy(policy(sim, det))
    text, _ = stream_text(p.client(), out("see ACME internal docs"))
    assert text == "see [REDACTED:banned] docs"
    with pytest.raises(openai.APIError):
        stream_text(p.client(), out("x" * 100))


def test_redact_responses_api_streaming_and_not(start_proxy, sim):
    det = {"regex": {"action": "redact", "patterns": {"codename": "blue falcon"}}}
    p = start_proxy(policy(sim, det))
    client = p.client()
    hdr = {**out("the blue falcon flies"), "x-sim-chunk-chars": "2"}
    r = client.responses.create(model="sim-echo", input="q", extra_headers=hdr)
    assert r.output_text == "the [REDACTED:codename] flies"
    deltas, final = [], None
    for ev in client.responses.create(model="sim-echo", input="q", stream=True, extra_headers=hdr):
        if ev.type == "response.output_text.delta":
            deltas.append(ev.delta)
        elif ev.type == "response.completed":
            final = ev.response
    assert "".join(deltas) == "the [REDACTED:codename] flies"
    assert final is not None and final.output_text == "the [REDACTED:codename] flies"


def test_redact_completions_streaming(start_proxy, sim):
    det = {"regex": {"action": "redact", "patterns": {"codename": "blue falcon"}}}
    p = start_proxy(policy(sim, det))
    text = "".join(c.choices[0].text for c in p.client().completions.create(
        model="sim-echo", prompt="q", stream=True, extra_headers={**out("a blue falcon b"), "x-sim-chunk-chars": "3"})
        if c.choices)
    assert text == "a [REDACTED:codename] b"


def test_block_responses_api_stream(start_proxy, sim):
    p = start_proxy(policy(sim, CODENAME))
    with pytest.raises(openai.APIError) as ei:
        for _ in p.client().responses.create(model="sim-echo", input="q", stream=True,
                                             extra_headers=out("x blue falcon y")):
            pass
    assert "output_blocked" in str(ei.value.body) or "blocked" in str(ei.value)


def test_zero_config_serve_subprocess(sim):
    import subprocess
    import sys

    from tests.servers import free_port, wait_http

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--upstream", f"{sim.url}/v1",
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-user", max_retries=0)
        r = client.chat.completions.create(model="sim-echo", messages=[{"role": "user", "content": "zero config"}])
        assert r.choices[0].message.content == "zero config"
        last = httpx.get(f"{sim.url}/v1/sim/requests", params={"n": 1}).json()["data"][-1]
        assert ["authorization", "Bearer sk-user"] in [[k.lower(), v] for k, v in last["headers"]]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_stream_with_detectors_keeps_upstream_headers(start_proxy, sim):
    p = start_proxy(policy(sim, {"regex": {"action": "redact", "patterns": {"x": "zzz"}}}))
    r = httpx.post(f"{p.base_url}/chat/completions", headers=out("hello"),
                   json={"model": "sim-echo", "stream": True, "messages": [{"role": "user", "content": "q"}]})
    direct = httpx.post(f"{sim.url}/v1/chat/completions", headers=out("hello"),
                        json={"model": "sim-echo", "stream": True, "messages": [{"role": "user", "content": "q"}]})
    for h in ("openai-processing-ms", "x-ratelimit-remaining-requests"):
        assert r.headers[h] == direct.headers[h]
    assert r.headers["content-type"].startswith("text/event-stream")
