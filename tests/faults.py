"""A scriptable, fault-injecting upstream for reliability tests, the soak and the corpus.

The simulator (``proxy.simulate``) speaks the OpenAI wire format correctly; this server is
for everything a real upstream (or the network in front of it) can get wrong. It is a raw
asyncio HTTP/1.1 server rather than an ASGI app because most faults live below ASGI: a
response cut off in the middle of a chunked body, a TCP reset, headers that never come, a
body larger than the socket buffers that the peer stops reading.

Behaviour is chosen per request by the ``x-sim-fault`` header (the proxy forwards
``x-sim-*`` headers) or by a ``/f/<fault>/`` path prefix (so a configured upstream
``base_url`` can pin one); parameters come from ``x-sim-fault-<name>`` headers (dashes for underscores) or query
parameters (an upstream's ``query`` config). Every request is recorded with how and when
its connection ended, so a test can assert that the proxy closed the upstream side.

Each response is sent with ``connection: close``: one request per connection keeps the
"peer closed" signal unambiguous.

    fault              behaviour
    ok                 a correct stream (``stream: true``) or JSON body; text from ``text``
                       (base64) or the last user message; ``chars`` per event, ``delay_ms``
    stall_headers      read the request, never answer
    stall_after        headers and ``n`` events, then nothing
    stall_body         non-streaming: headers and half the JSON body, then nothing
    drip               an event every ``delay_ms`` for ever (or ``n`` events, then [DONE])
    drop_after         ``n`` events, then FIN in the middle of the chunked body
    reset_after        ``n`` events, then a TCP reset
    eof_after          ``n`` events, then a clean end of body without [DONE]
    error_mid          ``n`` events, then ``data: {"error": ...}``, then a clean end
    raw                the bytes of base64 ``body`` as the response body, ``piece`` bytes per
                       HTTP chunk, content type ``ctype``, extra response headers from
                       ``resp_headers`` (base64 JSON list of pairs; a ``connection`` header
                       there replaces the default ``connection: close``)
    html               200 with an HTML page
    json_for_stream    a JSON completion although the request asked for a stream
    status             ``status`` with an OpenAI error body and ``retry_after``
    redirect           ``status`` (default 302) to ``location``
    encoded            body compressed with ``encoding`` (gzip, deflate, br-fake); ``label``
                       0 leaves out the content-encoding header
    huge_line          ``data: {"x":"aaaa...`` of ``size`` bytes and no newline, then stall
    flood              events of ``event_bytes`` until ``total`` bytes are sent or the peer
                       stops (back-pressure: writes wait for the socket to drain)
    close_no_response  read the request and close the connection
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog. Grüße, 世界 😀 — done."


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def refused_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class Record:
    """One request the fault server received and how its connection ended."""

    seq: int
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    header_pairs: list[tuple[str, str]]
    body: bytes
    fault: str
    started: float = field(default_factory=time.monotonic)
    response_started: float | None = None
    closed: float | None = None  # monotonic time the connection ended (either side)
    peer_closed: float | None = None  # the client (the proxy) closed its side
    end: str = "open"  # completed | peer_closed | dropped | reset | error
    bytes_sent: int = 0
    last_write: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def tag(self) -> str | None:
        return self.headers.get("x-sim-fault-tag")

    def json(self) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)


class _PeerGone(Exception):
    """The proxy closed the connection while the server was writing."""


class _Conn:
    """Writes one HTTP/1.1 response, chunked unless told otherwise; counts bytes."""

    def __init__(self, writer: asyncio.StreamWriter, rec: Record) -> None:
        self.w = writer
        self.rec = rec
        self.chunked = False

    async def write(self, data: bytes) -> None:
        if self.rec.peer_closed is not None:
            raise _PeerGone
        try:
            self.w.write(data)
            await self.w.drain()
        except (ConnectionError, RuntimeError):
            raise _PeerGone from None
        self.rec.bytes_sent += len(data)
        self.rec.last_write = time.monotonic()

    async def head(self, status: int, headers: list[tuple[str, str]], chunked: bool = True,
                   length: int | None = None) -> None:
        self.chunked = chunked
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if chunked:
            lines.append("transfer-encoding: chunked")
        elif length is not None:
            lines.append(f"content-length: {length}")
        if not any(k.lower() == "connection" for k, _ in headers):
            lines.append("connection: close")
        self.rec.response_started = time.monotonic()
        await self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def body(self, data: bytes) -> None:
        if not data:
            return
        if self.chunked:
            await self.write(b"%x\r\n" % len(data) + data + b"\r\n")
        else:
            await self.write(data)

    async def end(self) -> None:
        if self.chunked:
            await self.write(b"0\r\n\r\n")


_REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 307: "Temporary Redirect", 308: "Permanent Redirect",
            400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
SSE_CTYPE = ("content-type", "text/event-stream; charset=utf-8")
JSON_CTYPE = ("content-type", "application/json")


# -- payload builders (also used by tests to compute what the upstream sent) --------------------

def endpoint_of(path: str) -> str:
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "completions"
    if path.endswith("/responses"):
        return "responses"
    return "other"


def pieces(text: str, chars: int) -> list[str]:
    return [text[i:i + chars] for i in range(0, len(text), max(1, chars))] or [""]


def sse_event(endpoint: str, model: str, piece: str | None, finish: str | None = None, index: int = 0) -> bytes:
    """One streamed event carrying ``piece`` (or a finish reason) in the endpoint's shape."""
    if endpoint == "responses":
        if finish is not None:
            obj: dict[str, Any] = {"type": "response.completed", "response": {
                "id": "resp_fault", "object": "response", "model": model, "status": "completed", "output": []}}
        else:
            obj = {"type": "response.output_text.delta", "item_id": "msg_fault", "output_index": 0,
                   "content_index": 0, "delta": piece or ""}
        return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"
    if endpoint == "completions":
        choice: dict[str, Any] = {"index": index, "text": piece or "", "finish_reason": finish, "logprobs": None}
        obj = {"id": "cmpl-fault", "object": "text_completion", "created": 1, "model": model, "choices": [choice]}
    else:
        delta: dict[str, Any] = {"content": piece} if piece is not None else {}
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        obj = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": 1, "model": model,
               "choices": [choice]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def stream_events(endpoint: str, model: str, text: str, chars: int) -> list[bytes]:
    """The complete event list for ``text``: deltas, the finishing event, then [DONE] (not for
    the Responses API, whose terminal event is ``response.completed``)."""
    out = [sse_event(endpoint, model, p) for p in pieces(text, chars) if p]
    out.append(sse_event(endpoint, model, None, finish="stop"))
    if endpoint != "responses":
        out.append(b"data: [DONE]\n\n")
    return out


def json_body(endpoint: str, model: str, text: str) -> bytes:
    if endpoint == "completions":
        obj: dict[str, Any] = {"id": "cmpl-fault", "object": "text_completion", "created": 1, "model": model,
                               "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}]}
    elif endpoint == "responses":
        obj = {"id": "resp_fault", "object": "response", "created_at": 1, "model": model, "status": "completed",
               "output": [{"type": "message", "id": "msg_fault", "role": "assistant", "status": "completed",
                           "content": [{"type": "output_text", "text": text, "annotations": []}]}]}
    else:
        obj = {"id": "chatcmpl-fault", "object": "chat.completion", "created": 1, "model": model,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    return orjson.dumps(obj)


def error_json(status: int, message: str = "upstream says no") -> bytes:
    kind = "rate_limit_error" if status == 429 else ("server_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"error": {"message": message, "type": kind, "code": f"fault_{status}", "param": None}})


class FaultServer:
    """The fault upstream on a free loopback port, served by its own event loop in a thread."""

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultServer:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                self._server = await asyncio.start_server(self._conn, "127.0.0.1", self._port, backlog=1024,
                                                          limit=1 << 20)
                self.port = self._server.sockets[0].getsockname()[1]
                ready.set()

            loop.run_until_complete(boot())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="fault-upstream")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault server did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.sleep(0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- inspection ------------------------------------------------------------------------

    def clear(self) -> None:
        with self._lock:
            self.records.clear()

    def by_tag(self, tag: str) -> list[Record]:
        with self._lock:
            return [r for r in self.records if r.tag == tag]

    def wait_for(self, tag: str, timeout: float = 5.0) -> Record:
        """The first request carrying ``x-sim-fault-tag: tag`` (waits for it to arrive)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.by_tag(tag)
            if got:
                return got[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"the fault upstream never received a request tagged {tag!r}")
            time.sleep(0.005)

    # -- the server ------------------------------------------------------------------------

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rec: Record | None = None
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # type: ignore[arg-type]
        watcher: asyncio.Task[None] | None = None
        try:
            rec = await self._read_request(reader)
            if rec is None:
                return
            handler = _HANDLERS.get(rec.fault, _ok)
            conn = _Conn(writer, rec)
            work = asyncio.ensure_future(handler(conn, rec))
            watcher = asyncio.ensure_future(self._watch(reader, rec, work))
            try:
                await work
                if rec.end == "open":
                    rec.end = "completed"
            except (_PeerGone, asyncio.CancelledError):
                if rec.end == "open":
                    rec.end = "peer_closed"
            except _Abort as ab:
                rec.end = ab.kind
                if ab.kind == "reset" and sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            if rec is not None and rec.end == "open":
                rec.end = "error"
        finally:
            if watcher is not None:
                watcher.cancel()
            with contextlib.suppress(Exception):
                writer.close()
            if rec is not None:
                rec.closed = rec.closed or time.monotonic()
                rec.done.set()
            if task is not None:
                self._tasks.discard(task)  # type: ignore[arg-type]

    async def _watch(self, reader: asyncio.StreamReader, rec: Record, work: asyncio.Future[None]) -> None:
        """One request per connection: any read returning EOF (or an error) means the proxy
        closed its side. Stop the handler and record when."""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
        except (ConnectionError, OSError):
            pass
        now = time.monotonic()
        rec.peer_closed = now
        rec.closed = rec.closed or now
        if not work.done():
            work.cancel()

    async def _read_request(self, reader: asyncio.StreamReader) -> Record | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        pairs: list[tuple[str, str]] = []
        for line in lines[1:]:
            if not line:
                continue
            k, _, v = line.partition(":")
            pairs.append((k.strip().lower(), v.strip()))
        headers = dict(pairs)
        body = b""
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(parts)
        path, _, qs = target.partition("?")
        query = dict(parse_qsl(qs))
        fault = headers.get("x-sim-fault", "")
        if path.startswith("/f/"):
            _, _, rest = path.partition("/f/")
            name, _, tail = rest.partition("/")
            fault = fault or name
            path = "/" + tail
        with self._lock:
            rec = Record(seq=len(self.records), method=method, path=path, query=query, headers=headers,
                         header_pairs=pairs, body=body, fault=fault or "ok")
            self.records.append(rec)
        return rec


class _Abort(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


# -- behaviours ---------------------------------------------------------------------------------

def _param(rec: Record, name: str, default: str) -> str:
    """Header ``x-sim-fault-<name with dashes>``, else query parameter ``<name>``."""
    return rec.headers.get("x-sim-fault-" + name.replace("_", "-"), rec.query.get(name, default))


def _num(rec: Record, name: str, default: float) -> float:
    try:
        return float(_param(rec, name, str(default)))
    except ValueError:
        return default


def _request_info(rec: Record) -> tuple[str, str, bool, str]:
    """(endpoint, model, stream, text) from the request."""
    obj = rec.json()
    obj = obj if isinstance(obj, dict) else {}
    endpoint = endpoint_of(rec.path)
    model = obj.get("model") if isinstance(obj.get("model"), str) else "fault"
    stream = obj.get("stream") is True
    raw = _param(rec, "text", "")
    text = base64.b64decode(raw).decode("utf-8", "replace") if raw else _last_user(obj) or DEFAULT_TEXT
    return endpoint, model, stream, text


def _last_user(obj: dict[str, Any]) -> str | None:
    msgs = obj.get("messages")
    if isinstance(msgs, list):
        for m in reversed(msgs):
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                return m["content"] or None
    for key in ("prompt", "input"):
        if isinstance(obj.get(key), str):
            return obj[key] or None
    return None


async def _events(conn: _Conn, rec: Record, limit: int | None = None) -> list[bytes]:
    """Send the stream's head and its events (all, or the first ``limit`` deltas); returns the
    events not sent."""
    endpoint, model, _, text = _request_info(rec)
    events = stream_events(endpoint, model, text, int(_num(rec, "chars", 4)))
    delay = _num(rec, "delay_ms", 0) / 1000
    await conn.head(200, [SSE_CTYPE, ("cache-control", "no-cache")])
    n = len(events) if limit is None else min(limit, len(events))
    for i, ev in enumerate(events[:n]):
        if delay and i:
            await asyncio.sleep(delay)
        await conn.body(ev)
    return events[n:]


async def _ok(conn: _Conn, rec: Record) -> None:
    endpoint, model, stream, text = _request_info(rec)
    if endpoint == "other":
        body = orjson.dumps({"object": "list", "data": [], "path": rec.path})
        await conn.head(200, [JSON_CTYPE], chunked=False, length=len(body))
        await conn.body(body)
        return
    if stream:
        await _events(conn, rec)
        await conn.end()
        return
    await asyncio.sleep(_num(rec, "delay_ms", 0) / 1000)
    body = json_body(endpoint, model, text)
    await conn.head(200, [JSON_CTYPE], chunked=False, length=len(body))
    await conn.body(body)


async def _stall_forever() -> None:
    await asyncio.sleep(3600)


async def _stall_headers(conn: _Conn, rec: Record) -> None:
    await _stall_forever()


async def _stall_after(conn: _Conn, rec: Record) -> None:
    await _events(conn, rec, int(_num(rec, "n", 2)))
    await _stall_forever()


async def _stall_body(conn: _Conn, rec: Record) -> None:
    endpoint, model, _, text = _request_info(rec)
    body = json_body(endpoint, model, text)
    await conn.head(200, [JSON_CTYPE], chunked=False, length=len(body))
    await conn.body(body[: len(body) // 2])
    await _stall_forever()


async def _drip(conn: _Conn, rec: Record) -> None:
    endpoint, model, _, _ = _request_info(rec)
    delay = _num(rec, "delay_ms", 100) / 1000
    n = int(_num(rec, "n", 0))
    await conn.head(200, [SSE_CTYPE])
    i = 0
    while not n or i < n:
        await conn.body(sse_event(endpoint, model, f"tick{i} "))
        i += 1
        await asyncio.sleep(delay)
    await conn.body(sse_event(endpoint, model, None, finish="stop") + b"data: [DONE]\n\n")
    await conn.end()


async def _drop_after(conn: _Conn, rec: Record) -> None:
    await _events(conn, rec, int(_num(rec, "n", 2)))
    await asyncio.sleep(0.01)
    raise _Abort("dropped")


async def _reset_after(conn: _Conn, rec: Record) -> None:
    await _events(conn, rec, int(_num(rec, "n", 2)))
    await asyncio.sleep(0.01)
    raise _Abort("reset")


async def _eof_after(conn: _Conn, rec: Record) -> None:
    await _events(conn, rec, int(_num(rec, "n", 2)))
    await conn.end()


async def _error_mid(conn: _Conn, rec: Record) -> None:
    endpoint = endpoint_of(rec.path)
    await _events(conn, rec, int(_num(rec, "n", 2)))
    err = {"message": "the model is overloaded (fault)", "type": "server_error", "code": "overloaded",
           "param": None}
    if endpoint == "responses":
        ev = {"type": "error", "code": "overloaded", "message": err["message"], "param": None}
        await conn.body(b"event: error\ndata: " + orjson.dumps(ev) + b"\n\n")
    else:
        await conn.body(b"data: " + orjson.dumps({"error": err}) + b"\n\n")
    await conn.end()


async def _raw(conn: _Conn, rec: Record) -> None:
    body = base64.b64decode(_param(rec, "body", ""))
    ctype = _param(rec, "ctype", SSE_CTYPE[1])
    piece = int(_num(rec, "piece", 0)) or len(body) or 1
    gap = _num(rec, "gap_ms", 0) / 1000
    status = int(_num(rec, "status", 200))
    extra = orjson.loads(base64.b64decode(_param(rec, "resp_headers", "")) or b"[]")
    await conn.head(status, [("content-type", ctype), *[(str(k), str(v)) for k, v in extra]])
    for i in range(0, len(body), piece):
        if gap and i:
            await asyncio.sleep(gap)
        await conn.body(body[i:i + piece])
    if _param(rec, "finish", "end") == "end":
        await conn.end()
    else:
        await _stall_forever()


async def _html(conn: _Conn, rec: Record) -> None:
    body = b"<!doctype html><html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"
    await conn.head(200, [("content-type", "text/html; charset=utf-8")], chunked=False, length=len(body))
    await conn.body(body)


async def _json_for_stream(conn: _Conn, rec: Record) -> None:
    endpoint, model, _, text = _request_info(rec)
    body = json_body(endpoint, model, text)
    await conn.head(200, [JSON_CTYPE], chunked=False, length=len(body))
    await conn.body(body)


async def _status(conn: _Conn, rec: Record) -> None:
    status = int(_num(rec, "status", 429))
    body = error_json(status)
    headers = [JSON_CTYPE, ("retry-after", _param(rec, "retry_after", "3")), ("x-upstream-note", "kept")]
    await conn.head(status, headers, chunked=False, length=len(body))
    await conn.body(body)


async def _redirect(conn: _Conn, rec: Record) -> None:
    status = int(_num(rec, "status", 302))
    await conn.head(status, [("location", _param(rec, "location", "http://169.254.169.254/latest/meta-data/")),
                             ("content-type", "text/plain")], chunked=False, length=0)


def _compress(data: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(data)
    if encoding == "deflate":
        return zlib.compress(data)
    return b"\x8b\x7f" + zlib.compress(data)[2:]  # "br-fake": bytes nothing can decode


async def _encoded(conn: _Conn, rec: Record) -> None:
    endpoint, model, stream, text = _request_info(rec)
    encoding = _param(rec, "encoding", "gzip")
    label = _param(rec, "label", "1") == "1"
    wire = "br" if encoding == "br-fake" else encoding
    if stream:
        raw = b"".join(stream_events(endpoint, model, text, int(_num(rec, "chars", 4))))
        ctype = SSE_CTYPE
    else:
        raw = json_body(endpoint, model, text)
        ctype = JSON_CTYPE
    data = _compress(raw, encoding)
    headers = [ctype] + ([("content-encoding", wire)] if label else [])
    await conn.head(200, headers)
    step = max(1, int(_num(rec, "piece", 64)))
    for i in range(0, len(data), step):  # several HTTP chunks: the decoder works incrementally
        await conn.body(data[i:i + step])
    await conn.end()


async def _huge_line(conn: _Conn, rec: Record) -> None:
    size = int(_num(rec, "size", 8 << 20))
    await conn.head(200, [SSE_CTYPE])
    await conn.body(b'data: {"x":"')
    block = b"a" * 65536
    sent = 0
    while sent < size:
        await conn.body(block)
        sent += len(block)
    await _stall_forever()


async def _flood(conn: _Conn, rec: Record) -> None:
    endpoint, model, _, _ = _request_info(rec)
    total = int(_num(rec, "total", 50 << 20))
    size = int(_num(rec, "event_bytes", 16384))
    ev = sse_event(endpoint, model, "x" * max(1, size - 200))
    await conn.head(200, [SSE_CTYPE])
    while rec.bytes_sent < total:
        await conn.body(ev)
    await conn.body(sse_event(endpoint, model, None, finish="stop") + b"data: [DONE]\n\n")
    await conn.end()


async def _close_no_response(conn: _Conn, rec: Record) -> None:
    raise _Abort("dropped")


_HANDLERS: dict[str, Callable[[_Conn, Record], Any]] = {
    "ok": _ok, "stall_headers": _stall_headers, "stall_after": _stall_after, "stall_body": _stall_body,
    "drip": _drip, "drop_after": _drop_after, "reset_after": _reset_after, "eof_after": _eof_after,
    "error_mid": _error_mid, "raw": _raw, "html": _html, "json_for_stream": _json_for_stream,
    "status": _status, "redirect": _redirect, "encoded": _encoded, "huge_line": _huge_line, "flood": _flood,
    "close_no_response": _close_no_response,
}
FAULTS = tuple(sorted(_HANDLERS))


# -- recording the stream corpus -----------------------------------------------------------------

CORPUS = Path(__file__).parent / "data" / "streams"


def capture_corpus(out: Path = CORPUS) -> list[Path]:
    """Record real upstream byte streams as corpus files ``<endpoint>__<name>.sse``: the
    simulator in its scenarios, and the fault server's malformed variants. Re-run after a
    change to either; the fuzz tests re-chunk these at random."""
    import httpx

    from proxy.simulate import SCENARIO_OUTPUTS
    from proxy.simulate import create_app as sim_app
    from tests.servers import ThreadServer

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(name: str, data: bytes) -> None:
        p = out / f"{name}.sse"
        p.write_bytes(data)
        written.append(p)

    sim = ThreadServer(sim_app()).start()
    try:
        msgs = [{"role": "user", "content": "Grüße aus Köln 😀 — a streamed answer, with ünïcödé."}]
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        cases: list[tuple[str, str, dict[str, Any], dict[str, str]]] = [
            ("chat", "echo-chunk1", {"messages": msgs}, {"x-sim-chunk-chars": "1"}),
            ("chat", "echo-chunk7", {"messages": msgs, "stream_options": {"include_usage": True}},
             {"x-sim-chunk-chars": "7"}),
            ("chat", "n2-logprobs", {"messages": msgs, "n": 2, "logprobs": True, "top_logprobs": 2}, {}),
            ("chat", "tool-call", {"messages": msgs, "tools": tools},
             {"x-sim-tool-call": "get_weather", "x-sim-output": b64('{"city": "Paris"}')}),
            ("chat", "parallel-tools", {"messages": msgs, "tools": tools},
             {"x-sim-tool-calls": b64(orjson.dumps([{"name": "a", "arguments": '{"x": 1}'},
                                                    {"name": "b", "arguments": '{"y": "é"}'}]).decode())}),
            ("completions", "echo", {"prompt": "complete this, s'il vous plaît"}, {}),
            ("completions", "n2", {"prompt": "two of them", "n": 2}, {"x-sim-chunk-chars": "2"}),
            ("responses", "echo", {"input": "respond to this ☃"}, {}),
            ("responses", "tool-call", {"input": "call it", "tools": [{"type": "function", "name": "get_weather",
                                                                          "parameters": {"type": "object"}}]},
             {"x-sim-tool-call": "get_weather", "x-sim-output": b64('{"city": "Oslo"}')}),
        ]
        for model in sorted(SCENARIO_OUTPUTS):
            cases.append(("chat", f"scenario-{model.removeprefix('sim-')}", {"messages": msgs, "model": model}, {}))
        paths = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses"}
        for endpoint, name, extra, headers in cases:
            body = {"model": "sim-echo", "stream": True, **extra}  # a scenario's own model overrides
            r = httpx.post(sim.url + paths[endpoint], json=body, headers=headers, timeout=10)
            r.raise_for_status()
            save(f"{endpoint}__sim-{name}", r.content)
    finally:
        sim.stop()
    with FaultServer() as fs:
        url = fs.url + "/v1/chat/completions"
        body = {"model": "fault", "stream": True, "messages": [{"role": "user", "content": "Grüße 😀, fault"}]}
        served: dict[str, dict[str, str]] = {
            name: {"x-sim-fault": "raw", "x-sim-fault-body": b64(data)} for name, data in malformed_streams().items()}
        served |= {
            "drop-after-3": {"x-sim-fault": "drop_after", "x-sim-fault-n": "3"},
            "eof-after-2": {"x-sim-fault": "eof_after", "x-sim-fault-n": "2"},
            "error-mid-served": {"x-sim-fault": "error_mid", "x-sim-fault-n": "2"},
            "drip-5": {"x-sim-fault": "drip", "x-sim-fault-n": "5", "x-sim-fault-delay-ms": "1"},
        }
        for name, headers in served.items():
            got = bytearray()
            with contextlib.suppress(httpx.HTTPError), httpx.stream("POST", url, json=body, headers=headers,
                                                                    timeout=10) as r:
                for chunk in r.iter_raw():
                    got += chunk
            save(f"chat__fault-{name}", bytes(got))
    return written


def malformed_streams() -> dict[str, bytes]:
    """The byte-level variants a careless or broken upstream sends (also served by ``raw``)."""
    good = stream_events("chat", "fault", "Grüße 😀 from the fault upstream.", 3)
    lf = b"".join(good)
    return {
        "lf": lf,
        "crlf": lf.replace(b"\n", b"\r\n"),
        "cr": lf.replace(b"\n", b"\r"),
        "bom": b"\xef\xbb\xbf" + lf,
        "nospace": lf.replace(b"data: ", b"data:"),
        "comments-unknown-fields": b": keep-alive\n\nid: 1\nretry: 10\nfoo: bar\n" + lf.replace(
            b"\n\n", b"\n: between\n\n", 2),
        "multiline-data": b'data: {"id":"x","object":"chat.completion.chunk",\ndata: "choices":[{"index":0,'
                          b'"delta":{"content":"two lines"},"finish_reason":null}]}\n\n' + good[-1],
        "invalid-utf8": good[0] + b'data: {"choices":[{"index":0,"delta":{"content":"bad \xff\xfe bytes \xc3"},'
                                  b'"finish_reason":null}]}\n\n' + b"".join(good[1:]),
        "after-done": lf + b"data: " + good[0][6:] + b"data: [DONE]\n\n",
        "non-json": good[0] + b"data: this is not json\n\n" + b"data: [1,2,3]\n\n" + b"".join(good[1:]),
        "missing-choices": good[0] + b'data: {"id":"x","object":"chat.completion.chunk"}\n\n' + b"".join(good[1:]),
        "error-mid": good[0] + b'data: {"error":{"message":"overloaded","type":"server_error","code":null}}\n\n',
        "no-final-newline": lf.rstrip(b"\n"),
        "truncated": b"".join(good[:3]) + good[3][: len(good[3]) // 2],
    }


def main(argv: list[str]) -> int:
    """``python -m tests.faults capture`` records the corpus; ``serve [PORT]`` runs the server."""
    if argv[:1] == ["capture"]:
        for p in capture_corpus():
            print(p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p)
        return 0
    if argv[:1] == ["serve"]:
        srv = FaultServer(int(argv[1]) if len(argv) > 1 else 0).start()
        print(srv.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            srv.stop()
        return 0
    print("usage: python -m tests.faults capture | serve [PORT]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
