"""Which model the upstream says answered: per route and requested model, the reported model
name and ``system_fingerprint``, and the moment either changes.

Why: a provider can update the model behind an alias without notice (a new dated model name
in the response, or a new ``system_fingerprint``), and that is exactly when the evaluation
suite should run again. Every finished exchange that carries either value is one observation
(``ModelWatch.observe``, after the response has been sent; O(1), no I/O): the responses
gapwatch parses, which are every stream and every non-streamed answer on a route whose
policy runs detectors (a route with an empty policy relays its non-streamed bodies unread).
A new identity counts as a change once ``confirm_responses`` consecutive responses report
it, so one odd response (a canary backend, a retry served elsewhere) is not a model update. Fields the
upstream leaves out are not a change: a response without a fingerprint keeps the one seen
before, and a fingerprint that appears for the first time is adopted silently.

What comes out:

- ``gapwatch_upstream_model_info{route, model, response_model, system_fingerprint}``: 1 for
  the identity a (route, requested model) is on now, 0 for the ones it left (kept so a graph
  shows both sides of a change; at most ``SERIES_PER_GROUP`` per route and model label);
- ``gapwatch_model_changes_total{route, model}``: confirmed changes (the Grafana scorecard
  marks them as annotations);
- ``observe`` returns the ``ModelChange``; the caller hands it to the alert engine
  (``AlertEngine.model_changed``), which raises the ``model_changed`` alert;
- ``changes()`` and ``current()``: the recent changes and the identities now in use, for
  ``GET /admin/model-changes`` and the built-in dashboard.

Bounded: label values are the configured routes, the model allow-list (for both the
requested and the reported model), and fingerprints cleaned to a short token; at most
``MAX_KEYS`` (route, requested model) pairs are tracked (least recently seen dropped first).
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

LLM_ENDPOINTS = frozenset({"chat", "completions", "responses"})
MAX_KEYS = 256
SERIES_PER_GROUP = 8
HISTORY = 100
MAX_VALUE_CHARS = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/@+\-]")


def clean(value: str | None) -> str | None:
    """An upstream-reported identifier as a short printable token (labels, alerts, JSON)."""
    if not value:
        return None
    return _UNSAFE.sub("_", value[:MAX_VALUE_CHARS])


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """What the upstream reported: the response's ``model`` and ``system_fingerprint``."""

    model: str | None
    system_fingerprint: str | None

    def as_dict(self) -> dict[str, str | None]:
        return {"response_model": self.model, "system_fingerprint": self.system_fingerprint}


@dataclass(frozen=True, slots=True)
class ModelChange:
    """A confirmed change of identity for one route and requested model (``model`` is the
    requested model's bounded label)."""

    route: str
    model: str
    before: ModelIdentity
    after: ModelIdentity
    at: float  # Unix seconds of the response that confirmed it
    responses: int  # consecutive responses that reported the new identity

    def as_dict(self) -> dict[str, Any]:
        return {"at": _iso(self.at), "route": self.route, "model": self.model,
                "before": self.before.as_dict(), "after": self.after.as_dict(), "responses": self.responses}


@dataclass(slots=True)
class _Track:
    """One (route, requested model): the identity it is on and the one it may be moving to."""

    route: str
    label: str
    current: ModelIdentity
    since: float
    candidate: ModelIdentity | None = None
    streak: int = 0


@dataclass
class ModelWatch:
    """Observes finished exchanges; see the module docstring. ``model_label`` maps a model
    name to its bounded label (the gateway's allow-list); ``metrics`` is ``proxy.metrics.Metrics``
    (None: no metrics, for tests of the logic alone)."""

    model_label: Callable[[str], str]
    metrics: Any = None
    confirm_responses: int = 3
    clock: Callable[[], float] = time.time
    _tracks: OrderedDict[tuple[str, str], _Track] = field(default_factory=OrderedDict)
    _history: deque[ModelChange] = field(default_factory=lambda: deque(maxlen=HISTORY))
    _refs: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    _series: dict[tuple[str, str], list[tuple[str, str, str, str]]] = field(default_factory=dict)

    def observe(self, ex: Any) -> ModelChange | None:
        """One finished exchange; the change it confirmed, if any."""
        if ex.endpoint not in LLM_ENDPOINTS or not 200 <= ex.status < 300:
            return None
        seen = ModelIdentity(clean(ex.response_model), clean(getattr(ex, "system_fingerprint", None)))
        if seen.model is None and seen.system_fingerprint is None:
            return None
        key = (ex.route, ex.model[:128])
        track = self._tracks.get(key)
        if track is None:
            self._admit(key, ex.route, ex.model_label, seen)
            return None
        self._tracks.move_to_end(key)
        return self._step(track, seen)

    def _admit(self, key: tuple[str, str], route: str, label: str, seen: ModelIdentity) -> None:
        if len(self._tracks) >= MAX_KEYS:
            _, old = self._tracks.popitem(last=False)
            self._release(old)
        track = self._tracks[key] = _Track(route, label, seen, self.clock())
        self._hold(track)
        if self.metrics is not None:
            self.metrics.model_changes.labels(route, label)  # 0 until the first change

    def _step(self, track: _Track, seen: ModelIdentity) -> ModelChange | None:
        cur = track.current
        same_model = seen.model is None or cur.model is None or seen.model == cur.model
        same_fp = seen.system_fingerprint is None or cur.system_fingerprint is None \
            or seen.system_fingerprint == cur.system_fingerprint
        if same_model and same_fp:
            track.candidate, track.streak = None, 0
            filled = ModelIdentity(cur.model or seen.model, cur.system_fingerprint or seen.system_fingerprint)
            if filled != cur:  # a field reported for the first time: adopted, not a change
                self._move(track, filled)
            return None
        new = ModelIdentity(seen.model or cur.model, seen.system_fingerprint or cur.system_fingerprint)
        if new == track.candidate:
            track.streak += 1
        else:
            track.candidate, track.streak = new, 1
        if track.streak < self.confirm_responses:
            return None
        change = ModelChange(track.route, track.label, cur, new, self.clock(), track.streak)
        track.candidate, track.streak = None, 0
        self._move(track, new)
        track.since = change.at
        self._history.appendleft(change)
        if self.metrics is not None:
            self.metrics.model_changes.labels(track.route, track.label).inc()
        return change

    # -- the info metric -------------------------------------------------------------------------

    def _labels(self, track: _Track, ident: ModelIdentity) -> tuple[str, str, str, str]:
        rm = self.model_label(ident.model) if ident.model else "none"
        return (track.route, track.label, rm, ident.system_fingerprint or "none")

    def _move(self, track: _Track, new: ModelIdentity) -> None:
        self._release(track)
        track.current = new
        self._hold(track)

    def _hold(self, track: _Track) -> None:
        labels = self._labels(track, track.current)
        self._refs[labels] = self._refs.get(labels, 0) + 1
        if self.metrics is None:
            return
        group = self._series.setdefault(labels[:2], [])
        if labels in group:
            group.remove(labels)
        group.append(labels)
        self.metrics.model_info.labels(*labels).set(1)
        while len(group) > SERIES_PER_GROUP:  # the oldest identity nobody is on any more goes
            stale = next((s for s in group if not self._refs.get(s)), None)
            if stale is None:
                break
            group.remove(stale)
            self.metrics.model_info.labels(*stale).set(0)
            self.metrics.model_info.remove(*stale)

    def _release(self, track: _Track) -> None:
        labels = self._labels(track, track.current)
        n = self._refs.get(labels, 0) - 1
        if n > 0:
            self._refs[labels] = n
            return
        self._refs.pop(labels, None)
        if self.metrics is not None:
            self.metrics.model_info.labels(*labels).set(0)

    # -- accessors (admin endpoint, dashboard) ---------------------------------------------------

    def changes(self, limit: int = 100) -> list[dict[str, Any]]:
        """Confirmed changes, newest first."""
        return [c.as_dict() for c in list(self._history)[: max(0, limit)]]

    def current(self) -> list[dict[str, Any]]:
        """The identity each tracked (route, requested model label) is on, most recently seen
        last. Requested models sharing a label (``other``) appear once per identity."""
        out: dict[tuple[str, str, ModelIdentity], dict[str, Any]] = {}
        for t in self._tracks.values():
            out[(t.route, t.label, t.current)] = {"route": t.route, "model": t.label, **t.current.as_dict(),
                                                  "since": _iso(t.since)}
        return list(out.values())
