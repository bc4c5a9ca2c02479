"""The detector protocol: config -> detector (once) -> per-response state (per request).

Why three types: a detector's config is validated once at start-up, its runtime object holds
compiled tables shared by every request, and all per-response buffers live in a fresh state
object created by ``start``. Shared objects therefore never hold request data, and two
concurrent responses cannot interact.

Output arrives as *channels*: the text of one choice, or the arguments of one tool call of one
choice. Spans in findings are character offsets into the channel's text (Python ``str``
indices, i.e. code points), counted from the start of the response.

Detectors never log, alert, block, do I/O or read globals: they return findings; the policy
decides. ``detectors`` imports nothing from ``proxy``.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class Severity(enum.IntEnum):
    low = 1
    medium = 2
    high = 3
    critical = 4

    @property
    def label(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Channel:
    """One independently growing piece of output.

    ``kind`` is ``"text"`` (message content / output text) or ``"tool_call"`` (the JSON
    arguments of tool call ``tool_index``; ``tool_name`` is the declared function name when the
    upstream sent it).
    """

    choice: int = 0
    kind: str = "text"
    tool_index: int | None = None
    tool_name: str | None = None
    # identity of the channel regardless of tool_name (which arrives with the first delta only);
    # computed once because it keys per-channel state on every delta
    key: str = field(init=False, repr=False, compare=False, hash=False, default="")

    def __post_init__(self) -> None:
        k = f"{self.choice}:tool:{self.tool_index}" if self.kind == "tool_call" else f"{self.choice}:text"
        object.__setattr__(self, "key", k)


TEXT = Channel()


@dataclass(frozen=True, slots=True)
class Finding:
    """What a detector saw. Data only; the policy turns it into an action.

    ``evidence`` is already masked (see ``detectors.redaction``); it never contains the raw
    secret. ``replacement`` is what a ``redact`` action puts in place of ``span``
    (``[REDACTED:email]``); ``None`` means the finding has no span that can be redacted.
    ``attrs`` holds small, non-sensitive extra facts (JSON pointer path, overlap fraction,
    planted-span reference); values must be str, int, float or bool.
    """

    detector: str
    category: str
    severity: Severity
    score: float
    message: str
    span: tuple[int, int] | None = None
    channel: Channel = TEXT
    evidence: str = ""
    replacement: str | None = None
    attrs: Mapping[str, str | int | float | bool] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector,
            "category": self.category,
            "severity": self.severity.label,
            "score": round(self.score, 4),
            "message": self.message,
            "span": list(self.span) if self.span else None,
            "channel": self.channel.key,
            "evidence": self.evidence,
            "attrs": dict(self.attrs),
        }


@dataclass(frozen=True, slots=True)
class Message:
    """A request message reduced to what detectors need: role and plain text.

    ``index`` is the position in the request's ``messages`` (or ``input``) array, so findings
    can point at the message a planted span came from. ``name`` is the tool/function name for
    tool results when the request gave one.
    """

    role: str
    text: str
    index: int
    name: str | None = None


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Read-only facts about the request, prepared by the proxy before the response starts.

    ``raw`` is the parsed request body (a dict; do not mutate). ``shared`` carries snapshots of
    shared state that the pipeline fetched asynchronously before the response started (for
    example cross-tenant fingerprints), keyed by detector name.
    """

    endpoint: str = "chat"  # chat | completions | responses
    route: str = "default"
    tenant: str | None = None
    model: str = ""
    messages: tuple[Message, ...] = ()
    tools: tuple[Mapping[str, Any], ...] = ()
    response_format: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    canaries: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict)
    shared: Mapping[str, Any] = field(default_factory=dict)
    request_id: str = ""

    def texts(self, *roles: str) -> list[Message]:
        """Messages with one of ``roles`` (all messages when none given)."""
        if not roles:
            return list(self.messages)
        return [m for m in self.messages if m.role in roles]


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How a channel ended. ``truncated`` is true when the upstream broke off (reset, timeout)
    rather than finishing; ``finish_reason`` is the upstream's (``stop``, ``length``,
    ``tool_calls``, ``content_filter``) when it sent one."""

    finish_reason: str | None = None
    truncated: bool = False


class ChannelState(ABC):
    """Per-channel, per-response state. ``feed`` must do work proportional to the new text."""

    @abstractmethod
    def feed(self, text: str) -> list[Finding]: ...

    def feed_logprobs(self, items: Sequence[tuple[str, float]]) -> list[Finding]:
        """Token log-probabilities for text already fed; only called when the detector's
        ``wants_logprobs`` is true."""
        return []

    @abstractmethod
    def finish(self, end: StreamEnd) -> list[Finding]:
        """Called once per channel at the end; must be idempotent."""

    def safe_point(self) -> int | None:
        """How far the channel's text is proven safe: the earliest absolute offset at which a
        finding this state could still report (after more text, or at ``finish``) may start.

        Why: an enforcing policy releases text by proof, not by distance. Everything before
        the smallest safe point of its enforcing detectors goes to the client at once; only a
        live candidate (a token that could still grow into a key, an open link, a partial
        copy of the system prompt) is held. Findings already returned do not count. Return
        the end of the text fed so far when nothing is pending. ``None``: the state cannot
        say, and the pipeline holds the detector's ``lookback_chars`` behind the end."""
        return None

    def safe_point_for(self, min_severity: Severity) -> int | None:
        """``safe_point`` counting only findings of at least ``min_severity`` (the policy
        acts on nothing below it, so nothing below it needs to be held). Override where
        candidates differ in the severity they could reach."""
        return self.safe_point()


class ResponseState:
    """Dispatches deltas to per-channel states; created by ``Detector.start`` per response."""

    __slots__ = ("_channels", "_detector", "_prepared")

    def __init__(self, detector: Detector, prepared: Any) -> None:
        self._detector = detector
        self._prepared = prepared
        self._channels: dict[str, ChannelState | None] = {}

    def _state(self, channel: Channel) -> ChannelState | None:
        key = channel.key
        try:
            return self._channels[key]
        except KeyError:
            state = self._detector.open_channel(self._prepared, channel)
            self._channels[key] = state
            return state

    def channel_state(self, channel: Channel) -> ChannelState | None:
        """The channel's state (opened on first use), for callers that feed it directly."""
        return self._state(channel)

    def feed(self, channel: Channel, text: str) -> list[Finding]:
        state = self._state(channel)
        return state.feed(text) if state is not None and text else []

    def feed_logprobs(self, channel: Channel, items: Sequence[tuple[str, float]]) -> list[Finding]:
        state = self._state(channel)
        return state.feed_logprobs(items) if state is not None else []

    def finish(self, channel: Channel, end: StreamEnd) -> list[Finding]:
        state = self._state(channel)
        return state.finish(end) if state is not None else []

    def finish_response(self) -> list[Finding]:
        """Response-level findings after every channel finished (e.g. nothing was output)."""
        return self._detector.finish_response(self._prepared)

    @property
    def prepared(self) -> Any:
        """The per-request object ``Detector.prepare`` returned (for response-level signals)."""
        return self._prepared


class Detector(ABC):
    """Runtime detector built once from config. Holds only immutable, shared tables.

    Subclasses implement ``prepare`` (per-request work done once, e.g. scanning the request's
    context) and ``open_channel`` (returns a fresh ``ChannelState``, or ``None`` when the
    detector does not apply to that channel).
    """

    name: ClassVar[str] = ""
    wants_logprobs: ClassVar[bool] = False
    #: The pipeline may collect up to this many characters of a channel before calling
    #: ``feed`` (one call per batch instead of one per small delta, for detectors whose work is
    #: per batch anyway, such as a pattern scan over a window). A detector that redacts or
    #: blocks must then include ``feed_batch_chars - 1`` in ``lookback_chars``. ``finish`` and
    #: ``feed_logprobs`` always come after every pending character was fed.
    feed_batch_chars: int = 1
    #: Whether this detector judges tool calls (their arguments as a whole): a policy in which
    #: it blocks or redacts holds a call's argument deltas until the call is complete and
    #: judged (``policies.<name>.hold_tool_calls``), because a tool call is where a
    #: compromised answer does harm.
    judges_tool_calls: ClassVar[bool] = False

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config

    @property
    def lookback_chars(self) -> int:
        """How many characters must be held back so that any match this detector can make is
        seen whole before its first character is released to the client. 0 = no need."""
        return 0

    def prepare(self, ctx: RequestContext) -> Any:
        return ctx

    @abstractmethod
    def open_channel(self, prepared: Any, channel: Channel) -> ChannelState | None: ...

    def finish_response(self, prepared: Any) -> list[Finding]:
        return []

    def start(self, ctx: RequestContext) -> ResponseState:
        return ResponseState(self, self.prepare(ctx))


class DetectorConfig(BaseModel):
    """Base of every detector's settings. Unknown keys are errors; configs are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    detector_class: ClassVar[type[Detector]]

    def build(self) -> Detector:
        return self.detector_class(self)
