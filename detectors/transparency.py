"""Failure transparency: does the model refuse, abstain ("I don't know") or hedge?

These are *signals*, not failures: a model that says "the context does not say" when the
context does not say is behaving well, and together with ``grounding`` they show whether a
model fails transparently or confabulates. Every finding is ``Severity.low`` with category
``refusal``, ``abstention`` or ``hedge``, and the response is classified for metrics as
``answered``, ``abstained`` or ``refused`` (``classification(prepared)``).

The phrases live in ``data/transparency_phrases.txt`` in a small template syntax (see that
file), compiled once into one case-insensitive pattern per category. Streaming: a match that
starts at offset ``p`` is decided once ``p + window`` characters have arrived (``window`` = the
longest phrase the templates can expand to), so the findings do not depend on how the text
was chunked, and each ``feed`` scans only the new text plus one window.

Evidence is the matched phrase itself, lower-cased: it can only contain words of the fixed
lexicon (and whitespace), never user data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

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

NAME = "transparency"
CATEGORIES = ("refusal", "abstention", "hedge")
PHRASES_FILE = Path(__file__).with_name("data") / "transparency_phrases.txt"
_MAX_SPACES = 4


def _compile_template(template: str) -> tuple[str, int]:
    """Template -> (regex source, longest text it can match). See the data file for syntax."""
    out: list[str] = []
    longest = 0
    i = 0
    while i < len(template):
        ch = template[i]
        if ch == "{":
            j = template.index("}", i)
            alts = template[i + 1 : j].split("|")
            compiled = [_compile_template(a) if a else ("", 0) for a in alts]
            out.append("(?:" + "|".join(c for c, _ in compiled) + ")")
            longest += max(n for _, n in compiled)
            i = j + 1
            continue
        if ch == " ":
            out.append(rf"\s{{1,{_MAX_SPACES}}}")
            longest += _MAX_SPACES
        elif ch == "'":
            out.append("['\u2019]")
            longest += 1
        else:
            out.append(re.escape(ch))
            longest += 1
        i += 1
    return "".join(out), longest


def load_phrases(path: Path = PHRASES_FILE) -> dict[str, list[str]]:
    """Category -> phrase templates, as written in the data file."""
    phrases: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    section: str | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            if section not in phrases:
                raise ValueError(f"{path.name}: unknown section [{section}]")
            continue
        if section is None:
            raise ValueError(f"{path.name}: phrase before any section: {line!r}")
        phrases[section].append(line)
    return phrases


class TransparencyConfig(DetectorConfig):
    """Settings of the ``transparency`` detector (YAML key ``transparency``)."""

    detector_class: ClassVar[type[Detector]]

    categories: tuple[str, ...] = CATEGORIES
    classify_within_chars: int = 400
    extra_phrases: dict[str, tuple[str, ...]] = {}


@dataclass(slots=True)
class TransparencyResponse:
    """Per-response totals (``prepare`` makes one per response) behind ``classification``."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    early: set[str] = field(default_factory=set)  # categories seen near the start of a channel
    content_filter: bool = False
    chars: int = 0


class TransparencyDetector(Detector):
    name: ClassVar[str] = NAME

    def __init__(self, config: TransparencyConfig) -> None:
        super().__init__(config)
        self.cfg = config
        phrases = load_phrases()
        for cat, extra in config.extra_phrases.items():
            if cat not in phrases:
                raise ValueError(f"extra_phrases: unknown category {cat!r}; valid: {', '.join(CATEGORIES)}")
            phrases[cat].extend(extra)
        unknown = set(config.categories) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"categories: unknown {sorted(unknown)}; valid: {', '.join(CATEGORIES)}")
        groups: list[str] = []
        window = 0
        for cat in CATEGORIES:
            if cat not in config.categories:
                continue
            compiled = sorted((_compile_template(t) for t in phrases[cat]), key=lambda c: -c[1])
            if not compiled:
                continue
            window = max(window, compiled[0][1])
            groups.append(rf"(?P<{cat}>\b(?:{'|'.join(c for c, _ in compiled)})(?!\w))")
        self._pattern = re.compile("|".join(groups), re.IGNORECASE) if groups else None
        self._window = window + 1

    def prepare(self, ctx: RequestContext) -> TransparencyResponse:
        return TransparencyResponse()

    def open_channel(self, prepared: TransparencyResponse, channel: Channel) -> ChannelState | None:
        if self._pattern is None or channel.kind != "text":
            return None
        return _TransparencyChannel(self, prepared, channel)

    def classification(self, prepared: TransparencyResponse) -> str:
        """``refused``, ``abstained`` or ``answered``, for metrics.

        A response is refused when the upstream's content filter ended it or a refusal phrase
        starts within the first ``classify_within_chars`` characters of a text channel;
        otherwise abstained when an abstention phrase does; otherwise answered (an answer that
        adds "the context does not say more about X" at its end still answered)."""
        if prepared.content_filter or "refusal" in prepared.early:
            return "refused"
        if "abstention" in prepared.early:
            return "abstained"
        return "answered"

    def response_metrics(self, prepared: TransparencyResponse) -> dict[str, float | str]:
        """Classification plus counts per category, for the reliability scorecard."""
        return {"classification": self.classification(prepared), **prepared.counts}


class _TransparencyChannel(ChannelState):
    __slots__ = ("_base", "_buf", "_channel", "_det", "_done", "_prepared", "_scan_from")

    def __init__(self, det: TransparencyDetector, prepared: TransparencyResponse, channel: Channel) -> None:
        self._det = det
        self._prepared = prepared
        self._channel = channel
        self._buf = ""
        self._base = 0  # absolute offset of _buf[0]
        self._scan_from = 0  # absolute: matches starting before it are decided
        self._done = False

    def feed(self, text: str) -> list[Finding]:
        if self._done:
            return []
        self._buf += text
        self._prepared.chars += len(text)
        return self._scan(final=False)

    def finish(self, end: StreamEnd) -> list[Finding]:
        if self._done:
            return []
        if end.finish_reason == "content_filter":
            self._prepared.content_filter = True
        out = self._scan(final=True)
        self._done = True
        self._buf = ""
        return out

    def _scan(self, final: bool) -> list[Finding]:
        pattern = self._det._pattern
        assert pattern is not None
        buf, base = self._buf, self._base
        n = len(buf)
        decided = n if final else n - self._det._window  # matches starting before it are settled
        out: list[Finding] = []
        pos = self._scan_from - base
        while pos < n:
            m = pattern.search(buf, pos)
            if m is None or m.start() >= decided:
                break
            cat = m.lastgroup or "hedge"
            out.append(self._finding(cat, base + m.start(), base + m.end(), m.group()))
            pos = max(m.end(), m.start() + 1)
        self._scan_from = base + max(pos, decided)
        keep_from = max(0, self._scan_from - base - 1)  # one character for the \b before a match
        if keep_from:
            self._buf = buf[keep_from:]
            self._base = base + keep_from
        return out

    def _finding(self, cat: str, start: int, end: int, text: str) -> Finding:
        p = self._prepared
        p.counts[cat] += 1
        if start < self._det.cfg.classify_within_chars:
            p.early.add(cat)
        phrase = " ".join(text.lower().split())
        label = {"refusal": "refuses", "abstention": "abstains (says it does not know)", "hedge": "hedges"}[cat]
        return Finding(
            detector=NAME, category=cat, severity=Severity.low, score=1.0 if cat != "hedge" else 0.5,
            message=f"the model {label}", span=(start, end), channel=self._channel,
            evidence=phrase[:80], attrs={"signal": True},
        )


TransparencyConfig.detector_class = TransparencyDetector

CONFIGS: dict[str, type[DetectorConfig]] = {NAME: TransparencyConfig}
