"""``gapwatch serve --workers 2``: /metrics reports the totals of both workers, not of whichever
worker happened to answer the scrape (prometheus-client multiprocess mode)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import b64
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
N = 120


def _total(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _per_worker_requests(mp_dir: Path) -> dict[str, float]:
    """gapwatch_requests_total as each worker wrote it to its own file."""
    out: dict[str, float] = {}
    for f in mp_dir.glob("counter_*.db"):
        pid = f.stem.split("_")[-1]
        for key, value, _ts, _pos in MmapedDict.read_all_values_from_file(str(f)):
            if json.loads(key)[1] == "gapwatch_requests_total":
                out[pid] = out.get(pid, 0.0) + value
    return out


def _wait_ready(url: str, mp_dir: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "proxy exited"
        # each worker writes its build_info gauge file when it builds its app
        if len(list(mp_dir.glob("gauge_max_*.db"))) >= 2:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    raise AssertionError("two workers did not come up")


async def _drive(base: str, n: int) -> list[int]:
    # no keep-alive: every request is a new connection, so the kernel spreads them over workers
    limits = httpx.Limits(max_keepalive_connections=0, max_connections=8)
    async with httpx.AsyncClient(limits=limits, timeout=15) as client:
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> int:
            async with sem:
                r = await client.post(f"{base}/v1/chat/completions", headers={
                    "authorization": "Bearer sk-test", "x-sim-output": b64(f"ticket-{1000 + i} is done")},
                    json={"model": "sim-echo", "stream": i % 2 == 0,
                          "messages": [{"role": "user", "content": "status?"}]})
                await r.aread()
                return r.status_code

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_two_workers_export_summed_totals(sim: Any, tmp_path: Path) -> None:
    cfg = {
        "upstreams": {"sim": {"base_url": f"{sim.url}/v1"}},
        "routes": [{"match": {"model": "*"}, "upstream": "sim", "policy": "default", "name": "chat"}],
        "policies": {"default": {"detectors": {
            "regex": {"action": "observe", "patterns": {"ticket": "ticket-[0-9]{4}"}}}}},
        "telemetry": {"metrics": {"model_allowlist": ["sim-*"]}},
        "incidents": {"sinks": []},
    }
    cfg_path = tmp_path / "gapwatch.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    mp_dir = tmp_path / "metrics"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--workers", "2", "--config", str(cfg_path),
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_ready(url, mp_dir, proc)
        statuses = asyncio.run(_drive(url, N))
        assert statuses == [200] * N

        per_worker = _per_worker_requests(mp_dir)
        assert len(per_worker) == 2 and all(v > 0 for v in per_worker.values()), per_worker

        # telemetry runs after the response: poll until both workers have recorded everything
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(f"{url}/metrics", timeout=5).text
            if _total(text, "gapwatch_requests_total") >= N or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert _total(text, "gapwatch_requests_total") == N
        assert _total(text, "gapwatch_requests_total", route="chat", model="sim-echo", status_class="2xx") == N
        assert _total(text, "gapwatch_requests_total", streamed="true") == N / 2
        assert _total(text, "gapwatch_request_duration_seconds_count") == N
        assert _total(text, "gapwatch_findings_total", detector="regex", category="ticket") == N
        assert _total(text, "gapwatch_responses_checked_total", detector="regex", verdict="flagged") == N
        assert _total(text, "gapwatch_in_flight_requests") == 0
        assert _total(text, "gapwatch_build_info") == 1  # one series, max over workers (no pid label)
        assert 'pid="' not in text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
