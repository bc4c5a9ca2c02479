"""Detectors -> findings -> actions, per response; and how far each channel may be released.

``Policy`` is built once per configured policy (detectors constructed from validated config,
hold-back bound sized). ``ResponsePipeline`` is created per response: it feeds every channel's
new text to every detector, turns findings into actions, records redactions, and says up to
where each channel is proven safe (``release_line``). It is synchronous and does no I/O; the
relay (``proxy.relay``, with the held events of ``proxy.holdback``) decides which events go out.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from detectors.base import (
    Channel,
    ChannelState,
    Detector,
    Finding,
    RequestContext,
    ResponseState,
    Severity,
    StreamEnd,
)
from proxy.config import DetectorEntry, PolicyConfig

UNBOUNDED = 1 << 60

# A detector whose findings can only be observed or annotated (never change or stop the
# output) is fed per this many characters of a channel rather than per delta: its findings
# come at most that much text later (about 60 tokens: an annotation comment arrives that much
# after the text it is about; the end of a channel feeds what is left), and a streamed 2 KB
# answer, ~400 deltas, costs the pipeline 8 calls instead of 400 (issue 3).
OBSERVE_BATCH_CHARS = 256


class Flow(enum.Enum):
    """What the relay does next (named flow-control values, never booleans)."""

    CONTINUE = "continue"
    BLOCK = "block"
    RETRY = "retry"


@dataclass(frozen=True, slots=True)
class Applied:
    """A finding with the action the policy took (``action``) and the one it would have taken
    without shadow mode or severity thresholds (``intended``)."""

    finding: Finding
    action: str
    intended: str


@dataclass(frozen=True)
class Policy:
    name: str
    config: PolicyConfig
    entries: tuple[DetectorEntry, ...]
    detectors: tuple[Detector, ...]
    holdback_chars: int  # the bound: no character is held longer than this behind the end
    rewrites: bool  # text may change (redact) or be held: events go through the held queue
    enforcing: bool  # some action can change or stop the output
    max_attempts: int  # upstream attempts a retry action allows (1: no retry)
    wants_logprobs: bool
    # per entry: how many characters the pipeline may collect before calling the detector's
    # feed (see ``Detector.feed_batch_chars``; OBSERVE_BATCH_CHARS when its findings cannot
    # change the output; 1 when they can, since release waits for its safe point)
    feed_batches: tuple[int, ...] = ()
    # per entry: its findings can change or stop the output, so text waits for its safe point
    holds: tuple[bool, ...] = ()
    hold_tool_calls: bool = False  # tool-call arguments wait until the call is judged
    full_buffer: bool = False  # nothing is released before the response ends

    @classmethod
    def build(cls, name: str, config: PolicyConfig, entries: Sequence[DetectorEntry]) -> Policy:
        detectors = tuple(e.settings.build() for e in entries)
        holds = tuple(not config.shadow and e.action in ("redact", "block", "retry") for e in entries)
        enforcing = any(holds)
        if config.holdback_chars == "auto":
            hold = max((d.lookback_chars for e, d, h in zip(entries, detectors, holds, strict=True)
                        if h and (e.action in ("redact", "block") or e.then in ("redact", "block"))), default=0)
        else:
            hold = int(config.holdback_chars)
        if not enforcing:
            hold = 0
        full = config.buffer == "full" and enforcing
        if config.hold_tool_calls == "auto":
            tools = any(h and d.judges_tool_calls for d, h in zip(detectors, holds, strict=True))
        else:
            tools = enforcing and config.hold_tool_calls == "until_valid"
        # `then` is where a retry (or a redact without a span) falls back to
        redacts = enforcing and any(e.action == "redact" or e.then == "redact" for e in entries)
        batches = tuple(1 if h else OBSERVE_BATCH_CHARS if config.shadow or e.action in ("observe", "annotate")
                        else max(1, int(d.feed_batch_chars))
                        for e, d, h in zip(entries, detectors, holds, strict=True))
        return cls(name=name, config=config, entries=tuple(entries), detectors=detectors,
                   holdback_chars=UNBOUNDED if full else hold,
                   rewrites=enforcing and (hold > 0 or redacts or tools or full), enforcing=enforcing,
                   max_attempts=max((e.max_attempts for e in entries if e.action == "retry"), default=1),
                   wants_logprobs=any(d.wants_logprobs for d in detectors), feed_batches=batches,
                   holds=holds, hold_tool_calls=tools, full_buffer=full)

    @property
    def empty(self) -> bool:
        return not self.detectors


class ChannelLedger:
    """How far one channel's text has been released, and the redactions in what is not.

    The text itself travels in the held events (``proxy.holdback``); the ledger turns an
    event's original piece into what the client gets (``cut``). A redaction's placeholder goes
    out with the piece that holds the redaction's start; the rest of its span is dropped from
    the pieces after it, so nothing of the span leaks whatever the event boundaries.
    """

    __slots__ = ("changed", "emitted", "finished", "keep_emitted", "late", "redactions", "released", "total")

    def __init__(self, keep_emitted: bool = False) -> None:
        # released text is only kept where the wire format repeats it whole at the end
        # (Responses API `.done` events); elsewhere memory per response stays bounded
        self.keep_emitted = keep_emitted
        self.released = 0
        self.total = 0
        self.redactions: list[tuple[int, int, str]] = []  # sorted by start, disjoint
        self.finished = False
        self.late = 0  # redactions that began before `released` (the hold-back bound was passed)
        self.changed = False  # some redaction applied: text the wire repeats whole must be rebuilt
        self.emitted: list[str] = []

    def redact(self, start: int, end: int, replacement: str) -> None:
        end = min(end, self.total)
        if start < self.released:
            self.late += 1
            start = self.released
        if end <= start:
            return
        self.changed = True
        merged = [start, end, replacement]
        rest = []
        for r in self.redactions:
            if merged[0] < r[1] and merged[1] > r[0]:  # overlap: union, keep the first placeholder
                repl = r[2] if r[0] <= merged[0] else merged[2]
                merged = [min(r[0], merged[0]), max(r[1], merged[1]), repl]
            else:
                rest.append(r)
        rest.append((merged[0], merged[1], merged[2]))
        rest.sort()
        self.redactions = rest

    def touches(self, start: int, end: int) -> bool:
        """Whether a redaction changes the original text in [start, end)."""
        return any(s < end and e > start for s, e, _ in self.redactions)

    def cut(self, start: int, end: int, text: str) -> str:
        """The client's text for the original piece ``text`` = [start, end), released now."""
        self.released = max(self.released, end)
        out = text
        if self.redactions:
            parts: list[str] = []
            pos = start
            keep = []
            for s, e, repl in self.redactions:
                if s >= end:
                    keep.append((s, e, repl))
                    continue
                if e <= start:
                    continue
                if s >= start:  # the placeholder goes with the piece that holds the start
                    parts.append(text[pos - start : s - start])
                    parts.append(repl)
                pos = max(pos, min(e, end))
                if e > end:
                    keep.append((s, e, repl))
            parts.append(text[pos - start :])
            out = "".join(parts)
            self.redactions = keep
        if self.keep_emitted:
            self.emitted.append(out)
        return out


@dataclass
class Outcome:
    """Everything the response produced, for telemetry and incident records."""

    applied: list[Applied] = field(default_factory=list)
    blocked_by: list[Applied] = field(default_factory=list)
    retry_by: list[Applied] = field(default_factory=list)
    detector_errors: list[str] = field(default_factory=list)
    detector_ns: dict[str, int] = field(default_factory=dict)
    late_redactions: int = 0
    signals: dict[str, object] = field(default_factory=dict)  # response-level, for metrics
    not_applicable: tuple[str, ...] = ()  # detectors with nothing to check in this request


class _Lane:
    """One channel of one response: its ledger and, per detector, the channel state to feed.

    ``now`` detectors get every delta; ``batched`` ones get the text collected in ``pending``
    once ``batch`` characters are there (and whatever is left before a channel's logprobs,
    finish or the end of the response). ``holding`` are the ``now`` states whose findings can
    change or stop the output, with their detector's look-back and the least severity the
    policy acts on: release waits for them."""

    __slots__ = ("batch", "batched", "buf", "channel", "holding", "now", "pending", "pending_n")

    def __init__(self, channel: Channel, buf: ChannelLedger) -> None:
        self.channel = channel
        self.buf = buf
        self.now: list[tuple[int, ChannelState]] = []
        self.holding: list[tuple[int, ChannelState, int, Severity]] = []
        self.batched: list[tuple[int, ChannelState]] = []
        self.batch = UNBOUNDED
        self.pending: list[str] = []
        self.pending_n = 0


class ResponsePipeline:
    """Per-response state. Not shared across responses; not thread-safe (one event loop)."""

    def __init__(self, policy: Policy, ctx: RequestContext, attempt: int = 0,
                 can_retry: bool = False) -> None:
        self.policy = policy
        self.ctx = ctx
        self.attempt = attempt
        self.can_retry = can_retry
        self.holdback = policy.holdback_chars
        self.outcome = Outcome()
        self.flow = Flow.CONTINUE
        self.channels: dict[str, tuple[Channel, ChannelLedger]] = {}
        self.new_annotations: list[Applied] = []
        self._budget_ns = int(policy.config.detector_budget_ms * 1e6)
        self._full_buffer = policy.full_buffer
        self._hold_tools = policy.hold_tool_calls
        self._lanes: dict[str, _Lane] = {}
        self._settled = False  # settle_observers ran
        # per started detector: (entry, detector, its response state or None once it failed,
        # how many characters it may be fed at once)
        self._states: list[tuple[DetectorEntry, Detector, ResponseState | None]] = []
        self._batches: list[int] = []
        self._holds: list[bool] = []
        skipped = []
        batches = policy.feed_batches or (1,) * len(policy.entries)
        holds = policy.holds or (False,) * len(policy.entries)
        for entry, det, batch, hold in zip(policy.entries, policy.detectors, batches, holds, strict=True):
            if not self._guard(entry, lambda d=det: d.applies(ctx)):
                skipped.append(entry.name)  # e.g. schema with no response_format, tools or route schema
                continue
            state = self._guard(entry, lambda d=det: d.start(ctx))
            self._states.append((entry, det, state if isinstance(state, ResponseState) else None))
            self._batches.append(batch)
            self._holds.append(hold)
        self.outcome.not_applicable = tuple(skipped)

    # -- running detectors -------------------------------------------------------------------

    def _guard(self, entry: DetectorEntry, fn):  # type: ignore[no-untyped-def]
        """Run one detector call outside the per-delta path (start, finish): time it and
        contain its failures (fail open or closed)."""
        t0 = time.perf_counter_ns()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a detector bug must never fail the request
            self._detector_failed(entry, f"{type(exc).__name__}")
            return None
        finally:
            spent = time.perf_counter_ns() - t0
            ns = self.outcome.detector_ns
            ns[entry.name] = ns.get(entry.name, 0) + spent

    def _detector_failed(self, entry: DetectorEntry, why: str) -> None:
        self.outcome.detector_errors.append(f"{entry.name}:{why}")
        if entry.on_error == "closed" and not self.policy.config.shadow:
            f = Finding(detector=entry.name, category="detector_error", severity=Severity.high, score=1.0,
                        message=f"detector {entry.name} failed ({why}) and is configured to fail closed")
            a = Applied(f, "block", "block")
            self.outcome.applied.append(a)
            self.outcome.blocked_by.append(a)
            self.flow = Flow.BLOCK

    def _over_budget(self, entry: DetectorEntry) -> bool:
        return self.outcome.detector_ns.get(entry.name, 0) > self._budget_ns

    def _run(self, call) -> None:  # type: ignore[no-untyped-def]
        for i, (entry, _det, state) in enumerate(self._states):
            if state is None:
                continue
            errors_before = len(self.outcome.detector_errors)
            found = self._guard(entry, lambda s=state: call(s))
            if len(self.outcome.detector_errors) > errors_before:
                self._states[i] = (entry, _det, None)  # it raised: not called again
                continue
            if self._over_budget(entry):
                self._detector_failed(entry, "time_budget_exceeded")
                self._states[i] = (entry, _det, None)
            if found:
                for f in found:
                    self._apply(entry, f)

    def _feed_slots(self, slots: list[tuple[int, ChannelState]], text: str) -> None:
        """The hot path: direct calls to channel states, one clock read before and after each
        (``detector_ns`` is the detectors' own time, nothing of the pipeline's)."""
        ns = self.outcome.detector_ns
        clock = time.perf_counter_ns
        states = self._states
        for i, cs in slots:
            entry, det, state = states[i]
            if state is None:
                continue
            t0 = clock()
            try:
                found = cs.feed(text)
            except Exception as exc:  # noqa: BLE001 - a detector bug must never fail the request
                found = None
                self._detector_failed(entry, type(exc).__name__)
                states[i] = (entry, det, None)
            spent = ns[entry.name] = ns.get(entry.name, 0) + clock() - t0
            if spent > self._budget_ns and states[i][2] is not None:
                self._detector_failed(entry, "time_budget_exceeded")
                states[i] = (entry, det, None)
            if found:
                for f in found:
                    self._apply(entry, f)

    def _flush(self, lane: _Lane) -> None:
        """Feed the batched detectors what they have not seen yet."""
        if lane.pending_n and self.flow is not Flow.BLOCK:  # after a block: settle_observers
            text = lane.pending[0] if len(lane.pending) == 1 else "".join(lane.pending)
            lane.pending.clear()
            lane.pending_n = 0
            self._feed_slots(lane.batched, text)

    def flush_batches(self) -> None:
        """Feed every channel's batched detectors what they have not seen (a caller that
        batches text itself keeps the two batch sizes from adding up)."""
        for lane in self._lanes.values():
            if lane.pending_n:
                self._flush(lane)

    def settle_observers(self) -> None:
        """After a block: the text batched for detectors that only observe or annotate still
        reaches them (their findings change nothing the client gets, but belong in the
        incident record and metrics of this response). Detectors that act are not fed.
        Runs once per response."""
        if self._settled:
            return
        self._settled = True
        watching = {i for i, (entry, _det, state) in enumerate(self._states)
                    if state is not None and (entry.action in ("observe", "annotate") or self.policy.config.shadow)}
        if not watching:
            return
        end = StreamEnd(truncated=True)  # nothing more of this response reaches them
        for lane in self._lanes.values():
            if lane.pending_n:
                text = "".join(lane.pending)
                lane.pending.clear()
                lane.pending_n = 0
                self._feed_slots([(i, cs) for i, cs in lane.batched if i in watching], text)
            if lane.buf.finished:
                continue  # finished before the block: finish is called once per channel
            for i, cs in (*lane.now, *lane.batched):
                entry, _det, state = self._states[i]
                if i in watching and state is not None:
                    found = self._guard(entry, lambda cs=cs: cs.finish(end))
                    for f in found or ():
                        self._apply(entry, f)

    def _apply(self, entry: DetectorEntry, f: Finding) -> None:
        intended = entry.action if f.severity >= entry.min_severity_value else entry.below_min_severity
        action = intended
        if action == "retry":
            action = "retry" if (self.can_retry and self.attempt + 1 < entry.max_attempts) else entry.then
        if action == "redact" and (f.span is None or f.replacement is None):
            action = entry.then if entry.then != "redact" else "block"
        if self.policy.config.shadow:
            action = "observe"
        a = Applied(f, action, intended)
        self.outcome.applied.append(a)
        if action == "block":
            self.outcome.blocked_by.append(a)
            self.flow = Flow.BLOCK
        elif action == "retry":
            self.outcome.retry_by.append(a)
            if self.flow is Flow.CONTINUE:
                self.flow = Flow.RETRY
        elif action == "redact":
            buf = self._buffer(f.channel)
            assert f.span is not None and f.replacement is not None
            before = buf.late
            buf.redact(f.span[0], f.span[1], f.replacement)
            self.outcome.late_redactions += buf.late - before
        if action in ("annotate", "redact", "block", "retry"):
            self.new_annotations.append(a)

    def _lane(self, channel: Channel) -> _Lane:
        key = channel.key
        lane = self._lanes.get(key)
        if lane is None:
            buf = ChannelLedger(keep_emitted=self.ctx.endpoint == "responses")
            self.channels[key] = (channel, buf)
            lane = self._lanes[key] = _Lane(channel, buf)
            for i, (entry, _det, state) in enumerate(self._states):
                if state is None:
                    continue
                errors_before = len(self.outcome.detector_errors)
                cs = self._guard(entry, lambda s=state: s.channel_state(channel))
                if len(self.outcome.detector_errors) > errors_before:
                    self._states[i] = (entry, _det, None)  # open_channel raised: not called again
                    continue
                if cs is None:  # the detector does not look at this kind of channel
                    continue
                if self._batches[i] > 1:
                    lane.batched.append((i, cs))
                    lane.batch = min(lane.batch, self._batches[i])
                else:
                    lane.now.append((i, cs))
                    if self._holds[i]:
                        lane.holding.append((i, cs, _det.lookback_chars, entry.min_severity_value))
        elif channel.tool_name and not lane.channel.tool_name:
            lane.channel = channel
            self.channels[key] = (channel, lane.buf)
        return lane

    def _buffer(self, channel: Channel) -> ChannelLedger:
        return self._lane(channel).buf

    # -- the response's lifecycle ------------------------------------------------------------

    def feed(self, channel: Channel, text: str) -> Flow:
        lane = self._lanes.get(channel.key)
        if lane is None or (channel.tool_name and not lane.channel.tool_name):
            lane = self._lane(channel)
        if not text:
            return self.flow
        lane.buf.total += len(text)
        if self.flow is Flow.BLOCK:
            return self.flow
        if lane.now:
            self._feed_slots(lane.now, text)
        if lane.batched:
            lane.pending.append(text)
            lane.pending_n += len(text)
            if lane.pending_n >= lane.batch:
                self._flush(lane)
        return self.flow

    def feed_logprobs(self, channel: Channel, items: list[tuple[str, float]]) -> Flow:
        self._flush(self._lane(channel))  # logprobs are for text the detectors have seen
        if self.flow is not Flow.BLOCK:
            self._run(lambda s: s.feed_logprobs(channel, items))
        return self.flow

    def finish_channel(self, channel: Channel, end: StreamEnd) -> Flow:
        lane = self._lane(channel)
        buf = lane.buf
        if buf.finished:
            return self.flow
        buf.finished = True
        self._flush(lane)
        if self.flow is not Flow.BLOCK:
            self._run(lambda s: s.finish(channel, end))
        return self.flow

    def finish_choice(self, choice: int, end: StreamEnd) -> Flow:
        for ch, _buf in list(self.channels.values()):
            if ch.choice == choice:
                self.finish_channel(ch, end)
        return self.flow

    def finish(self, truncated: bool = False, finish_reason: str | None = None) -> Flow:
        """End of response: finish every open channel, then response-level checks."""
        end = StreamEnd(finish_reason=finish_reason, truncated=truncated)
        if self.flow is Flow.BLOCK:
            self.settle_observers()
        for ch, _buf in list(self.channels.values()):
            self.finish_channel(ch, end)
        if self.flow is not Flow.BLOCK:
            self._run(lambda s: s.finish_response())
        self._collect_signals()
        return self.flow

    def _collect_signals(self) -> None:
        """Response-level signals some detectors expose for metrics (grounding score,
        answered/abstained/refused, logprob statistics)."""
        for entry, det, state in self._states:
            if state is None:
                continue
            prepared = state.prepared
            for method, fn in (("response_score", det.response_score), ("classification", det.classification),
                               ("response_stats", det.response_stats)):
                try:
                    value = fn(prepared)
                except Exception:  # noqa: BLE001 - a signal is optional; never fail the response
                    self.outcome.detector_errors.append(f"{entry.name}:signal")
                    continue
                if value is not None:
                    self.outcome.signals[f"{entry.name}.{method}"] = value

    # -- releasing text ------------------------------------------------------------------------

    def release_line(self, channel: Channel) -> int:
        """Up to which offset the channel's text may go to the client now.

        Release by proof: everything before the smallest safe point of the detectors whose
        findings can change or stop the output (a detector that cannot say holds its
        ``lookback_chars`` behind the end), but never less than the hold-back bound behind
        the end, so nothing is held longer than ``holdback`` characters. A finished channel
        is released whole; under ``buffer: full`` nothing is before the end, and a tool
        call that ``hold_tool_calls`` holds waits for its judgement (-1: not even an empty
        piece)."""
        lane = self._lanes.get(channel.key)
        if lane is None:
            return 0
        buf = lane.buf
        if buf.finished:
            return buf.total
        if self._full_buffer or (self._hold_tools and lane.channel.kind == "tool_call"):
            return -1
        total = buf.total
        line = total
        states = self._states
        for i, cs, back, min_severity in lane.holding:
            if states[i][2] is None:
                continue  # failed: open (closed blocked the response already)
            try:
                sp = cs.safe_point_for(min_severity)
            except Exception as exc:  # noqa: BLE001 - a detector bug must never fail the request
                self._detector_failed(states[i][0], type(exc).__name__)
                states[i] = (states[i][0], states[i][1], None)
                sp = None
            if sp is None:
                sp = total - back
            if sp < line:
                line = sp
        bound = total - self.holdback
        if line < bound:
            line = bound
        return line if line > buf.released else buf.released

    def ledger(self, channel: Channel) -> ChannelLedger:
        return self._buffer(channel)

    def emitted_text(self, channel: Channel) -> str:
        return "".join(self._buffer(channel).emitted)

    def pop_annotations(self) -> list[Applied]:
        out, self.new_annotations = self.new_annotations, []
        return out
