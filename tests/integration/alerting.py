"""Test helpers for the alert engine and shared state: wiring into a gateway, PII traffic, and
a proxy launcher for subprocess replicas.

``wire_alerts`` installs an ``AlertEngine`` and the configured state backend on a gateway
before it starts. While ``proxy.server.Gateway`` does not build them itself, it also wraps
``startup``/``shutdown`` and ``telemetry.finished``; once the Gateway has ``alerts`` and calls
``alerts.observe`` itself, only the objects are swapped (the Gateway's own calls reach them).
"""

from __future__ import annotations

import base64
import json
import os
import sys
from typing import Any

import httpx

from detectors import registry
from proxy.alerts import AlertEngine, AlertSettings
from proxy.state_redis import build_state

# an e-mail address: the PII the simulated provider starts leaking
LEAK = "Sure: write to jane.doe@example.com and she will sort it out."
CLEAN = "Sure: open the billing page and press the refund button."


def pii_detector() -> tuple[str, dict[str, Any]]:
    """``pii`` once it is registered; until then a ``regex`` detector for e-mail addresses."""
    if "pii" in registry.configs():
        return "pii", {"action": "observe"}
    return "regex", {"action": "observe", "patterns": {"email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"}}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def chat(client: httpx.Client, base_url: str, text: str, model: str = "sim-echo") -> int:
    r = client.post(f"{base_url}/v1/chat/completions", headers={"x-sim-output": b64(text)},
                    json={"model": model, "messages": [{"role": "user", "content": "How do I get a refund?"}]})
    return r.status_code


def wire_alerts(app: Any, settings: AlertSettings | None = None, **state_options: Any) -> AlertEngine:
    gw = app.gw
    state = build_state(gw.config, gw.metrics, **state_options)
    engine = AlertEngine(gw.config, gw.metrics, state, settings=settings)
    if hasattr(gw, "alerts"):  # the Gateway builds, starts and feeds them itself
        gw.state, gw.alerts = state, engine
        return engine
    gw.state, gw.alerts = state, engine
    startup, shutdown, finished = gw.startup, gw.shutdown, gw.telemetry.finished

    async def _startup() -> None:
        await startup()
        gw.state.start()
        gw.alerts.start()

    async def _shutdown() -> None:
        await gw.alerts.stop()
        await gw.state.stop()
        await shutdown()

    def _finished(ex: Any) -> None:
        finished(ex)
        gw.alerts.observe(ex)

    gw.startup, gw.shutdown, gw.telemetry.finished = _startup, _shutdown, _finished
    return engine


def serve() -> None:
    """Subprocess entry: ``python -c 'from tests.integration.alerting import serve; serve()'``
    with GAPWATCH_TEST_CONFIG (JSON config), GAPWATCH_TEST_PORT and optional
    GAPWATCH_TEST_OPTIONS (JSON: ``settings`` overrides and ``state`` options)."""
    import uvicorn

    from proxy.app import create_app
    from proxy.config import load_dict
    from proxy.metrics import Metrics

    cfg = json.loads(os.environ["GAPWATCH_TEST_CONFIG"])
    opts = json.loads(os.environ.get("GAPWATCH_TEST_OPTIONS", "{}"))
    app = create_app(load_dict(cfg), Metrics())
    settings = AlertSettings.from_config(app.gw.config, **opts.get("settings", {}))
    wire_alerts(app, settings, **opts.get("state", {}))
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["GAPWATCH_TEST_PORT"]), log_level="warning",
                access_log=False, lifespan="on", timeout_graceful_shutdown=2)


if __name__ == "__main__":  # pragma: no cover
    serve()
    sys.exit(0)
