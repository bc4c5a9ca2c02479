"""Deterministic paraphrases of a question, for paraphrase consistency in ``gapwatch eval``.

A model that gives another answer when the same question is asked in other words is not
reliable, whatever its accuracy on the one phrasing a benchmark uses. ``variants(text, n,
seed)`` makes up to ``n`` rewordings of a case's question with small, meaning-preserving
rules; ``--paraphrases N`` sends each of them next to the original and the report compares the
answers.

Why rules and a shipped lexicon rather than a paraphrasing model: nothing is downloaded, the
same suite gives the same variants on every machine and every run (so results stay
comparable over time and interrupted runs resume), and each variant says which kind of change
it is, so a broken case points at the phrasing that broke it.

Kinds, in the order they are tried (then pairs of them):

    synonyms    words and phrases swapped for synonyms from ``LEXICON``
    reorder     the question moved in front of the sentences before it, two clauses joined
                by ", and" swapped, or a trailing phrase ("on a 40 euro order") fronted
    formal      contractions spelled out and a polite frame around the question
    typo        two adjacent letters of one longer word swapped
    distractor  an irrelevant sentence in front of the question
    informal    contractions, a lower-case start and a casual frame

A rule that does not apply to a text (no synonym in the lexicon, nothing to reorder) yields no
variant; the next kind is tried instead.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

# phrase -> replacements; keys are lower case and matched as whole words, longest first.
# Only swaps that keep the grammar of any sentence they can occur in.
LEXICON: dict[str, tuple[str, ...]] = {
    "how long do i have": ("how much time do I have",),
    "how long is": ("what is the length of",),
    "how tall is": ("how high is",),
    "can i": ("am I able to", "is it possible for me to"),
    "do i pay": ("will I be charged",),
    "send back": ("return",),
    "i returned": ("I sent back",),
    "jacket": ("coat",),
    "too small": ("not big enough",),
    "bigger": ("larger",),
    "swap": ("exchange",),
    "exchange": ("swap",),
    "cost anything": ("cost extra",),
    "free of charge": ("at no cost",),
    "came loose": ("came off",),
    "after a year": ("after twelve months",),
    "order": ("purchase",),
    "shipping": ("delivery",),
    "pay with": ("use",),
    "a gift card": ("a voucher",),
    "another shop": ("a different store",),
    "discovered": ("found",),
    "in which years": ("in what years",),
    "win": ("receive",),
    "total": ("overall",),
    "tell me": ("let me know",),
    "explain": ("describe",),
    "help me": ("assist me",),
    "right now": ("at the moment", "currently"),
    "about": ("regarding",),
    "begin": ("start",),
    "start": ("begin",),
    "big": ("large",),
    "quick": ("fast",),
    "answer": ("reply",),
    "question": ("query",),
    "customer": ("client",),
    "problem": ("issue",),
    "issue": ("problem",),
    "arrive": ("get here",),
    "receive": ("get",),
    "need": ("require",),
    "buy": ("purchase",),
    "purchase": ("buy",),
    "famous for": ("known for",),
    "known for": ("famous for",),
    "notes": ("remarks",),
    "verified": ("confirmed",),
    "unverified": ("not confirmed",),
    "source checked": ("source confirmed",),
    "do not copy": ("never copy",),
    "passages": ("excerpts",),
}

CONTRACTIONS: tuple[tuple[str, str], ...] = (
    ("do not", "don't"), ("does not", "doesn't"), ("did not", "didn't"), ("is not", "isn't"),
    ("are not", "aren't"), ("have not", "haven't"), ("has not", "hasn't"), ("cannot", "can't"),
    ("will not", "won't"), ("i am", "i'm"), ("it is", "it's"), ("what is", "what's"),
    ("that is", "that's"),
)
FORMAL_FRAMES = ("Good afternoon. {q} Thank you in advance.", "I would appreciate your help with the following. {q}",
                 "Dear support team, I have a question. {q}")
INFORMAL_FRAMES = ("hey, quick one: {q}", "{q} thx!", "so um, {q}")
DISTRACTORS = (
    "I'm writing this from the train, so sorry for any typos.",
    "My colleague asked me the same thing yesterday.",
    "It has been a long week here.",
    "By the way, the weather is lovely today.",
    "I already looked through the FAQ page.",
)
# a fronted word keeps its capital unless it is one of these (names and "I" keep theirs)
_FUNCTION_WORDS = frozenset((
    "how", "what", "when", "who", "where", "which", "why", "can", "could", "do", "does", "did", "is", "are", "was",
    "were", "will", "would", "should", "may", "my", "the", "a", "an", "it", "this", "that", "there", "in", "on",
    "at", "for", "to", "after", "before", "with", "from", "during", "if", "and", "but", "or"))
_PREPOSITIONS = "on|for|in|at|after|before|with|from|during|to"
_TRAILING = re.compile(rf"^(?P<head>.+?)\s(?P<pp>(?:{_PREPOSITIONS})\s[^,?.!;:]+)(?P<end>[?.!]?)\s*$",
                       re.IGNORECASE | re.DOTALL)
_SENTENCES = re.compile(r"(?<=[.!?])\s+(?=\S)")
_WORD = re.compile(r"[A-Za-z]{5,}")
_LEXICON_RE = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(LEXICON, key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Variant:
    kind: str
    text: str


def _match_case(template: str, replacement: str) -> str:
    if template[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def _lower_first(text: str) -> str:
    word = text.split(maxsplit=1)[0] if text.split() else ""
    if word.strip(",.?!").casefold() in _FUNCTION_WORDS:
        return text[:1].lower() + text[1:]
    return text


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def synonyms(text: str, rng: random.Random) -> str | None:
    """Up to three lexicon phrases replaced (the rest of the text as it was)."""
    hits = list(_LEXICON_RE.finditer(text))
    if not hits:
        return None
    chosen = {m.start() for m in rng.sample(hits, min(3, len(hits)))}

    def sub(m: re.Match[str]) -> str:
        if m.start() not in chosen:
            return m.group(0)
        return _match_case(m.group(0), rng.choice(LEXICON[m.group(0).casefold()]))

    return _LEXICON_RE.sub(sub, text)


def reorder(text: str, rng: random.Random) -> str | None:
    """The last sentence first; else two ", and" clauses swapped; else a trailing phrase fronted."""
    stripped = text.strip()
    sentences = _SENTENCES.split(stripped)
    if len(sentences) >= 2:
        return " ".join([sentences[-1], *sentences[:-1]])
    if ", and " in stripped:
        first, _, second = stripped.partition(", and ")
        end = second[-1] if second[-1:] in "?.!" else ""
        second = second[:-1] if end else second
        return f"{_upper_first(second)}, and {_lower_first(first)}{end}"
    m = _TRAILING.match(stripped)
    if m is None or len(m.group("head").split()) < 2:
        return None
    return f"{_upper_first(m.group('pp'))}, {_lower_first(m.group('head'))}{m.group('end')}"


def _swap_phrases(text: str, pairs: tuple[tuple[str, str], ...], forward: bool) -> str:
    for long, short in pairs:
        a, b = (long, short) if forward else (short, long)
        text = re.sub(rf"\b{re.escape(a)}\b", lambda m, b=b: _match_case(m.group(0), b), text, flags=re.IGNORECASE)
    return text


def formal(text: str, rng: random.Random) -> str | None:
    expanded = _swap_phrases(text.strip(), CONTRACTIONS, forward=False)
    expanded = re.sub(r"\bi\b", "I", expanded)
    return rng.choice(FORMAL_FRAMES).format(q=_upper_first(expanded))


def informal(text: str, rng: random.Random) -> str | None:
    contracted = _swap_phrases(text.strip(), CONTRACTIONS, forward=True)
    return rng.choice(INFORMAL_FRAMES).format(q=contracted[:1].lower() + contracted[1:])


def typo(text: str, rng: random.Random) -> str | None:
    """Two adjacent inner letters of one word of five letters or more swapped."""
    words = [m for m in _WORD.finditer(text) if len(set(m.group(0)[1:-1])) > 1]
    if not words:
        return None
    m = rng.choice(words)
    w = m.group(0)
    spots = [i for i in range(1, len(w) - 2) if w[i] != w[i + 1]]
    if not spots:
        return None
    i = rng.choice(spots)
    return text[:m.start()] + w[:i] + w[i + 1] + w[i] + w[i + 2:] + text[m.end():]


def distractor(text: str, rng: random.Random) -> str | None:
    return f"{rng.choice(DISTRACTORS)} {text.strip()}"


RULES: dict[str, Callable[[str, random.Random], str | None]] = {
    "synonyms": synonyms, "reorder": reorder, "formal": formal, "typo": typo, "distractor": distractor,
    "informal": informal,
}
KINDS: tuple[str, ...] = tuple(RULES)
PAIRS: tuple[tuple[str, str], ...] = (
    ("synonyms", "typo"), ("reorder", "formal"), ("distractor", "synonyms"), ("informal", "typo"),
    ("reorder", "distractor"), ("synonyms", "informal"), ("formal", "typo"), ("reorder", "synonyms"),
)


def _rng(seed: str, kind: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}\x00{kind}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def apply(kind: str, text: str, seed: str) -> str | None:
    """One variant of ``text``: ``kind`` is a rule name or two joined by ``+``."""
    out: str | None = text
    for step in kind.split("+"):
        if out is None:
            return None
        out = RULES[step](out, _rng(seed, kind + ":" + step))
    return out


def variants(text: str, n: int, seed: str, exclude: tuple[str, ...] = ()) -> list[Variant]:
    """Up to ``n`` distinct rewordings of ``text`` (none equal to it or to ``exclude``), the
    same for the same ``text`` and ``seed`` whatever ``n`` is (a larger ``n`` only adds)."""
    seen = {" ".join(t.split()).casefold() for t in (text, *exclude)}
    out: list[Variant] = []
    for kind in (*KINDS, *("+".join(p) for p in PAIRS)):
        if len(out) >= n:
            break
        got = apply(kind, text, seed)
        if got is None:
            continue
        key = " ".join(got.split()).casefold()
        if key in seen:
            continue
        seen.add(key)
        out.append(Variant(kind, got))
    return out
