"""Simulated drift through gapwatch's real alert engine: detection delays, false alarms, a plot.

Why a simulation: the alert method (docs/alerts.md) makes claims about how quickly it notices
a shift and how rarely it fires on stable traffic; this script measures both by feeding
synthetic "request finished" events into ``proxy.alerts.AlertEngine`` (the production code,
with the default adaptive rules plus a static PII rule) on a simulated clock.

Scenario (three days, diurnal traffic of 0.1 to 0.9 requests per second, one route/model):

- PII finding rate 0.5 %; an incident raises it to 3 % for two hours (day 2, 10:00);
  then a slow drift from 0.5 % to 3 % over twelve hours (day 3, from 00:00), which stays.
- latency: log-normal, median 0.8 s; the provider slows down 2x for an hour (day 2, 20:00).
- output length: about 180 tokens; answers are truncated to about 90 for an hour
  (day 3, 14:00).

Then ``--seeds`` runs of ``--days`` days of stable traffic (no incident at all) count the
false alarms of every rule.

    .venv/bin/python scripts/plot_drift.py                 # figures + docs/img/anomaly_drift.png
    .venv/bin/python scripts/plot_drift.py --no-plot       # figures only (no matplotlib needed)

matplotlib is needed only for the plot (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detectors.base import Finding, Severity  # noqa: E402
from proxy.alerts import DEFAULT_RULES, AlertEngine, AlertSettings, RuleSpec, signal_value  # noqa: E402
from proxy.config import PolicyConfig, load_dict  # noqa: E402
from proxy.exchange import Exchange  # noqa: E402
from proxy.metrics import Metrics  # noqa: E402
from proxy.pipeline import Applied, Outcome, Policy  # noqa: E402
from proxy.state_redis import MemoryState  # noqa: E402

DAY = 86400.0
TICK = 60.0  # evaluation interval
COOLDOWN = 900.0  # the engine default
STATIC_PII = RuleSpec(name="PIILeakStatic", signal="findings.pii", threshold=0.02, window_seconds=900,
                      min_samples=200, severity="critical")
STATIC_PII_50 = RuleSpec(name="PIILeakStatic50", signal="findings.pii", threshold=0.02, window_seconds=900,
                         min_samples=50, severity="critical")
RULES = (*DEFAULT_RULES, STATIC_PII, STATIC_PII_50)
WINDOWS = {r.name: r.window_seconds for r in RULES}
UNSIMULATED = {"GapwatchBlockRateAnomaly", "GapwatchUpstreamErrorRateAnomaly", "GapwatchAbstentionRateAnomaly"}
WATCH = {  # plotted rule -> signal
    "GapwatchFindingRateAnomaly": "findings.pii",
    "GapwatchLatencyP95Anomaly": "latency_p95",
    "GapwatchOutputLengthAnomaly": "output_tokens_mean",
}


@dataclass
class Incident:
    name: str
    rules: tuple[str, ...]  # the rules that should notice it
    start: float
    end: float


@dataclass
class World:
    """What the provider does at simulated time ``t`` (seconds since the start)."""

    incidents: bool = True

    def rate(self, t: float) -> float:
        return 0.5 + 0.4 * math.sin(2 * math.pi * (t / DAY - 0.3))

    def pii(self, t: float) -> float:
        p = 0.005
        if not self.incidents:
            return p
        if DAY + 10 * 3600 <= t < DAY + 12 * 3600:
            return 0.03
        if 2 * DAY <= t < 2 * DAY + 12 * 3600:
            return p + 0.025 * (t - 2 * DAY) / (12 * 3600)
        if t >= 2 * DAY + 12 * 3600:
            return 0.03
        return p

    def latency_median(self, t: float) -> float:
        slow = self.incidents and DAY + 20 * 3600 <= t < DAY + 21 * 3600
        return 1.6 if slow else 0.8

    def tokens(self, t: float) -> float:
        cut = self.incidents and 2 * DAY + 14 * 3600 <= t < 2 * DAY + 15 * 3600
        return 90.0 if cut else 180.0


INCIDENTS = (
    Incident("PII incident 0.5% -> 3%", ("GapwatchFindingRateAnomaly", "PIILeakStatic", "PIILeakStatic50"),
             DAY + 10 * 3600, DAY + 12 * 3600),
    Incident("latency x2", ("GapwatchLatencyP95Anomaly", "GapwatchTTFTP95Anomaly"), DAY + 20 * 3600,
             DAY + 21 * 3600),
    Incident("PII drift 0.5% -> 3% over 12 h", ("GapwatchFindingRateAnomaly", "PIILeakStatic", "PIILeakStatic50"),
             2 * DAY, 3 * DAY),
    Incident("output length halved", ("GapwatchOutputLengthAnomaly",), 2 * DAY + 14 * 3600, 2 * DAY + 15 * 3600),
)


class Collect:
    """Stands in for the sink dispatcher: keeps the notifications."""

    def __init__(self) -> None:
        self.sinks: list[Any] = []
        self.notes: list[Any] = []

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def submit(self, note: Any) -> None:
        if not note.refresh:
            self.notes.append(note)


def poisson(rnd: random.Random, lam: float) -> int:
    if lam > 30:
        return max(0, round(rnd.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rnd.random()
        if p <= limit:
            return k
        k += 1


@dataclass
class Trace:
    t: list[float] = field(default_factory=list)
    value: dict[str, list[float | None]] = field(default_factory=dict)
    mean: dict[str, list[float | None]] = field(default_factory=dict)
    firing: dict[str, list[bool]] = field(default_factory=dict)


def simulate(world: World, days: float, seed: int, trace: bool = False) -> tuple[list[tuple[float, str, str]], Trace]:
    """Run the engine over ``days``; returns (time, status, rule) of every notification."""
    rnd = random.Random(seed)
    cfg = load_dict({"upstreams": {"u": {"base_url": "http://127.0.0.1:9/v1"}},
                     "routes": [{"upstream": "u", "name": "chat"}]}).config
    clock = [0.0]
    metrics = Metrics()
    collect = Collect()
    settings = AlertSettings(rules=RULES, evaluation_interval_seconds=TICK, cooldown_seconds=COOLDOWN,
                             renotify_interval_seconds=4 * 3600)
    engine = AlertEngine(cfg, metrics, MemoryState(cfg, metrics, lambda: clock[0]), settings=settings,
                         clock=lambda: clock[0], wall=lambda: clock[0], dispatcher=collect)  # type: ignore[arg-type]
    policy = Policy.build("default", PolicyConfig(), ())
    ex = Exchange(request_id="sim", method="POST", path="/v1/chat/completions", endpoint="chat")
    ex.route, ex.model, ex.model_label, ex.policy, ex.status = "chat", "m", "m", policy, 200
    flagged = [Outcome(applied=[Applied(Finding("pii", "email", Severity.high, 1.0, "e-mail"), "observe",
                                        "observe")])]
    clean = [Outcome()]
    tr = Trace()
    out: list[tuple[float, str, str]] = []
    seen = 0

    async def run() -> None:
        nonlocal seen
        t = 0.0
        while t < days * DAY:
            n = poisson(rnd, world.rate(t) * TICK)
            for at in sorted(rnd.uniform(t, t + TICK) for _ in range(n)):
                clock[0] = at
                lat = world.latency_median(at) * math.exp(rnd.gauss(0.0, 0.3))
                ex.started, ex.ended = 0.0, lat
                ex.upstream_started, ex.upstream_first_token_at = 0.0, lat * 0.25
                ex.usage = {"completion_tokens": max(1, round(rnd.gauss(world.tokens(at), 40)))}
                ex.output_chars = ex.usage["completion_tokens"] * 4
                ex.outcomes = flagged if rnd.random() < world.pii(at) else clean
                engine.observe(ex)
            t += TICK
            clock[0] = t
            await engine.tick()
            for note in collect.notes[seen:]:
                out.append((t, note.status, note.alert["labels"]["alertname"]))
            seen = len(collect.notes)
            if trace:
                rings = next(iter(engine._series.values()), None)
                tr.t.append(t)
                for rule, sig in WATCH.items():
                    got = signal_value(sig, rings[WINDOWS[rule]].aggregate(t)) if rings else None
                    tr.value.setdefault(rule, []).append(got[0] if got else None)
                    b = engine.baselines().get(f"{rule}|chat|m|{sig}")
                    mean = None
                    if b and b["n"] >= 12:
                        mean = b["mean"] if sig.startswith("findings") else math.exp(b["mean"])
                    tr.mean.setdefault(rule, []).append(mean)
                    tr.firing.setdefault(rule, []).append(any(k[0] == rule for k in engine._active))
                tr.value.setdefault("PIILeakStatic", tr.value["GapwatchFindingRateAnomaly"])
                tr.firing.setdefault("PIILeakStatic", []).append(any(k[0] == "PIILeakStatic" for k in engine._active))

    asyncio.run(run())
    return out, tr


def delays(runs: list[list[tuple[float, str, str]]]) -> list[str]:
    """Per incident and rule: in how many runs it was noticed, and the median delay."""
    lines = []
    for inc in INCIDENTS:
        for rule in inc.rules:
            got, episodes = [], 0
            for notes in runs:
                fired = [t for t, status, r in notes if r == rule and status == "firing" and inc.start <= t < inc.end]
                if fired:
                    got.append((fired[0] - inc.start) / 60)
                    episodes += len(fired)
            got.sort()
            when = (f"median {got[len(got) // 2]:.0f} min (range {got[0]:.0f}-{got[-1]:.0f}), "
                    f"{episodes / len(got):.1f} notifications per detected incident" if got else "")
            lines.append(f"  {inc.name:<32} {rule:<28} detected {len(got)}/{len(runs)}  {when}")
    return lines


def false_alarms(notes: list[tuple[float, str, str]], incidents: bool) -> list[tuple[float, str]]:
    bad = []
    for t, status, rule in notes:
        if status != "firing":
            continue
        if incidents and any(rule in inc.rules and inc.start <= t < inc.end + 1800 for inc in INCIDENTS):
            continue
        bad.append((t, rule))
    return bad


def plot(tr: Trace, notes: list[tuple[float, str, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [t / 3600 for t in tr.t]
    panels = (("GapwatchFindingRateAnomaly", "PII finding rate (15 min window)", 100.0, "%"),
              ("GapwatchLatencyP95Anomaly", "latency p95 (5 min window)", 1.0, "s"),
              ("GapwatchOutputLengthAnomaly", "mean output tokens (5 min window)", 1.0, "tokens"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 8.5), sharex=True)
    for ax, (rule, title, scale, unit) in zip(axes, panels, strict=True):
        vals = [None if v is None else v * scale for v in tr.value[rule]]
        means = [None if v is None else v * scale for v in tr.mean[rule]]
        ax.plot(hours, [math.nan if v is None else v for v in vals], lw=0.6, color="#4a7ab5", label="window value")
        ax.plot(hours, [math.nan if v is None else v for v in means], lw=1.4, color="#222222", ls="--",
                label="adaptive baseline (EWMA)")
        for inc in INCIDENTS:
            if rule in inc.rules:
                ax.axvspan(inc.start / 3600, inc.end / 3600, color="#bbbbbb", alpha=0.35, lw=0)
        ymax = max((v for v in vals if v is not None), default=1.0)
        fired = tr.firing[rule]
        ax.fill_between(hours, 0, ymax * 1.05, where=fired, color="#d62728", alpha=0.25, lw=0,
                        label="adaptive alert firing")
        if rule == "GapwatchFindingRateAnomaly":
            ax.axhline(STATIC_PII.threshold * 100, color="#ff7f0e", lw=1,  # type: ignore[operator]
                       label="static rule: 2%, min 200 samples")
            ax.fill_between(hours, ymax * 0.95, ymax * 1.05, where=tr.firing["PIILeakStatic"], color="#ff7f0e",
                            alpha=0.6, lw=0, label="static alert firing")
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_ylabel(unit)
        ax.set_ylim(0, ymax * 1.05)
        ax.legend(loc="upper left", fontsize=7, ncol=5)
    axes[-1].set_xlabel("hours (grey: injected incidents and drift)")
    axes[-1].set_xticks(range(0, int(hours[-1]) + 1, 6))
    fig.suptitle("gapwatch adaptive alerts on a simulated drift scenario (scripts/plot_drift.py)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1, help="first scenario seed (the plotted run)")
    ap.add_argument("--scenario-seeds", type=int, default=10, help="scenario runs for the detection figures")
    ap.add_argument("--seeds", type=int, default=10, help="stable-traffic runs for the false-alarm count")
    ap.add_argument("--days", type=float, default=3.0, help="days per stable-traffic run")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "anomaly_drift.png")
    args = ap.parse_args()

    t0 = time.perf_counter()
    runs, trace = [], Trace()
    for i in range(args.scenario_seeds):
        notes, tr = simulate(World(), 3.0, args.seed + i, trace=i == 0 and not args.no_plot)
        runs.append(notes)
        if i == 0:
            first, trace = notes, tr
    print(f"Scenario (3 days, {args.scenario_seeds} runs): detection")
    print("\n".join(delays(runs)))
    fa = [x for notes in runs for x in false_alarms(notes, incidents=True)]
    by_rule: dict[str, int] = {}
    for _, rule in fa:
        by_rule[rule] = by_rule.get(rule, 0) + 1
    print(f"  firing outside the incidents (+30 min): {by_rule or 'none'}")

    counts: dict[str, int] = {r.name: 0 for r in RULES}
    for seed in range(args.seeds):
        stable, _ = simulate(World(incidents=False), args.days, 1000 + seed)
        for _, rule in false_alarms(stable, incidents=False):
            counts[rule] += 1
    total_days = args.seeds * args.days
    print(f"\nStable traffic: {args.seeds} runs x {args.days:g} days ({total_days:g} days, "
          f"{args.seeds * args.days * 1440:.0f} evaluations per rule, one a minute)")
    for rule, n in counts.items():
        note = "  (no blocks, upstream errors or abstentions are simulated)" if rule in UNSIMULATED else ""
        print(f"  {rule:<34} {n} false alarm(s)  ({n / total_days:.3f} per day){note}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if not args.no_plot:
        plot(trace, first, args.out)


if __name__ == "__main__":
    main()
