"""``make bench``: the proxy core bench, the detector pipeline bench and the in-process
micro-benchmark, then ``main()`` of every other ``tests/bench/bench_*.py`` module.

Each part runs in its own ``try`` so one failure does not hide the others; failures are listed
at the end and make the exit status non-zero. Missed targets do not fail the run: a benchmark
reports, it does not gate.

    python -m tests.bench.run                      everything
    python -m tests.bench.run --only core,micro    some parts (core, pipeline, micro, others)
    python -m tests.bench.run --profile stream     py-spy profile of the proxy under one load
                                                   (unary, stream, stream-1ms, stream-burst, regex, trivial, plain)
    GAPWATCH_BENCH_SCALE=0.3 python -m ...         shorter batches (a quick look, noisier)
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from tests.bench import pipeline, proxy_core

PARTS = ("core", "pipeline", "micro", "others")


def _header(argv: list[str]) -> None:
    cmd = " ".join([Path(sys.executable).as_posix(), "-m", "tests.bench.run", *argv])
    print("gapwatch benchmarks")
    print(f"command:  make bench  ->  {cmd}")
    print("          (each section prints the exact server commands and configs it starts)")
    rev = ""
    if shutil.which("git"):
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                              cwd=Path(__file__).resolve().parents[2])
        rev = proc.stdout.strip()
    wrk = "wrk (apt-get install -y wrk)" if not proxy_core.wrk_available() else "wrk installed"
    print(f"machine:  {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f} at start, {wrk}, CPU clock tick {1000 // proxy_core.CLK_TCK} ms"
          + (f", commit {rev}" if rev else ""))
    print(f"scale:    GAPWATCH_BENCH_SCALE={proxy_core.scale():g} (batch durations multiplied by this)")
    print()


def _others() -> list[str]:
    here = Path(__file__).parent
    return sorted(p.stem for p in here.glob("bench_*.py"))


def _profile(mode: str) -> int:
    models = {"regex": "bench-regex", "trivial": "bench-trivial", "plain": "bench-plain"}
    if mode in models:
        with proxy_core.workdir("gapwatch-profile-") as tmp:
            sim = proxy_core.start_simulator(tmp)
            try:
                cfg = proxy_core.proxy_config(sim, proxy_core.free_port(), pipeline.ROUTES, pipeline.POLICIES)
                proxy = proxy_core.start_proxy(cfg, tmp)
                try:
                    print(proxy_core.profile_proxy(proxy, pipeline._spec(models[mode]), 1, 8.0, tmp))
                finally:
                    proxy.stop()
            finally:
                sim.stop()
        return 0
    if mode not in proxy_core.MODES:
        print(f"unknown profile mode {mode!r}; use one of {', '.join([*proxy_core.MODES, *models])}")
        return 2
    proxy_core.profile(mode)
    return 0


def _summary(h: dict[str, float]) -> None:
    if not h:
        return
    print("== summary ==")
    lines = []
    if "unary.c1.added_p50_ms" in h:
        lines.append(f"added p50, non-streaming, c=1:            {h['unary.c1.added_p50_ms']:.3f} ms (target < 1)")
        lines.append(f"added p50 / TTFB p50, stream 1 chunk/ms:   {h['stream-1ms.c1.added_p50_ms']:.3f} / "
                     f"{h['stream-1ms.c1.added_ttfb_p50_ms']:.3f} ms (target < 1)")
        lines.append(f"proxy CPU, non-streaming request, c=1/32:  {h['unary.c1.proxy_cpu_ms']:.3f} / "
                     f"{h['unary.c32.proxy_cpu_ms']:.3f} ms (target < 0.5)")
        lines.append(f"proxy CPU, 50-chunk stream, c=1/32:        {h['stream.c1.proxy_cpu_ms']:.3f} / "
                     f"{h['stream.c32.proxy_cpu_ms']:.3f} ms (target < 1.5; back-to-back chunks)")
        lines.append(f"proxy CPU, 50-chunk stream at 1 chunk/ms:  {h['stream-1ms.c1.proxy_cpu_ms']:.3f} ms "
                     "(each chunk wakes an idle process: see README, 'cold' runs)")
    if "micro.relay_passthrough_50" in h and "stream.c1.proxy_cpu_ms" in h:
        share = 100 * h["micro.relay_passthrough_50"] / (1e3 * h["stream.c1.proxy_cpu_ms"])
        us = h["micro.relay_passthrough_50"]
        lines.append(f"pass-through SSE parse + delta extraction: {us:.0f} µs per 50-chunk stream"
                     f" = {share:.1f}% of the proxy's CPU per stream (metrics only; no detectors)")
    if "pipeline.fast.regex20.detector_ms" in h:
        lines.append(f"regex detector, 20 patterns, 2 KB / 5-char: {h['pipeline.fast.regex20.detector_ms']:.3f} ms in "
                     "the proxy (target < 0.3)" + (f", {h['micro.detector_regex_2k'] / 1e3:.3f} ms in-process"
                                                   if "micro.detector_regex_2k" in h else ""))
        lines.append(f"pipeline with one no-op detector:          {h['pipeline.trivial_share_pct']:.1f}% of proxy CPU "
                     "(target < 5)")
        ttft = h["pipeline.1ms.regex20.added_ttft_p50_ms"]
        lines.append(f"TTFT added by regex20 at 1 chunk/ms:       {ttft:.1f} ms p50")
    for line in lines:
        print("  " + line)
    print()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m tests.bench.run", description="gapwatch benchmarks")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    ap.add_argument("--profile", metavar="MODE", help="profile the proxy with py-spy under one load and exit")
    args = ap.parse_args(argv)
    if args.profile:
        return _profile(args.profile)
    only = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = only - set(PARTS)
    if unknown:
        ap.error(f"unknown parts: {', '.join(sorted(unknown))}")
    _header(argv)
    t0 = time.monotonic()
    headline: dict[str, float] = {}
    failed: list[str] = []

    def part(name: str, fn: Callable[[], dict[str, float] | None]) -> None:
        started = time.monotonic()
        try:
            got = fn()
            if isinstance(got, dict):
                headline.update(got)
        except Exception:  # noqa: BLE001 - one failing part must not hide the others
            failed.append(name)
            print(f"FAILED: {name}")
            traceback.print_exc(limit=6, file=sys.stdout)
            print()
        finally:
            print(f"[{name}: {time.monotonic() - started:.0f}s]")
            print()
            sys.stdout.flush()

    if "core" in only:
        part("proxy_core", proxy_core.main)
    if "pipeline" in only:
        part("pipeline", pipeline.main)
    if "micro" in only:
        part("micro", pipeline.micro)
    if "others" in only:
        for name in _others():
            def run_other(name: str = name) -> dict[str, float] | None:
                mod = importlib.import_module(f"tests.bench.{name}")
                fn = getattr(mod, "main", None)
                if fn is None:
                    raise RuntimeError(f"tests/bench/{name}.py has no main()")
                got = fn()
                return got if isinstance(got, dict) else None
            part(name, run_other)
    _summary(headline)
    if any(k.endswith(("_cpu_ms", "detector_ms", "share_pct")) for k in headline):
        print("profile a missed target: python -m tests.bench.run --profile stream (or unary, regex, trivial, plain); "
              "needs py-spy: .venv/bin/pip install py-spy")
    print(f"total {time.monotonic() - t0:.0f}s, load average {os.getloadavg()[0]:.2f} at end"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
