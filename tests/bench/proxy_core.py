"""Proxy core benchmark: the same requests sent directly to the simulated provider and through
the proxy (no detectors), side by side in one run, plus the machinery other benches reuse.

Why it is built this way:
- The simulator and the proxy are separate processes, so the proxy's own CPU time can be read
  from ``/proc/<pid>/stat`` (user + system). On a 2-core machine the load generator, the
  provider and the proxy share the cores, so requests per second alone mislead; CPU per
  request does not depend on who else is running.
- Direct and proxied batches alternate (D P, P D, D P, ...) within one run, so drift in machine
  load (other jobs on the shared cores) hits both sides alike.
- Concurrency 1 uses a raw asyncio HTTP/1.1 client (no httpx: its own ~0.3 ms per request
  would blur the figures) that also times the first body byte and the first non-empty
  ``content`` delta. Concurrency 32 uses ``wrk`` (C, one thread) when it is installed, which
  costs far less CPU than any Python client; its latency histogram is dumped by a Lua
  ``done`` hook so rounds can be merged. Without ``wrk`` the raw client runs 32 connections
  and the output says so.
- Streams come in three cadences. ``stream``: every chunk is its own network write, as fast as
  the simulator can go (``x-sim-delay-ms: 0.001``); this is where CPU per stream is measured,
  and at concurrency 1 three busy processes (client, simulator, proxy) share two cores, so
  its latencies include waiting for a core. ``stream-1ms``: one chunk per millisecond, a
  token cadence where nothing is CPU-bound, so added latency and time to first byte show
  what the proxy itself adds. ``stream-burst``: all 50 chunks in one write, which separates
  per-read from per-event cost.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"

# The non-streaming and streaming answer: 200 characters, 4-character chunks = 50 chunks.
ANSWER_200 = ("Proxies should be invisible: same bytes, same timing, nothing lost. " * 4)[:200]
assert len(ANSWER_200) == 200


def scale() -> float:
    """``GAPWATCH_BENCH_SCALE`` multiplies every batch duration (0.3 for a quick look)."""
    try:
        return max(0.1, float(os.environ.get("GAPWATCH_BENCH_SCALE", "1")))
    except ValueError:
        return 1.0


ROUNDS = 3  # rounds per cell, target order rotating (benches that compare gateways share these)


def batch_seconds() -> tuple[float, float]:
    """Seconds per batch at concurrency 1 and at concurrency 32, scaled."""
    s = scale()
    return 1.5 * s, max(1.0, 2.0 * s)


# --------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def gapwatch_argv() -> list[str]:
    """The console script next to this interpreter (``.venv/bin/gapwatch``)."""
    exe = Path(sys.executable).parent / "gapwatch"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "proxy.cli"]


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


class Server:
    """A server subprocess we started: its command, port, log file and CPU counter."""

    def __init__(self, name: str, argv: list[str], port: int, ready_path: str, logdir: Path, *,
                 env: dict[str, str] | None = None, ready_timeout: float = 30.0) -> None:
        """``env`` adds to this process's environment (peer gateways need their own settings);
        ``ready_timeout`` is how long ``GET ready_path`` may take to answer 200."""
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     stdin=subprocess.DEVNULL)
        try:
            self._wait_ready(ready_path, ready_timeout)
        except BaseException:  # not ready, or Ctrl-C while waiting: never leave it running
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def command(self) -> str:
        return " ".join(self.argv)

    def _wait_ready(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + path, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} not ready on {self.base}{path} after {timeout:g}s:\n{self.log_tail()}")

    def cpu(self) -> float:
        return proc_cpu_seconds(self.pid)

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


def start_simulator(logdir: Path) -> Server:
    port = free_port()
    argv = [*gapwatch_argv(), "simulate-upstream", "--host", LOOPBACK, "--port", str(port)]
    return Server("simulator", argv, port, "/v1/models", logdir)


def proxy_config(sim: Server, port: int, routes: Sequence[tuple[str, str]],
                 policies: dict[str, Any]) -> dict[str, Any]:
    """``routes``: (model glob, policy) pairs, all to the simulator. Incident sinks off (a
    benchmark should not measure log writing), metrics on (the production default)."""
    return {
        "server": {"host": LOOPBACK, "port": port, "shutdown_grace_seconds": 2},
        "upstreams": {"sim": {"base_url": f"{sim.base}/v1"}},
        "routes": [{"match": {"model": glob}, "upstream": "sim", "policy": pol} for glob, pol in routes],
        "policies": policies,
        "incidents": {"sinks": []},
    }


def start_proxy(config: dict[str, Any], logdir: Path, name: str = "proxy") -> Server:
    path = logdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = int(config["server"]["port"])
    argv = [*gapwatch_argv(), "serve", "--config", str(path)]
    return Server(name, argv, port, "/readyz", logdir)


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class Spec:
    """One kind of request, sent identically to every target."""

    name: str
    path: str
    headers: dict[str, str]
    body: bytes

    def raw(self, host: str, port: int) -> bytes:
        lines = [f"POST {self.path} HTTP/1.1", f"host: {host}:{port}", "content-type: application/json",
                 f"content-length: {len(self.body)}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + self.body


FAST = "0.001"  # x-sim-delay-ms: a 1 µs pause yields to the event loop, so each chunk is its own write


def chat_spec(name: str, answer: str, *, stream: bool, model: str = "sim-echo", chunk_chars: int = 4,
              delay_ms: str | None = FAST) -> Spec:
    """A chat completion whose answer is ``answer`` (via ``x-sim-output``). Streams pause
    ``delay_ms`` before each chunk (``None``: every chunk in one write)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say the benchmark sentence."}]}
    if stream:
        body["stream"] = True
    headers = {"authorization": "Bearer bench", "x-sim-output": base64.b64encode(answer.encode()).decode(),
               "x-sim-chunk-chars": str(chunk_chars)}
    if stream and delay_ms is not None:
        headers["x-sim-delay-ms"] = delay_ms
    return Spec(name, "/v1/chat/completions", headers, orjson.dumps(body))


# --------------------------------------------------------------------------------------------
# Load generators

_CONTENT = re.compile(rb'"content":"[^"]')


@dataclass
class Batch:
    """One timed batch against one target. Times in microseconds."""

    requests: int = 0
    seconds: float = 0.0
    latency_us: list[float] = field(default_factory=list)
    ttfb_us: list[float] = field(default_factory=list)  # first body byte
    ttft_us: list[float] = field(default_factory=list)  # first non-empty content delta
    errors: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # server name -> CPU seconds used
    body_sample: bytes = b""


async def _connection(host: str, port: int, req: bytes, stop_ns: int, count: int | None,
                      out: Batch, keep_body: bool) -> None:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    clock = time.perf_counter_ns
    try:
        done = 0
        while clock() < stop_ns and (count is None or done < count):
            t0 = clock()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            low = head.lower()
            ttfb = ttft = 0
            chunks: list[bytes] = []
            m = re.search(rb"\r\ncontent-length:\s*(\d+)", low)
            if m:
                data = await reader.readexactly(int(m.group(1)))
                ttfb = ttft = clock()
                chunks.append(data)
            elif b"transfer-encoding: chunked" in low:
                tail = b""
                while True:
                    line = await reader.readuntil(b"\r\n")
                    size = int(line.split(b";", 1)[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")
                        break
                    data = (await reader.readexactly(size + 2))[:-2]
                    now = clock()
                    if not ttfb:
                        ttfb = now
                    if not ttft:
                        window = tail + data
                        if _CONTENT.search(window):
                            ttft = now
                        tail = window[-16:]
                    if keep_body:
                        chunks.append(data)
            else:
                raise RuntimeError(f"response without length or chunking: {head[:200]!r}")
            t1 = clock()
            done += 1
            if status != 200:
                out.errors += 1
                if not out.body_sample:
                    out.body_sample = head + b"".join(chunks)[:500]
                continue
            out.requests += 1
            out.latency_us.append((t1 - t0) / 1e3)
            out.ttfb_us.append(((ttfb or t1) - t0) / 1e3)
            out.ttft_us.append(((ttft or t1) - t0) / 1e3)
            if keep_body and not out.body_sample:
                out.body_sample = b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


def raw_batch(host: str, port: int, spec: Spec, concurrency: int, seconds: float | None = None,
              count: int | None = None, keep_body: bool = False) -> Batch:
    """Closed loop: ``concurrency`` keep-alive connections, each sending the next request as
    soon as the previous response ended, for ``seconds`` (or ``count`` requests each)."""
    import uvloop

    req = spec.raw(host, port)
    out = Batch()

    async def main() -> None:
        stop_ns = time.perf_counter_ns() + int((seconds if seconds is not None else 3600) * 1e9)
        t0 = time.perf_counter()
        await asyncio.gather(*(_connection(host, port, req, stop_ns, count, out, keep_body)
                               for _ in range(concurrency)))
        out.seconds = time.perf_counter() - t0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    return out


_WRK_LUA = """\
local function slurp(p) local f = assert(io.open(p, "rb")); local s = f:read("*a"); f:close(); return s end
wrk.method = "POST"
wrk.body = slurp(%(body)s)
wrk.headers["Content-Type"] = "application/json"
%(headers)s
done = function(summary, latency, requests)
  local out = assert(io.open(os.getenv("GAPWATCH_WRK_RESULT"), "w"))
  local e = summary.errors
  out:write(string.format("requests %%d\\nduration_us %%d\\nerrors %%d %%d %%d %%d %%d\\n", summary.requests,
    summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
  for i = 1, #latency do local v, c = latency(i); out:write(string.format("h %%d %%d\\n", v, c)) end
  out:close()
end
"""


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_script(spec: Spec, tmp: Path) -> Path:
    body = tmp / f"{spec.name}.body.json"
    body.write_bytes(spec.body)
    hdr = []
    for k, v in spec.headers.items():
        if not re.fullmatch(r"[ -~]*", v) or '"' in v or "\\" in v:
            raise ValueError(f"header {k} is not plain ASCII")
        hdr.append(f'wrk.headers["{k}"] = "{v}"')
    path = tmp / f"{spec.name}.lua"
    path.write_text(_WRK_LUA % {"body": orjson.dumps(str(body)).decode(), "headers": "\n".join(hdr)})
    return path


def wrk_batch(host: str, port: int, spec: Spec, script: Path, concurrency: int, seconds: float) -> Batch:
    """One ``wrk`` run (1 thread, ``concurrency`` connections). Latencies come from wrk's own
    histogram (1 µs buckets), which the Lua ``done`` hook writes out."""
    result = script.with_suffix(".result")
    result.unlink(missing_ok=True)
    secs = max(1, round(seconds))
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{secs}s", "--timeout", "10s", "-s", str(script),
            f"http://{host}:{port}{spec.path}"]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "GAPWATCH_WRK_RESULT": str(result)},
                          timeout=secs + 30, check=False)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    out = Batch()
    for line in result.read_text().splitlines():
        parts = line.split()
        if parts[0] == "requests":
            out.requests = int(parts[1])
        elif parts[0] == "duration_us":
            out.seconds = int(parts[1]) / 1e6
        elif parts[0] == "errors":
            out.errors = sum(int(x) for x in parts[1:])
        elif parts[0] == "h":
            out.latency_us.extend([float(parts[1])] * int(parts[2]))
    return out


# --------------------------------------------------------------------------------------------
# Side-by-side runs


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


@dataclass
class Target:
    """Where a batch goes. ``probe`` (optional) reads counters (e.g. from ``/metrics``) before
    and after each batch, outside the CPU window; the differences add up in ``Cell.extra``."""

    name: str
    server: Server
    spec: Spec
    probe: Callable[[], dict[str, float]] | None = None


@dataclass
class Cell:
    """All batches of one target in one (mode, concurrency) cell, merged over rounds."""

    requests: int = 0
    seconds: float = 0.0
    latency_us: list[float] = field(default_factory=list)
    ttfb_us: list[float] = field(default_factory=list)
    ttft_us: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    tool: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, b: Batch) -> None:
        self.requests += b.requests
        self.seconds += b.seconds
        self.latency_us += b.latency_us
        self.ttfb_us += b.ttfb_us
        self.ttft_us += b.ttft_us
        for k, v in b.cpu.items():
            self.cpu[k] = self.cpu.get(k, 0.0) + v

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else float("nan")

    def cpu_ms_per_req(self, server: str) -> float:
        return 1e3 * self.cpu.get(server, 0.0) / self.requests if self.requests else float("nan")


def run_side_by_side(targets: Sequence[Target], servers: Sequence[Server], concurrency: int, rounds: int,
                     seconds: float, tmp: Path, use_wrk: bool) -> dict[str, Cell]:
    """Warm every target up, then ``rounds`` rounds of one batch per target, the order
    rotating each round. CPU of every server is read right before and after each batch."""
    cells = {t.name: Cell(tool="wrk" if use_wrk else "raw-asyncio") for t in targets}
    scripts = {t.name: wrk_script(t.spec, tmp) for t in targets} if use_wrk else {}
    for t in targets:  # warm-up: connections, pools, first-call paths
        raw_batch(LOOPBACK, t.server.port, t.spec, concurrency, seconds=0.3 * min(1.0, scale()) + 0.1)
    for r in range(rounds):
        order = list(targets) if r % 2 == 0 else list(reversed(targets))
        if len(order) > 2:
            k = r % len(order)
            order = order[k:] + order[:k]
        for t in order:
            snap = t.probe() if t.probe else {}
            cpu0 = {s.name: s.cpu() for s in servers}
            if use_wrk:
                b = wrk_batch(LOOPBACK, t.server.port, t.spec, scripts[t.name], concurrency, seconds)
            else:
                b = raw_batch(LOOPBACK, t.server.port, t.spec, concurrency, seconds=seconds)
            cpu1 = {s.name: s.cpu() for s in servers}
            if b.errors or not b.requests:
                raise RuntimeError(f"{t.name}: {b.errors} errors, {b.requests} ok; sample: {b.body_sample[:300]!r}")
            b.cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
            cells[t.name].add(b)
            if t.probe:
                for k, v in t.probe().items():
                    cells[t.name].extra[k] = cells[t.name].extra.get(k, 0.0) + v - snap.get(k, 0.0)
    return cells


def fmt(v: float, digits: int = 3) -> str:
    if v != v:  # NaN
        return "-"
    return f"{v:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Profiling (``python -m tests.bench.run --profile MODE``): py-spy samples the proxy process
# while the raw client loads it; frames are folded by function (line numbers dropped).


def py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def fold_profile(raw: str, top: int = 25) -> str:
    """Self and inclusive shares per function from py-spy's collapsed-stack output."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, n_s = line.rpartition(" ")
        if not stack or not n_s.isdigit():
            continue
        n = int(n_s)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        frames = [f for f in frames if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    if not total:
        return "(no samples)"
    out = [f"{total} samples of the proxy's busy time (idle excluded)", "self (the function itself):"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in sorted(own.items(), key=lambda x: -x[1])[:top]]
    out.append("inclusive (the function and what it calls), proxy/ and library frames:")
    skip = ("<module>", "run (asyncio", "Runner.run", "BaseEventLoop.run", "main (proxy/cli", "_serve (proxy/cli")
    ranked = [(f, c) for f, c in sorted(incl.items(), key=lambda x: -x[1]) if not f.startswith(skip)]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in ranked[:top]]
    return "\n".join(out)


def profile_proxy(server: Server, spec: Spec, concurrency: int, seconds: float, tmp: Path, top: int = 25) -> str:
    """Sample ``server`` with py-spy for ``seconds`` under a closed-loop load of ``spec``."""
    exe = py_spy()
    if exe is None:
        return "py-spy is not installed: .venv/bin/pip install py-spy (bench only)"
    raw_batch(LOOPBACK, server.port, spec, concurrency, seconds=0.5)
    out = tmp / f"profile-{spec.name}.txt"
    argv = [exe, "record", "--pid", str(server.pid), "--duration", str(max(1, round(seconds))), "--rate", "1000",
            "--format", "raw", "--nonblocking", "-o", str(out)]
    spy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        b = raw_batch(LOOPBACK, server.port, spec, concurrency, seconds=seconds + 1.0)
        log = spy.communicate(timeout=seconds + 30)[0].decode(errors="replace")
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not out.exists():
        return f"py-spy failed: {log.strip()[-500:]}"
    head = f"profile: {spec.name}, concurrency {concurrency}, {b.requests} requests, py-spy {' '.join(argv[1:])}"
    return head + "\n" + fold_profile(out.read_text(), top)


# --------------------------------------------------------------------------------------------
# The proxy core bench

MODES: dict[str, Spec] = {
    "unary": chat_spec("unary", ANSWER_200, stream=False),
    "stream": chat_spec("stream", ANSWER_200, stream=True),
    "stream-1ms": chat_spec("stream-1ms", ANSWER_200, stream=True, delay_ms="1"),
    "stream-burst": chat_spec("stream-burst", ANSWER_200, stream=True, delay_ms=None),
}
CELLS: tuple[tuple[str, int], ...] = (("unary", 1), ("stream", 1), ("stream-1ms", 1), ("stream-burst", 1),
                                      ("unary", 32), ("stream", 32))


def main() -> dict[str, float]:
    """Run the proxy core bench; print tables; return headline figures for the summary."""
    use_wrk = wrk_available()
    rounds = ROUNDS
    secs_1, secs_32 = batch_seconds()
    print("== proxy core: direct to the simulator vs through gapwatch (policy with no detectors) ==")
    if not use_wrk:
        print("NOTE: wrk is not installed (apt-get install -y wrk); concurrency 32 uses the raw asyncio "
              "client, which competes harder with the proxy for CPU.")
    headline: dict[str, float] = {}
    with workdir("gapwatch-bench-") as tmp:
        sim = start_simulator(tmp)
        try:
            proxy = start_proxy(proxy_config(sim, free_port(), [("*", "none")], {"none": {"detectors": {}}}), tmp)
        except BaseException:
            sim.stop()
            raise
        try:
            print(f"simulator: {sim.command}")
            print(f"proxy:     {proxy.command}")
            print(f"           config: upstream sim -> {sim.base}/v1, route '*' -> policy 'none' (detectors: {{}}), "
                  "incidents.sinks: []")
            c32 = "wrk -t1 -c32 (a Lua done hook dumps its histogram)" if use_wrk else "the raw client"
            print("load:      concurrency 1: raw asyncio HTTP/1.1 client (uvloop, keep-alive, in the bench "
                  f"process); concurrency 32: {c32}")
            print(f"requests:  POST /v1/chat/completions model sim-echo, answer {len(ANSWER_200)} chars; "
                  "streams: 4-char chunks = 50 content events (+ role, finish, [DONE]);")
            print("           'stream' = each chunk its own write, back to back (x-sim-delay-ms: 0.001); "
                  "'stream-1ms' = one chunk per ms; 'stream-burst' = all chunks in one write")
            print(f"rounds:    {rounds} per cell, direct/proxy order alternating; batch {secs_1:.1f}s (c=1), "
                  f"{max(1, round(secs_32))}s (c=32)")
            print()
            results: dict[tuple[str, int], dict[str, Cell]] = {}
            for mode, conc in CELLS:
                spec = MODES[mode]
                targets = [Target("direct", sim, spec), Target("proxy", proxy, spec)]
                w = use_wrk and conc > 1
                results[(mode, conc)] = run_side_by_side(targets, [sim, proxy], conc, rounds,
                                                         secs_32 if conc > 1 else secs_1, tmp, w)
            _report(results, headline)
            idle = _idle_cpu(results)
            if idle > 0.002:
                print(f"note: the proxy used {idle * 1e3:.2f} ms CPU per second while only direct batches ran "
                      "(background work), included in its per-request figures.")
        finally:
            proxy.stop()
            sim.stop()
    return headline


def _idle_cpu(results: dict[tuple[str, int], dict[str, Cell]]) -> float:
    cpu = secs = 0.0
    for cells in results.values():
        d = cells["direct"]
        cpu += d.cpu.get("proxy", 0.0)
        secs += d.seconds
    return cpu / secs if secs else 0.0


def _report(results: dict[tuple[str, int], dict[str, Cell]], headline: dict[str, float]) -> None:
    rows = []
    for (mode, conc), cells in results.items():
        for name in ("direct", "proxy"):
            c = cells[name]
            streamed = mode.startswith("stream")
            ttfb = fmt(pct(c.ttfb_us, 50) / 1e3) if streamed and c.ttfb_us else "-"
            rows.append([f"{mode}", str(conc), name, c.tool, str(c.requests), fmt(pct(c.latency_us, 50) / 1e3),
                         fmt(pct(c.latency_us, 99) / 1e3), ttfb, fmt(c.rps, 0),
                         fmt(c.cpu_ms_per_req("proxy")) if name == "proxy" else "-",
                         fmt(c.cpu_ms_per_req("simulator"))])
    print(table(["mode", "conc", "target", "load", "n", "p50 ms", "p99 ms", "TTFB p50 ms", "req/s",
                 "proxy CPU ms/req", "sim CPU ms/req"], rows))
    print()
    rows = []
    for (mode, conc), cells in results.items():
        d, p = cells["direct"], cells["proxy"]
        d50, p50 = pct(d.latency_us, 50), pct(p.latency_us, 50)
        d99, p99 = pct(d.latency_us, 99), pct(p.latency_us, 99)
        streamed = mode.startswith("stream")
        dttfb = (pct(p.ttfb_us, 50) - pct(d.ttfb_us, 50)) / 1e3 if streamed and p.ttfb_us else float("nan")
        rows.append([mode, str(conc), fmt((p50 - d50) / 1e3), fmt(p50 / d50, 2) + "x", fmt((p99 - d99) / 1e3),
                     fmt(p99 / d99, 2) + "x", fmt(dttfb), fmt(p.rps / d.rps, 2) + "x"])
        key = f"{mode}.c{conc}"
        headline[f"{key}.added_p50_ms"] = (p50 - d50) / 1e3
        headline[f"{key}.added_p99_ms"] = (p99 - d99) / 1e3
        headline[f"{key}.proxy_cpu_ms"] = p.cpu_ms_per_req("proxy")
        headline[f"{key}.added_ttfb_p50_ms"] = dttfb
    print("added by the proxy (proxy minus direct; ratio proxy / direct):")
    print(table(["mode", "conc", "+p50 ms", "p50 ratio", "+p99 ms", "p99 ratio", "+TTFB p50 ms", "req/s ratio"],
                rows))
    print()
    checks = [
        ("added p50 latency, unary, c=1", headline["unary.c1.added_p50_ms"], 1.0, "ms"),
        ("added p50 latency, stream at 1 chunk/ms, c=1", headline["stream-1ms.c1.added_p50_ms"], 1.0, "ms"),
        ("added TTFB p50, stream at 1 chunk/ms, c=1", headline["stream-1ms.c1.added_ttfb_p50_ms"], 1.0, "ms"),
        ("proxy CPU per non-streaming request (c=1)", headline["unary.c1.proxy_cpu_ms"], 0.5, "ms"),
        ("proxy CPU per non-streaming request (c=32)", headline["unary.c32.proxy_cpu_ms"], 0.5, "ms"),
        ("proxy CPU per 50-chunk stream (c=1)", headline["stream.c1.proxy_cpu_ms"], 1.5, "ms"),
        ("proxy CPU per 50-chunk stream (c=32)", headline["stream.c32.proxy_cpu_ms"], 1.5, "ms"),
    ]
    print("targets (issue 2):")
    for label, value, limit, unit in checks:
        print(f"  {'PASS' if value < limit else 'MISS'}  {label}: {value:.3f} {unit} (target < {limit:g} {unit})")
    print()


def profile(mode: str, seconds: float = 8.0) -> None:
    """Profile the proxy (no detectors) under ``mode`` load at concurrency 1."""
    with workdir("gapwatch-profile-") as tmp:
        sim = start_simulator(tmp)
        try:
            proxy = start_proxy(proxy_config(sim, free_port(), [("*", "none")], {"none": {"detectors": {}}}), tmp)
            try:
                print(profile_proxy(proxy, MODES[mode], 1, seconds, tmp))
            finally:
                proxy.stop()
        finally:
            sim.stop()
