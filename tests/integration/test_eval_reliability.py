"""The reliability properties of ``gapwatch eval`` against simulator models whose behaviour is
known: calibration (ECE, Brier, the most against the least confident answers) separates a
calibrated from an overconfident model, the scorecard ranks them, ``--baseline`` fails when a
model behind a name gets worse, and a model whose answer moves with the phrasing loses
paraphrase agreement on the case (and the phrasing) that shows it.

The expected figures are worked out here from ``proxy.simulate.behaviour_answer`` and a
calibration formula written out in this file, not taken from the code under test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from proxy.cli import main as cli_main
from proxy.evaluate import DEFAULT_CONFIDENCE_PROMPT, load_suite
from proxy.simulate import OVERCONFIDENCE, QUESTION_WORDS, behaviour_answer
from proxy.simulate import create_app as sim_app
from tests.servers import ThreadServer

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "examples" / "eval-config.yaml")
CASES = 150


@pytest.fixture
def own_sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadServer]:
    """A simulator of this module's own: the tests switch the model behind a name on it."""
    srv = ThreadServer(sim_app()).start()
    monkeypatch.setenv("GAPWATCH_EVAL_UPSTREAM", f"{srv.url}/v1")
    yield srv
    srv.stop()


def quiz_suite(tmp_path: Path, n: int = CASES, **extra: Any) -> Path:
    """``n`` questions, each answered by one sentence of its context (the part a right answer
    quotes)."""
    cases = [{"id": f"item-{i}", "context": f"Inventory note. The code for item {i} is QX-{i}{i % 7}.",
              "user": f"What is the code for item {i}?", "checks": {"must_contain": [f"QX-{i}{i % 7}"]}}
             for i in range(n)]
    path = tmp_path / "quiz.yaml"
    path.write_text(yaml.safe_dump({"name": "quiz", "system": "Answer from the note.\n{context}", "cases": cases,
                                    **extra}))
    return path


def run_eval(tmp_path: Path, suite: Path | str, *args: str, out: str = "report.json") -> tuple[int, dict[str, Any]]:
    path = tmp_path / out
    rc = cli_main(["eval", str(suite), "--config", CONFIG, "--json", str(path), "--no-progress", "--concurrency", "8",
                   *args])
    return rc, orjson.loads(path.read_bytes())


def expected_calibration(suite_path: Path, model: str, verbalised: bool = False) -> dict[str, float]:
    """ECE (10 equal-width bins), Brier and the top/bottom 20 % accuracy of ``model`` on the
    suite, from the simulator's behaviour function."""
    suite = load_suite(suite_path)
    pairs = []
    for case in suite.suite.cases:
        msgs = suite.messages(case)
        question = msgs[-1]["content"]
        if verbalised:
            question = f"{question}\n\n{DEFAULT_CONFIDENCE_PROMPT}"
        text, logprob = behaviour_answer(model, msgs[0]["content"], msgs[0]["content"], question)
        assert logprob is not None
        correct = case.checks.must_contain[0].lower() in text.lower()
        pairs.append((2.718281828459045 ** logprob, correct))
    bins: dict[int, list[tuple[float, bool]]] = {}
    for c, ok in pairs:
        bins.setdefault(min(9, int(c * 10)), []).append((c, ok))
    ece = sum(len(b) / len(pairs) * abs(sum(ok for _, ok in b) / len(b) - sum(c for c, _ in b) / len(b))
              for b in bins.values())
    brier = sum((c - ok) ** 2 for c, ok in pairs) / len(pairs)
    ranked = sorted(range(len(pairs)), key=lambda i: pairs[i][0])
    k = round(0.2 * len(pairs))
    return {"ece": ece, "brier": brier, "accuracy": sum(ok for _, ok in pairs) / len(pairs),
            "top": sum(pairs[i][1] for i in ranked[-k:]) / k, "bottom": sum(pairs[i][1] for i in ranked[:k]) / k}


def test_calibration_separates_calibrated_from_overconfident(own_sim, tmp_path, capsys):
    suite = quiz_suite(tmp_path)
    html = tmp_path / "report.html"
    rc, rep = run_eval(tmp_path, suite, "--model", "sim-calibrated", "--model", "sim-overconfident",
                       "--html", str(html))
    assert rc == 0 and rep["complete"]
    cal = {m: rep["per_model"][m]["calibration"] for m in ("sim-calibrated", "sim-overconfident")}
    for model, got in cal.items():
        want = expected_calibration(suite, model)
        assert got["n"] == CASES and got["sources"] == {"logprobs": CASES}
        assert got["ece"] == pytest.approx(want["ece"], abs=1e-5), model
        assert got["brier"] == pytest.approx(want["brier"], abs=1e-5), model
        assert got["top_accuracy"] == pytest.approx(want["top"], abs=1e-5)
        assert got["bottom_accuracy"] == pytest.approx(want["bottom"], abs=1e-5)
        assert sum(b["n"] for b in got["bins"]) == CASES
    good, bad = cal["sim-calibrated"], cal["sim-overconfident"]
    # the same answers, right and wrong alike: only the confidence differs
    assert good["accuracy"] == bad["accuracy"] and 0.3 < good["accuracy"] < 0.7
    assert bad["mean_confidence"] == pytest.approx(OVERCONFIDENCE)
    # a wide margin: the overconfident model's error is several times the calibrated one's
    assert good["ece"] < 0.12 and bad["ece"] > 0.3 and bad["ece"] - good["ece"] > 0.25
    assert bad["brier"] - good["brier"] > 0.15
    # a usable confidence: the calibrated model's surest answers are right far more often
    assert good["top_accuracy"] - good["bottom_accuracy"] > 0.6
    assert abs(bad["top_accuracy"] - bad["bottom_accuracy"]) < 0.3

    # the scorecard: calibration ranks the calibrated model first, accuracy ties
    cards = {m: rep["per_model"][m]["scorecard"] for m in rep["models"]}
    assert set(cards["sim-calibrated"]) == {"paraphrase_agreement", "ece", "brier", "abstention_when_expected",
                                            "robustness", "accuracy"}
    assert cards["sim-calibrated"]["ece"] == good["ece"] and cards["sim-overconfident"]["brier"] == bad["brier"]
    out = capsys.readouterr().out
    head = out.split("\n\n")[1].splitlines()
    assert head[0].startswith("scorecard")
    ece_row = next(line for line in head if "calibration ECE" in line).split()
    assert ece_row[-2].endswith("*") and not ece_row[-1].endswith("*")  # the calibrated model is starred
    accuracy_row = next(line for line in head if "task accuracy" in line)
    assert "*" not in accuracy_row  # a tie stars nobody
    page = html.read_text()
    assert page.index('id="scorecard"') < page.index('data-chart="reliability"') < page.index('data-chart="task-pass"')
    assert page.count('class="point"') == sum(1 for m in cal.values() for b in m["bins"] if b["n"])


def test_verbalised_confidence(own_sim, tmp_path):
    """Asked for a verbalised confidence, the models state it; the line is read and taken off
    the answer before the checks (an exact check still passes), and calibration comes out as
    with logprobs. ``--no-logprobs``: nothing asks the upstream for them."""
    suite = tmp_path / "verbal.yaml"
    cases = [{"id": f"q{i}", "context": f"The code for item {i} is QX-{i}{i % 7}.",
              "user": f"What is the code for item {i}?",
              "checks": {"must_contain": [f"QX-{i}{i % 7}"], "must_not_contain": ["confidence"]}} for i in range(60)]
    suite.write_text(yaml.safe_dump({"name": "verbal", "system": "Answer from the note.\n{context}",
                                     "confidence": "verbalised", "cases": cases}))
    httpx.delete(f"{own_sim.url}/v1/sim/requests")
    rc, rep = run_eval(tmp_path, suite, "--model", "sim-calibrated", "--model", "sim-overconfident", "--no-logprobs")
    assert rc == 0
    sent = httpx.get(f"{own_sim.url}/v1/sim/requests").json()["data"]
    assert len(sent) == 120 and not any(r["body"].get("logprobs") for r in sent)
    assert all(r["body"]["messages"][-1]["content"].endswith(DEFAULT_CONFIDENCE_PROMPT) for r in sent)
    for model in ("sim-calibrated", "sim-overconfident"):
        cal = rep["per_model"][model]["calibration"]
        want = expected_calibration(suite, model, verbalised=True)
        assert cal["sources"] == {"verbalised": 60}
        assert cal["ece"] == pytest.approx(want["ece"], abs=0.006)  # stated as whole percentages
        # the stated line is gone before the checks: no answer failed must_not_contain
        assert rep["per_model"][model]["task"]["by_check"]["must_not_contain"]["rate"] == 1.0
    assert rep["per_model"]["sim-overconfident"]["calibration"]["ece"] > 0.3


def test_logprobs_are_requested_and_stripped(own_sim, tmp_path):
    """In the default mode the proxy asks the upstream for logprobs and the answer the
    evaluation receives (as a client would) carries none."""
    import asyncio

    from proxy.config import load
    from proxy.evaluate import Gateway, eval_config

    loaded = eval_config(load(CONFIG, None))

    async def one() -> tuple[dict[str, Any], bytes]:
        async with Gateway(loaded, "sk-test") as gw:
            resp = await gw.client.post("/v1/chat/completions", json={
                "model": "sim-calibrated", "messages": [{"role": "system", "content": "The code is QX-1."},
                                                        {"role": "user", "content": "What is the code?"}]},
                headers={"authorization": "Bearer sk-test"})
            return resp.json(), resp.content

    httpx.delete(f"{own_sim.url}/v1/sim/requests")
    body, raw = asyncio.run(one())
    upstream = httpx.get(f"{own_sim.url}/v1/sim/requests").json()["data"][-1]["body"]
    assert upstream["logprobs"] is True
    assert body["choices"][0]["logprobs"] is None and b'"token"' not in raw


def test_baseline_fails_when_the_model_behind_a_name_gets_worse(own_sim, tmp_path, capsys):
    """The CI gate: a baseline report of ``sim-prod`` while the calibrated model answers it; the
    same evaluation passes against it; after the provider swaps in the overconfident model
    behind the same name, ``--baseline`` names the regressions and exits 4."""
    suite = quiz_suite(tmp_path, n=100)
    identity = f"{own_sim.url}/v1/sim/identity"
    httpx.post(identity, json={"aliases": {"sim-prod": "sim-calibrated"}}).raise_for_status()
    rc, before = run_eval(tmp_path, suite, "--model", "sim-prod", out="baseline.json")
    assert rc == 0 and before["per_model"]["sim-prod"]["upstream"]["models"] == ["sim-calibrated"]
    baseline = str(tmp_path / "baseline.json")

    rc, same = run_eval(tmp_path, suite, "--model", "sim-prod", "--baseline", baseline, out="same.json")
    assert rc == 0 and same["baseline"]["regressions"] == []
    assert all(r["change"] == 0 for r in same["baseline"]["models"]["sim-prod"]["properties"].values()
               if r["change"] is not None)
    capsys.readouterr()

    httpx.post(identity, json={"aliases": {"sim-prod": "sim-overconfident"}}).raise_for_status()
    rc, after = run_eval(tmp_path, suite, "--model", "sim-prod", "--baseline", baseline, out="after.json")
    out = capsys.readouterr().out
    assert rc == 4
    regressed = {r["property"] for r in after["baseline"]["regressions"]}
    assert regressed == {"ece", "brier"}  # accuracy is the same: the same answers, surer
    row = after["baseline"]["models"]["sim-prod"]["properties"]["ece"]
    assert row["before"] == before["per_model"]["sim-prod"]["scorecard"]["ece"]
    assert row["after"] == after["per_model"]["sim-prod"]["scorecard"]["ece"] and row["worse_by"] > 0.25
    assert "REGRESSION" in out and "upstream now reports sim-overconfident" in out
    assert "2 regressions beyond the margins" in out

    # a margin wide enough for the change lets it through; a bad --margin is a usage error
    rc, _ = run_eval(tmp_path, suite, "--model", "sim-prod", "--baseline", baseline, "--margin", "ece=0.6",
                     "--margin", "brier=0.6", out="lenient.json")
    assert rc == 0
    assert cli_main(["eval", str(suite), "--config", CONFIG, "--model", "sim-prod", "--baseline", baseline,
                     "--margin", "ec=0.1"]) == 2
    assert "unknown property 'ec'" in capsys.readouterr().err
    (tmp_path / "old.json").write_bytes(orjson.dumps({"kind": "gapwatch.eval", "per_model": {"sim-prod": {}}}))
    assert cli_main(["eval", str(suite), "--config", CONFIG, "--model", "sim-prod", "--baseline",
                     str(tmp_path / "old.json")]) == 2
    assert "no scorecard for sim-prod" in capsys.readouterr().err


def test_paraphrases_expose_a_model_that_answers_by_keyword_position(own_sim, tmp_path, capsys):
    """sim-brittle answers from the context only while the question word leads; a phrasing
    that moves it breaks the case. sim-grounded answers every phrasing alike."""
    suite = tmp_path / "para.yaml"
    suite.write_text(yaml.safe_dump({"name": "para", "system": "Answer from the policy.\n{context}", "cases": [
        {"id": "refund-window", "context": "Refunds are accepted within 30 days of delivery.",
         "user": "How long do I have to ask for a refund?",
         "paraphrases": ["For a refund, how long do I have to ask?"],
         "checks": {"must_contain": ["30 days"]}},
        {"id": "opening-hours", "context": "The shop is open from 9am to 5pm on weekdays.",
         "user": "When is the shop open?", "paraphrases": ["When does the shop open its doors?"],
         "checks": {"must_contain": ["9am"]}},
    ]}))
    html = tmp_path / "para.html"
    rc, rep = run_eval(tmp_path, suite, "--model", "sim-grounded", "--model", "sim-brittle", "--paraphrases", "2",
                       "--html", str(html))
    assert rc == 0
    cases = {c["id"]: c for c in rep["cases"]}
    phr = cases["refund-window"]["phrasings"]
    assert [p["kind"] for p in phr[:2]] == ["original", "given"] and len(phr) == 4
    assert rep["jobs"] == 2 * (4 + len(cases["opening-hours"]["phrasings"]))

    good, bad = rep["per_model"]["sim-grounded"], rep["per_model"]["sim-brittle"]
    assert good["paraphrase"]["verdict_agreement"] == 1.0 and good["paraphrase"]["answer_agreement"] == 1.0
    assert good["paraphrase"]["broken_cases"] == []
    assert bad["paraphrase"]["verdict_agreement"] < 1.0 and bad["paraphrase"]["answer_agreement"] < 1.0
    assert bad["scorecard"]["paraphrase_agreement"] == bad["paraphrase"]["verdict_agreement"]
    assert good["scorecard"]["paraphrase_agreement"] == 1.0
    # the original phrasings alone decide accuracy: both models answered them right
    assert good["task"]["pass_rate"] == bad["task"]["pass_rate"] == 1.0
    # the phrasings that broke a case are exactly those whose question word no longer leads
    for cid, case in cases.items():
        moved = [p["index"] for p in case["phrasings"]
                 if p["text"].split()[0].strip(",.?").lower() not in QUESTION_WORDS]
        assert moved and case["per_model"]["sim-brittle"]["paraphrase"]["broken_by"] == moved, cid
        assert case["per_model"]["sim-grounded"]["paraphrase"]["broken_by"] == [], cid
    assert bad["paraphrase"]["broken_cases"] == ["opening-hours", "refund-window"]
    # the given paraphrase of refund-window is one of them; that of opening-hours kept its keyword
    assert 1 in cases["refund-window"]["per_model"]["sim-brittle"]["paraphrase"]["broken_by"]
    assert 1 not in cases["opening-hours"]["per_model"]["sim-brittle"]["paraphrase"]["broken_by"]

    out = capsys.readouterr().out
    assert "refund-window: sim-brittle on phrasing 1 (given): For a refund, how long do I have to ask?" in out
    page = html.read_text()
    assert 'id="phrasing-refund-window-1"' in page and 'href="#phrasing-refund-window-1"' in page


def test_scorecard_transparency_and_robustness(own_sim, tmp_path):
    """The other two properties: abstention when the case expects it, and the probe pack."""
    suite = tmp_path / "abstain.yaml"
    suite.write_text(yaml.safe_dump({"name": "abstain", "cases": [
        {"id": "unknown", "user": "What will the weather be in 2090?", "checks": {"abstain": True}},
        {"id": "known", "user": "Say hello.", "checks": {"must_not_contain": ["password"]}}]}))
    rc, rep = run_eval(tmp_path, suite, "--model", "sim-refusal", "--model", "sim-clean", "--adversarial")
    assert rc == 0
    refusal, clean = rep["per_model"]["sim-refusal"], rep["per_model"]["sim-clean"]
    assert refusal["scorecard"]["abstention_when_expected"] == 1.0
    assert refusal["transparency"]["confabulation_rate"] == 0.0
    assert clean["scorecard"]["abstention_when_expected"] == 0.0 and clean["transparency"]["confabulation_rate"] == 1.0
    assert clean["scorecard"]["robustness"] == clean["robustness"]["overall"] == pytest.approx(0.8)
