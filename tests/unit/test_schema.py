"""Detector ``schema``: early failures at the first byte that proves them, never a false one."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from detectors.base import TEXT, Channel, Finding, RequestContext, Severity, StreamEnd
from detectors.json_stream import JsonStream
from detectors.schema import CONFIGS, SchemaCache, SchemaConfig, SchemaDetector
from detectors.schema_check import SchemaChecker, SchemaTree
from tests.unit.compliance import assert_compliant, run

DATA = Path(__file__).resolve().parents[1] / "data" / "schema_cases"
ORDERS = orjson.loads((DATA / "orders.schema.json").read_bytes())
INVALID = [json.loads(line) for line in (DATA / "invalid.jsonl").read_text().splitlines() if line.strip()]
VALID = [json.loads(line) for line in (DATA / "valid.jsonl").read_text().splitlines() if line.strip()]
DET = SchemaConfig().build()
assert isinstance(DET, SchemaDetector)


def schema_of(spec: Any) -> Any:
    if spec == "orders":
        return ORDERS
    if spec == "json_object":
        return {"type": "object"}
    return spec


def ctx_for(spec: Any, **kw: Any) -> RequestContext:
    if spec == "json_object":
        return RequestContext(response_format={"type": "json_object"}, **kw)
    return RequestContext(response_format={"type": "json_schema",
                                           "json_schema": {"name": "t", "schema": schema_of(spec), "strict": True}},
                          **kw)


def verdicts(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.attrs.get("verdict")]


def first_failure(det: SchemaDetector, ctx: RequestContext, doc: str, end: StreamEnd,
                  channel: Channel = TEXT) -> tuple[int, list[Finding], list[Finding]]:
    """Feed one character at a time: (index of the char that produced the first verdict, or
    len(doc) when it came at finish; those verdicts; every finding of the response)."""
    state = det.start(ctx)
    every: list[Finding] = []
    at, first = -1, []
    for i, ch in enumerate(doc):
        got = state.feed(channel, ch)
        every += got
        if verdicts(got) and at < 0:
            at, first = i, verdicts(got)
    got = state.finish(channel, end) + state.finish_response()
    every += got
    if at < 0:
        at, first = len(doc), verdicts(got)
    return at, first, every


# -- the table: earliest failing offset -------------------------------------------------------------

@pytest.mark.parametrize("case", INVALID, ids=[c["name"] for c in INVALID])
def test_first_failure_is_at_the_first_byte_that_proves_it(case: dict[str, Any]) -> None:
    det = SchemaConfig(**case.get("config", {})).build()
    ctx = ctx_for(case["schema"])
    doc, end = case["doc"], StreamEnd(finish_reason=case["finish_reason"])
    at, first, every = first_failure(det, ctx, doc, end)  # type: ignore[arg-type]
    assert at == case["detect_at"], (at, first[0].message if first else None)
    assert len(first) == 1 and len(verdicts(every)) == 1, "one failure per channel, never repeated"
    f = first[0]
    assert f.category == f.attrs["kind"] == case["kind"]
    assert f.attrs["path"] == case["path"] and f.message.startswith(case["path"] + ": ")
    assert f.attrs["offset"] == case["detect_at"] and f.severity == Severity.high
    assert f.detector == "schema" and f.replacement is None
    if f.span and case["detect_at"] < len(doc):  # early: the span reaches the char that proved it
        assert f.span[0] <= case["detect_at"] <= f.span[1]
    # whole text: the same finding
    whole = verdicts(run(det, ctx, doc, end=end))
    assert [(w.category, w.span, w.attrs["path"]) for w in whole] == [(f.category, f.span, f.attrs["path"])]
    # never a false verdict: the final parse or jsonschema-rs rejects the document too
    if case["kind"] != "truncated" and not case.get("orjson_accepts"):
        try:
            value = orjson.loads(doc)
        except orjson.JSONDecodeError:
            return
        validator = jsonschema_rs.validator_for(schema_of(case["schema"]), validate_formats=False)
        assert not validator.is_valid(value)


def test_the_table_is_big_enough() -> None:
    early = [c for c in INVALID if c["detect_at"] < len(c["doc"])]
    assert len(INVALID) >= 30 and len(early) >= 30
    assert {c["kind"] for c in INVALID} >= {"syntax", "schema", "format", "truncated"}


@pytest.mark.parametrize("case", INVALID[::3], ids=[c["name"] for c in INVALID[::3]])
def test_invalid_documents_are_compliant(case: dict[str, Any]) -> None:
    assert_compliant(DET, ctx_for(case["schema"]), case["doc"])


@pytest.mark.parametrize("case", VALID, ids=[c["name"] for c in VALID])
def test_valid_documents_are_never_flagged(case: dict[str, Any]) -> None:
    ctx = ctx_for(case["schema"])
    assert assert_compliant(DET, ctx, case["doc"]) == []
    assert first_failure(DET, ctx, case["doc"], StreamEnd("stop"))[2] == []


def test_messages_say_where_and_why() -> None:
    doc = '{"items": [{"sku": "A", "price": 1}, {"sku": "B", "price": "12,50 EUR per piece, excl."}]}'
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"price": {"type": "number"}, "sku": {"enum": ["A", "B"]}}}}}}
    [f] = run(DET, ctx_for(schema), doc)
    assert f.message == "$.items[1].price: expected number, got a string"
    at = doc.index('"12,50')
    assert f.span == (at, at + 1) and f.attrs["offset"] == at and f.attrs["path"] == "$.items[1].price"
    doc2 = doc.replace('"B"', '"a value that is much too long to be quoted"')
    [g] = run(DET, ctx_for(schema), doc2)
    assert g.message == '$.items[1].sku: expected one of "A", "B", got string "a value that is mu…'
    assert "quoted" not in g.message and "quoted" not in g.evidence  # at most ~20 characters of user data
    quiet = SchemaConfig(show_value_chars=0).build()
    [h] = run(quiet, ctx_for(schema), doc2)
    assert "value" not in h.message and h.message.endswith("got a string")
    # the reason block errors give the client never quotes the value, whatever show_value_chars
    assert f.attrs["reason"] == "expected number, got a string"
    assert g.attrs["reason"] == 'expected one of "A", "B", got a string'


def test_reasons_of_final_failures_quote_no_value() -> None:
    doc = '{"a": "xyz", "b": [1, 1]}'
    schema = {"properties": {"a": {"pattern": "^[0-9]+$"}}}
    [f] = run(DET, ctx_for(schema), doc)
    assert "xyz" in f.message  # the incident record may quote a little (show_value_chars)
    assert "xyz" not in f.attrs["reason"] and f.attrs["reason"]
    number = '{"n": -3}'
    [g] = run(DET, ctx_for({"properties": {"n": {"minimum": 0}}}), number)
    assert "-3" in g.message and "-3" not in g.attrs["reason"]


def test_final_only_failures_have_path_and_span() -> None:
    doc = '{"a": "xyz", "b": [1, 1]}'
    schema = {"properties": {"a": {"pattern": "^[0-9]+$"}, "b": {"uniqueItems": True}}}
    [f] = run(DET, ctx_for(schema), doc)
    assert f.category == "schema" and f.attrs["path"] == "$.a" and f.span == (6, 11)
    assert f.attrs["offset"] == len(doc) and f.attrs["errors"] == 2
    assert '"xyz"' in f.message and "^[0-9]+$" in f.message


# -- config -----------------------------------------------------------------------------------------

def test_config_defaults_and_registry() -> None:
    cfg = SchemaConfig()
    assert CONFIGS["schema"] is SchemaConfig and len(CONFIGS) == 1
    assert (cfg.strip_fence, cfg.skip_prose, cfg.allow_trailing_commas, cfg.validate_formats) == (False,) * 4
    assert cfg.schema_cache_entries == 256 and cfg.show_value_chars == 20 and cfg.default_schema is None
    assert DET.lookback_chars == 0 and DET.name == "schema"
    with pytest.raises(ValidationError):
        SchemaConfig(strict=True)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        SchemaConfig(action="block")  # type: ignore[call-arg]


def test_route_schemas_load_from_files(tmp_path: Path) -> None:
    (tmp_path / "invoice.json").write_text(json.dumps({"type": "object", "required": ["total"]}))
    cfg = SchemaConfig.model_validate({"schemas": {"invoice": "invoice.json", "inline": {"type": "array"}},
                                       "default_schema": "invoice"}, context={"config_dir": tmp_path})
    det = cfg.build()
    assert isinstance(det, SchemaDetector)
    [f] = run(det, RequestContext(), '{"sum": 3}')
    assert f.attrs["schema"] == "route:invoice" and "missing required property \"total\"" in f.message
    by_header = RequestContext(headers={"x-gapwatch-schema": "inline"})
    [g] = run(det, by_header, "{}")
    assert g.attrs["schema"] == "route:inline" and g.message == "$: expected array, got an object"
    # the header wins over the request's response_format
    both = ctx_for("json_object", headers={"x-gapwatch-schema": "inline"})
    assert run(det, both, "[1]") == []


@pytest.mark.parametrize(("schemas", "default", "needle"), [
    ({"x": "missing.json"}, None, "schemas.x: cannot read"),
    ({"x": "bad.json"}, None, "schemas.x"),
    ({"x": {"type": "nonsense"}}, None, "schemas.x: not a valid JSON Schema"),
    ({"x": {"$ref": "https://example.com/remote.json"}}, None, "schemas.x: not a valid JSON Schema"),
    ({"x": {}}, "y", "default_schema: 'y' is not one of the schemas (x)"),
    ({"bad name!": {}}, None, "invalid schema name"),
])
def test_bad_route_schemas_are_config_errors_naming_the_option(tmp_path: Path, schemas: dict, default: Any,
                                                               needle: str) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValidationError) as err:
        SchemaConfig.model_validate({"schemas": schemas, "default_schema": default},
                                    context={"config_dir": tmp_path})
    assert needle in str(err.value)


def test_unknown_header_schema_is_a_finding_not_a_crash() -> None:
    det = SchemaConfig(schemas={"orders": ORDERS}).build()
    ctx = RequestContext(headers={"x-gapwatch-schema": "ordres"})
    findings = run(det, ctx, "anything at all")
    assert [(f.category, f.severity, f.attrs["verdict"]) for f in findings] == [
        ("unknown_schema", Severity.medium, False)]
    assert "'ordres'" in findings[0].message and "orders" in findings[0].message
    # with a response_format the output is still validated against it
    ctx2 = ctx_for("json_object", headers={"x-gapwatch-schema": "ordres"})
    assert {f.category for f in run(det, ctx2, "[]")} == {"unknown_schema", "schema"}


# -- what applies ---------------------------------------------------------------------------------

def test_response_format_shapes_and_applies() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    chat = RequestContext(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    responses = RequestContext(endpoint="responses",
                               response_format={"type": "json_schema", "name": "x", "schema": schema, "strict": True})
    whole_text = RequestContext(endpoint="responses", response_format={"format": {"type": "json_schema",
                                                                                  "name": "x", "schema": schema}})
    for ctx in (chat, responses, whole_text):
        assert DET.applies(ctx) and DET.applies(ctx, TEXT)
        assert [f.attrs["path"] for f in run(DET, ctx, '{"n": "1"}')] == ["$.n"]
    plain = RequestContext(response_format={"type": "text"})
    assert not DET.applies(plain) and run(DET, plain, "not json") == []
    assert not DET.applies(RequestContext())
    tools = RequestContext(tools=({"type": "function", "function": {"name": "f"}},))
    assert DET.applies(tools) and not DET.applies(tools, TEXT)
    assert DET.applies(tools, Channel(kind="tool_call", tool_index=0, tool_name="f"))
    assert not DET.applies(RequestContext(tools=TOOLS_CHAT), Channel(kind="tool_call", tool_index=0, tool_name="sql"))
    routed = SchemaConfig(schemas={"a": {}}, default_schema="a").build()
    assert isinstance(routed, SchemaDetector)
    assert routed.applies(RequestContext(), TEXT)
    assert not routed.applies(RequestContext(headers={"x-gapwatch-schema": "nope"}), TEXT)  # as prepare decides
    off = SchemaConfig(check_response_format=False, check_tool_calls=False).build()
    assert isinstance(off, SchemaDetector)
    assert not off.applies(chat) and run(off, chat, "nope") == []


def test_json_object_mode() -> None:
    ctx = ctx_for("json_object")
    assert run(DET, ctx, ' {"any": ["thing", 1, null]} \n') == []
    [f] = run(DET, ctx, "[]")
    assert f.message == "$: expected object, got an array"
    [g] = run(DET, ctx, "")
    assert g.category == "syntax" and "empty output" in g.message
    assert run(DET, ctx, "", end=StreamEnd("tool_calls")) == []


# -- tool calls -------------------------------------------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
           "required": ["city"], "additionalProperties": False}
TOOLS_CHAT = ({"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "strict": True}},
              {"type": "function", "function": {"name": "now"}},
              {"type": "custom", "custom": {"name": "sql", "description": "free-form SQL"}})
TOOLS_RESPONSES = ({"type": "function", "name": "get_weather", "parameters": WEATHER},
                   {"type": "web_search_preview"})


def tool(i: int, name: str | None, choice: int = 0) -> Channel:
    return Channel(choice=choice, kind="tool_call", tool_index=i, tool_name=name)


@pytest.mark.parametrize("tools", [TOOLS_CHAT, TOOLS_RESPONSES])
def test_tool_arguments_are_validated_per_call(tools: tuple) -> None:
    ctx = RequestContext(tools=tools)
    ok, bad = tool(0, "get_weather"), tool(1, "get_weather")
    state = DET.start(ctx)
    out: list[Finding] = []
    a, b = '{"city": "Paris", "unit": "C"}', '{"city": "Oslo", "unit": "K"}'
    for i in range(0, max(len(a), len(b)), 4):  # parallel calls, interleaved
        out += state.feed(ok, a[i : i + 4]) + state.feed(bad, b[i : i + 4])
    out += state.finish(ok, StreamEnd("tool_calls")) + state.finish(bad, StreamEnd("tool_calls"))
    [f] = out
    assert f.channel == bad and f.attrs["tool"] == "get_weather" and f.attrs["schema"] == "tool"
    assert f.message == 'tool get_weather: $.unit: expected one of "C", "F", got string "K"'
    assert_compliant(DET, ctx, b, channel=bad)
    assert assert_compliant(DET, ctx, a, channel=ok) == []


def test_unknown_tool_and_free_form_tools() -> None:
    ctx = RequestContext(tools=TOOLS_CHAT)
    [f] = assert_compliant(DET, ctx, '{"q": 1}', channel=tool(0, "delete_everything"))
    assert f.category == "unknown_tool" and f.severity == Severity.high and f.span is None
    assert "get_weather" in f.message and f.attrs["verdict"] is True
    [g] = run(DET, RequestContext(), "{}", channel=tool(0, "anything"))
    assert g.category == "unknown_tool" and "declared: none" in g.message
    assert run(DET, ctx, "SELECT * FROM t -- not JSON", channel=tool(0, "sql")) == []
    responses_custom = RequestContext(tools=({"type": "custom", "name": "sql"},))
    assert run(DET, responses_custom, "SELECT 1", channel=tool(0, "sql")) == []


def test_tool_arguments_edge_cases() -> None:
    ctx = RequestContext(tools=TOOLS_CHAT)
    assert run(DET, ctx, "{}", channel=tool(0, "now")) == []
    [f] = run(DET, ctx, "[]", channel=tool(0, "now"))
    assert f.message == "tool now: $: expected object, got an array"
    # some providers send "" for a call without arguments: judged as {}
    assert run(DET, ctx, "", channel=tool(0, "now")) == []
    [g] = run(DET, ctx, "", channel=tool(0, "get_weather"))
    assert g.message == 'tool get_weather: $: missing required property "city"' and g.span is None
    # no name from upstream: the arguments must still be one JSON object
    [h] = run(DET, ctx, '"x"', channel=tool(0, None))
    assert h.message == "$: expected object, got a string"
    [t] = run(DET, ctx, '{"city": "Par', channel=tool(0, "get_weather"), end=StreamEnd("length"))
    assert t.category == "truncated"
    off = SchemaConfig(check_tool_calls=False).build()
    assert run(off, ctx, "nope", channel=tool(0, "get_weather")) == []


def test_invalid_request_schema_still_checks_syntax() -> None:
    ctx = RequestContext(tools=({"type": "function", "function": {"name": "f", "parameters": {"type": 5}}},))
    findings = run(DET, ctx, '{"a": 1}', channel=tool(0, "f"))
    assert [(f.category, f.severity) for f in findings] == [("invalid_schema", Severity.low)]
    bad = run(DET, ctx, '{"a": 1', channel=tool(0, "f"))
    assert sorted(f.category for f in bad) == ["invalid_schema", "syntax"]
    # a remote $ref is never fetched: the schema does not compile
    remote = ctx_for({"$ref": "http://169.254.169.254/latest/meta-data"})
    assert [f.category for f in run(DET, remote, "{}")] == ["invalid_schema"]


# -- model habits -----------------------------------------------------------------------------------

FENCED = '```json\n{"city": "Paris"}\n```\n'


def test_habits_are_failures_by_default() -> None:
    ctx = RequestContext(tools=TOOLS_CHAT)
    ch = tool(0, "get_weather")
    [f] = run(DET, ctx, FENCED, channel=ch)
    assert (f.category, f.attrs["habit"], f.span, f.severity) == ("format", "fence", (0, 1), Severity.high)
    [p] = run(DET, ctx, 'Here you go: {"city": "Paris"}', channel=ch)
    assert (p.category, p.attrs["habit"], p.attrs["offset"]) == ("format", "prose", 0)
    [q] = run(DET, ctx, 'the city is {"city": "Paris"}', channel=ch)  # 't' could start true: still prose
    assert (q.category, q.attrs["habit"]) == ("format", "prose")
    [c] = run(DET, ctx, '{"city": "Paris",}', channel=ch)
    assert (c.category, c.attrs["habit"], c.span, c.attrs["offset"]) == ("format", "trailing_comma", (16, 17), 17)


def test_habits_accepted_when_configured() -> None:
    det = SchemaConfig(strip_fence=True, skip_prose=True, allow_trailing_commas=True).build()
    ctx = RequestContext(tools=TOOLS_CHAT)
    ch = tool(0, "get_weather")
    notes = assert_compliant(det, ctx, "Sure! Here it is:\n" + FENCED.replace('"Paris"', '"Paris",') + "Enjoy.",
                             channel=ch)
    assert sorted((f.attrs["habit"], f.severity, f.attrs["verdict"]) for f in notes) == [
        ("fence", Severity.low, False), ("prose", Severity.low, False), ("trailing_comma", Severity.low, False)]
    # the JSON inside the fence is what gets judged
    [note, bad] = sorted(run(det, ctx, FENCED.replace('"Paris"', "42"), channel=ch), key=lambda f: f.severity)
    assert note.attrs["habit"] == "fence" and bad.message == "tool get_weather: $.city: expected string, got a number"
    assert bad.span == (17, 18)  # offsets stay in the channel's text, fence included
    [tc] = [f for f in run(det, ctx, '{"city": "Oslo", "unit": "K",}', channel=ch) if f.attrs["verdict"]]
    assert tc.attrs["path"] == "$.unit"  # judged after the commas are dropped


def test_fence_only_with_strip_fence() -> None:
    det = SchemaConfig(strip_fence=True).build()
    ctx = ctx_for("json_object")
    [note] = assert_compliant(det, ctx, FENCED)
    assert note.span == (0, 7) and note.severity == Severity.low
    assert verdicts(run(det, ctx, '```{"a": 1}```')) == []
    [f] = verdicts(run(det, ctx, FENCED + "PS: thanks"))
    assert f.category == "syntax" and f.attrs["offset"] == len(FENCED)
    [g] = verdicts(run(det, ctx, "`" + '{"a": 1}'))
    assert g.category == "format" and g.attrs["habit"] == "fence"
    [h] = verdicts(run(det, ctx, "```json\nnot json\n```"))
    assert (h.category, h.attrs["habit"], h.attrs["offset"]) == ("format", "prose", 8)
    [t] = verdicts(run(det, ctx, '```json\n{"a": ', end=StreamEnd("length")))
    assert t.category == "truncated"


# -- ends of output -----------------------------------------------------------------------------

@pytest.mark.parametrize(("doc", "end", "kind"), [
    ('{"name": "Bo', StreamEnd("length"), "truncated"),
    ('{"name": "Bo', StreamEnd(truncated=True), "truncated"),
    ('{"name": "Bo', StreamEnd("content_filter"), "truncated"),
    ('{"name": "Bo', StreamEnd("stop"), "syntax"),
    ("", StreamEnd("length"), "truncated"),
    ("   ", StreamEnd("stop"), "syntax"),
    ("12", StreamEnd("stop"), "schema"),
])
def test_end_of_output(doc: str, end: StreamEnd, kind: str) -> None:
    [f] = run(DET, ctx_for("json_object"), doc, end=end)
    assert f.category == kind
    if kind != "schema":
        assert f.span == (len(doc), len(doc)) and f.attrs["offset"] == len(doc)


def test_complete_document_with_finish_reason_length_is_fine() -> None:
    assert run(DET, ctx_for("json_object"), '{"a": 1}', end=StreamEnd("length")) == []


def test_finish_is_idempotent_and_nothing_after_a_failure() -> None:
    state = DET.start(ctx_for("json_object"))
    assert [f.category for f in state.feed(TEXT, "[")] == ["schema"]
    assert state.feed(TEXT, "1, 2]") == []
    assert state.finish(TEXT, StreamEnd("stop")) == [] and state.finish(TEXT, StreamEnd("stop")) == []
    ok = DET.start(ctx_for("json_object"))
    ok.feed(TEXT, "{")
    assert [f.category for f in ok.finish(TEXT, StreamEnd("stop"))] == ["syntax"]
    assert ok.finish(TEXT, StreamEnd("stop")) == []


def test_max_document_chars_bounds_memory() -> None:
    det = SchemaConfig(max_document_chars=50).build()
    doc = json.dumps({"a": ["x" * 10] * 10})
    schema = {"properties": {"a": {"items": {"pattern": "^y"}}}}
    [note] = run(det, ctx_for(schema), doc)
    assert note.category == "too_large" and note.severity == Severity.low and note.span == (50, 50)
    [early] = verdicts(run(det, ctx_for({"properties": {"a": {"items": {"type": "integer"}}}}), doc))
    assert early.attrs["path"] == "$.a[0]"  # streaming checks still run


# -- the cache -------------------------------------------------------------------------------------

def test_cache_by_content_hash_bounded_and_thread_safe() -> None:
    cache = SchemaCache(max_entries=3, validate_formats=False)
    a1 = cache.get({"type": "object", "required": ["a"]})
    a2 = cache.get({"required": ["a"], "type": "object"})  # same content, other key order
    assert a1 is a2 and cache.info() == {"hits": 1, "misses": 1, "size": 1, "max": 3}
    for i in range(10):
        cache.get({"maxLength": i})
    assert cache.info()["size"] == 3
    results: list[Any] = []

    def worker() -> None:
        for i in range(50):
            results.append(cache.get({"minimum": i % 5}))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 200 and cache.info()["size"] <= 3
    ctx = ctx_for({"type": "array"})
    before = DET.cache_info()["hits"]
    run(DET, ctx, "[]")
    run(DET, ctx_for({"type": "array"}), "[]")
    assert DET.cache_info()["hits"] >= before + 1


# -- properties (hypothesis) ------------------------------------------------------------------------

def dumps_variants(value: Any) -> st.SearchStrategy[str]:
    texts = [json.dumps(value), json.dumps(value, indent=2), json.dumps(value, ensure_ascii=False),
             json.dumps(value, separators=(",", ":")), json.dumps(value, indent="\t", ensure_ascii=False)]
    try:
        texts.append(orjson.dumps(value).decode())
    except TypeError:  # an integer beyond 64 bits
        pass
    return st.sampled_from(texts)


TEXT_ST = st.text(max_size=12)
MONEY = st.one_of(st.integers(0, 10**6), st.floats(0, 1e6, allow_nan=False))
ADDRESS = st.fixed_dictionaries({
    "name": st.text(min_size=1, max_size=10), "street": TEXT_ST, "city": TEXT_ST,
    "postcode": st.from_regex(r"^[A-Z0-9 -]{3,10}$", fullmatch=True),
    "country": st.text(min_size=2, max_size=2)})
ITEM = st.fixed_dictionaries({
    "sku": st.from_regex(r"^[A-Z]{3}-[0-9]{4}$", fullmatch=True), "title": TEXT_ST,
    "quantity": st.integers(1, 10**9), "price": MONEY, "discount": st.none() | MONEY,
    "tags": st.lists(TEXT_ST, max_size=3, unique=True)})
ORDER = st.fixed_dictionaries({
    "id": TEXT_ST, "placed_at": TEXT_ST, "status": st.sampled_from(["pending", "paid", "shipped", "cancelled"]),
    "customer": st.fixed_dictionaries({"email": TEXT_ST, "vip": st.booleans()}),
    "shipping": ADDRESS, "billing": st.none() | ADDRESS, "items": st.lists(ITEM, min_size=1, max_size=3),
    "total": MONEY})
ORDERS_DOC = st.fixed_dictionaries({
    "orders": st.lists(ORDER, max_size=2), "currency": st.sampled_from(["EUR", "USD", "GBP", "CHF"]),
    "confidence": st.floats(0, 1), "notes": st.none() | TEXT_ST})
S1 = INVALID[1]["schema"]
S1_DOC = st.fixed_dictionaries(
    {"name": TEXT_ST, "age": st.integers(0, 2**70)},
    optional={"tags": st.lists(TEXT_ST, max_size=3), "role": st.sampled_from(["admin", "user"]),
              "active": st.booleans(),
              "score": st.floats(max_value=10, allow_nan=False, allow_infinity=False) | st.integers(-5, 10),
              "meta": st.fixed_dictionaries({}, optional={"k": st.just("v")})})
TREE_SCHEMA = next(c["schema"] for c in INVALID if c["name"] == "recursive $ref")
TREE_DOC = st.recursive(st.fixed_dictionaries({"v": st.integers()}),
                        lambda kids: st.fixed_dictionaries({"v": st.integers()},
                                                           optional={"kids": st.lists(kids, max_size=3)}),
                        max_leaves=8)
D7_SCHEMA = next(c["schema"] for c in INVALID if c["name"] == "draft-07 tuple item type")
D7_DOC = st.fixed_dictionaries({}, optional={"p": st.lists(st.floats(allow_nan=False, allow_infinity=False)
                                                          | st.integers(), max_size=2)})
VALID_CASES = [(ORDERS, ORDERS_DOC), (S1, S1_DOC), (TREE_SCHEMA, TREE_DOC), (D7_SCHEMA, D7_DOC)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), which=st.integers(0, len(VALID_CASES) - 1))
def test_property_valid_documents_chunked_randomly_are_never_flagged(data: st.DataObject, which: int) -> None:
    schema, strategy = VALID_CASES[which]
    value = data.draw(strategy)
    text = data.draw(dumps_variants(value))
    validator = jsonschema_rs.validator_for(schema, validate_formats=False)
    assert validator.is_valid(orjson.loads(text))
    sizes = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=40))
    assert run(DET, ctx_for(schema), text, sizes * (len(text) // len(sizes) + 1)) == []


SOUNDNESS_SCHEMAS: list[Any] = [
    ORDERS, S1, TREE_SCHEMA, D7_SCHEMA,
    {"type": "object", "patternProperties": {"^a": {"type": "integer"}}, "additionalProperties": False,
     "properties": {"b": {"type": ["string", "null"], "maxLength": 3}}},
    {"anyOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
               {"type": "array", "items": {"type": "integer"}, "maxItems": 2}, {"type": "null"}]},
    {"oneOf": [{"type": "object", "properties": {"a": {"const": 1}}}, {"type": "object", "properties": {"b": {}}}]},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}},
               {"properties": {"a": {"exclusiveMaximum": 5}, "b": False}}]},
    {"enum": [1, 1.5, True, None, "a", {"a": 1}, [1]]},
    {"type": "array", "prefixItems": [{"type": "boolean"}, {"enum": [0, "0"]}], "items": {"type": "object"},
     "minItems": 1},
    {"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"s": {"type": "string"}},
     "type": "object", "properties": {"a": {"$ref": "#/definitions/s", "type": "integer"},
                                      "b": {"items": [{"type": "null"}], "additionalItems": {"type": "number"}}}},
    {"$defs": {"s": {"type": "string", "minLength": 1}}, "type": "object",
     "properties": {"a": {"$ref": "#/$defs/s", "maxLength": 2}, "c": {"type": "integer", "multipleOf": 2}},
     "required": ["a"]},
    {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
     "properties": {"a": {"type": "number", "minimum": 1, "exclusiveMinimum": True}}},
    {"type": "object", "properties": {"a": {"not": {"type": "string"}}, "b": {"if": {"type": "string"},
                                                                             "then": {"minLength": 2}}},
     "unevaluatedProperties": False},
]
KEYS = st.sampled_from(["a", "b", "c", "name", "age", "tags", "role", "meta", "k", "v", "kids", "p", "orders",
                        "currency", "confidence", "notes", "z"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, 1, 1.0, 1.5, -1, 5, "a", "0", "", "admin", "v", "EUR"]) | st.text(max_size=5),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(KEYS | st.text(max_size=3), c, max_size=5),
    max_leaves=15)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), which=st.integers(0, len(SOUNDNESS_SCHEMAS) - 1), value=JSON_VALUES)
def test_property_detector_agrees_with_jsonschema_rs(data: st.DataObject, which: int, value: Any) -> None:
    """Arbitrary documents: an early finding implies jsonschema-rs rejects; the detector's
    verdict (early or final) is exactly jsonschema-rs's."""
    schema = SOUNDNESS_SCHEMAS[which]
    text = data.draw(dumps_variants(value))
    valid = jsonschema_rs.validator_for(schema, validate_formats=False).is_valid(orjson.loads(text))
    tree = SchemaTree(schema)
    parser = JsonStream(SchemaChecker([tree.root]))
    sizes = data.draw(st.lists(st.integers(1, 7), min_size=1, max_size=10))
    i = k = 0
    while i < len(text) and parser.problem is None:
        n = sizes[k % len(sizes)]
        parser.feed(text[i : i + n], 0, i)
        i += n
        k += 1
    if parser.problem is not None:
        assert not valid, (parser.problem, text)
    detector_verdicts = verdicts(run(DET, ctx_for(schema), text))
    assert bool(detector_verdicts) == (not valid), (detector_verdicts, text)


def test_mutated_realistic_documents_are_judged_soundly() -> None:
    """Edits of valid orders documents (near misses, the interesting ones): every early finding
    is confirmed by orjson or jsonschema-rs, and the final verdict is jsonschema-rs's."""
    import random

    from tests.bench.bench_schema import make_document
    from tests.unit.test_json_stream import _mutate, has_duplicate_keys

    rng = random.Random(7)
    validator = jsonschema_rs.validator_for(ORDERS, validate_formats=False)
    tree = SchemaTree(ORDERS)
    ctx = ctx_for("orders")
    docs = [make_document(1, seed=s, indent=s % 2 == 0) for s in range(6)]
    early = 0
    for n in range(600):
        text = docs[n % len(docs)]
        if n % 2:
            for _ in range(rng.randint(1, 2)):
                text = _mutate(rng, text)
        else:
            text = json.dumps(_edit_leaf(rng, orjson.loads(text)), indent=rng.choice([None, 2]))
        try:
            value = orjson.loads(text)
            valid: bool | None = validator.is_valid(value) and not has_duplicate_keys(text)
        except orjson.JSONDecodeError:
            valid = None  # not JSON at all
        parser = JsonStream(SchemaChecker([tree.root]))
        parser.feed(text)
        if parser.problem is not None:
            early += 1
            assert not valid, (parser.problem, text)
        if n % 5 == 0:
            assert bool(verdicts(run(DET, ctx, text))) == (not valid), text
    assert early > 300


def _edit_leaf(rng: Any, doc: Any) -> Any:
    """Replace, drop or add one member somewhere in ``doc`` (a schema-level near miss)."""
    node = doc
    while True:
        kids = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        containers = [(k, v) for k, v in kids if isinstance(v, dict | list) and v]
        if containers and rng.random() < 0.7:
            node = rng.choice(containers)[1]
            continue
        if not kids:
            return doc
        key = rng.choice(kids)[0]
        op = rng.random()
        if op < 0.2 and isinstance(node, dict):
            del node[key]
        elif op < 0.3 and isinstance(node, dict):
            node["extra"] = 1
        else:
            node[key] = rng.choice(["x", "", 1, 0, -1, 1.5, 2.0, None, True, [], {}, "EUR", "paid", [1], {"a": 1}])
        return doc
