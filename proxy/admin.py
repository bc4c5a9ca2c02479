"""Health, readiness, metrics and admin endpoints (FastAPI: off the hot path).

Admin routes need ``Authorization: Bearer <server.admin_token>``; with no token configured
they are disabled (403), never open.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.errors import Forbidden, ProxyError, Unauthorized


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

    return app
