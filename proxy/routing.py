"""Authentication of proxy API keys (tenants) and route selection (first match wins)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from proxy.config import Config, RouteConfig, glob_match
from proxy.errors import NotFound, Unauthorized


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    policy: str | None


class Tenants:
    """Maps a bearer key to a tenant by its sha256 digest (constant-time compare)."""

    def __init__(self, config: Config) -> None:
        self._by_digest: dict[bytes, Tenant] = {}
        for t in config.tenants:
            if t.key_sha256:
                digest = bytes.fromhex(t.key_sha256)
            else:
                digest = hashlib.sha256(os.environ[t.key_env or ""].encode()).digest()
            self._by_digest[digest] = Tenant(t.name, t.policy)

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> Tenant:
        key = None
        if authorization and authorization[:7].lower() == "bearer ":
            key = authorization[7:].strip()
        elif api_key:
            key = api_key.strip()
        if not key:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <your gapwatch key>'")
        # keyed by the key's sha256: a dict lookup reveals nothing useful through timing
        tenant = self._by_digest.get(hashlib.sha256(key.encode()).digest())
        if tenant is not None:
            return tenant
        raise Unauthorized("invalid API key for this gapwatch proxy")


class Router:
    def __init__(self, config: Config) -> None:
        self._routes = config.routes

    def select(self, model: str, path: str, tenant: str | None) -> tuple[int, RouteConfig]:
        for i, r in enumerate(self._routes):
            m = r.match
            if not glob_match(m.model, model):
                continue
            if m.path is not None and not glob_match(m.path, path):
                continue
            if m.tenant is not None and (tenant is None or not glob_match(m.tenant, tenant)):
                continue
            return i, r
        raise NotFound(f"no route serves the requested model on {path}; add a route whose match covers it",
                       param="model")

    def route_name(self, index: int) -> str:
        r = self._routes[index]
        return r.name or f"route{index}"
