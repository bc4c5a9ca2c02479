"""Run detector families over public labelled sets and score them.

Each source is a module ``tests/eval/public/src_<name>.py`` that exposes ``FAMILY`` (the
family it measures, e.g. ``"secrets"``), ``SOURCE`` (where the data comes from: repository,
commit or release, licence), ``DETECTORS`` (the policy's detectors and their settings, as in
YAML: ``{"secrets": {}}``), ``HOW_TO_GET`` (the commands that put the data under the data
root) and ``load(root: Path) -> list[PublicCase]``, which raises ``DataMissing`` when its
files are not there. Sources are discovered by name, so adding one touches no other file.

Why through ``Replayer``: it prepares the request and runs the policy exactly as the proxy
does for a live exchange, so the figures are the proxy's, not a unit test's. The data stays
out of the repository (licences, size, and held-out hygiene): ``root`` defaults to
``$GAPWATCH_PUBLIC_DATA`` or ``.eval-data/`` in the checkout.

Scoring is per case: a case is predicted positive when a finding of the family's detector
(optionally only the categories the source names in ``case.match``) is raised. Sets with
span labels may also score per span (``spans``): a labelled span is recalled when a
finding of the family overlaps it.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from proxy.replay import Replayer, case_from_row
from tests.eval.replay_sets import EVAL_POLICY, eval_config

ROOT_DEFAULT = Path(__file__).resolve().parents[3] / ".eval-data"


class DataMissing(Exception):
    """A source's files are not under the data root; the message says how to get them."""


@dataclass(frozen=True)
class PublicCase:
    """One labelled example. ``request`` is an OpenAI request body (chat, completions or
    Responses); ``output`` the model's answer text. ``positive`` is the label; ``category``
    groups the per-category table (a secret's vendor, a PII kind, an attack type).
    ``detectors`` names the detector(s) whose findings count (default: the source's family)."""

    id: str
    category: str
    positive: bool
    request: dict[str, Any]
    output: str
    spans: tuple[tuple[int, int], ...] = ()
    detectors: tuple[str, ...] = ()


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    misses: list[str] = field(default_factory=list)
    false_alarms: list[str] = field(default_factory=list)

    def add(self, truth: bool, predicted: bool, case_id: str) -> None:
        if truth and predicted:
            self.tp += 1
        elif truth:
            self.fn += 1
            self.misses.append(case_id)
        elif predicted:
            self.fp += 1
            self.false_alarms.append(case_id)
        else:
            self.tn += 1

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p and r else (0.0 if p is not None or r is not None else None)


@dataclass
class SourceReport:
    name: str
    family: str
    source: str
    total: Counts
    by_category: dict[str, Counts]
    examples: dict[str, str]  # case id -> a short description for confusion listings


def sources() -> list[ModuleType]:
    """Every ``src_*`` module in this package, by name."""
    pkg = Path(__file__).parent
    return [importlib.import_module(f"{__package__}.{m.name}")
            for m in sorted(pkgutil.iter_modules([str(pkg)]), key=lambda m: m.name)
            if m.name.startswith("src_")]


def data_root(explicit: str | Path | None = None) -> Path:
    return Path(explicit or os.environ.get("GAPWATCH_PUBLIC_DATA") or ROOT_DEFAULT)


def predicted(findings: Sequence[dict[str, Any]], detectors: Iterable[str]) -> bool:
    names = set(detectors)
    return any(f.get("detector") in names for f in findings)


def run_source(mod: ModuleType, root: Path, limit: int | None = None) -> SourceReport:
    cases = mod.load(root)[:limit] if limit else mod.load(root)
    replayer = Replayer(eval_config(mod.DETECTORS), EVAL_POLICY)
    total, by_cat, examples = Counts(), defaultdict(Counts), {}
    for i, case in enumerate(cases):
        row = {"id": case.id, "request": case.request,
               "response": {"choices": [{"index": 0, "message": {"role": "assistant", "content": case.output},
                                         "finish_reason": "stop"}]}}
        result = replayer.run(case_from_row(row, i))
        hit = predicted(result.findings, case.detectors or tuple(mod.DETECTORS))
        total.add(case.positive, hit, case.id)
        by_cat[case.category].add(case.positive, hit, case.id)
        examples[case.id] = case.output[:160].replace("\n", " ")
    return SourceReport(name=mod.__name__.rsplit(".", 1)[-1].removeprefix("src_"), family=mod.FAMILY,
                        source=mod.SOURCE, total=total, by_category=dict(by_cat), examples=examples)


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def render(rep: SourceReport, examples: int = 3) -> str:
    lines = [f"== {rep.family} / {rep.name}: {rep.source}",
             f"{'category':28} {'n':>5} {'pos':>5} {'prec':>6} {'recall':>6} {'F1':>6}"]
    rows = [*sorted(rep.by_category.items()), ("ALL", rep.total)]
    for cat, c in rows:
        lines.append(f"{cat[:28]:28} {c.n:>5} {c.tp + c.fn:>5} {_fmt(c.precision):>6} {_fmt(c.recall):>6} "
                     f"{_fmt(c.f1):>6}")
    for title, ids in (("misses", rep.total.misses), ("false alarms", rep.total.false_alarms)):
        if ids:
            lines.append(f"  {title} ({len(ids)}), e.g.:")
            lines += [f"    {i}: {rep.examples.get(i, '')!r}" for i in ids[:examples]]
    return "\n".join(lines)
