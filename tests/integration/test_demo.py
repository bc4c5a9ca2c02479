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


FAMILIES = ("schema", "pii", "secrets", "system_prompt_leak", "injection", "grounding", "transparency")


def _final_summary(text: str) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """(findings per detector by action, responses by action) from the summary printed at the end."""
    final = text.split("== final summary ==", 1)[1]
    per_detector: dict[str, dict[str, int]] = {}
    section = final.split("findings by detector (action: count):", 1)[1].split("model changes seen", 1)[0]
    for line in section.strip().splitlines():
        det, *counts = line.split()
        per_detector[det] = {a.rstrip(":"): int(n) for a, n in zip(counts[::2], counts[1::2], strict=True)}
    m = re.search(r"responses blocked (\d+)\s+redacted (\d+)\s+annotated (\d+)", final)
    assert m, final
    return per_detector, {"block": int(m[1]), "redact": int(m[2]), "annotate": int(m[3])}


def test_demo_duration_20_shows_every_family_acting_and_exits_0():
    port = _free_port()
    proc = subprocess.Popen([str(GAPWATCH), "demo", "--port", str(port), "--duration", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "TERM": "dumb"})
    try:
        assert proc.stdout is not None
        head = b""
        while b"live dashboard:" not in head:
            line = proc.stdout.readline()
            assert line, head.decode(errors="replace")
            head += line
        # what a client gets through the demo proxy: one date, one server (the simulator's)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"authorization": "Bearer sk-demo"},
                       json={"model": "sim-clean", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        assert r.status_code == 200, r.text
        for name in ("date", "server", "content-type", "content-length"):
            assert len(r.headers.get_list(name)) <= 1, (name, r.headers.raw)
        assert len(r.headers.get_list("date")) == 1
        dashboard_url = re.search(rb"live dashboard: (\S+)", head)[1].decode()
        assert dashboard_url.startswith(f"http://127.0.0.1:{port}/dashboard#token=")
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (head + rest).decode(errors="replace")
    assert proc.returncode == 0, text
    assert "Traceback" not in text
    per_detector, responses = _final_summary(text)
    for family in FAMILIES:
        assert sum(per_detector.get(family, {}).values()) > 0, f"{family} never fired:\n{text[-3000:]}"
    assert per_detector["secrets"].get("redact", 0) > 0 and per_detector["pii"].get("redact", 0) > 0
    assert per_detector["schema"].get("block", 0) > 0 and per_detector["injection"].get("block", 0) > 0
    assert per_detector["system_prompt_leak"].get("annotate", 0) > 0
    assert per_detector["injection"].get("annotate", 0) > 0
    assert all(set(per_detector[d]) == {"observe"} for d in ("grounding", "transparency"))
    assert responses["block"] > 0 and responses["redact"] > 0
    changes = re.search(r"model changes seen (\d+)", text.split("== final summary ==", 1)[1])
    assert changes and int(changes[1]) > 0  # the simulator's new model version was noticed
    incidents = text.split("last incidents (evidence is masked):")[-1]
    assert re.search(r"request gw-[0-9a-f]{32}", incidents), incidents
