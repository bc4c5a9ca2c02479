"""Injection-echo detection: outputs that repeat or obey instructions planted in the context.

Input side (``prepare``, once per request): the untrusted parts of the request — messages
with an untrusted role (tool/function results) and delimited retrieved content inside
user/system messages (``<document>…</document>``, fenced blocks, ``\"\"\"``, BEGIN/END) —
are scored against the phrase book (``detectors/data/injection_phrases.yaml``, several
languages; rot13 views; base64/hex blobs decoded and rescanned; text hidden in Unicode tag
characters decoded). Clusters of nearby sentences whose phrase weights reach
``planted_min_score`` become *planted spans*: (message index, start, end).

Output side, incremental per channel:

- ``echo``: the output reproduces a planted span (word shingles over normalised text);
- ``exfiltration``: Markdown/HTML images and links or bare URLs to hosts that the request
  does not mention (hosts mentioned only inside planted spans count as attacker hosts) and
  that ``allowed_hosts`` does not list, scored by how much conversation data the URL carries;
- ``tool_misuse``: tool-call arguments carrying a URL host, e-mail address or shell/SQL
  payload that came from a planted span rather than from the user;
- ``propagation``: the output itself is instruction-like text aimed at a downstream model;
- ``smuggling``: invisible Unicode (tag characters, bidi controls, zero-width characters).

Severities are chosen so that a policy of ``block`` with ``min_severity: high`` blocks
data-carrying or attacker-host exfiltration links/images and tool misuse, and nothing else;
echo, propagation and smuggling are ``medium``/``low`` (observe).

Only ``exfiltration``, ``tool_misuse`` (URLs, e-mails) and ``smuggling`` findings can be
redacted; ``lookback_chars`` is sized for them (see ``InjectionDetector.lookback_chars``).
Echo and propagation spans can be arbitrarily long and carry no replacement: block or
observe them.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import math
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import re2
from pydantic import Field, field_validator

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
from detectors.injection_links import (
    AFTER_CHARS,
    BEFORE_CHARS,
    EMAIL,
    EmailScanner,
    Link,
    LinkScanner,
    data_evidence,
    homograph_of,
    host_allowed,
    host_of,
    host_set,
    hosts_in,
    planted_parent,
    printable_text,
)
from detectors.injection_phrases import (
    Cluster,
    Clusterer,
    PhraseBook,
    echo_tokens,
    echo_words,
    sentence_bounds,
    split_sentences,
    token_words,
)
from detectors.injection_unicode import InvisibleScanner, runs_in
from detectors.redaction import mask, placeholder
from detectors.text import shingle_hash, shingles

NAME = "injection"
CATEGORIES = ("echo", "exfiltration", "tool_misuse", "propagation", "smuggling")

_DEFAULT_TAGS = (
    "document", "documents", "doc", "context", "search_results", "search_result", "results",
    "result", "retrieved", "retrieved_context", "source", "sources", "webpage", "web_page",
    "page", "email", "emails", "file", "files", "tool_result", "tool_output", "untrusted",
    "data", "article", "snippet", "excerpt", "quote", "transcript",
)
_DEFAULT_DELIMITERS = (
    ('"""', '"""'),
    ("```", "```"),
    ("~~~", "~~~"),
    (r"(?m)^[ \t=#*<\[-]*BEGIN\b[^\n]{0,60}$", r"(?m)^[ \t=#*<\[-]*END\b[^\n]{0,60}$"),
)
_CLUSTER_GAP_CHARS = 160  # sentences closer than this are judged together
_MAX_SENTENCE_CHARS = 1000  # output sentences are cut at this length
_MIN_TARGET_WORDS = 4  # shorter planted sentences are merged with the next for echo
_SMUGGLING_LOOKBACK = 257  # InvisibleScanner reports a 256-char piece on the 257th char
_MAX_ARGS_CHARS = 65536  # tool-call arguments kept for the payload scan at finish
# RE2 (linear time); runs are maximal by construction, so no look-around is needed.
_B64 = re2.compile(r"[A-Za-z0-9+/_-]{24,}={0,2}")
_HEX = re2.compile(r"(?:[0-9A-Fa-f]{2}){12,}")
_MAX_BLOB_CHARS = 16384
_STOP = frozenset((
    "the", "and", "for", "with", "from", "this", "that", "you", "your", "are", "was", "were",
    "have", "has", "not", "but", "all", "any", "can", "will", "about", "into", "more", "other",
    "some", "such", "than", "then", "them", "they", "what", "when", "where", "which", "who", "how",
    "why", "also", "just", "like", "only", "over", "very", "our", "out", "get", "set", "new", "one",
    "two", "yes", "its", "his", "her", "she", "him", "http", "https", "www", "com", "org", "net",
    "html",
))
_OUT_SENTENCE_END = re.compile(r"[.!?]+\s|[。！？]+|\n+")
_JSON_ESCAPE = re.compile(r"\\(.)|\\\Z", re.DOTALL)


class InjectionConfig(DetectorConfig):
    """Settings of the ``injection`` detector (YAML key ``injection``)."""

    detector_class: ClassVar[type[Detector]]

    # finding types to report (the enable switches); an empty list disables the detector
    categories: tuple[str, ...] = CATEGORIES
    # ---- input side: what is untrusted, and what counts as planted
    untrusted_roles: tuple[str, ...] = ("tool", "function", "ipython")  # whole message untrusted
    delimited_roles: tuple[str, ...] = ("user", "system", "developer")  # only delimited parts
    untrusted_tags: tuple[str, ...] = _DEFAULT_TAGS  # <document ...>...</document> etc.
    untrusted_delimiters: tuple[tuple[str, str], ...] = _DEFAULT_DELIMITERS  # RE2 (open, close)
    extra_phrases_file: str | None = None  # YAML in the format of data/injection_phrases.yaml
    planted_min_score: float = Field(default=1.0, gt=0.0, le=10.0)  # phrase weight to plant
    decode_payloads: bool = True  # decode base64/hex runs and rescan them
    max_decoded_blobs: int = Field(default=32, ge=0, le=1024)  # per request
    taint_window_chars: int = Field(default=300, ge=0, le=10_000)  # hosts/addresses this close
    # to a planted span are the attacker's, not the conversation's
    # ---- echo: fire when a planted sentence's distinct k-word shingles seen in the output reach
    # max(echo_min_shingles, min(ceil(echo_min_fraction * n), echo_enough_shingles)), capped at n
    echo_shingle_words: int = Field(default=4, ge=2, le=12)
    echo_min_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    echo_min_shingles: int = Field(default=3, ge=1, le=100)
    echo_enough_shingles: int = Field(default=5, ge=1, le=1000)
    # ---- exfiltration
    allowed_hosts: tuple[str, ...] = ()  # fnmatch globs, matched against the lower-cased host
    flag_unknown_images: bool = True  # report (medium) images from unknown hosts without data
    exfil_data_min_score: float = Field(default=2.0, gt=0.0, le=100.0)  # "carries data" cut-off
    max_url_chars: int = Field(default=380, ge=64, le=8192)  # longer URLs come in pieces
    # ---- propagation
    propagation_min_score: float = Field(default=1.0, gt=0.0, le=10.0)

    @field_validator("categories")
    @classmethod
    def _known_categories(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown categories {unknown}; valid: {list(CATEGORIES)}")
        return v

    @field_validator("untrusted_delimiters")
    @classmethod
    def _delimiters_compile(cls, v: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        for pair in v:
            for rx in pair:
                try:
                    re2.compile(rx)
                except re2.error as exc:
                    raise ValueError(f"untrusted_delimiters: invalid RE2 pattern {rx!r}: {exc}") from exc
        return v

    @field_validator("untrusted_tags")
    @classmethod
    def _tags_are_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for t in v:
            if not re.fullmatch(r"[A-Za-z][\w.:-]{0,63}", t):
                raise ValueError(f"untrusted_tags: {t!r} is not a tag name")
        return tuple(t.lower() for t in v)

    @field_validator("allowed_hosts")
    @classmethod
    def _lower_hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.strip().lower().removeprefix("www.") for h in v if h.strip())


# ------------------------------------------------------------------------------ planted spans


@dataclass(frozen=True, slots=True)
class PlantedSpan:
    """An instruction-like span found in untrusted request text.

    ``start``/``end`` are character offsets into ``ctx.messages[i].text`` of the message whose
    ``index`` is ``message_index``. ``encoding`` says how it was hidden: ``""`` (plain),
    ``rot13``, ``base64``, ``hex`` or ``tags`` (Unicode tag characters).
    """

    message_index: int
    start: int
    end: int
    score: float
    styles: tuple[str, ...]
    langs: tuple[str, ...]
    encoding: str = ""

    def attrs(self) -> dict[str, str | int | float | bool]:
        return {"message_index": self.message_index, "planted_start": self.start,
                "planted_end": self.end}


@dataclass(slots=True)
class _EchoIndex:
    """Shingles of every planted target, keyed by shingle length (short targets use their
    full length), with how many distinct shingles each target needs to count as echoed."""

    vocab: frozenset[str]
    sizes: tuple[int, ...]
    by_size: dict[int, dict[int, tuple[int, ...]]]
    need: list[int]
    total: list[int]
    span_of: list[int]


@dataclass(slots=True)
class _Artefacts:
    """Hosts, e-mails, payloads and vocabulary of the request; computed on first use because
    most outputs contain no URL and no tool call."""

    known_hosts: frozenset[str]
    planted_hosts: dict[str, int]
    planted_emails: dict[str, int]
    trusted_emails: frozenset[str]
    planted_payloads: list[tuple[str, int]]
    vocab: frozenset[str]
    values: frozenset[str]
    emails: frozenset[str]


@dataclass(slots=True)
class Prepared:
    """Per-request result of ``prepare``: read-only for channel states apart from the lazy
    ``_artefacts`` cache (one response is processed by one task)."""

    ctx: RequestContext
    spans: list[PlantedSpan]
    regions: dict[int, list[tuple[int, int]]]  # message index -> untrusted (start, end)
    decoded: dict[int, list[str]]  # span id -> hidden text it decoded to
    echo: _EchoIndex | None
    _artefacts: _Artefacts | None = field(default=None)


class InjectionDetector(Detector):
    name: ClassVar[str] = NAME
    judges_tool_calls: ClassVar[bool] = True

    def __init__(self, config: InjectionConfig) -> None:
        super().__init__(config)
        self.cfg = config
        self.book = PhraseBook.load(config.extra_phrases_file)
        self._cats = frozenset(config.categories)
        tags = "|".join(re.escape(t) for t in config.untrusted_tags)
        self._tag_open = re.compile(rf"(?i)<({tags})(?:\s[^<>]{{0,200}})?>") if tags else None
        self._delims = tuple((re2.compile(o), re2.compile(c)) for o, c in config.untrusted_delimiters)
        # one RE2 alternation: linear time over attacker-influenced tool arguments
        self._payload_rx = (
            re2.compile("(?i)" + "|".join(f"(?:{p.source})" for p in self.book.payloads))
            if self.book.payloads else None
        )

    # ---------------------------------------------------------------- hold-back window
    @property
    def lookback_chars(self) -> int:
        """Longest redactable construct: an image/link opening (≤ 90 chars before the URL),
        the URL (``max_url_chars``; longer URLs are reported in pieces of that size) and its
        closing part (≤ 42 chars): 512 with the defaults. Smuggling runs need 257."""
        need = 0
        if self._cats & {"exfiltration", "tool_misuse"}:
            need = BEFORE_CHARS + self.cfg.max_url_chars + AFTER_CHARS
        if "smuggling" in self._cats:
            need = max(need, _SMUGGLING_LOOKBACK)
        return need

    # ---------------------------------------------------------------- input side
    def untrusted_regions(self, role: str, text: str) -> list[tuple[int, int]]:
        """Character ranges of ``text`` that came from outside the conversation."""
        if role in self.cfg.untrusted_roles:
            return [(0, len(text))] if text else []
        if role not in self.cfg.delimited_roles or not text:
            return []
        found: list[tuple[int, int]] = []
        if self._tag_open is not None and "<" in text:
            low = text.lower()
            pos = 0
            while True:
                m = self._tag_open.search(text, pos)
                if m is None:
                    break
                close = low.find(f"</{m.group(1).lower()}", m.end())
                found.append((m.end(), close if close >= 0 else len(text)))
                pos = close + 1 if close >= 0 else len(text)
        for open_rx, close_rx in self._delims:
            pos = 0
            while pos < len(text):
                m = open_rx.search(text, pos)
                if m is None or m.end() == m.start():
                    break
                c = close_rx.search(text, m.end())
                found.append((m.end(), c.start() if c else len(text)))
                pos = c.end() if c and c.end() > m.end() else len(text)
        found.sort()
        merged: list[tuple[int, int]] = []
        for s, e in found:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            elif e > s:
                merged.append((s, e))
        return merged

    def scan_request(self, ctx: RequestContext) -> list[PlantedSpan]:
        """The planted spans of a request (also useful to the proxy for annotations)."""
        return self.prepare(ctx).spans

    def prepare(self, ctx: RequestContext) -> Prepared:
        spans: list[PlantedSpan] = []
        decoded: dict[int, list[str]] = {}
        targets: list[tuple[int, list[str]]] = []  # (span id, tokens)
        regions: dict[int, list[tuple[int, int]]] = {}
        budget = [self.cfg.max_decoded_blobs]
        for msg in ctx.messages:
            rs = self.untrusted_regions(msg.role, msg.text)
            if not rs:
                continue
            regions[msg.index] = rs
            for r0, r1 in rs:
                self._scan_region(msg.index, msg.text, r0, r1, spans, decoded, targets, budget)
        # the shingle index also ties propagation/smuggling findings to planted spans
        wants = self._cats & {"echo", "propagation", "smuggling"}
        echo = self._echo_index(targets) if targets and wants else None
        return Prepared(ctx, spans, regions, decoded, echo)

    def _scan_region(self, mi: int, text: str, r0: int, r1: int, spans: list[PlantedSpan],
                     decoded: dict[int, list[str]], targets: list[tuple[int, list[str]]],
                     budget: list[int]) -> None:
        region = text[r0:r1]
        book, thr = self.book, self.cfg.planted_min_score
        for c in book.clusters(region, thr, _CLUSTER_GAP_CHARS, rot13=True):
            sid = len(spans)
            spans.append(PlantedSpan(mi, r0 + c.start, r0 + c.end, round(c.score, 3),
                                     tuple(book.styles(c)), tuple(book.langs(c)),
                                     "rot13" if c.encoded else ""))
            for toks in _targets(region, c.start, c.end):
                targets.append((sid, toks))
            if c.encoded:
                # decode the whole lines around the cluster: the encoded URL or address
                # often follows the encoded imperative
                ls = region.rfind("\n", 0, c.start) + 1
                le = region.find("\n", c.end)
                plain = _rot13(region[ls : le if le >= 0 else len(region)])
                decoded[sid] = [plain]
                for toks in _targets(plain, 0, len(plain)):
                    targets.append((sid, toks))
        if self.cfg.decode_payloads and budget[0] > 0:
            for enc, s, e, plain in _blobs(region, budget):
                cl = book.clusters(plain, thr, _CLUSTER_GAP_CHARS, rot13=True)
                if not cl:
                    continue
                ss, se = sentence_bounds(region, s, e)
                sid = len(spans)
                best = max(cl, key=lambda c: c.score)
                spans.append(PlantedSpan(mi, r0 + ss, r0 + se, round(best.score, 3),
                                         tuple(book.styles(best)), tuple(book.langs(best)), enc))
                decoded[sid] = [plain]
                for toks in _targets(region, ss, se) + _targets(plain, 0, len(plain)):
                    targets.append((sid, toks))
        for run in runs_in(region):
            if run.kind != "tag" or len(run.decoded.strip()) < 4:
                continue
            sid = len(spans)
            cl = book.clusters(run.decoded, thr, _CLUSTER_GAP_CHARS)
            best = max(cl, key=lambda c: c.score) if cl else None
            spans.append(PlantedSpan(mi, r0 + run.start, r0 + run.end,
                                     round(best.score, 3) if best else 1.0,
                                     tuple(book.styles(best)) if best else ("hidden",),
                                     tuple(book.langs(best)) if best else (), "tags"))
            decoded[sid] = [run.decoded]
            for toks in _targets(run.decoded, 0, len(run.decoded)):
                targets.append((sid, toks))

    def _echo_index(self, targets: list[tuple[int, list[str]]]) -> _EchoIndex:
        k = self.cfg.echo_shingle_words
        vocab: set[str] = set()
        by_size: dict[int, dict[int, tuple[int, ...]]] = {}
        need: list[int] = []
        total: list[int] = []
        span_of: list[int] = []
        for sid, toks in targets:
            tid = len(need)
            size = min(k, len(toks))
            sh = shingles(toks, k)
            table = by_size.setdefault(size, {})
            for h in sh:
                table[h] = (*table.get(h, ()), tid)
            vocab.update(toks)
            n = len(sh)
            frac = math.ceil(self.cfg.echo_min_fraction * n)
            need.append(min(n, max(self.cfg.echo_min_shingles, min(frac, self.cfg.echo_enough_shingles))))
            total.append(n)
            span_of.append(sid)
        return _EchoIndex(frozenset(vocab), tuple(sorted(by_size)), by_size, need, total, span_of)

    def artefacts(self, p: Prepared) -> _Artefacts:
        """Hosts, e-mails, payloads and vocabulary of the request (computed once, lazily)."""
        if p._artefacts is not None:
            return p._artefacts
        taint: dict[int, list[tuple[int, int, int]]] = {}
        w = self.cfg.taint_window_chars
        for sid, sp in enumerate(p.spans):
            taint.setdefault(sp.message_index, []).append((max(0, sp.start - w), sp.end + w, sid))
        known: set[str] = set()
        if p.ctx.tools:  # hosts named in the declared tools (API endpoints) are the app's own
            known |= host_set(json.dumps(list(p.ctx.tools), default=str))
        planted_h: dict[str, int] = {}
        planted_e: dict[str, int] = {}
        trusted_e: set[str] = set()
        all_e: set[str] = set()
        payloads: list[tuple[str, int]] = []
        vocab: set[str] = set()
        for msg in p.ctx.messages:
            text = msg.text
            if not text:
                continue
            windows = taint.get(msg.index, [])
            regions = p.regions.get(msg.index, [])
            pos = 0
            for s, e, sid in sorted(windows):  # hosts inside taint windows are attacker hosts
                if s > pos:
                    known |= host_set(text, pos, s)
                for host, _, _ in hosts_in(text, max(s, pos), min(e, len(text))):
                    planted_h.setdefault(host, sid)
                pos = max(pos, e)
            known |= host_set(text, min(pos, len(text)))
            for m in EMAIL.finditer(text) if "@" in text else ():
                e = m.group().lower()
                sid = _in_windows(windows, m.start())
                if sid is not None:
                    planted_e.setdefault(e, sid)
                else:
                    all_e.add(e)
                    if not _in_ranges(regions, m.start()):
                        trusted_e.add(e)
            if windows:
                pos = 0
                for s, e, sid in sorted(windows):
                    vocab.update(token_words(text[pos:s]))
                    if self._payload_rx is not None:
                        for m in self._payload_rx.finditer(text, s, min(e, len(text))):
                            payloads.append((_norm_payload(m.group()), sid))
                    pos = max(pos, e)
                vocab.update(token_words(text[pos:]))
            else:
                vocab.update(token_words(text))
        for sid, texts in p.decoded.items():
            for t in texts:
                for host, _, _ in hosts_in(t):
                    planted_h.setdefault(host, sid)
                for m in EMAIL.finditer(t):
                    planted_e.setdefault(m.group().lower(), sid)
                if self._payload_rx is not None:
                    for m in self._payload_rx.finditer(t):
                        payloads.append((_norm_payload(m.group()), sid))
        if payloads and self._payload_rx is not None:
            trusted_p = set()
            for msg in p.ctx.messages:
                if msg.role in self.cfg.untrusted_roles:
                    continue
                for m in self._payload_rx.finditer(msg.text):
                    if not _in_ranges(p.regions.get(msg.index, []), m.start()):
                        trusted_p.add(_norm_payload(m.group()))
            payloads = [(s, sid) for s, sid in payloads if s not in trusted_p]
        vocab_f = frozenset(t for t in vocab if len(t) >= 3 and t not in _STOP)
        values = frozenset(t for t in vocab_f if (len(t) >= 4 and any(c.isdigit() for c in t)) or len(t) >= 12)
        known_f = frozenset(known)
        art = _Artefacts(
            known_hosts=known_f,
            planted_hosts={h: s for h, s in planted_h.items() if h not in known_f},
            planted_emails={e: s for e, s in planted_e.items() if e not in trusted_e},
            trusted_emails=frozenset(trusted_e),
            planted_payloads=payloads,
            vocab=vocab_f,
            values=values,
            emails=frozenset(all_e),
        )
        p._artefacts = art
        return art

    # ---------------------------------------------------------------- output side
    def open_channel(self, prepared: Prepared, channel: Channel) -> ChannelState | None:
        if not self._cats:
            return None
        if channel.kind == "tool_call":
            return _ToolState(self, prepared, channel)
        return _TextState(self, prepared, channel)


InjectionConfig.detector_class = InjectionDetector
CONFIGS: dict[str, type[DetectorConfig]] = {NAME: InjectionConfig}


# ------------------------------------------------------------------------------ helpers


def _rot13(s: str) -> str:
    return codecs.encode(s, "rot13")


def _targets(text: str, start: int, end: int) -> list[list[str]]:
    """Token lists of the sentences in ``text[start:end]``; sentences shorter than
    ``_MIN_TARGET_WORDS`` tokens are merged with the next one (a lone "SYSTEM:" line is not
    worth an echo of its own)."""
    out: list[list[str]] = []
    pending: list[str] = []
    for s, e in split_sentences(text, start, end):
        pending = pending + echo_words(text[s:e])
        if len(pending) >= _MIN_TARGET_WORDS:
            out.append(pending)
            pending = []
    if pending:
        if out:
            out[-1] = out[-1] + pending
        elif len(pending) >= 2:
            out.append(pending)
    return out


def _blobs(region: str, budget: list[int]) -> list[tuple[str, int, int, str]]:
    """Base64/hex runs in ``region`` that decode to printable text (one nested level)."""
    out: list[tuple[str, int, int, str]] = []
    for rx, enc in ((_B64, "base64"), (_HEX, "hex")):
        for m in rx.finditer(region):
            if budget[0] <= 0:
                return out
            s = m.group()
            if len(s) > _MAX_BLOB_CHARS or (
                    enc == "base64" and s.isalpha() and (s.islower() or s.isupper())):
                continue  # too long to decode here, or a long word rather than a blob
            budget[0] -= 1
            plain = _decode(s, enc)
            if plain is None:
                continue
            inner = _B64.search(plain)
            if inner and budget[0] > 0:
                budget[0] -= 1
                nested = _decode(inner.group(), "base64")
                if nested:
                    plain = plain[: inner.start()] + nested + plain[inner.end():]
            out.append((enc, m.start(), m.end(), plain))
    return out


def _decode(s: str, enc: str) -> str | None:
    try:
        if enc == "hex":
            raw = binascii.unhexlify(s)
        else:
            t = s.rstrip("=").replace("-", "+").replace("_", "/")
            raw = base64.b64decode(t + "=" * (-len(t) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return printable_text(raw)


def _in_windows(windows: list[tuple[int, int, int]], pos: int) -> int | None:
    for s, e, sid in windows:
        if s <= pos < e:
            return sid
    return None


def _in_ranges(ranges: list[tuple[int, int]], pos: int) -> bool:
    return any(s <= pos < e for s, e in ranges)


def _norm_payload(s: str) -> str:
    return " ".join(s.replace("\\", "").replace('"', " ").replace("'", " ").lower().split())


def _json_text(chunk: str) -> tuple[str, str]:
    """Replaces JSON string escapes with same-length text (``\\n`` -> two spaces) so sentence
    and word logic works on tool-call arguments; returns (text, held-back trailing ``\\``)."""
    held = ""

    def sub(m: re.Match[str]) -> str:
        nonlocal held
        c = m.group(1)
        if c is None:
            held = "\\"
            return ""
        return "  " if c in "ntrbf" else " " + c

    out = _JSON_ESCAPE.sub(sub, chunk)
    return out, held


# ------------------------------------------------------------------------------ output states


class _Sentence:
    """One output sentence: its words, and their offsets computed only if an echo needs them."""

    __slots__ = ("_spans", "base", "text")

    def __init__(self, base: int, text: str) -> None:
        self.base = base
        self.text = text
        self._spans: list[tuple[int, int]] | None = None

    def span(self, i: int) -> tuple[int, int]:
        if self._spans is None:
            self._spans = [(s, e) for _, s, e in echo_tokens(self.text, self.base)]
        return self._spans[i]


class _Echo:
    """Counts, per planted target, the distinct shingles the output has reproduced. Only
    runs of words that all occur in some target are hashed, so ordinary prose costs one set
    lookup per word."""

    __slots__ = ("_fired", "_first", "_ix", "_matched", "_run", "_win")

    def __init__(self, ix: _EchoIndex, k: int) -> None:
        self._ix = ix
        self._win: deque[tuple[str, _Sentence, int]] = deque(maxlen=k)
        self._run = 0
        self._matched: dict[int, set[int]] = {}
        self._first: dict[int, int] = {}
        self._fired: set[int] = set()

    def add(self, sent: _Sentence, words: Sequence[str]
            ) -> tuple[list[tuple[int, int, int, int]], set[int]]:
        """Returns (fired: (target, start, end, matched), spans touched by any shingle)."""
        ix = self._ix
        vocab = ix.vocab
        fired: list[tuple[int, int, int, int]] = []
        touched: set[int] = set()
        win = self._win
        for i, tok in enumerate(words):
            win.append((tok, sent, i))
            if tok not in vocab:
                self._run = 0
                continue
            self._run += 1
            if self._run < ix.sizes[0]:
                continue
            items = list(win)
            for size in ix.sizes:
                if size > self._run:
                    break
                tail = items[-size:]
                h = shingle_hash([t for t, _, _ in tail])
                for tid in ix.by_size[size].get(h, ()):
                    sid = ix.span_of[tid]
                    touched.add(sid)
                    got = self._matched.setdefault(tid, set())
                    got.add(h)
                    if tid not in self._first:
                        self._first[tid] = tail[0][1].span(tail[0][2])[0]
                    if len(got) >= ix.need[tid] and sid not in self._fired:
                        self._fired.add(sid)
                        fired.append((tid, self._first[tid], sent.span(i)[1], len(got)))
        return fired, touched


class _BaseState(ChannelState):
    """Sentence pipeline (echo, propagation) and invisible-character scan, shared by text and
    tool-call channels."""

    def __init__(self, det: InjectionDetector, p: Prepared, channel: Channel) -> None:
        self.det = det
        self.p = p
        self.channel = channel
        cats = det._cats
        self._echo = _Echo(p.echo, det.cfg.echo_shingle_words) if p.echo is not None else None
        self._do_echo = "echo" in cats and self._echo is not None
        self._do_prop = "propagation" in cats
        self._clusters = Clusterer(det.cfg.propagation_min_score, _CLUSTER_GAP_CHARS)
        self._invisible = InvisibleScanner() if "smuggling" in cats else None
        self._sent_buf = ""
        self._sent_base = 0
        self._sent_scan = 0  # where the search for the end of the current sentence resumes
        self._ties: dict[int, int] = {}  # output sentence start -> planted span touched
        self._finished = False

    # -- sentences
    def _sentences(self, text: str, final: bool) -> list[Finding]:
        if not (self._do_echo or self._do_prop):
            return []
        self._sent_buf += text
        out: list[Finding] = []
        buf = self._sent_buf
        pos = 0
        scan = self._sent_scan
        while pos < len(buf):
            limit = min(len(buf), pos + _MAX_SENTENCE_CHARS)
            m = _OUT_SENTENCE_END.search(buf, max(pos, scan), limit)
            scan = 0
            if m is not None and (m.end() < len(buf) or final or m.end() == pos + _MAX_SENTENCE_CHARS):
                end = m.end()
            elif m is None and limit == pos + _MAX_SENTENCE_CHARS:
                end = limit
            elif final:
                end = len(buf)
            else:
                # resume at the unsettled boundary, or at the last character (a "." waiting
                # for its space); a boundary is decided by where it ends, not where it starts
                scan = m.start() if m is not None else len(buf) - 1
                break
            out += self._sentence(self._sent_base + pos, buf[pos:end])
            pos = end
        self._sent_buf = buf[pos:]
        self._sent_base += pos
        self._sent_scan = max(0, scan - pos)
        return out

    def _sentence(self, start: int, text: str) -> list[Finding]:
        lead = len(text) - len(text.lstrip())
        body = text.strip()
        if not body:
            return []
        s0, s1 = start + lead, start + lead + len(body)
        out: list[Finding] = []
        if self._echo is not None:
            fired, touched = self._echo.add(_Sentence(s0, body), echo_words(body))
            if touched:
                self._ties[s0] = min(touched)
                if len(self._ties) > 256:
                    self._ties.pop(next(iter(self._ties)))
            if self._do_echo:
                for tid, fs, fe, got in fired:
                    out.append(self._echo_finding(tid, fs, fe, got))
        if self._do_prop:
            book = self.det.book
            hits = book.hits(body)
            contrib = book.score_sentence(body, hits)
            crossed = self._clusters.add(s0, s1, contrib)
            if crossed is not None:
                out.append(self._propagation_finding(crossed))
        return out

    def _echo_finding(self, tid: int, start: int, end: int, got: int) -> Finding:
        ix = self.p.echo
        assert ix is not None
        sid = ix.span_of[tid]
        span = self.p.spans[sid]
        total = ix.total[tid]
        overlap = got / total if total else 1.0
        return Finding(
            detector=NAME, category="echo", severity=Severity.medium, score=round(min(1.0, overlap), 4),
            message=f"output reproduces an instruction-like span planted in message {span.message_index}",
            span=(start, end), channel=self.channel, evidence=f"{got}/{total} shingles",
            replacement=None,
            attrs={**span.attrs(), "overlap": round(overlap, 3), "matched_shingles": got,
                   "planted_shingles": total, "encoding": span.encoding or "plain"},
        )

    def _propagation_finding(self, c: Cluster) -> Finding:
        book = self.det.book
        styles = book.styles(c)
        attrs: dict[str, str | int | float | bool] = {
            "phrase_score": round(c.score, 3), "styles": ",".join(styles),
            "langs": ",".join(book.langs(c)),
        }
        tie = next((self._ties[s] for s, _ in c.sentences if s in self._ties), None)
        if tie is not None:
            attrs.update(self.p.spans[tie].attrs())
        return Finding(
            detector=NAME, category="propagation", severity=Severity.medium, score=round(min(1.0, c.score / 2), 4),
            message="output contains instruction-like text aimed at a downstream model ("
                    + ", ".join(styles) + ")",
            span=(c.start, c.end), channel=self.channel, evidence=f"score {c.score:.2f}",
            replacement=None, attrs=attrs,
        )

    # -- invisible characters
    def _smuggling(self, runs: list[Any]) -> list[Finding]:
        out: list[Finding] = []
        for r in runs:
            n = r.end - r.start
            if r.kind == "tag":
                sev, score = Severity.medium, 0.9
            elif r.kind in ("bidi", "variation_selector"):
                sev, score = Severity.medium, 0.7
            else:
                sev, score = (Severity.low, 0.4) if n == 1 else (Severity.medium, 0.6)
            attrs: dict[str, str | int | float | bool] = {"kind": r.kind, "chars": n}
            if r.decoded:
                attrs["decoded_chars"] = len(r.decoded)
                if self.p.echo is not None:
                    tie = self._tie_tokens(echo_words(r.decoded))
                    if tie is not None:
                        attrs.update(self.p.spans[tie].attrs())
            out.append(Finding(
                detector=NAME, category="smuggling", severity=sev, score=score,
                message=f"output contains {n} invisible {r.kind.replace('_', ' ')} character(s)",
                span=(r.start, r.end), channel=self.channel, evidence=f"<{n} {r.kind}>",
                replacement="", attrs=attrs,
            ))
        return out

    def _tie_tokens(self, toks: list[str]) -> int | None:
        ix = self.p.echo
        if ix is None or not toks:
            return None
        for size in ix.sizes:
            for i in range(len(toks) - size + 1):
                for tid in ix.by_size[size].get(shingle_hash(toks[i : i + size]), ()):
                    return ix.span_of[tid]
        return None

    # -- protocol
    def _feed_common(self, text: str, sentence_text: str) -> list[Finding]:
        out = self._sentences(sentence_text, final=False) if sentence_text else []
        if self._invisible is not None:
            out += self._smuggling(self._invisible.feed(text))
        return out

    def _finish_common(self, tail: str) -> list[Finding]:
        out = self._sentences(tail, final=True)
        if self._invisible is not None:
            out += self._smuggling(self._invisible.finish())
        return out


class _TextState(_BaseState):
    def __init__(self, det: InjectionDetector, p: Prepared, channel: Channel) -> None:
        super().__init__(det, p, channel)
        self._links = LinkScanner(det.cfg.max_url_chars) if "exfiltration" in det._cats else None
        self._long: Finding | None = None  # verdict on a URL being reported in pieces

    def feed(self, text: str) -> list[Finding]:
        if self._finished:
            return []
        out = self._feed_common(text, text)
        if self._links is not None:
            out += self._exfil(self._links.feed(text))
        return out

    def finish(self, end: StreamEnd) -> list[Finding]:
        if self._finished:
            return []
        self._finished = True
        out = self._finish_common("")
        if self._links is not None:
            out += self._exfil(self._links.finish())
        return out

    def _exfil(self, links: list[Link]) -> list[Finding]:
        out: list[Finding] = []
        for link in links:
            if link.part > 1:
                if self._long is not None:
                    f = self._long
                    out.append(Finding(
                        detector=NAME, category=f.category, severity=f.severity, score=f.score,
                        message=f.message + " (continued)", span=(link.start, link.end),
                        channel=self.channel, evidence=mask(link.url), replacement=f.replacement,
                        attrs={**f.attrs, "part": link.part},
                    ))
                continue
            f = self._judge(link)
            self._long = f if link.part == 1 else None
            if f is not None:
                out.append(f)
        return out

    def _judge(self, link: Link) -> Finding | None:
        host = host_of(link.url)
        if not host:
            return None
        det = self.det
        art = det.artefacts(self.p)
        if host_allowed(host, art.known_hosts, det.cfg.allowed_hosts):
            return None
        sid = planted_parent(host, art.planted_hosts)
        homograph = homograph_of(host, art.known_hosts)
        ev = data_evidence(link.url, host, art.vocab, art.values, art.emails)
        data = ev.score >= det.cfg.exfil_data_min_score
        image = link.kind == "image"
        if sid is not None:
            status, score = "planted", 0.95
            sev = Severity.critical if (image or data) else Severity.high
        elif homograph:
            status, score, sev = "homograph", 0.9, Severity.high
        elif data:
            status = "unknown"
            sev = Severity.critical if image else Severity.high
            score = min(0.95, 0.6 + 0.05 * ev.score)
        elif image and det.cfg.flag_unknown_images:
            status, score, sev = "unknown", 0.5, Severity.medium
        else:
            return None
        attrs: dict[str, str | int | float | bool] = {
            "kind": link.kind, "host_status": status, "data_score": round(ev.score, 2),
            "conversation_words": ev.conversation_words, "values": ev.values,
            "encoded_blob": ev.blob, "url_chars": len(link.url),
        }
        if link.part:
            attrs["part"] = link.part
        if sid is not None:
            attrs.update(self.p.spans[sid].attrs())
        what = {"image": "image", "link": "link", "bare": "URL"}[link.kind]
        why = {"planted": "a host named only in planted instructions",
               "homograph": "a look-alike of a host in the request",
               "unknown": "a host not mentioned in the request"}[status]
        if data:
            why += ", carrying conversation data"
        return Finding(
            detector=NAME, category="exfiltration", severity=sev, score=round(score, 4),
            message=f"output {what} points to {why}", span=(link.start, link.end),
            channel=self.channel, evidence=mask(link.url), replacement=placeholder("url"),
            attrs=attrs,
        )


class _ToolState(_BaseState):
    def __init__(self, det: InjectionDetector, p: Prepared, channel: Channel) -> None:
        super().__init__(det, p, channel)
        on = "tool_misuse" in det._cats and bool(p.spans)
        self._links = LinkScanner(det.cfg.max_url_chars, json_mode=True) if on else None
        self._emails = EmailScanner() if on else None
        # Shell/SQL payloads are matched once the arguments are complete: a tool call runs
        # only after its arguments have arrived, so blocking at finish is in time, and the
        # payload patterns (alternations of different lengths) cannot be settled early.
        self._args: list[str] | None = [] if on and det._payload_rx is not None else None
        self._args_len = 0
        self._held = ""

    def feed(self, text: str) -> list[Finding]:
        if self._finished:
            return []
        plain, held = _json_text(self._held + text)
        self._held = held
        out = self._feed_common(text, plain)
        out += self._misuse(text, final=False)
        return out

    def finish(self, end: StreamEnd) -> list[Finding]:
        if self._finished:
            return []
        self._finished = True
        out = self._finish_common(" " * len(self._held))
        out += self._misuse("", final=True)
        return out

    def _misuse(self, text: str, final: bool) -> list[Finding]:
        if self._links is None:
            return []
        links = self._links.finish() if final else self._links.feed(text)
        emails = self._emails.finish() if final else self._emails.feed(text)  # type: ignore[union-attr]
        pays: list[tuple[int, int, Any]] = []
        if self._args is not None:
            if text and self._args_len < _MAX_ARGS_CHARS:
                self._args.append(text[: _MAX_ARGS_CHARS - self._args_len])
                self._args_len += len(self._args[-1])
            if final and self.det._payload_rx is not None:
                pays = [(m.start(), m.end(), m) for m in self.det._payload_rx.finditer("".join(self._args))]
                self._args = None
        out: list[Finding] = []
        art = self.det.artefacts(self.p) if (links or emails or pays) else None
        if art is None:
            return out
        for link in links:
            host = host_of(link.url)
            sid = planted_parent(host, art.planted_hosts) if host else None
            if sid is None or host is None or host_allowed(host, (), self.det.cfg.allowed_hosts):
                continue
            ev = data_evidence(link.url, host, art.vocab, art.values, art.emails)
            data = ev.score >= self.det.cfg.exfil_data_min_score
            out.append(self._finding(sid, "url", link.start, link.end, link.url,
                                     Severity.critical if data else Severity.high,
                                     placeholder("url"), {"data_score": round(ev.score, 2)}))
        for s, e, found in emails:
            addr = found.lower()
            sid = art.planted_emails.get(addr)
            if sid is None and addr not in art.trusted_emails:
                sid = planted_parent(addr.rsplit("@", 1)[-1], art.planted_hosts)
            if sid is None:
                continue
            out.append(self._finding(sid, "email", s, e, found, Severity.high,
                                     placeholder("email"), {}))
        for s, e, m in pays:
            norm = _norm_payload(m.group())
            sid = next((psid for p, psid in art.planted_payloads
                        if min(len(p), len(norm)) >= 8 and (p in norm or norm in p)), None)
            if sid is None:
                continue
            out.append(self._finding(sid, "payload", s, e, m.group(), Severity.critical, None, {}))
        return out

    def _finding(self, sid: int, kind: str, s: int, e: int, value: str, sev: Severity,
                 replacement: str | None, extra: dict[str, str | int | float | bool]) -> Finding:
        span = self.p.spans[sid]
        what = {"url": "a URL host", "email": "an e-mail address", "payload": "a shell/SQL payload"}[kind]
        return Finding(
            detector=NAME, category="tool_misuse", severity=sev, score=0.95 if kind != "url" else 0.9,
            message=f"tool-call arguments carry {what} taken from instructions planted in message "
                    f"{span.message_index}",
            span=(s, e), channel=self.channel,
            evidence=mask(value, "email" if kind == "email" else ""), replacement=replacement,
            attrs={"kind": kind, **span.attrs(), **extra,
                   **({"tool_name": self.channel.tool_name} if self.channel.tool_name else {})},
        )
