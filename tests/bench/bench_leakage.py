"""Cost of the ``pii`` and ``secrets`` detectors, alone and together (figures in docs come
from here).

    .venv/bin/python -m tests.bench.bench_leakage

Microseconds per KB of output, fed whole and in 20-character chunks (token-sized deltas), for
three kinds of output: ordinary prose with numbers but no PII (the common case); technical
output (code, JSON, logs with hashes, UUIDs, versions, URLs; no PII); and the labelled
evaluation set (dense with PII and credentials). Plus the one-off cost of the
``ignore_if_in_request`` index for a 20 KB request, paid only when an output holds PII.
Each figure is the best of several rounds, in CPU time of the bench process (the machine is
shared; wall-clock figures would include other jobs).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from detectors.base import TEXT, Detector, Message, RequestContext, StreamEnd
from detectors.pii import PiiConfig
from detectors.secrets import SecretsConfig

SENTENCE = ("the blender runs quietly and customers report that delivery improved after the firmware "
            "update while support answered questions within a day and the warranty covers parts for two "
            "years so we recommend it for small kitchens")
WORDS = SENTENCE.split(" ")


def prose(kb: int = 20, seed: int = 1) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    while sum(map(len, out)) < kb * 1024:
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))
        if rng.random() < 0.3:
            s += f" in {rng.randint(2, 12)} days for ${rng.randint(10, 900)}.{rng.randint(0, 99):02d}"
        out.append(s.capitalize() + ". ")
    return "".join(out)


def technical(kb: int = 20, seed: int = 2) -> str:
    rng = random.Random(seed)
    hexd = "0123456789abcdef"
    lines: list[str] = []
    while sum(map(len, lines)) < kb * 1024:
        h = "".join(rng.choice(hexd) for _ in range(40))
        u = "-".join("".join(rng.choice(hexd) for _ in range(n)) for n in (8, 4, 4, 4, 12))
        lines.append(rng.choice([
            f"2024-05-{rng.randint(10, 28)}T12:{rng.randint(10, 59)}:07Z INFO request_id={u} status=200 "
            f"latency_ms={rng.randint(1, 900)} path=/api/v2/orders/{rng.randint(1000, 99999)}\n",
            f'{{"id": "{u}", "commit": "{h}", '
            f'"version": "v{rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}",'
            f' "items": [{rng.randint(1, 99)}, {rng.randint(100, 999)}]}}\n',
            f"    def handle_{rng.choice(WORDS)}(self, ctx: RequestContext) -> list[Finding]:"
            "  # see https://docs.example.com/x\n",
            f"ERROR at /usr/local/lib/python3.11/site-packages/app/{rng.choice(WORDS)}.py:{rng.randint(1, 999)}\n",
        ]))
    return "".join(lines)


def eval_text() -> str:
    from tests.eval.leakage_eval import load

    return "\n".join(str(it["text"]) for it in load())


def _best(fn: Callable[[], object], rounds: int = 5) -> float:
    """Best of ``rounds``, in CPU seconds of this process: on a shared machine the wall clock
    also counts other jobs' time slices."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def _feed(detectors: list[Detector], ctx: RequestContext, text: str, chunk: int) -> None:
    states = [d.start(ctx) for d in detectors]
    step = chunk or len(text)
    for i in range(0, len(text), step):
        piece = text[i : i + step]
        for st in states:
            st.feed(TEXT, piece)
    for st in states:
        st.finish(TEXT, StreamEnd("stop"))
        st.finish_response()


def main() -> dict[str, float]:
    pii = PiiConfig().build()
    secrets = SecretsConfig().build()
    combos = {"pii": [pii], "secrets": [secrets], "both": [pii, secrets]}
    corpora = {"prose": prose(), "technical": technical(), "eval set": eval_text()}
    ctx = RequestContext()
    print("== leakage detectors: pii, secrets (defaults) ==")
    print(f"lookback_chars: pii {pii.lookback_chars}, secrets {secrets.lookback_chars}")
    print(f"{'output':10s} {'KB':>6s} {'chunks':>7s} " + " ".join(f"{k:>9s}" for k in combos) + "   (µs per KB)")
    headline: dict[str, float] = {}
    for cname, text in corpora.items():
        kb = len(text) / 1024
        for chunk in (0, 20):
            row = []
            for name, dets in combos.items():
                sec = _best(lambda dets=dets, text=text, chunk=chunk: _feed(dets, ctx, text, chunk),
                            rounds=3 if cname == "eval set" else 5)
                us = sec * 1e6 / kb
                row.append(us)
                mode = "whole" if not chunk else "chunk20"
                headline[f"leakage.{cname.replace(' ', '_')}.{name}.{mode}_us_per_kb"] = us
            label = "whole" if not chunk else "20 chars"
            print(f"{cname:10s} {kb:6.0f} {label:>7s} " + " ".join(f"{v:9.0f}" for v in row))
    # ignore_if_in_request: the normalised request is built once, on the first candidate
    request = RequestContext(messages=(Message("system", prose(20, seed=5), 0),
                                       Message("user", "my email is jane.doe@example.com", 1)))
    out = "Sure, jane.doe@example.com is on file."
    sec = _best(lambda: _feed([pii], request, out, 20), rounds=7)
    base = _best(lambda: _feed([pii], ctx, out, 20), rounds=7)
    print(f"ignore_if_in_request with a 20 KB request: {1e6 * (sec - base):.0f} µs once per response "
          "that has a PII candidate (0 otherwise)")
    headline["leakage.request_index_20kb_us"] = 1e6 * (sec - base)
    return headline


if __name__ == "__main__":
    main()
