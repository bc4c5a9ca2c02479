"""Health, readiness, metrics, admin and dashboard endpoints (FastAPI: off the hot path).

Admin routes need ``Authorization: Bearer <server.admin_token>``; with no token configured
they are disabled (403), never open. The dashboard (``dashboard.enabled``) is a static page
plus ``/dashboard/data``, which needs the same token: the page holds no data of its own and
reads the token from its URL fragment (never sent to a server or written to a log).
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.errors import Forbidden, NotFound, ProxyError, Unauthorized

STATIC = Path(__file__).resolve().parent / "static"
# the files the page loads: name -> content type (nothing else under static/ is served)
DASHBOARD_FILES = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8",
                   "chart.umd.min.js": "text/javascript; charset=utf-8"}
# the page runs only its own scripts and talks only to this origin
PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "cache-control": "no-store",
}


def build_admin_app(gateway: Any, serve_metrics: bool = True, serve_admin: bool = True) -> FastAPI:
    app = FastAPI(title="gapwatch admin", docs_url=None, redoc_url=None, openapi_url=None)
    token = gateway.config.server.admin_token

    @app.exception_handler(ProxyError)
    async def _proxy_error(request: Any, exc: ProxyError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def require_admin(authorization: str | None) -> None:
        if token is None:
            raise Forbidden("admin endpoints are disabled: set server.admin_token")
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized("admin endpoints need 'Authorization: Bearer <admin token>'")
        if not hmac.compare_digest(authorization[7:].strip().encode(), token.get_secret_value().encode()):
            raise Unauthorized("invalid admin token")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ok = gateway.ready and not gateway.draining
        return JSONResponse({"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503)

    if serve_metrics:
        @app.get("/metrics")
        async def metrics() -> Response:
            # Metrics.payload: this process's registry, or every worker's values summed in
            # multiprocess mode (gapwatch serve --workers N)
            return Response(gateway.metrics.payload(), media_type=CONTENT_TYPE_LATEST)

    if serve_admin:
        @app.get("/admin/incidents")
        async def incidents(authorization: Annotated[str | None, Header()] = None,
                            limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
            require_admin(authorization)
            return {"incidents": gateway.telemetry.incidents.recent(limit)}

        @app.get("/admin/alerts")
        async def alerts(authorization: Annotated[str | None, Header()] = None,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
            require_admin(authorization)
            return {"active": gateway.alerts.active(), "history": gateway.alerts.history(limit)}

        @app.get("/admin/model-changes")
        async def model_changes(authorization: Annotated[str | None, Header()] = None,
                                limit: Annotated[int, Query(ge=1, le=100)] = 100) -> dict[str, Any]:
            """The upstream-reported model identities in use and their recent changes (newest
            first): what the built-in dashboard draws as model-change annotations."""
            require_admin(authorization)
            watch = gateway.model_watch
            return {"current": watch.current(), "changes": watch.changes(limit)}

        @app.get("/admin/policies")
        async def policies(authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
            require_admin(authorization)
            return {"policies": {
                name: {"shadow": p.config.shadow, "holdback_chars": p.holdback_chars,
                       "enforcing": p.enforcing,
                       "detectors": {e.name: e.action for e in p.entries}}
                for name, p in gateway.policies.items()}}

    if serve_admin and getattr(gateway, "dashboard", None) is not None:
        _dashboard_routes(app, gateway, require_admin)
    return app


def _dashboard_routes(app: FastAPI, gateway: Any, require_admin: Any) -> None:
    page = (STATIC / "dashboard.html").read_bytes()
    files = {name: (STATIC / name).read_bytes() for name in DASHBOARD_FILES}

    @app.get("/dashboard")
    async def dashboard_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/dashboard/static/{name}")
    async def dashboard_file(name: str) -> Response:
        if name not in files:
            raise NotFound(f"no dashboard file {name[:40]!r}")
        return Response(files[name], media_type=DASHBOARD_FILES[name],
                        headers={"x-content-type-options": "nosniff", "cache-control": "max-age=300"})

    @app.get("/dashboard/data")
    async def dashboard_data(authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
        require_admin(authorization)
        return JSONResponse(gateway.dashboard.data(), headers={"cache-control": "no-store"})
