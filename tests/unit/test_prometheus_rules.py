"""deploy/prometheus/rules.yml: valid, unit-tested with ``promtool test rules``, and written
against metric names gapwatch really exports.

``promtool`` comes from the Debian package ``prometheus`` (.ci/run installs it); without it
this test fails rather than skips, so CI can never pass without running the rule tests.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from proxy.alerts import alert_metrics
from proxy.metrics import Metrics

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = RULES_DIR / "rules.yml"
TESTS = RULES_DIR / "rules_test.yml"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("'promtool' is not installed: apt-get install -y prometheus (.ci/run installs it in CI)")
    return path


def _rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [r for g in doc["groups"] for r in g["rules"]]


def test_promtool_check_rules() -> None:
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests_pass() -> None:
    out = subprocess.run([promtool(), "test", "rules", TESTS.name], cwd=RULES_DIR, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_firing_unit_test() -> None:
    tests = yaml.safe_load(TESTS.read_text(encoding="utf-8"))
    fired = {t["alertname"] for group in tests["tests"] for t in group.get("alert_rule_test", ())
             if t.get("exp_alerts")}
    alerts = {str(r["alert"]) for r in _rules() if "alert" in r}
    assert alerts - fired == set()
    # the names the deployment placeholder introduced are kept
    assert {"GapwatchUpstreamErrorRateHigh", "GapwatchOutputsBlocked"} <= alerts


def test_alerts_carry_severity_and_text() -> None:
    for r in _rules():
        if "alert" not in r:
            continue
        assert r["labels"]["severity"] in ("info", "warning", "critical"), r["alert"]  # type: ignore[index]
        assert {"summary", "description"} <= set(r["annotations"]), r["alert"]  # type: ignore[arg-type]


def test_rules_use_only_exported_metrics() -> None:
    m = Metrics()
    alert_metrics(m)  # the alert engine's own metrics (gapwatch_state_backend_up, ...)
    exported = {fam.name for fam in m.registry.collect()}
    suffixes = ("_total", "_bucket", "_sum", "_count")
    for r in _rules():
        for name in re.findall(r"\b(gapwatch_[a-z_]+)", str(r["expr"])):
            base = next((name[: -len(s)] for s in suffixes if name.endswith(s) and name[: -len(s)] in exported), name)
            assert base in exported, f"{r.get('alert') or r.get('record')}: unknown metric {name}"
    records = {str(r["record"]) for r in _rules() if "record" in r}
    for r in _rules():
        for name in re.findall(r"\b(gapwatch:[a-z_0-9:]+)", str(r["expr"])):
            assert name in records, f"{r.get('alert') or r.get('record')}: unknown recording rule {name}"
