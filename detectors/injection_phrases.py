"""The injection phrase book: normalisation with offset maps, tokens, and sentence scoring.

Why a separate module: the same scorer judges untrusted request text (to find planted spans)
and model output (propagation), so both sides must normalise, tokenise and weigh phrases
identically. The phrase list itself is data (``detectors/data/injection_phrases.yaml``),
compiled once into two RE2 sets (word stream, punctuated text); a request pays one set
match per region, and only patterns the set reports are run again for positions.

Offsets: every function takes raw text and returns raw offsets. Normalisation (NFKC,
confusables, case folding, dropping invisible characters) can change lengths, so
``normalise_with_map`` returns the raw index of every normalised character.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import re2
import yaml

from detectors.text import normalise

DEFAULT_PHRASES = "injection_phrases.yaml"

# Scripts written without spaces: one token per character (shingles become character n-grams).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+(?:'[^\W_{_CJK}]+)?")
_CJK_CHAR = re.compile(rf"[{_CJK}]")
# ASCII bytes that are not word characters become a space in the "gapped" word stream.
_GAP_BYTES = bytes(
    b if (chr(b).isalnum() and b < 128) else 32 for b in range(256)
)
_NONWORD = re.compile(r"[^\w]|_")
# Echo tokens: runs of non-space characters of the gapped text, one token per CJK character.
_ECHO_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s)|[。！？]+|\n")
_QUOTES = frozenset("\"'`“”„«»「」『』‘’‹›")
_SENTENCE_CAP_CHARS = 300  # a planted span reaches at most this far either side of its hits


class _NormTable(dict[str, str]):
    """Per-character normalisation, filled on first sight of each character so that a text is
    normalised by one C-level ``map`` over dictionary hits; bounded in size."""

    def __missing__(self, ch: str) -> str:
        # case-fold first: ``normalise`` folds confusables before case, so a capital Cyrillic
        # "О" would otherwise survive as "о" instead of becoming "o"
        v = normalise(ch.casefold())
        if len(self) < 65536:
            self[ch] = v
        return v


_NORM = _NormTable()
_norm_char = _NORM.__getitem__


def normalise_with_map(text: str) -> tuple[str, list[int] | None]:
    """``detectors.text.normalise`` applied per character, with the raw index of every output
    character; the map is ``None`` when offsets are unchanged (every character maps to
    exactly one), which is the case for almost all text."""
    if text.isascii():
        return text.lower(), None
    mapped = list(map(_norm_char, text))
    lengths = list(map(len, mapped))
    if min(lengths) == 1 == max(lengths):
        return "".join(mapped), None
    idx: list[int] = []
    for i, n in enumerate(lengths):
        if n == 1:
            idx.append(i)
        elif n:
            idx.extend([i] * n)
    return "".join(mapped), idx


class _GapTable(dict[int, int]):
    """``str.translate`` table filled on first sight of each code point (C-speed lookups
    afterwards); bounded so that a text of many distinct characters cannot grow it forever."""

    def __missing__(self, cp: int) -> int:
        v = cp if chr(cp).isalnum() else 32
        if len(self) < 65536:
            self[cp] = v
        return v


_GAP_TABLE = _GapTable()


def gapped(norm: str) -> str:
    """Same length as ``norm``; every non-word character becomes a space, so phrases match
    regardless of punctuation ("ignore -- previous" == "ignore previous")."""
    if norm.isascii():
        return norm.encode("ascii").translate(_GAP_BYTES).decode("ascii")
    return norm.translate(_GAP_TABLE)


def raw_span(idx: list[int] | None, s: int, e: int) -> tuple[int, int]:
    """Raw offsets of normalised span ``[s, e)``."""
    if idx is None:
        return s, e
    if e <= s:
        r = idx[s] if s < len(idx) else (idx[-1] + 1 if idx else 0)
        return r, r
    return idx[s], idx[e - 1] + 1


def tokens(text: str, base: int = 0) -> list[tuple[str, int, int]]:
    """Normalised tokens of raw ``text`` with raw offsets (plus ``base``)."""
    norm, idx = normalise_with_map(text)
    out: list[tuple[str, int, int]] = []
    if idx is None:
        for m in TOKEN.finditer(norm):
            out.append((m.group(), base + m.start(), base + m.end()))
        return out
    for m in TOKEN.finditer(norm):
        s, e = raw_span(idx, m.start(), m.end())
        out.append((m.group(), base + s, base + e))
    return out


_URL = re.compile(r"(?i)\b(?:https?|ftp):(?:\\?/){2}([^\s/?#<>\"'`\\(){}\[\]|^]+)[^\s<>\"'`(){}\[\]|^]*")


def _echo_split(text: str) -> tuple[str, list[int] | None, str]:
    norm, idx = normalise_with_map(text)
    return norm, idx, gapped(norm)


def _has_url(text: str) -> bool:
    return "://" in text or ":\\/\\/" in text


def echo_tokens(text: str, base: int = 0) -> list[tuple[str, int, int]]:
    """Echo tokens of raw ``text`` with raw offsets (plus ``base``): runs of word characters
    of the gapped normalised text (one token per CJK character), with every URL collapsed
    into one token (its host), so that a copied URL counts as one word rather than six."""
    _, idx, g = _echo_split(text)
    toks = []
    for m in _ECHO_TOKEN.finditer(g):
        s, e = raw_span(idx, m.start(), m.end())
        toks.append((m.group(), base + s, base + e))
    if not _has_url(text):
        return toks
    urls = [(base + m.start(), base + m.end(), m.group(1).lower()) for m in _URL.finditer(text)]
    out: list[tuple[str, int, int]] = []
    i = 0
    for tok in toks:
        while i < len(urls) and urls[i][1] <= tok[1]:
            i += 1
        if i < len(urls) and urls[i][0] <= tok[1]:
            s, e, host = urls[i]
            if not out or out[-1][1] != s:
                out.append((host, s, e))
            continue
        out.append(tok)
    return out


def echo_words(text: str) -> list[str]:
    """The words of ``echo_tokens`` without offsets; ``str.split`` on ASCII text without URLs
    (the common case), which is several times cheaper than building match objects."""
    if text.isascii() and not _has_url(text):
        return gapped(text.lower()).split()
    return [t for t, _, _ in echo_tokens(text)]


def fast_normalise(text: str) -> str:
    """``normalise_with_map(text)[0]`` without building the offset map."""
    if text.isascii():
        return text.lower()
    return "".join(map(_norm_char, text))


def token_words(text: str) -> list[str]:
    """Normalised tokens only (cheaper than ``tokens`` when offsets are not needed)."""
    return TOKEN.findall(fast_normalise(text))


def sentence_bounds(raw: str, s: int, e: int, cap: int = _SENTENCE_CAP_CHARS) -> tuple[int, int]:
    """The sentence (or line) around ``raw[s:e]``, at most ``cap`` characters either side."""
    lo = max(0, s - cap)
    start = lo
    for m in _SENTENCE_END.finditer(raw, lo, s):
        start = m.end()
    if start == lo and lo > 0:
        # capped: begin at a word boundary inside the window
        sp = raw.find(" ", lo, s)
        start = sp + 1 if sp >= 0 else lo
    hi = min(len(raw), e + cap)
    m = _SENTENCE_END.search(raw, e, hi)
    end = m.end() if m else hi
    while start < end and raw[start].isspace():
        start += 1
    while end > start and raw[end - 1].isspace():
        end -= 1
    return start, max(end, e)


def split_sentences(raw: str, start: int, end: int) -> list[tuple[int, int]]:
    """Sentences inside ``raw[start:end]`` (whitespace-trimmed, non-empty)."""
    out: list[tuple[int, int]] = []
    pos = start
    for m in _SENTENCE_END.finditer(raw, start, end):
        out.append((pos, m.end()))
        pos = m.end()
    if pos < end:
        out.append((pos, end))
    trimmed = []
    for s, e in out:
        while s < e and raw[s].isspace():
            s += 1
        while e > s and raw[e - 1].isspace():
            e -= 1
        if e > s:
            trimmed.append((s, e))
    return trimmed


def is_quoted(raw: str, s: int, e: int) -> bool:
    """True when ``raw[s:e]`` is tightly enclosed in quotes: a mention, not a use."""
    i = s - 1
    while i >= 0 and s - i <= 3 and raw[i] in " \t":
        i -= 1
    if i < 0 or raw[i] not in _QUOTES:
        return False
    if raw[i] in "'’" and i > 0 and raw[i - 1].isalnum():
        return False  # an apostrophe, not a quote
    j = e
    n = len(raw)
    while j < n and j - e < 3 and raw[j] in " .,;:!?…":
        j += 1
    return j < n and raw[j] in _QUOTES


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    lang: str
    style: str
    weight: float


@dataclass(frozen=True, slots=True)
class Hit:
    entry: int  # index into PhraseBook.entries
    start: int  # raw offsets
    end: int
    encoded: bool = False  # found in the rot13 view


@dataclass(slots=True)
class Cluster:
    """Nearby sentences with phrase hits; ``contrib`` is the best weight per entry."""

    start: int
    end: int
    contrib: dict[int, float] = field(default_factory=dict)
    sentences: list[tuple[int, int]] = field(default_factory=list)
    encoded: bool = False
    fired: bool = False

    @property
    def score(self) -> float:
        return sum(self.contrib.values())


class Clusterer:
    """Merges scored sentences that lie within ``gap_chars`` of each other, in order.

    Used identically on request text (all sentences with hits) and on output (sentences as
    they complete), so the two sides agree on what counts as instruction-like.
    """

    __slots__ = ("_gap", "_threshold", "clusters")

    def __init__(self, threshold: float, gap_chars: int) -> None:
        self._threshold = threshold
        self._gap = gap_chars
        self.clusters: list[Cluster] = []

    def add(self, start: int, end: int, contrib: Mapping[int, float], encoded: bool = False
            ) -> Cluster | None:
        """Adds one sentence; returns its cluster when the cluster first reaches the threshold."""
        if not contrib:
            return None
        last = self.clusters[-1] if self.clusters else None
        if last is None or start - last.end > self._gap:
            last = Cluster(start, end)
            self.clusters.append(last)
            if len(self.clusters) > 64:  # bounded memory on very long outputs
                del self.clusters[0]
        last.end = max(last.end, end)
        last.sentences.append((start, end))
        last.encoded = last.encoded or encoded
        for k, w in contrib.items():
            if w > last.contrib.get(k, 0.0):
                last.contrib[k] = w
        if not last.fired and last.score >= self._threshold - 1e-9:
            last.fired = True
            return last
        return None


def _as_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError(f"{what} must be a string or a list of strings")


def _fold_pattern(src: str) -> str:
    """Apply the text normalisation to the non-ASCII letters of a pattern (escapes and
    metacharacters are ASCII and stay as written)."""
    return "".join(ch if ch < "\x80" else (_norm_char(ch) or ch) for ch in src)


def _words_regex(src: str, boundary: bool) -> str:
    body = _fold_pattern(src).replace(" ", "[ ]+")
    return f"(?:^|[ ])(?:{body})(?:[ ]|$)" if boundary else f"(?:{body})"


def _phrase_regex(phrase: str, boundary: bool) -> str:
    words = TOKEN.findall(normalise(phrase))
    if not words:
        raise ValueError(f"phrase {phrase!r} has no words")
    parts: list[str] = []
    for i, w in enumerate(words):
        if i and not (_CJK_CHAR.fullmatch(w) and _CJK_CHAR.fullmatch(words[i - 1])):
            parts.append("[ ]+")
        parts.append(re2.escape(gapped(w)).replace("\\ ", "[ ]+"))
    body = "".join(parts)
    return f"(?:^|[ ])(?:{body})(?:[ ]|$)" if boundary else f"(?:{body})"


class _PatternSet:
    """An RE2 set for "which patterns match at all" plus each pattern for positions."""

    __slots__ = ("_owners", "_patterns", "_set")

    def __init__(self) -> None:
        self._set: Any = None
        self._patterns: list[Any] = []
        self._owners: list[int] = []

    def add(self, regex: str, owner: int, where: str) -> None:
        src = "(?i)" + regex
        try:
            compiled = re2.compile(src)
        except re2.error as exc:
            raise ValueError(f"{where}: invalid pattern {regex!r}: {exc}") from exc
        self._patterns.append(compiled)
        self._owners.append(owner)

    def compile(self) -> None:
        if not self._patterns:
            return
        s = re2.Set.SearchSet()
        for p in self._patterns:
            s.Add(p.pattern)
        s.Compile()
        self._set = s

    def finditer(self, text: str) -> Iterable[tuple[int, int, int]]:
        """(owner, start, end) for every match of every matching pattern."""
        if self._set is None or not text:
            return
        matched = self._set.Match(text)
        if not matched:
            return
        for i in matched:
            owner = self._owners[i]
            for m in self._patterns[i].finditer(text):
                yield owner, m.start(), m.end()

    def any(self, text: str) -> bool:
        return self._set is not None and bool(text) and bool(self._set.Match(text))


@dataclass(frozen=True, slots=True)
class Payload:
    id: str
    source: str  # RE2 syntax, matched case-insensitively
    regex: Any  # the compiled re2 pattern


class PhraseBook:
    """Compiled phrase list. Built once per detector; immutable afterwards."""

    def __init__(self, docs: list[Mapping[str, Any]]) -> None:
        by_id: dict[str, tuple[Entry, list[tuple[str, str]]]] = {}
        mention_cues: list[str] = []
        conditional_cues: list[str] = []
        payloads: dict[str, str] = {}
        self.mention_factor = 0.4
        self.conditional_factor = 0.6
        for doc in docs:
            if not isinstance(doc, Mapping):
                raise ValueError("phrase file must be a mapping with an 'entries' list")
            self.mention_factor = float(doc.get("mention_factor", self.mention_factor))
            self.conditional_factor = float(doc.get("conditional_factor", self.conditional_factor))
            mention_cues += _as_list(doc.get("mention_cues"), "mention_cues")
            conditional_cues += _as_list(doc.get("conditional_cues"), "conditional_cues")
            for p in doc.get("payloads") or []:
                payloads[str(p["id"])] = str(p["regex"])
            for raw in doc.get("entries") or []:
                if not isinstance(raw, Mapping) or "id" not in raw:
                    raise ValueError(f"phrase entry without id: {raw!r}")
                eid = str(raw["id"])
                unknown = set(raw) - {"id", "lang", "style", "weight", "boundary", "phrases",
                                      "words", "text"}
                if unknown:
                    raise ValueError(f"phrase entry {eid}: unknown keys {sorted(unknown)}")
                weight = float(raw.get("weight", 1.0))
                if not 0.0 < weight <= 2.0:
                    raise ValueError(f"phrase entry {eid}: weight must be in (0, 2]")
                boundary = bool(raw.get("boundary", True))
                pats: list[tuple[str, str]] = []
                for ph in _as_list(raw.get("phrases"), f"{eid}.phrases"):
                    pats.append(("words", _phrase_regex(ph, boundary)))
                for w in _as_list(raw.get("words"), f"{eid}.words"):
                    pats.append(("words", _words_regex(w, boundary)))
                for t in _as_list(raw.get("text"), f"{eid}.text"):
                    pats.append(("text", _fold_pattern(t)))
                if not pats:
                    raise ValueError(f"phrase entry {eid}: needs phrases, words or text")
                entry = Entry(eid, str(raw.get("lang", "any")), str(raw.get("style", "override")),
                              weight)
                by_id[eid] = (entry, pats)
        self.entries: tuple[Entry, ...] = tuple(e for e, _ in by_id.values())
        self._words = _PatternSet()
        self._text = _PatternSet()
        for i, (entry, pats) in enumerate(by_id.values()):
            for kind, regex in pats:
                (self._words if kind == "words" else self._text).add(regex, i, entry.id)
        self._words.compile()
        self._text.compile()
        self._mention = _PatternSet()
        for cue in mention_cues:
            self._mention.add(_words_regex(cue, True), 0, "mention_cues")
        self._mention.compile()
        self._conditional = (
            re2.compile("(?i)(?:^|[ ])(?:" + "|".join(_fold_pattern(c) for c in conditional_cues) + ")[ ]")
            if conditional_cues else None
        )
        compiled = []
        for pid, rx in payloads.items():
            try:
                compiled.append(Payload(pid, rx, re2.compile("(?i)" + rx)))
            except re2.error as exc:
                raise ValueError(f"payload {pid}: invalid pattern {rx!r}: {exc}") from exc
        self.payloads: tuple[Payload, ...] = tuple(compiled)

    @classmethod
    def load(cls, extra_file: str | None = None) -> PhraseBook:
        text = resources.files("detectors").joinpath("data", DEFAULT_PHRASES).read_text("utf-8")
        docs = [yaml.safe_load(text)]
        if extra_file:
            docs.append(yaml.safe_load(Path(extra_file).read_text("utf-8")))
        return cls(docs)

    # ------------------------------------------------------------------ matching
    def hits(self, raw: str, rot13: bool = False) -> list[Hit]:
        """Phrase hits in ``raw`` (raw offsets), tightly quoted mentions dropped."""
        norm, idx = normalise_with_map(raw)
        g = gapped(norm)
        found: list[Hit] = []
        for owner, s, e in self._words.finditer(g):
            s, e = _trim(g, s, e)
            found.append(Hit(owner, *raw_span(idx, s, e)))
        for owner, s, e in self._text.finditer(norm):
            s, e = _trim(norm, s, e)
            found.append(Hit(owner, *raw_span(idx, s, e)))
        if rot13:
            plain = {(h.entry, h.start) for h in found}
            r = codecs.encode(norm, "rot13")
            for owner, s, e in self._text.finditer(r):
                s, e = _trim(r, s, e)
                hit = Hit(owner, *raw_span(idx, s, e), encoded=True)
                if (owner, hit.start) not in plain:
                    found.append(hit)
            plain = {(h.entry, h.start) for h in found}
            r = codecs.encode(g, "rot13")
            for owner, s, e in self._words.finditer(r):
                s, e = _trim(r, s, e)
                hit = Hit(owner, *raw_span(idx, s, e), encoded=True)
                if (owner, hit.start) not in plain:
                    found.append(hit)
        return [h for h in found if h.end > h.start and not is_quoted(raw, h.start, h.end)]

    # Styles that documentation also uses ("if you use Windows, ignore the previous
    # instructions"); an exfiltration request or a chat-template token is not documentation
    # even inside a condition.
    _CONDITIONAL_STYLES = frozenset({"override", "persona", "tool", "secrecy", "propagation"})

    def score_sentence(self, sentence: str, hits: Sequence[Hit]) -> dict[int, float]:
        """Best weight per entry for the hits of one sentence, after down-weighting mentions
        (sentences about injection) and conditional documentation. A condition on being a
        model ("If you are an AI assistant, ...") is not documentation."""
        if not hits:
            return {}
        g = gapped(fast_normalise(sentence))
        mention = self.mention_factor if self._mention.any(g) else 1.0
        conditional = (
            self._conditional is not None and self._conditional.search(g) is not None
            and not any(self.entries[h.entry].style == "addressee" for h in hits)
        )
        out: dict[int, float] = {}
        for h in hits:
            entry = self.entries[h.entry]
            w = entry.weight * mention
            if conditional and entry.style in self._CONDITIONAL_STYLES:
                w *= self.conditional_factor
            if w > out.get(h.entry, 0.0):
                out[h.entry] = w
        return out

    def clusters(self, raw: str, threshold: float, gap_chars: int, rot13: bool = False
                 ) -> list[Cluster]:
        """Instruction-like clusters in ``raw`` whose score reaches ``threshold``."""
        hits = self.hits(raw, rot13=rot13)
        if not hits:
            return []
        by_sentence: dict[tuple[int, int], list[Hit]] = {}
        for h in sorted(hits, key=lambda h: (h.start, h.end)):
            by_sentence.setdefault(sentence_bounds(raw, h.start, h.end), []).append(h)
        cl = Clusterer(threshold, gap_chars)
        for (s, e), hs in sorted(by_sentence.items()):
            contrib = self.score_sentence(raw[s:e], hs)
            cl.add(s, e, contrib, encoded=any(h.encoded for h in hs))
        return [c for c in cl.clusters if c.fired]

    def styles(self, cluster: Cluster) -> list[str]:
        return sorted({self.entries[i].style for i in cluster.contrib})

    def langs(self, cluster: Cluster) -> list[str]:
        return sorted({self.entries[i].lang for i in cluster.contrib} - {"any"})


def _trim(text: str, s: int, e: int) -> tuple[int, int]:
    while s < e and text[s] == " ":
        s += 1
    while e > s and text[e - 1] == " ":
        e -= 1
    return s, e
