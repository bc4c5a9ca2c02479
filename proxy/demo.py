"""``gapwatch demo``: the simulated provider, the proxy with the bundled demo config, and a
traffic generator mixing scenarios, with a live summary that refreshes in place. Offline;
Ctrl-C stops everything cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

import uvicorn
import yaml

from proxy.app import create_app
from proxy.config import load_dict
from proxy.simulate import create_app as create_sim
from proxy.traffic import TrafficStats, generate

DEMO_CONFIG = Path(__file__).parent / "examples" / "demo.yaml"


def _free_port(preferred: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def _findings_by_detector(app: object) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for metric in app.gw.metrics.registry.collect():  # type: ignore[attr-defined]
        if metric.name != "gapwatch_findings":
            continue
        for s in metric.samples:
            if s.name.endswith("_total"):
                d = out.setdefault(s.labels["detector"], {})
                d[s.labels["action"]] = d.get(s.labels["action"], 0) + s.value
    return out


def _render(stats: TrafficStats, app: object, started: float, proxy_url: str, tty: bool) -> str:
    snap = stats.snapshot()
    elapsed = time.monotonic() - started
    lines = [
        f"gapwatch demo — proxy {proxy_url}/v1   metrics {proxy_url}/metrics   ({elapsed:5.0f}s, Ctrl-C to stop)",
        f"requests sent {snap['sent']:6d}   ok {snap['ok']:6d}   errors {snap['errors']:5d}   "
        f"blocked {snap['blocked']:5d}   rate {snap['sent'] / max(elapsed, 1e-9):5.1f}/s",
        "findings by detector (action: count):",
    ]
    for det, actions in sorted(_findings_by_detector(app).items()):
        acts = "  ".join(f"{a}: {int(n)}" for a, n in sorted(actions.items()))
        lines.append(f"  {det:<20} {acts}")
    body = "\n".join(lines)
    return ("\x1b[H\x1b[J" + body) if tty else body + "\n"


async def _main(port: int, duration: float) -> int:
    sim_port = _free_port(9000)
    proxy_port = _free_port(port)
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["upstreams"]["sim"]["base_url"] = f"http://127.0.0.1:{sim_port}/v1"
    app = create_app(load_dict(raw))
    common = {"log_level": "warning", "access_log": False, "lifespan": "on"}
    sim_srv = uvicorn.Server(uvicorn.Config(create_sim(), host="127.0.0.1", port=sim_port, **common))
    proxy_srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=proxy_port, **common))
    for s in (sim_srv, proxy_srv):
        s.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    tasks = [asyncio.create_task(sim_srv.serve()), asyncio.create_task(proxy_srv.serve())]
    while not (sim_srv.started and proxy_srv.started):
        if any(t.done() for t in tasks):
            print("gapwatch demo: a server failed to start", file=sys.stderr)
            return 1
        await asyncio.sleep(0.02)
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    stats = TrafficStats()
    traffic = asyncio.create_task(generate(proxy_url + "/v1", "sk-demo", stop, stats, concurrency=4,
                                           rate_per_second=10.0, seed=7))
    tty = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    started = time.monotonic()
    print(f"gapwatch demo: simulated provider on http://127.0.0.1:{sim_port}/v1, proxy on {proxy_url}/v1")
    print(f"point an app at it: OPENAI_BASE_URL={proxy_url}/v1")
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        sys.stdout.write(_render(stats, app, started, proxy_url, tty))
        sys.stdout.flush()
        if duration and time.monotonic() - started >= duration:
            stop.set()
    await traffic
    proxy_srv.should_exit = True
    sim_srv.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    print("\ngapwatch demo stopped:", stats.snapshot())
    return 0


def run_demo(port: int = 8080, duration: float = 0) -> int:
    return asyncio.run(_main(port, duration))
