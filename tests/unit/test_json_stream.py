"""JsonStream: orjson's syntax exactly, failing at the first bad character, piece-size blind."""

from __future__ import annotations

import json
import random

import orjson
import pytest

from detectors.json_stream import (
    ARR,
    NUM,
    OBJ,
    STR,
    TRUE,
    JsonStream,
    Problem,
    decode_string,
    format_path,
    locate,
    parse_number,
)


def run(text: str, sizes: list[int] | None = None, commas: bool = False) -> tuple:
    """Feed ``text`` in pieces; return ('ok', end, rest) or ('fail', kind, at, path)."""
    p = JsonStream(allow_trailing_commas=commas)
    pieces = [text] if not sizes else []
    i = 0
    k = 0
    while sizes and i < len(text):
        n = sizes[k % len(sizes)]
        pieces.append(text[i : i + n])
        i += n
        k += 1
    base = 0
    for piece in pieces:
        j = p.feed(piece, 0, base)
        if p.problem is not None:
            return ("fail", p.problem.kind, p.problem.at, p.problem.path)
        if p.done:
            return ("ok", p.end, text[base + j :])
        base += len(piece)
    prob = p.finish(False, len(text))
    if prob is not None:
        return ("fail", prob.kind, prob.at, prob.path)
    return ("ok", p.end, "")


def accepts(text: str) -> bool:
    r = run(text)
    return r[0] == "ok" and not r[2].strip(" \t\r\n")


def has_duplicate_keys(text: str) -> bool:
    dup = False

    def hook(pairs: list) -> dict:
        nonlocal dup
        if len({k for k, _ in pairs}) != len(pairs):
            dup = True
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    return dup


VALID = [
    '{"a": [1, -2.5e+3, 0, -0, 1E2, 0.5e-1], "b": {"c": null, "d": true, "e": false}}',
    '"\\u00e9\\ud83d\\ude00\\n\\t\\"\\\\\\/\\b\\f\\r"',
    "  [ ]  ",
    "{}",
    "123",
    "-0.0",
    "true",
    "null",
    '{"": ""}',
    '[[[[[]]]]]',
    '{"k\\u0041": "v"}',
    '"\x7f \u2028 é 漢字 😀"',
]

# (text, offset of the first character that makes the prefix invalid)
INVALID = [
    ('{"a": trux}', 9),
    ("{'a': 1}", 1),
    ('{"a" 1}', 5),
    ('{"a": 1,}', 8),
    ("[1,]", 3),
    ("[1 2]", 3),
    ("[01]", 2),
    ("[1.]", 3),
    ("[1.e5]", 3),
    ("[-]", 2),
    ("[--1]", 2),
    ("[1e+]", 4),
    ("[+1]", 1),
    ("[.5]", 1),
    ("[1.2.3]", 4),
    ('["a\\x"]', 4),
    ('["\\u00G0"]', 6),
    ('["\\ud800"]', 8),
    ('["\\ud800\\u0041"]', 10),
    ('["\\ud800\\udb00"]', 11),
    ('["\\udc00"]', 5),
    ('["a\nb"]', 3),
    ("[NaN]", 1),
    ("[Infinity]", 1),
    ("[nul]", 4),
    ("[True]", 1),
    ("\ufeff{}", 0),
    ("\u00a0{}", 0),
    ("}", 0),
    ('{"a": 1]', 7),
    ("[1}", 2),
    ('{"a":}', 5),
    ('{,"a": 1}', 1),
    ("[,1]", 1),
    ('{"a": 1 "b": 2}', 8),
    ('{"a": 1, "a": 2}', 11),
    ("[1e400]", 6),
    ("[" + "1" * 400 + "]", 401),
]


@pytest.mark.parametrize("text", VALID)
def test_valid_documents_match_orjson_in_any_split(text: str) -> None:
    orjson.loads(text)
    whole = run(text)
    assert whole[0] == "ok" and not whole[2].strip()
    assert run(text, [1])[:2] == whole[:2]
    assert run(text, [3, 1, 7])[:2] == whole[:2]


@pytest.mark.parametrize(("text", "at"), INVALID)
def test_invalid_documents_fail_at_the_first_bad_character(text: str, at: int) -> None:
    if text != '{"a": 1, "a": 2}':  # a duplicate key: orjson keeps the last, JsonStream refuses
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(text)
    whole = run(text)
    assert whole[0] == "fail" and whole[1] in ("syntax", "format"), whole
    assert whole[2] == at, (text, whole)
    assert run(text, [1]) == whole
    assert run(text, [2, 5]) == whole
    # the prefix before the offending character is still viable: no failure, only "incomplete"
    p = JsonStream()
    p.feed(text[:at])
    assert p.problem is None


def test_trailing_commas_are_a_format_problem_unless_allowed() -> None:
    assert run("[1,]")[1] == "format"
    p = JsonStream(allow_trailing_commas=True)
    p.feed('{"a": [1, 2,], "b": 3,}')
    assert p.done and p.trailing_commas == [11, 21]


def test_depth_limit_is_orjsons() -> None:
    ok = "[" * 1024 + "]" * 1024
    orjson.loads(ok)
    assert accepts(ok)
    bad = "[" * 1025 + "]" * 1025
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(bad)
    assert run(bad)[:3] == ("fail", "syntax", 1024)


def test_top_level_number_completes_only_at_a_delimiter_or_the_end() -> None:
    p = JsonStream()
    assert p.feed("12") == 2 and not p.done
    assert p.feed("3 ", 0, 2) == 1 and p.done and p.end == 3
    q = JsonStream()
    q.feed("-1.5e3")
    assert not q.done
    assert q.finish(False, 6) is None and q.done and q.end == 6
    r = JsonStream()
    r.feed("1.")
    prob = r.finish(True, 2)
    assert isinstance(prob, Problem) and prob.kind == "truncated"


def test_end_of_input_problems_say_where() -> None:
    for text, where in (('{"a": "x', "string"), ('{"a": tr', "literal"), ("[1, ", "array"), ('{"a"', "after")):
        p = JsonStream()
        p.feed(text)
        prob = p.finish(False, len(text))
        assert prob is not None and prob.kind == "syntax" and where in prob.message
        assert prob.span == (len(text), len(text))


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def value(self, kind: int, start: int) -> None:
        self.events.append(("value", kind, start))

    def key(self, name: str, start: int, end: int) -> None:
        self.events.append(("key", name, start, end))

    def scalar(self, kind: int, raw: str, start: int, end: int) -> None:
        self.events.append(("scalar", kind, raw, start, end))

    def close(self, kind: int, at: int, keys: set[str] | None, count: int) -> None:
        self.events.append(("close", kind, at, sorted(keys) if keys is not None else None, count))


def test_checker_events_are_the_same_in_any_split() -> None:
    text = '{"k\\u00e9y": ["ab\\"c", 12.5, true], "n": -1}'
    expected = [
        ("value", OBJ, 0), ("key", "kéy", 1, 11), ("value", ARR, 13), ("value", STR, 14),
        ("scalar", STR, 'ab\\"c', 14, 21), ("value", NUM, 23), ("scalar", NUM, "12.5", 23, 27),
        ("value", TRUE, 29), ("close", ARR, 33, None, 3), ("key", "n", 36, 39), ("value", NUM, 41),
        ("scalar", NUM, "-1", 41, 43), ("close", OBJ, 43, ["kéy", "n"], 2),
    ]
    for sizes in ([len(text)], [1], [2, 3], [7]):
        rec = _Recorder()
        p = JsonStream(rec)  # type: ignore[arg-type]
        i = base = 0
        k = 0
        while i < len(text):
            piece = text[i : i + sizes[k % len(sizes)]]
            p.feed(piece, 0, base)
            base += len(piece)
            i += len(piece)
            k += 1
        assert p.done and rec.events == expected, sizes


def test_feed_with_offset_and_base() -> None:
    p = JsonStream()
    text = 'Here: {"a": 1} tail'
    j = p.feed(text, 6, 100)
    assert p.done and j == 14 and p.end == 114


def test_locate_finds_value_spans() -> None:
    text = '{"a": [10, {"b": "xyz"}], "c": true, "d": {"e": []}}'
    assert locate(text, ()) == (0, len(text))
    assert locate(text, ("a",)) == (6, 24)
    assert locate(text, ("a", 0)) == (7, 9)
    assert locate(text, ("a", 1, "b")) == (17, 22)
    assert locate(text, ("c",)) == (31, 35)
    assert locate(text, ("d", "e")) == (48, 50)
    assert locate(text, ("zz",)) is None
    assert locate(text, ("a", 0), base=10) == (17, 19)
    assert locate("[1, 2,]", (1,), allow_trailing_commas=True) == (4, 5)


def test_helpers_agree_with_orjson() -> None:
    for raw in ("0", "-0", "12", "1.0", "1e2", "-3.25E-2", "9223372036854775807", "18446744073709551615",
                "18446744073709551616", "-9223372036854775809", "123456789012345678901234567890"):
        assert parse_number(raw) == orjson.loads(raw) and type(parse_number(raw)) is type(orjson.loads(raw))
    for raw in ("plain", 'a\\"b', "\\u00e9\\ud83d\\ude00", "\\n\\t\\/"):
        assert decode_string(raw) == orjson.loads('"' + raw + '"')
    assert format_path(()) == "$"
    assert format_path(("items", 3, "price")) == "$.items[3].price"
    assert format_path(("a b", "é", 0)) == '$["a b"]["é"][0]'


def _mutate(rng: random.Random, text: str) -> str:
    alphabet = '{}[]":,.-+eE0123456789tfnrul \\/abcu\n\t\'x'
    i = rng.randrange(len(text) + 1)
    op = rng.random()
    if op < 0.4 and text:
        return text[:i] + text[i + 1 :]
    if op < 0.7:
        return text[:i] + rng.choice(alphabet) + text[i:]
    return text[:i] + rng.choice(alphabet) + text[i + 1 :]


def test_differential_against_orjson_on_mutations() -> None:
    """Random edits of valid documents: JsonStream accepts exactly what orjson accepts (minus
    documents with a duplicate key, which JsonStream rejects on purpose)."""
    rng = random.Random(1234)
    seeds = [
        {"a": [1, 2.5, -3e2, None, True], "b": {"c": "x\u00e9\"y", "d": []}, "e": ""},
        [{"id": i, "v": [i * 0.5, str(i)], "ok": i % 2 == 0} for i in range(4)],
        {"nested": {"deep": {"deeper": [[1], [2, [3]]]}}, "s": "\\u0041"},
    ]
    checked = 0
    for seed in seeds:
        for indent in (None, 1):
            base = json.dumps(seed, indent=indent, ensure_ascii=rng.random() < 0.5)
            for _ in range(700):
                text = base
                for _ in range(rng.randint(1, 3)):
                    text = _mutate(rng, text)
                try:
                    orjson.loads(text)
                    ok = True
                except orjson.JSONDecodeError:
                    ok = False
                if ok and has_duplicate_keys(text):
                    assert not accepts(text)
                    continue
                assert accepts(text) == ok, text
                sizes = [rng.randint(1, 6) for _ in range(8)]
                assert run(text, sizes) == run(text), (text, sizes)
                checked += 1
    assert checked > 3000
