"""Incremental Server-Sent Events parsing that keeps each event's original bytes.

The proxy forwards unmodified events byte for byte, so the parser returns, for every event,
the exact bytes it was made of (from the end of the previous event through its terminating
blank line) next to the parsed fields. Correct for LF, CRLF and CR line endings, multi-line
``data:`` fields, comments, unknown fields, a leading BOM, and any split of the byte stream
(including inside a multi-byte UTF-8 character: lines are only decoded once complete).
"""

from __future__ import annotations

from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"


class LineTooLong(Exception):
    """A single SSE line exceeded the configured cap (bounded memory)."""


@dataclass(slots=True)
class SSEEvent:
    raw: bytes
    data: str | None = None  # data lines joined with "\n"; None when the block had none
    event: str | None = None
    comment: bool = False  # a block made only of comment lines

    @property
    def is_done(self) -> bool:
        return self.data == "[DONE]"


class SSEParser:
    """``feed(bytes) -> list[SSEEvent]``; ``flush() -> list[SSEEvent]`` at end of stream.

    Bytes after the last complete event are returned by ``flush`` as a final event (so a
    stream that ends without a blank line still delivers its data) and ``pending_bytes``
    tells how many bytes are buffered.
    """

    __slots__ = ("_at_start", "_buf", "_data", "_event", "_has_comment", "_max_line", "_scan", "_start")

    def __init__(self, max_line_bytes: int = 4 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._start = 0  # start of the current (incomplete) event in _buf
        self._scan = 0  # where line scanning resumes in _buf
        self._data: list[bytes] = []
        self._event: bytes | None = None
        self._has_comment = False
        self._max_line = max_line_bytes
        self._at_start = True

    @property
    def pending_bytes(self) -> int:
        return len(self._buf) - self._start

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        buf = self._buf
        buf += chunk
        if self._at_start:
            if len(buf) < 3 and _BOM.startswith(bytes(buf)):
                return []
            self._at_start = False
            if buf.startswith(_BOM):
                self._scan = 3
        return self._lines(final=False)

    def flush(self) -> list[SSEEvent]:
        out = self._lines(final=True)
        buf = self._buf
        if self._scan < len(buf):  # a last line without terminator
            self._field(bytes(buf[self._scan:]))
            self._scan = len(buf)
        if self._start < len(buf):
            ev = self._dispatch(len(buf))
            out.append(ev if ev is not None else SSEEvent(raw=bytes(buf[self._start:])))
        self._buf = bytearray()
        self._start = self._scan = 0
        return out

    def _lines(self, final: bool) -> list[SSEEvent]:
        buf = self._buf
        out: list[SSEEvent] = []
        pos = self._scan
        n = len(buf)
        while pos < n:
            lf = buf.find(b"\n", pos)
            cr = buf.find(b"\r", pos, lf if lf >= 0 else n)
            if cr >= 0:
                if cr + 1 == n and not final:
                    break  # a CR at the end: wait to see whether LF follows
                end = cr
                nxt = cr + 2 if cr + 1 < n and buf[cr + 1] == 0x0A else cr + 1
            elif lf >= 0:
                end, nxt = lf, lf + 1
            else:
                break
            if end == pos:  # blank line: dispatch
                ev = self._dispatch(nxt)
                if ev is not None:
                    out.append(ev)
            else:
                if end - pos > self._max_line:  # however the bytes were split
                    raise LineTooLong(f"SSE line longer than {self._max_line} bytes")
                self._field(bytes(buf[pos:end]))
            pos = nxt
        self._scan = pos
        pending = n - pos - (1 if n > pos and buf[n - 1] == 0x0D else 0)  # a CR may end the line
        if pending > self._max_line:
            raise LineTooLong(f"SSE line longer than {self._max_line} bytes")
        # compact: drop dispatched bytes
        if self._start > 65536 or (self._start and self._start == n):
            del buf[: self._start]
            self._scan -= self._start
            self._start = 0
        return out

    def _field(self, line: bytes) -> None:
        if line[:1] == b":":
            self._has_comment = True
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value

    def _dispatch(self, end: int) -> SSEEvent | None:
        raw = bytes(self._buf[self._start:end])
        self._start = end
        data, event, comment = self._data, self._event, self._has_comment
        self._data, self._event, self._has_comment = [], None, False
        if data:
            text = b"\n".join(data).decode("utf-8", "replace")
            return SSEEvent(raw=raw, data=text,
                            event=event.decode("utf-8", "replace") if event is not None else None)
        if event is not None:
            return SSEEvent(raw=raw, event=event.decode("utf-8", "replace"))
        return SSEEvent(raw=raw, comment=comment)
