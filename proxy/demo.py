"""``gapwatch demo``: the simulated provider, the proxy with the bundled demo config, and a
traffic generator mixing scenarios, with a live summary that refreshes in place and the
built-in dashboard. Offline; Ctrl-C (or ``--duration``) stops everything cleanly, and the
same summary is printed once more at the end.

The summary is what a newcomer should see within seconds: per detector, how many findings
each action took; how many responses were blocked, redacted and annotated; and the last few
incidents with their masked evidence and request id (what an SRE would look up).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from proxy.app import create_app, uvicorn_options
from proxy.config import LoadedConfig, load_dict
from proxy.simulate import create_app as create_sim
from proxy.traffic import TrafficStats, generate

DEMO_CONFIG = Path(__file__).parent / "examples" / "demo.yaml"
RECENT_INCIDENTS = 5
# the simulated provider "ships a new model version" this many seconds in (or halfway through
# a shorter --duration), so the model watch has a change to show on the dashboard and alerts
MODEL_UPDATE_AFTER_SECONDS = 8.0
UPDATED_FINGERPRINT = "fp_demo_update"
FINAL_HEADER = "== final summary =="


def _free_port(preferred: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def demo_config(sim_port: int, admin_token: str) -> LoadedConfig:
    """The bundled demo config pointed at the simulator's port, with this run's admin token
    (the dashboard's data needs one)."""
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["upstreams"]["sim"]["base_url"] = f"http://127.0.0.1:{sim_port}/v1"
    raw.setdefault("server", {})["admin_token"] = admin_token
    return load_dict(raw)


def _samples(registry: Any, family: str) -> Iterable[Any]:
    for metric in registry.collect():
        if metric.name == family:
            yield from (s for s in metric.samples if s.name.endswith("_total"))


def findings_by_detector(registry: Any) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s in _samples(registry, "gapwatch_findings"):
        d = out.setdefault(s.labels["detector"], {})
        d[s.labels["action"]] = d.get(s.labels["action"], 0) + int(s.value)
    return {det: acts for det, acts in out.items() if any(acts.values())}


def responses_by_action(registry: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in _samples(registry, "gapwatch_actions"):
        out[s.labels["action"]] = out.get(s.labels["action"], 0) + int(s.value)
    return out


def _incident_line(r: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(float(r.get("ts") or 0)).strftime("%H:%M:%S")
    path = (r.get("attrs") or {}).get("path")
    what = f"{r.get('detector')}:{r.get('category')}" + (f" {path}" if isinstance(path, str) else "")
    evidence = r.get("evidence") or "-"
    return f"  {when}  {what:<40} {r.get('action', ''):<9} evidence {evidence:<24} request {r.get('request_id')}"


def render(stats: TrafficStats, gw: Any, elapsed: float, urls: dict[str, str]) -> str:
    """The summary: traffic, responses by action, findings per detector by action, recent incidents."""
    snap = stats.snapshot()
    acts = responses_by_action(gw.metrics.registry)
    lines = [
        f"gapwatch demo — proxy {urls['proxy']}/v1   ({elapsed:5.0f}s, Ctrl-C to stop)",
        f"dashboard {urls['dashboard']}   metrics {urls['proxy']}/metrics",
        f"requests sent {snap['sent']:6d}   ok {snap['ok']:6d}   errors {snap['errors']:5d}   "
        f"blocked {snap['blocked']:5d}   rate {snap['sent'] / max(elapsed, 1e-9):5.1f}/s",
        f"responses blocked {acts.get('block', 0)}   redacted {acts.get('redact', 0)}   "
        f"annotated {acts.get('annotate', 0)}",
        "findings by detector (action: count):",
    ]
    for det, by_action in sorted(findings_by_detector(gw.metrics.registry).items()):
        counts = "  ".join(f"{a}: {n}" for a, n in sorted(by_action.items()) if n)
        lines.append(f"  {det:<20} {counts}")
    changes = gw.model_watch.changes(100)
    lines.append(f"model changes seen {len(changes)}" + (
        f"   latest: {changes[0]['model']} now reports {changes[0]['after']['system_fingerprint']}" if changes else ""))
    lines.append("last incidents (evidence is masked):")
    lines += [_incident_line(r) for r in gw.telemetry.incidents.recent(RECENT_INCIDENTS)] or ["  none yet"]
    return "\n".join(lines)


async def _update_model(sim_url: str, after: float, stop: asyncio.Event) -> None:
    """The simulator starts reporting a new system fingerprint ``after`` seconds in."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), after)
        return
    async with httpx.AsyncClient(timeout=5.0) as client:
        await client.post(f"{sim_url}/sim/identity", json={"system_fingerprint": UPDATED_FINGERPRINT})


async def _main(port: int, duration: float) -> int:
    sim_port = _free_port(9000)
    proxy_port = _free_port(port)
    token = os.environ.get("GAPWATCH_ADMIN_TOKEN") or secrets.token_urlsafe(18)
    app = create_app(demo_config(sim_port, token))
    quiet = {"log_level": "warning", "access_log": False, "lifespan": "on"}
    # the simulator keeps uvicorn's date/server headers, as a provider sends its own; the proxy
    # passes them through and adds none of its own (as in `gapwatch serve`)
    sim_srv = uvicorn.Server(uvicorn.Config(create_sim(), host="127.0.0.1", port=sim_port, **quiet))
    proxy_srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=proxy_port, **uvicorn_options(2.0)))
    for s in (sim_srv, proxy_srv):
        s.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    tasks = [asyncio.create_task(sim_srv.serve()), asyncio.create_task(proxy_srv.serve())]
    while not (sim_srv.started and proxy_srv.started):
        if any(t.done() for t in tasks):
            print("gapwatch demo: a server failed to start", file=sys.stderr)
            return 1
        await asyncio.sleep(0.02)
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    urls = {"proxy": proxy_url, "dashboard": f"{proxy_url}/dashboard#token={token}"}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    stats = TrafficStats()
    traffic = asyncio.create_task(generate(proxy_url + "/v1", "sk-demo", stop, stats, concurrency=4,
                                           rate_per_second=10.0, seed=7))
    update_after = min(MODEL_UPDATE_AFTER_SECONDS, duration / 2) if duration else MODEL_UPDATE_AFTER_SECONDS
    updater = asyncio.create_task(_update_model(f"http://127.0.0.1:{sim_port}/v1", update_after, stop))
    tty = sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    started = time.monotonic()
    print(f"gapwatch demo: simulated provider on http://127.0.0.1:{sim_port}/v1, proxy on {proxy_url}/v1")
    print(f"point an app at it: OPENAI_BASE_URL={proxy_url}/v1")
    print(f"live dashboard: {urls['dashboard']}")
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        body = render(stats, app.gw, time.monotonic() - started, urls)
        sys.stdout.write(("\x1b[H\x1b[J" + body) if tty else body + "\n")
        sys.stdout.flush()
        if duration and time.monotonic() - started >= duration:
            stop.set()
    await traffic
    await updater
    await asyncio.sleep(0.1)  # the last exchanges' telemetry runs after their responses
    print(f"\n{FINAL_HEADER}\n{render(stats, app.gw, time.monotonic() - started, urls)}")
    proxy_srv.should_exit = True
    sim_srv.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    print("\ngapwatch demo stopped:", stats.snapshot())
    return 0


def run_demo(port: int = 8080, duration: float = 0) -> int:
    return asyncio.run(_main(port, duration))
