"""The relay: upstream bytes -> SSE events -> deltas -> pipeline -> bytes to the client.

Pure functions build the bytes (``block_events``, ``annotation_comment``, the rewriters);
``StreamRelay.events`` is the synchronous per-event step; only ``proxy.server`` awaits.

Two modes per response:
- pass-through: every event is forwarded with its original bytes; detectors observe, and may
  still end the stream (block) — used when nothing can change the text or the hold-back is 0;
- rewrite: when a policy may redact or holds text back, each event's text fields are replaced
  with the text the pipeline releases, and events are re-serialised.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from detectors.base import Channel, Finding, StreamEnd
from proxy import deltas
from proxy.exchange import Exchange
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
        self._text_items: dict[int, dict[str, Any]] = {}  # responses: delta envelope per item
        self._refusal_choices: set[int] = set()  # choices whose text arrives as `refusal`
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
        return self._apply(ev, obj, ex_, now)

    def _apply(self, ev: SSEEvent, obj: dict[str, Any], ex_: deltas.Extract, now: float) -> bytes:
        ex = self.ex
        if ex_.response_model:
            ex.response_model = ex_.response_model
        if ex_.response_id:
            ex.response_id = ex_.response_id
        if ex_.system_fingerprint:
            ex.system_fingerprint = ex_.system_fingerprint
        if ex_.usage:
            ex.usage = ex_.usage
        pl = self.pipeline
        lazy = self._lazy
        # anything but text (an error, the end, logprobs, a finish) needs the detectors to
        # have seen all text before it
        special = ex_.error is not None or ex_.done or ex_.logprobs or ex_.finished
        if special and lazy:
            self._feed_pending()
        if ex_.error is not None:
            # the upstream gave up: its error event ends the stream. Detectors finish as
            # truncated and what they clear of the held text goes out before the error (a
            # client stops reading at the error)
            self.errored = True
            out = b""
            if pl is not None:
                pl.finish(truncated=True)
                if pl.flow is Flow.BLOCK:
                    return self._block()
                if self.rewrite:
                    out = self._flush_all()
                out += self._annotations()
            self.done = True
            self.ex.truncated = True
            return out + ev.raw
        pieces = ex_.pieces
        if self._finished_choices and any(ch.choice in self._finished_choices for ch, _ in pieces):
            # text for a choice that already ended: its detectors have finished, so it is
            # dropped (a rewrite sends nothing of it) and counted, never released unchecked
            self.anomalies.append("after_finish")
            pieces = [(ch, t) for ch, t in pieces if ch.choice not in self._finished_choices]
        switched = False
        for ch, text in pieces:
            if lazy:
                if ch is not self._pending_ch:
                    switched = True
                    self._feed_pending()
                    self._pending_ch = ch
                self._pending.append(text)
            elif pl is not None:
                pl.feed(ch, text)
            if text:
                if ex.upstream_first_token_at is None:
                    ex.upstream_first_token_at = now
                ex.output_chars += len(text)
            if ch.choice not in self.choices:
                self.choices.append(ch.choice)
            if ex.outputs is not None:
                ex.record_output(ch, text)
        if lazy:
            # the output counted since the last batch (no second counter per event); a feed on
            # a channel switch may have found something that blocks (a detector failing
            # closed) or annotates: that event goes the whole way
            if (not special and ex.output_chars - self._fed_chars < OBSERVE_BATCH_CHARS
                    and not (switched and (pl.flow is not Flow.CONTINUE or pl.new_annotations))):  # type: ignore[union-attr]
                stripped = self.ex.strip_logprobs and _strip_logprobs(obj)
                return b"data: " + orjson.dumps(obj) + b"\n\n" if stripped else ev.raw
            self._feed_pending()
            pl.flush_batches()  # type: ignore[union-attr]
            self._fed_chars = ex.output_chars
        if pl is not None:
            for ch, items in ex_.logprobs:
                pl.feed_logprobs(ch, items)
        for idx, reason in ex_.finished:
            ex.finish_reasons.append(reason)
            self._finished_choices.add(idx)
            if pl is not None:
                pl.finish_choice(idx, StreamEnd(finish_reason=reason))
        if ex_.done:
            self.done = True
            if pl is not None:
                pl.finish(finish_reason=ex_.finished[0][1] if ex_.finished else None)
        stripped = self.ex.strip_logprobs and _strip_logprobs(obj)
        if pl is None:
            return b"data: " + orjson.dumps(obj) + b"\n\n" if stripped else ev.raw
        if pl.flow is Flow.BLOCK:
            return self._block()
        out = self._rewrite(ev, obj, ex_, stripped) if self.rewrite else ev.raw
        if stripped and out is ev.raw:
            out = b"data: " + orjson.dumps(obj) + b"\n\n"
        notes = pl.pop_annotations()
        if notes:
            out += annotation_comment(notes)
        return out

    def _feed_pending(self) -> None:
        """Feed the collected pieces of the pending channel in one call (nothing when none)."""
        pl, ch, texts = self.pipeline, self._pending_ch, self._pending
        if not texts or pl is None or ch is None:
            return
        pl.feed(ch, texts[0] if len(texts) == 1 else "".join(texts))
        texts.clear()

    def _on_done(self, ev: SSEEvent) -> bytes:
        self.done = True
        pl = self.pipeline
        if pl is None:
            return ev.raw
        self._feed_pending()
        # detectors finish first: a match they only confirm at the end (a pattern that could
        # still have grown) must be redacted or blocked before the held text is released
        pl.finish(finish_reason=self.ex.finish_reasons[-1] if self.ex.finish_reasons else None)
        if pl.flow is Flow.BLOCK:
            return self._block()
        out = b""
        if self.rewrite:
            out += self._flush_all()
        return out + self._annotations() + ev.raw

    def _annotations(self) -> bytes:
        """The comment line for findings not yet announced (empty when there are none)."""
        notes = self.pipeline.pop_annotations() if self.pipeline is not None else None
        return annotation_comment(notes) if notes else b""

    def _block(self) -> bytes:
        self.blocked = True
        self.done = True
        assert self.pipeline is not None
        self.pipeline.settle_observers()
        self.pipeline.pop_annotations()
        return block_events(self.ex.endpoint, self.pipeline.outcome.blocked_by, self.ex, self.choices,
                            self.base)

    # -- the end of the upstream body ---------------------------------------------------------

    def on_eof(self) -> tuple[bytes, bool]:
        """Upstream body ended. Returns (bytes, clean): clean is False when it ended without
        [DONE] / a terminal event (truncated), in which case the caller sends an error event."""
        if self.done or self.blocked:
            return b"", True
        self.ex.truncated = True
        pl = self.pipeline
        tail = b""
        if pl is not None:
            self._feed_pending()
            pl.finish(truncated=True)
            if pl.flow is Flow.BLOCK:
                return self._block(), True
            if self.rewrite:  # the text held back so far, checked to the end, goes out first
                tail = self._flush_all()
            tail += self._annotations()
        # after the upstream's own error event there is nothing to add
        return tail, self.errored

    def on_abort(self) -> bytes:
        """The upstream failed mid-stream (reset, timeout, overlong line): detectors finish as
        truncated, then what they clear of the held text goes out (or the block ending, if a
        detector blocks at the end). The caller adds the error event unless blocked."""
        self.ex.truncated = True
        pl = self.pipeline
        if pl is None or self.done or self.blocked:
            return b""
        self._feed_pending()
        pl.finish(truncated=True)
        if pl.flow is Flow.BLOCK:
            return self._block()
        return (self._flush_all() if self.rewrite else b"") + self._annotations()

    # -- rewrite mode -----------------------------------------------------------------------

    def _flush_all(self) -> bytes:
        """Release everything still held (end of response) as one synthetic chunk per choice."""
        assert self.pipeline is not None
        pl = self.pipeline
        ep = self.ex.endpoint
        by_choice: dict[int, list[tuple[Channel, str]]] = {}
        for ch, _buf in list(pl.channels.values()):
            rest = pl.take(ch, final=True)
            if rest:
                by_choice.setdefault(ch.choice, []).append((ch, rest))
        out = bytearray()
        for idx, parts in by_choice.items():
            out += self._synthetic(idx, parts, ep)
        return bytes(out)

    def _synthetic(self, idx: int, parts: list[tuple[Channel, str]], ep: str) -> bytes:
        base = self.base or {}
        if ep == "responses":
            out = bytearray()
            for ch, text in parts:
                if ch.kind == "tool_call":
                    ev = {"type": "response.function_call_arguments.delta", "output_index": ch.tool_index,
                          "item_id": "", "delta": text}
                else:
                    env = dict(self._text_items.get(ch.choice) or {
                        "type": "response.output_text.delta", "item_id": "", "output_index": ch.choice,
                        "content_index": 0})
                    env["delta"] = text
                    env.pop("logprobs", None)
                    ev = env
                out += b"event: " + ev["type"].encode() + b"\ndata: " + orjson.dumps(ev) + b"\n\n"
            return bytes(out)
        choice: dict[str, Any] = {"index": idx, "finish_reason": None}
        if ep == "completions":
            choice["text"] = "".join(t for ch, t in parts if ch.kind == "text")
        else:
            delta: dict[str, Any] = {}
            text = "".join(t for ch, t in parts if ch.kind == "text")
            if text:
                delta["refusal" if idx in self._refusal_choices else "content"] = text
            tcs = [{"index": ch.tool_index, "function": {"arguments": t}} for ch, t in parts
                   if ch.kind == "tool_call"]
            if tcs:
                delta["tool_calls"] = tcs
            choice["delta"] = delta
        chunk = {"id": base.get("id"), "object": "text_completion" if ep == "completions" else
                 "chat.completion.chunk", "created": base.get("created"), "model": base.get("model"),
                 "choices": [choice]}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _rewrite(self, ev: SSEEvent, obj: dict[str, Any], ex_: deltas.Extract, dirty: bool = False) -> bytes:
        assert self.pipeline is not None
        pl = self.pipeline
        ep = self.ex.endpoint
        if ep == "responses":
            return self._rewrite_responses(ev, obj)
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices:
            return ev.raw
        if ep == "chat" and len(choices) == 1:
            # the usual event, one choice whose delta is only content: what the loop below does
            # for it, without its general bookkeeping
            ch = choices[0]
            delta = ch.get("delta") if isinstance(ch, dict) else None
            if (isinstance(delta, dict) and len(delta) == 1 and ch.get("finish_reason") is None
                    and ch.get("logprobs") is None):
                content = delta.get("content")
                idx = ch.get("index", 0)
                if isinstance(content, str) and content and isinstance(idx, int):
                    text = delta["content"] = pl.take(deltas.text_channel(idx))
                    if not text and not obj.get("usage"):
                        return b""
                    return b"data: " + orjson.dumps(obj) + b"\n\n"
        prefix = bytearray()
        changed_any = False
        keep_event = False
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            idx = ch.get("index", 0) if isinstance(ch.get("index", 0), int) else 0
            finishing = isinstance(ch.get("finish_reason"), str)
            if finishing:
                # everything held for this choice goes out before its final chunk
                parts = []
                for chan, _buf in list(pl.channels.values()):
                    if chan.choice == idx:
                        rest = pl.take(chan, final=True)
                        if rest:
                            parts.append((chan, rest))
                if parts:
                    prefix += self._synthetic(idx, parts, ep)
                keep_event = True
            if ep == "completions":
                if isinstance(ch.get("text"), str):
                    ch["text"] = "" if finishing and not ch["text"] else pl.take(deltas.text_channel(idx))
                    changed_any = True
                    keep_event = keep_event or bool(ch["text"])
                continue
            delta = ch.get("delta")
            if not isinstance(delta, dict):
                keep_event = True
                continue
            if ch.get("logprobs") is not None:
                # logprobs carry the raw tokens: they would reveal held or redacted text
                ch["logprobs"] = None
                changed_any = True
            if set(delta) - {"content", "tool_calls", "refusal"}:
                keep_event = True
            for field_name in ("content", "refusal"):
                if isinstance(delta.get(field_name), str) and delta[field_name]:
                    delta[field_name] = "" if finishing else pl.take(deltas.text_channel(idx))
                    if field_name == "refusal":
                        self._refusal_choices.add(idx)
                    changed_any = True
                    keep_event = keep_event or bool(delta[field_name])
            tcs = delta.get("tool_calls")
            if isinstance(tcs, list):
                for tc in tcs:
                    if not isinstance(tc, dict):
                        continue
                    fn = tc.get("function")
                    if set(tc) - {"index", "function"} or (isinstance(fn, dict) and fn.get("name")):
                        keep_event = True  # carries id / type / name
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        ti = tc.get("index", 0) if isinstance(tc.get("index", 0), int) else 0
                        chan = self.tools.channel(idx, ti, None)
                        fn["arguments"] = "" if finishing else pl.take(chan)
                        changed_any = True
                        keep_event = keep_event or bool(fn["arguments"])
        if not changed_any and not dirty:
            return bytes(prefix) + ev.raw
        if not keep_event and not obj.get("usage"):
            return bytes(prefix)
        return bytes(prefix) + b"data: " + orjson.dumps(obj) + b"\n\n"

    def _rewrite_responses(self, ev: SSEEvent, obj: dict[str, Any]) -> bytes:
        assert self.pipeline is not None
        pl = self.pipeline
        t = obj.get("type")
        name = b"event: " + str(t).encode() + b"\n" if ev.event else b""
        if t == "response.output_text.delta":
            text_ch = deltas.responses_text_channel(obj.get("output_index"))
            self._text_items[text_ch.choice] = {k: obj.get(k) for k in
                                                ("type", "item_id", "output_index", "content_index")}
            obj["delta"] = pl.take(text_ch)
            obj.pop("logprobs", None)  # raw tokens would reveal held or redacted text
            return name + b"data: " + orjson.dumps(obj) + b"\n\n" if obj["delta"] else b""
        if t == "response.function_call_arguments.delta":
            oi = obj.get("output_index", 0)
            obj["delta"] = pl.take(self.tools.channel(0, oi if isinstance(oi, int) else 0, None))
            return name + b"data: " + orjson.dumps(obj) + b"\n\n" if obj["delta"] else b""
        prefix = b""
        if t == "response.output_text.done":
            text_ch = deltas.responses_text_channel(obj.get("output_index"))
            pl.finish_channel(text_ch, StreamEnd(finish_reason="stop"))
            if pl.flow is Flow.BLOCK:
                return self._block()
            rest = pl.take(text_ch, final=True)
            if rest:
                prefix = self._synthetic(0, [(text_ch, rest)], "responses")
            obj["text"] = pl.emitted_text(text_ch)
        elif t == "response.function_call_arguments.done":
            oi = obj.get("output_index", 0)
            chan = self.tools.channel(0, oi if isinstance(oi, int) else 0, None)
            pl.finish_channel(chan, StreamEnd(finish_reason="stop"))
            if pl.flow is Flow.BLOCK:
                return self._block()
            rest = pl.take(chan, final=True)
            if rest:
                prefix = self._synthetic(0, [(chan, rest)], "responses")
            obj["arguments"] = pl.emitted_text(chan)
        elif t == "response.content_part.done":
            part = obj.get("part")
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                part["text"] = pl.emitted_text(deltas.responses_text_channel(obj.get("output_index")))
        elif t == "response.output_item.done":
            _fix_output_item(obj.get("item"), pl, self.tools, obj.get("output_index"))
        elif t in ("response.completed", "response.incomplete", "response.failed"):
            resp = obj.get("response")
            if isinstance(resp, dict):
                for oi, item in enumerate(deltas.items(resp.get("output"))):
                    _fix_output_item(item, pl, self.tools, oi)
        else:
            return ev.raw
        return prefix + name + b"data: " + orjson.dumps(obj) + b"\n\n"


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

def scan_body(endpoint: str, obj: dict[str, Any], ex: Exchange, pl: ResponsePipeline) -> None:
    """Run a whole non-streaming body through the pipeline (hold-back is unbounded here)."""
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


def redact_body(endpoint: str, obj: dict[str, Any], pl: ResponsePipeline) -> bool:
    """Write redacted text back into a non-streaming body. Returns whether anything changed."""
    changed = False
    for ch, buf in list(pl.channels.values()):
        if not buf.redactions and not buf.late:
            continue
        new = pl.take(ch, final=True)
        changed = True
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
                        first = False
                obj.pop("output_text", None)  # a convenience copy; the SDK rebuilds it from output
    return changed
