"""The ASGI application: the app boundary where requests come in and errors become responses.

The OpenAI data path (``/v1/*``) is plain ASGI (no framework routing or models on the hot
path); health, metrics and admin endpoints are a small FastAPI app. Every request runs as a
task next to a watcher of the client connection, so a client that goes away cancels the
upstream request at once (the upstream response is closed in ``finally``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from detectors.base import RequestContext
from detectors.canary import inject_canary
from proxy import headers as hdrs
from proxy.alerts import AlertEngine
from proxy.config import LoadedConfig, glob_match
from proxy.consistency import ConsistencyChecker, answer_of, eligible
from proxy.dashboard import Dashboard
from proxy.errors import (
    BadRequest,
    BodyTooLarge,
    Overloaded,
    ProxyError,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.exchange import Exchange, request_context
from proxy.http1 import ConnectError, ConnectTimeout, HTTPError, Response
from proxy.metrics import Metrics, ModelLabel
from proxy.model_watch import ModelWatch
from proxy.pipeline import Flow, Policy, ResponsePipeline
from proxy.relay import StreamRelay, _strip_logprobs, block_error, error_event, redact_body, scan_body, summary
from proxy.routing import Router, Tenants
from proxy.sse import LineTooLong, SSEParser
from proxy.state_redis import build_state
from proxy.telemetry import Telemetry
from proxy.upstream import Upstream

log = logging.getLogger("gapwatch")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
    "/v1/embeddings": "embeddings",
}
DETECTED = frozenset({"chat", "completions", "responses"})
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class ResponseAborted(Exception):
    """A non-streaming body failed after its headers went out: the connection is dropped so
    the client sees a truncated response rather than a complete, corrupt one."""


class ClientStalled(Exception):
    """The client stopped reading a stream for longer than the stream may last
    (``max_stream_duration_seconds``): the request ends without another byte."""


class StreamTimer:
    """The idle and total time limits of one stream, with one timer for the whole stream.

    An ``asyncio.timeout`` around every upstream read and every client write cost a timer
    handle and a context manager per chunk (about a sixth of the proxy's CPU per stream).
    Here the hot path only records when a read started; one timer checks the limits and, when
    one is exceeded, cancels the request task. The awaiting read or write turns that
    cancellation into the right error (``fired`` says which limit)."""

    __slots__ = ("_handle", "deadline", "fired", "idle", "loop", "mark", "reading", "task")

    def __init__(self, idle_seconds: float, max_seconds: float) -> None:
        self.loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        now = self.loop.time()
        self.idle = idle_seconds
        self.deadline = now + max_seconds
        self.mark = now  # when the current (or last) read started
        self.reading = False
        self.fired: str | None = None  # "idle" | "max_duration" once a limit was hit
        self._handle: asyncio.TimerHandle | None = self.loop.call_at(min(now + idle_seconds, self.deadline),
                                                                     self._check)

    def _check(self) -> None:
        now = self.loop.time()
        # 1 ms slack: loop timers (uvloop) have millisecond resolution and may fire a hair early
        if now >= self.deadline - 0.001:
            self.fired = "max_duration"
        elif self.reading and now - self.mark >= self.idle - 0.001:
            self.fired = "idle"
        else:
            base = self.mark if self.reading else now
            self._handle = self.loop.call_at(min(base + self.idle, self.deadline), self._check)
            return
        self._handle = None
        self.task.cancel()

    def claim(self) -> str | None:
        """After a CancelledError: the limit that caused it (the cancellation is then
        consumed), or None when it came from elsewhere (the client went away)."""
        if self.fired is None:
            return None
        self.task.uncancel()
        return self.fired

    def remaining(self) -> float:
        return self.deadline - self.loop.time()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def closed(self) -> bool:
        return self._handle is None


class Gateway:
    """Owns the configured runtime objects, built once at start-up."""

    def __init__(self, loaded: LoadedConfig, metrics: Metrics | None = None) -> None:
        cfg = self.config = loaded.config
        self.metrics = metrics or Metrics()
        self.model_label = ModelLabel(cfg.telemetry.metrics.model_allowlist, cfg.telemetry.metrics.max_model_labels)
        self.router = Router(cfg)
        self.tenants = Tenants(cfg)
        self.policies = {name: Policy.build(name, cfg.policies[name], loaded.detectors.get(name, ()))
                         for name in cfg.policies}
        self.upstreams: dict[str, Upstream] = {}
        self.telemetry = Telemetry(cfg, self.metrics)
        self.state = build_state(cfg, self.metrics)
        self.alerts = AlertEngine(cfg, self.metrics, self.state)
        self.model_watch = ModelWatch(self.model_label, self.metrics, cfg.alerts.model_change.confirm_responses)
        self.consistency = ConsistencyChecker(self.metrics)
        self.dashboard = Dashboard(cfg.dashboard, self.metrics.registry, self.telemetry.incidents, self.alerts,
                                   self.model_watch) if cfg.dashboard.enabled else None
        self.in_flight = 0
        self.ready = False
        self.draining = False

    async def startup(self) -> None:
        self.upstreams = {n: Upstream.build(n, u) for n, u in self.config.upstreams.items()}
        self.telemetry.start()
        self.state.start()
        self.alerts.start()
        if self.dashboard is not None:
            self.dashboard.start()
        self.ready = True

    async def shutdown(self) -> None:
        self.ready = False
        if self.dashboard is not None:
            await self.dashboard.stop()
        await self.consistency.stop()  # before the clients it uses are closed
        for up in self.upstreams.values():
            await up.aclose()
        await self.alerts.stop()
        await self.state.stop()
        await self.telemetry.stop()


class ProxyApp:
    """ASGI callable. ``/v1/*`` is proxied; everything else goes to the admin app."""

    def __init__(self, gateway: Gateway, admin_app: Any) -> None:
        self.gw = gateway
        self.admin = admin_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t = scope["type"]
        if t == "lifespan":
            await self._lifespan(receive, send)
            return
        if t != "http":
            return
        path: str = scope["path"]
        if path.startswith("/v1/") or path == "/v1":
            await self._proxy(scope, receive, send)
        else:
            await self.admin(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.gw.startup()
                except Exception as exc:  # noqa: BLE001 - report start-up failure to the server
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.gw.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- the data path ---------------------------------------------------------------------------

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gw
        raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        incoming_id = None
        for k, v in raw_headers:
            if k == b"x-request-id":
                incoming_id = v.decode("latin-1")
                break
        path = scope["path"]
        ex = Exchange(request_id=hdrs.request_id(incoming_id), method=scope["method"], path=path,
                      endpoint=ENDPOINTS.get(path, "models" if path == "/v1/models" else "other"))
        sent = _SendGuard(send)
        if gw.in_flight >= gw.config.server.max_concurrency or gw.draining:
            gw.metrics.requests.labels("none", "other", ex.endpoint, "false", "5xx", "overloaded").inc()
            err = Overloaded("gapwatch is at its concurrency limit; retry shortly",
                             headers={"retry-after": "1"})
            await _send_error(sent, err, ex.request_id)
            return
        gw.in_flight += 1
        gw.metrics.in_flight.inc()
        task = asyncio.current_task()
        assert task is not None
        body_done = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(self._watch(receive, body_done, task, ex, sent))
        try:
            await self._handle(scope, receive, sent, ex, raw_headers, body_done)
        except ClientStalled:
            ex.outcome = "client_stalled"  # nothing more can be sent; the server closes the connection
        except asyncio.CancelledError:
            if not ex.client_disconnected:
                raise
            ex.outcome = "client_disconnected"
            ex.status = ex.status or 499
            # the client is gone: nothing to send; uncancel so finally-blocks can finish
            t = asyncio.current_task()
            if t is not None:
                t.uncancel()
        except ProxyError as err:
            ex.status, ex.outcome = err.status, err.outcome
            if not sent.started:
                await _send_error(sent, err, ex.request_id)
            elif not sent.finished:
                if not ex.stream:
                    # a body cut short must look cut short: no SSE event inside JSON, no clean end;
                    # the server drops the connection
                    raise ResponseAborted(err.message) from None
                await sent.body(error_event(ex.endpoint, err.message, err.code or "error"), more=False)
        except Exception:
            log.exception("internal error handling request %s", ex.request_id)
            ex.status, ex.outcome = 500, "error"
            err = ProxyError("gapwatch internal error; the request id is in x-request-id")
            if not sent.started:
                await _send_error(sent, err, ex.request_id)
            elif not sent.finished:
                await sent.body(error_event(ex.endpoint, err.message, "internal_error"), more=False)
        finally:
            watcher.cancel()
            gw.in_flight -= 1
            gw.metrics.in_flight.dec()
            ex.ended = time.perf_counter()
            ex.model_label = gw.model_label.for_response(ex.model, ex.response_model)
            _log_detector_errors(ex)
            gw.telemetry.finished(ex)
            gw.alerts.observe(ex)
            _watch_model(gw, ex)

    async def _watch(self, receive: Receive, body_done: asyncio.Event, task: asyncio.Task[Any],
                     ex: Exchange, sent: _SendGuard) -> None:
        """Once the body is read, the next ASGI message is the disconnect: cancel the request."""
        await body_done.wait()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                if not task.done() and not sent.finished:
                    ex.client_disconnected = True
                    task.cancel()
                return

    async def _read_body(self, scope: Scope, receive: Receive, raw_headers: list[tuple[bytes, bytes]]) -> bytes:
        limit = self.gw.config.server.max_body_bytes
        for k, v in raw_headers:
            if k == b"content-length":
                try:
                    if int(v) > limit:
                        raise BodyTooLarge(f"request body is larger than the {limit} byte limit "
                                           "(server.max_body_bytes)")
                except ValueError:
                    raise BadRequest("invalid Content-Length header") from None
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise asyncio.CancelledError
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body is larger than the {limit} byte limit (server.max_body_bytes)")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)

    async def _handle(self, scope: Scope, receive: Receive, sent: _SendGuard, ex: Exchange,
                      raw_headers: list[tuple[bytes, bytes]], body_done: asyncio.Event) -> None:
        gw = self.gw
        if ".." in ex.path.split("/") or "//" in ex.path:
            body_done.set()
            raise BadRequest("invalid path")
        try:
            raw_body = await self._read_body(scope, receive, raw_headers)
        except asyncio.CancelledError:
            ex.client_disconnected = True
            raise
        body_done.set()
        client_auth = api_key_hdr = None
        lower: dict[str, str] = {}
        for k, v in raw_headers:
            if k == b"authorization":
                client_auth = v.decode("latin-1")
            elif k == b"api-key":
                api_key_hdr = v.decode("latin-1")
            elif k.startswith(b"x-gapwatch-"):
                lower[k.decode("latin-1")] = v.decode("latin-1")
        if not (client_auth or "").isascii() or not (api_key_hdr or "").isascii():
            raise Unauthorized("the Authorization / api-key header must be ASCII")

        tenant = None
        if gw.tenants.enabled:
            tenant = gw.tenants.authenticate(client_auth, api_key_hdr)
            ex.tenant = tenant.name

        if ex.endpoint == "models" and ex.method == "GET":
            await self._models(sent, ex, client_auth)
            return

        body: dict[str, Any] | None = None
        if ex.method == "POST" and ex.endpoint != "other":
            body = _parse_json_body(raw_body, ex.endpoint)
            ex.body = body
            ex.model = body["model"]
            ex.stream = body.get("stream") is True
        elif ex.method == "POST" and raw_body:
            with contextlib.suppress(orjson.JSONDecodeError):
                parsed = orjson.loads(raw_body)
                if isinstance(parsed, dict) and isinstance(parsed.get("model"), str):
                    ex.model = parsed["model"]
        ex.model_label = gw.model_label(ex.model)

        idx, route = gw.router.select(ex.model, ex.path, ex.tenant)
        ex.route = gw.router.route_name(idx)
        upstream = gw.upstreams[route.upstream]
        ex.upstream = upstream.name
        policy_name = (tenant.policy if tenant and tenant.policy else None) or route.policy
        policy = gw.policies.get(policy_name) or gw.policies["default"]
        ex.policy = policy

        fwd = hdrs.forward_request_headers(raw_headers)
        fwd.update(upstream.auth_headers(client_auth, gw.tenants.enabled))
        fwd.update(upstream.config.headers)
        fwd["x-request-id"] = ex.request_id
        fwd.update(gw.telemetry.trace_headers(ex, raw_headers))  # W3C trace context: our upstream span
        fwd["accept-encoding"] = "identity"
        url = upstream.target(ex.path, scope.get("query_string", b""))

        use_detectors = (ex.endpoint in DETECTED and body is not None
                         and (not policy.empty or policy.config.consistency.enabled))
        if not use_detectors:
            await self._passthrough(sent, ex, upstream, url, fwd, raw_body, scope["method"])
            return
        raw_body, ctx = prepare_request(gw, ex, policy, lower, raw_body)
        if gw.telemetry.capture is not None:
            gw.telemetry.capture.begin(ex, ctx)  # samples; sets ex.outputs for recording
        if ex.stream:
            await self._stream(sent, ex, upstream, url, fwd, raw_body, policy, ctx)
        else:
            await self._unary(sent, ex, upstream, url, fwd, raw_body, policy, ctx)

    # -- upstream calls --------------------------------------------------------------------------

    async def _open(self, ex: Exchange, upstream: Upstream, method: str, url: str,
                    fwd: dict[str, str], body: bytes) -> Response:
        """Send the request and wait for the response headers within the first-byte timeout."""
        cfg = upstream.config
        if ex.outputs is not None:  # a retry: record only the attempt the client gets
            ex.outputs, ex.tool_names = {}, {}
        ex.upstream_started = ex.upstream_started or time.perf_counter()
        ex.attempts += 1
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(cfg.first_byte_timeout_seconds):
                resp = await upstream.request(method, url, fwd, body)
        except TimeoutError:
            ex.upstream_error = "first_byte_timeout"
            raise UpstreamTimeout(f"upstream '{upstream.name}' sent no response within "
                                  f"{cfg.first_byte_timeout_seconds:g}s (first_byte_timeout_seconds)") from None
        except ConnectTimeout:
            ex.upstream_error = "connect_timeout"
            raise UpstreamTimeout(f"connecting to upstream '{upstream.name}' timed out") from None
        except ConnectError:
            ex.upstream_error = "connect"
            raise UpstreamError(f"cannot connect to upstream '{upstream.name}'",
                                code="upstream_unreachable") from None
        except HTTPError as exc:
            ex.upstream_error = "protocol"
            raise UpstreamError(f"upstream '{upstream.name}' failed: {type(exc).__name__}") from None
        finally:
            ex.upstream_wait += time.perf_counter() - t0
        ex.upstream_headers_at = time.perf_counter()
        if 300 <= resp.status_code < 400:
            # never followed, and never handed to the client to follow: the Location could
            # point anywhere (an internal address), and the client's credentials would go along
            await resp.aclose()
            ex.upstream_error = "redirect"
            raise UpstreamError(f"upstream '{upstream.name}' answered with a redirect ({resp.status_code}); "
                                "gapwatch does not follow redirects", code="upstream_redirect")
        return resp

    async def _read_all(self, ex: Exchange, upstream: Upstream, resp: Response) -> bytes:
        cfg = upstream.config
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(cfg.idle_timeout_seconds):
                return await resp.aread()
        except TimeoutError:
            ex.upstream_error = "idle_timeout"
            raise UpstreamTimeout(f"upstream '{upstream.name}' stalled while sending the body") from None
        except HTTPError as exc:
            ex.upstream_error = "reset"
            raise UpstreamError(f"upstream '{upstream.name}' broke off the response ({type(exc).__name__})",
                                code="upstream_reset") from None
        finally:
            ex.upstream_wait += time.perf_counter() - t0
            ex.upstream_ended = time.perf_counter()

    async def _passthrough(self, sent: _SendGuard, ex: Exchange, upstream: Upstream, url: str,
                           fwd: dict[str, str], body: bytes, method: str) -> None:
        """No detectors apply: relay status, headers and bytes as they come."""
        resp = await self._open(ex, upstream, method, url, fwd, body)
        try:
            ex.status = resp.status_code
            headers = _resp_headers(resp, ex.request_id)
            if resp.status_code >= 400:
                ex.upstream_error = f"status_{resp.status_code // 100}xx"
            elif ex.stream:
                # event by event (the original bytes of each): the same checks as with
                # detectors (content type, line cap, timeouts, truncation, invalid UTF-8)
                _check_stream_response(ex, upstream, resp)
                await self._relay(sent, ex, upstream, resp, StreamRelay(ex, None, False), False, headers)
                return
            # an encoding the proxy cannot decode goes out as sent, still labelled
            raw = hdrs.undecodable_encoding(resp.headers) is not None
            await sent.start(resp.status_code, headers)
            timer = StreamTimer(upstream.config.idle_timeout_seconds, upstream.config.max_stream_duration_seconds)
            try:
                while True:
                    chunk = await self._next_chunk(ex, upstream, resp, timer, raw)
                    if chunk is None:
                        break
                    await _send(sent, chunk, True, timer)
            finally:
                timer.close()
            await _send(sent, b"", False, timer)
        finally:
            ex.upstream_ended = ex.upstream_ended or time.perf_counter()
            await resp.aclose()

    async def _next_chunk(self, ex: Exchange, upstream: Upstream, resp: Response, timer: StreamTimer,
                          raw: bool = False) -> bytes | None:
        cfg = upstream.config
        if timer.remaining() <= 0:
            ex.upstream_error = "max_duration"
            raise UpstreamTimeout(f"stream exceeded max_stream_duration_seconds "
                                  f"({cfg.max_stream_duration_seconds:g}s)", code="stream_too_long")
        t0 = time.perf_counter()
        timer.mark = timer.loop.time()
        timer.reading = True
        try:
            return await resp.read_chunk(raw)
        except asyncio.CancelledError:
            limit = timer.claim()
            if limit is None:
                raise
            if limit == "max_duration":
                ex.upstream_error = "max_duration"
                raise UpstreamTimeout("stream exceeded max_stream_duration_seconds", code="stream_too_long") from None
            ex.upstream_error = "idle_timeout"
            raise UpstreamTimeout(f"upstream '{upstream.name}' stalled for {cfg.idle_timeout_seconds:g}s "
                                  "(idle_timeout_seconds)", code="upstream_idle_timeout") from None
        except HTTPError as exc:
            ex.upstream_error = "reset"
            raise UpstreamError(f"upstream '{upstream.name}' broke off the stream ({type(exc).__name__})",
                                code="upstream_reset") from None
        finally:
            timer.reading = False
            ex.upstream_wait += time.perf_counter() - t0

    async def _unary(self, sent: _SendGuard, ex: Exchange, upstream: Upstream, url: str,
                     fwd: dict[str, str], raw_body: bytes, policy: Policy, ctx: RequestContext) -> None:
        attempt = 0
        body_bytes = raw_body
        while True:
            resp = await self._open(ex, upstream, "POST", url, fwd, body_bytes)
            try:
                if resp.status_code < 400:
                    _check_encoding(ex, upstream, resp)
                data = await self._read_all(ex, upstream, resp)
            finally:
                await resp.aclose()
            ex.status = resp.status_code
            headers = _resp_headers(resp, ex.request_id)
            if resp.status_code >= 400:
                ex.upstream_error = f"status_{resp.status_code // 100}xx"
                await sent.start(resp.status_code, headers)
                await sent.body(data, more=False)
                return
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                obj = _loads_repaired(data)
                if obj is not None:  # invalid UTF-8 inside valid JSON: the client gets it repaired
                    self.gw.metrics.stream_events.labels("invalid_utf8").inc()
                    data = orjson.dumps(obj)
            if not isinstance(obj, dict):
                ex.upstream_error = "protocol"
                raise UpstreamError("upstream returned a body that is not a JSON object", code="upstream_protocol")
            max_attempts = policy.max_attempts
            pl = ResponsePipeline(policy, ctx, attempt=attempt, can_retry=attempt + 1 < max_attempts)
            extract = scan_body(ex.endpoint, obj, ex, pl)
            ex.outcomes.append(pl.outcome)
            if pl.flow is Flow.RETRY:
                attempt += 1
                body_bytes = _retry_body(raw_body, pl, ex)
                continue
            if pl.flow is Flow.BLOCK:
                ex.outcome = "blocked"
                status = policy.config.block_status
                ex.status = status
                err = block_error(pl.outcome.blocked_by, ex)
                await sent.start(status, [*JSON_HEADERS, (b"x-request-id", ex.request_id.encode())])
                await sent.body(orjson.dumps({"error": err}), more=False)
                return
            # the answer as the upstream gave it (before redaction), for the consistency re-ask
            first_answer = answer_of(ex.endpoint, obj) if eligible(ex, policy.config.consistency,
                                                                   self.gw.consistency.rng) else None
            if redact_body(ex.endpoint, obj, pl, extract):
                data = orjson.dumps(obj)
                ex.outcome = "redacted"
            if ex.strip_logprobs and _strip_logprobs(obj):
                data = orjson.dumps(obj)
            notes = [a for a in pl.outcome.applied if a.action != "observe"]
            if notes:
                headers.append((b"x-gapwatch-findings", orjson.dumps(summary(notes))))
            await sent.start(resp.status_code, headers)
            await sent.body(data, more=False)
            if first_answer is not None:  # after the client has its answer: never delays it
                self.gw.consistency.schedule(ex, upstream, url, fwd, body_bytes, first_answer,
                                             policy.config.consistency.max_in_flight)
            return

    async def _stream(self, sent: _SendGuard, ex: Exchange, upstream: Upstream, url: str,
                      fwd: dict[str, str], raw_body: bytes, policy: Policy, ctx: RequestContext) -> None:
        attempt = 0
        body_bytes = raw_body
        buffered = policy.config.buffer == "full" and policy.enforcing
        max_attempts = policy.max_attempts
        while True:
            resp = await self._open(ex, upstream, "POST", url, fwd, body_bytes)
            try:
                ex.status = resp.status_code
                if resp.status_code >= 400:
                    ex.upstream_error = f"status_{resp.status_code // 100}xx"
                    data = await self._read_all(ex, upstream, resp)
                    await sent.start(resp.status_code, _resp_headers(resp, ex.request_id))
                    await sent.body(data, more=False)
                    return
                _check_stream_response(ex, upstream, resp)
                pl = ResponsePipeline(policy, ctx, attempt=attempt,
                                      can_retry=buffered and attempt + 1 < max_attempts)
                ex.outcomes.append(pl.outcome)
                relay = StreamRelay(ex, pl, policy.rewrites)
                retry = await self._relay(sent, ex, upstream, resp, relay, buffered,
                                          _resp_headers(resp, ex.request_id))
            finally:
                await resp.aclose()
            if retry:
                attempt += 1
                body_bytes = _retry_body(raw_body, pl, ex)
                continue
            return

    async def _relay(self, sent: _SendGuard, ex: Exchange, upstream: Upstream, resp: Response,
                     relay: StreamRelay, buffered: bool, headers: list[tuple[bytes, bytes]] | None = None) -> bool:
        """Pump one upstream stream to the client. Returns True when the policy wants a retry
        (only possible while nothing has been sent: buffered mode). Without a pipeline
        (``relay.pipeline is None``) each event goes out as the upstream sent it."""
        parser = SSEParser(self.gw.config.server.max_sse_line_bytes)
        headers = headers or [*SSE_HEADERS, (b"x-request-id", ex.request_id.encode())]
        if not buffered and not sent.started:
            await sent.start(200, headers)
        held = bytearray()
        timer = StreamTimer(upstream.config.idle_timeout_seconds, upstream.config.max_stream_duration_seconds)
        try:
            while not relay.done:
                chunk = await self._next_chunk(ex, upstream, resp, timer)
                if chunk is None:
                    break
                now = time.perf_counter()
                try:
                    events = parser.feed(chunk)
                except LineTooLong:
                    self.gw.metrics.stream_events.labels("line_too_long").inc()
                    ex.upstream_error = "line_too_long"
                    raise UpstreamError("upstream sent an SSE line over server.max_sse_line_bytes",
                                        code="upstream_protocol") from None
                out = bytearray()
                for ev in events:  # after [DONE] too: those are counted, never sent
                    out += relay.on_event(ev, now)
                if out:
                    if buffered:
                        held += out
                    else:
                        await _send(sent, bytes(out), True, timer)
                if buffered and relay.pipeline is not None and relay.pipeline.flow is Flow.RETRY:
                    return True  # this answer is discarded: stop reading (and paying for) it
            timer.close()  # the rest is bounded per write (see _send)
            if not relay.done:
                for ev in parser.flush():
                    held_or_send = relay.on_event(ev, time.perf_counter())
                    if held_or_send:
                        if buffered:
                            held += held_or_send
                        else:
                            await _send(sent, held_or_send, True, timer)
            tail, clean = relay.on_eof()
            ex.upstream_ended = time.perf_counter()
        except UpstreamError as err:
            # mid-stream failure: finish detectors as truncated, end with an error event
            ex.status, ex.outcome = err.status, err.outcome
            tail = relay.on_abort()
            if buffered and not sent.started:
                raise
            if relay.blocked:
                ex.outcome = "blocked"
            else:
                tail += error_event(ex.endpoint, err.message, err.code or "upstream_error")
            timer.close()
            await _send(sent, bytes(held) + tail, False, timer)
            return False
        except (asyncio.CancelledError, ClientStalled):
            # the client left or stopped reading: nothing more is sent, but the detectors
            # finish on what arrived, so this response's findings reach incidents and metrics
            if not relay.done:
                with contextlib.suppress(Exception):
                    relay.on_abort()
            raise
        finally:
            timer.close()
            for kind in relay.anomalies:
                self.gw.metrics.stream_events.labels(kind).inc()
        pl = relay.pipeline
        if buffered and pl is not None and pl.flow is Flow.RETRY and not relay.blocked:
            return True
        if relay.blocked:
            ex.outcome = "blocked"
        elif relay.errored:  # the upstream's own error event ended the stream
            ex.outcome = "upstream_error"
            ex.upstream_error = ex.upstream_error or "error_event"
        if not clean:
            ex.outcome = "truncated"
            tail += error_event(ex.endpoint, "upstream ended the stream before it was complete",
                                "upstream_truncated")
        if buffered:
            await sent.start(200, headers)
        await _send(sent, bytes(held) + tail if buffered else tail, False, timer)
        if relay.done and not relay.blocked and clean:
            await _drain(resp)
        return False

    async def _models(self, sent: _SendGuard, ex: Exchange, client_auth: str | None) -> None:
        """The union of the models the configured routes can serve."""
        gw = self.gw
        seen: dict[str, dict[str, Any]] = {}
        for name, up in gw.upstreams.items():
            patterns = [r.match.model for r in gw.config.routes if r.upstream == name
                        and (r.match.tenant is None or (ex.tenant is not None
                                                        and glob_match(r.match.tenant, ex.tenant)))]
            if not patterns:
                continue
            fwd = up.auth_headers(client_auth, gw.tenants.enabled) | dict(up.config.headers)
            try:
                async with asyncio.timeout(up.config.connect_timeout_seconds + 5):
                    resp = await up.request("GET", up.target("/v1/models", b""), fwd)
                    try:
                        raw = await resp.aread()
                    finally:
                        resp.close()
                data = orjson.loads(raw).get("data", []) if resp.status_code == 200 else []
            except (HTTPError, TimeoutError, ValueError, AttributeError):
                data = []
            for m in data:
                mid = m.get("id") if isinstance(m, dict) else None
                if isinstance(mid, str) and any(glob_match(p, mid) for p in patterns):
                    seen.setdefault(mid, m)
        ex.status = 200
        await sent.start(200, [*JSON_HEADERS, (b"x-request-id", ex.request_id.encode())])
        await sent.body(orjson.dumps({"object": "list", "data": list(seen.values())}), more=False)


def prepare_request(gw: Gateway, ex: Exchange, policy: Policy, headers: dict[str, str],
                    raw_body: bytes) -> tuple[bytes, RequestContext]:
    """Per-request preparation for detectors that need it: plant a canary in the system
    message, register the tenant's context fingerprints, ask the upstream for logprobs.

    Detectors see the request as the app sent it (no canary); the upstream gets the changed
    body. Returns the body to send and the detectors' context."""
    assert ex.body is not None
    body = ex.body
    changed = False
    canaries: tuple[str, ...] = ()
    shared: dict[str, Any] = {}
    for entry in policy.entries:
        if entry.name == "canary":
            token = entry.settings.make(ex.request_id)  # type: ignore[attr-defined]
            gw.state.canaries.register(token)
            canaries = (*canaries, token)
            body = inject_canary(body, token, ex.endpoint)
            changed = True
            shared["canary"] = gw.state.canaries
        elif entry.name == "cross_tenant":
            shared["cross_tenant"] = gw.state.fingerprints
    if policy.config.request_logprobs and policy.wants_logprobs and ex.endpoint == "chat" \
            and not body.get("logprobs"):
        body = {**body, "logprobs": True}
        changed = True
        ex.strip_logprobs = True
    ctx = request_context(ex, headers, canaries, shared)
    if ex.tenant and "cross_tenant" in shared:
        for entry, det in zip(policy.entries, policy.detectors, strict=True):
            if entry.name == "cross_tenant":
                gw.state.fingerprints.add(ex.tenant, det.fingerprints_for_request(ctx))  # type: ignore[attr-defined]
    return (orjson.dumps(body) if changed else raw_body), ctx


def _watch_model(gw: Gateway, ex: Exchange) -> None:
    """The upstream-reported model identity (``proxy.model_watch``); a confirmed change goes to
    the alert engine. After the response: it can cost nothing the client waits for."""
    try:
        change = gw.model_watch.observe(ex)
    except Exception as exc:  # noqa: BLE001 - bookkeeping after the response must never fail a request
        gw.telemetry.failed("model_watch", exc)
        return
    if change is not None:
        gw.alerts.model_changed(change)


def _loads_repaired(data: bytes) -> Any:
    """JSON whose only fault is invalid UTF-8, decoded with U+FFFD; None when still invalid."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        try:
            return orjson.loads(data.decode("utf-8", "replace"))
        except orjson.JSONDecodeError:
            return None
    return None


async def _send(sent: _SendGuard, data: bytes, more: bool, timer: StreamTimer) -> None:
    """Send body bytes; a client that stops reading makes this wait (back-pressure: nothing
    more is pulled from the upstream meanwhile), but not past the stream's deadline. While the
    stream's timer runs it bounds the write; after it (the last writes) each write gets the
    time left, at least a second."""
    if timer.closed:
        try:
            async with asyncio.timeout(max(1.0, timer.remaining())):
                await sent.body(data, more=more)
        except TimeoutError:
            raise ClientStalled from None
        return
    try:
        await sent.body(data, more=more)
    except asyncio.CancelledError:
        if timer.claim() is None:
            raise
        raise ClientStalled from None


async def _drain(resp: Response, limit_bytes: int = 65536, timeout_seconds: float = 0.5) -> None:
    """After [DONE] (the client already has everything), read what is left of the upstream
    body — normally just the chunked terminator — so the connection returns to the pool
    instead of being closed: otherwise every stream costs a new upstream connection (and
    with a real provider, a TLS handshake)."""
    got = 0
    try:
        async with asyncio.timeout(timeout_seconds):
            while (chunk := await resp.read_chunk(raw=True)) is not None:
                got += len(chunk)
                if got > limit_bytes:
                    return
    except (TimeoutError, HTTPError):
        return


def _parse_json_body(raw: bytes, endpoint: str) -> dict[str, Any]:
    if not raw:
        raise BadRequest("request body is empty; send a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON ({str(exc).split(':')[0]})") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string", param="model")
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise BadRequest("'stream' must be a boolean", param="stream")
    if body.get("tools") is not None and not isinstance(body["tools"], list):
        raise BadRequest("'tools' must be an array", param="tools")
    if endpoint == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise BadRequest("'messages' must be an array of message objects", param="messages")
        for i, m in enumerate(msgs):
            if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
                raise BadRequest("'tool_calls' must be an array", param=f"messages[{i}].tool_calls")
    return body


def _retry_body(raw_body: bytes, pl: ResponsePipeline, ex: Exchange) -> bytes:
    """The request to send again. With ``retry_guidance`` the validation errors are appended
    as a system note (chat only); otherwise the identical request."""
    guidance = [a.finding.message for a in pl.outcome.retry_by
                if any(e.retry_guidance and e.name == a.finding.detector for e in pl.policy.entries)]
    if not guidance or ex.endpoint != "chat":
        return raw_body
    body = orjson.loads(raw_body)  # the body as sent upstream (canary, requested logprobs kept)
    note = ("Your previous answer was rejected: " + "; ".join(guidance[:5])
            + ". Answer again and follow the required format exactly.")
    body["messages"] = [*body.get("messages", []), {"role": "system", "content": note}]
    return orjson.dumps(body)


def _check_stream_response(ex: Exchange, upstream: Upstream, resp: Response) -> None:
    """A streaming request must get an event stream the proxy can decode, else 502."""
    ctype = resp.headers.get("content-type", "")
    if "text/event-stream" not in ctype.lower():
        ex.upstream_error = "protocol"
        raise UpstreamError("upstream answered a streaming request without an event stream "
                            f"(content-type {ctype.split(';')[0][:40]!r})", code="upstream_protocol")
    _check_encoding(ex, upstream, resp)


def _check_encoding(ex: Exchange, upstream: Upstream, resp: Response) -> None:
    """Detectors must see text: a body in an encoding the upstream client cannot decode is a
    protocol error (the compressed bytes would otherwise be read as if they were plain)."""
    encoding = hdrs.undecodable_encoding(resp.headers)
    if encoding is not None:
        ex.upstream_error = "protocol"
        raise UpstreamError(f"upstream '{upstream.name}' sent a body in an encoding gapwatch cannot decode "
                            f"({encoding[:20]!r})", code="upstream_protocol")


def _log_detector_errors(ex: Exchange) -> None:
    """One warning per detector failure (its name and the exception type or budget overrun,
    never the text it was reading); the metric counts them."""
    if ex.policy is None:
        return
    for outcome in ex.outcomes:
        for err in outcome.detector_errors:
            name, _, kind = err.partition(":")
            entry = next((e for e in ex.policy.entries if e.name == name), None)
            log.warning("detector %s failed (%s) on request %s; policy %s fails %s", name, kind, ex.request_id,
                        ex.policy.name, entry.on_error if entry is not None else "open")


def _resp_headers(resp: Response, request_id: str) -> list[tuple[bytes, bytes]]:
    out = hdrs.response_headers(resp.headers.raw)
    out = [(k, v) for k, v in out if k.lower() != b"x-request-id"]
    if hdrs.undecodable_encoding(resp.headers) is not None:  # the body is relayed still encoded
        out.append((b"content-encoding", resp.headers["content-encoding"].encode("latin-1")))
    out.append((b"x-request-id", request_id.encode()))
    return out


class _SendGuard:
    """Tracks what has been sent so the boundary knows whether an error can still be a status."""

    __slots__ = ("_send", "finished", "started")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.finished = False

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, more: bool) -> None:
        if self.finished:
            return
        if not more:
            self.finished = True
        await self._send({"type": "http.response.body", "body": data, "more_body": more})


async def _send_error(sent: _SendGuard, err: ProxyError, request_id: str) -> None:
    headers = [*JSON_HEADERS, (b"x-request-id", request_id.encode())]
    headers += [(k.encode(), v.encode()) for k, v in err.headers.items()]
    await sent.start(err.status, headers)
    await sent.body(err.to_bytes(), more=False)
