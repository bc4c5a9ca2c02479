"""Response-level evaluation of the ``grounding`` detector on the labelled HaluEval QA set.

Each row becomes a request whose system message is the knowledge passage (the context the app
sent) and whose user message is the question; the answer is streamed as the model's output.
A low grounding score should mean a fabricated answer, so the ranking quality is the AUROC of
``1 - score`` against ``hallucinated``; precision, recall and F1 are for flagging responses whose
score is below the threshold. The threshold printed is the one that maximises F1 on this file;
the detector's default (``GroundingConfig.threshold``) was set from it.

    .venv/bin/python -m tests.eval.grounding_eval [--data FILE] [--limit N]

The data lives outside the repo (``../shared/data/halueval_qa_dev.jsonl`` next to the work
tree, or ``$GAPWATCH_EVAL_DATA``); see its README for the format and licence.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from detectors.base import TEXT, Message, RequestContext, StreamEnd
from detectors.grounding import GroundingConfig, GroundingDetector

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "halueval_qa_dev.jsonl"


def data_path() -> Path:
    return Path(os.environ.get("GAPWATCH_EVAL_DATA", DEFAULT_DATA))


def load_rows(path: Path | None = None, limit: int | None = None) -> list[dict]:
    rows: list[dict] = []
    with open(path or data_path(), encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def context_for(row: dict) -> RequestContext:
    return RequestContext(messages=(Message("system", row["knowledge"], 0), Message("user", row["question"], 1)))


def score_row(detector: GroundingDetector, row: dict) -> float:
    """The response score for one row, streamed in 16-character chunks as a proxy would."""
    state = detector.start(context_for(row))
    answer = row["answer"]
    for i in range(0, len(answer), 16):
        state.feed(TEXT, answer[i : i + 16])
    state.finish(TEXT, StreamEnd("stop"))
    state.finish_response()
    score = detector.response_score(state._prepared)
    return 1.0 if score is None else score


def auroc(labels: list[bool], risk: list[float]) -> float:
    """Probability that a random positive is ranked above a random negative (ties count half)."""
    pairs = sorted(zip(risk, labels, strict=True))
    pos = sum(labels)
    neg = len(labels) - pos
    if not pos or not neg:
        return float("nan")
    rank_sum = 0.0
    i = 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + j + 1) / 2  # 1-based ranks i+1..j
        rank_sum += avg_rank * sum(1 for k in range(i, j) if pairs[k][1])
        i = j
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


@dataclass(frozen=True)
class Report:
    n: int
    auroc: float
    threshold: float
    precision: float
    recall: float
    f1: float
    default_threshold: float
    default_precision: float
    default_recall: float
    default_f1: float
    us_per_response: float


def prf(labels: list[bool], scores: list[float], threshold: float) -> tuple[float, float, float]:
    flagged = [s < threshold for s in scores]
    tp = sum(1 for f, y in zip(flagged, labels, strict=True) if f and y)
    fp = sum(1 for f, y in zip(flagged, labels, strict=True) if f and not y)
    fn = sum(1 for f, y in zip(flagged, labels, strict=True) if not f and y)
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def evaluate(rows: list[dict], config: GroundingConfig | None = None) -> Report:
    detector = GroundingDetector(config or GroundingConfig())
    labels = [bool(r["hallucinated"]) for r in rows]
    t0 = time.perf_counter()
    scores = [score_row(detector, r) for r in rows]
    elapsed = time.perf_counter() - t0
    best = (0.0, 0.0, 0.0, 0.0)
    for t in [*sorted(set(scores)), 1.01]:
        p, r, f = prf(labels, scores, t)
        if f > best[3]:
            best = (t, p, r, f)
    dt = detector.cfg.threshold
    dp, dr, df = prf(labels, scores, dt)
    return Report(
        n=len(rows), auroc=auroc(labels, [1 - s for s in scores]), threshold=best[0], precision=best[1],
        recall=best[2], f1=best[3], default_threshold=dt, default_precision=dp, default_recall=dr,
        default_f1=df, us_per_response=elapsed / max(1, len(rows)) * 1e6,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)
    rows = load_rows(args.data, args.limit)
    rep = evaluate(rows)
    print(f"grounding on {rep.n} responses ({(args.data or data_path()).name})")
    print(f"AUROC of (1 - score):           {rep.auroc:.3f}")
    print(f"best-F1 threshold (score < t):  {rep.threshold:.3f}  "
          f"P={rep.precision:.3f} R={rep.recall:.3f} F1={rep.f1:.3f}")
    print(f"chosen default {rep.default_threshold:.2f} (score < t): "
          f"P={rep.default_precision:.3f} R={rep.default_recall:.3f} F1={rep.default_f1:.3f}")
    print(f"cost:                           {rep.us_per_response:.0f} µs per response "
          f"(prepare + stream + finish)")


if __name__ == "__main__":
    main()
