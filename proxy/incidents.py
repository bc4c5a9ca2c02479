"""Incident records: one structured JSON record per finding the policy acted on.

Written off the critical path: ``submit`` only appends to a bounded queue (a full queue drops
and counts, never blocks); a background task writes to the sinks. Records carry masked
evidence only (detectors mask it), never the request or output text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

import orjson

from proxy.config import IncidentsConfig, IncidentSinkConfig
from proxy.metrics import Metrics

log = logging.getLogger("gapwatch.incidents")


class JsonlSink:
    """Appends one JSON object per line; rotates to ``.1`` past ``max_bytes``."""

    def __init__(self, cfg: IncidentSinkConfig) -> None:
        self.path = Path(cfg.path or "incidents.jsonl")
        self.max_bytes = cfg.max_bytes
        self.name = "jsonl"

    def write(self, lines: list[bytes]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_size > self.max_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        with self.path.open("ab") as fh:
            fh.write(b"".join(line + b"\n" for line in lines))


class LogSink:
    name = "log"

    def write(self, lines: list[bytes]) -> None:
        for line in lines:
            log.warning(line.decode())


class IncidentLog:
    def __init__(self, cfg: IncidentsConfig, metrics: Metrics) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._queue: asyncio.Queue[dict[str, Any]] | None = None
        self._recent: deque[dict[str, Any]] = deque(maxlen=max(cfg.keep_recent, 1))
        self._task: asyncio.Task[None] | None = None
        self._sinks: list[JsonlSink | LogSink] = [
            JsonlSink(s) if s.type == "jsonl" else LogSink() for s in cfg.sinks
        ]

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self._cfg.queue_size)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gapwatch-incidents")

    async def stop(self) -> None:
        if self._task is None or self._queue is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout=2.0)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def submit(self, record: dict[str, Any]) -> None:
        if not self._cfg.capture_evidence:
            record = {k: v for k, v in record.items() if k != "evidence"}
        self._recent.append(record)
        if self._queue is None:
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self._metrics.incident_sink_failures.labels("queue_full").inc()

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        return list(self._recent)[-limit:][::-1]

    async def _run(self) -> None:
        assert self._queue is not None
        q = self._queue
        while True:
            batch = [await q.get()]
            while not q.empty() and len(batch) < 256:
                batch.append(q.get_nowait())
            lines = [orjson.dumps(r) for r in batch]
            for sink in self._sinks:
                try:
                    await asyncio.to_thread(sink.write, lines) if isinstance(sink, JsonlSink) else sink.write(lines)
                except Exception:
                    self._metrics.incident_sink_failures.labels(sink.name).inc(len(lines))
                    log.exception("incident sink %s failed", sink.name)
            for _ in batch:
                q.task_done()
