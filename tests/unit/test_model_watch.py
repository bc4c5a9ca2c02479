"""Model identity tracking (``proxy.model_watch``) and the ``model_changed`` event alert, with
synthetic exchanges, a fresh metrics registry and a fake clock (no network)."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy import model_watch
from proxy.alerts import AlertEngine, AlertSettings
from proxy.exchange import Exchange
from proxy.metrics import Metrics, ModelLabel
from proxy.model_watch import ModelChange, ModelIdentity, ModelWatch, clean
from proxy.state_redis import MemoryState
from tests.conftest import metric_value
from tests.unit.test_alerts import Clock, Recorder, config


def ex(model: str | None = "gpt-4o-2024-08-06", fp: str | None = "fp_a", *, route: str = "chat",
       requested: str = "gpt-4o", status: int = 200, endpoint: str = "chat") -> Exchange:
    e = Exchange(request_id="r", method="POST", path="/v1/chat/completions", endpoint=endpoint)
    e.route, e.model, e.model_label, e.status = route, requested, requested, status
    e.response_model, e.system_fingerprint = model, fp
    return e


def watch(confirm: int = 2, metrics: Metrics | None = None) -> ModelWatch:
    return ModelWatch(ModelLabel(["gpt-4o*"]), metrics, confirm_responses=confirm, clock=lambda: 1.7e9)


def info(m: Metrics, fp: str, model: str = "gpt-4o-2024-08-06") -> float:
    return metric_value(m.registry, "gapwatch_upstream_model_info", route="chat", model="gpt-4o",
                        response_model=model, system_fingerprint=fp)


def test_a_change_is_confirmed_by_consecutive_responses() -> None:
    w = watch(confirm=3)
    assert w.observe(ex()) is None  # first sight: the starting identity, not a change
    assert [w.observe(ex(fp="fp_b")) for _ in range(2)] == [None, None]
    assert w.observe(ex()) is None  # back to fp_a: the streak is over
    assert [w.observe(ex(fp="fp_b")) for _ in range(2)] == [None, None]
    change = w.observe(ex(fp="fp_b"))
    assert change == ModelChange("chat", "gpt-4o", ModelIdentity("gpt-4o-2024-08-06", "fp_a"),
                                 ModelIdentity("gpt-4o-2024-08-06", "fp_b"), 1.7e9, 3)
    assert w.observe(ex(fp="fp_b")) is None  # now the identity in use
    assert w.changes() == [change.as_dict()]
    assert w.changes()[0]["before"] == {"response_model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_a"}


def test_model_name_change_and_missing_fields() -> None:
    w = watch(confirm=1)
    assert w.observe(ex(fp=None)) is None
    assert w.observe(ex()) is None  # a fingerprint reported for the first time is adopted
    assert w.observe(ex(fp=None)) is None  # one left out is no change either
    got = w.observe(ex(model="gpt-4o-2024-11-20", fp=None))  # a new dated model name is
    assert got is not None and got.before.model == "gpt-4o-2024-08-06" and got.after == ModelIdentity(
        "gpt-4o-2024-11-20", "fp_a")
    assert w.observe(ex(model=None, fp=None)) is None  # nothing reported: not an observation
    for e in (ex(fp="fp_x", status=500), ex(fp="fp_x", endpoint="embeddings")):
        assert w.observe(e) is None
    assert [c["after"]["response_model"] for c in w.changes()] == ["gpt-4o-2024-11-20"]


def test_each_route_and_requested_model_is_its_own_series() -> None:
    w = watch(confirm=1)
    w.observe(ex())
    w.observe(ex(model="gpt-4o-mini-2024-07-18", fp="fp_m", requested="gpt-4o-mini"))
    w.observe(ex(route="batch"))
    assert w.observe(ex(model="gpt-4o-mini-2024-07-18", fp="fp_m")) is not None  # gpt-4o now answered by mini
    assert w.observe(ex(model="gpt-4o-mini-2024-07-18", fp="fp_m", requested="gpt-4o-mini")) is None
    assert w.observe(ex(route="batch")) is None
    assert {(c["route"], c["model"], c["system_fingerprint"]) for c in w.current()} == {
        ("chat", "gpt-4o", "fp_m"), ("chat", "gpt-4o-mini", "fp_m"), ("batch", "gpt-4o", "fp_a")}


def test_info_metric_shows_both_identities_and_stays_bounded() -> None:
    m = Metrics()
    w = watch(confirm=1, metrics=m)
    w.observe(ex())
    assert info(m, "fp_a") == 1 and metric_value(m.registry, "gapwatch_model_changes_total") == 0
    w.observe(ex(fp="fp_b"))
    assert info(m, "fp_a") == 0 and info(m, "fp_b") == 1
    assert metric_value(m.registry, "gapwatch_model_changes_total", route="chat", model="gpt-4o") == 1
    for i in range(40):  # a flapping upstream: the series per route and model stay capped
        w.observe(ex(fp=f"fp_{i}"))
    series = [s for f in m.registry.collect() if f.name == "gapwatch_upstream_model_info" for s in f.samples]
    assert len(series) == model_watch.SERIES_PER_GROUP and info(m, "fp_39") == 1
    assert sum(s.value for s in series) == 1
    # a reported name outside the allow-list is "other"; an odd fingerprint is cleaned
    w.observe(ex(model="some-other-model", fp="fp\n<b>"))
    assert metric_value(m.registry, "gapwatch_upstream_model_info", response_model="other",
                        system_fingerprint="fp__b_") == 1
    assert clean("x" * 100) == "x" * model_watch.MAX_VALUE_CHARS and clean("") is None


def test_tracked_pairs_are_bounded() -> None:
    m = Metrics()
    w = watch(confirm=1, metrics=m)
    for i in range(model_watch.MAX_KEYS + 50):
        w.observe(ex(requested=f"gpt-4o-{i}", fp="fp_a"))
    assert len(w.current()) <= model_watch.MAX_KEYS


# --- the model_changed alert ------------------------------------------------------------------

CHANGE = ModelChange("chat", "gpt-4o", ModelIdentity("gpt-4o-2024-08-06", "fp_a"),
                     ModelIdentity("gpt-4o-2024-08-06", "fp_b"), 1.7e9, 3)


def engine(state: Any = None, clock: Clock | None = None, replica: str = "r1", **model_change: Any
           ) -> tuple[AlertEngine, Recorder, Clock]:
    cfg = config(model_change=model_change) if model_change else config()
    clock = clock or Clock()
    metrics = Metrics()
    rec = Recorder()
    eng = AlertEngine(cfg, metrics, state if state is not None else MemoryState(cfg, metrics, clock),
                      settings=AlertSettings(rules=(), evaluation_interval_seconds=1.0, replica_id=replica,
                                             cooldown_seconds=60.0), clock=clock,
                      wall=lambda: 1.7e9 + clock.t, dispatcher=rec)  # type: ignore[arg-type]
    return eng, rec, clock


def test_model_changed_fires_once_holds_then_resolves() -> None:
    eng, rec, clock = engine(hold_seconds=600, severity="critical", labels={"team": "ml"})

    async def main() -> None:
        await eng._fire_change(CHANGE)
        await eng._fire_change(CHANGE)  # the same change again (e.g. seen twice): one alert
        assert rec.sent == [("firing", "model_changed")]
        alert = rec.notes[0].alert
        assert alert["labels"]["severity"] == "critical" and alert["labels"]["team"] == "ml"
        assert alert["labels"]["system_fingerprint"] == "fp_b" and alert["labels"]["route"] == "chat"
        assert alert["annotations"]["before_system_fingerprint"] == "fp_a"
        assert alert["annotations"]["after_system_fingerprint"] == "fp_b"
        assert [a["labels"]["alertname"] for a in eng.active()] == ["model_changed"]
        clock.t += 599
        await eng._event_housekeeping()
        assert rec.sent == [("firing", "model_changed")]
        clock.t += 2
        await eng._event_housekeeping()
        assert rec.sent == [("firing", "model_changed"), ("resolved", "model_changed")]
        assert eng.active() == [] and [h["event"] for h in eng.history()] == ["resolved", "firing"]

    asyncio.run(main())


def test_replicas_sharing_state_notify_model_changes_once() -> None:
    clock = Clock()
    cfg = config()
    state = MemoryState(cfg, Metrics(), clock)
    a, rec_a, _ = engine(state, clock, "a")
    b, rec_b, _ = engine(state, clock, "b")

    async def main() -> None:
        await a._fire_change(CHANGE)
        await b._fire_change(CHANGE)  # every replica sees the same change
        assert rec_a.sent == [("firing", "model_changed")] and rec_b.sent == []

    asyncio.run(main())


def test_model_changed_through_the_running_engine_and_disabled() -> None:
    eng, rec, _ = engine()

    async def main() -> None:
        eng.start()
        eng.model_changed(CHANGE)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if rec.sent:
                break
        await eng.stop()

    asyncio.run(main())
    assert rec.sent == [("firing", "model_changed")]

    off, rec_off, _ = engine(enabled=False)

    async def quiet() -> None:
        off.start()
        off.model_changed(CHANGE)
        await asyncio.sleep(0.05)
        await off.stop()

    asyncio.run(quiet())
    assert rec_off.sent == []
