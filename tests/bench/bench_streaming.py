"""Streaming enforcement: what an enforcing policy costs a paced stream, as the app feels it.

    .venv/bin/python -m tests.bench.bench_streaming          (also part of ``make bench``)

A paced upstream (the simulator, 4-character chunks every 20 ms and every 5 ms: about 50 and
200 tokens/s) streams three answers: 1 KB of ordinary prose with nothing to find, the same
with a credential in the middle, and a 300-character answer. Four targets side by side in one
run, in rotating order: direct to the simulator, through gapwatch with no detectors, with the
zero-config default policy, and with a strict policy (pii and secrets redact; injection,
system_prompt_leak and schema block). Several streams of one target run at once per round.

Reported per cell, against direct: added time to first token (first non-empty content delta)
at p50 and p99, added p99 gap between consecutive events, the event count (a faithful relay
sends exactly the upstream's events), whether the client's text equals the upstream's (the
secret answer must not: it is redacted), and the proxy's CPU per stream.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from tests.bench import proxy_core as pc

PROSE_1K = (
    "Thanks for the question. The short answer is that the new schedule works well for most teams, "
    "but it needs a little planning in the first two weeks. Start by moving the weekly review to "
    "Tuesday morning, since Monday tends to fill up with support follow-ups. Keep the meeting to "
    "thirty minutes and share the agenda the day before, so people can add their own items. "
    "For the rollout itself, I would pick one team as a pilot, ask them to keep notes on what "
    "slows them down, and check in after the first sprint. Most of the problems we saw last year "
    "came from unclear ownership rather than from the tools, so write down who decides what. "
    "If the pilot goes well, extend it to the other three teams in March. Budget about four hours "
    "per team for the handover, and remember that the holiday week will push everything back a "
    "little. Finally, measure the result: compare cycle time and the number of reopened tickets "
    "before and after, and share the numbers with everyone, good or bad. That keeps the change honest."
)
SECRET = "sk-proj-" + "Zx8Qw2Er5Ty7Ui9Op1As3Df6Gh4Jk0Lm"
WITH_SECRET = PROSE_1K[:500] + f" The deploy key is {SECRET} for now. " + PROSE_1K[500:]
SHORT_300 = PROSE_1K[:300]
ANSWERS = {"1 KB prose": PROSE_1K[:1024], "1 KB + secret": WITH_SECRET[:1024 + 40], "300 chars": SHORT_300}
PACES_MS = (20, 5)
STREAMS_PER_BATCH = 4

POLICIES: dict[str, Any] = {
    "none": {"detectors": {}},
    "strict": {"detectors": {
        "pii": {"action": "redact"}, "secrets": {"action": "redact"}, "injection": {"action": "block"},
        "system_prompt_leak": {"action": "block"}, "schema": {"action": "block"}}},
}
TARGETS = ("direct", "none", "default", "strict")


def _config(sim: pc.Server, port: int) -> dict[str, Any]:
    cfg = pc.proxy_config(sim, port, [("bench-none", "none"), ("bench-strict", "strict"), ("*", "default")],
                          POLICIES)
    # "default": no policies entry of that name, so it is the zero-config default policy
    cfg["routes"][-1].pop("policy")
    return cfg


@dataclass
class Stream:
    ttft_ms: float
    gaps_ms: list[float]
    events: int
    text: str


@dataclass
class Cell:
    streams: list[Stream] = field(default_factory=list)
    cpu_s: float = 0.0

    def ttft(self, p: float) -> float:
        return pc.pct([s.ttft_ms for s in self.streams], p)

    def gap(self, p: float) -> float:
        return pc.pct([g for s in self.streams for g in s.gaps_ms], p)

    @property
    def events(self) -> set[int]:
        return {s.events for s in self.streams}


def _body(model: str) -> bytes:
    return orjson.dumps({"model": model, "stream": True,
                         "messages": [{"role": "system", "content": "You are a helpful planning assistant."},
                                      {"role": "user", "content": "How should we roll out the new schedule?"}]})


async def _one(client: httpx.AsyncClient, url: str, model: str, answer: str, pace_ms: int) -> Stream:
    headers = {"authorization": "Bearer bench", "x-sim-chunk-chars": "4", "x-sim-delay-ms": str(pace_ms),
               "x-sim-output": base64.b64encode(answer.encode()).decode()}
    t0 = time.perf_counter()
    arrivals: list[float] = []
    ttft = None
    texts: list[str] = []
    buf = b""
    async with client.stream("POST", url, content=_body(model), headers=headers) as r:
        async for chunk in r.aiter_raw():
            now = time.perf_counter()
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if not ev.startswith(b"data: "):
                    continue  # comments: not events a client sees
                arrivals.append(now)
                if ev == b"data: [DONE]":
                    continue
                obj = orjson.loads(ev[6:])
                for ch in obj.get("choices") or ():
                    piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        texts.append(piece)
                        if ttft is None:
                            ttft = now - t0
    gaps = [1e3 * (b - a) for a, b in itertools.pairwise(arrivals)]
    return Stream(1e3 * (ttft if ttft is not None else float("nan")), gaps, len(arrivals), "".join(texts))


async def _batch(url: str, model: str, answer: str, pace_ms: int) -> list[Stream]:
    async with httpx.AsyncClient(timeout=60.0) as client:
        return list(await asyncio.gather(*(_one(client, url, model, answer, pace_ms)
                                           for _ in range(STREAMS_PER_BATCH))))


def _measure(sim: pc.Server, proxy: pc.Server, rounds: int) -> dict[tuple[str, int, str], Cell]:
    cells: dict[tuple[str, int, str], Cell] = {}
    for label, answer in ANSWERS.items():
        for pace in PACES_MS:
            for r in range(rounds):
                order = list(TARGETS[r % len(TARGETS):] + TARGETS[: r % len(TARGETS)])
                for target in order:
                    url = f"{sim.base if target == 'direct' else proxy.base}/v1/chat/completions"
                    model = {"direct": "sim-echo", "none": "bench-none", "strict": "bench-strict"}.get(target,
                                                                                                   "bench-default")
                    cpu0 = proxy.cpu()
                    streams = asyncio.run(_batch(url, model, answer, pace))
                    cell = cells.setdefault((label, pace, target), Cell())
                    cell.cpu_s += proxy.cpu() - cpu0
                    cell.streams += streams
    return cells


def _report(cells: dict[tuple[str, int, str], Cell]) -> dict[str, float]:
    rows = []
    headline: dict[str, float] = {}
    for label, answer in ANSWERS.items():
        for pace in PACES_MS:
            direct = cells[(label, pace, "direct")]
            for target in TARGETS:
                c = cells[(label, pace, target)]
                texts = {s.text for s in c.streams}
                same_text = texts == {answer}
                cpu_ms = 1e3 * c.cpu_s / len(c.streams)
                added = (c.ttft(50) - direct.ttft(50), c.ttft(99) - direct.ttft(99), c.gap(99) - direct.gap(99))
                rows.append([label, f"{pace} ms", target,
                             pc.fmt(c.ttft(50), 1), pc.fmt(added[0], 1) if target != "direct" else "-",
                             pc.fmt(added[1], 1) if target != "direct" else "-",
                             pc.fmt(c.gap(99), 1), pc.fmt(added[2], 1) if target != "direct" else "-",
                             "/".join(str(n) for n in sorted(c.events)),
                             "yes" if c.events == direct.events else "NO",
                             "same" if same_text else ("redacted" if SECRET not in "".join(texts) else "LEAK"),
                             pc.fmt(cpu_ms, 2) if target != "direct" else "-"])
                key = f"stream.{label.replace(' ', '_')}.{pace}ms.{target}"
                headline[f"{key}.added_ttft_p50_ms"] = added[0]
                headline[f"{key}.added_gap_p99_ms"] = added[2]
                headline[f"{key}.cpu_ms"] = cpu_ms
    print(pc.table(["answer", "pace", "target", "TTFT p50 ms", "+TTFT p50", "+TTFT p99", "gap p99 ms",
                    "+gap p99", "events", "= direct", "text", "proxy CPU ms/stream"], rows))
    return headline


def _verdict(cells: dict[tuple[str, int, str], Cell]) -> None:
    """The targets: on clean prose the default and strict policies add less than one chunk
    interval to TTFT and to the p99 gap, and send exactly direct's events."""
    misses = []
    for label in ("1 KB prose", "300 chars"):
        for pace in PACES_MS:
            direct = cells[(label, pace, "direct")]
            for target in ("default", "strict"):
                c = cells[(label, pace, target)]
                for what, value in (("+TTFT p99", c.ttft(99) - direct.ttft(99)),
                                    ("+gap p99", c.gap(99) - direct.gap(99))):
                    if value >= pace:
                        misses.append(f"{label}, {pace} ms, {target}: {what} {value:.1f} ms >= {pace} ms")
                if c.events != direct.events:
                    misses.append(f"{label}, {pace} ms, {target}: events {sorted(c.events)} != {sorted(direct.events)}")
    print("targets (clean prose, default and strict: added TTFT p99 and p99 gap < one chunk interval; "
          "event count = direct): " + ("all met" if not misses else "MISSED"))
    for m in misses:
        print(f"  - {m}")


def main() -> dict[str, float]:
    rounds = max(1, int(os.environ.get("GAPWATCH_STREAM_ROUNDS", pc.ROUNDS)))
    print("== streaming enforcement: paced streams, direct vs gapwatch (none / default / strict) ==")
    with pc.workdir("gapwatch-stream-bench-") as tmp:
        sim = pc.start_simulator(tmp)
        try:
            proxy = pc.start_proxy(_config(sim, pc.free_port()), tmp)
        except BaseException:
            sim.stop()
            raise
        try:
            print(f"simulator: {sim.command}")
            print(f"proxy:     {proxy.command}")
            print("           routes: bench-none -> no detectors; bench-strict -> pii+secrets redact, injection, "
                  "system_prompt_leak, schema block; anything else -> the zero-config default policy")
            print(f"load:      {STREAMS_PER_BATCH} concurrent streams per batch (httpx), {rounds} rounds per cell, "
                  "target order rotating; 4-char chunks every 20 ms and 5 ms (x-sim-delay-ms)")
            print(f"answers:   {', '.join(f'{k} ({len(v)} chars)' for k, v in ANSWERS.items())}")
            print()
            for target in TARGETS[1:]:  # warm-up: imports, first-call paths, connection pools
                asyncio.run(_batch(f"{proxy.base}/v1/chat/completions", f"bench-{target}", SHORT_300[:40], 1))
            cells = _measure(sim, proxy, rounds)
            headline = _report(cells)
            print()
            _verdict(cells)
        finally:
            proxy.stop()
            sim.stop()
    return headline


if __name__ == "__main__":
    main()
