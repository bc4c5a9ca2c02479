"""``system_prompt_leak``: the output reproduces a substantial part of the request's system or
developer messages, verbatim or lightly edited.

How: both sides are cut into normalised words and hashed as ``k``-word shingles. The detector
counts how many *distinct* shingles of the system prompt the output reproduces; when that count
crosses the threshold it reports the overlapping fraction and the span of the output from the
start of the leaking region to the shingle that crossed it.

Why shingles rather than an edit distance: a k-word window survives reordering of paragraphs,
interleaved commentary and edits elsewhere, costs one hash per output word, and needs no text
of the prompt at run time (only hashes), so the per-response state is a set of integers.

This module also holds the streaming word tokenizer and shingle stream that ``cross_tenant``
reuses: both sides of every comparison must be tokenised by exactly the same code.

Streaming and enforcement. A shingle-based leak is only *known* once enough of it has been
seen: the text before the crossing point has normally been released already, whatever the
hold-back window. ``lookback_chars`` is therefore 0 by default and configurable; with action
``block`` the stream ends as soon as the threshold is crossed, which bounds the leak to roughly
the threshold's worth of text. With ``redact`` on a non-streaming response the two findings
(threshold part and tail) together cover the leaking region.

Findings, at most two per channel, and both depend only on the text, never on chunking:
- ``stage=threshold``: emitted when the distinct-shingle count first reaches the threshold;
  span = start of the current leaking region (matches separated by at most ``max_gap_words``)
  to the end of the crossing shingle; score = overlap fraction at that point.
- ``stage=final``: emitted at finish only if matching text continued after the crossing;
  span = from the crossing point to the end of the last matching shingle; score = the final
  overlap fraction of the whole channel.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections import deque
from collections.abc import Iterable
from functools import lru_cache
from typing import ClassVar, Literal

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
from detectors.redaction import placeholder
from detectors.stream_scan import BufferedScan
from detectors.text import normalise

NAME = "system_prompt_leak"

SeverityName = Literal["low", "medium", "high", "critical"]

# --------------------------------------------------------------------------------------------
# Word tokens
#
# ``detectors.text.word_spans`` splits words at combining marks (Python's ``\w`` excludes them,
# so Devanagari or decomposed accents fall apart) and at zero-width characters (so
# ``Y\u200bou are`` dodges a match). The token pattern below keeps marks and format characters
# inside a word (``normalise`` then drops the format characters), and makes every Han, kana
# character its own token so that unspaced Chinese/Japanese text still yields shingles.


def _mark_class() -> str:
    """A character class of every combining mark and format character (categories M*, Cf).

    Built from ``unicodedata`` at import (about 20 ms) so it follows Python's Unicode version
    instead of a hand-copied table. Nothing above U+1FFFF is a mark except the tag and
    variation-selector block at U+E0000.
    """
    cps = [cp for cp in range(0x20000) if unicodedata.category(chr(cp))[0] == "M"
           or unicodedata.category(chr(cp)) == "Cf"]
    cps += range(0xE0000, 0xE1000)
    parts: list[str] = []
    start = prev = cps[0]
    for cp in [*cps[1:], -1]:
        if cp == prev + 1:
            prev = cp
            continue
        parts.append(re.escape(chr(start)) if start == prev
                     else f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
        start = prev = cp
    return "[" + "".join(parts) + "]"


_CJK = "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003ffff"
_MARK = _mark_class()
_LETTER = rf"[^\W_{_CJK}]"
_RUN = rf"{_LETTER}+(?:{_MARK}+{_LETTER}*)*"
_TOKEN = re.compile(rf"[{_CJK}]{_MARK}*|{_RUN}(?:['\u2019]{_RUN})?")
_CJK_CHAR = re.compile(f"[{_CJK}]")
# The same pattern restricted to ASCII text (no marks, CJK or curly apostrophes), twice as fast
_ASCII_TOKEN = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z0-9]+)?")

MAX_WORD_CHARS = 100
"""Longer "words" (base64 blobs, hex dumps) are not words: they become a break between
shingles, and the tokenizer keeps at most this many characters of a pending word."""

Token = tuple[str | None, int, int]
"""(normalised word, start, end) with absolute offsets; word ``None`` is a break (overlong
word) across which no shingle is formed."""


def _norm(word: str) -> str:
    # Fold case first: ``normalise`` maps confusables before folding, so capital look-alikes
    # (Cyrillic "О") would otherwise survive.
    return normalise(word.casefold())


class WordStream(BufferedScan[Token]):
    """Incremental tokenizer: yields each word once it is *settled* (the character after it has
    arrived, or the stream finished), so the words never depend on chunk boundaries.

    Memory is bounded: only the pending word (at most ``MAX_WORD_CHARS``, plus a 3-character
    stand-in for an overlong one) and the new text are kept; work per ``feed`` is proportional to
    that.
    """

    __slots__ = ("_base", "_long_start")

    def __init__(self) -> None:
        self._buf = ""
        self._base = 0  # absolute offset of _buf[0] (may be "virtual" while a stand-in leads)
        self._long_start: int | None = None  # absolute start of an overlong word in progress
        self._done = False

    def _scan(self, final: bool) -> list[Token]:
        buf, base = self._buf, self._base
        n = len(buf)
        undecided = n if final else n - 1  # a word ending at or after this may still grow
        out: list[Token] = []
        append = out.append
        for m in (_ASCII_TOKEN if buf.isascii() else _TOKEN).finditer(buf):
            s, e = m.span()
            long_start = self._long_start
            start = long_start if long_start is not None and s == 0 else base + s
            # One character of look-ahead decides a word: after it a letter or mark would have
            # been eaten, and an apostrophe continues the word only if a letter follows it.
            if e >= undecided and not final:
                self._long_start = None
                if base + e - start > MAX_WORD_CHARS:
                    # Replace the pending overlong word by a stand-in that continues exactly
                    # as it would (same pattern state), so memory stays bounded.
                    word = m.group()
                    if _CJK_CHAR.match(word):
                        stub = "\u4e00"
                    elif "'" in word or "\u2019" in word:
                        stub = "x'x"
                    else:
                        stub = "x"
                    self._long_start = start
                    self._buf = stub + buf[e:]
                    self._base = base + e - len(stub)
                else:
                    self._buf = buf[s:]
                    self._base = base + s
                return out
            self._long_start = None
            end = base + e
            if end - start > MAX_WORD_CHARS:
                append((None, start, end))
            else:
                word = m.group()
                # ASCII needs no NFKC, has no format or confusable characters, casefold == lower
                append((word.lower() if word.isascii() else _norm(word), start, end))
        # nothing pending: what is left cannot start a word (a word starts with a letter)
        self._buf = ""
        self._base = base + n
        return out

    def pending_start(self) -> int:
        """The earliest offset at which a word not yet settled can start."""
        return self._long_start if self._long_start is not None else self._base


def tokenize(text: str) -> list[Token]:
    """Tokens of a whole text, exactly as the streaming tokenizer yields them."""
    stream = WordStream()
    return stream.feed(text) + stream.finish()


Shingle = tuple[int, int, int, int]
"""(hash, start, end, word index of the last word) of one k-word window."""


_MASK64 = (1 << 64) - 1
_MULT = 0x9E3779B97F4A7C15  # odd 64-bit multiplier of the rolling polynomial


@lru_cache(maxsize=1 << 16)
def word_hash(word: str) -> int:
    """Stable 64-bit hash of a normalised word (cached: word frequencies are Zipfian)."""
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")


class ShingleStream:
    """k-word shingles of a growing text, each hashed once when its last word settles.

    The shingle hash is a rolling polynomial over the words' hashes, ``sum(w_i * M^(k-1-i))
    mod 2^64``: stable across processes (the cross-tenant registry is shared between replicas)
    and O(1) per word, about three times cheaper than hashing every window with blake2b.
    """

    __slots__ = ("_count", "_hash", "_high", "_k", "_window", "_words")

    def __init__(self, k: int) -> None:
        self._k = k
        self._words = WordStream()
        self._window: deque[tuple[int, int]] = deque()  # (word hash, start)
        self._hash = 0
        self._high = pow(_MULT, k - 1, 1 << 64)  # weight of the word leaving the window
        self._count = 0

    def feed(self, text: str) -> list[Shingle]:
        return self._shingles(self._words.feed(text))

    def finish(self) -> list[Shingle]:
        return self._shingles(self._words.finish())

    @property
    def words(self) -> int:
        """Words (and breaks) settled so far: the word index of the last shingle."""
        return self._count

    def pending_start(self) -> int:
        """The earliest offset at which a shingle not yet emitted can start: its first word
        is one of the last ``k - 1`` settled words, or a word still to come."""
        window = self._window
        if window:
            return window[-(self._k - 1)][1] if len(window) >= self._k - 1 else window[0][1]
        return self._words.pending_start()

    def _shingles(self, tokens: list[Token]) -> list[Shingle]:
        out: list[Shingle] = []
        if not tokens:
            return out
        append = out.append
        window, k, h, high, count = self._window, self._k, self._hash, self._high, self._count
        size = len(window)
        for word, start, end in tokens:
            count += 1
            if word is None:
                window.clear()
                h = size = 0
                continue
            wh = word_hash(word)
            if size == k:
                h -= window.popleft()[0] * high
            else:
                size += 1
            h = (h * _MULT + wh) & _MASK64
            window.append((wh, start))
            if size == k:
                append((h, window[0][1], end, count))
        self._hash, self._count = h, count
        return out


def text_shingles(text: str, k: int) -> list[Shingle]:
    """Shingles of a whole text (no shingle when it has fewer than ``k`` words)."""
    stream = ShingleStream(k)
    return stream.feed(text) + stream.finish()


@lru_cache(maxsize=256)
def shingle_windows(text: str, k: int) -> tuple[tuple[int, int], ...]:
    """``(hash, index of the window's last word)`` for every shingle of ``text``, in order.
    Cached: the same system prompts and documents come with request after request, and hashing
    a long prompt costs milliseconds."""
    return tuple((h, i) for h, _, _, i in text_shingles(text, k))


@lru_cache(maxsize=256)
def shingle_set(text: str, k: int) -> frozenset[int]:
    """Distinct shingle hashes of ``text``."""
    return frozenset(h for h, _ in shingle_windows(text, k))


def countable_shingles(text: str, k: int, ignore: frozenset[int] | set[int]) -> frozenset[int]:
    """Shingles of ``text`` that are not wholly made of ignored text.

    A shingle is dropped when every one of its words lies inside some shingle whose hash is in
    ``ignore``. Dropping only the ignored hashes themselves would keep the shingles that
    straddle two ignored phrases ("... helpful assistant. Use the following ...").
    """
    windows = shingle_windows(text, k)
    hits = [i for h, i in windows if h in ignore]
    if not hits:
        return shingle_set(text, k)
    covered: set[int] = set()
    for i in hits:
        covered.update(range(i - k + 1, i + 1))
    return frozenset(h for h, i in windows
                     if not all(j in covered for j in range(i - k + 1, i + 1)))


# Phrases found in countless system prompts (framework defaults, tutorials). An output that
# repeats them says nothing about *this* prompt, so their shingles are not counted.
BOILERPLATE_PHRASES: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a helpful, respectful and honest assistant.",
    "You are a helpful AI assistant.",
    "You are ChatGPT, a large language model trained by OpenAI.",
    "Always answer as helpfully as possible, while being safe.",
    "Use the following pieces of context to answer the question at the end.",
    "Use the following pieces of retrieved context to answer the question.",
    "Answer the question based only on the following context.",
    "If you don't know the answer, just say that you don't know, don't try to make up an answer.",
    "If you don't know the answer, say that you don't know.",
    "Use three sentences maximum and keep the answer concise.",
    "Let's think step by step.",
    "If a question does not make any sense, or is not factually coherent, explain why instead "
    "of answering something not correct.",
    "If you don't know the answer to a question, please don't share false information.",
    "Please ensure that your responses are socially unbiased and positive in nature.",
    "Do not make up an answer.",
    "Answer in the same language as the question.",
    "Please let me know if you have any other questions.",
    "I'm sorry, but I can't help with that.",
)


@lru_cache(maxsize=8)
def boilerplate_shingles(k: int) -> frozenset[int]:
    """Shingle hashes of ``BOILERPLATE_PHRASES`` for window size ``k``."""
    return frozenset().union(*(shingle_set(p, k) for p in BOILERPLATE_PHRASES))


# --------------------------------------------------------------------------------------------
# Overlap bookkeeping shared with cross_tenant

MAX_TRACKED_SHINGLES = 65536
"""Distinct matched shingles remembered per source; beyond it counts stop growing (bounded
memory per response even for multi-megabyte outputs)."""


class OverlapTracker:
    """Distinct matched shingles of one source and the output region they cover.

    ``start`` is the start of the current leaking region: matches whose word positions are
    more than ``max_gap_words`` apart start a new region, so a stray common phrase early in a
    long answer does not stretch the span over everything in between.
    """

    __slots__ = ("fired_end", "last_end", "last_word", "matched", "start", "tail_start")

    def __init__(self) -> None:
        self.matched: set[int] = set()
        self.start = 0
        self.last_word = -(10**12)
        self.last_end = 0
        self.fired_end: int | None = None
        self.tail_start: int | None = None

    @property
    def count(self) -> int:
        return len(self.matched)

    def hit(self, shingle: Shingle, max_gap_words: int) -> None:
        h, start, end, word = shingle
        if word - self.last_word > max_gap_words:
            self.start = start
        self.last_word = word
        self.last_end = end
        if self.fired_end is not None and self.tail_start is None and end > self.fired_end:
            self.tail_start = max(start, self.fired_end)
        if len(self.matched) < MAX_TRACKED_SHINGLES:
            self.matched.add(h)

    def fire(self) -> tuple[int, int]:
        """Mark the threshold as crossed; returns the threshold span."""
        self.fired_end = self.last_end
        return (self.start, self.last_end)

    def tail(self) -> tuple[int, int] | None:
        """Span of matching text after the crossing point, if any."""
        if self.fired_end is None or self.tail_start is None or self.last_end <= self.fired_end:
            return None
        return (self.tail_start, self.last_end)


# --------------------------------------------------------------------------------------------
# The detector


class PromptLeakConfig(DetectorConfig):
    """Settings of ``system_prompt_leak``.

    The threshold is ``max(min_shingles, ceil(min_overlap_fraction * prompt shingles))``,
    capped at ``max(min_shingles, sufficient_shingles)`` so that a long verbatim passage of a very
    long prompt still counts. Prompts with fewer than ``min_shingles`` countable shingles are not
    checked (a one-line "You are a helpful assistant." has nothing to leak).
    """

    detector_class: ClassVar[type[Detector]]

    roles: tuple[str, ...] = ("system", "developer")
    shingle_words: int = Field(5, ge=2, le=16)
    min_overlap_fraction: float = Field(0.3, gt=0.0, le=1.0)
    min_shingles: int = Field(8, ge=1)
    sufficient_shingles: int | None = Field(40, ge=1)
    max_gap_words: int = Field(40, ge=0)
    ignore_roles: tuple[str, ...] = ("user",)
    """Shingles that also occur in messages of these roles are not counted: repeating what the
    user wrote is not a leak."""
    ignore_builtin_boilerplate: bool = True
    ignore_phrases: tuple[str, ...] = ()
    severity: SeverityName = "high"
    lookback_chars: int = Field(0, ge=0)


class _Prepared:
    """Per-response view of the system prompt.

    ``base`` (prompt shingles minus boilerplate) is cheap: cached per prompt text. Removing
    what the user wrote needs the user messages hashed, which can be thousands of words of
    pasted context per request; it is done only when the output first matches ``base``, which
    most responses never do. The result depends only on the request, so when it is computed
    does not change any finding.
    """

    __slots__ = ("_det", "_known_texts", "_prompt_texts", "base", "prompt", "threshold")

    def __init__(self, det: PromptLeakDetector, base: frozenset[int],
                 prompt_texts: tuple[str, ...], known_texts: tuple[str, ...]) -> None:
        self._det = det
        self.base = base
        self._prompt_texts = prompt_texts
        self._known_texts = known_texts
        self.prompt: frozenset[int] | None = None
        self.threshold = 0

    def resolve(self) -> frozenset[int]:
        if self.prompt is None:
            self.prompt = self._det.countable(self._prompt_texts, self._known_texts)
            self.threshold = self._det.threshold(len(self.prompt))
        return self.prompt


class PromptLeakDetector(Detector):
    name = NAME

    def __init__(self, config: DetectorConfig) -> None:
        assert isinstance(config, PromptLeakConfig)
        super().__init__(config)
        self.cfg = config
        k = config.shingle_words
        ignore: set[int] = set()
        if config.ignore_builtin_boilerplate:
            ignore |= boilerplate_shingles(k)
        for phrase in config.ignore_phrases:
            ignore |= shingle_set(phrase, k)
        self._ignore = frozenset(ignore)
        self._severity = Severity[config.severity]

    @property
    def lookback_chars(self) -> int:
        return self.cfg.lookback_chars

    def countable(self, prompt_texts: Iterable[str], known_texts: Iterable[str] = ()) -> frozenset[int]:
        """Countable shingles of the system prompt: without boilerplate, ignored phrases and
        text the user sent (``known_texts``)."""
        k = self.cfg.shingle_words
        known: set[int] = set()
        for text in known_texts:
            known |= shingle_set(text, k)
        ignore = self._ignore | known if known else self._ignore
        prompt: set[int] = set()
        for text in prompt_texts:
            prompt |= countable_shingles(text, k, ignore)
        return frozenset(prompt)

    def threshold(self, total: int) -> int:
        """Distinct matching shingles needed for a prompt of ``total`` countable shingles."""
        cfg = self.cfg
        if total < cfg.min_shingles:
            return total + 1  # never
        need = max(cfg.min_shingles, math.ceil(cfg.min_overlap_fraction * total))
        if cfg.sufficient_shingles is not None:
            need = min(need, max(cfg.min_shingles, cfg.sufficient_shingles))
        return need

    def prepare(self, ctx: RequestContext) -> _Prepared | None:
        cfg = self.cfg
        prompt_texts = tuple(m.text for m in ctx.messages if m.role in cfg.roles)
        base = self.countable(prompt_texts)
        if len(base) < cfg.min_shingles:
            return None
        known_texts = tuple(m.text for m in ctx.messages
                            if m.role in cfg.ignore_roles and m.role not in cfg.roles)
        return _Prepared(self, base, prompt_texts, known_texts)

    def open_channel(self, prepared: _Prepared | None, channel: Channel) -> ChannelState | None:
        if prepared is None:
            return None
        return _PromptLeakState(self, prepared, channel)


class _PromptLeakState(ChannelState):
    __slots__ = ("_channel", "_det", "_done", "_p", "_stream", "_track")

    def __init__(self, det: PromptLeakDetector, prepared: _Prepared, channel: Channel) -> None:
        self._det = det
        self._p = prepared
        self._channel = channel
        self._stream = ShingleStream(det.cfg.shingle_words)
        self._track = OverlapTracker()
        self._done = False

    def feed(self, text: str) -> list[Finding]:
        return self._consume(self._stream.feed(text))

    def finish(self, end: StreamEnd) -> list[Finding]:
        if self._done:
            return []
        self._done = True
        out = self._consume(self._stream.finish())
        tail = self._track.tail()
        if tail is not None:
            out.append(self._finding(tail, "final"))
        return out

    def _consume(self, shingles: Iterable[Shingle]) -> list[Finding]:
        out: list[Finding] = []
        p, track, gap = self._p, self._track, self._det.cfg.max_gap_words
        for sh in shingles:
            if sh[0] not in p.base or sh[0] not in p.resolve():
                continue
            track.hit(sh, gap)
            if track.fired_end is None and track.count >= self._p.threshold:
                out.append(self._finding(track.fire(), "threshold"))
        return out

    def _finding(self, span: tuple[int, int], stage: str) -> Finding:
        total = len(self._p.resolve())
        n = self._track.count
        frac = n / total
        what = "reproduces" if stage == "threshold" else "keeps reproducing"
        return Finding(
            detector=NAME,
            category="system_prompt_leak",
            severity=self._det._severity,
            score=frac,
            message=f"output {what} the system prompt ({frac:.0%} of its {total} word shingles)",
            span=span,
            channel=self._channel,
            evidence=f"{n}/{total} shingles",
            replacement=placeholder("system_prompt"),
            attrs={"overlap_fraction": round(frac, 4), "matched_shingles": n,
                   "prompt_shingles": total, "stage": stage},
        )


PromptLeakConfig.detector_class = PromptLeakDetector

CONFIGS: dict[str, type[DetectorConfig]] = {NAME: PromptLeakConfig}
