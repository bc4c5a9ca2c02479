"""Pooled upstream clients: one ``http1.Pool`` per configured upstream.

Only the configured origin is ever contacted: the client supplies a path and a query string,
never a scheme, host or port; redirects are not followed; proxy environment variables are not
consulted; no cookies are kept (one pool serves every tenant). Read timeouts are enforced by
the relay (first byte, idle, total) so each can be a separate knob.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, urlencode

from proxy.config import UpstreamConfig
from proxy.http1 import Pool, Response

# RFC 3986 pchar and "/": the client's (decoded) path is re-encoded with everything else escaped
_PATH_SAFE = "/:@!$&'()*+,;=~"
# a query string passes as the client sent it (escapes kept), anything unsafe escaped
_QUERY_SAFE = "/:@!$&'()*+,;=~?%"
_TARGET_CACHE_MAX = 1024


@dataclass
class Upstream:
    name: str
    config: UpstreamConfig
    pool: Pool
    api_key: str | None
    _targets: dict[tuple[str, bytes], str] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, name: str, config: UpstreamConfig) -> Upstream:
        pool = Pool(config.base_url, max_connections=config.max_connections,
                    connect_timeout=config.connect_timeout_seconds, connect_retries=config.connect_retries,
                    keepalive_expiry=config.keepalive_expiry_seconds, ca_file=config.tls_ca_file)
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        return cls(name=name, config=config, pool=pool, api_key=key)

    def target(self, path: str, query: bytes) -> str:
        """The request target (path and query) on this upstream for the client's ``path``
        (after ``/v1``) and raw query string; the configured ``query`` parameters win."""
        key = (path, query)
        t = self._targets.get(key)
        if t is None:
            suffix = path[3:] if path.startswith("/v1") else path
            t = (self.pool.base_path + quote(suffix, safe=_PATH_SAFE)) or "/"
            q = _query(query, self.config.query)
            if q:
                t += "?" + q
            if len(self._targets) < _TARGET_CACHE_MAX:
                self._targets[key] = t
        return t

    async def request(self, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> Response:
        return await self.pool.request(method, target, headers, body)

    def auth_headers(self, client_authorization: str | None, tenants_enabled: bool) -> dict[str, str]:
        """The upstream credential: the configured key, else (pass-through mode only) the
        client's own Authorization header. A tenant's proxy key is never forwarded."""
        if self.api_key:
            if self.config.auth_header == "authorization":
                return {"authorization": f"Bearer {self.api_key}"}
            return {self.config.auth_header: self.api_key}
        if not tenants_enabled and client_authorization:
            return {"authorization": client_authorization}
        return {}

    async def aclose(self) -> None:
        await self.pool.aclose()


def _query(client: bytes, configured: dict[str, str]) -> str:
    if not configured:  # the client's bytes as sent; only what is unsafe on the wire is escaped
        return quote(client, safe=_QUERY_SAFE) if client else ""
    pairs = [(k, v) for k, v in parse_qsl(client.decode("latin-1"), keep_blank_values=True) if k not in configured]
    return urlencode([*pairs, *configured.items()])
