"""The per-model reliability scorecard of an evaluation, and its comparison with an earlier run.

Capability benchmarks report one number; production needs to know whether a model answers
the same question the same way in other words (paraphrase consistency), whether its
confidence means anything (calibration), whether it says "I don't know" when it does not
(failure transparency) and whether planted instructions move it (adversarial robustness).
The scorecard puts those four next to task accuracy, one row per property, so two models, or
one model before and after its provider updated it, can be compared at a glance.

``--baseline previous.json`` is the gate a CI job runs after a model update: every property
of every model present in both reports is compared, and a change for the worse by more than
the property's margin (``--margin``, the suite's ``regression_margins``, else
``DEFAULT_MARGIN``) is a regression, which makes ``gapwatch eval`` exit with
``EXIT_REGRESSION``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_MARGIN = 0.05
EXIT_REGRESSION = 4


@dataclass(frozen=True)
class Property:
    key: str
    label: str
    higher_is_better: bool
    percent: bool  # shown as a percentage (else as a number with three decimals)


PROPERTIES: tuple[Property, ...] = (
    Property("accuracy", "task accuracy", True, True),
    Property("paraphrase_agreement", "paraphrase agreement", True, True),
    Property("ece", "calibration ECE", False, False),
    Property("brier", "Brier score", False, False),
    Property("abstention_when_expected", "abstains when it should", True, True),
    Property("robustness", "adversarial robustness", True, True),
)
KEYS: tuple[str, ...] = tuple(p.key for p in PROPERTIES)
BY_KEY: dict[str, Property] = {p.key: p for p in PROPERTIES}


def build(model_report: Mapping[str, Any]) -> dict[str, float | None]:
    """The scorecard of one model from its section of the report."""
    return {
        "accuracy": model_report["task"]["pass_rate"],
        "paraphrase_agreement": model_report["paraphrase"]["verdict_agreement"],
        "ece": model_report["calibration"]["ece"],
        "brier": model_report["calibration"]["brier"],
        "abstention_when_expected": model_report["transparency"]["abstention_when_expected"]["rate"],
        "robustness": model_report["robustness"]["overall"],
    }


def fmt(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if BY_KEY[key].percent else f"{value:.3f}"


def fmt_change(key: str, change: float) -> str:
    if BY_KEY[key].percent:
        return f"{100 * change:+.1f} pts"
    return f"{change:+.3f}"


def best(key: str, values: Sequence[float | None]) -> set[int]:
    """Indexes of the best value (more than one on a tie; none when fewer than two values)."""
    known = [(i, v) for i, v in enumerate(values) if v is not None]
    if len(known) < 2:
        return set()
    target = (max if BY_KEY[key].higher_is_better else min)(v for _, v in known)
    if all(v == target for _, v in known):
        return set()
    return {i for i, v in known if v == target}


def render(models: Sequence[str], cards: Mapping[str, Mapping[str, float | None]], width: int) -> list[str]:
    """The terminal scorecard: one row per property, the best model's value starred."""
    lines = [f"{'scorecard (* best)':34}" + "".join(f"{m:>{width}}" for m in models)]
    for p in PROPERTIES:
        values = [cards[m].get(p.key) for m in models]
        top = best(p.key, values)
        cells = [fmt(p.key, v) + ("*" if i in top else " ") for i, v in enumerate(values)]
        hint = "" if p.higher_is_better else " (lower better)"
        lines.append(f"  {(p.label + hint)[:32]:32}" + "".join(f"{c:>{width}}" for c in cells))
    return lines


# --------------------------------------------------------------------------------------------
# comparison with a baseline report


class BaselineError(Exception):
    """The baseline file is not an evaluation report this version can compare with."""


def margins_from(overall: float | None, per_property: Mapping[str, float],
                 suite: Mapping[str, float]) -> dict[str, float]:
    """The margin of each property: ``--margin K=V`` over ``--margin V`` over the suite's
    ``regression_margins`` over ``DEFAULT_MARGIN``."""
    out = {k: DEFAULT_MARGIN for k in KEYS}
    out.update(suite)
    if overall is not None:
        out = {k: overall for k in KEYS}
    out.update(per_property)
    return out


def check_baseline(rep: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(rep, dict) or rep.get("kind") != "gapwatch.eval" or not isinstance(rep.get("per_model"), dict):
        raise BaselineError(f"{where}: not a gapwatch eval report (write one with gapwatch eval --json)")
    missing = [m for m, v in rep["per_model"].items() if not isinstance(v, dict) or "scorecard" not in v]
    if missing:
        raise BaselineError(f"{where}: no scorecard for {', '.join(missing)} (written by an older gapwatch: "
                            "run the baseline evaluation again)")
    return rep


def compare(current: Mapping[str, Any], baseline: Mapping[str, Any], margins: Mapping[str, float],
            where: str = "baseline") -> dict[str, Any]:
    """Per model and property: before, after, change and whether it is a regression."""
    models: dict[str, dict[str, Any]] = {}
    regressions: list[dict[str, Any]] = []
    for model in current["models"]:
        before_pm = baseline["per_model"].get(model)
        if before_pm is None:
            continue
        rows: dict[str, Any] = {}
        for p in PROPERTIES:
            before = before_pm["scorecard"].get(p.key)
            after = current["per_model"][model]["scorecard"].get(p.key)
            row: dict[str, Any] = {"before": before, "after": after, "change": None, "worse_by": None,
                                   "margin": margins[p.key], "regressed": False}
            if before is not None and after is not None:
                change = after - before
                worse = -change if p.higher_is_better else change
                row.update(change=round(change, 6), worse_by=round(worse, 6), regressed=worse > margins[p.key] + 1e-9)
                if row["regressed"]:
                    regressions.append({"model": model, "property": p.key, "before": before, "after": after,
                                        "margin": margins[p.key]})
            rows[p.key] = row
        models[model] = {"properties": rows,
                         "upstream": {"before": before_pm.get("upstream"),
                                      "after": current["per_model"][model].get("upstream")}}
    return {"file": where, "suite": baseline.get("suite"), "models": models, "regressions": regressions,
            "not_in_baseline": [m for m in current["models"] if m not in baseline["per_model"]],
            "paraphrases_before": baseline.get("paraphrases"), "paraphrases_after": current.get("paraphrases")}


def render_comparison(cmp: Mapping[str, Any]) -> list[str]:
    lines = [f"change since the baseline ({cmp['file']}):"]
    for model, entry in cmp["models"].items():
        lines.append(f"  {model}")
        up = entry["upstream"]
        if up["before"] and up["after"] and up["before"] != up["after"]:
            lines.append(f"    upstream now reports {_identity(up['after'])} (was {_identity(up['before'])})")
        for p in PROPERTIES:
            row = entry["properties"][p.key]
            if row["before"] is None and row["after"] is None:
                continue
            change = "" if row["change"] is None else f"  {fmt_change(p.key, row['change'])}"
            flag = f"  REGRESSION (margin {fmt_change(p.key, row['margin']).lstrip('+')})" if row["regressed"] else ""
            lines.append(f"    {p.label:30} {fmt(p.key, row['before']):>8} -> {fmt(p.key, row['after']):>8}"
                         f"{change}{flag}")
    for model in cmp["not_in_baseline"]:
        lines.append(f"  {model}: not in the baseline")
    if cmp["paraphrases_before"] != cmp["paraphrases_after"]:
        lines.append(f"  note: --paraphrases was {cmp['paraphrases_before']} then, {cmp['paraphrases_after']} now")
    n = len(cmp["regressions"])
    lines.append(f"  {n} regression{'s' if n != 1 else ''} beyond the margins" if n else "  no regression beyond "
                 "the margins")
    return lines


def _identity(up: Mapping[str, Any]) -> str:
    models = ", ".join(up.get("models") or []) or "no model name"
    fps = ", ".join(up.get("system_fingerprints") or []) or "no fingerprint"
    return f"{models} / {fps}"
