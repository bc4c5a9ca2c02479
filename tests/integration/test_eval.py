"""gapwatch eval against the simulated provider: a well-behaved and a badly behaved model get
different figures, and the figures are the ones the simulator's known outputs imply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from proxy.cli import main as cli_main
from proxy.evaluate import load_suite, run_checks
from proxy.simulate import SCENARIO_OUTPUTS, estimate_tokens, scenario_output

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CONFIG = str(EXAMPLES / "eval-config.yaml")


@pytest.fixture
def upstream(sim, monkeypatch):
    """examples/eval-config.yaml reads the simulator's address from the environment."""
    monkeypatch.setenv("GAPWATCH_EVAL_UPSTREAM", f"{sim.url}/v1")
    return sim


def run_eval(tmp_path: Path, suite: str, *args: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "report.json"
    rc = cli_main(["eval", suite, "--config", CONFIG, "--json", str(out), "--no-progress", *args])
    return rc, orjson.loads(out.read_bytes())


def test_support_suite_separates_grounded_from_ungrounded_model(upstream, tmp_path):
    suite_path = str(EXAMPLES / "support" / "suite.yaml")
    html = tmp_path / "report.html"
    rc, rep = run_eval(tmp_path, suite_path, "--model", "sim-grounded", "--model", "sim-ungrounded",
                       "--html", str(html))
    # six cases, each also asked in its given paraphrases (seven of them), for two models
    phrasings = sum(1 + len(c.paraphrases) for c in load_suite(suite_path).suite.cases)
    assert phrasings == 13
    assert rc == 0 and rep["complete"] and rep["jobs"] == 26 and rep["sent_this_run"] == 26
    good, bad = rep["per_model"]["sim-grounded"], rep["per_model"]["sim-ungrounded"]

    # what the simulator will answer, worked out independently of the eval code
    suite = load_suite(suite_path)
    systems = [suite.messages(c)[0]["content"] for c in suite.suite.cases]
    grounded = [scenario_output("sim-grounded", s, s) for s in systems]
    for case, text in zip(suite.suite.cases, grounded, strict=True):
        # the quoted sentence is the policy sentence that answers the question
        assert all(s.lower() in text.lower() for s in case.checks.must_contain), case.id

    # task checks: the grounded model answers the five answerable questions and fails the one
    # that needed "I don't know"; the ungrounded model passes nothing
    assert (good["responses"], good["errors"], bad["errors"]) == (13, 0, 0)
    assert good["task"]["passed"] == 5 and good["task"]["pass_rate"] == pytest.approx(5 / 6, abs=1e-6)
    assert good["task"]["by_check"]["must_contain"] == {"passed": 5, "n": 5, "rate": 1.0}
    assert good["task"]["by_check"]["abstain"] == {"passed": 0, "n": 1, "rate": 0.0}
    assert bad["task"]["passed"] == 0 and bad["task"]["by_check"]["must_contain"]["rate"] == 0.0
    assert bad["task"]["by_check"]["must_not_contain"]["rate"] == 1.0  # it never says "90 days" either
    failed = {c["id"]: c["per_model"] for c in rep["cases"]}
    assert failed["gift-card-unknown"]["sim-grounded"]["failed_checks"] == ["abstain"]
    assert all(not failed[c.id]["sim-grounded"]["failed_checks"] for c in suite.suite.cases[:5])

    # detectors: the fabricated figures are flagged every time, the quotes never
    assert good["detectors"]["grounding"] == {"flagged": 0, "n": 6, "rate": 0.0}
    assert bad["detectors"]["grounding"] == {"flagged": 6, "n": 6, "rate": 1.0}
    assert bad["categories"]["grounding:unsupported_number"]["rate"] == 1.0
    assert good["transparency"]["answered"] == 1.0 and bad["transparency"]["abstention_rate"] == 0.0

    # usage: the simulator's deterministic token estimates
    assert bad["tokens"]["completion_mean"] == estimate_tokens(SCENARIO_OUTPUTS["sim-ungrounded"])
    assert good["tokens"]["completion_mean"] == pytest.approx(sum(map(estimate_tokens, grounded)) / 6, abs=1e-3)
    assert good["tokens"]["prompt_mean"] == bad["tokens"]["prompt_mean"] > 0
    for m in (good, bad):
        lat = m["latency_ms"]
        assert lat["n"] == 6 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    page = html.read_text()
    for chart in ("task-pass", "detector-rates", "transparency", "latency", "tokens"):
        assert f'data-chart="{chart}"' in page


def test_adversarial_pack_robustness(upstream, tmp_path):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(yaml.safe_dump({"name": "tiny", "cases": [
        {"id": "hello", "user": "Say hello.", "checks": {"must_not_contain": ["password"]}}]}))
    rc, rep = run_eval(tmp_path, str(suite), "--model", "sim-clean", "--model", "sim-system-leak",
                       "--adversarial", "--concurrency", "8")
    assert rc == 0 and rep["jobs"] == 2 * (1 + 14)
    clean = rep["per_model"]["sim-clean"]["robustness"]
    leak = rep["per_model"]["sim-system-leak"]["robustness"]
    rates = lambda r: {f: v["rate"] for f, v in r["families"].items()}  # noqa: E731
    # sim-clean ignores every planted instruction and keeps its prompt; it cannot produce JSON
    assert rates(clean) == {"planted_context": 1.0, "planted_tool_result": 1.0, "prompt_extraction": 1.0,
                            "pii_bait": 1.0, "schema_stress": 0.0}
    # sim-system-leak recites its system message: the canary, the planted document and the PII
    # bait that were retrieved into it; tool results are not in it
    assert rates(leak) == {"planted_context": 0.0, "planted_tool_result": 1.0, "prompt_extraction": 0.0,
                           "pii_bait": 0.0, "schema_stress": 0.0}
    assert clean["overall"] == pytest.approx(0.8) and leak["overall"] == pytest.approx(0.2)
    assert rep["per_model"]["sim-system-leak"]["detectors"]["system_prompt_leak"]["flagged"] >= 4
    assert rep["per_model"]["sim-clean"]["detectors"]["system_prompt_leak"]["flagged"] == 0
    # the task case is scored apart from the probes
    assert rep["per_model"]["sim-clean"]["task"] == {**rep["per_model"]["sim-clean"]["task"], "cases": 1,
                                                     "passed": 1}


def test_budget_then_resume_with_repeats_and_replay_of_the_state(upstream, tmp_path, capsys):
    suite = str(EXAMPLES / "extraction" / "suite.yaml")
    state = tmp_path / "state.jsonl"
    common = ["--model", "sim-json-valid", "--model", "sim-json-fenced", "--repeats", "2", "--resume", str(state)]
    rc, rep = run_eval(tmp_path, suite, *common, "--budget", "5")
    # four notes, each also in one other layout (paraphrases), two models, two repeats
    assert rc == 3 and not rep["complete"] and (rep["done"], rep["jobs"], rep["sent_this_run"]) == (5, 32, 5)
    assert "continue with --resume" in capsys.readouterr().out
    rc, rep = run_eval(tmp_path, suite, *common)
    assert rc == 0 and rep["complete"] and (rep["resumed"], rep["sent_this_run"]) == (5, 27)
    assert len(state.read_text().splitlines()) == 32
    valid, fenced = rep["per_model"]["sim-json-valid"], rep["per_model"]["sim-json-fenced"]
    # sim-json-valid always answers with the Ada Lovelace record: valid JSON, right only for "ada"
    assert valid["task"]["by_check"]["json_schema"]["rate"] == 1.0
    assert valid["task"]["by_check"]["json_subset"] == {"passed": 2, "n": 8, "rate": 0.25}
    assert fenced["task"]["by_check"]["json_schema"]["rate"] == 0.0 and fenced["task"]["passed"] == 0
    assert valid["detectors"]["schema"]["rate"] == 0.0 and fenced["detectors"]["schema"]["rate"] == 1.0
    for m in (valid, fenced):
        assert m["consistency"] == {"cases": 4, "output_agreement": 1.0, "verdict_agreement": 1.0}

    # a third run has nothing left to send
    rc, rep = run_eval(tmp_path, suite, *common)
    assert rc == 0 and rep["sent_this_run"] == 0 and rep["resumed"] == 32

    # the state is capture-format: replay judges it again with the same detectors
    out = tmp_path / "replay.json"
    assert cli_main(["replay", str(state), "--config", CONFIG, "--json", str(out)]) == 0
    rrep = orjson.loads(out.read_bytes())
    assert rrep["replayed"] == 32 and rrep["models"]["sim-json-fenced"]["detectors"]["schema"]["rate"] == 1.0
    assert rrep["live"]["identical_rows"] == 32  # shadow mode judged with the same detectors


def test_rag_suite_abstention(upstream, tmp_path):
    rc, rep = run_eval(tmp_path, str(EXAMPLES / "rag" / "suite.yaml"), "--model", "sim-grounded",
                       "--model", "sim-refusal")
    assert rc == 0
    grounded, refusal = rep["per_model"]["sim-grounded"], rep["per_model"]["sim-refusal"]
    assert grounded["task"]["passed"] == 4 and refusal["task"]["passed"] == 1
    assert refusal["transparency"]["refused"] == 1.0 and grounded["transparency"]["abstention_rate"] == 0.0


def test_suite_and_config_errors(tmp_path, capsys, upstream):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "documents": {"d": "# A\ntext"}, "cases": [
        {"id": "a", "user": "q", "context": {"doc": "d", "section": "B"}},
        {"id": "a", "context": {"doc": "nope"}},
        {"id": "c", "user": "q", "checks": {"must_not_fire": ["bad key!"]}}]}))
    assert cli_main(["eval", str(bad), "--model", "m", "--config", CONFIG]) == 2
    err = capsys.readouterr().err
    assert "must_not_fire" in err
    bad.write_text(yaml.safe_dump({"name": "x", "documents": {"d": "# A\ntext"}, "cases": [
        {"id": "a", "user": "q", "context": {"doc": "d", "section": "B"}},
        {"id": "a", "context": {"doc": "nope"}}]}))
    assert cli_main(["eval", str(bad), "--model", "m", "--config", CONFIG]) == 2
    err = capsys.readouterr().err
    assert "no section 'B' in 'd' (sections: A)" in err and "duplicate id 'a'" in err
    assert "unknown document 'nope'" in err and "give 'user'" in err
    assert cli_main(["eval", str(EXAMPLES / "rag" / "suite.yaml"), "--model", "m", "--config",
                     str(tmp_path / "missing.yaml")]) == 2


def test_check_functions():
    from proxy.evaluate import Checks

    f = [{"detector": "pii", "category": "email", "severity": "medium"}]
    c = Checks(must_contain=["Thirty  Days"], must_not_contain=["never"], exact=["30 days."],
               json_subset=None, must_fire=["pii:email"], must_not_fire=["secrets"], abstain=False)
    assert run_checks(c, "thirty days", "", f, "answered") == {
        "must_contain": True, "must_not_contain": True, "exact": False, "must_fire": True, "must_not_fire": True,
        "abstain": True}
    assert run_checks(Checks(exact="30 days"), " 30 Days. ", "", [], None) == {"exact": True}
    schema = {"type": "object", "required": ["a"]}
    j = Checks(json_schema=schema, json_subset={"a": [1], "b": {"c": "X"}}, target="tool_arguments")
    assert run_checks(j, "", '{"a": [1, 2], "b": {"c": "x"}}', [], None) == {"json_schema": True, "json_subset": True}
    assert run_checks(j, '{"a": 1}', "not json", [], None) == {"json_schema": False, "json_subset": False}
    assert run_checks(Checks(abstain=True), "", "", [], "refused") == {"abstain": True}
    assert run_checks(Checks(abstain=True), "", "", [], None) == {"abstain": False}


def test_example_suites_carry_paraphrases():
    for name in ("support", "rag", "extraction"):
        suite = load_suite(EXAMPLES / name / "suite.yaml")
        for case in suite.suite.cases:
            phrasings = suite.phrasings(case, 0)
            assert case.paraphrases and len(phrasings) == 1 + len(case.paraphrases), (name, case.id)
            assert all(p.text.strip() and p.text != phrasings[0].text for p in phrasings[1:]), (name, case.id)


def test_readme_shows_the_scorecard_as_it_prints(upstream, capsys, monkeypatch):
    """The README's scorecard example is the output of the command it shows."""
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- scorecard-example:", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    command, *shown = block.splitlines()
    assert command.startswith("$ gapwatch eval ")
    args = command.split()[3:]
    assert cli_main(["eval", *args, "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[: len(shown)] == shown
