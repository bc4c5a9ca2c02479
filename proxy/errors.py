"""The proxy's one error taxonomy.

    ProxyError                      (status, OpenAI error type, code, outcome label)
     ├── BadRequest                 400 invalid_request_error   malformed body, wrong types
     │    └── BodyTooLarge          413                          over server.max_body_bytes
     ├── Unauthorized               401 authentication_error    unknown proxy API key
     ├── NotFound                   404 invalid_request_error   no route for the model/path
     ├── Overloaded                 503 server_error            over the concurrency cap
     ├── UpstreamError              502 upstream_error          refused, DNS, reset, protocol
     │    └── UpstreamTimeout       504                          connect / first byte timeout
     └── OutputBlocked              400 content_filter          a policy blocked the output

Only the app boundary (``proxy.server``) turns these into responses; messages never contain
request content, keys or upstream bodies, so they are safe to log.
"""

from __future__ import annotations

from typing import Any

import orjson


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"
    outcome = "error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"message": self.message, "type": self.type, "code": self.code,
                               "param": self.param}
        err.update(self.extra)
        return {"error": err}

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.body())


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"
    outcome = "bad_request"


class BodyTooLarge(BadRequest):
    status = 413
    code = "request_too_large"


class Unauthorized(ProxyError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    outcome = "unauthorized"


class Forbidden(ProxyError):
    status = 403
    type = "permission_error"
    code = "forbidden"
    outcome = "unauthorized"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    outcome = "not_found"


class Overloaded(ProxyError):
    status = 503
    type = "server_error"
    code = "overloaded"
    outcome = "overloaded"


class UpstreamError(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"
    outcome = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class OutputBlocked(ProxyError):
    status = 400
    type = "content_filter"
    code = "output_blocked"
    outcome = "blocked"
