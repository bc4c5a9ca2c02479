"""Application factory: config -> gateway -> ASGI app. Also the import-string entry points
uvicorn needs when it runs several worker processes."""

from __future__ import annotations

import os
from typing import Any

from proxy.admin import build_admin_app
from proxy.config import LoadedConfig, load
from proxy.metrics import Metrics
from proxy.server import Gateway, ProxyApp


def uvicorn_options(shutdown_grace_seconds: float) -> dict[str, Any]:
    """How gapwatch runs its listeners under uvicorn (``serve`` and ``demo``): no access log;
    X-Forwarded-For from clients not trusted (and no middleware per request for it); no
    ``server``/``date`` headers of uvicorn's own, because the upstream's pass through and a
    response must not carry them twice."""
    return {"log_level": "warning", "access_log": False, "lifespan": "on", "proxy_headers": False,
            "server_header": False, "date_header": False, "timeout_graceful_shutdown": shutdown_grace_seconds}


def create_app(loaded: LoadedConfig, metrics: Metrics | None = None,
               separate_admin: bool = False) -> ProxyApp:
    gw = Gateway(loaded, metrics)
    admin = build_admin_app(gw, serve_metrics=not separate_admin, serve_admin=not separate_admin)
    return ProxyApp(gw, admin)


def from_env() -> ProxyApp:
    """uvicorn ``--factory`` entry for multi-worker mode: config from GAPWATCH_CONFIG or
    GAPWATCH_UPSTREAM (set by ``gapwatch serve``)."""
    loaded = load(os.environ.get("GAPWATCH_CONFIG") or None, os.environ.get("GAPWATCH_UPSTREAM") or None)
    return create_app(loaded, separate_admin=os.environ.get("GAPWATCH_SEPARATE_ADMIN") == "1")
