"""Pooled upstream clients: one ``httpx.AsyncClient`` per configured upstream.

Redirects are never followed and proxy environment variables are not trusted
(``trust_env=False``): a request can only ever reach the configured base URL. Read timeouts
are enforced by the relay (first byte, idle, total) rather than by httpx, so each can be a
separate knob.
"""

from __future__ import annotations

import http.cookiejar
import logging
import os
from dataclasses import dataclass

import httpx

from proxy.config import UpstreamConfig


class _UrlWithoutSecrets(logging.Filter):
    """httpx logs every request's full URL at INFO. A query string can carry a key (an
    upstream's configured ``query``, a client's ``?api-key=``) and a URL can carry userinfo:
    the log line keeps scheme, host, port and path only."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 2 and isinstance(args[1], httpx.URL):
            url = args[1]
            if url.query or url.userinfo:
                port = f":{url.port}" if url.port is not None else ""
                safe = f"{url.scheme}://{url.host}{port}{url.path}" + ("?..." if url.query else "")
                record.args = (args[0], safe, *args[2:])
        return True


_URL_FILTER = _UrlWithoutSecrets()


def _install_log_filter() -> None:
    httpx_log = logging.getLogger("httpx")
    if _URL_FILTER not in httpx_log.filters:
        httpx_log.addFilter(_URL_FILTER)


@dataclass
class Upstream:
    name: str
    config: UpstreamConfig
    client: httpx.AsyncClient
    api_key: str | None

    @classmethod
    def build(cls, name: str, config: UpstreamConfig) -> Upstream:
        limits = httpx.Limits(max_connections=config.max_connections,
                              max_keepalive_connections=config.max_connections, keepalive_expiry=30)
        timeout = httpx.Timeout(connect=config.connect_timeout_seconds, read=None, write=30.0, pool=10.0)
        transport = httpx.AsyncHTTPTransport(limits=limits, retries=config.connect_retries)
        # one client serves every tenant: it must never store an upstream's Set-Cookie and send
        # it on someone else's request, so its cookie jar accepts nothing
        jar = http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        client = httpx.AsyncClient(transport=transport, timeout=timeout, follow_redirects=False,
                                   trust_env=False, cookies=jar)
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        _install_log_filter()
        return cls(name=name, config=config, client=client, api_key=key)

    def url(self, path: str, query: bytes) -> httpx.URL:
        """``path`` is the client's path after ``/v1``; only the path and query are taken from
        the client, never the scheme, host or port."""
        suffix = path[3:] if path.startswith("/v1") else path
        url = httpx.URL(self.config.base_url + suffix)
        params = httpx.QueryParams(query.decode("latin-1")) if query else httpx.QueryParams()
        for k, v in self.config.query.items():
            params = params.set(k, v)
        return url.copy_with(params=params) if params else url

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
        await self.client.aclose()
