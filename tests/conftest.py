from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from proxy.app import create_app
from proxy.config import load_dict
from proxy.metrics import Metrics
from tests.servers import ThreadServer


@pytest.fixture(scope="session")
def sim() -> Iterator[ThreadServer]:
    """The simulated provider on a free loopback port, shared by the whole run."""
    from proxy.simulate import create_app as sim_app

    srv = ThreadServer(sim_app()).start()
    yield srv
    srv.stop()


def proxy_config(sim_url: str, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "upstreams": {"sim": {"base_url": f"{sim_url}/v1"}},
        "routes": [{"match": {"model": "*"}, "upstream": "sim", "policy": "default"}],
        "policies": {"default": {"detectors": {}}},
        "incidents": {"sinks": []},
    }
    cfg.update(overrides)
    return cfg


class RunningProxy:
    def __init__(self, server: ThreadServer, app: Any) -> None:
        self.server = server
        self.app = app
        self.url = server.url
        self.base_url = server.url + "/v1"

    @property
    def gateway(self) -> Any:
        return self.app.gw

    @property
    def metrics(self) -> Metrics:
        return self.app.gw.metrics

    def client(self, **kw: Any) -> Any:
        import openai

        kw.setdefault("api_key", "sk-test-client-key")
        kw.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.base_url, **kw)

    def aclient(self, **kw: Any) -> Any:
        import openai

        kw.setdefault("api_key", "sk-test-client-key")
        kw.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.base_url, **kw)


@pytest.fixture
def start_proxy(sim: ThreadServer) -> Iterator[Callable[..., RunningProxy]]:
    """Factory: start a proxy (uvicorn, loopback) in front of the simulator with a config."""
    started: list[ThreadServer] = []

    def _start(config: dict[str, Any] | None = None, **overrides: Any) -> RunningProxy:
        cfg = config if config is not None else proxy_config(sim.url, **overrides)
        app = create_app(load_dict(cfg), Metrics())
        srv = ThreadServer(app).start()
        started.append(srv)
        return RunningProxy(srv, app)

    yield _start
    for srv in started:
        srv.stop()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def eventually(fn: Callable[[], Any], timeout: float = 3.0) -> Any:
    """Poll ``fn`` until it returns a truthy value: side effects run after the response."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def metric_value(registry: Any, name: str, **labels: str) -> float:
    total = 0.0
    for m in registry.collect():
        for s in m.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def require_halueval() -> None:
    """The HaluEval dev set lives in ../shared (outside the repo). Locally its absence skips;
    in CI (CI=true) it fails, so a missing data set can never pass silently."""
    import os

    from tests.eval.grounding_eval import data_path

    if data_path().exists():
        return
    message = f"HaluEval dev data not found at {data_path()}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must run with ../shared beside the clone)")
    pytest.skip(message)
