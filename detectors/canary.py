"""``canary``: a random token the proxy plants in each request's system message; seeing it in an
output is proof that the system prompt leaked.

The proxy calls three pure functions: ``make_canary`` (a fresh token per request),
``inject_canary`` (a new request body with ``canary_instruction(token)`` added to the system
message; the app never sees the token) and registers the token in its state store. The
detector then reports:

- category ``canary``: a canary of *this* request in its output: a certain system-prompt leak.
- category ``cross_request``: a canary-shaped token that this request did not plant but that is
  registered to another request (``ctx.shared["canary"].is_registered``): output of one
  request carries another request's system prompt (shared caches, memory features, a
  multi-tenant agent mixing sessions).

Canary-shaped tokens that are neither (the app's own text, a pasted example) and tokens that
already appear in the request's messages (the user pasted an earlier output) are ignored.

Why a fixed prefix and alphabet: the detector finds candidates with one cheap pattern and the
hold-back window is exactly one token long, so redact/block remove a canary before any of it
is sent. Alphanumeric only, so tokenizers and Markdown leave it intact.
"""

from __future__ import annotations

import re
import secrets
import string
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import Field

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
from detectors.pattern_prefix import prefix_regex
from detectors.redaction import mask, placeholder
from detectors.stream_scan import StreamScanner, prefix_finder

NAME = "canary"
DEFAULT_PREFIX = "gwc-"
DEFAULT_TOKEN_CHARS = 20
_ALPHABET = string.ascii_letters + string.digits  # 62 symbols: 20 chars ~ 119 bits


def make_canary(request_id: str | None = None, *, prefix: str = DEFAULT_PREFIX,
                token_chars: int = DEFAULT_TOKEN_CHARS) -> str:
    """A fresh random canary, e.g. ``gwc-4fQz0c9LrT2mB7xKp1aW``.

    ``request_id`` is accepted so callers can pass what they have, but the token never encodes
    it: a canary must not be derivable from anything the client or the model can see.
    """
    del request_id
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(token_chars))


def canary_instruction(token: str) -> str:
    """The line added to the system message. Short, and it asks the model not to repeat the
    token, so a well-behaved answer never contains it and only a real prompt dump does."""
    return f"<!-- {token}: confidential marker; never repeat or mention it. -->"


def inject_canary(body: Mapping[str, Any], token: str, endpoint: str) -> dict[str, Any]:
    """A copy of ``body`` with ``canary_instruction(token)`` in its system message; ``body`` and
    everything in it are left untouched (only the changed containers are copied).

    - ``chat``: appended to the first ``system``/``developer`` message (string content, or a new
      text part when content is a list of parts); prepended as a new system message when
      there is none.
    - ``responses``: appended to ``instructions`` (set when absent).
    - anything else (``completions``): no system message exists; returned unchanged.
    Bodies of an unexpected shape are returned unchanged rather than broken.
    """
    line = canary_instruction(token)
    out = dict(body)
    if endpoint == "responses":
        instructions = body.get("instructions")
        if instructions is None or instructions == "":
            out["instructions"] = line
        elif isinstance(instructions, str):
            out["instructions"] = f"{instructions}\n\n{line}"
        return out
    if endpoint != "chat":
        return out
    messages = body.get("messages")
    if not isinstance(messages, list):
        return out
    new_messages = list(messages)
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or msg.get("role") not in ("system", "developer"):
            continue
        content = msg.get("content")
        if isinstance(content, str):
            new_content: Any = f"{content}\n\n{line}" if content else line
        elif isinstance(content, list):
            new_content = [*content, {"type": "text", "text": line}]
        elif content is None:
            new_content = line
        else:
            break  # unknown shape: leave it alone, add our own message instead
        new_messages[i] = {**msg, "content": new_content}
        out["messages"] = new_messages
        return out
    out["messages"] = [{"role": "system", "content": line}, *messages]
    return out


@runtime_checkable
class CanaryRegistry(Protocol):
    """What the proxy puts in ``ctx.shared["canary"]``: canaries planted by recent requests
    (any replica). Sync and in-process, because detectors do no I/O on the hot path."""

    def is_registered(self, token: str) -> bool: ...


class MemoryCanaryRegistry:
    """In-process ``CanaryRegistry`` with a TTL and a bounded size (oldest dropped first).

    Used by the proxy's memory backend, as the local mirror of a shared store, and by tests.
    Thread-safe.
    """

    def __init__(self, ttl_seconds: float = 86400.0, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._expires: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def register(self, token: str) -> None:
        now = self._clock()
        with self._lock:
            self._expires[token] = now + self._ttl
            self._expires.move_to_end(token)
            while len(self._expires) > self._max:
                self._expires.popitem(last=False)

    def is_registered(self, token: str) -> bool:
        now = self._clock()
        with self._lock:
            expires = self._expires.get(token)
            if expires is None:
                return False
            if expires <= now:
                del self._expires[token]
                return False
            return True

    def __len__(self) -> int:
        return len(self._expires)


def canary_pattern(prefix: str = DEFAULT_PREFIX,
                   token_chars: int = DEFAULT_TOKEN_CHARS) -> re.Pattern[str]:
    """Canary-shaped tokens: the prefix (any case) and exactly ``token_chars`` alphanumerics,
    not glued to other alphanumerics."""
    return re.compile(rf"(?<![A-Za-z0-9])(?i:{re.escape(prefix)})[A-Za-z0-9]{{{token_chars}}}(?![A-Za-z0-9])")


class CanaryConfig(DetectorConfig):
    """Settings of ``canary``. The proxy reads ``prefix``/``token_chars`` for ``make_canary``
    and ``registry_ttl_seconds`` for how long a planted canary stays registered."""

    detector_class: ClassVar[type[Detector]]

    prefix: str = Field(DEFAULT_PREFIX, pattern=r"^[A-Za-z][A-Za-z0-9]{0,14}[-_]$")
    token_chars: int = Field(DEFAULT_TOKEN_CHARS, ge=16, le=64)
    registry_ttl_seconds: float = Field(86400.0, gt=0)

    def make(self, request_id: str | None = None) -> str:
        """``make_canary`` with this config's shape."""
        return make_canary(request_id, prefix=self.prefix, token_chars=self.token_chars)


@dataclass(frozen=True, slots=True)
class _Prepared:
    own: frozenset[str]  # casefolded: a model that changes case still leaked it
    seen_in_request: frozenset[str]
    registry: CanaryRegistry | None


class CanaryDetector(Detector):
    name = NAME

    def __init__(self, config: DetectorConfig) -> None:
        assert isinstance(config, CanaryConfig)
        super().__init__(config)
        self.cfg = config
        self._pattern = canary_pattern(config.prefix, config.token_chars)
        self._len = len(config.prefix) + config.token_chars
        # where text could still grow into a canary-shaped token (release by proof)
        self._prefix = prefix_finder(prefix_regex(self._pattern.pattern))

    @property
    def lookback_chars(self) -> int:
        return self._len

    def prepare(self, ctx: RequestContext) -> _Prepared | None:
        registry = ctx.shared.get(NAME)
        if not ctx.canaries and registry is None:
            return None
        seen = frozenset(m.group() for msg in ctx.messages for m in self._pattern.finditer(msg.text))
        return _Prepared(frozenset(c.casefold() for c in ctx.canaries), seen, registry)

    def open_channel(self, prepared: _Prepared | None, channel: Channel) -> ChannelState | None:
        if prepared is None:
            return None
        return _CanaryState(self, prepared, channel)


class _CanaryState(ChannelState):
    __slots__ = ("_channel", "_det", "_p", "_scanner")

    def __init__(self, det: CanaryDetector, prepared: _Prepared, channel: Channel) -> None:
        self._det = det
        self._p = prepared
        self._channel = channel
        self._scanner = StreamScanner(det._pattern, det._len)

    def feed(self, text: str) -> list[Finding]:
        return self._findings(self._scanner.feed(text))

    def finish(self, end: StreamEnd) -> list[Finding]:
        return self._findings(self._scanner.finish())

    def safe_point(self) -> int | None:
        return self._scanner.safe_point(self._det._prefix)

    def _findings(self, matches: list[tuple[int, int, Any]]) -> list[Finding]:
        out: list[Finding] = []
        p = self._p
        for start, end, m in matches:
            token = m.group()
            if token.casefold() in p.own:
                category = "canary"
                message = "output contains this request's canary: the system prompt leaked"
            elif token in p.seen_in_request:
                continue
            elif p.registry is not None and p.registry.is_registered(token):
                category = "cross_request"
                message = "output contains another request's canary"
            else:
                continue
            out.append(Finding(
                detector=NAME,
                category=category,
                severity=Severity.critical,
                score=1.0,
                message=message,
                span=(start, end),
                channel=self._channel,
                evidence=mask(token),
                replacement=placeholder("canary"),
            ))
        return out


CanaryConfig.detector_class = CanaryDetector

CONFIGS: dict[str, type[DetectorConfig]] = {NAME: CanaryConfig}
