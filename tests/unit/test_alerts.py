"""The alert engine: signals, windows, baselines, rule verdicts and the firing/resolved lifecycle,
driven with a fake clock and synthetic exchanges (no network)."""

from __future__ import annotations

import asyncio
import math
import random
from types import SimpleNamespace
from typing import Any

import pytest

from detectors.base import Finding, Severity
from proxy.alert_sinks import LogSink, Notification
from proxy.alerts import (
    DEFAULT_RULES,
    AlertEngine,
    AlertSettings,
    Baseline,
    RuleSpec,
    Sample,
    Slot,
    WindowRing,
    binomial_tail,
    binomial_z,
    config_problems,
    evaluate,
    exchange_sample,
    fingerprint,
    learn,
    parse_duration,
    signal_value,
)
from proxy.config import Config, ConfigError, PolicyConfig, load_dict
from proxy.exchange import Exchange
from proxy.metrics import Metrics
from proxy.pipeline import Applied, Outcome, Policy
from proxy.state_redis import MemoryState, build_state
from tests.conftest import metric_value

POLICY = Policy.build("default", PolicyConfig(), ())


def raw_config(**alerts: Any) -> Any:
    """The validated models without the loader's cross-checks."""
    return Config.model_validate({"upstreams": {"u": {"base_url": "http://127.0.0.1:9/v1"}},
                                  "routes": [{"upstream": "u", "name": "chat"}], "alerts": alerts})


def config(**alerts: Any) -> Any:
    return load_dict({"upstreams": {"u": {"base_url": "http://127.0.0.1:9/v1"}},
                      "routes": [{"upstream": "u", "name": "chat"}], "alerts": alerts}).config


def exchange(*, detectors: tuple[str, ...] = (), status: int = 200, outcome: str = "ok", latency: float = 0.2,
             ttft: float | None = 0.05, tokens: int | None = 20, chars: int = 80, upstream_error: str | None = None,
             model: str = "sim-echo", route: str = "chat", classification: str | None = None,
             endpoint: str = "chat") -> Exchange:
    ex = Exchange(request_id="r", method="POST", path="/v1/chat/completions", endpoint=endpoint)
    ex.started = 100.0
    ex.ended = 100.0 + latency
    ex.route, ex.model, ex.model_label = route, model, model
    ex.status, ex.outcome, ex.upstream_error = status, outcome, upstream_error
    ex.policy = POLICY
    ex.upstream_started = 100.0
    ex.upstream_first_token_at = None if ttft is None else 100.0 + ttft
    ex.usage = {"completion_tokens": tokens} if tokens is not None else None
    ex.output_chars = chars
    applied = [Applied(Finding(d, "x", Severity.high, 1.0, "m"), "observe", "observe") for d in detectors]
    signals: dict[str, object] = {}
    if classification:
        signals["transparency.classification"] = classification
    ex.outcomes = [Outcome(applied=applied, signals=signals)]
    return ex


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Recorder:
    """Stands in for the sink dispatcher: records what the engine submits."""

    def __init__(self) -> None:
        self.sinks = [LogSink(0, SimpleNamespace())]
        self.notes: list[Notification] = []

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def submit(self, note: Notification) -> None:
        self.notes.append(note)

    @property
    def sent(self) -> list[tuple[str, str]]:
        return [(n.status, n.alert["labels"]["alertname"]) for n in self.notes if not n.refresh]


def engine(rules: list[RuleSpec], *, state: Any = None, clock: Clock | None = None, metrics: Metrics | None = None,
           **settings: Any) -> tuple[AlertEngine, Recorder, Clock]:
    cfg = config()
    clock = clock or Clock()
    metrics = metrics or Metrics()
    st = AlertSettings(rules=tuple(rules), evaluation_interval_seconds=1.0, **settings)
    rec = Recorder()
    eng = AlertEngine(cfg, metrics, state if state is not None else MemoryState(cfg, metrics, clock), settings=st,
                      clock=clock, wall=lambda: 1.7e9 + clock.t, dispatcher=rec)  # type: ignore[arg-type]
    return eng, rec, clock


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- parsing and rules --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [("5m", 300), ("2s", 2), ("1h30m", 5400), ("500ms", 0.5),
                                               ("1d", 86400), (30, 30), (0.5, 0.5)])
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5 m", "m5", "5x", "-5m", "0s", "5m junk"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_rule_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match=r"unknown signal 'findings'.*valid: block_rate"):
        RuleSpec(name="r", signal="findings", threshold=0.1)
    with pytest.raises(ValueError, match="threshold, adaptive"):
        RuleSpec(name="r", signal="block_rate")
    with pytest.raises(ValueError, match="unknown signal"):
        RuleSpec(name="r", signal="latency_p42", threshold=1)
    for sig in ("findings.pii", "findings.*", "class.transparency.refused", "class.transparency.*",
                "latency_p99", "ttft_p50", "output_tokens_mean", "abstention_rate", "upstream_error_rate"):
        RuleSpec(name="r", signal=sig, threshold=1)


def test_rules_from_config() -> None:
    cfg = config(rules=[{"name": "pii", "signal": "findings.pii", "threshold": 0.01, "window": "2m",
                         "min_samples": 7, "severity": "critical"}])
    s = AlertSettings.from_config(cfg)
    (r,) = s.rules
    assert (r.window_seconds, r.min_samples, r.severity, r.threshold) == (120.0, 7, "critical", 0.01)
    assert s.evaluation_interval_seconds == 15.0  # window / 5, at most 15 s
    assert AlertSettings.from_config(config()).rules == DEFAULT_RULES  # no rules: the adaptive defaults
    short = AlertSettings.from_config(config(rules=[{"name": "x", "signal": "block_rate", "threshold": 0.1,
                                                     "window": "2s"}]))
    assert short.evaluation_interval_seconds == pytest.approx(0.4)


def test_config_problems() -> None:
    # the loader itself refuses such a config (with these lines); here the checks run alone
    with pytest.raises(ConfigError) as ei:
        config(rules=[{"name": "b", "signal": "latency", "threshold": 1}])
    assert ei.value.problems[0].startswith("alerts.rules[0]: alerts rule 'b': unknown signal 'latency'")
    cfg = raw_config(rules=[{"name": "a", "signal": "findings.pii", "threshold": 0.01},
                        {"name": "b", "signal": "latency", "threshold": 1},
                        {"name": "c", "signal": "block_rate", "threshold": 0.1, "window": "5 minutes"}],
                 sinks=[{"type": "log"}, {"type": "webhook", "url": "http://h/x", "secret_env": "NOPE_GW"}])
    problems = config_problems(cfg, env={})
    assert len(problems) == 3
    assert problems[0].startswith("alerts.rules[1]: alerts rule 'b': unknown signal 'latency'")
    assert problems[1] == "alerts.rules[2]: invalid duration '5 minutes' (write e.g. 30s, 5m, 1h30m)"
    assert problems[2] == "alerts.sinks[1].secret_env: environment variable NOPE_GW is not set"
    assert config_problems(config(), env={}) == []


# --- samples, windows, signals ---------------------------------------------------------------------


def test_exchange_sample() -> None:
    s = exchange_sample(exchange(detectors=("pii", "pii", "secrets"), classification="abstained"))
    assert s is not None
    assert sorted(s.counts) == sorted(["requests", "checked", "findings.pii", "findings.secrets",
                                       "classified.transparency", "class.transparency.abstained"])
    assert {k for k, _ in s.buckets} == {"latency", "ttft"}
    assert dict(s.values) == {"output_tokens": 20.0, "output_chars": 80.0}
    err = exchange_sample(exchange(status=502, upstream_error="connect"))
    assert err is not None and "upstream_error" in err.counts and "checked" not in err.counts
    assert not err.buckets  # failed requests do not count towards latency
    blocked = exchange_sample(exchange(status=400, outcome="blocked", detectors=("secrets",)))
    assert blocked is not None and {"checked", "blocked", "findings.secrets"} <= set(blocked.counts)
    assert exchange_sample(exchange(endpoint="embeddings")) is None


def test_signal_values() -> None:
    agg = Slot()
    for i in range(100):
        agg.add(exchange_sample(exchange(detectors=("pii",) if i < 3 else (), latency=(i + 1) / 100,
                                         classification="abstained" if i < 10 else "answered",
                                         tokens=10 if i % 2 else 30)))  # type: ignore[arg-type]
    for _ in range(4):
        agg.add(exchange_sample(exchange(status=502, upstream_error="connect")))  # type: ignore[arg-type]
    assert signal_value("findings.pii", agg) == (0.03, 100)
    assert signal_value("findings.secrets", agg) == (0.0, 100)
    assert signal_value("upstream_error_rate", agg) == (4 / 104, 104)
    assert signal_value("abstention_rate", agg) == (0.1, 100)
    assert signal_value("block_rate", agg) == (0.0, 100)
    assert signal_value("output_tokens_mean", agg) == (20.0, 100)
    for sig, exact in (("latency_p50", 0.5), ("latency_p95", 0.95), ("latency_p99", 0.99)):
        value, n = signal_value(sig, agg)  # type: ignore[misc]
        assert n == 100 and value == pytest.approx(exact, rel=0.03)
    assert signal_value("ttft_p95", agg)[0] == pytest.approx(0.05, rel=0.03)  # type: ignore[index]
    assert signal_value("findings.pii", Slot()) is None


def test_window_ring_forgets_old_slots() -> None:
    ring = WindowRing(10.0)
    hit = Sample(["requests", "checked", "findings.pii"], [], [])
    miss = Sample(["requests", "checked"], [], [])
    for t in range(20):
        ring.add(float(t), hit if t < 10 else miss)
    assert signal_value("findings.pii", ring.aggregate(19.5)) == (0.0, 10)
    assert len(ring.slots) <= 10
    assert ring.aggregate(100.0).counts == {}


# --- baselines and verdicts ---------------------------------------------------------------------


def test_baseline_warmup_average_then_ewma() -> None:
    b = Baseline()
    for x in (1.0, 2.0, 3.0):
        b.update(x, alpha=0.1)
    assert b.mean == pytest.approx(2.0) and b.n == 3  # a plain average while n < 1/alpha
    for _ in range(200):
        b.update(10.0, alpha=0.1)
    assert b.mean == pytest.approx(10.0, abs=1e-6)
    b2 = Baseline(mean=1.0, var=0.01, n=50)
    b2.update(100.0, alpha=0.1, clip_sigmas=4.0)  # winsorised at mean + 4 sd = 1.4
    assert b2.mean == pytest.approx(1.04)
    assert Baseline.from_dict(b2.to_dict()).mean == b2.mean


def test_binomial_tail_and_z() -> None:
    assert binomial_tail(3, 10, 0.5, upper=True) == pytest.approx(1 - 56 / 1024)
    assert binomial_tail(2, 10, 0.5, upper=False) == pytest.approx(56 / 1024)
    assert binomial_tail(0, 10, 0.1, upper=True) == 1.0
    assert binomial_tail(1, 10, 0.0, upper=True) == 0.0
    assert binomial_z(5, 100, 0.05) == 0.0
    assert binomial_z(20, 100, 0.05) > 5 > binomial_z(12, 100, 0.05) > 2
    assert binomial_z(0, 1000, 0.05) < -5
    big = binomial_z(5200, 100000, 0.05)  # large n: close to the normal approximation
    assert big == pytest.approx(200 / math.sqrt(100000 * 0.05 * 0.95), rel=0.05)


def test_rate_baseline_of_zero_is_not_zero() -> None:
    rule = RuleSpec(name="r", signal="findings.pii", adaptive=True, sigmas=5, min_samples=10, warmup_windows=5)
    b = Baseline()
    for _ in range(30):
        b.update(0.0, rule.alpha, samples=100)
    assert b.rate_floor(rule.alpha) == pytest.approx(1 / 1900)
    assert not evaluate(rule, (0.02, 100), b).active  # two findings in 100 after none: not 5 sigma
    assert evaluate(rule, (0.06, 100), b).active
    lengths = RuleSpec(name="m", signal="output_tokens_mean", adaptive=True)
    b = Baseline(mean=math.log(200.0), var=0.0, n=10)  # lengths: log space, 5 % floor
    assert b.z(lengths, 220.0, 50) == pytest.approx(math.log(1.1) / math.log(1.05))


def test_evaluate_static_and_adaptive() -> None:
    static = RuleSpec(name="s", signal="findings.pii", threshold=0.05, min_samples=20)
    assert not evaluate(static, (0.5, 19), None).active  # too few samples
    assert evaluate(static, (0.06, 20), None).active
    assert not evaluate(static, (0.05, 20), None).active
    assert evaluate(static, (0.045, 20), None, firing=True).active  # hysteresis: resolves below 4 %
    assert not evaluate(static, (0.039, 20), None, firing=True).active
    below = RuleSpec(name="b", signal="output_tokens_mean", threshold=5, direction="below", min_samples=1)
    assert evaluate(below, (4.0, 10), None).active and not evaluate(below, (6.0, 10), None).active
    adaptive = RuleSpec(name="a", signal="latency_p95", adaptive=True, sigmas=4, min_samples=10, warmup_windows=5)
    b = Baseline(mean=0.0, var=0.0025, n=4)  # log space: a median of 1 s, 5 % spread
    v = evaluate(adaptive, (2.0, 50), b)
    assert not v.active and v.warming
    b.n = 5
    v = evaluate(adaptive, (2.0, 50), b)
    assert v.active and v.z == pytest.approx(math.log(2) / 0.05) and v.mean == 1.0
    assert not evaluate(adaptive, (math.exp(0.15), 50), b).active  # 3 sd
    assert not evaluate(adaptive, (0.5, 50), b).active  # above only
    assert evaluate(adaptive, (math.exp(0.15), 50), b, firing=True).active  # hysteresis: down to 2 sd
    assert not evaluate(adaptive, (math.exp(0.09), 50), b, firing=True).active
    both = RuleSpec(name="o", signal="output_tokens_mean", adaptive=True, min_samples=1, warmup_windows=1)
    assert evaluate(both, (0.5, 50), Baseline(mean=0.0, var=0.0025, n=5)).active  # lengths: both sides
    gated = RuleSpec(name="g", signal="findings.pii", adaptive=True, threshold=0.5, min_samples=1, warmup_windows=1)
    assert not evaluate(gated, (0.2, 100), Baseline(mean=0.0, var=0.0, n=5)).active  # deviates, under threshold


# --- the lifecycle ------------------------------------------------------------------------------


PII = RuleSpec(name="PIILeak", signal="findings.pii", threshold=0.2, window_seconds=10, min_samples=5,
               severity="critical")


def feed(eng: AlertEngine, clock: Clock, n: int, dt: float = 0.1, **kw: Any) -> None:
    for _ in range(n):
        clock.t += dt
        eng.observe(exchange(**kw))


def test_lifecycle_fire_dedupe_renotify_resolve_cooldown() -> None:
    eng, rec, clock = engine([PII], renotify_interval_seconds=60, cooldown_seconds=30)

    async def main() -> None:
        feed(eng, clock, 30)
        await eng.tick()
        assert rec.sent == [] and eng.active() == []
        feed(eng, clock, 100, detectors=("pii",))
        await eng.tick()
        assert rec.sent == [("firing", "PIILeak")]
        alert = rec.notes[0].alert
        assert alert["labels"] == {"alertname": "PIILeak", "severity": "critical", "route": "chat",
                                   "model": "sim-echo", "signal": "findings.pii", "detector": "pii",
                                   "source": "gapwatch"}
        assert alert["fingerprint"] == fingerprint(alert["labels"])
        assert alert["endsAt"] is None and alert["expiresAt"] > alert["startsAt"]
        assert "findings.pii is 100.00%" in alert["annotations"]["summary"]
        for _ in range(5):  # still firing: no duplicates
            feed(eng, clock, 10, detectors=("pii",))
            await eng.tick()
        assert rec.sent == [("firing", "PIILeak")]
        clock.t += 61
        feed(eng, clock, 10, detectors=("pii",))
        await eng.tick()
        assert rec.sent == [("firing", "PIILeak")] * 2  # re-notified after the interval
        assert [a["fingerprint"] for a in eng.active()] == [alert["fingerprint"]]
        feed(eng, clock, 100)  # clean traffic fills the window
        await eng.tick()
        assert rec.sent[-1] == ("resolved", "PIILeak") and eng.active() == []
        resolved = rec.notes[-1].alert
        assert resolved["endsAt"] is not None and resolved["startsAt"] == alert["startsAt"]
        feed(eng, clock, 100, detectors=("pii",))  # within the cooldown: quiet
        await eng.tick()
        assert len(rec.sent) == 3 and eng.active() == []
        clock.t += 31
        feed(eng, clock, 60, detectors=("pii",))
        await eng.tick()
        assert rec.sent[-1] == ("firing", "PIILeak") and len(rec.sent) == 4
        events = [h["event"] for h in eng.history(10)]
        assert events == ["firing", "resolved", "firing"]

    run(main())


def test_too_few_samples_resolve_and_no_fire() -> None:
    eng, rec, clock = engine([PII])

    async def main() -> None:
        feed(eng, clock, 4, detectors=("pii",))
        await eng.tick()
        assert rec.sent == []
        feed(eng, clock, 10, detectors=("pii",))
        await eng.tick()
        assert rec.sent == [("firing", "PIILeak")]
        summary = eng.active()[0]["annotations"]["summary"]
        clock.t += 10
        feed(eng, clock, 2)  # a trickle: too little evidence either way, the alert holds
        await eng.tick()
        assert rec.sent == [("firing", "PIILeak")] and eng.active()[0]["annotations"]["summary"] == summary
        clock.t += 100  # traffic stops: the window is empty, the alert resolves
        await eng.tick()
        assert rec.sent[-1] == ("resolved", "PIILeak")

    run(main())


def test_wildcard_rule_alerts_per_detector() -> None:
    rule = RuleSpec(name="AnyFinding", signal="findings.*", threshold=0.3, window_seconds=10, min_samples=5)
    eng, rec, clock = engine([rule])

    async def main() -> None:
        feed(eng, clock, 20, detectors=("pii", "secrets"))
        feed(eng, clock, 20, detectors=("pii",))
        await eng.tick()
        got = sorted(n.alert["labels"]["detector"] for n in rec.notes if not n.refresh)
        assert got == ["pii", "secrets"]
        feed(eng, clock, 100, detectors=("pii",))  # secrets disappears from the window: resolves
        await eng.tick()
        later = [(n.status, n.alert["labels"]["detector"]) for n in rec.notes[2:] if not n.refresh]
        assert later == [("resolved", "secrets")]

    run(main())


def test_series_are_per_route_and_model() -> None:
    eng, rec, clock = engine([PII])

    async def main() -> None:
        feed(eng, clock, 20, detectors=("pii",), model="gpt-4o")
        feed(eng, clock, 20, model="llama-3")
        await eng.tick()
        assert [n.alert["labels"]["model"] for n in rec.notes if not n.refresh] == ["gpt-4o"]

    run(main())


def test_adaptive_rule_learns_then_fires_on_a_step() -> None:
    rule = RuleSpec(name="Latency", signal="latency_p95", adaptive=True, sigmas=4, window_seconds=10,
                    min_samples=20, warmup_windows=5)
    eng, rec, clock = engine([rule])
    rnd = random.Random(7)

    async def main() -> None:
        for _ in range(20):  # 20 windows of normal latency, one tick per window
            for _ in range(50):
                clock.t += 0.2
                eng.observe(exchange(latency=rnd.uniform(0.2, 0.3)))
            await eng.tick()
        assert rec.sent == []
        b = eng.baselines()["Latency|chat|sim-echo|latency_p95"]
        assert b["n"] >= 15 and 0.27 < math.exp(b["mean"]) < 0.32  # kept in log space
        for _ in range(50):
            clock.t += 0.2
            eng.observe(exchange(latency=rnd.uniform(0.6, 0.7)))
        await eng.tick()
        assert rec.sent == [("firing", "Latency")]
        ann = rec.notes[0].alert["annotations"]
        assert ann["baseline"].endswith("ms") and float(ann["sigmas"]) > 4
        assert [n.refresh for n in rec.notes] == [False]  # no keep-alive in the tick that notified

    run(main())


def test_replicas_sharing_state_notify_once() -> None:
    cfg = config()
    metrics = Metrics()
    clock = Clock()
    state = MemoryState(cfg, metrics, clock)  # the same protocol the Redis scripts run
    a, rec_a, _ = engine([PII], state=state, clock=clock, metrics=metrics, replica_id="a")
    b, rec_b, _ = engine([PII], state=state, clock=clock, metrics=metrics, replica_id="b")

    async def main() -> None:
        for eng in (a, b):
            feed(eng, clock, 20, detectors=("pii",))
        await a.tick()
        await b.tick()
        assert rec_a.sent == [("firing", "PIILeak")] and rec_b.sent == []
        assert [x["notified"] for x in b.active()] == [False]
        feed(a, clock, 200, dt=0.01)
        await a.tick()  # a recovers, b still sees it: nobody sends resolved
        assert rec_a.sent == [("firing", "PIILeak")] and rec_b.sent == [] and a.active() == []
        feed(b, clock, 200, dt=0.01)
        await b.tick()  # the last replica resolves it
        assert rec_b.sent == [("resolved", "PIILeak")]

    run(main())


def test_alertmanager_keepalive_refresh() -> None:
    eng, rec, clock = engine([PII], resend_interval_seconds=5)

    async def main() -> None:
        feed(eng, clock, 20, detectors=("pii",))
        await eng.tick()
        clock.t += 6
        feed(eng, clock, 20, detectors=("pii",))
        await eng.tick()
        refresh = [n for n in rec.notes if n.refresh]
        assert len(refresh) >= 1 and all(n.status == "firing" for n in refresh)
        assert rec.sent == [("firing", "PIILeak")]

    run(main())


def test_observe_never_raises_and_counts() -> None:
    metrics = Metrics()
    eng, _, _ = engine([PII], metrics=metrics)
    eng.observe(SimpleNamespace(endpoint="chat"))  # a broken event
    eng.observe(exchange(endpoint="models"))
    assert metric_value(metrics.registry, "gapwatch_telemetry_errors_total", component="alerts") == 1


def test_firing_gauge_and_notification_counter() -> None:
    metrics = Metrics()
    eng, _, clock = engine([PII], metrics=metrics)

    async def main() -> None:
        feed(eng, clock, 20, detectors=("pii",))
        await eng.tick()

    run(main())
    assert metric_value(metrics.registry, "gapwatch_alerts_firing", rule="PIILeak") == 1
    assert metric_value(metrics.registry, "gapwatch_alert_notifications_total", sink="log") == 1
    assert metric_value(metrics.registry, "gapwatch_state_backend_up", backend="memory") == 1


def test_series_count_is_bounded() -> None:
    eng, _, _ = engine([PII])
    for i in range(1500):
        eng.observe(exchange(model=f"m{i}"))
    assert len(eng._series) == 1024 and eng.dropped_series == 476


def test_observe_is_cheap() -> None:
    """One observe with three windows stays well under 20 µs on the shared CI machine."""
    import time

    rules = [PII, RuleSpec(name="L", signal="latency_p95", adaptive=True, window_seconds=300),
             RuleSpec(name="E", signal="upstream_error_rate", threshold=0.1, window_seconds=60)]
    eng, _, _ = engine(rules)
    ex = exchange(detectors=("pii",), classification="answered")
    eng.observe(ex)
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        eng.observe(ex)
    per = (time.perf_counter() - t0) / n
    assert per < 20e-6, f"observe took {per * 1e6:.1f} µs"


def test_build_state_memory() -> None:
    st = build_state(config())
    assert isinstance(st, MemoryState) and st.backend == "memory" and st.up


def test_engine_start_stop_runs_ticks() -> None:
    cfg = config()
    metrics = Metrics()
    rule = RuleSpec(name="PIILeak", signal="findings.pii", threshold=0.2, window_seconds=1, min_samples=3)
    rec = Recorder()
    eng = AlertEngine(cfg, metrics, MemoryState(cfg, metrics), dispatcher=rec,  # type: ignore[arg-type]
                      settings=AlertSettings(rules=(rule,), evaluation_interval_seconds=0.05))

    async def main() -> None:
        eng.start()
        for _ in range(5):
            eng.observe(exchange(detectors=("pii",)))
        for _ in range(40):
            await asyncio.sleep(0.05)
            if rec.sent:
                break
        await eng.stop()

    run(main())
    assert rec.sent == [("firing", "PIILeak")]


# --- false alarms on stable traffic -------------------------------------------------------------


def test_default_rules_stay_quiet_on_stable_traffic() -> None:
    """Stable binomial finding rates and log-normal latencies over 600 windows and 4 seeds:
    the default adaptive rules (12 windows warm-up) raise no alert. The drift simulation
    (scripts/plot_drift.py) measures the same through the whole engine on 30 days."""
    rules = {r.signal: r for r in DEFAULT_RULES}
    alarms = 0
    for seed in range(4):
        rnd = random.Random(seed)
        for sig, draw in (("findings.*", lambda n, r=rnd: sum(r.random() < 0.02 for _ in range(n)) / n),
                          ("latency_p95", lambda n, r=rnd: math.exp(r.gauss(0.0, 0.08)))):
            rule = rules[sig]
            b = Baseline()
            for _ in range(600):
                n = rnd.randint(60, 140)
                x = draw(n)
                v = evaluate(rule, (x, n), b)
                alarms += v.active
                learn(rule, b, x, n)
    assert alarms == 0
