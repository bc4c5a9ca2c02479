"""One proxied request/response: what the proxy knows about it, start to finish.

The relay fills it in as the exchange progresses; at the end it is the single typed event
("request finished") that feeds metrics, incident records, spans and alerts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from detectors.base import Message, RequestContext
from proxy.pipeline import Applied, Outcome, Policy


@dataclass
class Exchange:
    request_id: str
    method: str
    path: str
    endpoint: str  # chat | completions | responses | embeddings | models | other
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)
    body: dict[str, Any] | None = None
    model: str = ""
    model_label: str = "other"
    stream: bool = False
    route: str = "none"
    upstream: str = ""
    policy: Policy | None = None
    tenant: str | None = None
    status: int = 0
    outcome: str = "ok"
    upstream_error: str | None = None
    upstream_started: float | None = None
    upstream_headers_at: float | None = None
    upstream_first_token_at: float | None = None
    upstream_ended: float | None = None
    upstream_wait: float = 0.0  # seconds spent awaiting the upstream
    ended: float | None = None
    attempts: int = 0
    usage: dict[str, Any] | None = None
    response_model: str | None = None
    response_id: str | None = None
    system_fingerprint: str | None = None  # as the upstream reported it (model-change detection)
    finish_reasons: list[str] = field(default_factory=list)
    output_chars: int = 0
    truncated: bool = False
    outcomes: list[Outcome] = field(default_factory=list)
    client_disconnected: bool = False
    strip_logprobs: bool = False  # the proxy asked for logprobs the client did not
    signals: dict[str, Any] = field(default_factory=dict)  # response-level detector signals
    # set to {} when this exchange is sampled for traffic capture: channel key -> text pieces
    # as the upstream sent them (before redaction), plus tool names
    outputs: dict[str, list[str]] | None = None
    tool_names: dict[str, str] = field(default_factory=dict)

    def record_output(self, channel: Any, text: str) -> None:
        if self.outputs is None:
            return
        key = channel.key
        self.outputs.setdefault(key, []).append(text)
        if channel.tool_name:
            self.tool_names[key] = channel.tool_name

    def output_text(self) -> dict[str, str]:
        return {k: "".join(v) for k, v in (self.outputs or {}).items()}

    @property
    def applied(self) -> list[Applied]:
        return [a for o in self.outcomes for a in o.applied]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict):
                t = p.get("text")
                if isinstance(t, str):
                    parts.append(t)
                elif isinstance(p.get("content"), str):
                    parts.append(p["content"])
            elif isinstance(p, str):
                parts.append(p)
        return "\n".join(parts)
    return ""


def request_messages(endpoint: str, body: dict[str, Any]) -> tuple[Message, ...]:
    """The request's conversation as plain (role, text) messages for detectors."""
    out: list[Message] = []
    if endpoint == "chat":
        for i, m in enumerate(body.get("messages") or ()):
            if not isinstance(m, dict):
                continue
            role = m.get("role") if isinstance(m.get("role"), str) else "user"
            text = _content_text(m.get("content"))
            name = m.get("name") if isinstance(m.get("name"), str) else None
            # assistant tool calls carry arguments the model wrote earlier: context too
            for tc in m.get("tool_calls") or ():
                if isinstance(tc, dict) and isinstance(tc.get("function"), dict):
                    args = tc["function"].get("arguments")
                    if isinstance(args, str):
                        text = f"{text}\n{args}" if text else args
            out.append(Message(role=role, text=text, index=i, name=name))
    elif endpoint == "responses":
        instr = body.get("instructions")
        if isinstance(instr, str) and instr:
            out.append(Message(role="system", text=instr, index=-1))
        inp = body.get("input")
        if isinstance(inp, str):
            out.append(Message(role="user", text=inp, index=0))
        elif isinstance(inp, list):
            for i, item in enumerate(inp):
                if not isinstance(item, dict):
                    continue
                t = item.get("type")
                if t == "function_call_output":
                    out.append(Message(role="tool", text=_content_text(item.get("output")), index=i))
                elif t == "function_call":
                    args = item.get("arguments")
                    out.append(Message(role="assistant", text=args if isinstance(args, str) else "", index=i))
                else:
                    role = item.get("role") if isinstance(item.get("role"), str) else "user"
                    out.append(Message(role=role, text=_content_text(item.get("content")), index=i))
    elif endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            out.append(Message(role="user", text=prompt, index=0))
        elif isinstance(prompt, list):
            out.append(Message(role="user", text="\n".join(p for p in prompt if isinstance(p, str)), index=0))
    return tuple(out)


def request_context(ex: Exchange, headers: dict[str, str], canaries: tuple[str, ...] = (),
                    shared: dict[str, Any] | None = None) -> RequestContext:
    body = ex.body or {}
    tools = tuple(t for t in body.get("tools") or () if isinstance(t, dict))
    rf: Any = None
    if ex.endpoint == "chat":
        rf = body.get("response_format")
    elif ex.endpoint == "responses":
        text = body.get("text")
        if isinstance(text, dict):
            rf = text.get("format")
    return RequestContext(
        endpoint=ex.endpoint, route=ex.route, tenant=ex.tenant, model=ex.model,
        messages=request_messages(ex.endpoint, body), tools=tools,
        response_format=rf if isinstance(rf, dict) else None, headers=headers, canaries=canaries,
        raw=body, shared=shared or {}, request_id=ex.request_id,
    )
