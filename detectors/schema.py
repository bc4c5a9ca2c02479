"""Detector ``schema``: structured outputs and tool-call arguments, validated as they stream.

What is validated, per channel (decided in ``prepare`` from the request):

- text channel: the schema named by the request header ``x-gapwatch-schema: NAME`` (one of
  the configured ``schemas``), else the request's ``response_format`` (chat:
  ``{"type": "json_schema", "json_schema": {"schema": ...}}``; Responses API ``text.format``:
  ``{"type": "json_schema", "schema": ...}``; ``json_object`` = one JSON object), else the
  configured ``default_schema``. Nothing of these: the text channel is not validated.
- tool-call channels: the function name must be one the request declared (``unknown_tool``)
  and the arguments must be a JSON object valid against that function's ``parameters``.
  Free-form (``custom``) tools are not validated.

How: ``JsonStream`` (syntax, exactly orjson's) and ``SchemaChecker`` (the part of the schema a
prefix can violate) run on every delta, so the first failure is reported at the character
that proves it; at the end the whole document is parsed with orjson and validated with
jsonschema-rs, which has the last word (``anyOf``, ``pattern``, ``format``...). One failure
per channel at most: a channel that already failed early reports nothing more at the end.

Model habits are explicit: a Markdown code fence, prose before the JSON, a trailing comma.
By default each is a failure (category ``format``); ``strip_fence``, ``skip_prose`` and
``allow_trailing_commas`` accept them instead (a low-severity ``format`` note, the JSON inside
is judged). Output that starts with t/f/n where the schema wants no bare literal ("the answer
is ...") is classified as prose too, at its first character.

Findings: ``category`` = ``attrs["kind"]`` ∈ syntax | schema | unknown_tool | truncated |
format for failures (severity high, ``attrs["verdict"] = True``); low/medium notes with
``attrs["verdict"] = False``: ``format`` (a tolerated habit), ``invalid_schema`` (the
request's schema does not compile; syntax is still checked), ``too_large`` (the document
exceeded ``max_document_chars``; only the streaming checks ran), ``unknown_schema`` (the
header named no configured schema; response-level). ``span`` is where the failure was
detected (the offending token; an empty span at the end of output for end-of-input failures);
``attrs["offset"]`` is the character whose arrival proved it; ``attrs["path"]`` the JSON path.

Valid outputs produce no finding. To count validated channels, the pipeline asks
``SchemaDetector.applies(ctx, channel)``: a channel it covers and that got no finding with
``attrs["verdict"]`` is a valid one.

Schema findings are about the document, not a redactable span: ``lookback_chars`` is 0 and
``replacement`` is None; holding a document back until it is valid is a policy (buffering)
decision.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any, ClassVar

import jsonschema_rs
import orjson
from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

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
from detectors.json_stream import JsonStream, Path, Problem, format_path, locate
from detectors.redaction import mask
from detectors.schema_check import Node, SchemaChecker, SchemaTree, kind_of, preview

NAME = "schema"
HEADER = "x-gapwatch-schema"
VERDICT_KINDS = frozenset(("syntax", "schema", "unknown_tool", "truncated", "format"))
_CUT_OFF = frozenset(("length", "content_filter"))  # finish reasons that end output early
_NO_TEXT_OK = frozenset(("tool_calls", "function_call", "content_filter"))
_WS_RUN = re.compile(r"[ \t\n\r]*").match
_PROSE_STOP = re.compile(r"[{\[`]").search
_JSON_START = frozenset('{["-0123456789tfn')
_TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-+.")
_MAX_TAG = 32
_MAX_ERRORS_COUNTED = 100


# -- compiled schemas and their cache ----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Compiled:
    """One schema, compiled once: the jsonschema-rs validator for the final verdict and the
    incremental tree for early ones. ``error`` is set (and the rest ``None``) when the schema
    does not compile."""

    digest: str
    validator: Any = None
    root: Node | None = None
    error: str = ""


def schema_digest(schema: Any) -> str:
    """sha256 of the canonical JSON (sorted keys): equal schemas share one compiled entry."""
    return hashlib.sha256(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)).hexdigest()


def compile_schema(schema: Any, validate_formats: bool, digest: str = "") -> Compiled:
    """Compile without any network access (remote ``$ref``s fail instead of being fetched)."""
    digest = digest or schema_digest(schema)
    try:
        validator = jsonschema_rs.validator_for(schema, validate_formats=validate_formats, offline=True,
                                                mask="value")
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return Compiled(digest, error=first[:200])
    try:
        root = SchemaTree(schema).root
    except RecursionError:  # absurdly deep schema: no early verdicts, the final one still runs
        root = None
    return Compiled(digest, validator, root)


class SchemaCache:
    """Bounded, thread-safe LRU of compiled schemas keyed by content hash. The one shared
    mutable object of the detector: per-request schemas arrive with every request, and
    compiling one costs far more than hashing it."""

    def __init__(self, max_entries: int, validate_formats: bool) -> None:
        self._max = max_entries
        self._formats = validate_formats
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Compiled] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, schema: Any) -> Compiled:
        try:
            digest = schema_digest(schema)
        except (TypeError, orjson.JSONEncodeError) as e:
            return Compiled("", error=f"schema is not JSON: {e}"[:200])
        with self._lock:
            hit = self._entries.get(digest)
            if hit is not None:
                self._entries.move_to_end(digest)
                self.hits += 1
                return hit
            self.misses += 1
        compiled = compile_schema(schema, self._formats, digest)  # outside the lock: may be slow
        with self._lock:
            self._entries[digest] = compiled
            self._entries.move_to_end(digest)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return compiled

    def info(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._entries), "max": self._max}


# -- the request plan ------------------------------------------------------------------------

_FREEFORM = object()


@dataclass(slots=True)
class _Plan:
    """What this request validates (per response; read-only after ``prepare``)."""

    ctx: RequestContext
    text: Any = None  # a Compiled (route / json_object) or the raw schema to compile lazily
    text_source: str = ""
    unknown_header: str | None = None
    compiled_text: Compiled | None = None


def _response_format_schema(rf: Mapping[str, Any] | None) -> tuple[str, Any]:
    """("json_object", None) | ("json_schema", schema) | ("", None) for chat and Responses shapes."""
    if not isinstance(rf, Mapping):
        return "", None
    if "type" not in rf and isinstance(rf.get("format"), Mapping):
        rf = rf["format"]  # the whole Responses ``text`` object was passed
    kind = rf.get("type")
    if kind == "json_object":
        return "json_object", None
    if kind == "json_schema":
        inner = rf.get("json_schema")
        holder = inner if isinstance(inner, Mapping) else rf
        schema = holder.get("schema")
        return "json_schema", (schema if schema is not None else {})
    return "", None


def _declared_tool(tools: Any, name: str) -> tuple[bool, Any]:
    """(declared, parameters | None | _FREEFORM) for ``name`` in chat or Responses tool shapes."""
    for t in tools or ():
        if not isinstance(t, Mapping):
            continue
        kind = t.get("type", "function")
        if kind == "function":
            fn = t.get("function")
            fn = fn if isinstance(fn, Mapping) else t
            if fn.get("name") == name:
                params = fn.get("parameters")
                return True, params if isinstance(params, Mapping | bool) else None
        elif kind == "custom":
            c = t.get("custom")
            c = c if isinstance(c, Mapping) else t
            if c.get("name") == name:
                return True, _FREEFORM
    return False, None


def _tool_names(tools: Any) -> list[str]:
    out: list[str] = []
    for t in tools or ():
        if isinstance(t, Mapping):
            fn = t.get("function") if isinstance(t.get("function"), Mapping) else t.get("custom")
            fn = fn if isinstance(fn, Mapping) else t
            if isinstance(fn.get("name"), str):
                out.append(fn["name"])
    return out


def _short(s: str, limit: int = 64) -> str:
    s = "".join(ch if ch.isprintable() else "?" for ch in s)
    return s if len(s) <= limit else s[: limit - 1] + "…"


# -- config and detector -------------------------------------------------------------------------

class SchemaDetector(Detector):
    """Validates JSON outputs and tool-call arguments; see the module docstring."""

    name: ClassVar[str] = NAME
    judges_tool_calls: ClassVar[bool] = True

    def __init__(self, config: SchemaConfig) -> None:  # type: ignore[override]
        super().__init__(config)
        self.cfg = config
        self.cache = SchemaCache(config.schema_cache_entries, config.validate_formats)
        self._routes: dict[str, Compiled] = {
            name: compile_schema(schema, config.validate_formats) for name, schema in config.loaded_schemas.items()
        }
        self._json_object = compile_schema({"type": "object"}, config.validate_formats)
        self._object_root = self._json_object.root

    @property
    def lookback_chars(self) -> int:
        return 0

    def cache_info(self) -> dict[str, int]:
        """Cache hits/misses/size for metrics."""
        return self.cache.info()

    def applies(self, ctx: RequestContext, channel: Channel | None = None) -> bool:
        """Whether this response (or one channel of it) is validated. Cheap: compiles nothing.

        With ``channel``: a text channel is validated when a schema applies to it (see the
        module docstring); a tool-call channel whenever ``check_tool_calls`` is on, except
        for free-form (``custom``) tools; an undeclared tool is validated (and fails).
        Without: whether any channel of the response can be validated."""
        if channel is not None and channel.kind == "tool_call":
            if not self.cfg.check_tool_calls:
                return False
            return channel.tool_name is None or _declared_tool(ctx.tools, channel.tool_name)[1] is not _FREEFORM
        text = self._text_target(ctx)[0] is not None
        if channel is not None:
            return text and channel.kind == "text"
        return text or (self.cfg.check_tool_calls and bool(ctx.tools))

    def _text_target(self, ctx: RequestContext) -> tuple[Any, str, str | None]:
        """(a Compiled or a raw schema to compile | None, source label, unknown header name)."""
        if not self.cfg.check_response_format:
            return None, "", None
        unknown = None
        header = ctx.headers.get(HEADER)
        if header:
            name = header.strip()
            if name in self._routes:
                return self._routes[name], f"route:{name}", None
            unknown = name
        kind, schema = _response_format_schema(ctx.response_format)
        if kind == "json_object":
            return self._json_object, "json_object", unknown
        if kind == "json_schema":
            return schema, "response_format", unknown
        if unknown is None and self.cfg.default_schema is not None:
            name = self.cfg.default_schema
            return self._routes[name], f"route:{name}", None
        return None, "", unknown

    def prepare(self, ctx: RequestContext) -> _Plan:
        target, source, unknown = self._text_target(ctx)
        return _Plan(ctx, target, source, unknown)

    def open_channel(self, prepared: _Plan, channel: Channel) -> ChannelState | None:
        plan = prepared
        if channel.kind == "tool_call":
            if not self.cfg.check_tool_calls:
                return None
            name = channel.tool_name
            if name is None:  # the upstream did not say which tool: arguments must be an object
                return _JsonChannel(self, channel, self._json_object, "tool", [self._object_root])
            declared, params = _declared_tool(plan.ctx.tools, name)
            source = "tool"
            if not declared:
                return _JsonChannel(self, channel, None, source, [], unknown_tool=name,
                                    declared=_tool_names(plan.ctx.tools))
            if params is _FREEFORM:
                return None
            compiled = self._json_object if params is None else self.cache.get(params)
            return _JsonChannel(self, channel, compiled, source, [self._object_root])
        if channel.kind != "text" or plan.text is None:
            return None
        if plan.compiled_text is None:
            plan.compiled_text = plan.text if isinstance(plan.text, Compiled) else self.cache.get(plan.text)
        return _JsonChannel(self, channel, plan.compiled_text, plan.text_source, [])

    def finish_response(self, prepared: _Plan) -> list[Finding]:
        if prepared.unknown_header is None:
            return []
        known = ", ".join(sorted(self._routes)) or "none"
        return [Finding(
            detector=NAME, category="unknown_schema", severity=Severity.medium, score=1.0,
            message=f"header {HEADER} names an unknown schema {_short(prepared.unknown_header, 40)!r} "
                    f"(configured: {known}); the output was not validated against it",
            attrs={"kind": "unknown_schema", "verdict": False},
        )]


class SchemaConfig(DetectorConfig):
    """Settings of the ``schema`` detector (YAML key ``schema``)."""

    detector_class: ClassVar[type[Detector]] = SchemaDetector

    schemas: dict[str, str | dict[str, Any] | bool] = Field(
        default_factory=dict,
        description="NAME -> path of a JSON Schema file (or an inline schema), loaded and compiled at "
                    "start-up; relative paths resolve against the validation context's config_dir.")
    default_schema: str | None = Field(
        None, description="schema (a key of `schemas`) for text outputs of requests without response_format")
    check_response_format: bool = Field(True, description="validate the text channel (response_format, "
                                                         "header, default_schema)")
    check_tool_calls: bool = Field(True, description="validate tool-call names and arguments")
    validate_formats: bool = Field(False, description="enforce `format` (email, date-time, ...) at the end")
    strip_fence: bool = Field(False, description="accept ```json fences: judge the JSON inside, low note")
    skip_prose: bool = Field(False, description="accept text before the first {/[ and after the document")
    allow_trailing_commas: bool = Field(False, description="accept trailing commas (removed before the "
                                                           "final validation), low note")
    show_value_chars: int = Field(20, ge=0, le=200, description="max characters of an offending value "
                                                               "quoted in messages (0 = never)")
    schema_cache_entries: int = Field(256, ge=1, le=100_000, description="compiled per-request schemas kept")
    max_document_chars: int = Field(1_000_000, ge=1, description="longest document kept for the final "
                                                                 "validation; beyond it only streaming "
                                                                 "checks run")

    _loaded: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("schemas")
    @classmethod
    def _check_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not name or not name.replace("-", "_").replace(".", "_").isidentifier():
                raise ValueError(f"schemas: invalid schema name {name!r} (use letters, digits, '_', '-', '.')")
        return v

    @model_validator(mode="after")
    def _load(self, info: ValidationInfo) -> SchemaConfig:
        base = None
        if isinstance(info.context, Mapping) and info.context.get("config_dir"):
            base = FsPath(str(info.context["config_dir"]))
        loaded: dict[str, Any] = {}
        for name, spec in self.schemas.items():
            where = f"schemas.{name}"
            if isinstance(spec, str):
                path = FsPath(spec).expanduser()
                if not path.is_absolute() and base is not None:
                    path = base / path
                try:
                    schema = orjson.loads(path.read_bytes())
                except OSError as e:
                    raise ValueError(f"{where}: cannot read {str(path)!r}: {e.strerror or e}") from None
                except orjson.JSONDecodeError as e:
                    raise ValueError(f"{where}: {str(path)!r} is not valid JSON: {e}") from None
                where = f"{where} ({str(path)!r})"
            else:
                schema = spec
            compiled = compile_schema(schema, self.validate_formats)
            if compiled.error:
                raise ValueError(f"{where}: not a valid JSON Schema: {compiled.error}")
            loaded[name] = schema
        if self.default_schema is not None and self.default_schema not in loaded:
            known = ", ".join(sorted(loaded)) or "none configured"
            raise ValueError(f"default_schema: {self.default_schema!r} is not one of the schemas ({known})")
        self._loaded = loaded
        return self

    @property
    def loaded_schemas(self) -> Mapping[str, Any]:
        return self._loaded


CONFIGS: dict[str, type[DetectorConfig]] = {NAME: SchemaConfig}


# -- one channel ---------------------------------------------------------------------------------

_LEAD, _BODY, _TRAIL, _IDLE, _DONE = range(5)  # phases
_L_WS, _L_TICKS, _L_TAG, _L_PROSE = range(4)  # sub-states of _LEAD


class _JsonChannel(ChannelState):
    """One channel's document: framing (fence, prose), streaming checks, final verdict."""

    def __init__(self, det: SchemaDetector, channel: Channel, compiled: Compiled | None, source: str,
                 roots: list[Node | None], unknown_tool: str | None = None,
                 declared: list[str] | None = None) -> None:
        cfg = det.cfg
        self._cfg = cfg
        self._channel = channel
        self._compiled = compiled
        self._source = source
        self._tool = channel.tool_name if channel.kind == "tool_call" else None
        self._pending: list[Finding] = []
        self._phase = _LEAD
        if unknown_tool is not None:
            self._pending.append(self._unknown_tool(unknown_tool, declared or []))
        nodes = [r for r in roots if r is not None]
        if compiled is not None and compiled.error:
            self._pending.append(self._note("invalid_schema", Severity.low, None,
                                            f"the request's schema does not compile ({compiled.error}); "
                                            "only JSON syntax is checked"))
        elif compiled is not None and compiled.root is not None:
            nodes.append(compiled.root)
        self._checker = SchemaChecker(nodes, cfg.show_value_chars)
        self._parser = JsonStream(self._checker, cfg.allow_trailing_commas)
        self._n = 0  # characters seen
        self._sub = _L_WS
        self._ticks = 0
        self._tick_end = -1
        self._tag = 0
        self._fence_start = -1
        self._fenced = False
        self._fence_closed = False
        self._prose_start = -1
        self._json_start = -1
        self._doc: list[str] = []
        self._doc_len = 0
        self._overflow = False
        self._max_doc = cfg.max_document_chars
        self._comma_noted = False
        self._habits: set[str] = set()
        self._finished = False
        if unknown_tool is not None:
            self._phase = _DONE

    # -- findings ----------------------------------------------------------------------------
    def _attrs(self, kind: str, verdict: bool, **more: Any) -> dict[str, Any]:
        attrs: dict[str, Any] = {"kind": kind, "verdict": verdict, "schema": self._source}
        if self._tool is not None:
            attrs["tool"] = _short(self._tool)
        attrs.update(more)
        return attrs

    def _prefix(self) -> str:
        return f"tool {_short(self._tool)}: " if self._tool is not None else ""

    def _note(self, category: str, severity: Severity, span: tuple[int, int] | None, message: str,
              habit: str = "") -> Finding:
        extra = {"habit": habit} if habit else {}
        return Finding(detector=NAME, category=category, severity=severity, score=1.0,
                       message=self._prefix() + message, span=span, channel=self._channel,
                       attrs=self._attrs(category, False, **extra))

    def _habit(self, out: list[Finding], habit: str, span: tuple[int, int], message: str) -> None:
        if habit not in self._habits:
            self._habits.add(habit)
            out.append(self._note("format", Severity.low, span, message, habit))

    def _unknown_tool(self, name: str, declared: list[str]) -> Finding:
        known = ", ".join(_short(d, 40) for d in declared[:8]) + (", …" if len(declared) > 8 else "")
        return Finding(detector=NAME, category="unknown_tool", severity=Severity.high, score=1.0,
                       message=f"tool call to {_short(name)!r}, a function the request did not declare "
                               f"(declared: {known or 'none'})",
                       span=None, channel=self._channel,
                       attrs={"kind": "unknown_tool", "verdict": True, "schema": "tool", "tool": _short(name),
                              "path": "$"})

    def _verdict(self, out: list[Finding], kind: str, at: int, span: tuple[int, int] | None, path: Path,
                 message: str, habit: str = "", errors: int = 0, reason: str | None = None) -> None:
        """``reason``: the message without any output value it quotes (``attrs["reason"]``,
        what block errors tell the client); default the message itself."""
        self._phase = _DONE
        where = format_path(path)
        extra: dict[str, Any] = {"path": where, "offset": at, "reason": reason or message}
        if habit:
            extra["habit"] = habit
        if errors:
            extra["errors"] = errors
        out.append(Finding(detector=NAME, category=kind, severity=Severity.high, score=1.0,
                           message=f"{self._prefix()}{where}: {message}", span=span, channel=self._channel,
                           evidence=self._evidence(span), attrs=self._attrs(kind, True, **extra)))
        self._doc = []

    def _evidence(self, span: tuple[int, int] | None) -> str:
        if span is None:
            return ""
        s, e = span
        if e <= s + 1 or self._json_start < 0 or s < self._json_start:
            return ""
        text = "".join(self._doc)
        snippet = text[s - self._json_start : min(e, s + 40) - self._json_start]
        return mask(snippet) if snippet.strip() else ""

    def _problem(self, out: list[Finding], p: Problem) -> None:
        kind, habit, message = p.kind, p.habit, p.message
        if not p.path and self._first_letter(p.at):
            # "the answer is {...}" starts like the literal true: call it prose, not a bad literal
            if kind == "syntax" and message.startswith("invalid literal"):
                kind, habit = "format", "prose"
                message = "output starts with text, not JSON (leading prose?)"
            elif kind == "schema" and p.at == self._json_start:
                kind, habit = "format", "prose"
                message = f"output starts with text or a bare literal, not JSON ({message}; leading prose?)"
        reason = self._checker.bare(message) if kind == "schema" else message
        self._verdict(out, kind, p.at, p.span, p.path, message, habit, reason=reason)

    def _first_letter(self, at: int) -> bool:
        """The document starts with t/f/n and ``at`` is within its first word."""
        return bool(self._doc) and self._doc[0][:1] in "tfn" and at - self._json_start < 5

    # -- feeding -------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Finding]:
        base = self._n
        n = len(text)
        self._n = base + n
        if self._phase == _BODY and not self._pending:  # the hot path: inside the document
            parser = self._parser
            j = parser.feed(text, 0, base)
            if (j == n and parser.problem is None and parser.end < 0 and self._doc_len + n <= self._max_doc
                    and (not parser.trailing_commas or self._comma_noted)):
                self._doc.append(text)
                self._doc_len += n
                return []
            out: list[Finding] = []
            i = self._settle_body(text, 0, j, out)
        else:
            out = self._pending
            self._pending = []
            i = 0
        while i < n:
            phase = self._phase
            if phase == _BODY:
                i = self._settle_body(text, i, self._parser.feed(text, i, base), out)
            elif phase == _LEAD:
                i = self._lead(text, i, base, out)
            elif phase == _TRAIL:
                i = self._trail(text, i, base, out)
            else:
                break
        return out

    def _settle_body(self, text: str, i: int, j: int, out: list[Finding]) -> int:
        """After the parser consumed ``text[i:j]``: keep it, report, move to the next phase."""
        parser = self._parser
        if parser.problem is not None:
            self._keep(text, i, len(text), out)
            self._problem(out, parser.problem)
            return len(text)
        self._keep(text, i, j, out)
        if parser.trailing_commas and not self._comma_noted:
            self._comma_noted = True
            c = parser.trailing_commas[0]
            self._habit(out, "trailing_comma", (c, c + 1), "trailing comma in the JSON (accepted: "
                        "allow_trailing_commas)")
        if parser.end >= 0:
            self._phase = _TRAIL
        return j

    def _keep(self, text: str, i: int, j: int, out: list[Finding]) -> None:
        if self._overflow or j <= i:
            return
        if self._doc_len + (j - i) > self._cfg.max_document_chars:
            self._overflow = True
            self._doc = []
            at = self._json_start + self._cfg.max_document_chars
            out.append(self._note("too_large", Severity.low, (at, at),
                                  f"document longer than max_document_chars ({self._cfg.max_document_chars});"
                                  " only the streaming checks apply"))
            return
        self._doc.append(text[i:j])
        self._doc_len += j - i

    def _begin(self, i: int, base: int, out: list[Finding]) -> None:
        self._json_start = base + i
        self._phase = _BODY
        if self._prose_start >= 0:
            self._habit(out, "prose", (self._prose_start, base + i),
                        "text before the JSON document (accepted: skip_prose)")

    def _fence_opened(self, at: int, out: list[Finding]) -> None:
        self._fenced = True
        self._habit(out, "fence", (self._fence_start, at),
                    "JSON wrapped in a Markdown code fence (accepted: strip_fence)")

    def _lead(self, text: str, i: int, base: int, out: list[Finding]) -> int:
        """Before the document: whitespace, a code fence opener, prose."""
        n = len(text)
        cfg = self._cfg
        while i < n:
            sub = self._sub
            if sub == _L_WS:
                i = _WS_RUN(text, i).end()
                if i == n:
                    return n
                c = text[i]
                if c in "{[" or (c in _JSON_START and not cfg.skip_prose):
                    self._begin(i, base, out)
                    return i
                if c == "`" and not self._fenced:
                    if not cfg.strip_fence:
                        self._verdict(out, "format", base + i, (base + i, base + i + 1), (),
                                      "output starts with '`': JSON wrapped in a Markdown code fence "
                                      "(strip_fence: true accepts it)", habit="fence")
                        return n
                    self._sub, self._ticks, self._fence_start = _L_TICKS, 0, base + i
                    continue
                if cfg.skip_prose and not self._fenced:
                    self._sub, self._prose_start = _L_PROSE, base + i
                    continue
                habit = "prose" if not self._fenced else ""
                msg = ("output starts with text, not JSON (leading prose?)" if not self._fenced
                       else f"expected a JSON value inside the code fence, got {c!r}")
                self._verdict(out, "format" if habit else "syntax", base + i, (base + i, base + i + 1), (),
                              msg, habit)
                return n
            if sub == _L_TICKS:
                c = text[i]
                if c == "`":
                    self._ticks += 1
                    i += 1
                    continue
                if self._ticks >= 3:
                    self._sub, self._tag = _L_TAG, 0
                    continue
                if cfg.skip_prose:
                    self._sub, self._prose_start = _L_PROSE, self._fence_start
                    continue
                self._verdict(out, "format", base + i, (self._fence_start, base + i + 1), (),
                              "malformed Markdown code fence (expected ``` and a language tag)", "fence")
                return n
            if sub == _L_TAG:
                c = text[i]
                if c == "\n":
                    self._fence_opened(base + i, out)
                    self._sub = _L_WS
                    i += 1
                    continue
                if c in "{[":
                    self._fence_opened(base + i, out)
                    self._sub = _L_WS
                    self._begin(i, base, out)
                    return i
                if (c in _TAG_CHARS and self._tag < _MAX_TAG) or c in " \t\r":
                    self._tag += 1
                    i += 1
                    continue
                if cfg.skip_prose:
                    self._sub, self._prose_start = _L_PROSE, self._fence_start
                    continue
                self._verdict(out, "format", base + i, (self._fence_start, base + i + 1), (),
                              "malformed Markdown code fence opener", "fence")
                return n
            # _L_PROSE: look for the document ({ or [) or a code fence
            m = _PROSE_STOP(text, i)
            if m is None:
                return n
            j = m.start()
            if text[j] != "`":
                self._begin(j, base, out)
                return j
            at = base + j
            if at == self._tick_end:
                self._ticks += 1
            else:
                self._ticks, self._fence_start = 1, at
            self._tick_end = at + 1
            i = j + 1
            if self._ticks == 3:
                if not cfg.strip_fence:
                    self._verdict(out, "format", at, (self._fence_start, at + 1), (),
                                  "JSON wrapped in a Markdown code fence (strip_fence: true accepts it)", "fence")
                    return n
                self._sub = _L_TICKS
        return n

    def _trail(self, text: str, i: int, base: int, out: list[Finding]) -> int:
        """After the document: whitespace, the closing fence, nothing else (unless skip_prose)."""
        n = len(text)
        while i < n:
            i = _WS_RUN(text, i).end()
            if i == n:
                return n
            c = text[i]
            at = base + i
            if c == "`" and self._fenced and (not self._fence_closed or at == self._tick_end):
                self._ticks = self._ticks + 1 if at == self._tick_end else 1
                self._tick_end = at + 1
                if self._ticks >= 3:
                    self._fence_closed = True
                i += 1
                continue
            if self._cfg.skip_prose:
                self._habit(out, "prose", (at, at + 1), "text after the JSON document (accepted: skip_prose)")
                self._phase = _IDLE
                return n
            if c in '{["':
                msg = "a second JSON value after the end of the document"
            elif self._fenced and not self._fence_closed:
                msg = "unexpected text after the JSON document (expected the closing ``` fence)"
            else:
                msg = "unexpected text after the end of the JSON document"
            self._verdict(out, "syntax", at, (at, at + 1), (), msg)
            return n
        return n

    # -- the end ---------------------------------------------------------------------------------
    def finish(self, end: StreamEnd) -> list[Finding]:
        if self._finished:
            return []
        self._finished = True
        out: list[Finding] = self._pending
        self._pending = []
        phase = self._phase
        if phase == _DONE:
            return out
        cut = end.truncated or end.finish_reason in _CUT_OFF
        at = self._n
        reason = end.finish_reason or ("upstream broke off" if end.truncated else "none")
        if phase == _LEAD:
            blank = self._sub == _L_WS and not self._fenced and self._prose_start < 0
            if blank and self._tool is not None and not cut:
                self._final(out, "{}", {})  # some providers send "" for a call without arguments
            elif blank and end.finish_reason in _NO_TEXT_OK:
                pass
            elif cut:
                self._verdict(out, "truncated", at, (at, at), (),
                              f"output was cut off before any JSON (finish_reason={reason})")
            elif blank:
                self._verdict(out, "syntax", at, (at, at), (), "empty output: expected a JSON document")
            else:
                self._verdict(out, "syntax", at, (at, at), (), "no JSON document found in the output")
            return out
        if phase == _BODY:
            p = self._parser.finish(cut, at)
            if p is not None:
                if p.kind == "truncated":
                    p = Problem(p.kind, p.at, p.span, p.path, f"{p.message}; finish_reason={reason}")
                self._problem(out, p)
                return out
        if self._overflow:
            return out
        doc = "".join(self._doc)[: self._parser.end - self._json_start]
        self._final(out, doc, None)
        return out

    def _final(self, out: list[Finding], doc: str, parsed: Any) -> None:
        """The last word: orjson parse and jsonschema-rs validation of the whole document."""
        compiled = self._compiled
        start = max(self._json_start, 0)
        if parsed is None:
            text = doc
            if self._parser.trailing_commas:
                cut = sorted(c - start for c in self._parser.trailing_commas)
                pieces, prev = [], 0
                for c in cut:
                    pieces.append(doc[prev:c])
                    prev = c + 1
                pieces.append(doc[prev:])
                text = "".join(pieces)
            try:
                parsed = orjson.loads(text)
            except orjson.JSONDecodeError as e:  # not expected: JsonStream accepts exactly orjson's syntax
                at = start + min(max(e.pos, 0), len(doc))
                self._verdict(out, "syntax", at, (at, at + 1), (), f"invalid JSON: {e.msg}")
                return
        if compiled is None or compiled.validator is None or compiled.validator.is_valid(parsed):
            return  # is_valid short-circuits: about half the cost of collecting errors
        errors = compiled.validator.iter_errors(parsed)
        first = next(errors, None)
        if first is None:
            return
        count = 1 + sum(1 for _ in zip(range(_MAX_ERRORS_COUNTED - 1), errors, strict=False))
        path = tuple(first.instance_path)
        span: tuple[int, int] | None = None
        if self._json_start >= 0:
            span = locate(doc, path, start, self._cfg.allow_trailing_commas) or (start, start + len(doc))
        self._verdict(out, "schema", self._n, span, path, describe(first, self._cfg.show_value_chars),
                      errors=count, reason=describe(first, 0))


def describe(err: Any, show: int) -> str:
    """A developer-facing sentence for a jsonschema-rs error, quoting at most ``show`` chars of
    the offending value (user data)."""
    kind = type(err.kind).__name__
    d = err.kind.as_dict()
    inst = err.instance
    got = _got(inst, show)
    if kind == "Type":
        types = d.get("types") or [d.get("type")]
        return f"expected {' or '.join(str(t) for t in types if t)}, got {got}"
    if kind == "Required":
        return f"missing required property {preview(d.get('property'), 40)}"
    if kind in ("AdditionalProperties", "UnevaluatedProperties"):
        names = d.get("unexpected") or []
        listed = ", ".join(preview(x, 40) for x in names[:3]) + (" …" if len(names) > 3 else "")
        word = "property" if len(names) == 1 else "properties"
        rule = "additionalProperties" if kind == "AdditionalProperties" else "unevaluatedProperties"
        return f"unexpected {word} {listed} ({rule} is false)"
    if kind == "Enum":
        opts = d.get("options") or []
        shown = ", ".join(preview(o, 30) for o in opts[:6]) + (", …" if len(opts) > 6 else "")
        return f"expected one of {shown}, got {got}"
    if kind == "Constant":
        return f"expected {preview(d.get('expected_value'), 40)}, got {got}"
    if kind == "FalseSchema":
        return "no value is allowed here (the schema is false)"
    if show <= 0:  # jsonschema-rs's own message quotes the value
        return f"fails {kind[:1].lower()}{kind[1:]} (got {got})"
    return f"{err.message} (got {got})"


def _got(value: Any, show: int) -> str:
    k = kind_of(value)
    names = ("object", "array", "string", "number", "boolean", "boolean", "null")
    name = "integer" if isinstance(value, int) and not isinstance(value, bool) else names[k]
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if show <= 0:
        return f"a {name}"
    return f"{name} {preview(value, show)}"
