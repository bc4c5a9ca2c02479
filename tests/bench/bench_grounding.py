"""Cost of the ``grounding`` detector (the figures quoted in docs come from here).

    .venv/bin/python -m tests.bench.bench_grounding

1. µs per response over the HaluEval QA dev set (short answers, ~350-character contexts):
   prepare (index the context) + stream the answer in 16-character chunks + finish.
2. A long RAG answer against a 20 KB context: the one-off cost of indexing the context
   (``prepare``), and the streaming cost per KB of answer (fed in 20-character chunks, as
   token-sized deltas arrive), each the best of several rounds.
"""

from __future__ import annotations

import time

from detectors.base import TEXT, Message, RequestContext, StreamEnd
from detectors.grounding import GroundingConfig, GroundingDetector
from tests.eval import grounding_eval


def _best(fn, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_halueval(det: GroundingDetector) -> tuple[int, float] | None:
    if not grounding_eval.data_path().exists():
        return None
    rows = grounding_eval.load_rows()
    secs = _best(lambda: [grounding_eval.score_row(det, r) for r in rows], rounds=3)
    return len(rows), secs / len(rows) * 1e6


def long_case(context_kb: int = 20) -> tuple[RequestContext, str]:
    """A 20 KB context of real passages (HaluEval knowledge when present) and an answer built
    from its sentences, lightly reworded, with a few invented figures and names mixed in."""
    if grounding_eval.data_path().exists():
        passages = list(dict.fromkeys(r["knowledge"] for r in grounding_eval.load_rows(limit=600)))
    else:  # synthetic fallback keeps the bench runnable without the data set
        passages = [f"Plant {i} in Region {i % 17} produced {1000 + 37 * i} units in {1990 + i % 30}, "
                    f"according to manager Alex Morgan{i}." for i in range(400)]
    context, i = [], 0
    while sum(map(len, context)) < context_kb * 1024:
        context.append(f"[{i + 1}] {passages[i % len(passages)]}")
        i += 1
    body = "\n\n".join(context)
    sentences = [s.strip() + "." for p in context[:60] for s in p.split(". ") if len(s) > 40]
    answer_parts = []
    for k, s in enumerate(sentences[:80]):
        s = s.replace(" was ", " had been ").replace(" is ", " remains ")
        if k % 9 == 4:
            s += f" It employed {3000 + k} people under Director Helena Quist."
        answer_parts.append(s + (f" [{k % 40 + 1}]" if k % 3 == 0 else ""))
    answer = " ".join(answer_parts)
    ctx = RequestContext(messages=(
        Message("system", "Answer from the documents.\n<documents>\n" + body + "\n</documents>", 0),
        Message("user", "Summarise what the documents say.", 1),
    ))
    return ctx, answer


def bench_long(det: GroundingDetector, context_kb: int = 20) -> dict[str, float]:
    ctx, answer = long_case(context_kb)

    def prepare() -> None:
        det.prepare(ctx)

    def stream() -> None:
        state = det.start(ctx)
        for i in range(0, len(answer), 20):
            state.feed(TEXT, answer[i : i + 20])
        state.finish(TEXT, StreamEnd("stop"))
        state.finish_response()

    t_prepare = _best(prepare)
    t_total = _best(stream)
    kb = len(answer.encode()) / 1024
    state = det.start(ctx)
    findings = state.feed(TEXT, answer) + state.finish(TEXT, StreamEnd("stop")) + state.finish_response()
    return {
        "context_kb": len(ctx.messages[0].text.encode()) / 1024,
        "answer_kb": kb,
        "prepare_us": t_prepare * 1e6,
        "stream_us_per_kb": (t_total - t_prepare) / kb * 1e6,
        "findings": len(findings),
    }


def main() -> None:
    det = GroundingDetector(GroundingConfig())
    short = bench_halueval(det)
    if short is None:
        print("halueval: data not present, skipped")
    else:
        print(f"halueval QA dev: {short[1]:.0f} µs per response over {short[0]} responses "
              f"(prepare + stream + finish)")
    r = bench_long(det)
    print(f"long answer: {r['answer_kb']:.1f} KB answer against a {r['context_kb']:.1f} KB context "
          f"({r['findings']:.0f} findings)")
    print(f"  prepare (index the context, once per response): {r['prepare_us']:.0f} µs")
    print(f"  streaming: {r['stream_us_per_kb']:.0f} µs per KB of answer")


if __name__ == "__main__":
    main()
