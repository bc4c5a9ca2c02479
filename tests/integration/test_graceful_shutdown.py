"""SIGTERM drains the proxy the way a container stop or a Kubernetes rollout does, without Docker:
the real ``gapwatch serve`` and ``gapwatch simulate-upstream`` processes on loopback.

On SIGTERM uvicorn stops accepting connections at once, lets in-flight responses finish for up
to ``server.shutdown_grace_seconds``, then cancels what is left; ``gapwatch serve`` exits 0.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port, wait_http

TEXT = "Draining keeps every word of this answer."  # 41 characters: 21 chunks of 2, 100 ms apart


def gapwatch_bin() -> str:
    exe = Path(sys.executable).with_name("gapwatch")
    found = str(exe) if exe.exists() else shutil.which("gapwatch")
    if not found:
        pytest.fail("the gapwatch console script is not installed (pip install -e '.[test]')")
    return found


@contextlib.contextmanager
def process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    with process([gapwatch_bin(), "simulate-upstream", "--host", "127.0.0.1", "--port", str(port)],
                 tmp_path_factory.mktemp("sim") / "sim.log"):
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/v1/models")
        yield url


def start_proxy(tmp_path: Path, sim_url: str, grace_seconds: float) -> tuple[list[str], str]:
    port = free_port()
    conf = tmp_path / "gapwatch.yaml"
    conf.write_text(
        f"server: {{shutdown_grace_seconds: {grace_seconds}}}\n"
        f"upstreams: {{sim: {{base_url: '{sim_url}/v1'}}}}\n"
        "routes: [{match: {model: '*'}, upstream: sim}]\n"
        "policies: {default: {detectors: {}}}\n"
        "incidents: {sinks: []}\n")
    args = [gapwatch_bin(), "serve", "--config", str(conf), "--host", "127.0.0.1", "--port", str(port)]
    return args, f"http://127.0.0.1:{port}"


def slow_stream_request(url: str) -> dict[str, object]:
    return {
        "method": "POST",
        "url": f"{url}/v1/chat/completions",
        "headers": {"x-sim-delay-ms": "100", "x-sim-chunk-chars": "2",
                    "x-sim-output": base64.b64encode(TEXT.encode()).decode(),
                    "authorization": "Bearer sk-test-client-key"},
        "json": {"model": "sim-echo", "stream": True, "messages": [{"role": "user", "content": "hello"}]},
        "timeout": 30.0,
    }


def text_of(data_lines: list[str]) -> str:
    parts = []
    for line in data_lines:
        if line == "[DONE]":
            continue
        for choice in json.loads(line).get("choices", []):
            parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def refused_or_503(url: str) -> bool:
    """A new client is turned away: connection refused (listener closed), closed without a
    response (accepted in the instant before the listener closed, then shut as idle), or 503."""
    try:
        r = httpx.get(f"{url}/readyz", timeout=1.0)
    except (httpx.ConnectError, httpx.RemoteProtocolError):
        return True
    return r.status_code == 503


def test_sigterm_lets_the_stream_finish_and_refuses_new_connections(tmp_path: Path, simulator: str):
    grace = 10.0
    args, url = start_proxy(tmp_path, simulator, grace)
    with process(args, tmp_path / "proxy.log") as proxy:
        wait_http(f"{url}/healthz")
        assert httpx.get(f"{url}/readyz").status_code == 200
        data: list[str] = []
        turned_away_while_streaming = False
        signalled_at = 0.0
        with httpx.stream(**slow_stream_request(url)) as resp:  # type: ignore[arg-type]
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                data.append(line[len("data: "):])
                if len(data) == 3:
                    proxy.send_signal(signal.SIGTERM)
                    signalled_at = time.monotonic()
                    # uvicorn notices within its 0.1 s tick and closes the listener
                    deadline = signalled_at + 1.5
                    while time.monotonic() < deadline and not turned_away_while_streaming:
                        turned_away_while_streaming = refused_or_503(url)
                        time.sleep(0.05)
        stream_done_at = time.monotonic()
        assert signalled_at, "the stream ended before the signal could be sent"
        assert turned_away_while_streaming, "a new connection was accepted while draining"
        assert stream_done_at - signalled_at > 1.0, "the stream should have outlived the signal by ~1.8 s"
        assert data[-1] == "[DONE]"
        assert text_of(data) == TEXT
        rc = proxy.wait(timeout=grace)
        exited_after = time.monotonic() - signalled_at
    assert rc == 0, (tmp_path / "proxy.log").read_text()
    assert exited_after < grace


def test_sigterm_cuts_streams_that_outlast_the_grace_period(tmp_path: Path, simulator: str):
    grace = 0.5
    args, url = start_proxy(tmp_path, simulator, grace)
    with process(args, tmp_path / "proxy.log") as proxy:
        wait_http(f"{url}/healthz")
        data: list[str] = []
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                with httpx.stream(**slow_stream_request(url)) as resp:  # type: ignore[arg-type]
                    for line in resp.iter_lines():
                        if line.startswith("data: "):
                            data.append(line[len("data: "):])
            except httpx.HTTPError as exc:  # the server closing mid-body is the expected end
                errors.append(exc)

        reader = threading.Thread(target=consume)
        reader.start()
        deadline = time.monotonic() + 5
        while len(data) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(data) >= 3
        proxy.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        rc = proxy.wait(timeout=grace + 5)
        exited_after = time.monotonic() - signalled_at
        reader.join(timeout=5)
    assert rc == 0, (tmp_path / "proxy.log").read_text()
    # the grace period bounds the shutdown: well before the stream's remaining ~1.8 s
    assert exited_after < grace + 1.0
    assert "[DONE]" not in data  # cut, never passed off as complete
    assert len(TEXT) > len(text_of(data))
