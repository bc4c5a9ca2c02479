"""``pii``: personal data in model output, validated rather than pattern-matched.

A pattern proposes, a validator decides: a 16-digit order number that fails Luhn is not a
card, a digit run that no phone-numbering plan accepts is not a phone number. Validation uses
well-kept libraries (``phonenumbers``, ``python-stdnum``, ``ipaddress``).

Kinds (each switchable with ``kinds``; severities overridable with ``severity``):

- ``email``: RFC-shaped address; local part <= 64 chars, domain <= 82 chars (longer ones are
  not detected, so the hold-back window stays short).
- ``phone``: digit groups (at least six digits in a row, or two groups) parsed with
  ``phonenumbers`` and kept only when ``is_valid_number`` says so: ``+`` numbers as they
  are, others in the first region of ``phone_regions`` that accepts them, and only when
  written the way that plan writes them (its national form with trunk prefix, or country code
  + number after 00/011; without the trunk prefix only after a phone word). An unformatted
  digit run (no separator, no ``+``, no parentheses) also needs a phone word (call, tel,
  mobile...) shortly before it: bare digits are valid in some numbering plan far too often
  (order numbers, timestamps). Extensions (``x123``, ``ext. 42``) stay inside the span.
- ``card``: 13-19 digits, compact or grouped with one consistent separator (space or dash) in
  the groupings card issuers print, a known IIN prefix/length pair, and ``stdnum.luhn``.
- ``iban``: ``stdnum.iban`` (country length, format and mod-97), with or without spaces.
- ``ssn``: US SSN written ``123-45-6789``/``123 45 6789`` (or bare after "SSN"), checked by
  ``stdnum.us.ssn`` (area/group/serial rules and the known advertised numbers).
- ``national_id``: schemes in ``national_ids``, each validated by python-stdnum and chosen
  because its written form is distinctive: ``fr_nir`` (15 digits, mod-97 key; Corsican
  2A/2B forms are not matched), ``es_dni``/``es_nie`` (check letter), ``it_codice_fiscale``
  (16 chars, check letter), ``in_aadhaar`` (Verhoeff; ``1234 5678 9012`` or bare after
  "Aadhaar"), ``de_idnr`` (Steuer-ID; only after a Steuer-ID/IdNr word, since 11 bare digits
  with a mod 11,10 check pass one time in ten).
- ``ip``: IPv4/IPv6 validated by ``ipaddress``. Never flagged: loopback, unspecified,
  link-local, multicast and reserved addresses (for IPv6 everything outside 2000::/3); an
  IPv4 written right after a letter or dot (``v1.2.3.4``), followed by ``.digit`` (part of a
  longer dotted version) or after a version word (version, release, build, firmware); an
  IPv4 whose four octets are single digits (``1.2.3.4``, ``8.8.8.8``: version strings and
  public resolvers, not people); IPv6 with fewer than three groups (``fe80::1``, C++'s
  ``a::b``). ``ip_ignore_private`` (default on) also skips RFC 1918/ULA, CGNAT and the
  documentation ranges. A dotted quad that is really a version ("see 12.13.8.3") is the
  known false positive.
- ``address`` (off by default): a US street address, building number + 1-3 capitalised words
  + a USPS street suffix (``detectors/data/us_street_suffixes.txt``) + optional unit.

Numbers preceded by an order/invoice/tracking/reference word, a ``#`` or a currency sign are
not flagged (unless a card word such as "card"/"visa" is also there, for cards); dates and
ISBNs are rejected before any numeric validator runs.

With ``ignore_if_in_request`` (default on) a value that also appears anywhere in the
request's messages (optionally only messages of ``ignore_if_in_request_roles``) is not a
leak: the user's own email echoed back. Comparison is normalised (casefolded; digits and
letters only for numbers; national significant number for phones). The normalised request
text is built once per request, lazily on the first candidate finding, so responses without
PII cost nothing extra.

Streaming: one bounded alternation (google-re2) plus the email pattern (Python ``re``, run
only around each "@") is scanned by ``BoundedScanner``, which reports a match only once
everything that could change it has arrived, so the same findings come out however the text
is chunked. ``lookback_chars`` is that reach for the enabled kinds: 149 with ``email`` (its
64 + 1 + 82 character cap, plus 2 characters after it), 124 without (digit groups), 45 for
``iban`` alone.
"""

from __future__ import annotations

import ipaddress
import re
import re._parser as _sre_parse
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, ClassVar, Literal, Protocol

import phonenumbers
import re2
from pydantic import field_validator
from stdnum import iban as std_iban
from stdnum import isbn as std_isbn
from stdnum import luhn
from stdnum.de import idnr as std_de_idnr
from stdnum.es import dni as std_es_dni
from stdnum.es import nie as std_es_nie
from stdnum.fr import nir as std_fr_nir
from stdnum.in_ import aadhaar as std_in_aadhaar
from stdnum.it import codicefiscale as std_it_cf
from stdnum.us import ssn as std_us_ssn

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
from detectors.redaction import mask, placeholder

PiiKind = Literal["email", "phone", "card", "iban", "ssn", "national_id", "ip", "address"]
SeverityName = Literal["low", "medium", "high", "critical"]
NationalIdScheme = Literal["fr_nir", "es_dni", "es_nie", "it_codice_fiscale", "in_aadhaar", "de_idnr"]

KINDS: tuple[PiiKind, ...] = ("email", "phone", "card", "iban", "ssn", "national_id", "ip", "address")
DEFAULT_KINDS: tuple[PiiKind, ...] = ("email", "phone", "card", "iban", "ssn", "national_id", "ip")
DEFAULT_SEVERITY: dict[str, SeverityName] = {
    "email": "medium",
    "phone": "medium",
    "card": "critical",
    "iban": "high",
    "ssn": "critical",
    "national_id": "high",
    "ip": "low",
    "address": "medium",
}
NATIONAL_ID_SCHEMES: tuple[NationalIdScheme, ...] = (
    "fr_nir", "es_dni", "es_nie", "it_codice_fiscale", "in_aadhaar", "de_idnr",
)

# How far before a match the validators look (keywords, "#", currency signs). The scanner
# keeps at least this much text before its scan position, so streamed and whole text agree.
CONTEXT_CHARS = 40
_KEYWORD_WINDOW = 32
# How many characters after a match the boundary checks read (e.g. "not followed by .digit"):
# counted into the reach.
_LOOKAHEAD_CHARS = 2
# A match starts at most this far before the first trigger character it contains (an email's
# local part is <= 64 characters before its "@").
_TRIGGER_BACK_CHARS = 70


# --------------------------------------------------------------------------------------------
# Bounded-reach incremental scanning (shared with detectors.secrets)
# --------------------------------------------------------------------------------------------


class Match(Protocol):
    """What validators use of a match (``ScanMatch`` and ``re.Match`` both provide it)."""

    @property
    def string(self) -> str: ...
    @property
    def lastgroup(self) -> str | None: ...
    def start(self) -> int: ...
    def end(self) -> int: ...
    def group(self) -> str: ...


class ScanMatch:
    """A match of one named alternative: the buffer it was found in, its span there and the
    name of the alternative."""

    __slots__ = ("_e", "_s", "lastgroup", "string")

    def __init__(self, string: str, start: int, end: int, lastgroup: str) -> None:
        self.string = string
        self._s = start
        self._e = end
        self.lastgroup = lastgroup

    def start(self) -> int:
        return self._s

    def end(self) -> int:
        return self._e

    def group(self) -> str:
        return self.string[self._s : self._e]


_NAMED_GROUP = re.compile(r"\(\?P<(\w+)>")


class Alternation:
    """Named alternatives ``(?P<name>...)|...`` compiled with re2 over ``bytes``: the scanner
    hands it the buffer as one byte per character, which skips the wrapper's per-call UTF-8
    encoding and offset mapping of ``str`` input (the cost of every call would otherwise
    grow with the buffer). ``reach`` is ``pattern_reach`` of the source."""

    __slots__ = ("names", "raw", "reach")

    def __init__(self, source: str) -> None:
        if not source.isascii():
            raise ValueError("alternatives must be ASCII (the scanner searches ASCII bytes)")
        self.raw = re2.compile(source.encode())
        self.names = tuple(_NAMED_GROUP.findall(source))
        if self.raw.groups != len(self.names):
            raise ValueError("alternatives must not hold unnamed capturing groups")
        self.reach = pattern_reach(source)

    def name(self, m: Any) -> str:
        """Which alternative matched. Reads the wrapper's span table when it has one (one
        attribute read instead of a bound-checked ``span(i)`` call per group)."""
        spans = getattr(m, "_spans", None)
        if spans is None:
            spans = [m.span(i) for i in range(len(self.names) + 1)]
        for i, name in enumerate(self.names, 1):
            if spans[i][0] >= 0:
                return name
        return ""


def pattern_reach(source: str) -> int:
    """Longest text a match attempt of ``pattern`` can depend on after its start position:
    the maximum match width plus the lookahead allowance. Fails for unbounded patterns,
    because a pattern with no bound cannot be scanned with a bounded hold-back."""
    width = _sre_parse.parse(source).getwidth()[1]
    if width >= 1 << 16:
        raise ValueError(f"pattern has no bounded width: {source[:60]}...")
    return width + _LOOKAHEAD_CHARS


class Extra:
    """An alternative searched with Python's ``re`` beside the re2 alternation, for what a
    DFA handles badly: a generic pattern that matches very often (every long token: each
    match costs a wrapper round trip) or one whose counted repetitions blow up the DFA's
    states (an email's 64-character local part over base64 text). ``anchor`` is a literal
    every match contains at most ``back`` characters after its start (``@`` for emails):
    the pattern then only runs around the anchors. ``first``: wins a tie with the main
    alternation at the same start (as if placed first), else loses it (placed last)."""

    __slots__ = ("anchor", "back", "first", "name", "pattern", "reach")

    def __init__(self, name: str, source: str, first: bool, anchor: str = "", back: int = 0) -> None:
        self.name = name
        self.pattern = re.compile(source)
        self.first = first
        self.anchor = anchor
        self.back = back
        self.reach = pattern_reach(source)

    def search(self, buf: str, start: int, limit: int) -> tuple[int, int, str] | None:
        """Leftmost match starting in ``[start, limit]``."""
        width = self.reach
        if not self.anchor:
            m = self.pattern.search(buf, start, min(len(buf), limit + width))
            return None if m is None or m.start() > limit else (m.start(), m.end(), self.name)
        stop = limit + self.back + 1  # an anchor past this belongs to a match starting past limit
        a = buf.find(self.anchor, start, stop)
        lo = start
        while a != -1:
            # a match holding this anchor starts within ``back`` before it and ends within a
            # reach after its start; the leftmost match in that window holds this anchor or
            # none does (it cannot span an earlier anchor: the pattern excludes it there)
            m = self.pattern.search(buf, max(lo, a - self.back), min(len(buf), a + width))
            if m is not None and m.start() <= a < m.end():
                return None if m.start() > limit else (m.start(), m.end(), self.name)
            lo = a + 1
            a = buf.find(self.anchor, a + 1, stop)
        return None


class BoundedScanner:
    """Settled matches of a bounded pattern in a growing text.

    Why not ``StreamScanner``'s rule (a match is settled once one character after its end has
    arrived): a pattern with an optional multi-character tail (``ext 12``, ``:port``, a
    trailing group of digits) can match shorter while the tail is still incomplete, and then
    the streamed result differs from the whole-text result. Here a match attempt at position
    ``p`` reads at most ``text[p - context : p + reach]`` (``reach`` from ``pattern_reach``;
    validators look back at most ``context`` characters), so a match starting at ``p`` is
    final once ``p + reach`` characters have arrived, and positions up to ``end - reach`` with
    no match are final too. The caller therefore must hold back ``reach`` characters.

    The caller drives the loop: ``next_match`` returns the next settled match (``None`` when
    the rest is pending), and the caller ``advance``s past what it consumed, usually the match
    end. Work per feed is proportional to the new text plus ``reach``. ``trigger``, when
    given, matches a character that every match contains: a tail without one is skipped
    without running the pattern.
    """

    __slots__ = ("_base", "_buf", "_bytes", "_context", "_extras", "_main", "_pattern", "_pos", "_trigger",
                 "reach")

    def __init__(self, pattern: Alternation, trigger: re.Pattern[str] | None = None,
                 context: int = CONTEXT_CHARS, extras: tuple[Extra, ...] = ()) -> None:
        self._pattern = pattern
        self._trigger = trigger
        self._extras = extras
        self.reach = max((pattern.reach, *(x.reach for x in extras)))
        self._context = context
        self._buf = ""
        self._bytes: bytes | None = None  # the buffer as one byte per character, on demand
        # last main-pattern search: (absolute start searched from, absolute (s, e, name) or None);
        # still the answer for later starts up to its match while no text is appended
        self._main: tuple[int, tuple[int, int, str] | None] | None = None
        self._base = 0  # absolute offset of _buf[0]
        self._pos = 0  # absolute scan position: everything before it is decided

    @property
    def end(self) -> int:
        """Absolute length of the text seen so far."""
        return self._base + len(self._buf)

    @property
    def pos(self) -> int:
        return self._pos

    def append(self, text: str) -> None:
        self._buf += text
        self._bytes = None
        self._main = None

    def slice(self, start: int, end: int) -> str:
        """Text between absolute offsets (``start`` must still be buffered)."""
        return self._buf[start - self._base : end - self._base]

    def _search(self, start: int) -> tuple[int, int, str] | None:
        """Leftmost match at or after buffer offset ``start``, of the main alternation or of
        an extra alternative, as one alternation holding them all would find it:
        (start, end, name)."""
        found = self._search_main(start)
        buf = self._buf
        for extra in self._extras:
            # starts after the best match so far cannot win; look a reach beyond it
            limit = len(buf) if found is None else found[0]
            x = extra.search(buf, start, limit)
            if x is not None and (found is None or x[0] < found[0] or (x[0] == found[0] and extra.first)):
                found = x
        return found

    def _search_main(self, start: int) -> tuple[int, int, str] | None:
        base = self._base
        cached = self._main
        if cached is not None and cached[0] <= base + start and (cached[1] is None or base + start <= cached[1][0]):
            hit = cached[1]
            return None if hit is None else (hit[0] - base, hit[1] - base, hit[2])
        found = self._search_uncached(start)
        self._main = (base + start, None if found is None else (base + found[0], base + found[1], found[2]))
        return found

    def _search_uncached(self, start: int) -> tuple[int, int, str] | None:
        if self._bytes is None:
            # One byte per character, so offsets carry over: every non-ASCII character
            # becomes "?". No pattern class holds "?" or any non-ASCII character except
            # negated ones (``[^\s@]``), which accept both alike, so matches are unchanged.
            self._bytes = self._buf.encode("ascii", "replace")
        pat = self._pattern
        m = pat.raw.search(self._bytes, start)
        return None if m is None else (m.start(), m.end(), pat.name(m))

    def next_match(self, final: bool) -> tuple[int, ScanMatch] | None:
        """The next settled match at or after the scan position, with the absolute offset of
        its ``string`` (add it to ``m.start()``), or ``None`` when nothing more is settled."""
        buf = self._buf
        start = self._pos - self._base
        found = None
        if self._trigger is not None:
            t = self._trigger.search(buf, start)
            if t is not None:  # else no character that every match needs: nothing to find
                found = self._search(max(start, t.start() - _TRIGGER_BACK_CHARS))
        else:
            found = self._search(start)
        if found is not None and (final or found[0] + self.reach <= len(buf)):
            return self._base, ScanMatch(buf, *found)
        # Positions whose whole reach has arrived and held no match are decided.
        if not final:
            self.advance(self.end - self.reach + 1)
        return None

    def advance(self, pos: int) -> None:
        """Move the scan position forward (never back); drop text no longer needed once that
        is at least half the buffer, so trimming costs amortised O(1) per character."""
        if pos <= self._pos:
            return
        self._pos = pos
        keep_from = self._pos - self._context - self._base
        if keep_from > 0 and 2 * keep_from >= len(self._buf):
            self._buf = self._buf[keep_from:]
            self._bytes = None
            self._base += keep_from

    def clear(self) -> None:
        self._base = self.end
        self._buf = ""
        self._bytes = None


# --------------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------------

# The combined pattern is compiled with google-re2 (linear time, and about six times faster
# than ``re`` on this alternation), which has no lookaround: the boundary each kind needs (what
# may not come right before or after a match) is checked in Python by ``_BOUNDS``, within the
# context and lookahead allowances above.

# Email runs beside the alternation (see Extra), around each "@": its 64-character local part
# would multiply the DFA's states and make re2 crawl over base64 text.
EMAIL = Extra("email", r"[A-Za-z0-9][A-Za-z0-9._%+\-]{0,63}@[A-Za-z0-9][A-Za-z0-9\-.]{0,62}\.[A-Za-z]{2,18}",
              first=True, anchor="@", back=64)
_IBAN = r"(?P<iban>[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?)"
_ES_ID = r"(?P<es_id>(?:\d{8}|[XYZ]\d{7})-?[A-Z])"
_IT_CF = r"(?P<it_cf>[A-Z]{6}[0-9LMNPQRSTUV]{2}[A-Z][0-9LMNPQRSTUV]{2}[A-Z][0-9LMNPQRSTUV]{3}[A-Z])"
_IPV4 = r"(?P<ipv4>(?:\d{1,3}\.){3}\d{1,3})"
_IPV6 = r"(?P<ipv6>(?:[0-9A-Fa-f]{1,4}:|::?)(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4})"
# Shapes that look numeric but are never PII: consumed first so no numeric validator sees
# them. ISO dates/times, d/m/y dates, dotted versions with a 'v' (``v1.2.3``) or >= 4 dots.
_NOT_PII = (
    r"(?P<not_pii>"
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?)?"
    r"|\d{1,2}[./]\d{1,2}[./]\d{2,4}"
    r"|[vV]\d{1,4}(?:\.\d{1,6}){1,4}"
    r"|\d{1,4}(?:\.\d{1,6}){4,5}"
    r")"
)
_SEP = r"(?:[ .\-/]|\) ?| ?\(|\)[\-.]|[\-.]\()"
_EXT = r"(?: ?(?:x|ext\.?|extension) ?\d{1,6})?"
# Digit groups: phones, cards, SSNs, numeric national ids. Validators pick a window of groups.
# At least 6 digits in the first group or at least two groups: "2024", "5 days" never match.
_NUMBER = (
    r"(?P<number>(?:\+|\()?(?:\d{6,19}(?:" + _SEP + r"\d{1,12}){0,6}|\d{1,5}(?:" + _SEP + r"\d{1,12}){1,6})"
    r"\)?" + _EXT + ")"
)

# Every PII match contains a digit or an "@" within its first _TRIGGER_BACK_CHARS characters
# (all-letter IPv6 and codice fiscale forms are the accepted misses): tails without one are
# skipped without running the alternation. (A sharper trigger, e.g. "six digits or two digit
# groups", costs more in Python's ``re`` than the re2 search it saves.)
_TRIGGER = re.compile(r"[0-9@]")
_WORD_RUN = re.compile(r"\w*")
_TOKEN_RUN = re.compile(r"[\w+/=\-]*")
# A token run at least this long is a blob (base64, a key): skipped whole after a rejection.
# Below the smallest reach, so a settled match always sees whether its run is a blob.
_BLOB_CHARS = 40


def skip_word(text: str, start: int) -> int:
    """Where the next match attempt begins after a match glued to a longer token was
    rejected: past the word it started in (every kind needs a non-word character before it,
    so no start inside the word could match; a word running past the buffer end is fine for
    the same reason), but inside a blob (a run of ``_BLOB_CHARS`` or more word and ``+/=-``
    characters: base64) ``_BLOB_CHARS`` ahead. That keeps a blob from costing one search per
    embedded digit run, at the price of a match right after a "/" or "=" inside one. The
    blob step is bounded so that it is the same whether the blob has fully arrived or not."""
    if _TOKEN_RUN.match(text, start, start + _BLOB_CHARS).end() - start >= _BLOB_CHARS:
        return start + _BLOB_CHARS
    return max(start + 1, _WORD_RUN.match(text, start).end())


# group -> (characters that may not precede the match, text that may not follow it)
_BOUNDS: dict[str, tuple[re.Pattern[str], re.Pattern[str]]] = {
    name: (re.compile(before), re.compile(after))
    for name, before, after in (
        ("email", r"[\w.%+\-]", r"[\w\-]|\.[A-Za-z0-9]"),
        ("iban", r"\w", r"\w"),
        ("es_id", r"[\w\-]", r"[\w\-]"),
        ("it_cf", r"\w", r"\w"),
        ("ipv4", r"[\w.]", r"\w|\.\d"),
        ("ipv6", r"[\w:.]", r"[\w:]"),
        ("number", r"[\w+\-/]|\d\.", r"\w"),
        ("address", r"[\w\-/.,]", r"[\w\-]"),
    )
}


def _bounded(m: Match) -> bool:
    """The match is not glued to a longer token on either side. When it is, the caller
    resumes after the word the match started in (``skip_word``), which is what a lookbehind
    would have done: every kind needs a non-word character before it."""
    bounds = _BOUNDS.get(m.lastgroup or "")
    if bounds is None:
        return True
    text, s, e = m.string, m.start(), m.end()
    before, after = bounds
    return not ((s > 0 and before.match(text, s - 1)) or after.match(text, e))


def _suffix_alternation() -> str:
    text = resources.files("detectors").joinpath("data/us_street_suffixes.txt").read_text("utf-8")
    words: set[str] = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        words.update(line.split())
    return "|".join(sorted(words, key=lambda w: (-len(w), w)))


def _address_pattern() -> str:
    return (
        r"(?P<address>\d{1,6}[A-Z]? (?:[NSEW]\.? |North |South |East |West )?"
        r"(?:[A-Z][a-z']{1,20} ){1,3}(?:" + _suffix_alternation() + r")\.?"
        r"(?:,? (?:Apt\.?|Apartment|Suite|Ste\.?|Unit|#) ?[A-Za-z0-9\-]{1,6})?)"
    )


# Order matters at equal start positions: the first alternative that matches wins.
_ALTERNATIVES: tuple[tuple[str, tuple[PiiKind, ...]], ...] = (
    (_IBAN, ("iban",)),
    (_ES_ID, ("national_id",)),
    (_IT_CF, ("national_id",)),
    (_IPV4, ("ip",)),
    (_IPV6, ("ip",)),
    (_NOT_PII, ()),
    (_NUMBER, ("phone", "card", "ssn", "national_id")),
)


@cache
def _compile(kinds: frozenset[str]) -> Alternation:
    """The combined pattern and its reach for a set of enabled kinds (cached: configs with
    the same kinds share one compiled table)."""
    parts = [p for p, ks in _ALTERNATIVES if not ks or kinds.intersection(ks)]
    if "address" in kinds:
        # Before numbers, so "1600 Pennsylvania Avenue" is not read as digit groups first.
        parts.insert(len(parts) - 1, _address_pattern())
    return Alternation("|".join(parts))


# --------------------------------------------------------------------------------------------
# Context words
# --------------------------------------------------------------------------------------------

_NEG_WORDS = re.compile(
    r"(?i)\b(?:order|orders|invoice|tracking|shipment|parcel|reference|ref|confirmation|booking|"
    r"ticket|sku|serial|isbn|issn|ean|upc|gtin|imei|asin|patent|version|build|release|"
    r"transaction|txn|receipt|po|p/n|part\s*(?:no|number|#))\b"
)
# A number right after "#" or a currency sign is an identifier or an amount.
_NEG_IMMEDIATE = re.compile(r"(?i)(?:[#$€£¥₹]|\b(?:usd|eur|gbp|inr|rs)\.?)\s?$")
_CARD_WORDS = re.compile(
    r"(?i)\b(?:card|visa|mastercard|amex|american express|discover|jcb|diners|maestro|unionpay|"
    r"credit|debit|cc|pan|payment|pay|charged?|billing)\b"
)
_PHONE_WORDS = re.compile(
    r"(?i)\b(?:phone|tel|telephone|mobile|cell|cellphone|fax|call|calling|text|sms|whatsapp|"
    r"contact|reach|dial|ring|hotline|helpline|telefon|telefonnummer|téléphone|tél|handy|"
    r"portable|mob|mobil|landline|phone number|ph)\b"
)
_VERSION_WORDS = re.compile(r"(?i)\b(?:version|release|build|ver|rev|revision|firmware|v)\W{0,2}$")
_STRONG_SUFFIX = re.compile(
    r"\b(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Terrace|Ter|"
    r"Way|Parkway|Pkwy|Highway|Hwy)\b"
)
_SSN_WORDS = re.compile(r"(?i)\b(?:ssn|social security(?: number| no\.?)?|ss#)")
_AADHAAR_WORDS = re.compile(r"(?i)\b(?:aadhaar|aadhar|uidai|uid)\b")
_IDNR_WORDS = re.compile(
    r"(?i)(?:steuer-?id|steuer-?identifikationsnummer|identifikationsnummer|\bidnr\b|"
    r"\btax (?:id|identification number)\b|\btin\b)"
)
# A sentence ends at . ! ? ; followed by a space (but not after the abbreviations that
# introduce numbers: "Tel.", "No.", "Nr.", "Ph.", "Fax.") or at a newline.
_SENTENCE_BREAK = re.compile(r"(?<![Tt]el)(?<![Nn]o)(?<![Nn]r)(?<!Ph)(?<!ph)(?<!Fax)(?<!fax)[.!?;]\s|\n")


def _token_before(text: str, start: int) -> str:
    """The non-space characters right before ``start`` (within the context window)."""
    window = text[max(0, start - CONTEXT_CHARS) : start]
    return window.rsplit(None, 1)[-1] if window and not window[-1].isspace() else ""


def _before(m: Match, start: int) -> str:
    """Up to ``_KEYWORD_WINDOW`` characters before ``start``, cut at the last sentence break,
    so a keyword in the previous sentence does not speak for this number."""
    text = m.string[max(0, start - _KEYWORD_WINDOW) : start]
    parts = _SENTENCE_BREAK.split(text)
    return parts[-1]


# --------------------------------------------------------------------------------------------
# Validators
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Hit:
    kind: PiiKind
    start: int  # offsets relative to the match's string
    end: int
    value: str  # the raw matched text (never leaves the detector unmasked)
    norm: str  # normalised form for the request comparison
    score: float
    message: str
    attrs: tuple[tuple[str, str | int | float | bool], ...] = ()


# Card brands: (name, IIN prefix ranges as (low, high) over the same digit count, lengths).
_CARD_BRANDS: tuple[tuple[str, tuple[tuple[int, int], ...], tuple[int, ...]], ...] = (
    ("amex", ((34, 34), (37, 37)), (15,)),
    ("diners", ((300, 305), (3095, 3095), (36, 36), (38, 39)), (14, 15, 16, 17, 18, 19)),
    ("jcb", ((3528, 3589),), (15, 16, 17, 18, 19)),
    ("jcb", ((2131, 2131), (1800, 1800)), (15,)),
    ("visa", ((4, 4),), (13, 16, 19)),
    ("mastercard", ((51, 55), (2221, 2720)), (16,)),
    ("mir", ((2200, 2204),), (16, 17, 18, 19)),
    ("discover", ((6011, 6011), (644, 649), (65, 65), (622126, 622925)), (16, 17, 18, 19)),
    ("unionpay", ((62, 62), (81, 81)), (16, 17, 18, 19)),
    ("maestro", ((5018, 5018), (5020, 5020), (5038, 5038), (5893, 5893), (6304, 6304), (6759, 6759),
                 (6761, 6763), (56, 58), (67, 67)), (16, 17, 18, 19)),
    ("rupay", ((60, 60), (508, 508)), (16,)),
)


def _card_brand(digits: str) -> str | None:
    n = len(digits)
    for name, ranges, lengths in _CARD_BRANDS:
        if n not in lengths:
            continue
        for low, high in ranges:
            w = len(str(low))
            if low <= int(digits[:w]) <= high:
                return name
    return None


def _card_grouping_ok(groups: list[str], seps: list[str]) -> bool:
    if len(groups) == 1:
        return True
    if len(set(seps)) != 1 or seps[0] not in (" ", "-"):
        return False
    sizes = [len(g) for g in groups]
    if sizes in ([4, 6, 5], [4, 6, 4]):
        return True
    if all(s == 4 for s in sizes[:-1]) and 1 <= sizes[-1] <= 4:
        return True
    return len(sizes) == 5 and sizes[:4] == [4, 4, 4, 4] and 1 <= sizes[4] <= 3


def _looks_like_date(groups: list[str], seps: list[str]) -> bool:
    if len(groups) < 3 or not seps or seps[0] not in "-/." or seps[0] != seps[1]:
        return False
    a, b, c = (int(g) for g in groups[:3])
    la, lc = len(groups[0]), len(groups[2])
    if la == 4 and 1 <= b <= 12 and 1 <= c <= 31 and len(groups[1]) <= 2 and lc <= 2:
        return True
    return la <= 2 and len(groups[1]) <= 2 and lc in (2, 4) and 1 <= a <= 31 and 1 <= b <= 31


_GROUP = re.compile(r"\d+")
_EXTENSION = re.compile(r" ?(?:x|ext\.?|extension) ?\d{1,6}$")


def _split_number(text: str) -> tuple[list[str], list[str], list[int]]:
    """Digit groups, the separators between them (normalised), and group start offsets."""
    groups: list[str] = []
    seps: list[str] = []
    starts: list[int] = []
    prev_end = None
    for g in _GROUP.finditer(text):
        if prev_end is not None:
            sep = text[prev_end : g.start()]
            seps.append(sep.replace("(", "").replace(")", "") or "()")
        groups.append(g.group())
        starts.append(g.start())
        prev_end = g.end()
    return groups, seps, starts


class _Validators:
    """All per-kind validation, configured once; holds no request or channel data."""

    def __init__(self, config: PiiConfig) -> None:
        self.kinds = frozenset(config.kinds)
        self.regions = tuple(config.phone_regions)
        self.schemes = frozenset(config.national_ids) if "national_id" in self.kinds else frozenset()
        self.ip_ignore_private = config.ip_ignore_private

    def hits(self, m: Match) -> list[_Hit]:
        group = m.lastgroup
        if group == "email":
            return self._email(m)
        if group == "number":
            return self._number(m)
        if group == "iban":
            return self._iban(m)
        if group in ("ipv4", "ipv6"):
            return self._ip(m)
        if group == "es_id":
            return self._es_id(m)
        if group == "it_cf":
            return self._it_cf(m)
        if group == "address":
            return self._address(m)
        return []

    # -- simple kinds ------------------------------------------------------------------------

    def _email(self, m: Match) -> list[_Hit]:
        value = m.group()
        local, _, domain = value.partition("@")
        labels = domain.split(".")
        if ".." in local or local.endswith(".") or any(
            not lab or lab[0] == "-" or lab[-1] == "-" or len(lab) > 63 for lab in labels
        ):
            return []
        if "://" in _token_before(m.string, m.start()):
            return []  # "scheme://user:secret@host": URL credentials, the secrets detector's
        return [_Hit("email", m.start(), m.end(), value, value.casefold(), 0.95, "email address")]

    def _iban(self, m: Match) -> list[_Hit]:
        value = m.group()
        compact = value.replace(" ", "")
        if not std_iban.is_valid(compact):
            return []
        country = compact[:2]
        return [_Hit("iban", m.start(), m.end(), value, compact.lower(), 0.99,
                     "IBAN (mod-97 valid)", (("country", country),))]

    def _es_id(self, m: Match) -> list[_Hit]:
        value = m.group()
        compact = value.replace("-", "")
        scheme: NationalIdScheme = "es_nie" if compact[0] in "XYZ" else "es_dni"
        if scheme not in self.schemes:
            return []
        ok = std_es_nie.is_valid(compact) if scheme == "es_nie" else std_es_dni.is_valid(compact)
        return [_national(m.start(), m.end(), value, scheme)] if ok else []

    def _it_cf(self, m: Match) -> list[_Hit]:
        value = m.group()
        if "it_codice_fiscale" not in self.schemes or not std_it_cf.is_valid(value):
            return []
        return [_national(m.start(), m.end(), value, "it_codice_fiscale")]

    def _ip(self, m: Match) -> list[_Hit]:
        value = m.group()
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            return []
        if addr.version == 4:
            if all(len(octet) == 1 for octet in value.split(".")) or _VERSION_WORDS.search(
                _before(m, m.start())
            ):
                return []
            if any(len(octet) > 1 and octet[0] == "0" for octet in value.split(".")):
                return []
        else:
            groups = [g for g in value.split(":") if g]
            if len(groups) < 3 or max(len(g) for g in groups) < 3:
                return []
        if (addr.is_loopback or addr.is_unspecified or addr.is_link_local or addr.is_multicast
                or addr.is_reserved):
            return []
        if self.ip_ignore_private and (addr.is_private or not addr.is_global):
            return []
        return [_Hit("ip", m.start(), m.end(), value, str(addr).casefold(), 0.9,
                     f"IPv{addr.version} address", (("version", addr.version),))]

    def _address(self, m: Match) -> list[_Hit]:
        value = m.group()
        number, _, rest = value.partition(" ")
        if len(number.rstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")) == 1 and not _STRONG_SUFFIX.search(rest):
            return []  # "3 Main Points": a one-digit count before words, unless clearly a street
        norm = re.sub(r"[\W_]+", "", value.casefold())
        return [_Hit("address", m.start(), m.end(), value, norm, 0.7, "US street address")]

    # -- digit groups ------------------------------------------------------------------------

    def _number(self, m: Match) -> list[_Hit]:
        text = m.group()
        before = _before(m, m.start())
        negative = bool(_NEG_WORDS.search(before) or _NEG_IMMEDIATE.search(before))
        groups, seps, starts = _split_number(text)
        if _looks_like_date(groups, seps):
            return []
        digits = "".join(groups)
        n = len(digits)
        if n in (10, 13) and (len(groups) >= 4 or digits[:3] in ("978", "979")) and (
            std_isbn.is_valid(text.replace(" ", "-"))
        ):
            return []
        windows = _windows(groups, seps)
        for i, j in windows:
            hit = self._number_window(m, before, negative, groups, seps, starts, i, j)
            if hit is not None:
                return [hit]
        if "phone" in self.kinds and not (negative and not text.startswith("+")) and not _ssn_shaped(
            groups, seps
        ):
            hit = self._phone(m, before, groups, seps, starts, windows)
            if hit is not None:
                return [hit]
        return []

    def _number_window(self, m: Match, before: str, negative: bool, all_groups: list[str],
                       all_seps: list[str], starts: list[int], i: int, j: int) -> _Hit | None:
        """Validate groups ``i..j`` of a digit-group match: card, SSN, national id, phone."""
        text = m.group()
        base = m.start()
        groups = all_groups[i:j]
        seps = all_seps[i : j - 1]
        digits = "".join(groups)
        n = len(digits)
        plus = i == 0 and text.startswith("+")
        s = base if i == 0 else base + starts[i]
        e = base + starts[j - 1] + len(groups[-1])
        last = j == len(all_groups)
        if last and text[e - base :].startswith(")"):
            e += 1
        value = m.string[s:e]
        if (
            "card" in self.kinds and 12 <= n <= 19 and not plus and not value.startswith("(")
            and (not negative or _CARD_WORDS.search(before)) and _card_grouping_ok(groups, seps)
            and (brand := _card_brand(digits)) and luhn.is_valid(digits)
        ):
            return _Hit("card", s, e, value, digits, 0.99, f"payment card number ({brand}, Luhn-valid)",
                            (("brand", brand),))
        if negative:
            return None
        if (
            "ssn" in self.kinds and n == 9 and not plus
            and (_ssn_shaped(groups, seps) or (len(groups) == 1 and _SSN_WORDS.search(before)))
            and std_us_ssn.is_valid(digits)
        ):
            return _Hit("ssn", s, e, value, digits, 0.9, "US social security number")
        if self.schemes and not plus:
            hit = self._numeric_national(before, groups, seps, digits, s, e, value)
            if hit is not None:
                return hit
        return None

    def _numeric_national(self, before: str, groups: list[str], seps: list[str], digits: str, s: int,
                          e: int, value: str) -> _Hit | None:
        n = len(digits)
        sizes = [len(x) for x in groups]
        one_sep = len(set(seps)) <= 1 and (not seps or seps[0] in (" ", "-", "."))
        if "fr_nir" in self.schemes and n == 15 and one_sep and digits[0] in "1278" and (
            len(groups) == 1 or sizes in ([1, 2, 2, 2, 3, 3, 2], [13, 2], [1, 2, 2, 5, 3, 2])
        ) and std_fr_nir.is_valid(digits):
            return _national(s, e, value, "fr_nir")
        if "in_aadhaar" in self.schemes and n == 12 and one_sep and (
            sizes == [4, 4, 4] or (len(groups) == 1 and _AADHAAR_WORDS.search(before))
        ) and std_in_aadhaar.is_valid(digits):
            return _national(s, e, value, "in_aadhaar")
        if "de_idnr" in self.schemes and n == 11 and one_sep and _IDNR_WORDS.search(before) and (
            std_de_idnr.is_valid(digits)
        ):
            return _national(s, e, value, "de_idnr")
        return None

    def _phone(self, m: Match, before: str, all_groups: list[str], all_seps: list[str],
               starts: list[int], windows: list[tuple[int, int]]) -> _Hit | None:
        """Phone numbers: widest window first, then the first configured region whose plan
        accepts it. A number written without "+" must also be written the way that plan
        writes it: the same digits as its national form (trunk prefix included) or as
        country code + number, and digit groups that agree with the plan's grouping. That is
        what keeps "2976 5568" (valid in some plan, written in none) and stray neighbouring
        groups out. "+" numbers are distinctive enough on their own."""
        text = m.group()
        base = m.start()
        plus = text.startswith("+")
        ext = _EXTENSION.search(text)
        regions: tuple[str | None, ...] = (None,) if plus else self.regions
        tried: list[tuple[int, int, str, list[str]]] = []
        for i, j in windows:
            if i > 0 and plus:
                continue
            s = base if i == 0 else base + starts[i]
            last = j == len(all_groups)
            # the last window keeps "x123" and a closing ")" inside the span
            e = m.end() if last else base + starts[j - 1] + len(all_groups[j - 1])
            value = m.string[s:e]
            number = _EXTENSION.sub("", value.replace("(0)", "")) if last and ext else value.replace("(0)", "")
            groups = _GROUP.findall(number)
            seps = all_seps[i : i + len(groups) - 1]
            digits = "".join(groups)
            if not 7 <= len(digits) <= 15:
                continue
            if "." in seps and (len(groups) < 3 or any(len(x) == 1 for x in groups)):
                continue  # a decimal number, or a version with one-digit parts
            if "/" in seps and len(groups) >= 3:
                continue
            if len(groups) == 1 and not plus and not value.startswith("(") and not _PHONE_WORDS.search(before):
                continue  # bare digits are some plan's valid number far too often
            tried.append((s, e, value.replace("(0)", ""), groups))
        for s, e, value, groups in tried:
            for r in regions:
                try:
                    parsed = phonenumbers.parse(value, r)
                except phonenumbers.NumberParseException:
                    continue
                if not phonenumbers.is_valid_number(parsed):
                    continue
                if not plus and not _national_digits_ok(parsed, "".join(groups), bool(_PHONE_WORDS.search(before))):
                    continue
                if (s, e) != (base, m.end()) and not _grouping_ok(parsed, groups):
                    continue  # a window must be grouped the plan's way to drop its neighbours
                region = phonenumbers.region_code_for_number(parsed) or (r or "")
                nsn = phonenumbers.national_significant_number(parsed)
                return _Hit("phone", s, e, m.string[s:e], nsn, 0.85, "phone number", (("region", region),))
        return None


_PN_FORMATS = (phonenumbers.PhoneNumberFormat.NATIONAL, phonenumbers.PhoneNumberFormat.INTERNATIONAL)


def _grouping_ok(number: phonenumbers.PhoneNumber, groups: list[str]) -> bool:
    """True when every boundary between the candidate's digit groups is also a boundary in the
    plan's national or international rendering (aligned at the last digit, so a dropped trunk
    "0" or an added "00"/IDD prefix does not matter). One group (bare digits) always agrees.
    This is what rejects "2 4111 1111 1111" while accepting "+44113 496 0806"."""
    if len(groups) == 1:
        return True
    cand: list[int] = []
    total = 0
    for g in groups[:-1]:
        total += len(g)
        cand.append(total)
    n = total + len(groups[-1])
    for fmt in _PN_FORMATS:
        rendered = phonenumbers.format_number(number, fmt).split(" ext.")[0]
        fgroups = _GROUP.findall(rendered)
        ftotal = sum(len(g) for g in fgroups)
        shift = ftotal - n
        bounds: set[int] = set()
        acc = 0
        for g in fgroups[:-1]:
            acc += len(g)
            bounds.add(acc)
        if all(b + shift in bounds or b + shift <= 0 for b in cand):
            return True
    return False


def _national_digits_ok(number: phonenumbers.PhoneNumber, digits: str, phone_word: bool) -> bool:
    """Written as the plan writes it: national form (with its trunk prefix), or country code
    + number (optionally after 00/011). Without the trunk prefix (common for Indian mobiles)
    only after a phone word."""
    national = "".join(_GROUP.findall(
        phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL).split(" ext.")[0]))
    nsn = phonenumbers.national_significant_number(number)
    intl = str(number.country_code) + nsn
    return digits in (national, intl, "00" + intl, "011" + intl) or (phone_word and digits == nsn)


def _ssn_shaped(groups: list[str], seps: list[str]) -> bool:
    return [len(x) for x in groups] == [3, 2, 4] and len(set(seps)) == 1 and seps[0] in ("-", " ")


def _windows(groups: list[str], seps: list[str]) -> list[tuple[int, int]]:
    """Group windows to try, widest first then leftmost: the whole match, then with up to one
    stray group dropped at the start and up to two at the end ("call 555-123-4567 2 times",
    "item 2 4111 1111 1111 1111", "4111 1111 1111 1111 12/25"). A group may only be dropped
    when it is short (<= 2 digits) or set off by another separator than the window uses: in
    a list of numbers ("5397 2976 5568 5202") every window would otherwise be one more chance
    for a checksum or a numbering plan to accept a coincidence."""
    g = len(groups)
    out = [(0, g)]
    for i in range(min(2, g)):
        for j in range(max(i + 1, g - 2), g + 1):
            if (i, j) == (0, g):
                continue
            inner = set(seps[i : j - 1])
            # the separator between a dropped group and the window
            ok = all(len(groups[k]) <= 2 or seps[i - 1] not in inner for k in range(i))
            ok = ok and all(len(groups[k]) <= 2 or seps[j - 1] not in inner for k in range(j, g))
            if ok:
                out.append((i, j))
    return sorted(out, key=lambda w: (w[0] - w[1], w[0]))


def _national(s: int, e: int, value: str, scheme: NationalIdScheme) -> _Hit:
    norm = re.sub(r"[\W_]+", "", value).lower()
    return _Hit("national_id", s, e, value, norm, 0.95, f"national identifier ({scheme})",
                (("scheme", scheme),))


# --------------------------------------------------------------------------------------------
# Request values (ignore_if_in_request)
# --------------------------------------------------------------------------------------------

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


class RequestText:
    """The request's messages, normalised once (lazily, on first use) for "did the request
    already contain this value?" checks. ``fold`` is the casefolded text; ``alnum`` keeps
    only ASCII letters and digits of it, so ``4111 1111 ...`` and ``4111-1111-...`` compare
    equal. Substring tests on these are exact for emails and unambiguous for the long numbers
    compared here (>= 7 digits)."""

    __slots__ = ("_alnum", "_ctx", "_fold", "_roles")

    def __init__(self, ctx: RequestContext, roles: tuple[str, ...]) -> None:
        self._ctx = ctx
        self._roles = roles
        self._fold: str | None = None
        self._alnum = ""

    def _build(self) -> str:
        msgs = self._ctx.texts(*self._roles) if self._roles else self._ctx.messages
        self._fold = "\n".join(msg.text for msg in msgs).casefold()
        self._alnum = _NON_ALNUM.sub("", self._fold)
        return self._fold

    def contains_text(self, norm: str) -> bool:
        fold = self._fold if self._fold is not None else self._build()
        return bool(norm) and norm in fold

    def contains_alnum(self, norm: str) -> bool:
        if self._fold is None:
            self._build()
        key = _NON_ALNUM.sub("", norm.casefold())
        return bool(key) and key in self._alnum


@dataclass(slots=True)
class _Prepared:
    request: RequestText | None


def _in_request(hit: _Hit, request: RequestText) -> bool:
    if hit.kind in ("email", "ip"):
        return request.contains_text(hit.norm)
    return request.contains_alnum(hit.norm)


# --------------------------------------------------------------------------------------------
# Runtime
# --------------------------------------------------------------------------------------------


class _PiiChannel(ChannelState):
    __slots__ = ("_channel", "_detector", "_done", "_prepared", "_scanner")

    def __init__(self, detector: PiiDetector, prepared: _Prepared, channel: Channel) -> None:
        self._detector = detector
        self._prepared = prepared
        self._channel = channel
        self._scanner = BoundedScanner(detector.pattern, _TRIGGER, extras=detector.extras)
        self._done = False

    def feed(self, text: str) -> list[Finding]:
        if self._done:
            return []
        self._scanner.append(text)
        return self._scan(final=False)

    def finish(self, end: StreamEnd) -> list[Finding]:
        if self._done:
            return []
        out = self._scan(final=True)
        self._done = True
        self._scanner.clear()
        return out

    def _scan(self, final: bool) -> list[Finding]:
        out: list[Finding] = []
        scanner = self._scanner
        det = self._detector
        while (found := scanner.next_match(final)) is not None:
            base, m = found
            if not _bounded(m):
                scanner.advance(base + skip_word(m.string, m.start()))
                continue
            scanner.advance(base + m.end())
            for hit in det.validators.hits(m):
                if hit.kind not in det.kinds:
                    continue
                request = self._prepared.request
                if request is not None and _in_request(hit, request):
                    continue
                out.append(det.finding(hit, base, self._channel))
        return out


class PiiDetector(Detector):
    name: ClassVar[str] = "pii"
    config: PiiConfig

    def __init__(self, config: PiiConfig) -> None:
        super().__init__(config)
        self.kinds = frozenset(config.kinds)
        self.pattern = _compile(self.kinds)
        self.extras = (EMAIL,) if "email" in self.kinds else ()
        self.reach = max((self.pattern.reach, *(x.reach for x in self.extras)))
        self.validators = _Validators(config)
        merged = {**DEFAULT_SEVERITY, **config.severity}
        self.severity = {k: Severity[v] for k, v in merged.items()}

    @property
    def lookback_chars(self) -> int:
        """The reach of the combined pattern for the enabled kinds: the longest text a match
        (plus the lookahead that settles it) can span, so it is never partly released."""
        return self.reach if self.kinds else 0

    def prepare(self, ctx: RequestContext) -> _Prepared:
        if not self.config.ignore_if_in_request:
            return _Prepared(None)
        return _Prepared(RequestText(ctx, tuple(self.config.ignore_if_in_request_roles)))

    def open_channel(self, prepared: Any, channel: Channel) -> ChannelState | None:
        if not self.kinds:
            return None
        return _PiiChannel(self, prepared, channel)

    def finding(self, hit: _Hit, base: int, channel: Channel) -> Finding:
        return Finding(
            detector=self.name,
            category=hit.kind,
            severity=self.severity[hit.kind],
            score=hit.score,
            message=hit.message,
            span=(base + hit.start, base + hit.end),
            channel=channel,
            evidence=mask(hit.value, "email" if hit.kind == "email" else hit.kind),
            replacement=placeholder(hit.kind),
            attrs=dict(hit.attrs),
        )

    def scan_text(self, text: str) -> Iterator[tuple[str, int, int]]:
        """(kind, start, end) of every value in a whole text, ignoring the request check:
        used by offline evaluation and by tests."""
        scanner = BoundedScanner(self.pattern, _TRIGGER, extras=self.extras)
        scanner.append(text)
        while (found := scanner.next_match(True)) is not None:
            base, m = found
            if not _bounded(m):
                scanner.advance(base + skip_word(m.string, m.start()))
                continue
            scanner.advance(base + m.end())
            for hit in self.validators.hits(m):
                if hit.kind in self.kinds:
                    yield hit.kind, base + hit.start, base + hit.end


class PiiConfig(DetectorConfig):
    """Settings of the ``pii`` detector (YAML key ``pii``)."""

    detector_class: ClassVar[type[Detector]] = PiiDetector

    kinds: tuple[PiiKind, ...] = DEFAULT_KINDS
    severity: dict[PiiKind, SeverityName] = {}
    phone_regions: tuple[str, ...] = ("US", "GB", "DE", "FR", "IN")
    national_ids: tuple[NationalIdScheme, ...] = NATIONAL_ID_SCHEMES
    ip_ignore_private: bool = True
    ignore_if_in_request: bool = True
    ignore_if_in_request_roles: tuple[str, ...] = ()

    @field_validator("phone_regions")
    @classmethod
    def _known_regions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [r for r in v if r not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"unknown phone regions {unknown}; use ISO 3166 codes such as US, GB, DE")
        return v


CONFIGS: dict[str, type[DetectorConfig]] = {"pii": PiiConfig}

__all__ = [
    "CONFIGS",
    "DEFAULT_KINDS",
    "DEFAULT_SEVERITY",
    "KINDS",
    "BoundedScanner",
    "PiiConfig",
    "PiiDetector",
    "RequestText",
    "pattern_reach",
]
