"""The demo traffic generator, run briefly against the simulated upstream."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import httpx
import httpx2
import openai
import pytest

from proxy.simulate import SIM_MODELS, RunningSimulator, serve_in_thread
from proxy.traffic import TRAFFIC_MIX, TrafficStats, build_request, classify_error, generate


@pytest.fixture(scope="module")
def sim() -> Iterator[RunningSimulator]:
    with serve_in_thread() as running:
        yield running


async def test_generate_counts_are_consistent(sim: RunningSimulator) -> None:
    stop = asyncio.Event()
    stats = TrafficStats()
    task = asyncio.create_task(
        generate(sim.base_url, "sk-demo", stop, stats, concurrency=4, rate_per_second=60, seed=3)
    )
    await asyncio.sleep(1.0)
    stop.set()
    t0 = time.perf_counter()
    await asyncio.wait_for(task, timeout=5)
    assert time.perf_counter() - t0 < 1.5, "stops promptly"
    assert 20 <= stats.sent <= 80  # about 60 per second
    assert stats.ok > 0
    assert stats.sent == stats.ok + stats.errors + stats.blocked + stats.cancelled
    assert sum(stats.by_status.values()) == stats.sent - stats.cancelled
    assert stats.by_status.get(200, 0) == stats.ok
    assert set(stats.by_status) <= {200, 500}
    assert stats.snapshot()["sent"] == stats.sent

    async with httpx.AsyncClient() as c:
        seen = (await c.get(f"{sim.base_url}/sim/requests")).json()["data"]
    streamed = [r["body"]["stream"] for r in seen if r["path"] == "/v1/chat/completions"]
    assert True in streamed and False in streamed


async def test_generate_survives_unreachable_upstream() -> None:
    stop = asyncio.Event()
    stats = TrafficStats()
    task = asyncio.create_task(generate("http://127.0.0.1:9/v1", "k", stop, stats, rate_per_second=50))
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(task, timeout=3)
    assert stats.sent > 0 and stats.errors == stats.sent - stats.cancelled
    assert set(stats.by_status) == {0}


def test_mix_uses_only_sim_models_and_mostly_clean() -> None:
    assert {m for m, _ in TRAFFIC_MIX} <= set(SIM_MODELS)
    rng = random.Random(1)
    reqs = [build_request(rng) for _ in range(2000)]
    clean = sum(r["model"] in {"sim-clean", "sim-echo", "sim-grounded"} for r in reqs)
    assert clean > 0.5 * len(reqs)
    assert 0.4 < sum(r["stream"] for r in reqs) / len(reqs) < 0.6
    assert all(r["messages"][0]["role"] == "system" and "Context:" in r["messages"][0]["content"] for r in reqs)


def test_classify_error() -> None:
    # The SDK's exceptions carry httpx2 objects and, as ``body``, the inner error object.
    request = httpx2.Request("POST", "http://x/v1/chat/completions")
    blocked_stream = openai.APIError("blocked", request, body={"code": "output_blocked", "message": "blocked"})
    assert classify_error(blocked_stream) == ("blocked", 200)
    response = httpx2.Response(422, request=request)
    body = {"code": "output_blocked", "message": "m", "type": "invalid_request_error", "detectors": ["pii"]}
    blocked = openai.UnprocessableEntityError("blocked", response=response, body=body)
    assert classify_error(blocked) == ("blocked", 422)
    server = openai.InternalServerError("boom", response=httpx2.Response(500, request=request), body=None)
    assert classify_error(server) == ("error", 500)
    assert classify_error(openai.APIConnectionError(request=request)) == ("error", 0)
