"""URLs for the injection detector: hosts named in a request, links and images in output,
and whether a URL carries conversation data.

Why a hand-written scanner instead of ``StreamScanner``: a Markdown image is only known to be
one when its closing parenthesis arrives, and a bare-URL pattern would otherwise report the
inner URL early with a different span. ``LinkScanner`` finds a URL, waits for the few
characters that settle its construct (``![alt](url "title")``, ``<img src=...>``), and
reports the whole construct as one span, so a redaction removes all of it. Decisions depend
only on the text, never on how it was chunked. URLs longer than ``max_url_chars`` are
reported in consecutive pieces so that each piece fits in the hold-back window.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

from detectors.injection_phrases import token_words
from detectors.pattern_prefix import prefix_regex
from detectors.stream_scan import BufferedScan
from detectors.text import normalise

# The most a construct may extend before its URL ("![alt up to 80 chars](") and after it
# (' "title")' or '" width=10>'); with max_url_chars this bounds the hold-back window.
BEFORE_CHARS = 90
AFTER_CHARS = 42
_KEEP_START = 12  # a scheme split across chunks ("htt" + "ps:\/\/") is rescanned

_START = re.compile(r"(?i)\b(?:https?|ftp):(?:\\?/){2}|(?<![\w./@-])www\.(?=[a-z0-9-])")
_BODY_TEXT = re.compile(r"[^\s<>\"'`\\(){}\[\]|^]*")
_BODY_JSON = re.compile(r"(?:[^\s<>\"'`\\(){}\[\]|^]|\\/)*")
_TRAIL = ".,;:!?*_~"
_MD_BEFORE = re.compile(r"(!?)\[[^\[\]\n]{0,80}\]\([ \t]*<?$")
_IMAGE_TAGS = "img|image|iframe|frame|script|video|audio|source|embed|object|input|link|body|table|td|div"
_TAG_ATTRS = "src|href|data|poster|background|srcset|action|content"
_TAG_BEFORE = re.compile(
    rf"(?i)<({_IMAGE_TAGS}|a|area|form|meta)\b[^<>]{{0,70}}?\b({_TAG_ATTRS})\s*=\s*[\"']?$"
)
_CSS_BEFORE = re.compile(r"(?i)(?<![\w-])url\(\s*[\"']?$")
_MD_AFTER = re.compile(r">?(?:[ \t]+(?:\"[^\"\n]{0,30}\"|'[^'\n]{0,30}'))?[ \t]*\)")
_TAG_AFTER = re.compile(r"[\"']?[^<>\n]{0,40}?>")
_CSS_AFTER = re.compile(r"[\"']?\s*\)")
_LINK_TAGS = frozenset({"a", "area", "form", "meta"})

# Hosts are found from their dots (str.find runs in C): a regex scan over every position of
# a 20 KB context costs ~1.5 ms in `re`, and RE2's per-match overhead is as high.
_HOST_AT = re.compile(
    r"(?i)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?:[a-z]{2,24}|xn--[a-z0-9-]{1,59})(?![\w-])"
    r"|\d{1,3}(?:\.\d{1,3}){3}(?!\w|\.\d)"
)
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")
EMAIL = re.compile(r"(?i)[a-z0-9._%+-]{1,64}@(?:[a-z0-9-]{1,63}\.)+[a-z]{2,24}\b")
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_DOMAIN = re.compile(r"[A-Za-z0-9.-]{1,253}")
_EMAIL_OK = re.compile(r"(?i)[a-z0-9._%+-]{1,64}@(?:[a-z0-9-]{1,63}\.)+[a-z]{2,24}")


def valid_email(s: str) -> str | None:
    """The e-mail address in a greedy local@domain run, or None."""
    s = s.rstrip(".-")
    return s if _EMAIL_OK.fullmatch(s) else None


class EmailScanner(BufferedScan[tuple[int, int, str]]):
    """Incremental e-mail finder driven by ``str.find("@")``: the local part is read
    backwards (at most 64 characters) and the domain forwards, greedily, and a candidate is
    decided once a character that cannot extend the domain has arrived, so the result does
    not depend on chunking (a backtracking regex could settle on "a@b.evil" of
    "a@b.evil-host.net"). Yields (start, end, address)."""

    __slots__ = ("_base", "_pos")

    def __init__(self) -> None:
        self._buf = ""
        self._base = 0
        self._pos = 0  # absolute: "@" before it are decided
        self._done = False

    def _scan(self, final: bool) -> list[tuple[int, int, str]]:
        buf, base = self._buf, self._base
        n = len(buf)
        out: list[tuple[int, int, str]] = []
        while True:
            at = buf.find("@", self._pos - base)
            if at < 0:
                self._pos = base + n
                break
            m = _DOMAIN.match(buf, at + 1)
            end = m.end() if m else at + 1
            if end == n and not final:
                self._pos = base + at
                break
            s = at
            while s > 0 and at - s < 64 and buf[s - 1] in _LOCAL_CHARS:
                s -= 1
            found = valid_email(buf[s:end]) if s < at else None
            if found is not None:
                out.append((base + s, base + s + len(found), found))
            self._pos = base + max(at + 1, end if found else at + 1)
        keep_from = max(0, self._pos - base - 64)
        if keep_from:
            self._buf = buf[keep_from:]
            self._base = base + keep_from
        return out
URL = re.compile(r"(?i)\b(?:https?|ftp)://[^\s<>\"'`\\(){}\[\]|^]+|(?<![\w./@-])www\.[a-z0-9-]+\.[^\s<>\"'`(){}\[\]|^]+")
_BLOB = re.compile(r"[A-Za-z0-9+/_-]{20,}={0,2}|(?:%[0-9A-Fa-f]{2}){12,}")
_STOP = frozenset((
    "http", "https", "www", "com", "org", "net", "io", "co", "uk", "de", "html", "htm", "php",
    "asp", "aspx", "jsp", "index", "search", "query", "q", "id", "page", "utm", "source", "medium",
    "campaign", "content", "term", "ref", "lang", "en", "us", "api", "v1", "v2", "v3", "img",
    "image", "png", "jpg", "jpeg", "gif", "svg", "webp", "static", "assets", "cdn", "the", "and",
    "for", "with", "from", "this", "that", "you", "your", "are", "was", "were", "have", "has",
    "not", "but", "all", "any", "can", "will", "about", "into", "more", "other", "some", "such",
    "than", "then", "them", "they", "what", "when", "where", "which", "who", "how", "why", "also",
    "just", "like", "only", "over", "very", "our", "out", "get", "set", "new",
))


@dataclass(frozen=True, slots=True)
class Link:
    """One URL seen in output. ``start``/``end`` cover the whole construct (``![..](..)``);
    ``kind`` is ``image`` (fetched automatically when rendered), ``link`` or ``bare``.
    ``part`` > 0 marks the pieces of a URL longer than the scanner's window."""

    start: int
    end: int
    url: str
    kind: str
    part: int = 0


def clean_host(host: str) -> str:
    host = host.strip().strip(".").lower()
    if host.startswith("www."):
        host = host[4:]
    return host


def host_of(url: str) -> str | None:
    """The lower-cased host of ``url`` (``www.`` dropped), or None when it has none."""
    url = url.replace("\\/", "/")
    if url[:4].lower() == "www.":
        url = "http://" + url
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return clean_host(host) if host else None


def hosts_in(text: str, start: int = 0, end: int | None = None) -> Iterator[tuple[str, int, int]]:
    """Host names and IPv4 addresses mentioned in ``text[start:end]`` (URLs, e-mail
    addresses, prose), with their offsets."""
    end = len(text) if end is None else end
    i = text.find(".", start, end)
    while i != -1:
        if start < i < end - 1 and text[i - 1].isalnum() and (text[i + 1].isalnum()):
            j = i - 1
            while j > start and text[j - 1] in _HOST_CHARS:
                j -= 1
            while j < i and text[j] in ".-":
                j += 1
            m = _HOST_AT.match(text, j, end)
            if m:
                yield clean_host(m.group()), m.start(), m.end()
                i = text.find(".", m.end(), end)
                continue
        i = text.find(".", i + 1, end)


def host_set(text: str, start: int = 0, end: int | None = None) -> set[str]:
    """The hosts of ``hosts_in`` without positions."""
    return {h for h, _, _ in hosts_in(text, start, end)}


def planted_parent(host: str, planted: dict[str, int]) -> int | None:
    """The planted span of ``host`` or of a parent domain (``<data>.evil.example``)."""
    parts = host.split(".")
    for i in range(len(parts) - 1):
        sid = planted.get(".".join(parts[i:]))
        if sid is not None:
            return sid
    return None


def host_allowed(host: str, known: Iterable[str] | frozenset[str], globs: tuple[str, ...]) -> bool:
    if host in known:
        return True
    return any(fnmatch.fnmatchcase(host, g) for g in globs)


def homograph_of(host: str, known: frozenset[str]) -> bool:
    """True when ``host`` only looks like a known host (Cyrillic letters, punycode)."""
    if host.isascii() and "xn--" not in host:
        return False
    try:
        shown = host.encode("ascii").decode("idna") if host.isascii() else host
    except UnicodeError:
        shown = host
    folded = normalise(shown)
    return folded != host and folded in known


@dataclass(frozen=True, slots=True)
class DataEvidence:
    score: float
    conversation_words: int
    values: int
    blob: bool


def data_evidence(url: str, host: str, vocab: frozenset[str], values: frozenset[str],
                  emails: frozenset[str]) -> DataEvidence:
    """How much of ``url`` looks like data taken from the conversation.

    Values (tokens with digits, long identifiers, e-mail addresses) weigh most; ordinary
    conversation words in the query weigh a little (a search link for "python tutorial"
    is not exfiltration), path words less; a decodable encoded blob weighs a lot.
    """
    url = url.replace("\\/", "/")
    try:
        parts = urlsplit(url if "://" in url else "http://" + url)
    except ValueError:
        return DataEvidence(0.0, 0, 0, False)
    query = parts.query + "&" + parts.fragment
    path = parts.path
    labels = host.split(".")[:-2]
    host_words = set(token_words(".".join(host.split(".")[-2:])))
    stop = _STOP | host_words
    q_words = set(token_words(unquote_plus(query))) - stop
    q_words |= set(token_words(" ".join(labels))) - stop  # DNS exfiltration: data in subdomains
    p_words = set(token_words(unquote(path))) - stop
    q_conv = q_words & vocab
    p_conv = p_words & vocab
    q_val = q_words & values
    p_val = p_words & values
    score = 2.0 * len(q_val) + 0.5 * len(q_conv - q_val) + 1.5 * len(p_val) + 0.25 * len(p_conv - p_val)
    blob = False
    decoded_any = False
    blob_text = " ".join((unquote_plus(parts.query), parts.path, unquote_plus(parts.fragment), *labels))
    for m in _BLOB.finditer(blob_text):
        text = _decode_blob(m.group())
        if text is not None:
            decoded_any = True
            score += 3.0 + 1.0 * len(set(token_words(text)) & vocab)
            break
        blob = blob or _looks_encoded(m.group())
    if blob and not decoded_any:
        score += 1.0
    blob = blob or decoded_any
    for _, v in parse_qsl(query, keep_blank_values=False):
        if len(token_words(v)) >= 5:
            score += 1.0
            break
    low = unquote_plus(url).lower()
    if any(e in low for e in emails):
        score += 2.0
    return DataEvidence(score, len(q_conv | p_conv), len(q_val | p_val), blob)


def _looks_encoded(s: str) -> bool:
    """Mixed case and digits in a 20+ character run: an encoded value, not a slug."""
    return (any(c.isdigit() for c in s) and any(c.isupper() for c in s)
            and any(c.islower() for c in s))


def _decode_blob(s: str) -> str | None:
    """Printable text hidden in a base64, base64url, hex or percent-encoded run, if any."""
    candidates: list[bytes] = []
    if s.startswith("%"):
        candidates.append(unquote(s).encode("utf-8", "surrogatepass"))
    else:
        if len(s) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in s):
            try:
                candidates.append(binascii.unhexlify(s))
            except (binascii.Error, ValueError):
                pass
        t = s.rstrip("=")
        pad = "=" * (-len(t) % 4)
        for alt in (t.replace("-", "+").replace("_", "/"),):
            try:
                candidates.append(base64.b64decode(alt + pad, validate=True))
            except (binascii.Error, ValueError):
                pass
    for raw in candidates:
        text = printable_text(raw)
        if text is not None:
            return text
    return None


def printable_text(raw: bytes, min_chars: int = 8) -> str | None:
    """``raw`` as text when it is UTF-8 and almost all printable with some letters."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(text) < min_chars:
        return None
    printable = sum(1 for c in text if c.isprintable() or c in "\n\r\t")
    letters = sum(1 for c in text if c.isalpha())
    if printable < 0.95 * len(text) or letters < 0.4 * len(text):
        return None
    return text


def _live_prefixes(images_only: bool) -> re.Pattern[str]:
    """Text at the end of the buffer that could still grow into a reported construct: the
    prefix language (``detectors.pattern_prefix``) of each opening followed by a URL start,
    with the look-behinds the scanner applies."""
    scheme = r"(?:(?:https?|ftp):(?:\\?/){2}|www\.)"
    tags = _IMAGE_TAGS if images_only else _IMAGE_TAGS + "|" + "|".join(sorted(_LINK_TAGS))
    parts = [
        ("", rf"!{'' if images_only else '?'}\[[^\[\]\n]{{0,80}}\]\([ \t]*<?{scheme}"),
        ("", rf"<(?:{tags})[^<>]{{0,70}}?\b(?:{_TAG_ATTRS})\s*=\s*[\"']?{scheme}"),
        (r"(?<![\w-])", rf"url\(\s*[\"']?{scheme}"),
    ]
    alts = []
    for behind, pattern in parts:
        body = prefix_regex(pattern, re2_syntax=False, flags=re.IGNORECASE)
        assert body is not None, pattern
        alts.append(behind + body)
    return re.compile("(?i)(?:" + "|".join(alts) + r")\Z")


class LinkScanner(BufferedScan[Link]):
    """Incremental finder of URLs and their enclosing constructs (see module docstring)."""

    __slots__ = ("_base", "_body", "_cont", "_json", "_max", "_pos")

    def __init__(self, max_url_chars: int, json_mode: bool = False) -> None:
        self._max = max(16, max_url_chars)
        self._body = _BODY_JSON if json_mode else _BODY_TEXT
        self._json = json_mode
        self._buf = ""
        self._base = 0
        self._pos = 0  # absolute: URLs starting before it are decided
        self._cont: tuple[str, int] | None = None  # (kind, part) of a URL being cut in pieces
        self._done = False

    def _scan(self, final: bool) -> list[Link]:
        out: list[Link] = []
        buf, base = self._buf, self._base
        n = len(buf)
        while True:
            rel = self._pos - base
            if self._cont is not None:
                kind, part = self._cont
                m = self._body.match(buf, rel)
                end = m.end() if m else rel
                if end - rel >= self._max:
                    out.append(Link(base + rel, base + rel + self._max, buf[rel : rel + self._max], kind, part))
                    self._cont = (kind, part + 1)
                    self._pos = base + rel + self._max
                    continue
                if not final and self._open_end(buf, end):
                    break
                piece_end = _trim_end(buf, rel, end)
                if piece_end > rel:
                    out.append(Link(base + rel, base + piece_end, buf[rel:piece_end], kind, part))
                self._cont = None
                self._pos = base + end
                continue
            m = _START.search(buf, rel) if _may_start(buf, rel) else None
            if m is None:
                self._pos = max(self._pos, base + n - _KEEP_START) if not final else base + n
                break
            s = m.start()
            b = self._body.match(buf, m.end())
            e = b.end() if b else m.end()
            if e - s > self._max:
                kind, start = self._opening(buf, s, m.end())
                out.append(Link(base + start, base + s + self._max, buf[s : s + self._max], kind, 1))
                self._cont = (kind, 2)
                self._pos = base + s + self._max
                continue
            if not final and self._open_end(buf, e):
                self._pos = base + s
                break
            e = _trim_end(buf, m.end(), e)
            if e <= m.end():  # a scheme with nothing after it
                self._pos = base + m.end()
                continue
            if buf.startswith("](", e) or (buf.startswith("]", e) and e + 1 == n and not final):
                if e + 1 == n and not final:
                    self._pos = base + s
                    break
                self._pos = base + e  # the visible text of a Markdown link; its target follows
                continue
            resolved = self._construct(buf, s, m.end(), e, final)
            if resolved is None:
                self._pos = base + s
                break
            kind, start, end = resolved
            out.append(Link(base + start, base + end, buf[s:e], kind))
            self._pos = base + end
        keep_from = max(0, self._pos - base - BEFORE_CHARS)
        if keep_from:
            self._buf = buf[keep_from:]
            self._base = base + keep_from
        return out

    def safe_point(self, images_only: bool = False) -> int:
        """The earliest absolute offset where a construct not reported yet may start: a URL
        found and waiting for its end (from its opening: ``![alt](``, ``<img src=``), a URL
        being reported in pieces, or text at the end that could still open one (``[``,
        ``![al``, ``<im``, ``url(``; a bare URL's span starts at its host, so ``htt`` is not
        a candidate); the end of the text when none. ``images_only``: only constructs
        that render as images count (what a policy acting only on critical findings needs
        when the request planted no hosts)."""
        buf, base = self._buf, self._base
        n = len(buf)
        if self._done:
            return base + n
        if self._cont is not None:
            return self._pos
        rel = self._pos - base
        point = base + n
        m = _START.search(buf, rel) if _may_start(buf, rel) else None
        if m is not None:
            kind, start = self._opening(buf, m.start(), m.end())
            if kind == "image" or not images_only:
                point = base + start
        live = (_LIVE_IMAGES if images_only else _LIVE_ANY).search(buf)
        if live is not None and base + live.start() < point:
            point = base + live.start()
        return max(point, 0)

    def _open_end(self, buf: str, e: int) -> bool:
        """True when the URL ending at ``e`` may still grow: it reaches the end of the
        buffer, or (JSON) stops at a final backslash that may start an escaped ``\\/``."""
        n = len(buf)
        return e == n or (self._json and e == n - 1 and buf[e] == "\\")

    @staticmethod
    def _opening(buf: str, s: int, scheme_end: int) -> tuple[str, int]:
        """Kind and start of the construct that a URL at ``s`` opens into. A bare URL is
        reported from its host on (``https://`` and ``www.`` are public and fixed, and
        redacting ``https://[REDACTED:url]`` reads as well), so a word starting with ``h``
        or ``w`` never has to wait for the next one."""
        before = buf[max(0, s - BEFORE_CHARS) : s]
        off = s - len(before)
        m = _MD_BEFORE.search(before)
        if m:
            return ("image" if m.group(1) else "link"), off + m.start()
        m = _TAG_BEFORE.search(before)
        if m:
            return ("link" if m.group(1).lower() in _LINK_TAGS else "image"), off + m.start()
        m = _CSS_BEFORE.search(before)
        if m:
            return "image", off + m.start()
        return "bare", scheme_end

    def _construct(self, buf: str, s: int, scheme_end: int, e: int, final: bool) -> tuple[str, int, int] | None:
        kind, start = self._opening(buf, s, scheme_end)
        if kind == "bare":
            return kind, start, e
        before = buf[max(0, s - BEFORE_CHARS) : s]
        if _MD_BEFORE.search(before):
            after = _MD_AFTER
        elif _TAG_BEFORE.search(before):
            after = _TAG_AFTER
        else:
            after = _CSS_AFTER
        m = after.match(buf, e)
        if m:
            return kind, start, m.end()
        tail = buf[e : e + AFTER_CHARS]
        if not final and len(tail) < AFTER_CHARS and "\n" not in tail:
            return None  # the closing part may still arrive
        return kind, start, e


_LIVE_ANY = _live_prefixes(images_only=False)
_LIVE_IMAGES = _live_prefixes(images_only=True)


def _may_start(buf: str, rel: int) -> bool:
    """Cheap C-level pre-check before the (case-insensitive, look-behind) start regex."""
    return buf.find(":/", rel) >= 0 or buf.find(":\\", rel) >= 0 or "www." in buf[rel:].lower()


def _trim_end(buf: str, lo: int, e: int) -> int:
    while e > lo and buf[e - 1] in _TRAIL:
        e -= 1
    return e
