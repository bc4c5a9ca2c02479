"""Grounding: is each sentence of the answer supported by the context the request supplied?

gapwatch cannot run a second model at proxy latency, so this is a set of fast, explainable
heuristics over the context (the evidence) and the answer, one sentence at a time:

- specific claims that the context does not contain: numbers, dates and quantities
  (``unsupported_number``), named entities (``unsupported_entity``), quoted strings
  (``unsupported_quote``), URLs (``unsupported_url``) and citation markers such as ``[3]``,
  ``(Smith 2021)`` or ``doc_7`` (``unsupported_citation``);
- low lexical support: few of the sentence's content words (stemmed) occur in the context
  (``low_support``).

Paraphrase must not fire, so comparisons are normalised: case and Unicode forms, a Porter
stemmer, nationality adjectives against place names, acronyms against the initials of names,
numbers in any spelling ("1,200" = "1200" = "1.2 thousand" = "twelve hundred"), rounding when
the answer says so ("about 1,200", "1.2 million", "3.5" for 3.47), years against their decade and
century.

What counts as context (``prepare``):
- messages whose role is in ``context_roles`` (default system, developer, tool): the blocks
  inside ``context_delimiters`` when the message has any, else the whole message;
- user messages (``user_messages``): the delimited blocks when there are any; otherwise the
  whole message *minus the question*: sentences ending in "?" and lines headed ``Question:``
  or ``Q:``. The question and the instructions around delimited blocks are not evidence, but
  the answer may repeat them without being flagged (they are the user's own words): they form
  the *echo* vocabulary, which excuses claims but adds no lexical support.
- less than ``min_context_chars`` of context in total means there is no context: the
  detector stays silent (a one-line system prompt is not retrieved evidence).

Sentences are split incrementally: a sentence is scored as soon as the text after it proves it
complete (or at finish), so the work per ``feed`` is proportional to the new text. The
response-level score (1 = fully supported) combines the content-weighted lexical support with a
penalty per unsupported claim (see ``response_score``); ``finish_response`` reports it as a ``grounding_score`` finding
only below ``threshold``, and ``response_score(prepared)`` exposes it for metrics always.
"""

from __future__ import annotations

import bisect
import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import re2

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
from detectors.redaction import mask
from detectors.text import _CONFUSABLES, normalise

NAME = "grounding"
_DATA = Path(__file__).with_name("data")


def _data_lines(name: str) -> list[str]:
    lines = (_DATA / name).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


STOPWORDS: frozenset[str] = frozenset(_data_lines("stopwords.txt"))


def _load_demonyms() -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    adj: dict[str, set[str]] = {}
    place: dict[str, set[str]] = {}
    for line in _data_lines("demonyms.txt"):
        a, _, rest = line.partition(":")
        a = a.strip()
        places = {p.strip() for p in rest.split(",") if p.strip()}
        adj.setdefault(a, set()).update(places)
        for p in places:
            place.setdefault(p, set()).add(a)
    return ({k: frozenset(v) for k, v in adj.items()}, {k: frozenset(v) for k, v in place.items()})


DEMONYMS, PLACES = _load_demonyms()

# ---------------------------------------------------------------------------------------------
# Porter stemmer (M. F. Porter, 1980). Written out because the venv has no stemming library and
# nothing may be downloaded; it is the reference algorithm, steps 1a-5b.
# ---------------------------------------------------------------------------------------------

_VOWELS = frozenset("aeiou")
_STEP2 = sorted(
    [("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
     ("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"),
     ("ization", "ize"), ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"),
     ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"),
     ("logi", "log")],
    key=lambda p: -len(p[0]),
)
_STEP3 = sorted(
    [("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""),
     ("ness", "")],
    key=lambda p: -len(p[0]),
)
_STEP4 = sorted(
    ["al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion", "ou",
     "ism", "ate", "iti", "ous", "ive", "ize"],
    key=len,
    reverse=True,
)


def _cv(w: str) -> str:
    out: list[str] = []
    for ch in w:
        if ch in _VOWELS:
            out.append("v")
        elif ch == "y":
            out.append("v" if out and out[-1] == "c" else "c")
        else:
            out.append("c")
    return "".join(out)


def _measure(w: str) -> int:
    cv = _cv(w)
    return sum(1 for i in range(1, len(cv)) if cv[i] == "c" and cv[i - 1] == "v")


def _has_vowel(w: str) -> bool:
    return "v" in _cv(w)


def _double_cons(w: str) -> bool:
    return len(w) >= 2 and w[-1] == w[-2] and _cv(w)[-1] == "c"


def _cvc(w: str) -> bool:
    return len(w) >= 3 and _cv(w)[-3:] == "cvc" and w[-1] not in "wxy"


@lru_cache(maxsize=1 << 15)
def stem(w: str) -> str:
    """Porter stem of a lower-case word; non-ASCII or short words are returned unchanged.

    The memo holds only word -> stem pairs (a pure function), never request state."""
    if len(w) <= 2 or not w.isascii() or not w.isalpha():
        return w
    if w.endswith("sses") or w.endswith("ies"):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    again = False
    if w.endswith("eed"):
        if _measure(w[:-3]) > 0:
            w = w[:-1]
    elif w.endswith("ed") and _has_vowel(w[:-2]):
        w, again = w[:-2], True
    elif w.endswith("ing") and _has_vowel(w[:-3]):
        w, again = w[:-3], True
    if again:
        if w.endswith(("at", "bl", "iz")):
            w += "e"
        elif _double_cons(w) and w[-1] not in "lsz":
            w = w[:-1]
        elif _measure(w) == 1 and _cvc(w):
            w += "e"
    if w.endswith("y") and _has_vowel(w[:-1]):
        w = w[:-1] + "i"
    for table in (_STEP2, _STEP3):
        for suf, rep in table:
            if w.endswith(suf):
                if _measure(w[: -len(suf)]) > 0:
                    w = w[: -len(suf)] + rep
                break
    for suf in _STEP4:
        if w.endswith(suf):
            st = w[: -len(suf)]
            if _measure(st) > 1 and (suf != "ion" or st.endswith(("s", "t"))):
                w = st
            break
    if w.endswith("e"):
        st = w[:-1]
        m = _measure(st)
        if m > 1 or (m == 1 and not _cvc(st)):
            w = st
    if w.endswith("ll") and _measure(w) > 1:
        w = w[:-1]
    return w


# ---------------------------------------------------------------------------------------------
# Tokens, numbers, claims
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")


_INVISIBLE = re.compile(
    "[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)


def fold_text(text: str) -> str:
    """``detectors.text.normalise`` for a whole text, with the invisible format characters
    removed by one regex instead of a per-character category look-up (an ASCII text only
    needs lower-casing)."""
    if text.isascii():
        return text.lower()
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))
    return _CONFUSABLE.sub(_unconfuse, text).casefold()


_CONFUSABLE = re.compile("[" + "".join(chr(k) for k in _CONFUSABLES) + "]")


def _unconfuse(m: re.Match[str]) -> str:
    return str(_CONFUSABLES[ord(m.group())])


def fold(tok: str) -> str:
    """Case- and form-folded word without a possessive ``'s`` (ASCII fast path)."""
    t = tok.lower() if tok.isascii() else normalise(tok).replace("\u2019", "'")
    if t.endswith("'s"):
        t = t[:-2]
    return t


_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
    "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
}
_ORDINALS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
    "eighth": 8, "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "thirteenth": 13,
    "fourteenth": 14, "fifteenth": 15, "sixteenth": 16, "seventeenth": 17, "eighteenth": 18,
    "nineteenth": 19, "twentieth": 20, "thirtieth": 30, "fortieth": 40, "fiftieth": 50,
    "hundredth": 100, "thousandth": 1000,
}
_SCALES = {"dozen": 12, "hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000,
           "trillion": 1_000_000_000_000}
_NUMBER_WORDS = frozenset(_UNITS) | frozenset(_ORDINALS) | frozenset(_SCALES)
# Number words the answer may use without a matching number in the context: they are idioms
# far more often than counts ("one of the", "the first to", "a second time").
_UNFLAGGED_WORD_VALUES = frozenset({0.0, 1.0, 2.0})
_MONTHS = {
    "january": 1, "jan": 1, "february": 2, "feb": 2, "march": 3, "mar": 3, "april": 4, "apr": 4,
    "may": 5, "june": 6, "jun": 6, "july": 7, "jul": 7, "august": 8, "aug": 8, "september": 9,
    "sep": 9, "sept": 9, "october": 10, "oct": 10, "november": 11, "nov": 11, "december": 12,
    "dec": 12,
}
_MONTH_ALT = "|".join(sorted(_MONTHS, key=len, reverse=True))
_DAYS = frozenset({"monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"})

# Words that make a number approximate ("about 1,200"); looked for just before a number.
_APPROX_BEFORE = re.compile(
    r"\b(?:about|approximately|approx\.?|around|roughly|nearly|almost|over|under|more\s+than|"
    r"less\s+than|fewer\s+than|some|circa|up\s+to|at\s+least|at\s+most|estimated|just\s+over|"
    r"just\s+under)\s+$|~\s*$",
    re.IGNORECASE,
)
# Starts with a digit so that re can skip ahead to candidates; the character before the number
# (no letter, digit, "." or "," glued to it) and a currency sign are checked in Python.
_NUMBER = re.compile(
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?![\d,]\d)"
    r"(?P<suf>(?:st|nd|rd|th|s)\b)?"
    r"(?:\s*(?P<scale>hundred|thousand|million|billion|trillion|bn|mn|mln|k|m)\b)?"
    r"(?:\s*(?P<pct>%|percent\b|per\s*cent\b))?",
    re.IGNORECASE,
)
_CURRENCY = frozenset("$€£¥₹")
_SCALE_SUFFIX = {"hundred": 100, "thousand": 1e3, "k": 1e3, "m": 1e6, "million": 1e6, "mn": 1e6, "mln": 1e6,
                 "billion": 1e9, "bn": 1e9, "trillion": 1e12}
_DATE_MONTH = re.compile(
    rf"\b(?P<m>{_MONTH_ALT})\.?\s+(?:\d{{1,2}}(?:st|nd|rd|th)?\b|\d{{4}}\b)"
    rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?(?P<m2>{_MONTH_ALT})\b",
    re.IGNORECASE,
)
# re2 (linear time, and several times faster than re on these) for the context-wide scans
_NUMERIC_DATE = re2.compile(r"\d{4}-(\d{1,2})-\d{1,2}\b|\b(\d{1,2})/(\d{1,2})/\d{2,4}\b")
_LIST_MARKER = re.compile(r"^\s*(?:[-*+•]|#{1,6}|>|\d{1,3}[.)])\s+")
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'()\[\]{}]+", re.IGNORECASE)
_CITATION = re.compile(
    r"\[\^?(?P<ids>\d{1,4}(?:\s*[,;\u2013-]\s*\d{1,4})*)\]"
    r"|【(?P<ids2>\d{1,4})[^】]{0,40}】"
    r"|\[(?:doc(?:ument)?|source|ref|passage|chunk)[\s_#-]*(?P<ids3>\d{1,4})\]"
    r"|\b(?P<docid>(?:doc|document|source|passage|chunk)[_-](?P<ids4>\d{1,4}))\b"
    r"|\((?P<author>(?-i:[A-Z])[\w'\u2019-]+)(?:\s+et\s+al\.?|\s+(?:and|&)\s+(?-i:[A-Z])[\w'\u2019-]+)?,?\s+"
    r"(?P<year>(?:1[5-9]|20)\d{2})[a-z]?\)",
    re.IGNORECASE,
)
_CONTEXT_IDS = re2.compile(  # run on the folded (lower-case) context
    r"\[(\d{1,4})\]"
    r"|\b(?:doc(?:ument)?|source|ref|passage|chunk|result)[\s_#:-]{0,3}(\d{1,4})\b"
    r"|\b(?:id|index)\s*[=:]\s*[\"']?(\w{1,32})"
    r"|(?m:^)\s*\[?(\d{1,4})[\].):]\s"
)
_QUOTE = re.compile(r"\"([^\"\n]{2,300})\"|“([^”\n]{2,300})”")
_LABEL = re.compile(r"[ \t]*(?:\*\*[^*\n]{1,60}\*\*[ \t]*:|\*\*[^*\n]{1,60}:\*\*|[^\W\d][\w '&/-]{0,40}:(?=\s))")
_INLINE_CODE = re.compile(r"`[^`\n]{1,200}`")
_APPROX_TRAILING = re.compile(r"^\s*(?:or\s+so|odd|-?ish)\b", re.IGNORECASE)

# Lower-case words allowed inside a name ("Bank of America", "Lord of the Rings").
_CONNECTORS = frozenset({"of", "the", "de", "la", "le", "du", "da", "del", "der", "van", "von",
                         "and", "for", "on", "y", "di", "&", "al", "bin", "ibn"})
# Capitalised words that do not name anything by themselves.
_TITLES = frozenset({"mr", "mrs", "ms", "dr", "prof", "professor", "president", "king", "queen",
                     "prince", "princess", "sir", "lord", "lady", "saint", "st", "general",
                     "captain", "senator", "governor", "pope", "rev", "reverend", "mount", "mt",
                     "lake", "river", "jr", "sr", "director", "chief", "minister", "chancellor",
                     "mayor", "judge", "justice", "bishop", "sheikh", "emperor", "duke"})
_TITLES |= frozenset(_data_lines("generic_caps.txt"))


@dataclass(frozen=True, slots=True)
class _Num:
    start: int
    end: int
    value: float
    tolerance: float  # 0 = exact match required
    percent: bool
    word: bool  # spelled out ("twelve hundred")


def _sig_tolerance(mantissa: str, value: float) -> float:
    """Half a unit in the last significant digit of a round number ("1,200" -> 50), at least
    5% of it: what "about 1,200" or "1.2 million" allows."""
    digits = mantissa.replace(",", "").replace(".", "").lstrip("0").rstrip("0") or "0"
    sig = max(1, len(digits))
    if value == 0:
        return 0.0
    unit = 10 ** (math.floor(math.log10(abs(value))) - sig + 1)
    return max(unit / 2, abs(value) * 0.05)


def _digit_numbers(text: str) -> list[_Num]:
    out: list[_Num] = []
    for m in _NUMBER.finditer(text):
        start = m.start()
        before = text[start - 1] if start else " "
        if before.isalnum() or before in "._,":
            continue
        cur = before in _CURRENCY or (before == " " and start > 1 and text[start - 2] in _CURRENCY)
        if cur:
            start -= 1 if before in _CURRENCY else 2
        raw = m.group("num")
        value = float(raw.replace(",", ""))
        scale = m.group("scale")
        approx = (_APPROX_BEFORE.search(text, max(0, start - 24), start) is not None
                  or _APPROX_TRAILING.match(text, m.end()) is not None)
        tol = 0.0
        if "." in raw:
            tol = 0.5 * 10 ** -len(raw.rsplit(".", 1)[1])  # "3.5" stands for [3.45, 3.55)
        if scale and scale.lower() == "m" and not cur:
            scale = None  # "5 m" is five metres; "$5m" is five million
        if scale:
            value *= _SCALE_SUFFIX[scale.lower()]
            approx = True
        if approx:
            tol = max(tol * (_SCALE_SUFFIX[scale.lower()] if scale else 1), _sig_tolerance(raw, value))
        out.append(_Num(start, m.end(), value, tol, bool(m.group("pct")), False))
    return out


def _word_numbers(tokens: list[tuple[str, int, int]]) -> list[_Num]:
    """Spelled-out numbers from folded tokens: "twelve hundred", "two million", "twenty-first"."""
    out: list[_Num] = []
    i, n = 0, len(tokens)
    while i < n:
        w = tokens[i][0]
        if w not in _NUMBER_WORDS and not (w == "a" and i + 1 < n and tokens[i + 1][0] in _SCALES):
            i += 1
            continue
        j = i
        total = current = 0.0
        seen = False
        while j < n:
            t = tokens[j][0]
            if t == "a" and not seen and j + 1 < n and tokens[j + 1][0] in _SCALES:
                current = 1
            elif t == "and" and seen and j + 1 < n and tokens[j + 1][0] in _UNITS:
                pass
            elif t in _UNITS:
                current += _UNITS[t]
                seen = True
            elif t in _SCALES:
                current = (current or 1) * _SCALES[t]
                if _SCALES[t] >= 1000:
                    total += current
                    current = 0
                seen = True
            elif t in _ORDINALS:
                current += _ORDINALS[t]
                seen = True
                j += 1
                break
            else:
                break
            j += 1
        if seen:
            value = total + current
            out.append(_Num(tokens[i][1], tokens[j - 1][2], value, 0.0, False, True))
        i = max(j, i + 1)
    return out


def _tokens(text: str) -> list[tuple[str, int, int]]:
    return [(fold(m.group()), m.start(), m.end()) for m in _WORD.finditer(text)]


# ---------------------------------------------------------------------------------------------
# Evidence: the context, indexed once per request
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Evidence:
    """What the context (or the echo text) contains, in the forms the checks compare."""

    words: set[str] = field(default_factory=set)
    stems: set[str] = field(default_factory=set)
    numbers: list[float] = field(default_factory=list)  # sorted
    months: set[int] = field(default_factory=set)
    raw: str = ""  # the context as sent, for look-ups that need its capitals
    _acronyms: set[str] | None = None
    doc_ids: set[str] = field(default_factory=set)
    text: str = ""  # casefolded, whitespace collapsed: URL and doc-id look-ups
    phrase: str = " "  # folded words joined by single spaces: quote look-ups
    chars: int = 0

    @classmethod
    def build(cls, parts: Iterable[str]) -> Evidence:
        ev = cls()
        blocks = [p for p in parts if p and p.strip()]
        joined = "\n\n".join(blocks)
        ev.chars = len(joined)
        low = fold_text(joined)
        words = [w[:-2] if w.endswith("'s") else w for w in _WORD.findall(low)]
        ev.raw = joined
        ev.words = set(words)
        ev.stems = {stem(w) for w in ev.words if w not in STOPWORDS}
        ev.phrase = " " + " ".join(words) + " "
        ev.text = " ".join(low.split())
        nums: set[float] = set()
        for num in _digit_numbers(joined):
            nums.add(num.value)
            if num.percent:
                nums.add(num.value / 100)
            v = num.value
            if v.is_integer() and 1000 <= v <= 2100:  # a year: its decade and century too
                nums.add(v // 10 * 10)
                nums.add(v // 100 + 1)
        if not ev.words.isdisjoint(_NUMBER_WORDS):
            nums.update(n.value for n in _word_numbers([(w, 0, 0) for w in words]))
        ev.numbers = sorted(nums)
        ev.months.update(_MONTHS[w] for w in ev.words if w in _MONTHS)
        for m in _NUMERIC_DATE.finditer(joined):
            for g in m.groups():
                if g and 1 <= int(g) <= 12:
                    ev.months.add(int(g))
        for m in _CONTEXT_IDS.finditer(low):
            ident = next(g for g in m.groups() if g)
            ev.doc_ids.add(ident.lower().lstrip("0") or "0")
        if not ev.doc_ids:  # unnumbered documents: [1]..[k] (and 0-based [0]) name them in order
            ev.doc_ids.update(str(i) for i in range(len(blocks) + 1))
        return ev

    @property
    def acronyms(self) -> set[str]:
        """Initials of capitalised runs ("National Aeronautics and Space Administration" ->
        "nasa"), computed on first use: most answers have no all-capital word."""
        if self._acronyms is None:
            acr: set[str] = set()
            run: list[str] = []
            for m in _WORD.finditer(self.raw + " ."):
                w = m.group()
                if w[:1].isupper() and not (not run and w.lower() in STOPWORDS):
                    run.append(w[0].lower())
                    continue
                if w.lower() in _CONNECTORS and run:
                    continue
                if len(run) >= 2:
                    acr.add("".join(run))
                run = []
            self._acronyms = acr
        return self._acronyms

    def has_number(self, num: _Num) -> bool:
        values = [num.value, num.value / 100] if num.percent else [num.value]
        nums = self.numbers
        for v in values:
            tol = num.tolerance if v == num.value else num.tolerance / 100
            lo = bisect.bisect_left(nums, v - tol - 1e-9)
            if lo < len(nums) and nums[lo] <= v + tol + 1e-9:
                return True
        return False

    def has_word(self, w: str) -> bool:
        if w in self.words:
            return True
        if stem(w) in self.stems:
            return True
        places = DEMONYMS.get(w)
        if places and not places.isdisjoint(self.words):
            return True
        adjs = PLACES.get(w)
        return bool(adjs and not adjs.isdisjoint(self.words))

    def has_phrase(self, words: list[str]) -> bool:
        return f" {' '.join(words)} " in self.phrase


# ---------------------------------------------------------------------------------------------
# Config and detector
# ---------------------------------------------------------------------------------------------

_DEFAULT_DELIMITERS = (
    "<context>", "<document>", "<documents>", "<doc>", "<source>", "<sources>", "<passage>",
    "<knowledge>", "<search_results>", "<retrieved>", "Context:", "Documents:", "Document:",
    "Sources:", "Passage:", "Knowledge:", "Background:", "Article:", "Reference:",
)
_STOP_HEADINGS = ("Question", "Questions", "Q", "Query", "Task", "Instruction", "Instructions",
                  "Answer", "Request", "User")
_QUESTION = re.compile(r"(?im)^[ \t]*(?:question|q|query)\s*:.*$|[^.!?\n]*\?")
_CATEGORIES = ("number", "entity", "quote", "url", "citation", "low_support")


class GroundingConfig(DetectorConfig):
    """Settings of the ``grounding`` detector (YAML key ``grounding``).

    ``threshold`` 0.8: on the HaluEval QA dev set every threshold below 1 has precision 1.0
    (its correct answers are spans copied from the context), so that file cannot place the
    threshold; 0.8 is the highest value at which the hand-written faithful multi-sentence
    answers in ``tests/unit/test_grounding.py`` (paraphrased summaries, about 0.9) still pass
    with a margin, while any single unsupported claim (score at most 0.65) is reported."""

    detector_class: ClassVar[type[Detector]]

    # what counts as context: whole messages of these roles (or their delimited blocks)
    context_roles: tuple[str, ...] = ("system", "developer", "tool")
    # user messages: delimited blocks, else the whole message minus its question
    user_messages: bool = True
    # "<tag>" marks <tag ...>...</tag> blocks; "Heading:" marks a block up to the next heading
    context_delimiters: tuple[str, ...] = _DEFAULT_DELIMITERS
    min_context_chars: int = 64  # less context than this: the detector stays silent
    max_context_chars: int = 400_000  # context read per request (bounds the prepare cost)
    checks: tuple[str, ...] = _CATEGORIES  # number, entity, quote, url, citation, low_support
    threshold: float = 0.8  # grounding_score finding when the response score is below it
    min_sentence_support: float = 0.5  # low_support below this share of content words ...
    min_content_words: int = 4  # ... in a sentence with at least this many content words
    claim_penalty: float = 0.35  # score factor (1 - penalty) per unsupported claim
    max_sentence_chars: int = 1_000  # a longer run without a sentence end is cut here


@dataclass(slots=True)
class GroundingResponse:
    """Per-response state (``prepare`` makes one per response): the indexed context and the
    running totals that ``response_score`` turns into the response-level score."""

    context: Evidence | None
    echo: Evidence
    sentences: int = 0
    content_words: int = 0
    supported_words: float = 0.0
    claims: int = 0
    unsupported_claims: int = 0
    low_support: int = 0
    reported: bool = False


@dataclass(frozen=True, slots=True)
class _Claim:
    category: str
    start: int
    end: int
    what: str


class GroundingDetector(Detector):
    name: ClassVar[str] = NAME

    def __init__(self, config: GroundingConfig) -> None:
        super().__init__(config)
        self.cfg = config
        tags: list[str] = []
        heads: list[str] = []
        for d in config.context_delimiters:
            d = d.strip()
            if d.startswith("<") and d.endswith(">"):
                tags.append(re.escape(d[1:-1].strip()))
            elif d.endswith(":"):
                heads.append(re.escape(d[:-1].strip()))
            else:
                raise ValueError(f"context delimiter {d!r}: write a tag like <context> or a heading like Context:")
        self._tag = (
            re.compile(rf"<(?P<t>{'|'.join(tags)})\b[^>]*>(?P<body>.*?)(?:</(?P=t)\s*>|\Z)",
                       re.IGNORECASE | re.DOTALL)
            if tags else None
        )
        stops = "|".join(re.escape(s) for s in _STOP_HEADINGS)
        self._head = (
            re.compile(rf"(?im)^[ \t]*(?:#+[ \t]*)?(?:\*\*)?(?:(?P<ctx>{'|'.join(heads)})|{stops})"
                       rf"[ \t]*(?:\*\*)?:(?:\*\*)?[ \t]*")
            if heads else None
        )
        self._checks = frozenset(config.checks)

    # -- request side ------------------------------------------------------------------------

    def _delimited(self, text: str) -> tuple[list[str], str] | None:
        """(context blocks, rest) when ``text`` has delimited blocks, else None."""
        blocks: list[str] = []
        rest: list[str] = []
        pos = 0
        if self._tag is not None:
            for m in self._tag.finditer(text):
                # the opening tag stays: its attributes often number the document (index="3")
                blocks.append(text[m.start() : m.end("body")])
                rest.append(text[pos : m.start()])
                pos = m.end()
        if blocks:
            rest.append(text[pos:])
            return blocks, "\n".join(rest)
        if self._head is not None:
            heads = list(self._head.finditer(text))
            for i, m in enumerate(heads):
                end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
                if m.group("ctx"):
                    blocks.append(text[m.end() : end])
                else:
                    rest.append(text[m.start() : end])
            if blocks:
                rest.append(text[: heads[0].start()])
                return blocks, "\n".join(rest)
        return None

    def split_request(self, ctx: RequestContext) -> tuple[list[str], list[str]]:
        """The request's context blocks and its echo texts (question, instructions)."""
        context: list[str] = []
        echo: list[str] = []
        roles = set(self.cfg.context_roles)
        budget = self.cfg.max_context_chars
        for msg in ctx.messages:
            text = msg.text[:budget]
            if msg.role in roles:
                found = self._delimited(text)
                context.extend(found[0] if found else [text])
            elif msg.role == "user" and self.cfg.user_messages:
                found = self._delimited(text)
                if found:
                    context.extend(found[0])
                    echo.append(found[1])
                else:
                    echo.extend(m.group() for m in _QUESTION.finditer(text))
                    rest = _QUESTION.sub(" ", text)
                    if rest.strip():
                        context.append(rest)
            elif msg.role == "user":
                echo.append(text)
            budget -= min(budget, len(text))
            if budget <= 0:
                break
        return context, echo

    def prepare(self, ctx: RequestContext) -> GroundingResponse:
        context, echo = self.split_request(ctx)
        ev = Evidence.build(context)
        if ev.chars < self.cfg.min_context_chars:
            return GroundingResponse(context=None, echo=Evidence())
        return GroundingResponse(context=ev, echo=Evidence.build(echo))

    def open_channel(self, prepared: GroundingResponse, channel: Channel) -> ChannelState | None:
        if prepared.context is None or channel.kind != "text":
            return None
        return _GroundingChannel(self, prepared, channel)

    # -- response side -----------------------------------------------------------------------

    def response_score(self, prepared: GroundingResponse) -> float | None:
        """The response-level grounding score in [0, 1] (1 = fully supported), for metrics.

        None when the request carried no context or the answer had no scorable sentence.
        With ``s`` the share of the answer's content words found in the context, the score is
        ``(1 - (1 - s)**2) * (1 - claim_penalty)**k`` where ``k`` counts unsupported claims
        (number, entity, quote, URL, citation) and low-support sentences. The square keeps a
        freely paraphrased answer (``s`` about 0.7) near 0.9, and the per-claim factor makes
        one invented figure count whatever the length of the answer."""
        if prepared.context is None or prepared.sentences == 0:
            return None
        lexical = prepared.supported_words / prepared.content_words if prepared.content_words else 1.0
        lexical = 1.0 - (1.0 - lexical) ** 2
        penalties = prepared.unsupported_claims + prepared.low_support
        return lexical * (1.0 - self.cfg.claim_penalty) ** penalties

    def response_metrics(self, prepared: GroundingResponse) -> dict[str, float]:
        """Numbers for the reliability scorecard; empty when there was no context."""
        score = self.response_score(prepared)
        if score is None:
            return {}
        return {"score": score, "sentences": prepared.sentences,
                "unsupported_claims": prepared.unsupported_claims, "low_support": prepared.low_support}

    def finish_response(self, prepared: GroundingResponse) -> list[Finding]:
        if prepared.reported:
            return []
        prepared.reported = True
        score = self.response_score(prepared)
        if score is None or score >= self.cfg.threshold:
            return []
        unsupported = prepared.unsupported_claims + prepared.low_support
        return [Finding(
            detector=NAME, category="grounding_score", severity=Severity.medium, score=score,
            message=f"answer is weakly supported by the context (score {score:.2f} < "
                    f"{self.cfg.threshold:.2f}; {unsupported} unsupported of {prepared.sentences} sentences)",
            attrs={"sentences": prepared.sentences, "unsupported": unsupported},
        )]

    # -- sentence scoring --------------------------------------------------------------------

    def score_sentence(self, prepared: GroundingResponse, text: str, offset: int,
                       channel: Channel) -> list[Finding]:
        """Checks one complete sentence (absolute start ``offset``); updates the totals."""
        ev = prepared.context
        if ev is None:
            return []
        m = _LIST_MARKER.match(text)
        body_from = m.end() if m else 0
        if not text[body_from:].strip():
            return []
        echo = prepared.echo
        checks = self._checks
        claims: list[_Claim] = []
        masked = list(text)

        def blank(s: int, e: int) -> None:
            masked[s:e] = " " * (e - s)

        for m in _INLINE_CODE.finditer(text):
            blank(m.start(), m.end())
        for m in _URL.finditer(text):
            url = m.group().rstrip(".,;:!?")
            e = m.start() + len(url)
            blank(m.start(), e)
            key = _norm_url(url)
            if "url" in checks and key and key not in ev.text and key not in echo.text:
                claims.append(_Claim("url", m.start(), e, "URL"))
        text2 = "".join(masked)
        for m in _CITATION.finditer(text2):
            blank(m.start(), m.end())
            if "citation" in checks and not self._citation_supported(m, ev, echo):
                claims.append(_Claim("citation", m.start(), m.end(), "citation marker"))
        text2 = "".join(masked)
        quote_spans: list[tuple[int, int]] = []
        for m in _QUOTE.finditer(text2):
            inner = m.group(1) or m.group(2)
            qwords = [t for t, _, _ in _tokens(inner)]
            while qwords and qwords[0] in STOPWORDS:
                qwords.pop(0)
            while qwords and qwords[-1] in STOPWORDS:
                qwords.pop()
            quote_spans.append((m.start(), m.end()))
            if len(qwords) >= 2 and "quote" in checks and not (ev.has_phrase(qwords) or echo.has_phrase(qwords)):
                claims.append(_Claim("quote", m.start(), m.end(), "quoted text"))
        # numbers: digits first, then spelled out; dates' months
        nums = _digit_numbers(text2)
        for num in nums:
            if num.start < body_from:
                continue
            if "number" in checks and not (ev.has_number(num) or echo.has_number(num)):
                claims.append(_Claim("number", num.start, num.end, "number"))
            blank(num.start, num.end)
        text2 = "".join(masked)
        toks = _tokens(text2)
        if "number" in checks:
            for num in _word_numbers(toks):
                if num.value in _UNFLAGGED_WORD_VALUES:
                    continue
                if not (ev.has_number(num) or echo.has_number(num)):
                    claims.append(_Claim("number", num.start, num.end, "number"))
            for m in _DATE_MONTH.finditer(text):
                month = _MONTHS[(m.group("m") or m.group("m2")).lower()]
                if month not in ev.months and month not in echo.months:
                    s, e = m.span("m") if m.group("m") else m.span("m2")
                    claims.append(_Claim("number", s, e, "date"))
        if "entity" in checks and not text.lstrip().startswith("#"):  # headings are Title Case
            label = _LABEL.match(text2, body_from)  # "**Key Findings:**", "Revenue Growth:"
            from_ = label.end() if label else body_from
            claims.extend(self._entities(text2, [t for t in toks if t[1] >= from_], from_, ev, echo))
        # lexical support
        content = 0
        supported = 0.0
        for t, _, _ in toks:
            if t in STOPWORDS or len(t) < 2 or t.isdigit() or t in _NUMBER_WORDS:
                continue
            content += 1
            if ev.has_word(t):
                supported += 1
        prepared.sentences += 1
        prepared.content_words += content
        prepared.supported_words += supported
        out: list[Finding] = []
        seen: set[tuple[int, int]] = set()
        for c in sorted(claims, key=lambda c: (c.start, c.end)):
            if (c.start, c.end) in seen:
                continue
            seen.add((c.start, c.end))
            prepared.unsupported_claims += 1
            out.append(Finding(
                detector=NAME, category=f"unsupported_{c.category}", severity=Severity.medium,
                score=1.0, message=f"{c.what} not found in the request's context",
                span=(offset + c.start, offset + c.end), channel=channel,
                evidence=mask(text[c.start : c.end]), attrs={"kind": c.what},
            ))
        support = supported / content if content else 1.0
        weak = content >= self.cfg.min_content_words and support < self.cfg.min_sentence_support
        if "low_support" in checks and weak:
            prepared.low_support += 1
            s = len(text) - len(text.lstrip())
            e = len(text.rstrip())
            out.append(Finding(
                detector=NAME, category="low_support", severity=Severity.low, score=1.0 - support,
                message=f"only {supported:.0f} of {content} content words of this sentence occur in the context",
                span=(offset + s, offset + e), channel=channel, evidence=mask(text[s:e]),
                attrs={"support": round(support, 3), "content_words": content},
            ))
        return out

    @staticmethod
    def _citation_supported(m: re.Match[str], ev: Evidence, echo: Evidence) -> bool:
        if m.group("author"):
            year = _Num(0, 0, float(m.group("year")), 0.0, False, False)
            a = fold(m.group("author"))
            return (a in ev.words or a in echo.words) and (ev.has_number(year) or echo.has_number(year))
        if m.group("docid") and " ".join(m.group("docid").lower().split()) in ev.text:
            return True
        raw = m.group("ids") or m.group("ids2") or m.group("ids3") or m.group("ids4") or ""
        ids: list[str] = []
        for part in re.split(r"\s*[,;]\s*", raw):
            lo, _, hi = part.partition("-") if "-" in part else part.partition("\u2013")
            if hi and lo.isdigit() and hi.isdigit() and 0 <= int(hi) - int(lo) <= 50:
                ids.extend(str(i) for i in range(int(lo), int(hi) + 1))
            elif lo.strip().isdigit():
                ids.append(str(int(lo)))
        return bool(ids) and all(i in ev.doc_ids for i in ids)

    def _entities(self, text: str, toks: list[tuple[str, int, int]], body_from: int,
                  ev: Evidence, echo: Evidence) -> list[_Claim]:
        """Capitalised names the context does not contain. A sentence's first word is
        capitalised anyway, so it starts a name only when the next word is capitalised too
        (or the sentence is a bare name, as short answers are)."""
        out: list[_Claim] = []
        n = len(toks)
        if not n:
            return out
        # a "fragment" (a bare name as the whole answer): every content word is capitalised
        fragment = all(text[s].isupper() or t in _CONNECTORS or t.isdigit() for t, s, _ in toks)
        i = 0
        while i < n:
            s = toks[i][1]
            if not text[s].isupper() or s < body_from:
                i += 1
                continue
            initial = _is_initial(text, s, body_from)
            run = [i]
            j = i + 1
            while j < n:
                t2, s2, _ = toks[j]
                gap = text[toks[j - 1][2] : s2]
                if not _NAME_GAP.fullmatch(gap):
                    break
                if text[s2].isupper():
                    run.append(j)
                    j += 1
                    continue
                if t2 in _CONNECTORS:
                    k = j + 1
                    while k < n and toks[k][0] in _CONNECTORS and _gap_ok(text, toks, k):
                        k += 1
                    if k < n and text[toks[k][1]].isupper() and _gap_ok(text, toks, k):
                        run.extend(range(j, k + 1))
                        j = k + 1
                        continue
                break
            i = j
            words = [toks[r][0] for r in run]
            if initial:
                # drop a capitalised function word that merely opens the sentence
                while run and (words[0] in STOPWORDS or words[0] in _CONNECTORS):
                    run, words = run[1:], words[1:]
                    initial = False
                if initial and len(run) == 1 and not fragment:
                    continue
            key = [(w, text[toks[r][1] : toks[r][2]].isupper()) for r, w in zip(run, words, strict=True)
                   if w not in _CONNECTORS and w not in _TITLES and len(w) > 1 and w not in _MONTHS
                   and w not in _DAYS and w not in STOPWORDS and not w.isdigit()]
            if not key:
                continue
            missing = [w for w, caps in key
                       if not (ev.has_word(w) or echo.has_word(w) or (caps and w in ev.acronyms))]
            if missing:
                out.append(_Claim("entity", toks[run[0]][1], toks[run[-1]][2], "name"))
        return out


_NAME_GAP = re.compile(r"[ \t]{1,3}|[ \t]?[-&][ \t]?|\.[ \t]{1,2}|'s[ \t]|\u2019s[ \t]")


def _gap_ok(text: str, toks: list[tuple[str, int, int]], k: int) -> bool:
    return _NAME_GAP.fullmatch(text[toks[k - 1][2] : toks[k][1]]) is not None


def _is_initial(text: str, pos: int, body_from: int) -> bool:
    """Whether the word at ``pos`` opens the sentence or a clause where capitals are usual."""
    j = pos - 1
    while j >= body_from and text[j] in " \t*_#>[(":
        j -= 1
    return j < body_from or text[j] in ":;\"“\u2018'(—\u2013-"


def _norm_url(url: str) -> str:
    u = normalise(url)
    for p in ("https://", "http://"):
        if u.startswith(p):
            u = u[len(p) :]
    if u.startswith("www."):
        u = u[4:]
    return u.split("#", 1)[0].rstrip("/")


# ---------------------------------------------------------------------------------------------
# Incremental sentence splitting
# ---------------------------------------------------------------------------------------------

_TERMINALS = frozenset(".!?…。\uff01\uff1f")
_CLOSERS = frozenset("\"')]}»”\u2019*_")
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "e.g", "i.e", "eg", "ie", "no", "vol",
    "fig", "al", "approx", "dept", "est", "gen", "gov", "sen", "rep", "mt", "ft", "cf", "ca", "op",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "u.s",
    "u.k", "a.m", "p.m", "ph.d", "inc", "ltd", "co", "corp", "etc", "pp", "p", "ch", "sec",
})
_MAX_SPACE_RUN = 64


class _GroundingChannel(ChannelState):
    """Splits one text channel into sentences as they complete and scores each."""

    __slots__ = ("_base", "_buf", "_channel", "_det", "_done", "_fence", "_prepared", "_scan")

    def __init__(self, det: GroundingDetector, prepared: GroundingResponse, channel: Channel) -> None:
        self._det = det
        self._prepared = prepared
        self._channel = channel
        self._buf = ""  # the current, unfinished sentence
        self._base = 0  # absolute offset of _buf[0]
        self._scan = 0  # index in _buf where the boundary search resumes
        self._fence = False  # inside a ``` code block
        self._done = False

    def feed(self, text: str) -> list[Finding]:
        if self._done:
            return []
        self._buf += text
        return self._drain(final=False)

    def finish(self, end: StreamEnd) -> list[Finding]:
        if self._done:
            return []
        out = self._drain(final=True)
        self._done = True
        return out

    def _drain(self, final: bool) -> list[Finding]:
        out: list[Finding] = []
        while True:
            cut = self._boundary(final)
            if cut is None:
                break
            end, nxt = cut
            out += self._sentence(self._buf[:end], self._base)
            self._buf = self._buf[nxt:]
            self._base += nxt
            self._scan = 0
        if final and self._buf.strip():
            out += self._sentence(self._buf, self._base)
            self._base += len(self._buf)
            self._buf = ""
        return out

    def _sentence(self, text: str, offset: int) -> list[Finding]:
        stripped = text.strip()
        if not stripped:
            return []
        if stripped.startswith(("```", "~~~")):
            self._fence = not self._fence
            return []
        if self._fence:
            return []
        return self._det.score_sentence(self._prepared, text, offset, self._channel)

    def _boundary(self, final: bool) -> tuple[int, int] | None:
        """(end of sentence, start of the next) or None when more text is needed."""
        buf = self._buf
        n = len(buf)
        limit = self._det.cfg.max_sentence_chars
        i = self._scan
        while i < n:
            if i >= limit:
                cut = buf.rfind(" ", limit // 2, limit)
                cut = cut if cut > 0 else limit
                return cut, cut
            ch = buf[i]
            if ch == "\n":
                return i, i + 1
            if ch in _TERMINALS:
                k = i + 1
                while k < n and buf[k] in _CLOSERS:
                    k += 1
                if k >= n:
                    if final:
                        return n, n
                    self._scan = i
                    return None
                if not buf[k].isspace():
                    i = k
                    continue
                if ch != ".":
                    return k, k
                m = k
                while m < n and buf[m] in " \t\r" and m - k < _MAX_SPACE_RUN:
                    m += 1
                if m >= n:
                    if final:
                        return k, k
                    self._scan = i
                    return None
                if buf[m] == "\n" or m - k >= _MAX_SPACE_RUN:
                    return k, k
                if self._continues_after_period(buf, i, buf[m]):
                    i = m
                    continue
                return k, k
            i += 1
        self._scan = n
        return None

    @staticmethod
    def _continues_after_period(buf: str, i: int, nxt: str) -> bool:
        """Whether the '.' at ``i`` is not a sentence end: an abbreviation, an initial, a list
        number at the start of a line, or a lower-case continuation."""
        if nxt.islower() or nxt in ",;:)":
            return True
        j = i
        while j > 0 and (buf[j - 1].isalnum() or buf[j - 1] == "."):
            j -= 1
        word = buf[j:i].lower()
        if not word:
            return False
        if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            return True
        if "." in word and all(len(p) <= 2 for p in word.split(".")):  # U.S., e.g., Ph.D.
            return True
        return word.isdigit() and len(word) <= 3 and not buf[:j].strip()


GroundingConfig.detector_class = GroundingDetector

CONFIGS: dict[str, type[DetectorConfig]] = {NAME: GroundingConfig}
