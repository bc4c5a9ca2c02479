"""Held events: the upstream's events wait here until all of their text is proven safe.

Why events and not text: a client must get the upstream's own events, one for one, with the
upstream's bytes (ids, ``system_fingerprint``, ``service_tier``, the logprobs shape,
obfuscation padding). So the relay never re-chunks text; it delays whole events until the
pipeline's release line (``ResponsePipeline.release_line``) has passed every piece of text
they carry, and only an event whose text a redaction changes is re-serialised.

Order: events of one *lane* (a choice of chat/completions, an output item of the Responses
API) leave in arrival order; an event that belongs to no lane (``[DONE]``, a usage chunk,
``response.created``/``.completed``) is a barrier that waits for everything before it. So a
tool call held until it is judged does not hold back the text of another choice or item.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from detectors.base import Channel

INF = 1 << 62

# (channel, start, end, original text); channel None: a piece dropped before any detector
# saw it (text for a choice that had already finished), sent as ""
Piece = tuple[Channel | None, int, int, str]


@dataclass(slots=True)
class HeldEvent:
    raw: bytes
    obj: dict[str, Any] | None = None  # the parsed payload (None: not JSON, sent as it came)
    name: str | None = None  # the SSE ``event:`` field, kept when re-serialised
    pieces: list[Piece] = field(default_factory=list)
    lane: int | None = None  # None: a barrier
    repeats_text: bool = False  # a Responses `.done`/`.completed` event that repeats whole text
    dirty: bool = False  # must be re-serialised even without a redaction (a dropped piece)
    seq: int = 0


class HeldQueue:
    """Events not yet released, per lane, with the barriers between them."""

    __slots__ = ("_barriers", "_lanes", "_seq")

    def __init__(self) -> None:
        self._lanes: dict[int, deque[HeldEvent]] = {}
        self._barriers: deque[HeldEvent] = deque()
        self._seq = 0

    def __bool__(self) -> bool:
        return bool(self._barriers) or any(self._lanes.values())

    def push(self, ev: HeldEvent) -> None:
        self._seq += 1
        ev.seq = self._seq
        if ev.lane is None:
            self._barriers.append(ev)
        else:
            q = self._lanes.get(ev.lane)
            if q is None:
                q = self._lanes[ev.lane] = deque()
            q.append(ev)

    def clear(self) -> None:
        self._lanes.clear()
        self._barriers.clear()

    def drain(self, ready: Callable[[HeldEvent], bool], render: Callable[[HeldEvent], bytes]) -> bytes:
        """Release, in arrival order where order allows, every event that is ready."""
        out = bytearray()
        lanes, barriers = self._lanes, self._barriers
        while True:
            limit = barriers[0].seq if barriers else INF
            best: deque[HeldEvent] | None = None
            for q in lanes.values():
                if q and q[0].seq < limit and (best is None or q[0].seq < best[0].seq) and ready(q[0]):
                    best = q
            if best is not None:
                out += render(best.popleft())
                continue
            if barriers and all(not q or q[0].seq > limit for q in lanes.values()) and ready(barriers[0]):
                out += render(barriers.popleft())
                continue
            return bytes(out)


def lane_of(endpoint: str, obj: dict[str, Any]) -> int | None:
    """The lane an event belongs to: its single choice, or its Responses output item."""
    if endpoint == "responses":
        oi = obj.get("output_index")
        return oi if isinstance(oi, int) else None
    choices = obj.get("choices")
    if isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], dict):
        idx = choices[0].get("index", 0)
        return idx if isinstance(idx, int) else 0
    return None
