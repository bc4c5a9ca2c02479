"""gapwatch's proxy core side by side with peer gateways, in one run, on the same requests and
the same simulated upstream: direct to ``gapwatch simulate-upstream``, through gapwatch (a policy
with no detectors, as ``proxy_core`` runs it), through nginx, through the Portkey AI gateway and
through the LiteLLM proxy.

    make bench                                          (runs every bench_*.py, this one included)
    .venv/bin/python -m tests.bench.bench_gateways      (this one alone)

Why these peers: nginx is the floor (a C reverse proxy that parses no JSON and no SSE; what any
proxy in the path costs at least); Portkey (Node) and LiteLLM (Python) are LLM gateways that,
like gapwatch, understand the OpenAI wire format. The question a reader has is "what does
putting gapwatch in the path cost, next to what I would otherwise put there".

How it is measured is ``proxy_core``'s method, reused (``raw_batch``, ``wrk_batch``, ``Cell``):
cells non-streaming at concurrency 1 and 32, and a 50-chunk stream (each chunk its own write)
at concurrency 1; 3 rounds per cell, the target order rotating each round so drift in machine
load hits every target alike; CPU of every process read from ``/proc`` right before and after
each batch. A gateway's CPU is that of its whole process tree (nginx: master + worker), so
gateways that fork are not flattered. The loop is this module's own rather than
``run_side_by_side`` because that one raises on the first failed batch: here a peer that
fails (or dies) mid-run is dropped with its reason and the others go on.

The peers are bench-only tools, never in the product's ``.venv``; each one that cannot be
installed, started or verified is skipped with a printed reason:

- nginx: taken from PATH (``apt-get install -y nginx``; the bench never runs apt). Config
  written into the bench's temporary directory (prefix, conf, pid, logs): ``daemon off``,
  master process on, ``worker_processes 1``, ``proxy_pass`` to an upstream block with
  ``keepalive 64``, HTTP/1.1 upstream with an empty ``Connection`` header, ``proxy_buffering
  off`` (each upstream read is relayed at once, as a streaming gateway must), ``access_log
  off`` and keep-alive request limits raised (nginx closes a client connection after 1000
  requests by default, which a closed-loop client would count as an error).
- Portkey: ``npm install --prefix .venv/gateways/portkey @portkey-ai/gateway@1.15.2`` plus two
  pins: the package's own dependency ranges resolve ``@hono/node-server`` to a 1.19 release
  whose Response wrapper keeps the upstream fetch Response's immutable headers, and Portkey's
  stream path then fails with ``TypeError: immutable`` on every streamed request
  (Portkey-AI/gateway#1389); 1.14.1 still copies them (1.14.2 and the 1.19 line do not), and
  ``@hono/node-ws@1.2.0`` is in Portkey's range with a peer range that accepts it (1.3.1, what
  the range resolves to, wants ``@hono/node-server`` ^1.19.11).
  Started as ``node build/start-server.js --port=N --headless``; its server listens on every
  interface and has no host option, so a preload (``--require``) binds a port-only
  ``listen()`` to 127.0.0.1. Requests carry ``x-portkey-provider: openai``,
  ``x-portkey-custom-host: <simulator>/v1`` (127.0.0.1 is in its default trusted hosts) and
  ``x-portkey-forward-headers`` naming the ``x-sim-*`` headers, which choose the simulator's
  answer. Portkey's stream reader sleeps 25 ms before relaying the first event of every stream
  (``setTimeout(..., 25)`` in its build): that is in its stream latency, not in its CPU.
- LiteLLM: ``litellm[proxy]`` pinned in ``gateways_requirements.txt``, in its own venv
  ``.venv/litellm``. One worker; ``model_list``: ``sim-echo`` -> ``openai/sim-echo`` at the
  simulator's ``/v1`` with a dummy key; ``forward_client_headers_to_llm_api`` (forwards the
  ``x-sim-*`` headers); ``LITELLM_LOCAL_MODEL_COST_MAP=True`` and
  ``LITELLM_TELEMETRY_DISABLED=true`` so it never reaches for the network. This release
  refuses to start without a master key unless told it is a development setup, so it gets a
  random strong one and its requests carry it as the bearer token (every request is then
  authenticated, as in any real deployment of it). Its uvicorn access log stays on (its
  default).

Before measuring, one non-streaming and one streaming request through each gateway must return
the simulator's answer (``ANSWER_200``, rebuilt from the stream's content deltas); otherwise
that peer is skipped with the reason and the tail of its log.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import orjson
import yaml

from tests.bench.proxy_core import (
    ANSWER_200,
    LOOPBACK,
    MODES,
    ROUNDS,
    Cell,
    Server,
    Spec,
    batch_seconds,
    fmt,
    free_port,
    pct,
    proc_cpu_seconds,
    proxy_config,
    raw_batch,
    scale,
    start_proxy,
    start_simulator,
    table,
    workdir,
    wrk_available,
    wrk_batch,
    wrk_script,
)

ROOT = Path(__file__).resolve().parents[2]
GATEWAYS_DIR = ROOT / ".venv" / "gateways"
PORTKEY_DIR = GATEWAYS_DIR / "portkey"
PORTKEY_PINS = ("@portkey-ai/gateway@1.15.2", "@hono/node-server@1.14.1", "@hono/node-ws@1.2.0")
PORTKEY_JS = PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
LITELLM_VENV = ROOT / ".venv" / "litellm"
LITELLM_REQUIREMENTS = Path(__file__).with_name("gateways_requirements.txt")
INSTALL_TIMEOUT = 900

CELLS: tuple[tuple[str, int], ...] = (("unary", 1), ("unary", 32), ("stream", 1))
CELL_LABELS = {"unary": "non-streaming", "stream": "50-chunk stream"}
PEERS = ("nginx", "portkey", "litellm")
LABELS = {"direct": "direct", "gapwatch": "gapwatch", "nginx": "nginx", "portkey": "Portkey", "litellm": "LiteLLM"}
SIM_HEADERS = ("x-sim-output", "x-sim-chunk-chars", "x-sim-delay-ms")

# A port-only listen() (how @hono/node-server's serve() calls it without a hostname) binds
# 127.0.0.1 instead of every interface; an explicit host is left alone.
_NODE_BIND_LOOPBACK = """\
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" && (args[1] === undefined || typeof args[1] === "function")) {
    args.splice(1, args[1] === undefined ? 1 : 0, "127.0.0.1");
  }
  return listen.apply(this, args);
};
"""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _clean(text: str) -> str:
    """Log text without colour codes, spinner frames (Portkey redraws one with carriage
    returns) and blank lines."""
    lines = [_ANSI.sub("", line).rsplit("\r", 1)[-1].rstrip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line.strip())


def log_tail(server: Server, n: int = 8) -> str:
    return "\n".join(_clean(server.log_tail(4 * n)).splitlines()[-n:])


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------------------------
# Process trees: a gateway's CPU is all of its processes (nginx forks its worker).


def _children(pid: int) -> list[int]:
    """Direct children of every thread of ``pid`` (a child's parent is the thread that forked)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except FileNotFoundError:
        if os.path.exists(f"/proc/{pid}"):  # kernel without /proc/.../children: scan parents
            return _children_by_scan(pid)
    except OSError:
        pass
    return out


def _children_by_scan(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
                if int(stat[stat.rindex(b")") + 2 :].split()[1]) == pid:
                    out.append(int(name))
    return out


def process_tree(pid: int) -> list[int]:
    tree = [pid]
    i = 0
    while i < len(tree):
        tree += [c for c in _children(tree[i]) if c not in tree]
        i += 1
    return tree


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its live descendants."""
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += proc_cpu_seconds(p)
    return total


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[19])  # field 22, starttime
    except (OSError, ValueError, IndexError):
        return None


class GatewayServer(Server):
    """A peer gateway process: CPU over its process tree, and stopping also ends descendants
    that outlive it (each checked by pid and start time, so nothing else is ever signalled)."""

    def cpu(self) -> float:
        return tree_cpu(self.pid)

    def stop(self) -> None:
        rest = [(p, _start_time(p)) for p in process_tree(self.pid)[1:]] if self.proc.poll() is None else []
        super().stop()
        for pid, started in rest:
            if started is not None and _start_time(pid) == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# Installing the peers (bench only: .venv/gateways, .venv/litellm)


def _run_logged(steps: Sequence[list[str]], log_path: Path, what: str) -> str | None:
    """Run install ``steps`` in order, output to ``log_path``; None, or why it failed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        for cmd in steps:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=INSTALL_TIMEOUT,
                                      check=False, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"{what}: `{' '.join(cmd)}` failed: {exc} (log: {_rel(log_path)})"
            if proc.returncode != 0:
                log.flush()
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                return (f"{what}: `{' '.join(cmd)}` exited {proc.returncode}"
                        + (f": {tail[0].strip()[:200]}" if tail else "") + f" (log: {_rel(log_path)})")
    return None


def ensure_portkey() -> tuple[Path | None, str]:
    """``start-server.js`` of the pinned Portkey gateway, installed when missing; or a reason."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return None, "node/npm not found (apt-get install -y nodejs npm)"
    stamp = PORTKEY_DIR / ".installed"
    wanted = " ".join(PORTKEY_PINS)
    if PORTKEY_JS.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return PORTKEY_JS, ""
    log = GATEWAYS_DIR / "portkey-install.log"
    print(f"bench_gateways: installing Portkey into {_rel(PORTKEY_DIR)} (bench only; log in {_rel(log)})", flush=True)
    PORTKEY_DIR.mkdir(parents=True, exist_ok=True)
    err = _run_logged([[npm, "install", "--prefix", str(PORTKEY_DIR), "--no-audit", "--no-fund", *PORTKEY_PINS]],
                      log, "npm install")
    if err:
        return None, err
    if not PORTKEY_JS.exists():
        return None, f"{_rel(PORTKEY_JS)} missing after npm install (log: {_rel(log)})"
    stamp.write_text(wanted + "\n")
    return PORTKEY_JS, ""


def ensure_litellm() -> tuple[Path | None, str]:
    """The ``litellm`` command of ``.venv/litellm``, created or updated when missing; or a reason."""
    exe = LITELLM_VENV / "bin" / "litellm"
    py = LITELLM_VENV / "bin" / "python"
    stamp = LITELLM_VENV / ".installed"
    wanted = hashlib.sha256(LITELLM_REQUIREMENTS.read_bytes()).hexdigest()
    if exe.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return exe, ""
    log = GATEWAYS_DIR / "litellm-install.log"
    print(f"bench_gateways: installing LiteLLM into {_rel(LITELLM_VENV)} (bench only; one-off, a minute or two; "
          f"log in {_rel(log)})", flush=True)
    err = _run_logged([
        [sys.executable, "-m", "venv", str(LITELLM_VENV)],
        [str(py), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [str(py), "-m", "pip", "install", "--quiet", "-r", str(LITELLM_REQUIREMENTS)],
    ], log, "LiteLLM install")
    if err:
        return None, err
    if not exe.exists():
        return None, f"{_rel(exe)} missing after pip install (log: {_rel(log)})"
    stamp.write_text(wanted + "\n")
    return exe, ""


def _litellm_version() -> str:
    for p in LITELLM_VENV.glob("lib/python*/site-packages/litellm-*.dist-info"):
        return p.name.removeprefix("litellm-").removesuffix(".dist-info")
    return "?"


def _package_version(package_json: Path) -> str:
    try:
        return str(json.loads(package_json.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "?"


def _command_output(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (proc.stdout + proc.stderr).strip()


# --------------------------------------------------------------------------------------------
# Starting the gateways


@dataclass
class Gateway:
    """One target: a server, what every request to it carries on top of the shared spec, and
    how it was configured (printed, so a run can be reproduced)."""

    name: str
    server: Server
    headers: dict[str, str] = field(default_factory=dict)
    about: str = ""

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def spec(self, mode: str) -> Spec:
        """The shared request, plus this target's headers; a name of its own so ``wrk``
        scripts (named after the spec) never collide."""
        base = MODES[mode]
        return replace(base, name=f"{mode}-{self.name}", headers={**base.headers, **self.headers})


def start_nginx(exe: str, sim: Server, tmp: Path) -> Gateway:
    prefix = tmp / "nginx"
    for d in ("logs", "temp"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    port = free_port()
    temp = prefix / "temp"
    conf = prefix / "nginx.conf"
    conf.write_text(f"""\
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp}/client_body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream sim {{
        server {LOOPBACK}:{sim.port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {LOOPBACK}:{port};
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
    argv = [exe, "-e", "stderr", "-p", str(prefix), "-c", str(conf)]
    server = GatewayServer("nginx", argv, port, "/v1/models", tmp)
    version = _command_output([exe, "-v"]).removeprefix("nginx version: ")
    about = (f"{version}, config {conf.name}: master process + worker_processes 1, upstream keepalive 64, "
             "proxy_http_version 1.1, proxy_buffering off, access_log off, keepalive_requests 1000000")
    return Gateway("nginx", server, about=about)


def start_portkey(js: Path, sim: Server, tmp: Path) -> Gateway:
    preload = tmp / "portkey-bind-loopback.cjs"
    preload.write_text(_NODE_BIND_LOOPBACK)
    port = free_port()
    node = shutil.which("node") or "node"
    argv = [node, "--require", str(preload), str(js), f"--port={port}", "--headless"]
    server = GatewayServer("portkey", argv, port, "/", tmp)
    modules = PORTKEY_DIR / "node_modules"
    about = (f"@portkey-ai/gateway {_package_version(modules / '@portkey-ai/gateway/package.json')}, node "
             f"{_command_output([node, '--version'])}, @hono/node-server "
             f"{_package_version(modules / '@hono/node-server/package.json')}; "
             f"headers x-portkey-provider: openai, x-portkey-custom-host: {sim.base}/v1, "
             f"x-portkey-forward-headers: {','.join(SIM_HEADERS)}")
    headers = {"x-portkey-provider": "openai", "x-portkey-custom-host": f"{sim.base}/v1",
               "x-portkey-forward-headers": ",".join(SIM_HEADERS)}
    return Gateway("portkey", server, headers, about)


def start_litellm(exe: Path, sim: Server, tmp: Path) -> Gateway:
    port = free_port()
    master_key = "sk-" + secrets.token_hex(24)
    config = {
        "model_list": [{"model_name": "sim-echo",
                        "litellm_params": {"model": "openai/sim-echo", "api_base": f"{sim.base}/v1",
                                           "api_key": "sk-dummy-the-simulator-ignores-it"}}],
        "general_settings": {"master_key": master_key, "forward_client_headers_to_llm_api": True},
        "litellm_settings": {"telemetry": False},
    }
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY_DISABLED": "true"}
    argv = [str(exe), "--config", str(path), "--host", LOOPBACK, "--port", str(port), "--num_workers", "1"]
    server = GatewayServer("litellm", argv, port, "/health/liveliness", tmp, env=env, ready_timeout=120.0)
    about = (f"litellm {_litellm_version()} in {_rel(LITELLM_VENV)}, one worker; {path.name}: sim-echo -> "
             f"openai/sim-echo at {sim.base}/v1, master_key (random; sent as the bearer token), "
             "forward_client_headers_to_llm_api: true; env LITELLM_LOCAL_MODEL_COST_MAP=True, "
             "LITELLM_TELEMETRY_DISABLED=true")
    return Gateway("litellm", server, {"authorization": f"Bearer {master_key}"}, about)


# --------------------------------------------------------------------------------------------
# Checking that a gateway really proxies


def answer_text(body: bytes, stream: bool) -> tuple[str, int]:
    """The assistant text of a chat completion body, and (streams) how many events carried
    content. Raises ValueError on a body that is not one."""
    if not stream:
        return str(orjson.loads(body)["choices"][0]["message"]["content"]), 0
    text: list[str] = []
    events = 0
    for line in body.decode(errors="replace").splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            continue
        for choice in orjson.loads(data).get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                text.append(piece)
                events += 1
    return "".join(text), events


def verify(gw: Gateway) -> tuple[str | None, str]:
    """One non-streaming and one streaming request; (None, detail) when both return
    ``ANSWER_200``, else (reason, "")."""
    detail = ""
    for mode, stream in (("unary", False), ("stream", True)):
        try:
            b = raw_batch(LOOPBACK, gw.server.port, gw.spec(mode), 1, count=1, keep_body=True)
        except Exception as exc:  # noqa: BLE001 - any failure is a reason to skip this peer
            return f"{mode} request failed: {type(exc).__name__}: {exc}", ""
        if b.errors or not b.requests:
            return f"{mode} request: error response {b.body_sample[:300]!r}", ""
        try:
            text, events = answer_text(b.body_sample, stream)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            return f"{mode} request: unreadable body ({exc}): {b.body_sample[:300]!r}", ""
        if text != ANSWER_200:
            return f"{mode} request: answer differs from the simulator's: {text[:80]!r}", ""
        if stream:
            detail = f"stream relayed as {events} content events"
    return None, detail


# --------------------------------------------------------------------------------------------
# The side-by-side loop


class TargetFailed(RuntimeError):
    pass


def run_cell(gws: list[Gateway], all_servers: list[Server], mode: str, conc: int, rounds: int, seconds: float,
             tmp: Path, use_wrk: bool, dropped: list[tuple[str, str]]) -> dict[str, Cell]:
    """``proxy_core.run_side_by_side``'s schedule (warm-up, then ``rounds`` rounds, order
    rotating), except that a peer whose batch fails is dropped from the cell (reason appended
    to ``dropped``) while the others go on. CPU is read for every server's process tree
    around every batch, so background work of idle gateways shows too."""
    specs = {g.name: g.spec(mode) for g in gws}
    scripts = {n: wrk_script(s, tmp) for n, s in specs.items()} if use_wrk else {}
    cells = {g.name: Cell(tool="wrk" if use_wrk else "raw-asyncio") for g in gws}
    live = list(gws)

    def fail(g: Gateway, why: str) -> None:
        if g.name in ("direct", "gapwatch"):
            raise TargetFailed(f"{g.name}: {why}")
        if g.server.proc.poll() is not None:
            why += f"; {g.name} exited with {g.server.proc.returncode}:\n{log_tail(g.server)}"
        dropped.append((g.name, f"{_cell_name(mode, conc)}: {why}"))
        live.remove(g)

    for g in list(live):  # warm-up: connections, pools, first-call paths
        try:
            raw_batch(LOOPBACK, g.server.port, specs[g.name], conc, seconds=0.3 * min(1.0, scale()) + 0.1)
        except Exception as exc:  # noqa: BLE001 - dropped with the reason
            fail(g, f"warm-up failed: {type(exc).__name__}: {exc}")
    for r in range(rounds):
        order = list(live) if r % 2 == 0 else list(reversed(live))
        if len(order) > 2:
            k = r % len(order)
            order = order[k:] + order[:k]
        for g in order:
            if g not in live:
                continue
            cpu0 = {s.name: tree_cpu(s.pid) for s in all_servers}
            try:
                if use_wrk:
                    b = wrk_batch(LOOPBACK, g.server.port, specs[g.name], scripts[g.name], conc, seconds)
                else:
                    b = raw_batch(LOOPBACK, g.server.port, specs[g.name], conc, seconds=seconds)
            except Exception as exc:  # noqa: BLE001 - dropped with the reason
                fail(g, f"{type(exc).__name__}: {exc}")
                continue
            cpu1 = {s.name: tree_cpu(s.pid) for s in all_servers}
            if b.errors or not b.requests:
                fail(g, f"{b.errors} errors, {b.requests} ok; sample: {b.body_sample[:300]!r}")
                continue
            b.cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
            cells[g.name].add(b)
    return {g.name: cells[g.name] for g in live}


# --------------------------------------------------------------------------------------------
# Reporting


def _cell_name(mode: str, conc: int) -> str:
    return f"{CELL_LABELS[mode]} c={conc}"


def _report(results: dict[tuple[str, int], dict[str, Cell]], order: list[str], headline: dict[str, float]) -> None:
    rows = []
    for (mode, conc), cells in results.items():
        direct = cells.get("direct")
        d50 = pct(direct.latency_us, 50) if direct else float("nan")
        for name in order:
            c = cells.get(name)
            if c is None:
                continue
            p50, p99 = pct(c.latency_us, 50), pct(c.latency_us, 99)
            gw_cpu = c.cpu_ms_per_req(name) if name != "direct" else float("nan")
            added = (p50 - d50) / 1e3 if name != "direct" else float("nan")
            rows.append([_cell_name(mode, conc), LABELS[name], c.tool, str(c.requests), fmt(p50 / 1e3),
                         fmt(p99 / 1e3), fmt(c.rps, 0), fmt(gw_cpu), fmt(c.cpu_ms_per_req("simulator")), fmt(added)])
            key = f"gateways.{mode}.c{conc}.{name}"
            headline[f"{key}.p50_ms"] = p50 / 1e3
            headline[f"{key}.p99_ms"] = p99 / 1e3
            headline[f"{key}.rps"] = c.rps
            if name != "direct":
                headline[f"{key}.cpu_ms"] = gw_cpu
                headline[f"{key}.added_p50_ms"] = added
    print(table(["cell", "target", "load", "n", "p50 ms", "p99 ms", "req/s", "gateway CPU ms/req",
                 "sim CPU ms/req", "+p50 ms vs direct"], rows))
    print("(gateway CPU: user + system of the gateway's whole process tree during its own batches, from /proc)")
    print()


def _summary(results: dict[tuple[str, int], dict[str, Cell]], peers: list[str]) -> None:
    """The question in one line per cell, then per peer."""
    print("summary, gateway CPU per request (ms):")
    for (mode, conc), cells in results.items():
        if "gapwatch" not in cells:
            continue
        g = cells["gapwatch"].cpu_ms_per_req("gapwatch")
        others = ", ".join(f"{LABELS[p]} {fmt(cells[p].cpu_ms_per_req(p))}" if p in cells else f"{LABELS[p]} -"
                           for p in peers)
        print(f"  {_cell_name(mode, conc) + ':':28s} gapwatch {fmt(g)} ms CPU/request"
              + (f" vs {others}" if others else ""))
    keys = list(results)
    print("per peer, cells " + " | ".join(_cell_name(m, c) for m, c in keys) + ":")

    def added(name: str, key: tuple[str, int]) -> float:
        cells = results[key]
        if name not in cells or "direct" not in cells:
            return float("nan")
        return (pct(cells[name].latency_us, 50) - pct(cells["direct"].latency_us, 50)) / 1e3

    def ratio(name: str, key: tuple[str, int]) -> float:
        cells = results[key]
        if name not in cells or "gapwatch" not in cells or not cells["gapwatch"].cpu_ms_per_req("gapwatch"):
            return float("nan")
        return cells[name].cpu_ms_per_req(name) / cells["gapwatch"].cpu_ms_per_req("gapwatch")

    for p in peers:
        print(f"  {LABELS[p] + ':':9s}CPU/request " + " | ".join(fmt(ratio(p, k), 2) + "x" for k in keys)
              + " gapwatch's; added p50 " + " | ".join(fmt(added(p, k)) for k in keys)
              + " ms (gapwatch " + " | ".join(fmt(added("gapwatch", k)) for k in keys) + ")")
    print()


def _idle_notes(results: dict[tuple[str, int], dict[str, Cell]], names: list[str]) -> list[str]:
    """CPU a gateway used while other targets' batches ran: background work (timers, log
    flushers), which its per-request figures include for its own batches."""
    notes = []
    for name in names:
        cpu = secs = 0.0
        for cells in results.values():
            for other, c in cells.items():
                if other != name:
                    cpu += c.cpu.get(name, 0.0)
                    secs += c.seconds
        if secs and cpu / secs > 0.002:
            notes.append(f"note: {LABELS[name]} used {cpu / secs * 1e3:.2f} ms CPU per second while other targets' "
                         "batches ran (background work), included in its per-request figures.")
    return notes


# --------------------------------------------------------------------------------------------


def main() -> dict[str, float]:
    """Run the gateway comparison; print tables; return headline figures for the summary."""
    use_wrk = wrk_available()
    rounds = ROUNDS
    secs_1, secs_32 = batch_seconds()
    print("== gateways: direct vs gapwatch vs nginx vs Portkey vs LiteLLM (same requests, same simulated upstream) ==")
    skipped: dict[str, str] = {}
    nginx_exe = shutil.which("nginx")
    if nginx_exe is None:
        skipped["nginx"] = "nginx is not installed (apt-get install -y nginx; bench only)"
    portkey_js, why = ensure_portkey()
    if portkey_js is None:
        skipped["portkey"] = why
    litellm_exe, why = ensure_litellm()
    if litellm_exe is None:
        skipped["litellm"] = why
    headline: dict[str, float] = {}
    with workdir("gapwatch-bench-gw-") as tmp, contextlib.ExitStack() as stack:
        sim = start_simulator(tmp)
        stack.callback(sim.stop)
        proxy = start_proxy(proxy_config(sim, free_port(), [("*", "none")], {"none": {"detectors": {}}}), tmp,
                            name="gapwatch")
        stack.callback(proxy.stop)
        gws = [Gateway("direct", sim, about="the simulator itself"),
               Gateway("gapwatch", proxy, about=f"route '*' -> policy 'none' (detectors: {{}}), incidents.sinks: [], "
                                                f"upstream {sim.base}/v1")]
        starters: dict[str, Callable[[], Gateway]] = {}
        if nginx_exe is not None:
            starters["nginx"] = functools.partial(start_nginx, nginx_exe, sim, tmp)
        if portkey_js is not None:
            starters["portkey"] = functools.partial(start_portkey, portkey_js, sim, tmp)
        if litellm_exe is not None:
            starters["litellm"] = functools.partial(start_litellm, litellm_exe, sim, tmp)
        for name, start in starters.items():
            try:
                gw = start()
            except Exception as exc:  # noqa: BLE001 - a peer that does not start is skipped
                skipped[name] = f"did not start: {_clean(str(exc))}"
                continue
            stack.callback(gw.server.stop)
            gws.append(gw)

        checked: list[Gateway] = []
        check_lines = []
        for gw in gws:
            if gw.name == "direct":
                checked.append(gw)
                continue
            reason, detail = verify(gw)
            if reason is None:
                checked.append(gw)
                check_lines.append(f"{gw.label} ok ({detail})")
            elif gw.name == "gapwatch":
                raise RuntimeError(f"gapwatch does not proxy the simulator's answer: {reason}\n{gw.server.log_tail()}")
            else:
                skipped[gw.name] = f"check failed: {reason}\n{log_tail(gw.server)}"
                gw.server.stop()
        gws = checked

        for gw in gws:
            print(f"{gw.label + ':':10s} {gw.server.command}")
            print(f"{'':10s} {gw.about}")
        for name, why in skipped.items():
            lines = why.splitlines()
            print(f"{LABELS[name] + ':':10s} SKIPPED: {lines[0]}")
            for line in lines[1:]:
                print(f"{'':12s}{line}")
        c32 = "wrk -t1 -c32 (Lua done hook dumps its histogram)" if use_wrk else "the raw client (wrk not installed)"
        print(f"{'load:':10s} c=1: raw asyncio HTTP/1.1 client (uvloop, keep-alive); c=32: {c32}")
        print(f"{'requests:':10s} POST /v1/chat/completions model sim-echo, answer {len(ANSWER_200)} chars via "
              "x-sim-output; stream: 4-char chunks = 50 content events, each its own write (x-sim-delay-ms: 0.001)")
        print(f"{'rounds:':10s} {rounds} per cell, target order rotating; batch {secs_1:.1f}s (c=1), "
              f"{max(1, round(secs_32))}s (c=32); every process on the same 2 cores as the load generator")
        print(f"{'checked:':10s} " + ("; ".join(check_lines) if check_lines else "-"))
        print()

        servers = [g.server for g in gws]
        dropped: list[tuple[str, str]] = []
        results: dict[tuple[str, int], dict[str, Cell]] = {}
        for mode, conc in CELLS:
            live = [g for g in gws if g.server.proc.poll() is None]  # a peer that died stays out
            results[(mode, conc)] = run_cell(live, servers, mode, conc, rounds, secs_32 if conc > 1 else secs_1, tmp,
                                             use_wrk and conc > 1, dropped)
        order = [g.name for g in gws]
        peers = [n for n in PEERS if n in order]
        _report(results, order, headline)
        _summary(results, peers)
        for name, why in dropped:
            print(f"{LABELS[name]} dropped from {why}")
        for note in _idle_notes(results, [n for n in order if n != "direct"]):
            print(note)
        if "portkey" in order and _portkey_first_event_sleep():
            print("note: Portkey's stream reader sleeps 25 ms before relaying the first event of every stream "
                  "(setTimeout in its build), which its stream latency includes and its CPU does not.")
    return headline


def _portkey_first_event_sleep() -> bool:
    try:
        return re.search(r"setTimeout\(\w,25\)", PORTKEY_JS.read_text(errors="replace")) is not None
    except OSError:
        return False


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"[bench_gateways: {time.monotonic() - started:.0f}s, installs and startup included]")
