"""Which request and response headers cross the proxy, and the request id.

Requests: an allow-list (content negotiation, OpenAI's own headers, tracing) — never
hop-by-hop headers, never the client's credentials unless the config passes them through,
never proxy or forwarding headers. Responses: everything the upstream sent except hop-by-hop
and framing headers, which the proxy's own server sets.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping

from proxy.http1 import DECODABLE

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
})

# forwarded from client to upstream (lower-case)
REQUEST_ALLOW = frozenset({
    b"content-type", b"accept", b"user-agent", b"openai-organization", b"openai-project",
    b"openai-beta", b"idempotency-key", b"traceparent", b"tracestate", b"baggage",
    b"x-stainless-arch", b"x-stainless-lang", b"x-stainless-os", b"x-stainless-package-version",
    b"x-stainless-runtime", b"x-stainless-runtime-version", b"x-stainless-retry-count",
    b"x-stainless-timeout", b"x-stainless-async", b"x-stainless-read-timeout",
})
REQUEST_ALLOW_PREFIXES = (b"x-sim-", b"anthropic-", b"x-goog-")

# dropped from upstream responses (the proxy frames the body itself)
# the upstream's date and server headers pass through (the proxy adds none of its own)
RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"content-encoding"}

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id(incoming: str | None) -> str:
    """Propagate a well-formed client request id; replace anything else (CR/LF, too long)."""
    if incoming and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return "gw-" + uuid.uuid4().hex


def forward_request_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    listed = _connection_tokens(raw)
    for k, v in raw:
        k = k.lower()
        if k in listed:
            continue
        if (k in REQUEST_ALLOW or k.startswith(REQUEST_ALLOW_PREFIXES)) and v.isascii():
            # non-ASCII values (legal obs-text on the wire) are dropped: ASCII only goes upstream
            out[k.decode("latin-1")] = v.decode("latin-1")
    return out


def _connection_tokens(raw: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in ``Connection`` are hop-by-hop too (RFC 9110 7.6.1)."""
    out: set[bytes] = set()
    for k, v in raw:
        if k.lower() == b"connection":
            out.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return out


def response_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    listed = _connection_tokens(raw)
    return [(k, v) for k, v in raw if k.lower() not in RESPONSE_DROP and k.lower() not in listed]


def undecodable_encoding(headers: Mapping[str, str]) -> str | None:
    """The first content coding of a response the upstream client cannot decode (it passes
    such bytes on undecoded), or None."""
    for token in headers.get("content-encoding", "").split(","):
        token = token.strip().lower()
        if token and token not in DECODABLE:
            return token
    return None
