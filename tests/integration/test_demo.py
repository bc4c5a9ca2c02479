"""`gapwatch demo` (what `make demo` runs) as a newcomer sees it: traffic within seconds, a
live summary, a proxy that answers, and Ctrl-C stopping everything cleanly."""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

GAPWATCH = Path(sys.executable).parent / "gapwatch"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_shows_traffic_within_seconds_and_stops_cleanly_on_ctrl_c():
    assert GAPWATCH.exists(), f"console script missing: {GAPWATCH} (pip install -e .)"
    port = _free_port()
    proc = subprocess.Popen([str(GAPWATCH), "demo", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "TERM": "dumb"})
    out = b""
    try:
        sel = selectors.DefaultSelector()
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        ok = 0
        while time.monotonic() < deadline and ok == 0:
            for _key, _ in sel.select(timeout=0.5):
                out += proc.stdout.read() or b""
            ok = max((int(m) for m in re.findall(rb"ok\s+(\d+)", out)), default=0)
            assert proc.poll() is None, out.decode(errors="replace")
        text = out.decode(errors="replace")
        assert ok > 0, f"no successful demo traffic within 30 s:\n{text}"
        assert f"OPENAI_BASE_URL=http://127.0.0.1:{port}/v1" in text
        sim_port = int(re.search(r"simulated provider on http://127\.0\.0\.1:(\d+)/v1", text).group(1))
        # the proxy the summary points at answers, and counts what the generator sent
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        served = sum(float(v) for v in re.findall(r'^gapwatch_requests_total\{[^}]*\} ([0-9.e+]+)$', metrics, re.M))
        assert served >= ok
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"authorization": "Bearer sk-demo"},
                           timeout=5).json()
        assert any(m["id"] == "sim-echo" for m in models["data"])

        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=20)
        text += rest.decode(errors="replace")
        assert proc.returncode == 0, text
        assert "gapwatch demo stopped" in text
        assert "Traceback" not in text
        assert not _listening(port) and not _listening(sim_port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
