"""The detector issues' labelled evaluation sets, judged by ``gapwatch replay``.

Each set becomes replay rows - plain OpenAI request/response pairs with ``expected`` labels -
and runs through the replay engine (``proxy.replay``: the same ``Policy`` and
``ResponsePipeline`` objects the live proxy uses), so each detector's quality is measured by
the product itself rather than by a harness that calls the detector directly:

- ``leakage`` (``tests/data/leakage_eval``): one row per text, the text as the answer;
  labels ``pii``, ``secrets`` (any labelled span of the group) and ``pii:<kind>`` per kind.
  Replay scores rows (does the response contain a leak of this kind?), not spans, so these
  figures differ from ``tests.eval.leakage_eval``, which scores spans.
- ``injection`` (``tests/data/injection_eval``): the case's messages as the request, its
  output as the answer text or as tool-call arguments; labels ``injection``,
  ``injection:<category>`` and ``injection:exfiltration>=high`` (what ``block`` with
  ``min_severity: high`` acts on) - the same per-category counts as ``tests.eval.injection_eval``.
- ``grounding`` (HaluEval QA dev, ``../shared/data/halueval_qa_dev.jsonl`` or
  ``$GAPWATCH_EVAL_DATA``): knowledge as the system message, question as the user message,
  the answer as output; labels ``grounding:grounding_score`` (the response-level verdict, as
  ``tests.eval.grounding_eval`` at the default threshold) and ``grounding`` (any finding).

Detectors run with the settings of the set's own evaluation (defaults, except pii with every
kind enabled). They are built from their config classes directly, so a family is measured
before it is registered; ``--write DIR`` also writes ``DIR/<set>.jsonl`` for
``gapwatch replay DIR/<set>.jsonl --config ... --policy ...``.

    .venv/bin/python -m tests.eval.replay_sets [--set NAME] [--limit N] [--html OUT] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from proxy.capture import detector_config_class
from proxy.config import Config, DetectorEntry, LoadedConfig
from proxy.replay import Replayer, Summary, case_from_row, render_html, render_text, replay

EVAL_POLICY = "eval"


def _answer(text: str = "", tool: tuple[str | None, str] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": text or None}
    finish = "stop"
    if tool is not None:
        msg["tool_calls"] = [{"id": "call_0", "type": "function", "function": {"name": tool[0], "arguments": tool[1]}}]
        finish = "tool_calls"
    return {"object": "chat.completion", "model": "recorded",
            "choices": [{"index": 0, "message": msg, "finish_reason": finish}]}


# -- the sets --------------------------------------------------------------------------------


def leakage_rows(limit: int | None = None) -> list[dict[str, Any]]:
    from tests.eval.leakage_eval import DATA, PII_KINDS

    rows = []
    with open(DATA, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            item = orjson.loads(line)
            kinds = {str(lab["kind"]) for lab in item["labels"]}
            expected = {"pii": bool(kinds & set(PII_KINDS)), "secrets": bool(kinds - set(PII_KINDS))}
            expected |= {f"pii:{k}": k in kinds for k in PII_KINDS}
            rows.append({"id": f"leakage-{item['id']}", "model": "leakage-set", "route": "leakage",
                         "request": {"model": "leakage-set",
                                     "messages": [{"role": "user", "content": "Show me the record."}]},
                         "response": _answer(str(item["text"])), "expected": expected})
            if limit is not None and len(rows) >= limit:
                break
    return rows


def injection_rows(limit: int | None = None) -> list[dict[str, Any]]:
    from detectors.injection import CATEGORIES
    from tests.eval.injection_eval import DATA

    rows = []
    with open(DATA, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            case = orjson.loads(line)
            labels = set(case["labels"])
            expected = {"injection": bool(labels)} | {f"injection:{c}": c in labels for c in CATEGORIES}
            expected["injection:exfiltration>=high"] = "exfiltration" in labels
            response = (_answer(tool=(case.get("tool_name"), case["output"])) if case["channel"] == "tool_call"
                        else _answer(case["output"]))
            rows.append({"id": case["id"], "model": f"injection-{case.get('split', 'all')}", "route": "injection",
                         "request": {"model": "injection-set", "messages": case["messages"]},
                         "response": response, "expected": expected})
            if limit is not None and len(rows) >= limit:
                break
    return rows


def grounding_rows(limit: int | None = None) -> list[dict[str, Any]]:
    from tests.eval.grounding_eval import load_rows

    rows = []
    for r in load_rows(limit=limit):
        halu = bool(r["hallucinated"])
        rows.append({"id": r["id"], "model": "halueval-qa", "route": "grounding",
                     "request": {"model": "halueval-qa",
                                 "messages": [{"role": "system", "content": r["knowledge"]},
                                              {"role": "user", "content": r["question"]}]},
                     "response": _answer(r["answer"]),
                     "expected": {"grounding:grounding_score": halu, "grounding": halu}})
    return rows


def grounding_available() -> bool:
    from tests.eval.grounding_eval import data_path

    return data_path().exists()


SETS: dict[str, tuple[Callable[[int | None], list[dict[str, Any]]], dict[str, dict[str, Any]]]] = {
    "leakage": (leakage_rows, {"pii": {"kinds": ["email", "phone", "card", "iban", "ssn", "national_id", "ip",
                                                 "address"]}, "secrets": {}}),
    "injection": (injection_rows, {"injection": {}}),
    "grounding": (grounding_rows, {"grounding": {}}),
}


def eval_config(detectors: dict[str, dict[str, Any]]) -> LoadedConfig:
    """One policy (``eval``) observing with the given detectors (settings validated by their
    own config classes, as ``gapwatch check-config`` would)."""
    entries = tuple(DetectorEntry(name=name, action="observe", settings=detector_config_class(name)(**settings))
                    for name, settings in detectors.items())
    cfg = Config.model_validate({"upstreams": {"none": {"base_url": "http://127.0.0.1:9/v1"}},
                                 "routes": [{"upstream": "none", "policy": EVAL_POLICY}],
                                 "policies": {EVAL_POLICY: {}, "default": {}}, "incidents": {"sinks": []}})
    return LoadedConfig(config=cfg, detectors={EVAL_POLICY: entries, "default": ()})


def run_set(name: str, limit: int | None = None, write: Path | None = None) -> Summary:
    make_rows, detectors = SETS[name]
    rows = make_rows(limit)
    if write is not None:
        write.mkdir(parents=True, exist_ok=True)
        (write / f"{name}.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    replayer = Replayer(eval_config(detectors), EVAL_POLICY)
    return replay((case_from_row(r, i) for i, r in enumerate(rows)), replayer, keep_rows=False)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", choices=sorted(SETS), action="append", help="which set(s) (default: all)")
    ap.add_argument("--limit", type=int, help="first N rows of each set")
    ap.add_argument("--write", type=Path, help="also write the replay rows to DIR/<set>.jsonl")
    ap.add_argument("--json", type=Path, help="write {set: report} as JSON")
    ap.add_argument("--html", type=Path, help="write one HTML report per set: OUT with the set name inserted")
    ap.add_argument("--errors", type=int, default=10, help="disagreements to list per set")
    args = ap.parse_args(argv)
    reports: dict[str, Any] = {}
    for name in args.set or sorted(SETS):
        if name == "grounding" and not grounding_available():
            print(f"== {name}: skipped (HaluEval data not found; set GAPWATCH_EVAL_DATA)")
            continue
        rep = run_set(name, args.limit, args.write).as_dict(include_rows=False)
        reports[name] = rep
        print(f"== {name}")
        print(render_text(rep, args.errors))
        print()
        if args.html:
            out = args.html.with_name(f"{args.html.stem}-{name}{args.html.suffix or '.html'}")
            out.write_text(render_html(rep, f"gapwatch replay: {name} evaluation set"), encoding="utf-8")
    if args.json:
        args.json.write_bytes(orjson.dumps(reports, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
