"""The simulator's behaviour models and its identity switch, driven by the official OpenAI SDK
over loopback: what ``gapwatch eval`` and the model-change tests rely on."""

from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import openai
import pytest

from proxy.simulate import (
    BEHAVIOUR_MODELS,
    CONFIDENCE_LEVELS,
    OVERCONFIDENCE,
    SCENARIO_OUTPUTS,
    SIM_MODELS,
    WRONG_ANSWER,
    RunningSimulator,
    behaviour_answer,
    serve_in_thread,
)

SYSTEM = "Answer from the note. The code for item 4 is QX-44."


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    with serve_in_thread() as running:
        yield running


@pytest.fixture
def client(sim: RunningSimulator) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0, timeout=10) as c:
        yield c


def ask(client: openai.OpenAI, model: str, question: str, **kw: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=model, messages=[{"role": "system", "content": SYSTEM},
                                                                 {"role": "user", "content": question}], **kw)


def test_calibrated_and_overconfident_share_answers_not_confidence(client: openai.OpenAI) -> None:
    assert set(BEHAVIOUR_MODELS) <= set(SIM_MODELS)
    levels, right = [], []
    for i in range(40):
        q = f"What is the code for item 4? (asked {i})"
        cal = ask(client, "sim-calibrated", q, logprobs=True)
        over = ask(client, "sim-overconfident", q, logprobs=True, stream=False)
        assert cal.choices[0].message.content == over.choices[0].message.content
        text = cal.choices[0].message.content or ""
        assert text in ('Based on the context you provided: "The code for item 4 is QX-44."', WRONG_ANSWER)
        lp_cal = {round(t.logprob, 6) for t in cal.choices[0].logprobs.content}
        lp_over = {round(t.logprob, 6) for t in over.choices[0].logprobs.content}
        assert len(lp_cal) == 1 and lp_over == {round(math.log(OVERCONFIDENCE), 6)}
        level = math.exp(lp_cal.pop())
        assert min(abs(level - c) for c in CONFIDENCE_LEVELS) < 1e-5
        levels.append(level)
        right.append("QX-44" in text)
    # right more often where surer (the simulator's promise, over a few questions)
    hi = [ok for c, ok in zip(levels, right, strict=True) if c >= 0.7]
    lo = [ok for c, ok in zip(levels, right, strict=True) if c <= 0.3]
    assert hi and lo and sum(hi) / len(hi) > sum(lo) / len(lo)


def test_verbalised_confidence_and_streamed_logprobs(client: openai.OpenAI) -> None:
    q = "What is the code for item 4?"
    text, lp = behaviour_answer("sim-calibrated", SYSTEM, SYSTEM, q)
    said = ask(client, "sim-calibrated", q + "\n\nEnd with a line 'Confidence: N%'.").choices[0].message.content
    assert lp is not None and said == f"{text}\n\nConfidence: {round(100 * math.exp(lp))}%"
    over = ask(client, "sim-overconfident", q + "\nConfidence: ?").choices[0].message.content or ""
    assert over.endswith("Confidence: 97%")
    with client.chat.completions.create(model="sim-calibrated", stream=True, logprobs=True, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]) as s:
        chunks = [c for c in s if c.choices and c.choices[0].delta.content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert {round(t.logprob, 6) for c in chunks for t in c.choices[0].logprobs.content} == {round(lp, 6)}


def test_brittle_answers_by_the_position_of_its_question_word(client: openai.OpenAI) -> None:
    grounded = ask(client, "sim-grounded", "What is the code?").choices[0].message.content
    assert ask(client, "sim-brittle", "What is the code?").choices[0].message.content == grounded
    assert ask(client, "sim-brittle", "Could you say what the code is?").choices[0].message.content == grounded
    for moved in ("For item 4, what is the code?", "Hello there. What is the code?", "Wht is the code?"):
        assert ask(client, "sim-brittle", moved).choices[0].message.content == SCENARIO_OUTPUTS["sim-ungrounded"]


def test_identity_switch_mid_run(client: openai.OpenAI, sim: RunningSimulator) -> None:
    url = f"{sim.base_url}/sim/identity"
    assert httpx.get(url).json() == {"system_fingerprint": "fp_sim", "model_suffix": "", "aliases": {}}
    assert ask(client, "sim-echo", "hi").system_fingerprint == "fp_sim"
    got = httpx.post(url, json={"system_fingerprint": "fp_2025", "model_suffix": "-2025-06-01",
                                "aliases": {"sim-prod": "sim-refusal"}}).json()
    assert got == {"system_fingerprint": "fp_2025", "model_suffix": "-2025-06-01",
                   "aliases": {"sim-prod": "sim-refusal"}}
    r = ask(client, "sim-echo", "hi")
    assert (r.system_fingerprint, r.model) == ("fp_2025", "sim-echo-2025-06-01")
    with client.chat.completions.create(model="sim-echo", stream=True, stream_options={"include_usage": True},
                                        messages=[{"role": "user", "content": "hi"}]) as s:
        chunks = list(s)
    assert {c.system_fingerprint for c in chunks} == {"fp_2025"} and {c.model for c in chunks} == {
        "sim-echo-2025-06-01"}
    c = client.completions.create(model="sim-echo", prompt="hi")
    assert (c.system_fingerprint, c.model) == ("fp_2025", "sim-echo-2025-06-01")
    aliased = ask(client, "sim-prod", "hi")
    assert aliased.choices[0].message.content == SCENARIO_OUTPUTS["sim-refusal"]
    assert aliased.model == "sim-refusal-2025-06-01"
    # a per-request fingerprint header wins; null restores the defaults; bad input is a 400
    hdr = client.chat.completions.with_raw_response.create(
        model="sim-echo", messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-sim-system-fingerprint": "fp_header"}).parse()
    assert hdr.system_fingerprint == "fp_header"
    httpx.post(url, json={"system_fingerprint": None, "model_suffix": None, "aliases": None}).raise_for_status()
    assert httpx.get(url).json() == {"system_fingerprint": "fp_sim", "model_suffix": "", "aliases": {}}
    for bad in ({"system_fingerprint": 3}, {"nope": "x"}, {"aliases": {"a": 1}}, [1]):
        r = httpx.post(url, json=bad)
        assert r.status_code == 400 and "system_fingerprint" in r.json()["error"]["message"]
    assert httpx.delete(url).status_code == 405
