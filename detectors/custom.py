"""User-configured rules: ``regex`` (named patterns), ``banned_substrings`` and
``max_output_chars``.

Patterns come from config, so they run on RE2 (``google-re2``): matching is linear in the
text, and a pattern from YAML can never hang a worker with catastrophic backtracking.
"""

from __future__ import annotations

from typing import Any, ClassVar

import ahocorasick
import re2
from pydantic import Field, field_validator, model_validator

from detectors.base import (
    Channel,
    ChannelState,
    Detector,
    DetectorConfig,
    Finding,
    RequestContext,
    Severity,
    StreamEnd,
)
from detectors.pattern_prefix import prefix_regex_of_all
from detectors.redaction import mask, placeholder
from detectors.stream_scan import NamedAlternatives, StreamScanner, named_alternatives, prefix_finder

SeverityName = str

# the pipeline feeds the detector (and so scans the window) once per this many new characters
# of a channel rather than on every delta (``feed_batch_chars``; the hold-back adds it - 1)
_SCAN_BATCH_CHARS = 24


def _severity(name: str) -> Severity:
    try:
        return Severity[name]
    except KeyError:
        raise ValueError(f"unknown severity {name!r}; use one of {[s.name for s in Severity]}") from None


class RegexConfig(DetectorConfig):
    """``patterns``: name -> RE2 pattern. ``max_match_chars`` bounds how long one match may be
    (and so the hold-back window); longer matches are cut."""

    patterns: dict[str, str] = Field(default_factory=dict)
    severity: SeverityName = "high"
    max_match_chars: int = Field(default=128, ge=1, le=8192)
    channels: tuple[str, ...] = ("text", "tool_call")

    detector_class: ClassVar[type[Detector]]

    @field_validator("patterns")
    @classmethod
    def _compile(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("at least one pattern is required")
        for name, pat in v.items():
            if not name.isidentifier():
                raise ValueError(f"pattern name {name!r} must be an identifier (letters, digits, _)")
            try:
                re2.compile(pat)
            except Exception as exc:  # noqa: BLE001 - re2 raises its own error type
                raise ValueError(f"pattern {name!r} is not a valid RE2 regular expression: {exc}") from None
        return v

    @field_validator("severity")
    @classmethod
    def _sev(cls, v: str) -> str:
        _severity(v)
        return v


class RegexDetector(Detector):
    name = "regex"

    def __init__(self, config: RegexConfig) -> None:
        super().__init__(config)
        self._names = list(config.patterns)
        # one alternation of named groups: one pass over the text for all patterns
        joined = "|".join(f"(?P<{n}>{p})" for n, p in config.patterns.items())
        self._pattern: Any = re2.compile(joined)
        # the same matches from native RE2 calls without capture groups (see NamedAlternatives)
        self._alternatives: NamedAlternatives | None = named_alternatives(dict(config.patterns))
        self._finder = None
        if self._alternatives is not None:
            self._pattern, self._finder = self._alternatives, self._alternatives.finder
        self.feed_batch_chars = _SCAN_BATCH_CHARS
        # where text could still grow into a match (release by proof; None: the look-back)
        self._prefix = prefix_finder(prefix_regex_of_all(list(config.patterns.values())))
        self._severity = _severity(config.severity)
        self._window = config.max_match_chars
        self._channels = set(config.channels)

    @property
    def lookback_chars(self) -> int:
        return self._window + _SCAN_BATCH_CHARS - 1

    def open_channel(self, prepared: Any, channel: Channel) -> ChannelState | None:
        if channel.kind not in self._channels:
            return None
        return _RegexState(self, channel)


class _RegexState(ChannelState):
    __slots__ = ("_channel", "_det", "_scanner")

    def __init__(self, det: RegexDetector, channel: Channel) -> None:
        self._det = det
        self._channel = channel
        # no batching of its own: the pipeline already feeds per ``feed_batch_chars``, and a
        # second layer would let up to twice that go unscanned after a partial feed (a logprobs
        # event flushes what is pending) while the hold-back covers it once
        self._scanner = StreamScanner(det._pattern, det._window, 1, det._finder)

    def _findings(self, hits: list[tuple[int, int, Any]]) -> list[Finding]:
        out = []
        for s, e, m in hits:
            name = m.lastgroup or next((n for n in self._det._names if m.group(n) is not None), "pattern")
            out.append(Finding(
                detector="regex", category=name, severity=self._det._severity, score=1.0,
                message=f"output matches configured pattern '{name}'", span=(s, e),
                channel=self._channel, evidence=mask(m.group(0)), replacement=placeholder(name),
            ))
        return out

    def feed(self, text: str) -> list[Finding]:
        hits = self._scanner.feed(text)
        return self._findings(hits) if hits else []

    def finish(self, end: StreamEnd) -> list[Finding]:
        hits = self._scanner.finish()
        return self._findings(hits) if hits else []

    def safe_point(self) -> int | None:
        return self._scanner.safe_point(self._det._prefix)


RegexConfig.detector_class = RegexDetector


def _fold_keep_length(text: str) -> str:
    """Case folding that keeps offsets: characters whose folding changes length ("ß" -> "ss")
    are only lower-cased, so spans found in the folded text are spans of the original."""
    folded = text.casefold()
    if len(folded) == len(text):
        return folded
    return "".join(f if len(f := c.casefold()) == 1 else c.lower() for c in text)


class BannedSubstringsConfig(DetectorConfig):
    """Literal substrings (case-insensitive by default) that must not appear in output."""

    substrings: list[str] = Field(default_factory=list)
    case_sensitive: bool = False
    severity: SeverityName = "high"

    detector_class: ClassVar[type[Detector]]

    @model_validator(mode="after")
    def _check(self) -> BannedSubstringsConfig:
        if not self.substrings or any(not s for s in self.substrings):
            raise ValueError("substrings must be a non-empty list of non-empty strings")
        _severity(self.severity)
        return self


class BannedSubstringsDetector(Detector):
    name = "banned_substrings"

    def __init__(self, config: BannedSubstringsConfig) -> None:
        super().__init__(config)
        self._fold = (lambda s: s) if config.case_sensitive else _fold_keep_length
        self._automaton = ahocorasick.Automaton()
        for i, sub in enumerate(config.substrings):
            key = self._fold(sub)
            self._automaton.add_word(key, (i, len(key)))
        self._automaton.make_automaton()
        self._longest = max(len(s) for s in config.substrings)
        self._firsts = frozenset(self._fold(s)[0] for s in config.substrings)
        self._severity = _severity(config.severity)

    @property
    def lookback_chars(self) -> int:
        return self._longest

    def open_channel(self, prepared: Any, channel: Channel) -> ChannelState | None:
        return _SubstringState(self, channel)


class _SubstringState(ChannelState):
    """Keeps the last ``longest - 1`` characters so a substring split across feeds is found
    once; case folding is per character-length-preserving for the common scripts."""

    __slots__ = ("_channel", "_det", "_done", "_offset", "_tail")

    def __init__(self, det: BannedSubstringsDetector, channel: Channel) -> None:
        self._det = det
        self._channel = channel
        self._tail = ""
        self._offset = 0  # absolute offset of _tail[0]
        self._done = False

    def feed(self, text: str) -> list[Finding]:
        det = self._det
        buf = self._tail + text
        folded = det._fold(buf)
        out: list[Finding] = []
        old = len(self._tail)
        for end_idx, (i, n) in det._automaton.iter(folded):
            start = end_idx - n + 1
            if end_idx < old:  # entirely inside the tail: already reported
                continue
            out.append(Finding(
                detector="banned_substrings", category="banned_substring", severity=det._severity,
                score=1.0, message=f"output contains banned substring #{i + 1}",
                span=(self._offset + start, self._offset + end_idx + 1), channel=self._channel,
                evidence=mask(buf[start : end_idx + 1]), replacement=placeholder("banned"),
            ))
        keep = max(0, det._longest - 1)
        cut = max(0, len(buf) - keep)
        self._tail = buf[cut:]
        self._offset += cut
        return out

    def finish(self, end: StreamEnd) -> list[Finding]:
        return []

    def safe_point(self) -> int:
        """The start of the longest tail that is still the beginning of a banned substring
        (found in the automaton's trie); the end when none is."""
        tail = self._tail
        n = len(tail)
        if not n:
            return self._offset
        folded = self._det._fold(tail)
        firsts = self._det._firsts
        longest_prefix = self._det._automaton.longest_prefix
        for i, ch in enumerate(folded):
            if ch in firsts and longest_prefix(folded[i:]) == n - i:
                return self._offset + i
        return self._offset + n


BannedSubstringsConfig.detector_class = BannedSubstringsDetector


class MaxOutputCharsConfig(DetectorConfig):
    """Flags (once) a channel whose output grows past ``max_chars``."""

    max_chars: int = Field(ge=1)
    severity: SeverityName = "medium"

    @field_validator("severity")
    @classmethod
    def _sev(cls, v: str) -> str:
        _severity(v)
        return v

    detector_class: ClassVar[type[Detector]]


class MaxOutputCharsDetector(Detector):
    name = "max_output_chars"

    def open_channel(self, prepared: RequestContext, channel: Channel) -> ChannelState | None:
        return _LengthState(self.config.max_chars, _severity(self.config.severity), channel)  # type: ignore[attr-defined]


class _LengthState(ChannelState):
    __slots__ = ("_channel", "_fired", "_limit", "_n", "_severity")

    def __init__(self, limit: int, severity: Severity, channel: Channel) -> None:
        self._limit, self._severity, self._channel = limit, severity, channel
        self._n = 0
        self._fired = False

    def feed(self, text: str) -> list[Finding]:
        self._n += len(text)
        if self._fired or self._n <= self._limit:
            return []
        self._fired = True
        return [Finding(
            detector="max_output_chars", category="too_long", severity=self._severity, score=1.0,
            message=f"output exceeds {self._limit} characters", channel=self._channel, attrs={"limit": self._limit},
        )]

    def finish(self, end: StreamEnd) -> list[Finding]:
        return []

    def safe_point(self) -> int:
        return self._n  # it fires on the feed that passes the limit: nothing is ever pending


MaxOutputCharsConfig.detector_class = MaxOutputCharsDetector

CONFIGS: dict[str, type[DetectorConfig]] = {
    "regex": RegexConfig,
    "banned_substrings": BannedSubstringsConfig,
    "max_output_chars": MaxOutputCharsConfig,
}
