"""Anomaly detection and the alert lifecycle, from the "request finished" event.

Why here and not only in Prometheus: teams without a Prometheus alerting stack still need to
hear that a model's behaviour shifted (PII leaks spiking, invalid JSON after a provider's
silent update, latency doubling), and gapwatch sees every response's findings directly. The
Prometheus rules in ``deploy/prometheus/rules.yml`` cover the same ground for teams who alert
from Prometheus.

Signals, per (route, model), over a rolling window (``observe`` is O(1): it adds one sample
to the current slot of a ring of ``SLOTS_PER_WINDOW`` time slots per configured window):

    findings.<detector>        fraction of checked responses with a finding of that detector
    block_rate                 fraction of checked responses blocked
    upstream_error_rate        fraction of requests that failed upstream
    abstention_rate            transparency: fraction of classified responses that abstained
    refusal_rate               transparency: ... that refused
    class.<detector>.<class>   any response-level class a detector reports
    latency_p50|p90|p95|p99    end-to-end duration of successful requests, seconds
    ttft_p50|p90|p95|p99       time to first token from the upstream, seconds
    output_tokens_mean         completion tokens per response (upstream usage)
    output_chars_mean          output characters per response

``findings.*`` and ``class.<detector>.*`` expand to one alert per detector/class seen.
Percentiles come from log-spaced buckets (ratio 1.05: within 2.5 % of the exact value), so
memory per series is bounded whatever the traffic.

Rules (``alerts.rules``) are static, adaptive or both (then both must hold):

- static: ``value > threshold`` (``direction: below`` flips it) once the window holds at least
  ``min_samples`` samples (the signal's denominator).
- adaptive: an EWMA baseline of the signal's per-window value (plain average during warm-up,
  then weight ``alpha``), updated once per window length with non-overlapping windows. It
  fires when the current window deviates by more than ``sigmas`` in the configured direction,
  after ``warmup_windows`` windows. For latencies and lengths the unit is the baseline's
  standard deviation, never below ``relative_floor * mean``. For rates the deviation must be
  beyond ``sigmas`` both in baseline standard deviations and as an exact binomial tail at the
  baseline rate (counts of rare events are skewed; a plain z-score would false-alarm), and a
  detector that never fired is taken to have a rate of one event in the baseline's samples,
  not zero, so one odd response does not become an alert. Updates are
  winsorised at ``sigmas`` (a slow poisoning cannot drag the baseline), and while an alert
  fires the baseline learns five times slower, so a lasting shift becomes the new normal
  after a while instead of firing forever.

Hysteresis: a firing alert resolves only once the value is back below ``resolve_threshold``
(static; default 0.8 x threshold) or below half the sigmas (adaptive), so a value hovering at
the line does not notify again and again. See docs/alerts.md for the false-alarm figures.

Lifecycle: an alert (rule, route, model, concrete signal) fires when its condition holds and
resolves when it no longer does. With fewer than ``min_samples`` nothing fires, and a firing
alert holds its state (a quiet night is no evidence of recovery) until the window is empty.
Each alert has labels, annotations, startsAt/endsAt and a fingerprint (sha256 of its sorted
labels). Notifications are de-duplicated through the shared state: with Redis, one replica
notifies per alert, re-notifies at most every ``renotify_interval_seconds``, and the
resolved notification goes out when the last replica stops seeing it; after it resolves the
same alert stays quiet for ``cooldown_seconds``. Delivery is ``proxy.alert_sinks``.

Event alerts: ``model_changed`` (raised from ``proxy.model_watch`` changes) is not a rule
over a window but one event: the upstream reports another model name or system_fingerprint
for a route than before. It carries the before and after values as annotations, goes through
the same claim (one replica notifies), sinks and history as any alert, stays firing for
``alerts.model_change.hold_seconds`` and then resolves.

Nothing here can fail a request: ``observe`` is synchronous and guarded, evaluation and
delivery run in background tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from statistics import NormalDist
from typing import Any

import orjson
from prometheus_client import Counter, Gauge

from proxy.alert_sinks import Dispatcher, Notification, Sink, build_sinks

log = logging.getLogger("gapwatch.alerts")

LLM_ENDPOINTS = frozenset({"chat", "completions", "responses"})
SLOTS_PER_WINDOW = 10
MAX_SERIES = 1024
HIST_RATIO = 1.05
_LOG_RATIO = math.log(HIST_RATIO)
_ZERO_BUCKET = -(10**6)

# signal name -> (numerator count key, denominator count key)
RATE_SIGNALS: dict[str, tuple[str, str]] = {
    "block_rate": ("blocked", "checked"),
    "upstream_error_rate": ("upstream_error", "requests"),
    "abstention_rate": ("class.transparency.abstained", "classified.transparency"),
    "refusal_rate": ("class.transparency.refused", "classified.transparency"),
}
QUANTILES = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
HIST_SIGNALS = {"latency": "latency", "ttft": "ttft"}
MEAN_SIGNALS = {"output_tokens_mean": "output_tokens", "output_chars_mean": "output_chars"}
_RATE_PREFIXES = ("findings.", "class.")


def signal_kind(signal: str) -> str | None:
    """``rate`` | ``quantile`` | ``mean`` for a valid signal name (wildcards allowed), else None."""
    if signal in RATE_SIGNALS:
        return "rate"
    if signal.startswith("findings.") and len(signal) > len("findings."):
        return "rate"
    if signal.startswith("class."):
        parts = signal.split(".")
        return "rate" if len(parts) == 3 and all(parts) else None
    if signal in MEAN_SIGNALS:
        return "mean"
    base, _, q = signal.rpartition("_")
    if base in HIST_SIGNALS and q in QUANTILES:
        return "quantile"
    return None


def valid_signals() -> list[str]:
    out = [*RATE_SIGNALS, "findings.<detector>", "findings.*", "class.<detector>.<class>", *MEAN_SIGNALS]
    out += [f"{h}_{q}" for h in HIST_SIGNALS for q in QUANTILES]
    return out


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str | float) -> float:
    """``"5m"``, ``"1h30m"``, ``"2s"``, ``"500ms"`` or a number of seconds."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNIT[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            raise ValueError(f"invalid duration {value!r} (write e.g. 30s, 5m, 1h30m)")
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return seconds


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleSpec:
    """A rule as the engine runs it. Fields the config model may not have yet are read with
    ``getattr`` defaults (see ``from_config``)."""

    name: str
    signal: str
    threshold: float | None = None
    window_seconds: float = 300.0
    min_samples: int = 50
    severity: str = "warning"
    adaptive: bool = False
    sigmas: float = 4.0
    direction: str = "auto"  # above | below | both | auto (both for output lengths, else above)
    warmup_windows: int = 12
    alpha: float = 0.1
    relative_floor: float = 0.05
    resolve_threshold: float | None = None  # static hysteresis; default 0.8 x threshold (1.25 x "below")
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kind = signal_kind(self.signal if not self.signal.endswith(".*") else self.signal[:-2] + ".x")
        if kind is None:
            raise ValueError(f"alerts rule {self.name!r}: unknown signal {self.signal!r} "
                             f"(valid: {', '.join(valid_signals())})")
        if self.threshold is None and not self.adaptive:
            raise ValueError(f"alerts rule {self.name!r}: set a threshold, adaptive: true, or both")
        if self.direction not in ("above", "below", "both", "auto"):
            raise ValueError(f"alerts rule {self.name!r}: direction must be above, below or both")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alerts rule {self.name!r}: alpha must be in (0, 1]")

    @property
    def kind(self) -> str:
        sig = self.signal[:-2] + ".x" if self.signal.endswith(".*") else self.signal
        return signal_kind(sig) or "rate"

    @property
    def sides(self) -> str:
        if self.direction != "auto":
            return self.direction
        return "both" if self.signal in MEAN_SIGNALS else "above"

    @property
    def release(self) -> float | None:
        """The value a firing static alert must cross back to resolve."""
        if self.threshold is None:
            return None
        if self.resolve_threshold is not None:
            return self.resolve_threshold
        return self.threshold * (1.25 if self.sides == "below" else 0.8)

    @classmethod
    def from_config(cls, rule: Any) -> RuleSpec:
        return cls(
            name=rule.name, signal=rule.signal, threshold=rule.threshold,
            window_seconds=parse_duration(getattr(rule, "window", "5m")),
            min_samples=int(getattr(rule, "min_samples", 50)), severity=getattr(rule, "severity", "warning"),
            adaptive=bool(getattr(rule, "adaptive", False)), sigmas=float(getattr(rule, "sigmas", 4.0)),
            direction=getattr(rule, "direction", "auto"), warmup_windows=int(getattr(rule, "warmup_windows", 12)),
            alpha=float(getattr(rule, "alpha", 0.1)), relative_floor=float(getattr(rule, "relative_floor", 0.05)),
            resolve_threshold=getattr(rule, "resolve_threshold", None),
            labels=dict(getattr(rule, "labels", None) or {}),
        )


# With no rules configured: adaptive baselines on every signal the issue names, conservative
# enough to stay quiet on stable traffic (docs/alerts.md has the measured false alarms and
# detection delays, from scripts/plot_drift.py). Rates of rare events use 15 minute windows
# and 4 sigmas (an exact binomial tail: 4 sigmas is a 3e-5 chance per evaluation); in 5
# minutes at under one request per second even a six-fold jump of a 0.5 % rate is not
# significant. Latencies and lengths use 5 minute windows and 5 sigmas.
DEFAULT_RULES: tuple[RuleSpec, ...] = tuple(
    RuleSpec(name=name, signal=signal, adaptive=True, sigmas=sigmas, window_seconds=window, min_samples=50,
             severity=severity)
    for name, signal, window, sigmas, severity in (
        ("GapwatchFindingRateAnomaly", "findings.*", 900.0, 4.0, "warning"),
        ("GapwatchBlockRateAnomaly", "block_rate", 900.0, 4.0, "warning"),
        ("GapwatchUpstreamErrorRateAnomaly", "upstream_error_rate", 900.0, 4.0, "warning"),
        ("GapwatchLatencyP95Anomaly", "latency_p95", 300.0, 5.0, "warning"),
        ("GapwatchTTFTP95Anomaly", "ttft_p95", 300.0, 5.0, "warning"),
        ("GapwatchOutputLengthAnomaly", "output_tokens_mean", 300.0, 5.0, "info"),
        ("GapwatchAbstentionRateAnomaly", "abstention_rate", 900.0, 4.0, "info"),
    )
)


def default_replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class AlertSettings:
    rules: tuple[RuleSpec, ...]
    evaluation_interval_seconds: float
    renotify_interval_seconds: float = 4 * 3600.0
    cooldown_seconds: float = 900.0
    resend_interval_seconds: float = 60.0  # keep-alive re-posts to Alertmanager
    history_size: int = 200
    queue_size: int = 1000
    replica_id: str = field(default_factory=default_replica_id)

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> AlertSettings:
        a = config.alerts
        if a.rules:
            rules = tuple(RuleSpec.from_config(r) for r in a.rules)
        elif getattr(a, "default_rules", True):
            rules = DEFAULT_RULES
        else:
            rules = ()
        interval = getattr(a, "evaluation_interval_seconds", None)
        if interval is None:
            shortest = min((r.window_seconds for r in rules), default=300.0)
            interval = min(15.0, max(0.2, shortest / 5))
        values: dict[str, Any] = {
            "rules": rules, "evaluation_interval_seconds": float(interval),
            "renotify_interval_seconds": float(getattr(a, "renotify_interval_seconds", 4 * 3600.0)),
            "cooldown_seconds": float(getattr(a, "cooldown_seconds", 900.0)),
            "resend_interval_seconds": float(getattr(a, "resend_interval_seconds", 60.0)),
            "history_size": int(getattr(a, "history_size", 200)),
            "queue_size": int(getattr(a, "queue_size", 1000)),
        }
        rid = getattr(getattr(config, "state", None), "replica_id", None)
        if rid:
            values["replica_id"] = rid
        values.update(overrides)
        return cls(**values)


# --- windows ----------------------------------------------------------------------------------


def _bucket(v: float) -> int:
    return _ZERO_BUCKET if v <= 0 else math.floor(math.log(v) / _LOG_RATIO)


def _bucket_value(b: int) -> float:
    return 0.0 if b == _ZERO_BUCKET else HIST_RATIO ** (b + 0.5)


class Slot:
    """Totals of the samples in one time slot (or, merged, in one window)."""

    __slots__ = ("counts", "hists", "sums")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.hists: dict[str, dict[int, int]] = {}
        self.sums: dict[str, list[float]] = {}

    def add(self, sample: Sample) -> None:
        c = self.counts
        for k in sample.counts:
            c[k] = c.get(k, 0) + 1
        for k, b in sample.buckets:
            h = self.hists.get(k)
            if h is None:
                h = self.hists[k] = {}
            h[b] = h.get(b, 0) + 1
        for k, v in sample.values:
            s = self.sums.get(k)
            if s is None:
                self.sums[k] = [v, 1.0]
            else:
                s[0] += v
                s[1] += 1.0

    def merge(self, other: Slot) -> None:
        for k, n in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + n
        for k, h in other.hists.items():
            mine = self.hists.setdefault(k, {})
            for b, n in h.items():
                mine[b] = mine.get(b, 0) + n
        for k, (s, n) in other.sums.items():
            mine_s = self.sums.setdefault(k, [0.0, 0.0])
            mine_s[0] += s
            mine_s[1] += n


@dataclass(slots=True)
class Sample:
    """What one finished exchange contributes: count keys, histogram buckets, summed values."""

    counts: list[str]
    buckets: list[tuple[str, int]]
    values: list[tuple[str, float]]


class WindowRing:
    """``SLOTS_PER_WINDOW`` slots covering one window length; old slots fall off."""

    __slots__ = ("slots", "width")

    def __init__(self, window_seconds: float) -> None:
        self.width = window_seconds / SLOTS_PER_WINDOW
        self.slots: deque[tuple[int, Slot]] = deque()

    def add(self, now: float, sample: Sample) -> None:
        idx = int(now // self.width)
        slots = self.slots
        if not slots or slots[-1][0] != idx:
            slots.append((idx, Slot()))
            while slots[0][0] <= idx - SLOTS_PER_WINDOW:
                slots.popleft()
        slots[-1][1].add(sample)

    def aggregate(self, now: float) -> Slot:
        idx = int(now // self.width)
        while self.slots and self.slots[0][0] <= idx - SLOTS_PER_WINDOW:
            self.slots.popleft()
        out = Slot()
        for _, s in self.slots:
            out.merge(s)
        return out


def signal_value(signal: str, agg: Slot) -> tuple[float, int] | None:
    """(value, samples) of a concrete signal over a window, None when it has no samples."""
    c = agg.counts
    if signal in RATE_SIGNALS:
        num, den = RATE_SIGNALS[signal]
    elif signal.startswith("findings."):
        num, den = signal, "checked"
    elif signal.startswith("class."):
        _, det, _ = signal.split(".", 2)
        num, den = signal, f"classified.{det}"
    elif signal in MEAN_SIGNALS:
        s = agg.sums.get(MEAN_SIGNALS[signal])
        if not s or s[1] <= 0:
            return None
        return s[0] / s[1], int(s[1])
    else:
        base, _, q = signal.rpartition("_")
        h = agg.hists.get(HIST_SIGNALS.get(base, ""))
        if not h:
            return None
        total = sum(h.values())
        rank = max(1, math.ceil(QUANTILES[q] * total))
        acc = 0
        for b in sorted(h):
            acc += h[b]
            if acc >= rank:
                return _bucket_value(b), total
        return None  # pragma: no cover
    n = c.get(den, 0)
    if n <= 0:
        return None
    return c.get(num, 0) / n, n


def exchange_sample(ex: Any) -> Sample | None:
    """The signals one finished exchange contributes (None for non-LLM endpoints)."""
    if ex.endpoint not in LLM_ENDPOINTS:
        return None
    counts = ["requests"]
    buckets: list[tuple[str, int]] = []
    values: list[tuple[str, float]] = []
    if ex.upstream_error:
        counts.append("upstream_error")
    ok = 200 <= ex.status < 400 and not ex.client_disconnected
    if ex.policy is not None and ex.outcomes and (ex.status < 400 or ex.outcome == "blocked"):
        counts.append("checked")
        if ex.outcome == "blocked":
            counts.append("blocked")
        seen: set[str] = set()
        for o in ex.outcomes:
            for a in o.applied:
                seen.add(a.finding.detector)
        counts.extend(f"findings.{d}" for d in seen)
        for key, value in ex.outcomes[-1].signals.items():
            det, _, what = key.partition(".")
            if what == "classification" and isinstance(value, str) and len(value) <= 64:
                counts.append(f"classified.{det}")
                counts.append(f"class.{det}.{value}")
    if ok and ex.ended is not None:
        buckets.append(("latency", _bucket(ex.ended - ex.started)))
        if ex.upstream_first_token_at is not None and ex.upstream_started is not None:
            buckets.append(("ttft", _bucket(ex.upstream_first_token_at - ex.upstream_started)))
    if ok:
        usage = ex.usage or {}
        tout = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(tout, int):
            values.append(("output_tokens", float(tout)))
        values.append(("output_chars", float(ex.output_chars)))
    return Sample(counts, buckets, values)


# --- baselines --------------------------------------------------------------------------------


_NORMAL = NormalDist()


def transform(rule: RuleSpec, value: float) -> float:
    """What a baseline tracks: rates as they are; latencies and lengths as ``log(value)``.
    Why: they are right-skewed and change multiplicatively ("latency doubled"), so in log
    space the spread is symmetric and a deviation means the same at 50 ms and at 5 s."""
    return value if rule.kind == "rate" else math.log(max(value, 1e-6))


def untransform(rule: RuleSpec, value: float) -> float:
    return value if rule.kind == "rate" else math.exp(value)


def binomial_tail(k: int, n: int, p: float, upper: bool) -> float:
    """P(X >= k) (``upper``) or P(X <= k) for X ~ Binomial(n, p), summed in log space (no
    scipy). Only tails beyond the mean are asked for, so the sum converges in a few terms."""
    if (upper and k <= 0) or (not upper and k >= n):
        return 1.0
    if p <= 0.0:
        return 0.0 if upper else 1.0
    if p >= 1.0:
        return 1.0 if upper else 0.0
    lp, lq, ln = math.log(p), math.log1p(-p), math.lgamma(n + 1)

    def term(i: int) -> float:
        return math.exp(ln - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)

    total, i = 0.0, k
    t = term(i)
    while 0 <= i <= n:
        total += t
        if t <= total * 1e-15:
            break
        if upper:
            t *= (n - i) / (i + 1) * p / (1 - p)
            i += 1
        else:
            t *= i / (n - i + 1) * (1 - p) / p
            i -= 1
    return min(1.0, total)


def binomial_z(k: int, n: int, p: float) -> float:
    """``k`` events in ``n`` at rate ``p`` as signed normal-equivalent sigmas: the z whose normal
    tail equals the exact binomial tail. Counts of rare events are skewed (a 2 % rate in 100
    samples is about 2 events), where a plain z-score would give false alarms."""
    mean = n * p
    if k > mean:
        tail = binomial_tail(k, n, p, upper=True)
        return math.inf if tail <= 0 else -_NORMAL.inv_cdf(min(0.5, tail))
    if k < mean:
        tail = binomial_tail(k, n, p, upper=False)
        return -math.inf if tail <= 0 else _NORMAL.inv_cdf(min(0.5, tail))
    return 0.0


@dataclass
class Baseline:
    """EWMA mean and variance of a signal's per-window values; for rates also the EWMA of the
    number of samples per window (how much evidence the baseline rests on) and the
    dispersion: observed squared deviations over the binomial variance at each window's own
    sample count (1 for pure sampling noise; above 1 when the rate really varies). Why not the
    raw variance for rates: windows at night hold a tenth of the daytime samples and ten times
    the noise, and a raw variance would let the night blunt the day's alerts."""

    mean: float = 0.0
    var: float = 0.0
    n: int = 0  # windows absorbed
    samples: float = 0.0
    dispersion: float = 1.0
    unit_var: float = 0.0  # latencies and lengths: EWMA of squared deviation x samples
    updated: float = -math.inf  # monotonic time of the last update (not shared)

    def update(self, x: float, alpha: float, clip_sigmas: float | None = None, samples: int = 0,
               noise_var: float | None = None, mean_only: bool = False) -> None:
        """Absorb one window's value. ``noise_var`` (rates): the binomial variance of this
        window's value at the baseline rate; ``clip_sigmas``: winsorise ``x`` first;
        ``mean_only``: move the mean but learn no spread (an anomalous window would teach the
        baseline that anomalies are normal, and the alert would resolve mid-incident)."""
        if self.n == 0:
            self.mean, self.var, self.samples = x, 0.0, float(samples)
        else:
            if clip_sigmas is not None:
                sd = math.sqrt(max(self.dispersion, 1.0) * noise_var) if noise_var else self.spread(samples)
                if sd > 0:
                    x = min(max(x, self.mean - clip_sigmas * sd), self.mean + clip_sigmas * sd)
            a = max(alpha, 1.0 / (self.n + 1))  # a plain average while warming up
            av = max(alpha / 2, 1.0 / (self.n + 1))  # the spread: twice the memory, a steadier estimate
            d = x - self.mean
            self.mean += a * d
            if mean_only:
                self.n += 1
                return
            self.var = (1 - av) * (self.var + av * d * d)
            self.samples += a * (samples - self.samples)
            if noise_var:
                self.dispersion += av * (d * d / noise_var - self.dispersion)
            elif samples:
                self.unit_var += av * (d * d * samples - self.unit_var)
        self.n += 1

    def spread(self, samples: int) -> float:
        """Latencies and lengths: the standard deviation to expect for a window of
        ``samples``: the larger of the spread between windows and the per-sample spread scaled
        to this window (a quiet evening's p95 rests on fewer samples than noon's)."""
        return max(math.sqrt(max(self.var, 0.0)), math.sqrt(max(self.unit_var, 0.0) / max(samples, 1)))

    def rate_floor(self, alpha: float) -> float:
        """The baseline rate, never below one event in the samples it rests on: a detector
        that never fired is not assumed to have a rate of exactly zero."""
        effective = max(self.samples, 1.0) * min(self.n, 2.0 / alpha - 1.0)
        return min(max(self.mean, 1.0 / max(effective, 1.0)), 1.0)

    def noise_var(self, alpha: float, samples: int) -> float:
        """Binomial variance of a window rate over ``samples`` at the baseline rate."""
        p = self.rate_floor(alpha)
        return p * (1 - p) / max(samples, 1)

    def z(self, rule: RuleSpec, value: float, samples: int) -> float:
        """Signed deviation of a window value in sigmas.

        Latencies and lengths (baseline kept on ``log(value)``, see ``transform``):
        ``(log value - mean) / max(spread(samples), log(1 + relative_floor))``. Rates: the smaller of the
        deviation in units of the quasi-binomial spread at this window's sample count
        (``sqrt(dispersion * p(1-p)/n)``; covers real variation between windows) and the exact
        binomial tail at the baseline rate (covers the skew of counts of rare events)."""
        if rule.kind != "rate":
            d = transform(rule, value) - self.mean
            return d / max(self.spread(samples), math.log1p(rule.relative_floor), 1e-12)
        d = value - self.mean
        if d == 0:
            return 0.0
        spread = d / math.sqrt(max(self.dispersion, 1.0) * self.noise_var(rule.alpha, samples))
        sampling = binomial_z(round(value * samples), samples, self.rate_floor(rule.alpha))
        if sampling == 0 or (sampling > 0) != (d > 0):
            return 0.0
        return math.copysign(min(abs(spread), abs(sampling)), d)

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "n": self.n, "samples": self.samples,
                "dispersion": self.dispersion, "unit_var": self.unit_var}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Baseline:
        return cls(mean=float(d["mean"]), var=float(d["var"]), n=int(d["n"]), samples=float(d.get("samples", 0.0)),
                   dispersion=float(d.get("dispersion", 1.0)), unit_var=float(d.get("unit_var", 0.0)))


def learn(rule: RuleSpec, b: Baseline, value: float, samples: int, firing: bool = False) -> None:
    """Absorb one window into a rule's baseline: winsorised at ``sigmas`` once warm; while the
    alert fires only the mean moves, five times slower (a lasting shift becomes the new normal
    after a while; a passing incident does not widen the baseline)."""
    warm = b.n >= rule.warmup_windows
    alpha = rule.alpha / 5 if firing else rule.alpha
    noise = b.noise_var(rule.alpha, samples) if rule.kind == "rate" and b.n > 0 else None
    b.update(transform(rule, value), alpha, rule.sigmas if warm and not firing else None, samples, noise,
             mean_only=firing)


@dataclass
class Verdict:
    active: bool
    value: float | None = None
    samples: int = 0
    mean: float | None = None
    z: float | None = None
    warming: bool = False
    held: bool = False


def _beyond(x: float, limit: float, sides: str) -> bool:
    if sides == "below":
        return x < limit
    return x > limit


def evaluate(rule: RuleSpec, got: tuple[float, int] | None, baseline: Baseline | None,
             firing: bool = False) -> Verdict:
    """Pure: does ``rule`` hold for a window value ``got`` against ``baseline``? An alert that
    is ``firing`` keeps firing until the value crosses back past ``rule.release`` (static) or
    below half the sigmas (adaptive): hysteresis, so a value hovering at the threshold or a
    noisy window mid-incident does not resolve the alert and notify again a minute later."""
    if got is None or got[1] < rule.min_samples:
        # too little evidence: nothing fires; a firing alert holds while there is traffic at
        # all (a quiet night is not a recovery) and resolves when there is none
        held = firing and got is not None and got[1] > 0
        return Verdict(held, None if got is None else got[0], 0 if got is None else got[1], held=held)
    value, n = got
    v = Verdict(True, value, n)
    if rule.threshold is not None:  # a static threshold is a floor unless direction is "below"
        limit = rule.release if firing else rule.threshold
        v.active = _beyond(value, limit, rule.sides)  # type: ignore[arg-type]
    if rule.adaptive:
        if baseline is None or baseline.n < rule.warmup_windows:
            v.active, v.warming = False, True
            return v
        z = baseline.z(rule, value, n)
        v.mean, v.z = untransform(rule, baseline.mean), z
        sides, k = rule.sides, rule.sigmas / 2 if firing else rule.sigmas
        dev = z > k if sides == "above" else z < -k if sides == "below" else abs(z) > k
        v.active = v.active and dev
    return v


# --- metrics this module registers (until proxy/metrics.py declares them) ---------------------


class AlertMetrics:
    """``gapwatch_alerts_firing{rule}``, ``gapwatch_alert_notifications_total{sink}`` and
    ``gapwatch_state_backend_up{backend}``, registered once per ``Metrics`` object. When
    ``proxy.metrics.Metrics`` grows attributes of the same names, those are used instead."""

    def __init__(self, metrics: Any) -> None:
        r = None if getattr(metrics, "multiprocess", False) else metrics.registry
        self.firing = getattr(metrics, "alerts_firing", None) or Gauge(
            "gapwatch_alerts_firing", "Alerts gapwatch's own anomaly engine has firing, by rule.", ["rule"],
            registry=r, multiprocess_mode="livemax")
        self.notifications = getattr(metrics, "alert_notifications", None) or Counter(
            "gapwatch_alert_notifications", "Alert notifications handed to a sink (firing, resolved, "
            "re-notifications; not Alertmanager keep-alives).", ["sink"], registry=r)
        self.state_up = getattr(metrics, "state_backend_up", None) or Gauge(
            "gapwatch_state_backend_up", "1 when the shared state backend answers; 0 while gapwatch runs on "
            "per-process state (Redis unreachable).", ["backend"], registry=r, multiprocess_mode="livemin")


def alert_metrics(metrics: Any) -> AlertMetrics:
    am = getattr(metrics, "_gapwatch_alert_metrics", None)
    if am is None:
        am = AlertMetrics(metrics)
        metrics._gapwatch_alert_metrics = am
    return am


# --- the engine -------------------------------------------------------------------------------

AlertKey = tuple[str, str, str, str]  # rule, route, model, concrete signal
MODEL_CHANGED = "model_changed"  # the event alert raised by proxy.model_watch changes
EVENT_QUEUE = 100


@dataclass
class Alert:
    key: AlertKey
    rule: RuleSpec | None  # None for event alerts (model_changed): nothing evaluates them
    labels: dict[str, str]
    fingerprint: str
    starts_at: float
    status: str = "firing"
    ends_at: float | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    value: float | None = None
    notified: bool = False  # this process sent a firing notification in this episode
    last_sent: float = -math.inf  # monotonic
    last_refresh: float = -math.inf

    def as_dict(self, expires_at: float | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "fingerprint": self.fingerprint, "status": self.status, "labels": dict(self.labels),
            "annotations": dict(self.annotations), "startsAt": iso(self.starts_at),
            "endsAt": iso(self.ends_at) if self.ends_at is not None else None,
        }
        if expires_at is not None:
            d["expiresAt"] = iso(expires_at)
        return d


def fingerprint(labels: Mapping[str, str]) -> str:
    return hashlib.sha256(orjson.dumps(dict(sorted(labels.items())))).hexdigest()[:16]


def _fmt(signal: str, v: float | None) -> str:
    if v is None:
        return "n/a"
    if signal_kind(signal) == "rate":
        return f"{v * 100:.2f}%"
    if signal.startswith(("latency", "ttft")):
        return f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s"
    return f"{v:.1f}"


class AlertEngine:
    """``observe`` each finished exchange; ``start`` runs evaluation and delivery on the loop.

    ``state`` is the shared-state backend (``proxy.state_redis.build_state``): it provides the
    async ``alert_firing``/``alert_resolved`` claims and baseline persistence. ``sinks`` and
    ``settings`` override what the config says (tests)."""

    def __init__(self, config: Any, metrics: Any, state: Any, *, settings: AlertSettings | None = None,
                 sinks: list[Sink] | None = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, dispatcher: Dispatcher | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.state = state
        self.settings = settings or AlertSettings.from_config(config)
        self.rules = self.settings.rules
        self._clock = clock
        self._wall = wall
        self._windows = sorted({r.window_seconds for r in self.rules})
        self._series: dict[tuple[str, str], dict[float, WindowRing]] = {}
        self._last_seen: dict[tuple[str, str], float] = {}
        self._baselines: dict[tuple[str, str, str, str], Baseline] = {}
        self._active: dict[AlertKey, Alert] = {}
        self._cooldown: dict[AlertKey, float] = {}
        self._history: deque[dict[str, Any]] = deque(maxlen=self.settings.history_size)
        self._am = alert_metrics(metrics)
        built = sinks if sinks is not None else build_sinks(config.alerts.sinks)
        self.dispatcher = dispatcher or Dispatcher(built, metrics, self.settings.queue_size)
        self._task: asyncio.Task[None] | None = None
        self._model_change = getattr(getattr(config, "alerts", None), "model_change", None)
        self._changes: asyncio.Queue[Any] = asyncio.Queue(maxsize=EVENT_QUEUE)
        self._events: dict[str, tuple[Alert, float]] = {}  # fingerprint -> (alert, resolves at)
        self._event_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._logged: set[str] = set()
        self.dropped_series = 0
        for r in self.rules:
            self._am.firing.labels(r.name).set(0)

    # -- the hot path ----------------------------------------------------------------------------

    def observe(self, ex: Any) -> None:
        """Record one finished exchange. O(number of distinct rule windows); never raises."""
        if not self._windows:
            return
        try:
            sample = exchange_sample(ex)
            if sample is None:
                return
            now = self._clock()
            key = (ex.route, ex.model_label)
            rings = self._series.get(key)
            if rings is None:
                if len(self._series) >= MAX_SERIES:
                    self.dropped_series += 1
                    return
                rings = self._series[key] = {w: WindowRing(w) for w in self._windows}
            self._last_seen[key] = now
            for ring in rings.values():
                ring.add(now, sample)
        except Exception as exc:  # noqa: BLE001 - alerting must never fail a request
            self._error(exc)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None or self._event_task is not None:
            return
        self.dispatcher.start()
        loop = asyncio.get_running_loop()
        if self.rules:
            self._task = loop.create_task(self._run(), name="gapwatch-alerts")
        if self._model_change is not None and self._model_change.enabled:
            self._am.firing.labels(MODEL_CHANGED).set(0)
            self._event_task = loop.create_task(self._run_events(), name="gapwatch-alert-events")

    async def stop(self) -> None:
        # a flag as well as the cancel: on Python 3.11 a cancel that races an expiring
        # asyncio.timeout() inside a state call can surface as TimeoutError instead
        self._stopping = True
        for task in (self._task, self._event_task):
            if task is not None:
                task.cancel()
                await asyncio.wait({task}, timeout=2.0)
        self._task = self._event_task = None
        await self.dispatcher.stop()

    async def _run(self) -> None:
        interval = self.settings.evaluation_interval_seconds
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep evaluating whatever one tick did
                self._error(exc)

    def _error(self, exc: Exception) -> None:
        with contextlib.suppress(Exception):
            self.metrics.telemetry_errors.labels("alerts").inc()
        key = type(exc).__name__
        if key not in self._logged:
            self._logged.add(key)
            log.exception("alert engine error (logged once per error type; counted in "
                          "gapwatch_telemetry_errors_total{component=\"alerts\"})")

    # -- evaluation ------------------------------------------------------------------------------

    async def tick(self) -> None:
        """One evaluation of every rule on every series; sends what changed."""
        now, wall = self._clock(), self._wall()
        self._prune(now)
        seen: set[AlertKey] = set()
        for rule in self.rules:
            for skey, rings in list(self._series.items()):
                agg = rings[rule.window_seconds].aggregate(now)
                for signal in self._signals(rule, skey, agg):
                    akey: AlertKey = (rule.name, skey[0], skey[1], signal)
                    seen.add(akey)
                    got = signal_value(signal, agg)
                    baseline = await self._baseline(rule, akey) if rule.adaptive else None
                    firing = akey in self._active
                    verdict = evaluate(rule, got, baseline, firing)
                    if baseline is not None and got is not None and got[1] >= rule.min_samples \
                            and now - baseline.updated >= rule.window_seconds:
                        self._learn(rule, baseline, got[0], got[1], firing, now)
                        await self.state.save_baseline(self._baseline_key(akey), baseline.to_dict(),
                                                       ttl_seconds=max(86400.0, 48 * rule.window_seconds))
                    if verdict.active:
                        await self._fire(akey, rule, verdict, now, wall)
                    elif firing:
                        await self._resolve(akey, verdict, now, wall)
        for akey in [k for k in self._active if k not in seen]:
            await self._resolve(akey, Verdict(False), now, wall)
        resend = self.settings.resend_interval_seconds
        for alert in self._active.values():  # keep-alive for sinks that expire alerts (Alertmanager)
            if now - alert.last_refresh >= resend:
                alert.last_refresh = now
                self.dispatcher.submit(Notification("firing", alert.as_dict(self._expiry(wall)), refresh=True))
        counts: dict[str, int] = {r.name: 0 for r in self.rules}
        for alert in self._active.values():
            counts[alert.key[0]] = counts.get(alert.key[0], 0) + 1
        for name, n in counts.items():
            self._am.firing.labels(name).set(n)

    def _signals(self, rule: RuleSpec, skey: tuple[str, str], agg: Slot) -> Iterable[str]:
        if not rule.signal.endswith(".*"):
            return (rule.signal,)
        prefix = rule.signal[:-1]
        out = {k for k in agg.counts if k.startswith(prefix)}
        out |= {k[3] for k in self._active if k[0] == rule.name and k[1:3] == skey}
        out |= {k[3] for k in self._baselines if k[0] == rule.name and k[1:3] == skey}
        return sorted(out)

    def _learn(self, rule: RuleSpec, b: Baseline, value: float, samples: int, firing: bool, now: float) -> None:
        b.updated = now
        learn(rule, b, value, samples, firing)

    @staticmethod
    def _baseline_key(akey: AlertKey) -> str:
        return "|".join(akey)

    async def _baseline(self, rule: RuleSpec, akey: AlertKey) -> Baseline:
        b = self._baselines.get(akey)
        if b is None:
            stored = await self.state.load_baseline(self._baseline_key(akey))
            try:
                b = Baseline.from_dict(stored) if stored else Baseline()
            except (KeyError, TypeError, ValueError):
                b = Baseline()
            self._baselines[akey] = b
        return b

    def _prune(self, now: float) -> None:
        """Forget series idle for longer than twice the longest window (bounded memory)."""
        horizon = 2 * max(self._windows, default=0.0)
        for skey in [k for k, t in self._last_seen.items() if now - t > horizon]:
            if any(k[1:3] == skey for k in self._active):
                continue
            self._series.pop(skey, None)
            self._last_seen.pop(skey, None)
        for k in [k for k, t in self._cooldown.items() if t <= now]:
            del self._cooldown[k]

    def _expiry(self, wall: float) -> float:
        return wall + max(4 * self.settings.resend_interval_seconds, 4 * self.settings.evaluation_interval_seconds)

    def _labels(self, rule: RuleSpec, akey: AlertKey) -> dict[str, str]:
        _, route, model, signal = akey
        labels = {"alertname": rule.name, "severity": rule.severity, "route": route, "model": model,
                  "signal": signal, "source": "gapwatch"}
        if signal.startswith("findings."):
            labels["detector"] = signal.split(".", 1)[1]
        elif signal.startswith("class."):
            labels["detector"] = signal.split(".")[1]
        labels.update(rule.labels)
        return {k: v for k, v in labels.items() if v}

    def _annotations(self, rule: RuleSpec, akey: AlertKey, v: Verdict) -> dict[str, str]:
        _, route, model, signal = akey
        window = f"{rule.window_seconds:g}s"
        ann = {"value": _fmt(signal, v.value), "samples": str(v.samples), "window": window}
        cond = []
        if rule.threshold is not None:
            cond.append(f"threshold {_fmt(signal, rule.threshold)}")
            ann["threshold"] = _fmt(signal, rule.threshold)
        if v.z is not None:
            cond.append(f"baseline {_fmt(signal, v.mean)}, {v.z:+.1f} sigma")
            ann["baseline"] = _fmt(signal, v.mean)
            ann["sigmas"] = f"{v.z:+.1f}"
        ann["summary"] = f"{signal} is {_fmt(signal, v.value)} on route {route}, model {model}"
        ann["description"] = (f"{signal} was {_fmt(signal, v.value)} over the last {window} "
                              f"({v.samples} samples; {'; '.join(cond)}).")
        return ann

    async def _fire(self, akey: AlertKey, rule: RuleSpec, v: Verdict, now: float, wall: float) -> None:
        alert = self._active.get(akey)
        if alert is None:
            if self._cooldown.get(akey, -math.inf) > now:
                return
            labels = self._labels(rule, akey)
            alert = Alert(akey, rule, labels, fingerprint(labels), starts_at=wall)
        if not v.held:  # a held alert keeps the figures that made it fire
            alert.value = v.value
            alert.annotations = self._annotations(rule, akey, v)
        claim = await self.state.alert_firing(
            alert.fingerprint, self.settings.replica_id, starts_at=alert.starts_at,
            heartbeat_seconds=max(10 * self.settings.evaluation_interval_seconds, 5.0),
            renotify_seconds=self.settings.renotify_interval_seconds)
        if claim.result == "cooldown":
            return
        if claim.starts_at is not None:
            alert.starts_at = claim.starts_at
        new = akey not in self._active
        if new:
            self._active[akey] = alert
            self._history.appendleft({"event": "firing", "at": iso(wall), **alert.as_dict()})
        if claim.result in ("notify", "renotify") and \
                now - alert.last_sent >= 0.9 * self.settings.renotify_interval_seconds:
            alert.notified = True
            alert.last_sent = alert.last_refresh = now
            self._notify(Notification("firing", alert.as_dict(self._expiry(wall))))

    async def _resolve(self, akey: AlertKey, v: Verdict, now: float, wall: float) -> None:
        alert = self._active.pop(akey)
        alert.status, alert.ends_at = "resolved", wall
        if v.value is not None:
            alert.annotations["value"] = _fmt(akey[3], v.value)
        result = await self.state.alert_resolved(alert.fingerprint, self.settings.replica_id,
                                                 cooldown_seconds=self.settings.cooldown_seconds)
        if self.settings.cooldown_seconds > 0:
            self._cooldown[akey] = now + self.settings.cooldown_seconds
        self._history.appendleft({"event": "resolved", "at": iso(wall), **alert.as_dict()})
        if result == "notify" or (result == "none" and alert.notified):
            self._notify(Notification("resolved", alert.as_dict()))

    def _notify(self, note: Notification) -> None:
        for sink in self.dispatcher.sinks:
            if sink.wants(note):
                self._am.notifications.labels(sink.name).inc()
        self.dispatcher.submit(note)

    # -- event alerts: model_changed -----------------------------------------------------------

    def model_changed(self, change: Any) -> None:
        """A confirmed ``proxy.model_watch.ModelChange``: raise ``model_changed``. Called on the
        request's way out; it only queues (the claim and the delivery run in the event task)."""
        if self._model_change is None or not self._model_change.enabled:
            return
        try:
            self._changes.put_nowait(change)
        except asyncio.QueueFull:
            self._error(OverflowError("model change queue full"))

    async def _run_events(self) -> None:
        while not self._stopping:
            try:
                change = await asyncio.wait_for(self._changes.get(), self._next_event_deadline())
            except TimeoutError:
                change = None
            try:
                if change is not None:
                    await self._fire_change(change)
                await self._event_housekeeping()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep delivering whatever one event did
                self._error(exc)

    def _next_event_deadline(self) -> float | None:
        if not self._events:
            return None
        now, resend = self._clock(), self.settings.resend_interval_seconds
        due = min(min(until, a.last_refresh + resend) for a, until in self._events.values())
        return max(0.05, due - now)

    def _change_alert(self, change: Any, wall: float) -> Alert:
        mc = self._model_change
        before, after = change.before, change.after
        labels = {"alertname": MODEL_CHANGED, "severity": mc.severity, "route": change.route, "model": change.model,
                  "signal": "model_identity", "source": "gapwatch",
                  "system_fingerprint": after.system_fingerprint or "none",
                  "identity": hashlib.sha256(orjson.dumps(after.as_dict())).hexdigest()[:12], **mc.labels}

        def show(ident: Any) -> str:
            return f"{ident.model or '(no model name)'} / {ident.system_fingerprint or '(no fingerprint)'}"

        ann = {"summary": f"upstream model changed on route {change.route}, model {change.model}: "
                          f"{show(before)} -> {show(after)}",
               "description": f"The upstream reported {show(after)} on {change.responses} consecutive responses "
                              f"after {show(before)}. Run the evaluation suite against the route "
                              "(gapwatch eval --baseline) before trusting the old figures.",
               "before_model": before.model or "", "before_system_fingerprint": before.system_fingerprint or "",
               "after_model": after.model or "", "after_system_fingerprint": after.system_fingerprint or "",
               "responses": str(change.responses)}
        key: AlertKey = (MODEL_CHANGED, change.route, change.model, "model_identity")
        return Alert(key, None, labels, fingerprint(labels), starts_at=change.at or wall, annotations=ann)

    async def _fire_change(self, change: Any) -> None:
        now, wall = self._clock(), self._wall()
        alert = self._change_alert(change, wall)
        if alert.fingerprint in self._events:
            return
        hold = self._model_change.hold_seconds
        claim = await self.state.alert_firing(alert.fingerprint, self.settings.replica_id, starts_at=alert.starts_at,
                                              heartbeat_seconds=hold, renotify_seconds=2 * hold)
        if claim.result == "cooldown":
            return
        if claim.starts_at is not None:
            alert.starts_at = claim.starts_at
        self._events[alert.fingerprint] = (alert, now + hold)
        self._history.appendleft({"event": "firing", "at": iso(wall), **alert.as_dict()})
        if claim.result in ("notify", "renotify"):
            alert.notified = True
            alert.last_sent = alert.last_refresh = now
            self._notify(Notification("firing", alert.as_dict(self._expiry(wall))))
        else:
            alert.last_refresh = now

    async def _event_housekeeping(self) -> None:
        """Resolve event alerts whose hold is over; keep-alive re-posts for the others."""
        now, wall = self._clock(), self._wall()
        for fp, (alert, until) in list(self._events.items()):
            if until <= now:
                del self._events[fp]
                alert.status, alert.ends_at = "resolved", wall
                result = await self.state.alert_resolved(fp, self.settings.replica_id,
                                                         cooldown_seconds=self.settings.cooldown_seconds)
                self._history.appendleft({"event": "resolved", "at": iso(wall), **alert.as_dict()})
                if result == "notify" or (result == "none" and alert.notified):
                    self._notify(Notification("resolved", alert.as_dict()))
            elif now - alert.last_refresh >= self.settings.resend_interval_seconds:
                alert.last_refresh = now
                self.dispatcher.submit(Notification("firing", alert.as_dict(self._expiry(wall)), refresh=True))
        self._am.firing.labels(MODEL_CHANGED).set(len(self._events))

    # -- admin -----------------------------------------------------------------------------------

    def active(self) -> list[dict[str, Any]]:
        """Alerts firing in this process, oldest first (``GET /admin/alerts``)."""
        out = []
        alerts = [*self._active.values(), *(a for a, _ in self._events.values())]
        for a in sorted(alerts, key=lambda a: a.starts_at):
            d = a.as_dict()
            d["notified"] = a.notified
            out.append(d)
        return out

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        """Recent firing/resolved events, newest first."""
        return [dict(e) for e in list(self._history)[: max(0, limit)]]

    def baselines(self) -> dict[str, dict[str, float]]:
        return {self._baseline_key(k): b.to_dict() for k, b in self._baselines.items()}


def config_problems(config: Any, env: Mapping[str, str] | None = None) -> list[str]:
    """Problems with ``alerts`` that would stop the engine from starting, one line each in the
    config loader's ``path: problem`` style (for ``proxy.config``'s reference checks)."""
    problems: list[str] = []
    for i, rule in enumerate(config.alerts.rules):
        try:
            RuleSpec.from_config(rule)
        except ValueError as exc:
            problems.append(f"alerts.rules[{i}]: {exc}")
    for i, sink in enumerate(config.alerts.sinks):
        try:
            build_sinks([sink], env)
        except ValueError as exc:
            problems.append(str(exc).replace("alerts.sinks[0]", f"alerts.sinks[{i}]"))
    return problems


def replace_rules(settings: AlertSettings, rules: Iterable[RuleSpec]) -> AlertSettings:
    """A copy of ``settings`` with other rules (tests, the drift simulation)."""
    return replace(settings, rules=tuple(rules))


__all__ = ["DEFAULT_RULES", "AlertEngine", "AlertSettings", "Baseline", "RuleSpec", "config_problems", "evaluate",
           "exchange_sample", "learn", "parse_duration", "signal_value"]
