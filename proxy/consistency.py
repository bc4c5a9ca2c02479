"""Consistency: for a sampled fraction of deterministic (temperature 0) non-streaming
requests, ask the upstream the same question again in the background and compare the answers.

It costs tokens, so it is off by default (``policies.<name>.consistency``). The second request
never delays the client: it starts after the client has its response, runs as a bounded
background task, and its result only feeds metrics (agreement rate per route and model).
Answers are compared as JSON structures when both parse, else as normalised text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from typing import Any

import orjson

from proxy import deltas
from proxy.config import ConsistencyConfig
from proxy.exchange import Exchange
from proxy.metrics import Metrics
from proxy.upstream import Upstream

log = logging.getLogger("gapwatch.consistency")
_SPACE = re.compile(r"\s+")


def answer_of(endpoint: str, obj: dict[str, Any]) -> dict[str, str]:
    """Channel key -> output text of a whole non-streaming body."""
    if endpoint == "responses":
        ex = deltas.responses_body(obj)
    elif endpoint == "completions":
        ex = deltas.completion_chunk(obj)
    else:
        ex = deltas.chat_body(obj)
    out: dict[str, str] = {}
    for ch, text in ex.pieces:
        out[ch.key] = out.get(ch.key, "") + text
    return out


def _canonical(text: str) -> Any:
    try:
        return ("json", orjson.loads(text))
    except orjson.JSONDecodeError:
        return ("text", _SPACE.sub(" ", text).strip().casefold())


def agree(a: dict[str, str], b: dict[str, str]) -> bool:
    """Same channels with the same content: JSON compared structurally, text normalised."""
    return a.keys() == b.keys() and all(_canonical(a[k]) == _canonical(b[k]) for k in a)


def eligible(ex: Exchange, cfg: ConsistencyConfig, rng: random.Random) -> bool:
    body = ex.body or {}
    if not cfg.enabled or ex.stream or ex.endpoint not in ("chat", "completions", "responses"):
        return False
    if body.get("temperature") != 0 or (body.get("n") or 1) != 1:
        return False
    return rng.random() < cfg.sample_rate


class ConsistencyChecker:
    """Owns the background re-asks: bounded in number, cancelled at shutdown."""

    def __init__(self, metrics: Metrics, seed: int | None = None) -> None:
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self.rng = random.Random(seed)

    def schedule(self, ex: Exchange, upstream: Upstream, url: str, headers: dict[str, str],
                 body: bytes, first: dict[str, str], limit: int = 8) -> bool:
        if len(self._tasks) >= limit:
            self._metrics.consistency.labels(ex.route, ex.model_label, "skipped").inc()
            return False
        task = asyncio.get_running_loop().create_task(self._check(ex, upstream, url, headers, body, first))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _check(self, ex: Exchange, upstream: Upstream, url: str, headers: dict[str, str],
                     body: bytes, first: dict[str, str]) -> None:
        result = "error"
        try:
            async with asyncio.timeout(upstream.config.first_byte_timeout_seconds):
                resp = await upstream.request("POST", url, headers, body)
                try:
                    content = await resp.aread()
                finally:
                    resp.close()
            if resp.status_code == 200:
                obj = orjson.loads(content)
                if isinstance(obj, dict):
                    result = "agree" if agree(first, answer_of(ex.endpoint, obj)) else "disagree"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a background check must never escape its task
            log.debug("consistency re-ask failed: %s", type(exc).__name__)
        self._metrics.consistency.labels(ex.route, ex.model_label, result).inc()

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t
