"""The relay: upstream bytes -> SSE events -> deltas -> pipeline -> bytes to the client.

Pure functions build the bytes (``block_events``, ``annotation_comment``); ``StreamRelay``
is the synchronous per-event step; only ``proxy.server`` awaits.

Two modes per response:
- pass-through: every event is forwarded with its original bytes as it arrives; detectors
  observe, and may still end the stream (block). Used when nothing can change the text or
  be held;
- hold (``rewrite``): every event waits in ``proxy.holdback`` until the pipeline's release
  line has passed all of its text (release by proof: the detectors' safe points), then goes
  out as the upstream's own bytes. Only an event whose text a redaction changes is
  re-serialised, keeping every other field. Events are never merged or split.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from detectors.base import Channel, Finding, StreamEnd
from proxy import deltas
from proxy.exchange import Exchange
from proxy.holdback import HeldEvent, HeldQueue, lane_of
from proxy.pipeline import OBSERVE_BATCH_CHARS, Applied, Flow, ResponsePipeline
from proxy.sse import SSEEvent


def summary(applied: list[Applied]) -> list[dict[str, Any]]:
    return [{"detector": a.finding.detector, "category": a.finding.category,
             "severity": a.finding.severity.label, "action": a.action} for a in applied]


def annotation_comment(applied: list[Applied]) -> bytes:
    """SSE comment line(s); clients (and the OpenAI SDKs) ignore comments."""
    return b": gapwatch " + orjson.dumps({"findings": summary(applied)}) + b"\n\n"


MAX_BLOCK_FINDINGS = 8  # findings listed in a block error; the rest are counted
MAX_REASON_CHARS = 200


def block_finding(f: Finding) -> dict[str, Any]:
    """What the developer who must fix the prompt needs: detector, category, the JSON path
    (schema) and the reason. Detector messages carry no output text; for schema the reason is
    the message without the offending value it may quote. Never the evidence."""
    item: dict[str, Any] = {"detector": f.detector, "category": f.category}
    path = f.attrs.get("path")
    if isinstance(path, str):
        item["path"] = path
    tool = f.attrs.get("tool")
    if isinstance(tool, str):
        item["tool"] = tool
    reason = f.attrs.get("reason")
    text = reason if isinstance(reason, str) else f.message
    item["reason"] = text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
    return item


def _described(item: dict[str, Any]) -> str:
    where = " ".join(p for p in (f"tool {item['tool']}" if "tool" in item else "", item.get("path", "")) if p)
    head = f"{item['detector']}:{item['category']}" + (f" at {where}" if where else "")
    return f"{head}: {item['reason']}"


def block_error(applied: list[Applied], ex: Exchange) -> dict[str, Any]:
    """The OpenAI-shape error of a blocked output, the same for a non-streaming body and a
    stream's error event: ``message`` names each detector, category and reason (for schema
    the JSON path: ``schema:schema at $.price: expected number, got a string``), and
    ``findings`` lists them as data."""
    findings: list[dict[str, Any]] = []
    for a in applied:
        item = block_finding(a.finding)
        if item not in findings:
            findings.append(item)
    shown = findings[:MAX_BLOCK_FINDINGS]
    text = "; ".join(_described(i) for i in shown)
    if len(findings) > len(shown):
        text += f"; and {len(findings) - len(shown)} more"
    return {
        "message": f"gapwatch blocked this output: {text} (request id {ex.request_id})",
        "type": "content_filter", "code": "output_blocked", "param": None,
        "detectors": sorted({a.finding.detector for a in applied}), "findings": shown,
    }


def block_events(endpoint: str, applied: list[Applied], ex: Exchange, choices: list[int],
                 base: dict[str, Any] | None) -> bytes:
    """The end of a blocked stream: finish_reason content_filter per choice, an error event the
    SDKs raise on, then [DONE]. Never a silent truncation."""
    err = block_error(applied, ex)
    out = bytearray()
    if endpoint == "responses":
        ev = {"type": "error", "code": "output_blocked", "message": err["message"], "param": None,
              "error": err}
        out += b"event: error\ndata: " + orjson.dumps(ev) + b"\n\n"
        return bytes(out)
    base = base or {}
    obj = "text_completion" if endpoint == "completions" else "chat.completion.chunk"
    for idx in choices or [0]:
        choice: dict[str, Any] = {"index": idx, "finish_reason": "content_filter"}
        if endpoint == "completions":
            choice["text"] = ""
        else:
            choice["delta"] = {}
        chunk = {"id": base.get("id", f"chatcmpl-{ex.request_id}"), "object": obj,
                 "created": base.get("created", int(time.time())), "model": base.get("model", ex.model),
                 "choices": [choice]}
        out += b"data: " + orjson.dumps(chunk) + b"\n\n"
    out += b"data: " + orjson.dumps({"error": err}) + b"\n\n"
    out += b"data: [DONE]\n\n"
    return bytes(out)


def error_event(endpoint: str, message: str, code: str) -> bytes:
    """A terminal error event for upstream failures mid-stream (never a synthesised [DONE])."""
    err = {"message": message, "type": "upstream_error", "code": code, "param": None}
    if endpoint == "responses":
        ev = {"type": "error", "code": code, "message": message, "param": None, "error": err}
        return b"event: error\ndata: " + orjson.dumps(ev) + b"\n\n"
    return b"data: " + orjson.dumps({"error": err}) + b"\n\n"


class StreamRelay:
    """Per-response streaming state: parse events, feed the pipeline, produce client bytes."""

    def __init__(self, ex: Exchange, pipeline: ResponsePipeline | None, rewrite: bool) -> None:
        self.ex = ex
        self.pipeline = pipeline
        self.rewrite = rewrite and pipeline is not None
        self.tools = deltas.ToolNames()
        self.done = False  # [DONE] or a terminal Responses event seen
        self.errored = False  # an upstream error event was relayed
        self.blocked = False
        self.choices: list[int] = []
        self.base: dict[str, Any] | None = None  # id/created/model of the first chunk
        self.anomalies: list[str] = []
        self._finished_choices: set[int] = set()
        self._held = HeldQueue()  # rewrite mode: events waiting for their text to be safe
        self._lines: dict[str, int] = {}  # release lines computed for the current drain
        # A policy that cannot change or stop the output (observe/annotate/shadow) gets its
        # text per OBSERVE_BATCH_CHARS, not per event: the relay collects the pieces and feeds
        # them in one call, so an event costs a list append instead of the pipeline's
        # bookkeeping (issue 3: 2 KB answers arrive as ~400 events). Anything that is not
        # text (logprobs, a finish, the end, an error) feeds what is pending first.
        self._lazy = pipeline is not None and not pipeline.policy.enforcing
        # pieces of one channel at a time (a piece of another channel feeds these first);
        # channels are shared objects, so the common case is an identity check and an append
        self._pending_ch: Channel | None = None
        self._pending: list[str] = []
        self._fed_chars = 0  # ex.output_chars at the last batch feed

    # -- per event ---------------------------------------------------------------------------

    def on_event(self, ev: SSEEvent, now: float) -> bytes:
        """Bytes to send to the client for one upstream event (may be empty)."""
        if self.done:
            if (ev.data is not None or ev.event is not None) and not self.blocked:
                self.anomalies.append("after_done")
            return b""
        if not ev.raw.isascii() and not _valid_utf8(ev.raw):
            self.anomalies.append("invalid_utf8")
            ev = reencoded(ev)
        if ev.data is None:
            return ev.raw
        if ev.is_done:
            return self._on_done(ev)
        try:
            obj = orjson.loads(ev.data)
        except orjson.JSONDecodeError:
            self.anomalies.append("non_json")
            return ev.raw
        if not isinstance(obj, dict):
            self.anomalies.append("non_object")
            return ev.raw
        endpoint = self.ex.endpoint
        if endpoint == "responses":
            ex_ = deltas.responses_event(obj, self.tools)
        elif endpoint == "completions":
            ex_ = deltas.completion_chunk(obj)
        else:
            ex_ = deltas.chat_chunk(obj, self.tools)
            if "choices" not in obj and "error" not in obj:
                self.anomalies.append("missing_choices")
        if self.base is None and ex_.response_id:
            self.base = {"id": obj.get("id"), "created": obj.get("created"), "model": obj.get("model")}
        self._note(ex_)
        if ex_.error is not None:
            return self._on_error(ev)
        if self.rewrite:
            return self._hold(ev, obj, ex_, now)
        return self._pass(ev, obj, ex_, now)

    def _note(self, ex_: deltas.Extract) -> None:
        """What the exchange records of every event (model, id, fingerprint, usage)."""
        ex = self.ex
        if ex_.response_model:
            ex.response_model = ex_.response_model
        if ex_.response_id:
            ex.response_id = ex_.response_id
        if ex_.system_fingerprint:
            ex.system_fingerprint = ex_.system_fingerprint
        if ex_.usage:
            ex.usage = ex_.usage

    def _on_error(self, ev: SSEEvent) -> bytes:
        """The upstream gave up: its error event ends the stream. Detectors finish as
        truncated, and what they clear of the held events goes out before the error (a client
        stops reading at the error)."""
        self.errored = True
        self.done = True
        self.ex.truncated = True
        if self.pipeline is None:
            return ev.raw
        ended = self._end(truncated=True)
        return ended if self.blocked else ended + ev.raw

    def _live_pieces(self, pieces: list[tuple[Channel, str]]) -> list[tuple[Channel, str]]:
        """Text for a choice that already ended is dropped (its detectors have finished, so it
        is never released unchecked) and counted."""
        if self._finished_choices and any(ch.choice in self._finished_choices for ch, _ in pieces):
            self.anomalies.append("after_finish")
            return [(ch, t) for ch, t in pieces if ch.choice not in self._finished_choices]
        return pieces

    def _count(self, ch: Channel, text: str, now: float) -> None:
        ex = self.ex
        if text:
            if ex.upstream_first_token_at is None:
                ex.upstream_first_token_at = now
            ex.output_chars += len(text)
        if ch.choice not in self.choices:
            self.choices.append(ch.choice)
        if ex.outputs is not None:
            ex.record_output(ch, text)

    def _finish_pieces(self, ex_: deltas.Extract) -> None:
        """Logprobs, finished choices and the end of the response, after the text."""
        pl = self.pipeline
        if pl is not None:
            for ch, items in ex_.logprobs:
                pl.feed_logprobs(ch, items)
        for idx, reason in ex_.finished:
            self.ex.finish_reasons.append(reason)
            self._finished_choices.add(idx)
            if pl is not None:
                pl.finish_choice(idx, StreamEnd(finish_reason=reason))
        if ex_.done:
            self.done = True
            if pl is not None:
                pl.finish(finish_reason=ex_.finished[0][1] if ex_.finished else None)

    # -- pass-through mode: the upstream's bytes as they come ----------------------------------

    def _pass(self, ev: SSEEvent, obj: dict[str, Any], ex_: deltas.Extract, now: float) -> bytes:
        pl = self.pipeline
        lazy = self._lazy
        # anything but text (the end, logprobs, a finish) needs the detectors to have seen all
        # text before it
        special = ex_.done or ex_.logprobs or ex_.finished
        if special and lazy:
            self._feed_pending()
        switched = False
        for ch, text in self._live_pieces(ex_.pieces):
            if lazy:
                if ch is not self._pending_ch:
                    switched = True
                    self._feed_pending()
                    self._pending_ch = ch
                self._pending.append(text)
            elif pl is not None:
                pl.feed(ch, text)
            self._count(ch, text, now)
        if lazy:
            # the output counted since the last batch (no second counter per event); a feed on
            # a channel switch may have found something that blocks (a detector failing
            # closed) or annotates: that event goes the whole way
            if (not special and self.ex.output_chars - self._fed_chars < OBSERVE_BATCH_CHARS
                    and not (switched and (pl.flow is not Flow.CONTINUE or pl.new_annotations))):  # type: ignore[union-attr]
                stripped = self.ex.strip_logprobs and _strip_logprobs(obj)
                return b"data: " + orjson.dumps(obj) + b"\n\n" if stripped else ev.raw
            self._feed_pending()
            pl.flush_batches()  # type: ignore[union-attr]
            self._fed_chars = self.ex.output_chars
        self._finish_pieces(ex_)
        stripped = self.ex.strip_logprobs and _strip_logprobs(obj)
        out = _serialise(ev.event, obj) if stripped else ev.raw
        if pl is None:
            return out
        if pl.flow is Flow.BLOCK:
            return self._block()
        return out + self._annotations()

    def _feed_pending(self) -> None:
        """Feed the collected pieces of the pending channel in one call (nothing when none)."""
        pl, ch, texts = self.pipeline, self._pending_ch, self._pending
        if not texts or pl is None or ch is None:
            return
        pl.feed(ch, texts[0] if len(texts) == 1 else "".join(texts))
        texts.clear()

    # -- rewrite mode: events wait until their text is proven safe -----------------------------

    def _hold(self, ev: SSEEvent, obj: dict[str, Any], ex_: deltas.Extract, now: float) -> bytes:
        """Feed the event's text, then release every held event the pipeline has cleared.

        Each piece is recorded with its offsets in its channel, so the event can leave as the
        upstream's own bytes once the release line has passed all of them; only an event whose
        text a redaction changed (or that had to lose a piece or logprobs) is re-serialised."""
        pl = self.pipeline
        assert pl is not None
        endpoint = self.ex.endpoint
        held = HeldEvent(raw=ev.raw, obj=obj, name=ev.event, lane=lane_of(endpoint, obj))
        finished = self._finished_choices
        dropped = False
        for ch, text in ex_.pieces:
            if finished and ch.choice in finished:
                held.pieces.append((None, 0, 0, text))  # sent as "" (see _live_pieces)
                held.dirty = dropped = True
                continue
            start = pl.ledger(ch).total
            pl.feed(ch, text)
            held.pieces.append((ch, start, start + len(text), text))
            self._count(ch, text, now)
        if dropped:
            self.anomalies.append("after_finish")
        if self.ex.strip_logprobs and _strip_logprobs(obj):
            held.dirty = True
        if endpoint == "responses":
            self._on_responses_event(obj, held)
        self._finish_pieces(ex_)
        if pl.flow is Flow.BLOCK:
            return self._block()
        if self.done:  # a terminal Responses event: everything is judged
            return self._release_all(held) + self._annotations()
        self._lines.clear()
        if not self._held and self._ready(held):
            out = self._render(held)
        else:
            self._held.push(held)
            out = self._held.drain(self._ready, self._render)
        if pl.flow is Flow.BLOCK:  # a safe point failed and its detector fails closed
            return self._block()
        return out + self._annotations() if pl.new_annotations else out

    def _on_responses_event(self, obj: dict[str, Any], held: HeldEvent) -> None:
        """Responses API: an item's `.done` event ends its channel (its detectors finish, so
        its text can all go out), and the events that repeat an item's whole text are marked,
        to be rebuilt from what was released if a redaction changed it."""
        pl = self.pipeline
        assert pl is not None
        t = obj.get("type")
        if t == "response.output_text.done":
            pl.finish_channel(deltas.responses_text_channel(obj.get("output_index")), StreamEnd(finish_reason="stop"))
        elif t == "response.function_call_arguments.done":
            oi = obj.get("output_index", 0)
            pl.finish_channel(self.tools.channel(0, oi if isinstance(oi, int) else 0, None),
                              StreamEnd(finish_reason="stop"))
        if isinstance(t, str) and t in _REPEATS_TEXT:  # a malformed "type" ([], {}) is no event we know
            held.repeats_text = True

    def _ready(self, held: HeldEvent) -> bool:
        """Whether every piece of text the event carries is before its channel's release line."""
        lines = self._lines
        pl = self.pipeline
        for ch, _start, end, _text in held.pieces:
            if ch is None:
                continue
            line = lines.get(ch.key)
            if line is None:
                line = lines[ch.key] = pl.release_line(ch)  # type: ignore[union-attr]
            if line < end:  # -1 (a held tool call) holds even an empty piece
                return False
        return True

    def _render(self, held: HeldEvent) -> bytes:
        """The client's bytes for a released event: the upstream's own, unless a redaction
        changes its text (or it lost a piece, or it repeats text a redaction changed)."""
        pl = self.pipeline
        assert pl is not None
        changed = held.dirty
        ledgers = [pl.ledger(ch) if ch is not None else None for ch, *_ in held.pieces]
        if not changed:
            changed = any(led is not None and led.redactions and led.touches(s, e)
                          for led, (_ch, s, e, _t) in zip(ledgers, held.pieces, strict=True))
        texts = [led.cut(s, e, t) if led is not None else ""
                 for led, (_ch, s, e, t) in zip(ledgers, held.pieces, strict=True)]
        obj = held.obj
        if held.repeats_text and obj is not None and any(led.changed for _c, led in pl.channels.values()):
            _fix_repeated_text(obj, pl, self.tools)
            changed = True
        if not changed or obj is None:
            return held.raw
        deltas.replace_texts(self.ex.endpoint, obj, texts)
        return _serialise(held.name, obj)

    def _release_all(self, last: HeldEvent | None = None) -> bytes:
        """Everything held, in order (the response has ended: every channel is judged)."""
        if last is not None:
            self._held.push(last)
        out = self._held.drain(lambda _h: True, self._render)
        self._held.clear()
        return out

    # -- the end of the stream --------------------------------------------------------------

    def _end(self, truncated: bool) -> bytes:
        """Detectors finish (a match they only confirm at the end is redacted or blocked
        before the held text goes out); then the held events and the annotations."""
        pl = self.pipeline
        assert pl is not None
        self._feed_pending()
        pl.finish(truncated=truncated,
                  finish_reason=None if truncated or not self.ex.finish_reasons else self.ex.finish_reasons[-1])
        if pl.flow is Flow.BLOCK:
            return self._block()
        return (self._release_all() if self.rewrite else b"") + self._annotations()

    def _on_done(self, ev: SSEEvent) -> bytes:
        self.done = True
        if self.pipeline is None:
            return ev.raw
        out = self._end(truncated=False)
        return out if self.blocked else out + ev.raw

    def _annotations(self) -> bytes:
        """The comment line for findings not yet announced (empty when there are none)."""
        notes = self.pipeline.pop_annotations() if self.pipeline is not None else None
        return annotation_comment(notes) if notes else b""

    def _block(self) -> bytes:
        self.blocked = True
        self.done = True
        self._held.clear()  # nothing held of a blocked response reaches the client
        assert self.pipeline is not None
        self.pipeline.settle_observers()
        self.pipeline.pop_annotations()
        return block_events(self.ex.endpoint, self.pipeline.outcome.blocked_by, self.ex, self.choices,
                            self.base)

    def on_eof(self) -> tuple[bytes, bool]:
        """Upstream body ended. Returns (bytes, clean): clean is False when it ended without
        [DONE] / a terminal event (truncated), in which case the caller sends an error event."""
        if self.done or self.blocked:
            return b"", True
        self.ex.truncated = True
        if self.pipeline is None:
            return b"", self.errored
        # after the upstream's own error event there is nothing to add
        return self._end(truncated=True), self.errored

    def on_abort(self) -> bytes:
        """The upstream failed mid-stream (reset, timeout, overlong line): detectors finish as
        truncated, then what they clear of the held events goes out (or the block ending, if a
        detector blocks at the end). The caller adds the error event unless blocked."""
        self.ex.truncated = True
        if self.pipeline is None or self.done or self.blocked:
            return b""
        return self._end(truncated=True)


# Responses API events that repeat an item's (or the response's) whole text
_REPEATS_TEXT = frozenset({"response.output_text.done", "response.function_call_arguments.done",
                           "response.content_part.done", "response.output_item.done", "response.completed",
                           "response.incomplete", "response.failed"})


def _serialise(name: str | None, obj: dict[str, Any]) -> bytes:
    """An event rebuilt from its payload, keeping its SSE ``event:`` name."""
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def _fix_repeated_text(obj: dict[str, Any], pl: ResponsePipeline, tools: deltas.ToolNames) -> None:
    """Rebuild the text a Responses `.done`/terminal event repeats from what was released."""
    t = obj.get("type")
    oi = obj.get("output_index")
    if t == "response.output_text.done":
        obj["text"] = pl.emitted_text(deltas.responses_text_channel(oi))
    elif t == "response.function_call_arguments.done":
        obj["arguments"] = pl.emitted_text(tools.channel(0, oi if isinstance(oi, int) else 0, None))
    elif t == "response.content_part.done":
        part = obj.get("part")
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            part["text"] = pl.emitted_text(deltas.responses_text_channel(oi))
    elif t == "response.output_item.done":
        _fix_output_item(obj.get("item"), pl, tools, oi)
    else:
        resp = obj.get("response")
        if isinstance(resp, dict):
            for i, item in enumerate(deltas.items(resp.get("output"))):
                _fix_output_item(item, pl, tools, i)


def _valid_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def reencoded(ev: SSEEvent) -> SSEEvent:
    """An event rebuilt from its parsed fields (decoded with U+FFFD for invalid bytes), so the
    client only ever gets valid UTF-8. Comments and unknown fields are dropped."""
    lines = []
    if ev.event is not None:
        lines.append(b"event: " + ev.event.encode())
    if ev.data is not None:
        lines += [b"data: " + line.encode() for line in ev.data.split("\n")]
    raw = b"\n".join(lines) + b"\n\n" if lines else b""
    return SSEEvent(raw=raw, data=ev.data, event=ev.event, comment=ev.comment)


def _strip_logprobs(obj: dict[str, Any]) -> bool:
    """Remove logprobs the proxy asked for on the client's behalf. Returns whether any were."""
    changed = False
    for ch in deltas.items(obj.get("choices")):
        if isinstance(ch, dict) and ch.get("logprobs") is not None:
            ch["logprobs"] = None
            changed = True
    return changed


def _fix_output_item(item: Any, pl: ResponsePipeline, tools: deltas.ToolNames, oi: Any) -> None:
    if not isinstance(item, dict):
        return
    if item.get("type") == "message":
        for part in deltas.items(item.get("content")):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                part["text"] = pl.emitted_text(deltas.responses_text_channel(oi))
    elif item.get("type") == "function_call" and isinstance(oi, int):
        item["arguments"] = pl.emitted_text(tools.channel(0, oi, None))


# -- non-streaming bodies ------------------------------------------------------------------------

def scan_body(endpoint: str, obj: dict[str, Any], ex: Exchange, pl: ResponsePipeline) -> deltas.Extract:
    """Run a whole non-streaming body through the pipeline (nothing is released before the
    end, so no redaction is ever late). Returns what was extracted, for ``redact_body``."""
    if endpoint == "responses":
        ex_ = deltas.responses_body(obj)
    elif endpoint == "completions":
        ex_ = deltas.completion_chunk(obj)
    else:
        ex_ = deltas.chat_body(obj)
    ex.response_model = ex_.response_model
    ex.response_id = ex_.response_id
    ex.system_fingerprint = ex_.system_fingerprint
    ex.usage = ex_.usage
    for ch, text in ex_.pieces:
        ex.output_chars += len(text)
        ex.record_output(ch, text)
        pl.feed(ch, text)
    for ch, items in ex_.logprobs:
        pl.feed_logprobs(ch, items)
    for idx, reason in ex_.finished:
        ex.finish_reasons.append(reason)
        pl.finish_choice(idx, StreamEnd(finish_reason=reason))
    pl.finish(finish_reason=ex.finish_reasons[0] if ex.finish_reasons else None)
    return ex_


def redact_body(endpoint: str, obj: dict[str, Any], pl: ResponsePipeline, extract: deltas.Extract) -> bool:
    """Write redacted text back into a non-streaming body. Returns whether anything changed."""
    texts: dict[str, list[str]] = {}
    for ch, text in extract.pieces:
        texts.setdefault(ch.key, []).append(text)
    changed = False
    for ch, led in list(pl.channels.values()):
        if not led.redactions:
            continue
        text = "".join(texts.get(ch.key, ()))
        _write_body_text(endpoint, obj, ch, led.cut(0, len(text), text))
        changed = True
    return changed


def _write_body_text(endpoint: str, obj: dict[str, Any], ch: Channel, new: str) -> None:
    """Put one channel's redacted text back where the body holds it."""
    if endpoint == "chat":
        for choice in deltas.items(obj.get("choices")):
            if not isinstance(choice, dict) or choice.get("index", 0) != ch.choice:
                continue
            msg = choice.get("message")
            if not isinstance(msg, dict):
                continue
            choice["logprobs"] = None  # raw tokens would reveal the redacted text
            if ch.kind == "text":
                if isinstance(msg.get("refusal"), str) and not isinstance(msg.get("content"), str):
                    msg["refusal"] = new
                else:
                    msg["content"] = new
            else:
                tcs = deltas.items(msg.get("tool_calls"))
                if ch.tool_index is not None and ch.tool_index < len(tcs):
                    tc = tcs[ch.tool_index]
                    fn = tc.get("function") if isinstance(tc, dict) else None
                    if isinstance(fn, dict):
                        fn["arguments"] = new
    elif endpoint == "completions":
        for choice in deltas.items(obj.get("choices")):
            if isinstance(choice, dict) and choice.get("index", 0) == ch.choice:
                choice["text"] = new
                choice["logprobs"] = None
    elif endpoint == "responses":
        output = deltas.items(obj.get("output"))
        if ch.kind == "tool_call" and ch.tool_index is not None and ch.tool_index < len(output):
            if isinstance(output[ch.tool_index], dict):
                output[ch.tool_index]["arguments"] = new
        elif ch.kind == "text" and ch.choice < len(output) and isinstance(output[ch.choice], dict):
            first = True  # the item's parts were judged joined: the redacted text goes in the first
            for part in deltas.items(output[ch.choice].get("content")):
                if isinstance(part, dict) and part.get("type") == "output_text":
                    part["text"] = new if first else ""
                    part.pop("logprobs", None)
                    first = False
            obj.pop("output_text", None)  # a convenience copy; the SDK rebuilds it from output
