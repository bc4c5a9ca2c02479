"""The upstream HTTP/1.1 client against raw loopback servers that write exact bytes: framing,
reuse, failures, decoding, back-pressure, pool limits, header injection, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
import struct
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from proxy.config import UpstreamConfig
from proxy.http1 import (
    STALE_RETRY_WINDOW_SECONDS,
    ConnectError,
    LocalProtocolError,
    Pool,
    PoolTimeout,
    RemoteProtocolError,
)
from proxy.upstream import Upstream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Recorder:
    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed = asyncio.Event()


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head + body


@contextlib.asynccontextmanager
async def server(respond: Callable[[bytes, int], list[bytes] | None], rec: Recorder | None = None,
                 ssl_ctx: ssl.SSLContext | None = None) -> AsyncIterator[tuple[int, Recorder]]:
    """A keep-alive server: ``respond(request, n)`` gives the byte pieces to write for the
    n-th request it received, on any connection (None: close without answering)."""
    rec = rec or Recorder()

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rec.connections += 1
        try:
            while (req := await read_request(reader)) is not None:
                rec.requests.append(req)
                pieces = respond(req, len(rec.requests) - 1)
                if pieces is None:
                    break
                for p in pieces:
                    if p == b"<close>":
                        writer.close()
                        return
                    writer.write(p)
                    await writer.drain()
                    await asyncio.sleep(0)
        except ConnectionError:
            pass
        finally:
            writer.close()
            rec.closed.set()

    srv = await asyncio.start_server(conn, "127.0.0.1", 0, ssl=ssl_ctx)
    try:
        yield srv.sockets[0].getsockname()[1], rec
    finally:
        srv.close()


def ok(body: bytes = b"{}", extra: bytes = b"") -> list[bytes]:
    return [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n" % (len(body), extra),
            body]


def chunked(*parts: bytes, extra: bytes = b"", end: bool = True) -> list[bytes]:
    out = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n%s\r\n" % extra]
    out += [b"%x\r\n%s\r\n" % (len(p), p) for p in parts]
    if end:
        out.append(b"0\r\n\r\n")
    return out


async def fetch(pool: Pool, target: str = "/v1/x", body: bytes = b"{}", raw: bool = False) -> tuple[int, bytes]:
    resp = await pool.request("POST", target, {"content-type": "application/json"}, body)
    try:
        parts = []
        while (chunk := await resp.read_chunk(raw)) is not None:
            parts.append(chunk)
        return resp.status_code, b"".join(parts)
    finally:
        resp.close()


async def test_content_length_and_chunked_bodies_and_one_connection_reused():
    answers = [ok(b'{"a":1}'), chunked(b"data: 1\n\n", b"data: [DONE]\n\n"), ok(b"")]
    async with server(lambda req, n: answers[n]) as (port, rec):
        pool = Pool(f"http://127.0.0.1:{port}/base")
        assert await fetch(pool) == (200, b'{"a":1}')
        assert await fetch(pool) == (200, b"data: 1\n\ndata: [DONE]\n\n")
        assert await fetch(pool) == (200, b"")
        assert rec.connections == 1 and pool.opened == 1
        first = rec.requests[0]
        assert first.startswith(b"POST /v1/x HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n" % port)
        assert b"content-length: 2\r\n" in first and first.endswith(b"\r\n\r\n{}")
        await pool.aclose()


async def test_request_target_is_built_from_the_configured_base_and_never_the_client():
    up = Upstream.build("u", UpstreamConfig(base_url="http://upstream.test:8000/openai", query={"api-version": "2"}))
    assert up.target("/v1/chat/completions", b"") == "/openai/chat/completions?api-version=2"
    assert up.target("/v1/files/a b%", b"api-version=evil&x=1") == "/openai/files/a%20b%25?x=1&api-version=2"
    assert up.target("/v1/@evil.example/x", b"") == "/openai/@evil.example/x?api-version=2"  # a path, not a host
    plain = Upstream.build("p", UpstreamConfig(base_url="http://h"))
    assert plain.target("/v1", b"") == "/"
    assert plain.target("/v1/models", b"a=%20b&c") == "/models?a=%20b&c"
    assert plain.target("/v1/x", b"q=\xe9 #") == "/x?q=%E9%20%23"  # the client's bytes, escaped


async def test_close_delimited_body_ends_cleanly_and_is_not_reused():
    def respond(req: bytes, n: int) -> list[bytes]:
        return [b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n", b"all of ", b"it", b"<close>"]

    async with server(respond) as (port, rec):
        pool = Pool(f"http://127.0.0.1:{port}")
        assert await fetch(pool) == (200, b"all of it")
        assert await fetch(pool) == (200, b"all of it")
        assert rec.connections == 2
        await pool.aclose()


@pytest.mark.parametrize("cut", ["chunked", "length", "headers", "nothing"])
async def test_a_response_cut_short_is_an_error_never_a_short_read(cut: str):
    pieces = {
        "chunked": [*chunked(b"data: 1\n\n", end=False), b"<close>"],
        "length": [b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", b"<close>"],
        "headers": [b"HTTP/1.1 200 OK\r\ncontent-le", b"<close>"],
        "nothing": None,
    }[cut]
    async with server(lambda req, n: pieces) as (port, _):
        pool = Pool(f"http://127.0.0.1:{port}")
        with pytest.raises(RemoteProtocolError, match="closed the connection before"):
            await fetch(pool)
        assert pool._in_use == 0  # the slot came back
        await pool.aclose()


async def test_garbage_is_a_protocol_error_and_interim_responses_are_skipped():
    answers = [[b"SSH-2.0-OpenSSH\r\n\r\n"], [b"HTTP/1.1 100 Continue\r\n\r\n", *ok(b"after 100")]]
    async with server(lambda req, n: answers[n]) as (port, _):
        pool = Pool(f"http://127.0.0.1:{port}")
        with pytest.raises(RemoteProtocolError, match="invalid HTTP response"):
            await fetch(pool)
        assert await fetch(pool) == (200, b"after 100")
        await pool.aclose()


async def test_gzip_and_deflate_decoded_incrementally_unknown_codings_left_raw():
    text = b"data: " + b"x" * 5000 + b"\n\n"
    gz = gzip.compress(text)
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    rd = raw_deflate.compress(text) + raw_deflate.flush()
    answers = [
        chunked(gz[:10], gz[10:20], gz[20:], extra=b"content-encoding: gzip\r\n"),
        chunked(zlib.compress(text), extra=b"content-encoding: deflate\r\n"),
        chunked(rd, extra=b"content-encoding: deflate\r\n"),  # raw deflate, as some servers send
        chunked(b"\x8b\x7fnot brotli", extra=b"content-encoding: br\r\n"),
        chunked(b"not gzip at all", extra=b"content-encoding: gzip\r\n"),
    ]
    async with server(lambda req, n: answers[n]) as (port, _):
        pool = Pool(f"http://127.0.0.1:{port}")
        for _ in range(3):
            assert await fetch(pool) == (200, text)
        assert await fetch(pool) == (200, b"\x8b\x7fnot brotli")  # not decodable here: as sent
        with pytest.raises(Exception, match="does not decode"):
            await fetch(pool)
        await pool.aclose()


async def test_set_cookie_is_never_replayed_and_no_default_headers_leak():
    async with server(lambda req, n: ok(extra=b"set-cookie: __cf_bm=tenant-a; Path=/\r\n")) as (port, rec):
        pool = Pool(f"http://127.0.0.1:{port}/v1")
        await fetch(pool)
        await fetch(pool)
        assert all(b"cookie" not in r.lower().split(b"\r\n\r\n")[0] for r in rec.requests)
        await pool.aclose()


@pytest.mark.parametrize("bad", [{"x-a": "1\r\nx-smuggled: 1"}, {"x-a": "1\nx"}, {"x-a\r\nx-b": "1"},
                                 {"x-a": "nul\x00"}, {"x-a": "snow ☃"}])
async def test_header_injection_refused_before_anything_is_sent(bad: dict[str, str]):
    pool = Pool("http://127.0.0.1:9")
    with pytest.raises(LocalProtocolError):
        await pool.request("POST", "/x", bad, b"{}")
    assert pool._in_use == 0 and pool.opened == 0


async def test_framing_headers_are_the_clients_own():
    pool = Pool("http://h.test")
    head = pool.build_head("POST", "/x", {"content-length": "999", "transfer-encoding": "chunked",
                                          "connection": "upgrade", "host": "vhost.test"}, 2)
    assert head == b"POST /x HTTP/1.1\r\nhost: vhost.test\r\ncontent-length: 2\r\n\r\n"
    assert pool.build_head("GET", "/m", {}, 0) == b"GET /m HTTP/1.1\r\nhost: h.test\r\n\r\n"


async def test_connect_refused_retries_then_error():
    pool = Pool("http://127.0.0.1:9", connect_retries=1)
    with pytest.raises(ConnectError):
        await pool.request("GET", "/", {})
    assert pool._in_use == 0


async def test_pool_limit_queues_then_times_out():
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            await release.wait()
            writer.write(b"".join(ok(b"1")))
            await writer.drain()

    srv = await asyncio.start_server(slow, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    pool = Pool(f"http://127.0.0.1:{port}", max_connections=1, pool_timeout=0.2)
    first = asyncio.ensure_future(fetch(pool))
    await asyncio.sleep(0.05)
    with pytest.raises(PoolTimeout):
        await fetch(pool)  # the only connection stays busy
    second = asyncio.ensure_future(fetch(pool))
    await asyncio.sleep(0.05)
    release.set()
    assert await first == (200, b"1") and await second == (200, b"1")
    assert pool.opened == 1 and pool._in_use == 0
    await pool.aclose()
    srv.close()


async def test_cancelled_request_closes_the_connection_and_frees_the_slot():
    async with server(lambda req, n: [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]) as (port, rec):
        pool = Pool(f"http://127.0.0.1:{port}")
        resp = await pool.request("POST", "/x", {}, b"{}")
        reader = asyncio.ensure_future(resp.read_chunk())
        await asyncio.sleep(0.05)
        reader.cancel()
        resp.close()
        await asyncio.wait_for(rec.closed.wait(), 1.0)  # the upstream sees the connection go
        assert pool._in_use == 0 and pool.idle_connections == 0
        await pool.aclose()


async def test_unread_body_over_high_water_pauses_the_socket():
    big = b"y" * (1 << 20)

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (8 * len(big)))
        with contextlib.suppress(ConnectionError):
            for _ in range(8):
                writer.write(big)
                await writer.drain()
        writer.close()

    srv = await asyncio.start_server(flood, "127.0.0.1", 0)
    pool = Pool(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}")
    resp = await pool.request("POST", "/x", {}, b"{}")
    await asyncio.sleep(0.3)  # not reading: the proxy must stop pulling
    assert resp._conn.paused
    assert resp._buffered < 2 * (1 << 20)
    got = 0
    while (chunk := await resp.read_chunk()) is not None:
        got += len(chunk)
    assert got == 8 * len(big)
    resp.close()
    await pool.aclose()
    srv.close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    return key, cert


async def test_https_upstream_verified_with_the_configured_ca(tmp_path: Path):
    key, cert = _self_signed(tmp_path)
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(cert, key)
    async with server(lambda req, n: ok(b"secure"), ssl_ctx=sctx) as (port, _):
        pool = Pool(f"https://localhost:{port}/v1", ca_file=str(cert))
        assert await fetch(pool) == (200, b"secure")
        await pool.aclose()
        untrusted = Pool(f"https://localhost:{port}/v1")  # certifi's bundle: the self-signed cert fails
        with pytest.raises(ConnectError, match="TLS"):
            await fetch(untrusted)
        await untrusted.aclose()


def test_tls_ca_file_must_exist():
    with pytest.raises(ValueError, match="tls_ca_file"):
        UpstreamConfig(base_url="https://h", tls_ca_file="/nonexistent/ca.pem")


async def test_response_headers_without_end_are_cut_off_at_the_head_limit():
    pad = b"x-pad: " + b"a" * 1000 + b"\r\n"
    endless = [b"HTTP/1.1 200 OK\r\n", *([pad * 8] * 200)]  # 1.6 MB of headers, never a blank line
    async with server(lambda req, n: endless if n == 0 else ok(extra=pad * 60)) as (port, _rec):
        pool = Pool(f"http://127.0.0.1:{port}")
        with pytest.raises(RemoteProtocolError, match="headers or trailers exceed"):
            await fetch(pool)
        # a large but bounded head (about 60 KiB) is fine, on a fresh connection
        status, body = await fetch(pool)
        assert (status, body) == (200, b"{}")
        await pool.aclose()


async def test_a_second_response_in_the_same_read_is_never_merged_and_the_connection_not_reused():
    smuggled = b"HTTP/1.1 500 Evil\r\ncontent-length: 4\r\nset-cookie: x=1\r\n\r\nEVIL"
    answers = [[b"".join(ok(b"hi")) + smuggled], ok(b"second")]
    async with server(lambda req, n: answers[n]) as (port, rec):
        pool = Pool(f"http://127.0.0.1:{port}")
        resp = await pool.request("POST", "/x", {}, b"{}")
        assert resp.status_code == 200 and await resp.aread() == b"hi"
        assert resp.headers.get("set-cookie") is None and resp.headers["content-length"] == "2"
        resp.close()
        assert await fetch(pool) == (200, b"second")  # its own answer, on a new connection
        assert rec.connections == 2
        await pool.aclose()


async def test_trailers_are_dropped_and_bounded():
    trailer = [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n",
               b"2\r\nok\r\n0\r\nset-cookie: sid=from-trailer\r\ncontent-type: text/html\r\n\r\n"]
    flood = [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-big: ",
             *([b"a" * 8192] * 40)]  # 320 KiB of one trailer value, never finished
    answers = [trailer, flood]
    async with server(lambda req, n: answers[n]) as (port, _):
        pool = Pool(f"http://127.0.0.1:{port}")
        resp = await pool.request("POST", "/x", {}, b"{}")
        assert await resp.aread() == b"ok"
        assert resp.headers.get("set-cookie") is None and resp.headers["content-type"] == "application/json"
        resp.close()
        with pytest.raises(RemoteProtocolError, match="trailers exceed"):
            await fetch(pool)
        await pool.aclose()


async def test_idle_connection_closed_by_the_upstream_is_retried_once_on_a_new_one():
    # the upstream answers the first request, then closes that kept-alive connection on
    # reading the next one without a byte (its keep-alive timeout racing our reuse)
    answers = [ok(b"1"), None, ok(b"2"), None]
    async with server(lambda req, n: answers[n]) as (port, rec):
        pool = Pool(f"http://127.0.0.1:{port}")
        assert await fetch(pool) == (200, b"1")
        assert await fetch(pool) == (200, b"2")
        assert len(rec.requests) == 3 and rec.connections == 2
        # a fresh connection that answers nothing is an error, never retried
        await pool.aclose()
        pool = Pool(f"http://127.0.0.1:{port}")
        with pytest.raises(RemoteProtocolError, match="before a response"):
            await fetch(pool)
        assert len(rec.requests) == 4 and pool._in_use == 0
        await pool.aclose()


async def test_a_reset_never_ends_a_close_delimited_body():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: part")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        writer.transport.abort()

    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    pool = Pool(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}")
    with pytest.raises(RemoteProtocolError, match="before the response body was complete"):
        await fetch(pool)
    await pool.aclose()
    srv.close()


async def test_gzip_members_truncation_and_deflate_split_at_any_byte():
    text = b"data: " + b"y" * 3000 + b"\n\n"
    two = gzip.compress(text[:1000]) + gzip.compress(text[1000:])
    gz = gzip.compress(text)
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    rd = raw.compress(text) + raw.flush()
    answers = [
        chunked(two[:7], two[7:], extra=b"content-encoding: gzip\r\n"),  # two members back to back
        chunked(rd[:1], rd[1:2], rd[2:], extra=b"content-encoding: deflate\r\n"),  # raw, first byte alone
        chunked(zlib.compress(text)[:1], zlib.compress(text)[1:], extra=b"content-encoding: deflate\r\n"),
        chunked(gz[: len(gz) // 2], extra=b"content-encoding: gzip\r\n"),  # framed fine, stream cut
        ok(b"", extra=b"content-encoding: gzip\r\n"),  # empty body: nothing to decode
    ]
    async with server(lambda req, n: answers[n]) as (port, _):
        pool = Pool(f"http://127.0.0.1:{port}")
        for _ in range(3):
            assert await fetch(pool) == (200, text)
        with pytest.raises(Exception, match="ends early"):
            await fetch(pool)
        assert await fetch(pool) == (200, b"")
        await pool.aclose()


async def test_a_transfer_coding_other_than_chunked_alone_is_refused():
    gz = gzip.compress(b"x")
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(gz), gz)
    answers = [[b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", gz, b"<close>"],
               [b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", body],
               [b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n", body]]
    async with server(lambda req, n: answers[n]) as (port, _):
        pool = Pool(f"http://127.0.0.1:{port}")
        for _ in answers:
            with pytest.raises(RemoteProtocolError, match="transfer-encoding"):
                await fetch(pool)
        await pool.aclose()


async def test_a_reused_connection_closed_after_the_retry_window_is_an_error_not_a_second_send():
    # the upstream reads the second request, works on it past the window, then closes without
    # a byte: it may have done the (billed) work, so the request is never sent again
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(b"".join(ok(b"1")))
        await writer.drain()
        seen.append(await read_request(reader))
        await asyncio.sleep(STALE_RETRY_WINDOW_SECONDS + 0.2)
        writer.close()

    seen: list[bytes | None] = []
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    pool = Pool(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}")
    assert await fetch(pool) == (200, b"1")
    with pytest.raises(RemoteProtocolError, match="before a response"):
        await fetch(pool)
    assert len(seen) == 2 and pool.opened == 1 and pool._in_use == 0
    await pool.aclose()
    srv.close()
