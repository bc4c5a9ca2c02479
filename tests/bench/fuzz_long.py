"""The fuzz targets of ``tests/unit/test_sse_fuzz.py``, for minutes instead of seconds.

    .venv/bin/python -m tests.bench.fuzz_long [--minutes 10] [--batch 2000]

Runs every hypothesis target in rounds of ``--batch`` examples (a fresh random seed each
round) until the time is up, and reports examples run per target. A failure stops the run:
hypothesis shrinks it, the minimal input is written to the corpus
(``tests/data/streams/<endpoint>__fuzz-<sha>.sse``, replayed by ``test_corpus_file``) and the
traceback is printed. Exit status 1 on a failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections import Counter
from typing import Any

import orjson


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fuzz_long")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=2000, help="examples per target per round")
    args = ap.parse_args(argv)
    os.environ["GAPWATCH_FUZZ_EXAMPLES"] = str(args.batch)  # read when the test module is imported

    from tests.unit import test_sse_fuzz as fz

    counts: Counter[str] = Counter()
    last: list[tuple[str, tuple[Any, ...]]] = [("", ())]  # the most recent call: on failure, the minimal one

    def counting(name: str, fn: Any) -> Any:
        def wrapped(*a: Any) -> Any:
            counts[name] += 1
            last[0] = (name, a)
            return fn(*a)
        return wrapped

    for name in ("check_parser", "check_line_cap", "check_deltas", "check_relay", "check_unary"):
        setattr(fz, name, counting(name, getattr(fz, name)))
    targets = [fz.test_parser_split_invariance_and_reference, fz.test_parser_line_cap_independent_of_splits,
               fz.test_delta_extraction_never_raises, fz.test_relay_on_corpus_streams, fz.test_relay_on_mutated_streams,
               fz.test_unary_bodies_never_raise]
    deadline = time.monotonic() + args.minutes * 60
    started = time.monotonic()
    rounds = 0
    while time.monotonic() < deadline:
        rounds += 1
        for target in targets:
            try:
                target()
            except Exception:  # noqa: BLE001 - report any failure the property found
                traceback.print_exc()
                name, failing = last[0]
                print(f"fuzz_long: FAILURE in {target.__name__} ({name}); minimal input saved to "
                      f"{save(fz, name, failing)}", file=sys.stderr)
                return 1
            if time.monotonic() >= deadline:
                break
    elapsed = time.monotonic() - started
    total = sum(counts.values())
    print(f"fuzz_long: {total} examples in {elapsed / 60:.1f} min ({rounds} rounds), no failure")
    for name, n in sorted(counts.items()):
        print(f"  {name:16s} {n:>9d}")
    return 0


def save(fz: Any, name: str, args: tuple[Any, ...]) -> str:
    """The failing input as a corpus file (JSON payloads become one ``data:`` event)."""
    if not args:
        return "(nothing recorded)"
    if name == "check_relay":
        return str(fz.save_crash(args[1], args[0]))
    if name in ("check_parser", "check_line_cap"):
        return str(fz.save_crash(args[0]))
    obj = args[1] if name == "check_unary" else args[0]
    endpoint = args[0] if name == "check_unary" else "chat"
    return str(fz.save_crash(b"data: " + orjson.dumps(obj) + b"\n\n", endpoint))


if __name__ == "__main__":
    sys.exit(main())
