"""From upstream payloads (one SSE event's JSON, or a whole non-streaming body) to the pieces
of output detectors see: per-channel text, finish reasons, usage, logprobs, errors.

Plain functions over dicts from orjson: no models of OpenAI payloads on the hot path.
Three wire shapes: chat completions, legacy completions, and the Responses API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from detectors.base import Channel


@dataclass(slots=True)
class Extract:
    """What one payload contributed. ``pieces`` keep wire order."""

    pieces: list[tuple[Channel, str]] = field(default_factory=list)
    logprobs: list[tuple[Channel, list[tuple[str, float]]]] = field(default_factory=list)
    finished: list[tuple[int, str]] = field(default_factory=list)  # (choice, finish_reason)
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    response_model: str | None = None
    response_id: str | None = None
    system_fingerprint: str | None = None  # the backend configuration the upstream reports
    done: bool = False  # responses API: the response ended (completed / failed / incomplete)


# Channels are immutable: the text channels of the first choices are built once, not per event
_TEXT_CHANNELS = tuple(Channel(choice=i) for i in range(16))


def text_channel(choice: int) -> Channel:
    """The text channel of ``choice`` (shared instances for the usual small indexes)."""
    return _TEXT_CHANNELS[choice] if 0 <= choice < 16 else Channel(choice=choice)


def _logprob_items(lp: Any) -> list[tuple[str, float]]:
    if not isinstance(lp, dict):
        return []
    content = lp.get("content")
    if not isinstance(content, list):
        return []
    out = []
    for item in content:
        if isinstance(item, dict) and isinstance(item.get("token"), str):
            v = item.get("logprob")
            if isinstance(v, int | float):
                out.append((item["token"], float(v)))
    return out


def _fingerprint(obj: dict[str, Any]) -> str | None:
    fp = obj.get("system_fingerprint")
    return fp if isinstance(fp, str) and fp else None


def items(value: Any) -> list[Any]:
    """``value`` if it is a JSON array, else empty: upstream payloads are not trusted to have
    the documented types (``"choices": true`` must not raise)."""
    return value if isinstance(value, list) else []


class ToolNames:
    """Remembers tool-call names by (choice, index): the name arrives only in the first delta."""

    __slots__ = ("_channels", "_names")

    def __init__(self) -> None:
        self._names: dict[tuple[int, int], str] = {}
        self._channels: dict[tuple[int, int], Channel] = {}  # the latest per key, reused

    def channel(self, choice: int, index: int, name: Any) -> Channel:
        key = (choice, index)
        if isinstance(name, str) and name:
            self._names[key] = name
        tool_name = self._names.get(key)
        got = self._channels.get(key)
        if got is None or got.tool_name != tool_name:
            got = self._channels[key] = Channel(choice=choice, kind="tool_call", tool_index=index, tool_name=tool_name)
        return got


def chat_chunk(obj: dict[str, Any], tools: ToolNames) -> Extract:
    """One ``chat.completion.chunk`` (streaming) payload."""
    ex = Extract()
    if "error" in obj and not obj.get("choices"):
        ex.error = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
        return ex
    ex.response_model = obj.get("model") if isinstance(obj.get("model"), str) else None
    ex.response_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    ex.system_fingerprint = _fingerprint(obj)
    usage = obj.get("usage")
    if isinstance(usage, dict):
        ex.usage = usage
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return ex
    for ch in choices:
        if not isinstance(ch, dict):
            continue
        idx = ch.get("index", 0)
        idx = idx if isinstance(idx, int) else 0
        delta = ch.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            if isinstance(content, str) and content:
                text_ch = text_channel(idx)
                ex.pieces.append((text_ch, content))
                lp = _logprob_items(ch.get("logprobs"))
                if lp:
                    ex.logprobs.append((text_ch, lp))
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                ex.pieces.append((text_channel(idx), refusal))
            tcs = delta.get("tool_calls")
            if isinstance(tcs, list):
                for tc in tcs:
                    if not isinstance(tc, dict):
                        continue
                    ti = tc.get("index", 0)
                    fn = tc.get("function") if isinstance(tc.get("function"), dict) else {}
                    chan = tools.channel(idx, ti if isinstance(ti, int) else 0, fn.get("name"))
                    args = fn.get("arguments")
                    ex.pieces.append((chan, args if isinstance(args, str) else ""))
        fr = ch.get("finish_reason")
        if isinstance(fr, str):
            ex.finished.append((idx, fr))
    return ex


def completion_chunk(obj: dict[str, Any]) -> Extract:
    """A legacy ``text_completion`` payload (streaming chunk or whole body)."""
    ex = Extract()
    if "error" in obj and not obj.get("choices"):
        ex.error = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
        return ex
    ex.response_model = obj.get("model") if isinstance(obj.get("model"), str) else None
    ex.response_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    ex.system_fingerprint = _fingerprint(obj)
    if isinstance(obj.get("usage"), dict):
        ex.usage = obj["usage"]
    for ch in items(obj.get("choices")):
        if not isinstance(ch, dict):
            continue
        idx = ch.get("index", 0) if isinstance(ch.get("index", 0), int) else 0
        text = ch.get("text")
        if isinstance(text, str) and text:
            ex.pieces.append((text_channel(idx), text))
        fr = ch.get("finish_reason")
        if isinstance(fr, str):
            ex.finished.append((idx, fr))
    return ex


def chat_body(obj: dict[str, Any]) -> Extract:
    """A whole non-streaming ``chat.completion``."""
    ex = Extract()
    ex.response_model = obj.get("model") if isinstance(obj.get("model"), str) else None
    ex.response_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    ex.system_fingerprint = _fingerprint(obj)
    if isinstance(obj.get("usage"), dict):
        ex.usage = obj["usage"]
    for ch in items(obj.get("choices")):
        if not isinstance(ch, dict):
            continue
        idx = ch.get("index", 0) if isinstance(ch.get("index", 0), int) else 0
        msg = ch.get("message") if isinstance(ch.get("message"), dict) else {}
        content = msg.get("content")
        if not (isinstance(content, str) and content) and isinstance(msg.get("refusal"), str):
            content = msg["refusal"]  # a refusal is output too (and may quote what it refuses)
        if isinstance(content, str) and content:
            ex.pieces.append((text_channel(idx), content))
            lp = _logprob_items(ch.get("logprobs"))
            if lp:
                ex.logprobs.append((text_channel(idx), lp))
        for i, tc in enumerate(items(msg.get("tool_calls"))):
            if not isinstance(tc, dict):
                continue
            fn = tc.get("function") if isinstance(tc.get("function"), dict) else {}
            name = fn.get("name") if isinstance(fn.get("name"), str) else None
            args = fn.get("arguments") if isinstance(fn.get("arguments"), str) else ""
            ex.pieces.append((Channel(choice=idx, kind="tool_call", tool_index=i, tool_name=name), args))
        fr = ch.get("finish_reason")
        ex.finished.append((idx, fr if isinstance(fr, str) else "stop"))
    return ex


def responses_text_channel(output_index: Any) -> Channel:
    """The text channel of one Responses API message item."""
    return text_channel(output_index if isinstance(output_index, int) and output_index >= 0 else 0)


def responses_event(obj: dict[str, Any], tools: ToolNames) -> Extract:
    """One Responses API stream event. Output items map to channels by ``output_index``: a
    message item's text is the text channel ``choice=output_index`` (each item is judged and
    held on its own), function calls are tool channels indexed by output_index."""
    ex = Extract()
    t = obj.get("type")
    if t == "response.output_text.delta" or t == "response.refusal.delta":
        d = obj.get("delta")
        if isinstance(d, str) and d:
            text_ch = responses_text_channel(obj.get("output_index"))
            ex.pieces.append((text_ch, d))
            lp = obj.get("logprobs")
            if isinstance(lp, list):
                items = [(x["token"], float(x["logprob"])) for x in lp
                         if isinstance(x, dict) and isinstance(x.get("token"), str)
                         and isinstance(x.get("logprob"), int | float)]
                if items:
                    ex.logprobs.append((text_ch, items))
    elif t == "response.output_item.added":
        item = obj.get("item") if isinstance(obj.get("item"), dict) else {}
        if item.get("type") == "function_call":
            oi = obj.get("output_index", 0)
            tools.channel(0, oi if isinstance(oi, int) else 0, item.get("name"))
    elif t == "response.function_call_arguments.delta":
        oi = obj.get("output_index", 0)
        d = obj.get("delta")
        if isinstance(d, str):
            ex.pieces.append((tools.channel(0, oi if isinstance(oi, int) else 0, None), d))
    elif t in ("response.completed", "response.incomplete", "response.failed"):
        resp = obj.get("response") if isinstance(obj.get("response"), dict) else {}
        if isinstance(resp.get("usage"), dict):
            ex.usage = resp["usage"]
        ex.response_model = resp.get("model") if isinstance(resp.get("model"), str) else None
        ex.response_id = resp.get("id") if isinstance(resp.get("id"), str) else None
        ex.done = True
        reason = "stop" if t == "response.completed" else ("length" if t == "response.incomplete" else "error")
        ex.finished.append((0, reason))
        if t == "response.failed" and isinstance(resp.get("error"), dict):
            ex.error = resp["error"]
    elif t == "error":
        ex.error = {k: obj.get(k) for k in ("message", "code", "param") if k in obj}
    return ex


def responses_body(obj: dict[str, Any]) -> Extract:
    """A whole non-streaming Responses API ``response``."""
    ex = Extract()
    ex.response_model = obj.get("model") if isinstance(obj.get("model"), str) else None
    ex.response_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    if isinstance(obj.get("usage"), dict):
        ex.usage = obj["usage"]
    for oi, item in enumerate(items(obj.get("output"))):
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            text_parts: list[str] = []
            for part in items(item.get("content")):
                if isinstance(part, dict) and part.get("type") in ("output_text", "refusal"):
                    s = part.get("text") if part.get("type") == "output_text" else part.get("refusal")
                    if isinstance(s, str):
                        text_parts.append(s)
            if text_parts:
                ex.pieces.append((responses_text_channel(oi), "".join(text_parts)))
        elif item.get("type") == "function_call":
            args = item.get("arguments") if isinstance(item.get("arguments"), str) else ""
            name = item.get("name") if isinstance(item.get("name"), str) else None
            ex.pieces.append((Channel(kind="tool_call", tool_index=oi, tool_name=name), args))
    status = obj.get("status")
    ex.finished.append((0, "length" if status == "incomplete" else "stop"))
    return ex


def replace_texts(endpoint: str, obj: dict[str, Any], texts: list[str]) -> None:
    """Write ``texts`` back into one stream payload, one per piece that ``chat_chunk``,
    ``completion_chunk`` or ``responses_event`` extracted from it, in the same order; every
    other field stays as the upstream sent it. Raw tokens in ``logprobs`` would reveal the
    replaced text, so where a piece changes they are emptied (the shape stays)."""
    it = iter(texts)
    if endpoint == "responses":
        if obj.get("type") in ("response.output_text.delta", "response.refusal.delta",
                               "response.function_call_arguments.delta") and isinstance(obj.get("delta"), str):
            if obj["type"] != "response.function_call_arguments.delta" and not obj["delta"]:
                return
            obj["delta"] = next(it)
            if isinstance(obj.get("logprobs"), list):
                obj["logprobs"] = []
        return
    for ch in items(obj.get("choices")):
        if not isinstance(ch, dict):
            continue
        if endpoint == "completions":
            if isinstance(ch.get("text"), str) and ch["text"]:
                ch["text"] = next(it)
                _empty_logprobs(ch)
            continue
        delta = ch.get("delta")
        if not isinstance(delta, dict):
            continue
        for name in ("content", "refusal"):
            if isinstance(delta.get(name), str) and delta[name]:
                delta[name] = next(it)
                _empty_logprobs(ch)
        for tc in items(delta.get("tool_calls")):
            if not isinstance(tc, dict):
                continue
            fn = tc.get("function")
            new = next(it)
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                fn["arguments"] = new


def _empty_logprobs(choice: dict[str, Any]) -> None:
    lp = choice.get("logprobs")
    if isinstance(lp, dict):
        for key in ("content", "refusal", "tokens", "token_logprobs", "top_logprobs", "text_offset"):
            if isinstance(lp.get(key), list):
                lp[key] = []
