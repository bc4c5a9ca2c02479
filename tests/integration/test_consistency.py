"""Consistency re-asks: sampled temperature-0 requests are asked again in the background."""

from __future__ import annotations

import json
import time

import httpx

from tests.conftest import b64, eventually, metric_value, proxy_config


def test_consistency_agree_and_disagree(start_proxy, sim):
    cfg = proxy_config(sim.url, policies={"default": {"consistency": {"enabled": True, "sample_rate": 1.0}}})
    p = start_proxy(cfg)
    client = p.client()
    msgs = [{"role": "user", "content": "same answer twice"}]
    r = client.chat.completions.create(model="sim-echo", messages=msgs, temperature=0)
    assert r.choices[0].message.content == "same answer twice"
    reg = p.metrics.registry
    assert eventually(lambda: metric_value(reg, "gapwatch_consistency_checks_total", result="agree") == 1)
    # an upstream whose second answer differs: the re-ask uses the same sequence id
    seq = {"x-sim-sequence": "consistency-1", "x-sim-outputs": b64(json.dumps(["first", "second"]))}
    client.chat.completions.create(model="sim-echo", messages=msgs, temperature=0, extra_headers=seq)
    assert eventually(lambda: metric_value(reg, "gapwatch_consistency_checks_total", result="disagree") == 1)
    # JSON answers compare structurally
    seq = {"x-sim-sequence": "consistency-2", "x-sim-outputs": b64(json.dumps(['{"a": 1, "b": 2}',
                                                                               '{"b":2,"a":1}']))}
    client.chat.completions.create(model="sim-echo", messages=msgs, temperature=0, extra_headers=seq)
    assert eventually(lambda: metric_value(reg, "gapwatch_consistency_checks_total", result="agree") == 2)
    # not sampled: temperature above 0, or streaming
    httpx.delete(f"{sim.url}/v1/sim/requests")
    client.chat.completions.create(model="sim-echo", messages=msgs, temperature=0.7)
    time.sleep(0.3)
    assert len(httpx.get(f"{sim.url}/v1/sim/requests", params={"n": 256}).json()["data"]) == 1
