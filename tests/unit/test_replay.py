"""gapwatch replay: input formats, policy resolution, labels, live agreement, reports, eval sets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.cli import main as cli_main
from proxy.config import load_dict
from proxy.replay import (
    Case,
    Confusion,
    LabelKey,
    Replayer,
    case_from_row,
    predicted,
    read_cases,
    render_html,
    replay,
)

SYSTEM = ("Our refund window is 30 days from delivery. Refunds go to the original payment method within five "
          "business days of the warehouse receiving the parcel.")


def chat_pair(rid: str, output: str, model: str = "m1", **extra: Any) -> dict[str, Any]:
    return {"id": rid, "request": {"model": model, "messages": [{"role": "system", "content": SYSTEM},
                                                                 {"role": "user", "content": "Refund window?"}]},
            "response": {"object": "chat.completion", "model": model, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": output}, "finish_reason": "stop"}]},
            **extra}


def config(**policies: Any) -> dict[str, Any]:
    pol = policies or {"default": {"detectors": {"regex": {"action": "redact", "patterns": {"acct": "ACCT-[0-9]{8}"}},
                                                 "transparency": {}}}}
    return {"upstreams": {"u": {"base_url": "http://127.0.0.1:9/v1"}},
            "routes": [{"match": {"model": "gpt-*"}, "upstream": "u", "policy": "strict", "name": "gpt"},
                       {"match": {"model": "*"}, "upstream": "u", "policy": "default", "name": "rest"}],
            "policies": {"strict": {"detectors": {"banned_substrings": {"action": "block", "substrings": ["falcon"]}}},
                         **pol},
            "incidents": {"sinks": []}}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- input formats ----------------------------------------------------------------------------


def test_pair_formats_chat_stream_responses_completions():
    c = case_from_row(chat_pair("a", "hello"), 0)
    assert (c.endpoint, c.source, c.model, [(ch.key, t) for ch, t in c.pieces]) == \
        ("chat", "pair", "m1", [("0:text", "hello")])
    assert c.finished == [(0, "stop")]

    stream = {"request": {"model": "m", "messages": [{"role": "user", "content": "q"}]}, "response": [
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"name": "f", "arguments": '{"a"'}}]}}]},
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "lo", "tool_calls": [
            {"index": 0, "function": {"arguments": ": 1}"}}]}, "finish_reason": "tool_calls"}]}]}
    c = case_from_row(stream, 1)
    assert c.stream and c.finished == [(0, "tool_calls")]
    text = "".join(t for ch, t in c.pieces if ch.kind == "text")
    args = "".join(t for ch, t in c.pieces if ch.kind == "tool_call")
    assert (text, args) == ("Hello", '{"a": 1}')
    assert {ch.tool_name for ch, _ in c.pieces if ch.kind == "tool_call"} == {"f"}

    resp = {"request": {"model": "m", "input": "q"}, "response": {"object": "response", "status": "completed",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "answer"}]},
                       {"type": "function_call", "name": "g", "arguments": "{}"}]}}
    c = case_from_row(resp, 2)
    assert c.endpoint == "responses" and [(ch.key, t) for ch, t in c.pieces] == [("0:text", "answer"),
                                                                                  ("0:tool:1", "{}")]
    comp = {"request": {"model": "m", "prompt": "q"},
            "response": {"object": "text_completion", "choices": [{"index": 0, "text": "t", "finish_reason": "stop"}]}}
    assert case_from_row(comp, 3).endpoint == "completions"


def test_capture_rows_and_skips(tmp_path):
    cap = {"v": 1, "kind": "exchange", "request_id": "r1", "endpoint": "chat", "route": "rest", "model": "m",
           "policy": "default", "stream": True, "status": 200, "request": {"model": "m", "messages": []},
           "output": {"0:text": "x", "0:tool:0": "{}"}, "tool_names": {"0:tool:0": "f"}, "finish_reasons": ["stop"],
           "findings": [], "content": "full", "canaries": ["gwc-x"], "headers": {"x-gapwatch-schema": "s"}}
    c = case_from_row(cap, 0)
    assert c.source == "capture" and c.recorded == [] and c.canaries == ("gwc-x",) and c.skip is None
    assert [ch.tool_name for ch, _ in c.pieces] == [None, "f"]
    assert case_from_row({**cap, "content": "none", "output": {}}, 1).skip.startswith("no content")
    assert case_from_row({**cap, "status": 502, "output": {}}, 2).skip.startswith("upstream error")
    assert case_from_row([1, 2], 3).skip == "not a JSON object"
    assert case_from_row({"foo": 1}, 4).skip.startswith("neither")
    path = write_jsonl(tmp_path / "rows.jsonl", [cap, "{not json", "", chat_pair("p", "y")])
    cases = list(read_cases([path]))
    assert [c.skip is None for c in cases] == [True, False, True]
    assert [c.id for c in read_cases([path], limit=1)] == ["r1"]


# -- policy resolution ------------------------------------------------------------------------


def test_policy_resolution_order():
    cfg = config()
    cfg["tenants"] = [{"name": "t-strict", "key_sha256": "0" * 64, "policy": "strict"}]
    r = Replayer(load_dict(cfg))
    case = lambda **kw: Case(id="x", index=0, source="pair", endpoint="chat", body={}, **kw)  # noqa: E731
    assert [(p.name, route) for p, route in [r.resolve(case(model="gpt-4o")), r.resolve(case(model="llama"))]] == \
        [("strict", "gpt"), ("default", "rest")]
    assert r.resolve(case(model="llama", tenant="t-strict"))[0].name == "strict"
    assert r.resolve(case(model="gpt-4o", policy="default", route="live-route"))[0].name == "default"
    assert r.resolve(case(model="gpt-4o", policy="gone"))[0].name == "strict"  # unknown recorded policy: routing
    forced = Replayer(load_dict(cfg), policy="default")
    assert forced.resolve(case(model="gpt-4o"))[0].name == "default"
    from proxy.config import ConfigError

    with pytest.raises(ConfigError, match="unknown policy 'nope'"):
        Replayer(load_dict(cfg), policy="nope")


def test_no_route_falls_back_to_default_policy():
    cfg = config()
    cfg["routes"] = [{"match": {"model": "gpt-*"}, "upstream": "u", "policy": "strict"}]
    p, route = Replayer(load_dict(cfg)).resolve(Case(id="x", index=0, source="pair", endpoint="chat", body={},
                                                      model="other"))
    assert (p.name, route) == ("default", "none")


# -- labels -----------------------------------------------------------------------------------


def test_label_keys():
    f = {"detector": "injection", "category": "exfiltration", "severity": "medium"}
    assert predicted("injection", [f]) and predicted("injection:exfiltration", [f])
    assert not predicted("injection:echo", [f]) and not predicted("injection:exfiltration>=high", [f])
    assert predicted("injection>=medium", [f]) and not predicted("pii", [f])
    k = LabelKey.parse("pii:national_id>=low")
    assert (k.detector, k.category) == ("pii", "national_id")
    with pytest.raises(ValueError):
        LabelKey.parse("bad key!")


def test_confusion():
    c = Confusion()
    for want, got in [(True, True)] * 3 + [(False, True)] + [(True, False)] * 2 + [(False, False)] * 4:
        c.add(want, got)
    assert (c.tp, c.fp, c.fn, c.tn) == (3, 1, 2, 4)
    assert c.precision == pytest.approx(0.75) and c.recall == pytest.approx(0.6)
    assert c.f1 == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert Confusion().precision == 1.0 and Confusion().recall == 1.0


def test_labelled_rows_give_precision_recall_f1_and_disagreements():
    rows = [chat_pair("hit", "your account ACCT-12345678", expected={"regex": True, "regex:acct": True}),
            chat_pair("miss", "your account ACCT-1234", expected={"regex": True}),
            chat_pair("fp", "ref ACCT-87654321 is public", expected={"regex": False}),
            chat_pair("tn", "nothing here", expected={"regex": False}),
            chat_pair("refusal", "I'm sorry, but I can't help with that.", expected={"transparency:refusal": True})]
    rep = replay((case_from_row(r, i) for i, r in enumerate(rows)), Replayer(load_dict(config()))).as_dict()
    lab = rep["labels"]["regex"]
    assert (lab["tp"], lab["fp"], lab["fn"], lab["tn"]) == (1, 1, 1, 1)
    assert lab["precision"] == 0.5 and lab["recall"] == 0.5 and lab["f1"] == 0.5
    assert rep["labels"]["transparency:refusal"]["tp"] == 1
    assert rep["disagreements"]["count"] == 2
    assert {d["id"] for d in rep["disagreements"]["listed"]} == {"miss", "fp"}
    assert rep["detectors"]["regex"] == {"rows_checked": 5, "rows_flagged": 2, "rate": 0.4, "findings": 2,
                                         "actions": {"redact": 2}, "severities": {"high": 2}}
    assert rep["models"]["m1"]["rows"] == 5 and rep["routes"]["rest"]["detectors"]["regex"]["rate"] == 0.4


def test_blocking_policy_stops_detectors_like_the_live_pipeline():
    row = chat_pair("b", "the falcon flies; ACCT-12345678", model="gpt-4o")
    rep = replay([case_from_row(row, 0)], Replayer(load_dict(config()))).as_dict()
    assert rep["blocked_rows"] == 1 and rep["policies"] == {"strict": 1}
    assert [f["action"] for f in rep["results"][0]["findings"]] == ["block"]


# -- live agreement and the CLI -----------------------------------------------------------------


def _capture_row(rid: str, output: str, findings: list[dict[str, Any]]) -> dict[str, Any]:
    return {"v": 1, "kind": "exchange", "request_id": rid, "endpoint": "chat", "route": "rest", "model": "m",
            "policy": "default", "status": 200, "request": {"model": "m", "messages": [
                {"role": "user", "content": "q"}]}, "output": {"0:text": output}, "finish_reasons": ["stop"],
            "findings": findings, "content": "full"}


def test_live_findings_compared_and_check_live_exit_code(tmp_path, capsys):
    from detectors.redaction import mask

    good = {"detector": "regex", "category": "acct", "severity": "high", "channel": "0:text", "span": [8, 21],
            "evidence": mask("ACCT-12345678"), "action": "redact"}
    rows = [_capture_row("same", "account ACCT-12345678", [good]),
            _capture_row("changed", "account ACCT-12345678", [{**good, "span": [0, 5]}])]
    path = write_jsonl(tmp_path / "cap.jsonl", rows)
    cfg = write_jsonl(tmp_path / "cfg.yaml", [config()])
    out = tmp_path / "rep.json"
    rc = cli_main(["replay", str(path), "--config", str(cfg), "--json", str(out), "--check-live"])
    assert rc == 1
    rep = orjson.loads(out.read_bytes())
    live = rep["live"]
    assert (live["rows"], live["identical_rows"], live["matched"], live["only_live"], live["only_replay"]) == \
        (2, 1, 1, 1, 1)
    assert [m["id"] for m in live["mismatches"]] == ["changed"]
    assert [r["live_identical"] for r in rep["results"]] == [True, False]
    assert "live vs replay: 1 of 2 rows identical" in capsys.readouterr().out
    assert cli_main(["replay", str(path), "--config", str(cfg), "--limit", "1", "--check-live"]) == 0


def test_cli_errors(tmp_path, capsys):
    assert cli_main(["replay", str(tmp_path / "missing.jsonl")]) == 1
    bad = write_jsonl(tmp_path / "bad.yaml", ["upstreams: 3"])
    rows = write_jsonl(tmp_path / "r.jsonl", [chat_pair("a", "x")])
    assert cli_main(["replay", str(rows), "--config", str(bad)]) == 2
    assert cli_main(["replay", str(rows), "--policy", "nope"]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "configuration error" in err


def test_default_policy_without_config_and_html_report(tmp_path):
    rows = [chat_pair("g", "The refund window is 30 days from delivery."),
            chat_pair("u", "Refunds take 90 days and CEO Marcus Okonkwo approves each one in 2021.", model="m2",
                      expected={"grounding": True}),
            chat_pair("r", "I'm sorry, but I can't help with that.", model="m2")]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    html, js = tmp_path / "r.html", tmp_path / "r.json"
    assert cli_main(["replay", str(path), "--html", str(html), "--json", str(js)]) == 0
    rep = orjson.loads(js.read_bytes())
    assert rep["policies"] == {"default": 3} and rep["detectors"]["grounding"]["rows_flagged"] >= 1
    assert set(rep["grounding_scores"]) == {"m1", "m2"}
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and " src=" not in page and "href=" not in page and "@import" not in page
    for chart in ("detector-rates", "category-counts", "label-scores", "grounding-scores", "classifications"):
        assert f'data-chart="{chart}"' in page
    assert page == render_html(rep)


# -- the labelled evaluation sets (a small subset; the full run is tests/eval/replay_sets.py) --------------


def test_replay_sets_subset_matches_the_detector_harnesses():
    from tests.eval import injection_eval, replay_sets

    rows = replay_sets.injection_rows(limit=60)
    rep = replay_sets.run_set("injection", limit=60).as_dict()
    harness = injection_eval.evaluate(injection_eval.load()[:60])
    for cat, score in harness.items():
        key = "injection:exfiltration>=high" if cat == injection_eval.EXFIL_HIGH else f"injection:{cat}"
        got = rep["labels"][key]
        assert (got["tp"], got["fp"], got["fn"]) == (score.tp, score.fp, score.fn), key
    assert rep["replayed"] == len(rows) == 60

    leak = replay_sets.run_set("leakage", limit=60).as_dict()
    assert leak["replayed"] == 60 and {"pii", "secrets", "pii:email", "pii:card"} <= set(leak["labels"])
    assert leak["labels"]["pii"]["positives"] > 10 and leak["labels"]["secrets"]["positives"] > 5


def test_replay_sets_grounding_subset_matches_the_harness():
    from tests.conftest import require_halueval

    require_halueval()
    from detectors.grounding import GroundingConfig, GroundingDetector
    from tests.eval import grounding_eval, replay_sets

    rep = replay_sets.run_set("grounding", limit=40).as_dict()
    rows = grounding_eval.load_rows(limit=40)
    det = GroundingDetector(GroundingConfig())
    flagged = [grounding_eval.score_row(det, r) < det.cfg.threshold for r in rows]
    want = Counter(("tp" if f else "fn") if r["hallucinated"] else ("fp" if f else "tn")
                   for f, r in zip(flagged, rows, strict=True))
    got = rep["labels"]["grounding:grounding_score"]
    assert {k: got[k] for k in ("tp", "fp", "fn", "tn")} == {k: want.get(k, 0) for k in ("tp", "fp", "fn", "tn")}
