"""Traffic capture: a sampled fraction of exchanges written as JSONL, for ``gapwatch replay``.

Why a separate sink (not the incident log): incidents hold one record per finding and never
the text, so they cannot be judged again by other detectors or thresholds. A capture row holds
the whole exchange - the request (messages, tools, response_format, parameters), the final
output text per channel, tool names, finish reasons, usage, latency and the findings the live
policy raised - so ``gapwatch replay`` can run any policy over it later with no upstream, and
``gapwatch eval`` writes the same rows.

Content redaction (``content``):

- ``redacted`` (default): every string of the request's conversation (``messages``, ``input``,
  ``instructions``, ``prompt``, ``user``, ``metadata``) and every output channel goes through
  the ``redact_detectors`` (default ``pii`` and ``secrets``, with their default settings); each
  span they report is replaced by its typed placeholder (``[REDACTED:email]``), the same
  placeholder a ``redact`` action writes. Output spans of the live findings that carry a
  replacement (canaries, custom patterns) are replaced too. Finding evidence is already masked
  by ``detectors.redaction.mask``. Canary tokens are not stored. Replaying a redacted capture
  judges the text as stored: the redacted values cannot fire again and offsets after a
  placeholder move, so only ``full`` captures replay to exactly the live findings.
- ``full``: text as the upstream sent it and the app wrote it, plus the request's canaries
  and ``x-gapwatch-*`` headers: exact replay. Opt in only where the file is protected like
  the traffic itself.
- ``none``: no conversation or output text at all: parameters, tools, response_format,
  usage, latency and findings only (metrics-grade rows; replay skips them).

The hot path pays for sampling and a snapshot of references only: ``record`` puts the
snapshot on a bounded queue (a full queue drops and counts), and a background task redacts,
serialises and appends in a worker thread. Rotation is by size: past ``max_bytes`` the file
becomes ``FILE.1`` (older ones shift to ``.2`` ...), keeping ``keep_files`` rotated files.

Wiring (the proxy): ``should_capture(ex)`` or ``begin(ex, ctx)`` before the upstream call
(``begin`` also keeps the request's canaries and ``x-gapwatch-*`` headers, which the exchange
does not hold); ``record(ex)`` from ``Telemetry.finished``; ``start()`` / ``await stop()``
with the gateway. A sampled exchange has ``ex.outputs = {}`` so the relay records raw output.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from detectors import registry
from detectors.base import TEXT, Detector, DetectorConfig, RequestContext, StreamEnd

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.metrics import Metrics

log = logging.getLogger("gapwatch.capture")

FORMAT_VERSION = 1
# request-body keys whose strings are conversation content (redacted / dropped)
CONTENT_KEYS = ("messages", "input", "instructions", "prompt", "user", "metadata")
# keys inside the conversation whose string values are structure, not content
_STRUCTURE_KEYS = frozenset({"role", "type", "tool_call_id", "id", "call_id", "status", "detail", "format"})
ContentMode = Literal["redacted", "full", "none"]


class CaptureConfig(BaseModel):
    """``telemetry.capture`` in the YAML file. Off by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="Write sampled exchanges to `path` as JSONL for `gapwatch replay`.")
    path: str = Field("gapwatch-capture.jsonl",
                      description="Capture file; `{pid}` in the name is replaced by the process id "
                                  "(use it with several workers).")
    sample_rate: float = Field(0.01, ge=0.0, le=1.0,
                               description="Fraction of exchanges captured (1.0 = every exchange).")
    routes: list[str] = Field(default_factory=list,
                              description="Route names to sample (empty: every route).")
    content: ContentMode = Field("redacted",
                                 description="`redacted`: text with PII/secrets spans replaced by placeholders; "
                                             "`full`: raw text (exact replay; protect the file); `none`: no "
                                             "conversation or output text.")
    redact_detectors: list[str] = Field(default_factory=lambda: ["pii", "secrets"],
                                        description="Detectors (default settings) whose spans are replaced "
                                                    "in `redacted` mode.")
    max_bytes: int = Field(100 * 1024 * 1024, ge=1024,
                           description="Rotate the file past this size (`FILE.1`, `FILE.2`, ...).")
    keep_files: int = Field(5, ge=1, le=100, description="Rotated files kept besides the current one.")
    queue_size: int = Field(1000, ge=1, description="Exchanges waiting to be written; beyond it rows are "
                                                    "dropped and counted.")


# --------------------------------------------------------------------------------------------
# redaction of captured content


def detector_config_class(name: str) -> type[DetectorConfig]:
    """A detector's config class: the registry, else a family module named like the detector
    (``detectors.pii``), so redaction works before a family is registered."""
    known = registry.configs()
    if name in known:
        return known[name]
    try:
        mod = importlib.import_module(f"detectors.{name}")
        return mod.CONFIGS[name]  # type: ignore[no-any-return]
    except (ImportError, AttributeError, KeyError):
        raise ValueError(f"unknown detector '{name}' (valid: {', '.join(sorted(known))})") from None


class Redactor:
    """Replaces the spans that the given detectors report with their placeholders."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._detectors: tuple[Detector, ...] = tuple(detector_config_class(n)().build() for n in names)
        self._ctx = RequestContext()

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        out: list[tuple[int, int, str]] = []
        for det in self._detectors:
            state = det.start(self._ctx)
            found = state.feed(TEXT, text) + state.finish(TEXT, StreamEnd("stop"))
            out += [(f.span[0], f.span[1], f.replacement) for f in found
                    if f.span is not None and f.replacement is not None]
        return out

    def redact(self, text: str, extra: Iterable[tuple[int, int, str]] = ()) -> str:
        if not text:
            return text
        return apply_spans(text, [*extra, *(self.spans(text) if len(text) >= 5 else ())])

    def redact_tree(self, node: Any) -> Any:
        """Every content string inside a JSON value (role/type/id strings are kept)."""
        if isinstance(node, str):
            return self.redact(node)
        if isinstance(node, list):
            return [self.redact_tree(v) for v in node]
        if isinstance(node, dict):
            return {k: (v if k in _STRUCTURE_KEYS and isinstance(v, str) else self.redact_tree(v))
                    for k, v in node.items()}
        return node


def apply_spans(text: str, spans: Iterable[tuple[int, int, str]]) -> str:
    """``text`` with each (start, end, replacement) applied; overlapping spans are merged and
    keep the first placeholder."""
    merged: list[list[Any]] = []
    for s, e, repl in sorted((max(0, s), min(len(text), e), r) for s, e, r in spans):
        if e <= s:
            continue
        if merged and s < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e, repl])
    if not merged:
        return text
    out: list[str] = []
    pos = 0
    for s, e, repl in merged:
        out.append(text[pos:s])
        out.append(repl)
        pos = e
    out.append(text[pos:])
    return "".join(out)


# --------------------------------------------------------------------------------------------
# rows


def jsonable(value: Any) -> Any:
    """Detector signals as JSON: numbers, strings, lists, dicts; dataclasses as dicts."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return round(value, 6)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return str(value)


def finding_dicts(applied: Iterable[Any]) -> list[dict[str, Any]]:
    """``Applied`` findings as stored in a row: the finding (masked evidence) plus the action."""
    out = []
    for a in applied:
        d = a.finding.to_dict()
        d["action"] = a.action
        d["intended"] = a.intended
        if a.finding.replacement is not None:
            d["replacement"] = a.finding.replacement
        out.append(d)
    return out


def _ms(a: float | None, b: float | None) -> float | None:
    return round((b - a) * 1000.0, 3) if a is not None and b is not None else None


def snapshot(ex: Exchange, outputs: Mapping[str, str] | None = None, tool_names: Mapping[str, str] | None = None,
             headers: Mapping[str, str] | None = None, canaries: Sequence[str] = ()) -> dict[str, Any]:
    """The raw (unredacted) row for an exchange. Cheap: references and small dicts only."""
    outcome = ex.outcomes[-1] if ex.outcomes else None
    findings = finding_dicts(outcome.applied) if outcome is not None else []
    row: dict[str, Any] = {
        "v": FORMAT_VERSION, "kind": "exchange", "ts": round(ex.started_wall, 3), "request_id": ex.request_id,
        "endpoint": ex.endpoint, "path": ex.path, "route": ex.route, "tenant": ex.tenant, "model": ex.model,
        "model_label": ex.model_label, "response_model": ex.response_model,
        "system_fingerprint": ex.system_fingerprint,
        "policy": ex.policy.name if ex.policy is not None else None, "stream": ex.stream,
        "status": ex.status, "outcome": ex.outcome, "attempts": ex.attempts,
        "request": ex.body, "headers": dict(headers or {}), "canaries": list(canaries),
        "output": dict(outputs if outputs is not None else ex.output_text()),
        "tool_names": dict(tool_names if tool_names is not None else ex.tool_names),
        "finish_reasons": list(ex.finish_reasons), "truncated": ex.truncated, "usage": ex.usage,
        "latency": {"total_ms": _ms(ex.started, ex.ended),
                    "upstream_ms": _ms(ex.upstream_started, ex.upstream_ended),
                    "ttft_ms": _ms(ex.upstream_started, ex.upstream_first_token_at)},
        "findings": findings,
        "signals": jsonable(outcome.signals) if outcome is not None else {},
        "detector_errors": list(outcome.detector_errors) if outcome is not None else [],
    }
    if len(ex.outcomes) > 1:
        row["earlier_attempts"] = [[{"detector": a.finding.detector, "category": a.finding.category,
                                     "action": a.action} for a in o.applied] for o in ex.outcomes[:-1]]
    return row


def redact_row(row: dict[str, Any], mode: ContentMode, redactor: Redactor | None) -> dict[str, Any]:
    """Apply the content mode to a raw row (a new dict; the input is not changed)."""
    row = dict(row)
    row["content"] = mode
    if mode == "full":
        return row
    body = row.get("request") if isinstance(row.get("request"), dict) else {}
    row["canaries"] = []
    if mode == "none":
        row["request"] = {k: v for k, v in body.items() if k not in CONTENT_KEYS}
        row["output"] = {}
        return row
    assert redactor is not None
    row["request"] = {k: (redactor.redact_tree(v) if k in CONTENT_KEYS else v) for k, v in body.items()}
    by_channel: dict[str, list[tuple[int, int, str]]] = {}
    for f in row.get("findings") or ():
        if f.get("span") and f.get("replacement"):
            by_channel.setdefault(f["channel"], []).append((f["span"][0], f["span"][1], f["replacement"]))
    row["output"] = {k: redactor.redact(v, by_channel.get(k, ())) for k, v in (row.get("output") or {}).items()}
    return row


# --------------------------------------------------------------------------------------------
# the file


class RotatingJsonl:
    """Append-only JSONL with size-based rotation (``FILE`` -> ``FILE.1`` -> ``FILE.2`` ...)."""

    def __init__(self, path: str | Path, max_bytes: int, keep_files: int) -> None:
        self.path = Path(str(path).replace("{pid}", str(os.getpid())))
        self.max_bytes = max_bytes
        self.keep_files = keep_files

    def rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def _rotate(self) -> None:
        oldest = self.rotated(self.keep_files)
        with contextlib.suppress(FileNotFoundError):
            oldest.unlink()
        for n in range(self.keep_files - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.rotated(n), self.rotated(n + 1))
        os.replace(self.path, self.rotated(1))

    def write(self, lines: Sequence[bytes]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with contextlib.suppress(FileNotFoundError):
            size = self.path.stat().st_size
        pending = bytearray()
        for line in lines:
            if size and size + len(pending) + len(line) + 1 > self.max_bytes:
                if pending:
                    with self.path.open("ab") as fh:
                        fh.write(pending)
                    pending.clear()
                self._rotate()
                size = 0
            pending += line + b"\n"
        if pending:
            with self.path.open("ab") as fh:
                fh.write(pending)


# --------------------------------------------------------------------------------------------
# the sink


class CaptureSink:
    """Samples exchanges, queues snapshots, writes redacted rows in the background."""

    def __init__(self, config: CaptureConfig, metrics: Metrics | None = None,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.file = RotatingJsonl(config.path, config.max_bytes, config.keep_files)
        # built at start-up so an unknown detector name fails there, not on the first row
        self.redactor = Redactor(config.redact_detectors) if config.content == "redacted" else None
        self._rng = rng or random.Random()
        self._routes = frozenset(config.routes)
        self._pending: OrderedDict[int, tuple[dict[str, str], tuple[str, ...]]] = OrderedDict()
        self._queue: asyncio.Queue[dict[str, Any]] | None = None
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.dropped = 0
        self.failed = 0

    # -- request path ------------------------------------------------------------------------

    def should_capture(self, ex: Exchange) -> bool:
        """Sampling decision, made before the upstream call (the relay then records output)."""
        cfg = self.config
        if not cfg.enabled or cfg.sample_rate <= 0.0:
            return False
        if self._routes and ex.route not in self._routes:
            return False
        return cfg.sample_rate >= 1.0 or self._rng.random() < cfg.sample_rate

    def begin(self, ex: Exchange, ctx: RequestContext) -> bool:
        """``should_capture`` plus what only the request context knows (canaries, ``x-gapwatch-*``
        headers). Sets ``ex.outputs = {}`` when sampled."""
        if not self.should_capture(ex):
            return False
        ex.outputs = {}
        self._pending[id(ex)] = (dict(ctx.headers), tuple(ctx.canaries))
        while len(self._pending) > 4 * max(self.config.queue_size, 1024):  # never grows without bound
            self._pending.popitem(last=False)
        return True

    def record(self, ex: Exchange) -> None:
        """Called once per finished exchange; cheap. Only sampled exchanges are queued."""
        extra = self._pending.pop(id(ex), None)
        if ex.outputs is None:
            return
        headers, canaries = extra if extra is not None else ({}, ())
        try:
            row = snapshot(ex, headers=headers, canaries=canaries)
        except Exception:  # capture must never fail a request
            self._error()
            log.exception("capture snapshot failed")
            return
        if self._queue is None:
            self.dropped += 1
            self._error()
            return
        try:
            self._queue.put_nowait(row)
        except asyncio.QueueFull:
            self.dropped += 1
            self._error()

    # -- background writer ---------------------------------------------------------------------

    def start(self) -> None:
        if not self.config.enabled or self._task is not None:
            return
        self._queue = asyncio.Queue(maxsize=self.config.queue_size)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gapwatch-capture")

    async def stop(self, timeout_seconds: float = 5.0) -> None:
        if self._task is None or self._queue is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout=timeout_seconds)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def render(self, rows: Sequence[dict[str, Any]]) -> list[bytes]:
        """Redact and serialise (runs in a worker thread)."""
        mode = self.config.content
        return [orjson.dumps(redact_row(r, mode, self.redactor), default=str) for r in rows]

    def _write(self, rows: list[dict[str, Any]]) -> None:
        self.file.write(self.render(rows))

    async def _run(self) -> None:
        assert self._queue is not None
        q = self._queue
        while True:
            batch = [await q.get()]
            while not q.empty() and len(batch) < 128:
                batch.append(q.get_nowait())
            try:
                await asyncio.to_thread(self._write, batch)
                self.written += len(batch)
            except Exception:  # a full disk must not take the proxy down
                self.failed += len(batch)
                self._error()
                log.exception("capture write to %s failed", self.file.path)
            for _ in batch:
                q.task_done()

    def _error(self) -> None:
        if self.metrics is not None:
            self.metrics.telemetry_errors.labels("capture").inc()


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a capture file (blank lines skipped)."""
    with open(path, "rb") as fh:
        return [orjson.loads(line) for line in fh if line.strip()]

