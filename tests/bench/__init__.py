"""Benchmarks (``make bench`` -> ``python -m tests.bench.run``).

Real processes on loopback: the simulated provider and the proxy run as separate
subprocesses, the load comes from a raw asyncio client (concurrency 1, with time to first byte
and first token) or ``wrk`` (concurrency 32), and every proxied figure is measured side by side
with the same requests sent directly to the simulator in the same run. ``proxy_core`` also holds
the shared machinery (server processes, load generators, CPU accounting) that the other
``bench_*`` modules may reuse. See ``tests/bench/README.md`` for what each number means.
"""
