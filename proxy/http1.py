"""A lean HTTP/1.1 client for the upstream hot path: one asyncio ``Protocol`` per connection,
the llhttp parser (``httptools``, already uvicorn's), one socket write per request.

Why not httpx here: with py-spy on the proxy under load, httpx + httpcore + h11 + anyio were
30-50% of the proxy's own CPU per request (URL objects, header validation in Python, a cookie
jar consulted on every response, anyio cancel scopes around every read, two writes per request).
The proxy needs a small, fixed subset of HTTP: one configured origin per pool, requests it
builds itself, responses it relays. That subset is what this module does, and no more:

- keep-alive pool per upstream (LIFO, idle expiry, ``max_connections`` in use at once);
- connect timeout and bounded connect retries (0 s, 0.5 s, 1 s, ... back-off); a request that
  reached the upstream is never retried (it is not idempotent), with one exception: a kept-alive
  connection that closes without a byte of response within 0.5 s of the write (the upstream's
  keep-alive timeout racing its reuse) sends the request once more, on a new connection;
- TLS via the standard ``ssl`` module and certifi's CA bundle (or a configured CA file);
- responses parsed by llhttp: Content-Length, chunked and close-delimited bodies, 1xx skipped;
  a body cut short (or a close-delimited one ended by a reset) is an error, never a silent
  short read; trailers are dropped; bytes after the response close the connection;
- gzip and deflate decoded incrementally (the proxy asks for ``identity``; these cover upstreams
  that compress anyway); other codings are left to the caller (``raw`` reads);
- back-pressure: reading from the upstream socket pauses while 256 KiB are buffered unread;
  a response head (status line and headers) or trailers over 64 KiB is a protocol error
  (checked per read: memory stays within 64 KiB plus one read);
- redirects are never followed, no cookies are stored, no proxy environment is consulted:
  nothing here can send a request anywhere but the configured origin.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httptools

DECODABLE = frozenset({"identity", "gzip", "deflate"})
_HIGH_WATER = 256 * 1024  # unread response bytes before the socket stops being read
# the status line and headers of one response (interim 1xx included) may not exceed this: an
# upstream that sends headers without end cannot grow the proxy's memory (nginx allows 4-8 KiB
# per buffer, Node 16 KiB; provider responses carry about 1-2 KiB)
MAX_HEAD_BYTES = 64 * 1024
# a reused connection that closes this soon after the request went out, without a byte of
# response, lost the keep-alive race (the upstream closed it before reading the request: the
# close arrives within about a round trip); later, the upstream may have worked on the request,
# so it is an error, never a second send (an LLM request is not idempotent: it is billed)
STALE_RETRY_WINDOW_SECONDS = 0.5
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class HTTPError(Exception):
    """Any failure talking to the upstream."""


class ConnectError(HTTPError):
    """No connection could be made (refused, DNS, TLS handshake)."""


class ConnectTimeout(ConnectError):
    """Connecting took longer than the connect timeout."""


class PoolTimeout(HTTPError):
    """Every connection stayed busy for longer than the pool timeout."""


class RemoteProtocolError(HTTPError):
    """The upstream sent something that is not HTTP/1.1, or closed the connection before the
    response was complete."""


class StaleConnection(RemoteProtocolError):
    """The connection closed before one byte of a response came (on a kept-alive connection,
    usually the upstream's keep-alive timeout racing its reuse)."""


class DecodingError(HTTPError):
    """A gzip/deflate body that does not decode."""


class LocalProtocolError(HTTPError):
    """A header the client refuses to send (CR, LF or NUL in it: request smuggling)."""


class Headers:
    """Response headers: the raw list (original case and order, for relaying) and a
    case-insensitive lookup, built on first use, joining repeated fields with ``, ``."""

    __slots__ = ("_map", "raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw
        self._map: dict[str, str] | None = None

    def _lookup(self) -> dict[str, str]:
        m = self._map
        if m is None:
            m = {}
            for k, v in self.raw:
                name = k.decode("latin-1").lower()
                value = v.decode("latin-1")
                m[name] = f"{m[name]}, {value}" if name in m else value
            self._map = m
        return m

    def get(self, name: str, default: Any = None) -> Any:
        return self._lookup().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return self._lookup()[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup()

    def items(self) -> Iterable[tuple[str, str]]:
        return self._lookup().items()


class _Decoder:
    """Incremental content decoding, codings undone in reverse order of application. A body
    that ends inside a compressed stream is an error, never a silently shorter text."""

    __slots__ = ("_objs",)

    def __init__(self, codings: list[str]) -> None:
        self._objs: list[_Gzip | _Deflate] = [_Gzip() if c == "gzip" else _Deflate()
                                              for c in reversed(codings) if c in ("gzip", "deflate")]

    def decode(self, data: bytes) -> bytes:
        try:
            for d in self._objs:
                data = d.decompress(data)
        except zlib.error as exc:
            raise DecodingError(f"the response body does not decode ({exc})") from None
        return data

    def flush(self) -> bytes:
        out = b""
        try:
            for d in self._objs:  # what one stage flushes still passes through the next
                out = (d.decompress(out) if out else b"") + d.flush()
        except zlib.error as exc:
            raise DecodingError(f"the response body does not decode ({exc})") from None
        return out


class _Gzip:
    """gzip, including several members back to back (RFC 1952 allows it; ``gzip -c a b``)."""

    __slots__ = ("_fed", "_obj")

    def __init__(self) -> None:
        self._obj = zlib.decompressobj(zlib.MAX_WBITS | 16)
        self._fed = False

    def decompress(self, data: bytes) -> bytes:
        self._fed = self._fed or bool(data)
        out = self._obj.decompress(data)
        while self._obj.eof and self._obj.unused_data:
            rest = self._obj.unused_data  # the next member (or junk, which then fails to decode)
            self._obj = zlib.decompressobj(zlib.MAX_WBITS | 16)
            out += self._obj.decompress(rest)
        return out

    def flush(self) -> bytes:
        out = self._obj.flush()
        if self._fed and not self._obj.eof:
            raise zlib.error("the compressed body ends early")
        return out


class _Deflate:
    """``deflate`` is meant to be zlib-wrapped, but some servers send raw deflate: the first two
    bytes tell (a zlib header is CM=8 and a multiple of 31), whatever the chunking."""

    __slots__ = ("_head", "_obj")

    def __init__(self) -> None:
        self._obj: Any = None
        self._head = b""

    def decompress(self, data: bytes) -> bytes:
        if self._obj is None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return b""
            self._head = b""
            wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._obj = zlib.decompressobj() if wrapped else zlib.decompressobj(-zlib.MAX_WBITS)
        return self._obj.decompress(data)

    def flush(self) -> bytes:
        if self._obj is None:
            if self._head:
                raise zlib.error("the compressed body ends early")
            return b""
        out = self._obj.flush()
        if not self._obj.eof:
            raise zlib.error("the compressed body ends early")
        return out


def _decoder_for(headers: Headers) -> _Decoder | None:
    value = headers.get("content-encoding")
    if not value:
        return None
    codings = [t.strip().lower() for t in value.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings or any(c not in DECODABLE for c in codings):
        return None  # nothing to do, or an encoding the caller must relay raw
    return _Decoder(codings)


class Response:
    """One upstream response, its body read chunk by chunk. Close it (``aclose``) always: that
    returns the connection to the pool when the body was read to the end, else closes it."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_decoder", "_error", "_got_bytes", "_head", "_head_bytes",
                 "_keep_alive", "_pool", "_raw_headers", "_released", "_waiter", "complete", "headers",
                 "status_code")

    def __init__(self, pool: Pool, conn: _Connection, head: bool) -> None:
        self._pool = pool
        self._conn = conn
        self._head = head
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # bytes received since the last body bytes (head, trailers, framing)
        self._got_bytes = False  # any byte at all of this response
        self.status_code = 0
        self.headers = Headers(self._raw_headers)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: HTTPError | None = None
        self._decoder: _Decoder | None = None
        self._keep_alive = False
        self._released = False
        self.complete = False

    # -- fed by the connection -------------------------------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, err: HTTPError) -> None:
        if self._error is None and not self.complete:
            self._error = err
        self._wake()

    # -- the caller's side -----------------------------------------------------------------------

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _wait_headers(self) -> None:
        while not self.status_code:
            if self._error is not None:
                raise self._error
            await self._wait()
        self._decoder = _decoder_for(self.headers)

    async def read_chunk(self, raw: bool = False) -> bytes | None:
        """The next piece of the body (every byte that arrived since the last call, decoded
        unless ``raw``), or None at its end. Raises ``HTTPError`` when the body was cut short."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                self._conn.resume()
                if self._decoder is not None and not raw:
                    data = self._decoder.decode(data)
                    if not data:
                        continue
                return data
            if self._error is not None:
                raise self._error
            if self.complete:
                if self._decoder is not None and not raw:
                    tail, self._decoder = self._decoder.flush(), None
                    if tail:
                        return tail
                return None
            await self._wait()

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        while (chunk := await self.read_chunk()) is not None:
            yield chunk

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        while (chunk := await self.read_chunk(raw=True)) is not None:
            yield chunk

    async def aread(self) -> bytes:
        parts = []
        while (chunk := await self.read_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if self._released:
            return
        self._released = True
        reusable = self.complete and self._keep_alive and self._error is None and not self._head
        self._pool._release(self._conn, reusable)


class _Connection(asyncio.Protocol):
    """One upstream connection; it feeds the response in progress (``resp``)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: Response | None = None
        self.closed = False
        self.paused = False
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        r = self.resp
        if r is None or r.complete:
            self.abort()  # bytes nobody asked for: the connection's state is unknown now
            return
        before = r._buffered
        r._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            r._fail(RemoteProtocolError("the upstream switched protocols"))
            self.abort()
            return
        except httptools.HttpParserCallbackError as exc:
            # a second response began in the same read (see on_message_begin), or the head
            # was refused (on_headers_complete): the connection cannot be trusted any more
            r._fail(exc.__context__ if isinstance(exc.__context__, HTTPError)
                    else RemoteProtocolError(f"the upstream sent an invalid HTTP response ({exc.__context__})"))
            self.abort()
            return
        except httptools.HttpParserError as exc:
            r._fail(RemoteProtocolError(f"the upstream sent an invalid HTTP response ({exc})"))
            self.abort()
            return
        if r.complete:
            return
        if r._buffered == before:
            # head, trailers or chunk framing and no body: bounded like a head, so an upstream
            # that sends headers (or trailers) without end cannot grow memory
            r._head_bytes += len(data)
            if r._head_bytes > MAX_HEAD_BYTES:
                r._fail(RemoteProtocolError(f"the upstream's response headers or trailers exceed "
                                            f"{MAX_HEAD_BYTES} bytes"))
                self.abort()
        else:
            r._head_bytes = 0

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        r = self.resp
        if r is None or r.complete:
            return
        if r.status_code and _close_delimited(r) and exc is None:
            r.complete = True  # a body without length ends when the connection closes (not resets)
            r._keep_alive = False
            r._wake()
            return
        what = "the response body" if r.status_code else "a response"
        reason = f" ({type(exc).__name__})" if exc is not None else ""
        cls = RemoteProtocolError if r._got_bytes else StaleConnection
        r._fail(cls(f"the upstream closed the connection before {what} was complete{reason}"))

    # llhttp callbacks (httptools), called from feed_data
    def on_message_begin(self) -> None:
        r = self.resp
        if r is not None and (r.status_code or r.complete):
            # a second response in the same read: never merged into this one, and the
            # connection is never reused (its next bytes would belong to nobody)
            raise RemoteProtocolError("the upstream sent more than one response to one request")

    def on_header(self, name: bytes, value: bytes) -> None:
        r = self.resp
        if r is not None and not r.status_code:
            r._raw_headers.append((name, value))
        # else a trailer field (after a chunked body): dropped, never merged into the headers

    def on_headers_complete(self) -> None:
        r = self.resp
        assert r is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            r._raw_headers.clear()  # an interim response (100 Continue, 103 Early Hints)
            return
        te = [v for k, v in r._raw_headers if k.lower() == b"transfer-encoding"]
        if te and [c.strip() for c in b",".join(te).lower().split(b",")] != [b"chunked"]:
            # a transfer coding other than chunked alone (gzip; gzip, chunked) would reach the
            # client still encoded, with nothing saying so: refused, not relayed
            raise RemoteProtocolError(f"the upstream sent an unsupported transfer-encoding "
                                      f"({b', '.join(te).decode('latin-1')[:60]})")
        r.status_code = status
        if r._head:
            r.complete = True  # no body follows a HEAD; the connection is not reused (see close)
        r._wake()

    def on_body(self, body: bytes) -> None:
        r = self.resp
        assert r is not None
        r._chunks.append(body)
        r._buffered += len(body)
        if r._buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        r._wake()

    def on_message_complete(self) -> None:
        r = self.resp
        if r is None or not r.status_code:
            return  # the end of an interim response
        r.complete = True
        r._keep_alive = self.parser.should_keep_alive()
        r._wake()

    # the pool's and response's side
    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _close_delimited(r: Response) -> bool:
    """RFC 9112 6.3: a response with neither Content-Length nor chunked framing runs to EOF."""
    if r._head or r.status_code in (204, 304):
        return False
    for k, v in r._raw_headers:
        name = k.lower()
        if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in v.lower()):
            return False
    return True


class Pool:
    """Keep-alive connections to one origin (scheme, host, port from the configured base URL)."""

    def __init__(self, base_url: str, *, max_connections: int = 256, connect_timeout: float = 5.0,
                 connect_retries: int = 0, keepalive_expiry: float = 30.0, pool_timeout: float = 10.0,
                 ca_file: str | None = None) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.scheme = u.scheme
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = (u.scheme == "https" and self.port == 443) or (u.scheme == "http" and self.port == 80)
        self.host_header = host if default else f"{host}:{self.port}"
        self.base_path = u.path.rstrip("/")
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.connect_retries = connect_retries
        self.keepalive_expiry = keepalive_expiry
        self.pool_timeout = pool_timeout
        self._ssl: ssl.SSLContext | None = _ssl_context(ca_file) if u.scheme == "https" else None
        self._idle: list[_Connection] = []
        self._in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.opened = 0  # connections made so far (tests check that streams reuse them)
        self._closed = False

    @property
    def idle_connections(self) -> int:
        return sum(1 for c in self._idle if not c.closed)

    def build_head(self, method: str, target: str, headers: Mapping[str, str] | Iterable[tuple[str, str]],
                   body_length: int) -> bytes:
        """The request line and header block, refused if any value could end a header early."""
        host = self.host_header
        lines = [f"{method} {target} HTTP/1.1\r\n"]
        items = headers.items() if isinstance(headers, Mapping) else headers
        for k, v in items:
            kl = k.lower()
            if kl == "host":
                host = v  # a configured Host header wins (name-based virtual hosts)
                continue
            if kl in ("content-length", "transfer-encoding", "connection"):
                continue  # framing is ours
            lines.append(f"{k}: {v}\r\n")
        lines[0] += f"host: {host}\r\n"
        if body_length or method in _BODY_METHODS:
            lines.append(f"content-length: {body_length}\r\n")
        lines.append("\r\n")
        head = "".join(lines)
        n = len(lines)  # every line ends with exactly one CRLF; any other CR, LF or NUL is an injection
        if head.count("\n") != n + 1 or head.count("\r") != n + 1 or "\x00" in head:
            raise LocalProtocolError("a request header contains CR, LF or NUL")
        try:
            return head.encode("latin-1")
        except UnicodeEncodeError:
            raise LocalProtocolError("a request header is not latin-1") from None

    async def request(self, method: str, target: str, headers: Mapping[str, str] | Iterable[tuple[str, str]],
                      body: bytes = b"") -> Response:
        """Send one request and return once the response headers arrived. The caller bounds
        the wait (first-byte timeout) by cancelling; the connection is then closed."""
        head = self.build_head(method, target, headers, len(body))
        await self._acquire()
        conn: _Connection | None = None
        try:
            conn = self._take_idle()
            while True:
                reused = conn is not None
                if conn is None:
                    conn = await self._connect()
                resp = Response(self, conn, method == "HEAD")
                conn.resp = resp
                assert conn.transport is not None
                if body:
                    conn.transport.writelines((head, body))
                else:
                    conn.transport.write(head)
                sent_at = time.monotonic()
                try:
                    await resp._wait_headers()
                    return resp
                except StaleConnection:
                    if not reused or time.monotonic() - sent_at > STALE_RETRY_WINDOW_SECONDS:
                        raise
                    # the upstream closed this idle connection as the request went out (its
                    # keep-alive timeout): it answered nothing, so the request goes once more,
                    # on a new connection (browsers do the same in this race)
                    conn.abort()
                    conn = None
        except BaseException:
            if conn is not None:
                conn.abort()
            self._release_slot()
            raise

    async def _acquire(self) -> None:
        if self._closed:
            raise HTTPError("the upstream client is closed")
        if self._in_use < self.max_connections and not self._waiters:
            self._in_use += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self.pool_timeout):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self._release_slot()  # the slot was handed over just as we gave up: pass it on
            else:
                fut.cancel()
            if isinstance(exc, TimeoutError):
                raise PoolTimeout(f"no upstream connection became free within {self.pool_timeout:g}s "
                                  f"(max_connections {self.max_connections})") from None
            raise

    def _release_slot(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes to the next waiter; _in_use is unchanged
                return
        self._in_use -= 1

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_expiry:
                return conn
            conn.abort()
        return None

    def _release(self, conn: _Connection, reusable: bool) -> None:
        conn.resp = None
        if reusable and not conn.closed and not self._closed:
            conn.resume()
            conn.idle_since = asyncio.get_running_loop().time()
            self._idle.append(conn)
        else:
            conn.abort()
        self._release_slot()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        delay = 0.0
        for attempt in range(self.connect_retries + 1):
            if attempt:
                await asyncio.sleep(delay)
                delay = 0.5 if delay == 0 else delay * 2
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, conn = await loop.create_connection(
                        _Connection, self.host, self.port, ssl=self._ssl,
                        server_hostname=self.host if self._ssl is not None else None)
                self.opened += 1
                return conn
            except TimeoutError:
                err: ConnectError = ConnectTimeout(f"connecting to {self.host_header} took over "
                                                   f"{self.connect_timeout:g}s")
            except ssl.SSLError as exc:
                err = ConnectError(f"TLS handshake with {self.host_header} failed ({exc.reason})")
            except OSError as exc:
                err = ConnectError(f"cannot connect to {self.host_header} ({type(exc).__name__})")
        raise err

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().abort()
        for fut in self._waiters:
            fut.cancel()


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    if ca_file is None:
        try:
            import certifi  # httpx's dependency; the same CA bundle the SDKs use

            ca_file = certifi.where()
        except ImportError:  # pragma: no cover - fall back to the system store
            ca_file = None
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
