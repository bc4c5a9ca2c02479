"""``cross_tenant``: an output for tenant B reproduces context (documents, system prompts) that
tenant A sent recently.

How: when a request arrives the proxy computes its fingerprints with
``fingerprints_for_request`` (hashed k-word shingles of long enough messages of the chosen
roles, minus boilerplate) and registers them for the tenant with a TTL. Before a response
starts it puts a ``FingerprintIndex`` in ``ctx.shared["cross_tenant"]``. The detector hashes
the output's shingles incrementally and asks the index who owns each one.

A shingle counts against tenant A when A owns it, the current tenant does not (shared public
text registered by both is not a leak), it is not in this request's own messages (whatever
the request brought in is not someone else's), and fewer than ``common_owner_count``
tenants own it (text many tenants send is public boilerplate). One finding per other tenant
when ``min_shingles`` distinct shingles of that tenant matched, plus at most one ``final``
finding per tenant at finish when matching text continued (same rule as
``system_prompt_leak``). Findings name the source tenant (a config name, not a secret, and
the incident must say whose data leaked) in ``attrs["source_tenant"]`` and carry counts, never
A's text. The score is ``matched / (2 * min_shingles)`` capped at 1: 0.5 at the threshold, 1.0
at twice the threshold (the size of A's documents is unknown, so no fraction exists).

Requests without a tenant (pass-through mode) or without an index are not checked.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import ClassVar, Literal, Protocol, runtime_checkable

from pydantic import Field

from detectors.base import (
    Channel,
    ChannelState,
    Detector,
    DetectorConfig,
    Finding,
    Message,
    RequestContext,
    Severity,
    StreamEnd,
)
from detectors.prompt_leak import (
    OverlapTracker,
    Shingle,
    ShingleStream,
    boilerplate_shingles,
    countable_shingles,
    shingle_set,
    tokenize,
)
from detectors.redaction import placeholder

NAME = "cross_tenant"
DEFAULT_ROLES: tuple[str, ...] = ("system", "developer", "tool")
MAX_TRACKED_TENANTS = 64


def fingerprints_for_request(ctx: RequestContext, k: int = 5, *,
                             roles: Iterable[str] = DEFAULT_ROLES,
                             min_message_words: int = 20,
                             ignore_boilerplate: bool = True) -> set[int]:
    """Shingle hashes the proxy registers for ``ctx.tenant`` (pure; empty without a tenant).

    Only messages of ``roles`` with at least ``min_message_words`` words count: short messages
    are mostly boilerplate ("Be concise.") that every tenant sends. User messages are not in
    the default roles: what end users type is often public text (pasted articles), and a
    false alarm between tenants is expensive.
    """
    if not ctx.tenant:
        return set()
    wanted = frozenset(roles)
    boiler = boilerplate_shingles(k) if ignore_boilerplate else frozenset()
    out: set[int] = set()
    for msg in ctx.messages:
        if msg.role in wanted and _word_count(msg.text) >= min_message_words:
            out |= countable_shingles(msg.text, k, boiler)
    return out


@lru_cache(maxsize=256)
def _word_count(text: str) -> int:
    return len(tokenize(text))


@runtime_checkable
class FingerprintIndex(Protocol):
    """What the proxy puts in ``ctx.shared["cross_tenant"]``: which tenants registered a shingle
    hash (unexpired). Sync and in-process: detectors do no I/O on the hot path."""

    def owners(self, h: int) -> frozenset[str]: ...


_NOBODY: frozenset[str] = frozenset()


class MemoryFingerprintIndex:
    """In-process ``FingerprintIndex`` with a TTL and a bounded size. Thread-safe.

    Why generations: entries live in ``generations`` dicts of ``hash -> tenant bitmask``, each
    covering ``ttl_seconds / (generations - 1)`` of time. Expiry drops a whole dict (no per-entry
    timestamps, about 100 bytes per entry), a lookup is a handful of dict probes, and
    re-registering a shingle simply puts it in the current generation. An entry lives at least
    ``ttl_seconds`` and at most one generation span longer. When more than ``max_entries`` are
    held, the oldest generation is dropped early.
    """

    def __init__(self, ttl_seconds: float = 86400.0, max_entries: int = 1_000_000,
                 generations: int = 4, clock: Callable[[], float] = time.monotonic) -> None:
        if generations < 2:
            raise ValueError("generations must be at least 2")
        self._ttl = ttl_seconds
        self._span = ttl_seconds / (generations - 1)
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._gens: deque[tuple[float, dict[int, int]]] = deque([(clock(), {})])
        self._bits: dict[str, int] = {}
        self._names: list[str] = []
        self._owner_sets: dict[int, frozenset[str]] = {0: _NOBODY}

    def add(self, tenant: str, hashes: Iterable[int]) -> None:
        """Register ``hashes`` for ``tenant`` (refreshing their TTL)."""
        with self._lock:
            self._rotate(self._clock())
            bit = self._bits.get(tenant)
            if bit is None:
                bit = self._bits[tenant] = 1 << len(self._names)
                self._names.append(tenant)
            current = self._gens[-1][1]
            for h in hashes:
                if len(current) >= self._max:
                    self._gens.append((self._clock(), {}))
                    current = self._gens[-1][1]
                    self._evict()
                current[h] = current.get(h, 0) | bit
            self._evict()

    def owners(self, h: int) -> frozenset[str]:
        with self._lock:
            self._rotate(self._clock())
            mask = 0
            for _, gen in self._gens:
                mask |= gen.get(h, 0)
            if not mask:
                return _NOBODY
            owners = self._owner_sets.get(mask)
            if owners is None:
                owners = frozenset(n for i, n in enumerate(self._names) if mask >> i & 1)
                self._owner_sets[mask] = owners
            return owners

    def __len__(self) -> int:
        """Entries held (a hash registered in two generations counts twice)."""
        return sum(len(g) for _, g in self._gens)

    def _rotate(self, now: float) -> None:
        if now >= self._gens[-1][0] + self._span:
            self._gens.append((now, {}))
        # a generation takes entries for at most one span: drop it once its last possible
        # entry is ttl old (a fresh current generation is never dropped here)
        while self._gens[0][0] + self._span + self._ttl <= now:
            self._gens.popleft()

    def _evict(self) -> None:
        while len(self._gens) > 1 and len(self) > self._max:
            self._gens.popleft()


SeverityName = Literal["low", "medium", "high", "critical"]


class CrossTenantConfig(DetectorConfig):
    """Settings of ``cross_tenant``. ``shingle_words``, ``roles``, ``min_message_words`` also
    govern registration (``CrossTenantDetector.fingerprints_for_request``), and the proxy reads
    ``fingerprint_ttl_seconds``/``index_max_entries`` for its registry: keep them the same in
    every policy, since hashes of different window sizes never match."""

    detector_class: ClassVar[type[Detector]]

    shingle_words: int = Field(5, ge=2, le=16)
    min_shingles: int = Field(8, ge=1)
    roles: tuple[str, ...] = DEFAULT_ROLES
    min_message_words: int = Field(20, ge=1)
    common_owner_count: int = Field(3, ge=0)
    """Shingles owned by this many tenants or more are public text; 0 disables the rule."""
    max_gap_words: int = Field(40, ge=0)
    ignore_builtin_boilerplate: bool = True
    fingerprint_ttl_seconds: float = Field(86400.0, gt=0)
    index_max_entries: int = Field(1_000_000, ge=1)
    severity: SeverityName = "critical"
    lookback_chars: int = Field(0, ge=0)


class _Prepared:
    """Per-response facts. ``own`` (every shingle of this request's messages) is computed on
    the first shingle another tenant owns: most responses have none, and hashing long pasted
    context for every request would cost milliseconds. It depends only on the request, so
    when it is computed changes no finding."""

    __slots__ = ("_k", "_messages", "_own", "index", "tenant")

    def __init__(self, tenant: str, index: FingerprintIndex, messages: tuple[Message, ...],
                 k: int) -> None:
        self.tenant = tenant
        self.index = index
        self._messages = messages
        self._k = k
        self._own: frozenset[int] | None = None

    @property
    def own(self) -> frozenset[int]:
        if self._own is None:
            self._own = frozenset().union(*(shingle_set(m.text, self._k) for m in self._messages))
        return self._own


class CrossTenantDetector(Detector):
    name = NAME

    def __init__(self, config: DetectorConfig) -> None:
        assert isinstance(config, CrossTenantConfig)
        super().__init__(config)
        self.cfg = config
        self._severity = Severity[config.severity]

    @property
    def lookback_chars(self) -> int:
        return self.cfg.lookback_chars

    def fingerprints_for_request(self, ctx: RequestContext) -> set[int]:
        """``fingerprints_for_request`` with this config's settings: what the proxy registers."""
        cfg = self.cfg
        return fingerprints_for_request(ctx, cfg.shingle_words, roles=cfg.roles,
                                        min_message_words=cfg.min_message_words,
                                        ignore_boilerplate=cfg.ignore_builtin_boilerplate)

    def prepare(self, ctx: RequestContext) -> _Prepared | None:
        index = ctx.shared.get(NAME)
        if not ctx.tenant or index is None:
            return None
        return _Prepared(ctx.tenant, index, ctx.messages, self.cfg.shingle_words)

    def open_channel(self, prepared: _Prepared | None, channel: Channel) -> ChannelState | None:
        if prepared is None:
            return None
        return _CrossTenantState(self, prepared, channel)


class _CrossTenantState(ChannelState):
    __slots__ = ("_channel", "_det", "_done", "_fed", "_p", "_stream", "_tracks")

    def __init__(self, det: CrossTenantDetector, prepared: _Prepared, channel: Channel) -> None:
        self._det = det
        self._p = prepared
        self._channel = channel
        self._stream = ShingleStream(det.cfg.shingle_words)
        self._tracks: dict[str, OverlapTracker] = {}  # insertion order = first match order
        self._done = False
        self._fed = 0

    def feed(self, text: str) -> list[Finding]:
        self._fed += len(text)
        return self._consume(self._stream.feed(text))

    def safe_point(self) -> int:
        """A finding spans from its region's first matched shingle: so the start of every
        region that can still cross the threshold (or, once crossed, grow a tail), and the
        start of the next shingle (its first word may already be here)."""
        if self._done:
            return self._fed
        point = self._stream.pending_start()
        next_word = self._stream.words + 1
        gap = self._det.cfg.max_gap_words
        for track in self._tracks.values():
            if track.fired_end is None:
                if next_word - track.last_word <= gap and track.start < point:
                    point = track.start  # still within reach of its next match
            elif track.tail_start is not None and track.tail_start < point:
                point = track.tail_start
        return min(point, self._fed)

    def finish(self, end: StreamEnd) -> list[Finding]:
        if self._done:
            return []
        self._done = True
        out = self._consume(self._stream.finish())
        for tenant, track in self._tracks.items():
            tail = track.tail()
            if tail is not None:
                out.append(self._finding(tenant, track, tail, "final"))
        return out

    def _consume(self, shingles: Iterable[Shingle]) -> list[Finding]:
        out: list[Finding] = []
        cfg, p, tracks = self._det.cfg, self._p, self._tracks
        for sh in shingles:
            owners = p.index.owners(sh[0])
            if not owners or p.tenant in owners:
                continue
            if cfg.common_owner_count and len(owners) >= cfg.common_owner_count:
                continue
            if sh[0] in p.own:
                continue
            for tenant in sorted(owners):
                track = tracks.get(tenant)
                if track is None:
                    if len(tracks) >= MAX_TRACKED_TENANTS:
                        continue
                    track = tracks[tenant] = OverlapTracker()
                track.hit(sh, cfg.max_gap_words)
                if track.fired_end is None and track.count >= cfg.min_shingles:
                    out.append(self._finding(tenant, track, track.fire(), "threshold"))
        return out

    def _finding(self, tenant: str, track: OverlapTracker, span: tuple[int, int],
                 stage: str) -> Finding:
        n = track.count
        return Finding(
            detector=NAME,
            category="cross_tenant",
            severity=self._det._severity,
            score=min(1.0, n / (2 * self._det.cfg.min_shingles)),
            message=f"output reproduces {n} word shingles registered by another tenant",
            span=span,
            channel=self._channel,
            evidence=f"{n} shingles of another tenant",
            replacement=placeholder("cross_tenant"),
            attrs={"source_tenant": tenant, "matched_shingles": n,
                   "other_tenants": len(self._tracks), "stage": stage},
        )


CrossTenantConfig.detector_class = CrossTenantDetector

CONFIGS: dict[str, type[DetectorConfig]] = {NAME: CrossTenantConfig}

