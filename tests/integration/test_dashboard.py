"""The built-in dashboard as a newcomer meets it: ``gapwatch demo`` serves it with live data,
headless Chromium draws every panel with no console error (the screenshot is kept under
tests/artifacts/), the data needs the admin token, carries no prompt or output text beyond the
masked evidence, and ``gapwatch serve`` has no dashboard unless it is enabled.

Chromium is a test dependency: without it the test fails and names the Debian package.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy.simulate import SCENARIO_OUTPUTS, SECRET_VALUES
from tests.conftest import proxy_config
from tests.integration.test_report_chromium import chromium

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"  # gitignored; CI keeps what is here
GAPWATCH = Path(sys.executable).parent / "gapwatch"
PANELS = ("traffic", "findings", "actions", "latency", "scorecard", "incidents", "model_changes", "alerts")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _data(url: str, token: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{url}/dashboard/data", headers=headers, timeout=5)


def _wait_for_every_panel(url: str, token: str, within: float = 40.0) -> dict[str, Any]:
    """Polls the data until each panel has something to show (the demo's model update comes
    some seconds in, its alerts after a few evaluations)."""
    deadline = time.monotonic() + within
    d: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = _data(url, token)
        if r.status_code == 200:
            d = r.json()
            if all(d[k] for k in ("findings", "scorecard", "incidents", "model_changes", "alerts")) \
                    and len(d["traffic"]["t"]) >= 3 and d["totals"]["blocked"] and d["totals"]["redacted"]:
                return d
        time.sleep(0.5)
    pytest.fail(f"the dashboard data never covered every panel: {str(d)[:2000]}")


def _chromium(profile: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", "--window-size=1400,2600",
           "--virtual-time-budget=5000", *args, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _console(stderr: str) -> list[str]:
    """The page's console messages (Chromium logs them as ``INFO:CONSOLE``): the dashboard
    writes none, so any is an error, a CSP violation or an exception."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def demo():
    token = secrets.token_urlsafe(12)
    port = _free_port()
    proc = subprocess.Popen([str(GAPWATCH), "demo", "--port", str(port), "--duration", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "TERM": "dumb", "GAPWATCH_ADMIN_TOKEN": token})
    assert proc.stdout is not None
    head = b""
    while b"live dashboard:" not in head:
        line = proc.stdout.readline()
        assert line, head.decode(errors="replace")
        head += line
    url = f"http://127.0.0.1:{port}"
    assert f"live dashboard: {url}/dashboard#token={token}".encode() in head  # what `make demo` prints
    yield url, token
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_every_panel_draws_in_chromium_without_console_errors(demo, tmp_path):
    url, token = demo
    _wait_for_every_panel(url, token)
    page = f"{url}/dashboard#token={token}"
    dom = _chromium(tmp_path / "p1", page, "--dump-dom")
    assert _console(dom.stderr) == [], _console(dom.stderr)
    filled = dict(re.findall(r'data-panel="([a-z_]+)"(?: data-filled="(\w+)")?', dom.stdout))
    assert set(filled) == set(PANELS)
    assert {p: v for p, v in filled.items() if v != "true"} == {}, "panels without data"
    assert re.search(r'id="status" class="status">updated \d', dom.stdout), "the page never loaded its data"
    for table in ("scorecard", "incidents", "model-changes", "alerts"):
        body = re.search(rf'<table id="{table}">.*?<tbody>(.*?)</tbody>', dom.stdout, re.S)
        assert body and "<tr>" in body[1] and 'class="empty"' not in body[1], table
    assert "fp_demo_update" in dom.stdout  # the model watch's change is on the page

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    res = _chromium(tmp_path / "p2", page, f"--screenshot={shot}")
    assert _console(res.stderr) == [], _console(res.stderr)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000, "the screenshot is blank"


def test_data_needs_the_token_and_carries_no_prompt_or_output_text(demo):
    url, token = demo
    assert _data(url, None).status_code == 401
    assert _data(url, token + "x").status_code == 401
    d = _wait_for_every_panel(url, token)
    text = orjson.dumps(d).decode()
    for output in SCENARIO_OUTPUTS.values():
        for line in (s for s in output.splitlines() if len(s) >= 16):
            assert line[:16] not in text, line
    for value in SECRET_VALUES.values():
        assert value not in text
    assert {k for r in d["incidents"] for k in r} <= {"ts", "request_id", "route", "model", "detector", "category",
                                                     "severity", "action", "evidence", "path"}
    # the page itself is static: no data without the token, scripts only from this origin
    page = httpx.get(f"{url}/dashboard", timeout=5)
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert "sim-" not in page.text


def test_off_by_default_in_serve_and_needs_the_token_when_on(start_proxy, sim):
    off = start_proxy(proxy_config(sim.url, server={"admin_token": "t0ken"}))
    assert httpx.get(f"{off.url}/dashboard", timeout=5).status_code == 404
    assert _data(off.url, "t0ken").status_code == 404
    on = start_proxy(proxy_config(sim.url, server={"admin_token": "t0ken"}, dashboard={"enabled": True}))
    assert httpx.get(f"{on.url}/dashboard", timeout=5).status_code == 200
    assert _data(on.url, None).status_code == 401
    r = _data(on.url, "t0ken")
    assert r.status_code == 200 and set(r.json()) >= {"traffic", "findings", "scorecard", "incidents", "alerts",
                                                      "model_changes", "latency", "totals"}
