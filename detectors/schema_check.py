"""Incremental JSON Schema checks: the part of a schema that a document prefix can violate.

Why a subset: the final verdict belongs to jsonschema-rs on the whole document, but a stream
should fail as soon as its prefix proves it invalid. ``SchemaTree`` compiles, once per schema,
the keywords whose violation a prefix can prove — ``type``, ``enum``/``const``, ``properties``,
``additionalProperties``, ``required`` (at ``}``), ``items``/``prefixItems``/``additionalItems``,
``minItems``/``maxItems``, ``minLength``/``maxLength``, ``minimum``/``maximum`` and the exclusive
forms — plus local ``$ref`` (``#``, ``#/$defs/...``), ``allOf`` (every part applies) and
``anyOf``/``oneOf`` narrowed by the value's kind (when only one branch admits a ``{``, that
branch must hold). Everything else (``not``, ``if``/``then``, ``patternProperties`` values,
``unevaluated*``, ``dependent*``, ``contains``, ``uniqueItems``, ``pattern``, ``format``,
``multipleOf``, remote refs) is simply not evaluated: schema keywords are conjunctive, so
checking fewer of them can only make an early verdict later, never wrong. The one keyword that
*relaxes* another, ``patternProperties`` (keys it matches are not "additional"), disables the
``additionalProperties`` check of its schema object.

Sound by construction and by test: every document ``SchemaChecker`` rejects, jsonschema-rs
rejects too (``tests/unit/test_schema.py`` checks it with hypothesis). Numbers are compared as
orjson parses them, and only within +-2**53, where float and integer comparisons agree.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from detectors.json_stream import ARR, FALSE, KIND_NAMES, NULL, NUM, OBJ, STR, TRUE, Verdict, decode_string
from detectors.json_stream import parse_number as _parse_number

ALL_KINDS = frozenset(range(7))
_TYPE_KINDS = {
    "object": frozenset((OBJ,)), "array": frozenset((ARR,)), "string": frozenset((STR,)),
    "number": frozenset((NUM,)), "integer": frozenset((NUM,)), "boolean": frozenset((TRUE, FALSE)),
    "null": frozenset((NULL,)),
}
_EXACT = 2**53  # beyond this, float and integer comparisons may disagree between parsers
_LITERAL_VALUES: dict[int, Any] = {TRUE: True, FALSE: False, NULL: None}
# Keywords that only annotate: a ``$ref`` with nothing else than these is a plain reference.
_ANNOTATIONS = frozenset(("$ref", "$comment", "title", "description", "default", "examples",
                          "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "$schema"))
# Keywords that re-scope references; with any of them below the root we do not resolve refs.
_RESCOPE = ("$id", "id", "$anchor", "$dynamicAnchor", "$recursiveAnchor")


def kind_of(value: Any) -> int:
    if isinstance(value, str):
        return STR
    if value is True:
        return TRUE
    if value is False:
        return FALSE
    if value is None:
        return NULL
    if isinstance(value, int | float):
        return NUM
    if isinstance(value, Mapping):
        return OBJ
    return ARR


def kinds_label(kinds: frozenset[int] | set[int], int_only: bool = False) -> str:
    names: list[str] = []
    for k in (OBJ, ARR, STR, NUM, TRUE, NULL, FALSE):
        if k in kinds:
            name = "integer" if k == NUM and int_only else KIND_NAMES[k]
            if name not in names:
                names.append(name)
    if not names:
        return "no value at all"
    return " or ".join(names)


def preview(value: Any, limit: int) -> str:
    """A short rendering of a (user-supplied) value for messages: at most ``limit`` chars."""
    if limit <= 0:
        return ""
    text = orjson.dumps(value).decode() if not isinstance(value, float) else repr(value)
    if len(text) > limit:
        text = text[: max(1, limit - 1)] + "…"
    return text


class _Enum:
    """One ``enum`` (or ``const``) list, split by kind for JSON equality (1 == 1.0, true != 1)."""

    __slots__ = ("exact", "kinds", "label", "nums", "others", "strs")

    def __init__(self, options: Sequence[Any], label: str) -> None:
        self.strs = frozenset(o for o in options if isinstance(o, str))
        self.nums = tuple(o for o in options if isinstance(o, int | float) and not isinstance(o, bool))
        self.others = [o for o in options if o is None or isinstance(o, bool)]
        self.kinds = frozenset(kind_of(o) for o in options)
        self.exact = all(abs(o) <= _EXACT for o in self.nums)
        self.label = label

    def rejects(self, kind: int, value: Any) -> bool:
        """True only when ``value`` (of ``kind``) is certainly not a member."""
        if kind == STR:
            return value not in self.strs
        if kind == NUM:
            if not self.exact or abs(value) > _EXACT:
                return False
            return not any(o == value for o in self.nums)
        return not any(o is value for o in self.others)


def _enum_label(options: Sequence[Any], const: bool) -> str:
    shown = ", ".join(preview(o, 30) for o in options[:6])
    if const:
        return shown
    more = f", … ({len(options)} options)" if len(options) > 6 else ""
    return f"one of {shown}{more}"


class Node:
    """The incrementally checkable part of one schema object. Immutable once built."""

    __slots__ = ("additional", "alts", "enums", "false", "int_only", "kinds", "label", "listed", "max_items",
                 "max_len", "maximum", "min_items", "min_len", "minimum", "open_props", "parts", "prefix",
                 "props", "reach", "required", "rest", "trivial", "xmaximum", "xminimum")

    def __init__(self) -> None:
        self.kinds: frozenset[int] | None = None  # from type / enum / const / false; None = any
        self.reach: frozenset[int] = ALL_KINDS  # kinds this node can admit, parts and alts included
        self.int_only = False
        self.label = ""
        self.enums: tuple[_Enum, ...] = ()
        self.props: dict[str, Node] | None = None
        self.additional: Node | None = None
        self.open_props = False  # patternProperties present: unknown keys are not judged
        self.required: tuple[str, ...] = ()
        self.prefix: tuple[Node, ...] = ()
        self.rest: Node | None = None
        self.min_items: int | None = None
        self.max_items: int | None = None
        self.min_len: int | None = None
        self.max_len: int | None = None
        self.minimum: float | None = None
        self.maximum: float | None = None
        self.xminimum: float | None = None
        self.xmaximum: float | None = None
        self.parts: tuple[Node, ...] = ()  # allOf / $ref beside other keywords: all must hold
        self.alts: tuple[tuple[Node, ...], ...] = ()  # anyOf / oneOf groups: one must hold
        self.false = False
        self.listed = False  # has checks beyond kinds (kept in the checker's active list)
        self.trivial = True  # nothing at all to check


ANY = Node()
NEVER = Node()
NEVER.kinds = frozenset()
NEVER.reach = frozenset()
NEVER.false = True
NEVER.trivial = False
NEVER.label = "no value at all (the schema is false)"


def _num(v: Any) -> float | None:
    if isinstance(v, int | float) and not isinstance(v, bool) and abs(v) <= _EXACT:
        return v
    return None


def _count(v: Any) -> int | None:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    if isinstance(v, float) and v.is_integer() and v >= 0:
        return int(v)
    return None


class SchemaTree:
    """Compiles a schema (a parsed JSON object) into ``Node``s, once; then read-only, so one
    tree is shared by every request and thread that uses the schema."""

    def __init__(self, schema: Any) -> None:
        self.schema = schema
        dialect = schema.get("$schema", "") if isinstance(schema, Mapping) else ""
        dialect = dialect if isinstance(dialect, str) else ""
        legacy = any(d in dialect for d in ("draft-04", "draft-06", "draft-07", "draft-03"))
        self.ref_overrides = legacy  # draft <= 7: siblings of $ref are ignored
        self.items_array = legacy or "2019-09" in dialect  # items: [...] + additionalItems
        self.prefix_items = not self.items_array
        self.refs_ok = not _rescopes(schema, root=True)
        self._memo: dict[int, Node] = {}
        self._chain: set[int] = set()
        self.root = self.node(schema)
        for nd in self._memo.values():
            _settle(nd)
        _settle(self.root)
        self._memo.clear()

    def resolve(self, ref: str) -> Any:
        """The target of a local reference, or ``None`` when it is not one we can follow."""
        if not self.refs_ok or not ref.startswith("#"):
            return None
        frag = urllib.parse.unquote(ref[1:])
        if not frag:
            return self.schema
        if not frag.startswith("/"):
            return None  # an anchor name
        cur: Any = self.schema
        for token in frag[1:].split("/"):
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(cur, Mapping) and token in cur:
                cur = cur[token]
            elif isinstance(cur, list) and token.isdigit() and int(token) < len(cur):
                cur = cur[int(token)]
            else:
                return None
        return cur

    def node(self, schema: Any) -> Node:
        if schema is True:
            return ANY
        if schema is False:
            return NEVER
        if not isinstance(schema, Mapping) or not schema:
            return ANY
        key = id(schema)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        ref = schema.get("$ref")
        target = self.resolve(ref) if isinstance(ref, str) else None
        if isinstance(ref, str) and (self.ref_overrides or not (set(schema) - _ANNOTATIONS)):
            # the schema object *is* its reference (draft <= 7, or nothing but annotations)
            if target is None or key in self._chain:
                return ANY
            self._chain.add(key)
            try:
                resolved = self.node(target)
            finally:
                self._chain.discard(key)
            self._memo[key] = resolved
            return resolved
        nd = Node()
        self._memo[key] = nd
        self._fill(nd, schema, target)
        return nd

    def _fill(self, nd: Node, s: Mapping[str, Any], ref_target: Any) -> None:
        parts: list[Node] = []
        if ref_target is not None:
            parts.append(self.node(ref_target))
        t = s.get("type")
        names = [t] if isinstance(t, str) else [x for x in t if isinstance(x, str)] if isinstance(t, list) else []
        if names and all(x in _TYPE_KINDS for x in names):
            nd.kinds = frozenset().union(*(_TYPE_KINDS[x] for x in names))
            nd.int_only = "integer" in names and "number" not in names
            nd.label = kinds_label(nd.kinds, nd.int_only)
        enums: list[_Enum] = []
        if isinstance(s.get("enum"), list):
            enums.append(_Enum(s["enum"], _enum_label(s["enum"], const=False)))
        if "const" in s:
            enums.append(_Enum([s["const"]], _enum_label([s["const"]], const=True)))
        for e in enums:
            nd.kinds = e.kinds if nd.kinds is None else nd.kinds & e.kinds
        if enums:
            nd.label = enums[-1].label  # the enum / const says more than the type
        nd.enums = tuple(enums)
        if nd.kinds is not None and not nd.label:
            nd.label = kinds_label(nd.kinds, nd.int_only)
        props = s.get("properties")
        if isinstance(props, Mapping):
            nd.props = {k: self.node(v) for k, v in props.items()}
        if "additionalProperties" in s:
            nd.additional = self.node(s["additionalProperties"])
        nd.open_props = bool(s.get("patternProperties"))
        req = s.get("required")
        if isinstance(req, list):
            nd.required = tuple(dict.fromkeys(r for r in req if isinstance(r, str)))
        items = s.get("items")
        if isinstance(items, list):
            if self.items_array:
                nd.prefix = tuple(self.node(x) for x in items)
                if "additionalItems" in s:
                    nd.rest = self.node(s["additionalItems"])
        elif items is not None:
            nd.rest = self.node(items)
        if self.prefix_items and isinstance(s.get("prefixItems"), list):
            nd.prefix = tuple(self.node(x) for x in s["prefixItems"])
        nd.min_items, nd.max_items = _count(s.get("minItems")), _count(s.get("maxItems"))
        nd.min_len, nd.max_len = _count(s.get("minLength")), _count(s.get("maxLength"))
        nd.minimum, nd.maximum = _num(s.get("minimum")), _num(s.get("maximum"))
        nd.xminimum, nd.xmaximum = _num(s.get("exclusiveMinimum")), _num(s.get("exclusiveMaximum"))
        for sub in s.get("allOf") or ():
            parts.append(self.node(sub))
        alts = []
        for kw in ("anyOf", "oneOf"):
            group = s.get(kw)
            if isinstance(group, list) and group:
                alts.append(tuple(self.node(x) for x in group))
        nd.parts = tuple(p for p in parts if p is not ANY)
        nd.alts = tuple(alts)
        nd.listed = bool(
            nd.enums or nd.int_only or nd.props is not None or nd.additional is not None or nd.required
            or nd.prefix or nd.rest is not None or nd.min_items is not None or nd.max_items is not None
            or nd.min_len is not None or nd.max_len is not None or nd.minimum is not None
            or nd.maximum is not None or nd.xminimum is not None or nd.xmaximum is not None
        )
        nd.trivial = not (nd.listed or nd.kinds is not None or nd.parts or nd.alts)


def _rescopes(schema: Any, root: bool) -> bool:
    """True when a subschema re-scopes references ($id, anchors): refs then stay unresolved."""
    stack: list[tuple[Any, bool]] = [(schema, root)]
    while stack:
        cur, is_root = stack.pop()
        if isinstance(cur, Mapping):
            for kw in _RESCOPE:
                if kw in cur and not (is_root and kw in ("$id", "id")):
                    if kw == "id" and not isinstance(cur.get(kw), str):
                        continue
                    return True
            stack.extend((v, False) for v in cur.values())
        elif isinstance(cur, list):
            stack.extend((v, False) for v in cur)
    return False


def _settle(nd: Node, guard: set[int] | None = None) -> frozenset[int]:
    """Compute ``reach`` (an over-approximation of the kinds a node admits), cycles as ALL."""
    guard = set() if guard is None else guard
    if id(nd) in guard:
        return ALL_KINDS
    if nd is ANY or nd is NEVER:
        return nd.reach
    guard.add(id(nd))
    r = nd.kinds if nd.kinds is not None else ALL_KINDS
    for p in nd.parts:
        r = r & _settle(p, guard)
    for g in nd.alts:
        u: frozenset[int] = frozenset()
        for b in g:
            u = u | _settle(b, guard)
        r = r & u
    guard.discard(id(nd))
    nd.reach = r
    return r


class SchemaChecker:
    """Per-document checker fed by ``JsonStream`` events; one per channel (holds state)."""

    __slots__ = ("_cur", "_next", "_show", "_stack", "quoted")

    def __init__(self, roots: Sequence[Node], show_value_chars: int = 20) -> None:
        self._next: list[Node] = [r for r in roots if not r.trivial]
        self._stack: list[list[Any]] = []  # per container: [active nodes, next index or -1]
        self._cur: list[Node] = []
        self._show = show_value_chars
        # (with the value, without it) of the offending value the last verdict message quotes:
        # a verdict stops the document, so it is the one in the message; ``bare`` removes it
        self.quoted: tuple[str, str] | None = None

    def _got(self, kind: int, value: Any = None, has_value: bool = False) -> str:
        name = "boolean" if kind in (TRUE, FALSE) else KIND_NAMES[kind]
        if kind in (TRUE, FALSE, NULL):
            return "null" if kind == NULL else f"boolean {'true' if kind == TRUE else 'false'}"
        if has_value and self._show > 0:
            shown = f"{name} {preview(value, self._show)}"
            self.quoted = (shown, f"a {name}")
            return shown
        return "an object" if kind == OBJ else "an array" if kind == ARR else f"a {name}"

    def bare(self, message: str) -> str:
        """``message`` without the output value it quotes: for errors that go back to the
        client, which must learn what was wrong but never see the offending text itself."""
        if self.quoted is None:
            return message
        shown, plain = self.quoted
        return message.replace(shown, plain, 1)

    def value(self, kind: int, start: int) -> Verdict | None:
        stack = self._stack
        if stack and stack[-1][1] >= 0:
            top = stack[-1]
            i = top[1]
            top[1] = i + 1
            nodes: list[Node] = []
            for nd in top[0]:
                if nd.max_items is not None and i >= nd.max_items:
                    return (f"too many items: at most {nd.max_items} allowed (maxItems)", start, start + 1)
                c = nd.prefix[i] if i < len(nd.prefix) else nd.rest
                if c is None or c.trivial:
                    continue
                if c.false:
                    return (f"unexpected item at index {i}: the array allows at most {len(nd.prefix)} items",
                            start, start + 1)
                nodes.append(c)
        else:
            nodes = self._next
        if nodes:
            nodes, why = _admit(nodes, kind)
            if why is not None:
                return (f"expected {why}, got {self._got(kind)}", start, start + 1)
            if nodes and kind >= TRUE:
                v = _LITERAL_VALUES[kind]
                for nd in nodes:
                    for e in nd.enums:
                        if e.rejects(kind, v):
                            return (f"expected {e.label}, got {self._got(kind)}", start, start + 1)
        if kind <= ARR:
            stack.append([nodes, 0 if kind == ARR else -1])
        elif kind <= NUM:
            self._cur = nodes
        return None

    def key(self, name: str, start: int, end: int) -> Verdict | None:
        nodes = self._stack[-1][0]
        if not nodes:
            self._next = nodes
            return None
        nxt: list[Node] = []
        for nd in nodes:
            c = nd.props.get(name) if nd.props is not None else None
            if c is None:
                if nd.open_props or nd.additional is None:
                    continue
                c = nd.additional
                if c.false:
                    return (f"unexpected property {preview(name, 40)} (additionalProperties is false)",
                            start, end)
            elif c.false:
                return (f"property {preview(name, 40)} is not allowed (its schema is false)", start, end)
            if not c.trivial:
                nxt.append(c)
        self._next = nxt
        return None

    def scalar(self, kind: int, raw: str, start: int, end: int) -> Verdict | None:
        nodes = self._cur
        if not nodes:
            return None
        self._cur = []
        if kind == STR:
            s = decode_string(raw)
            for nd in nodes:
                if nd.max_len is not None and len(s) > nd.max_len:
                    return (f"string too long: {len(s)} characters, at most {nd.max_len} allowed (maxLength)",
                            start, end)
                if nd.min_len is not None and len(s) < nd.min_len:
                    return (f"string too short: {len(s)} characters, at least {nd.min_len} required "
                            "(minLength)", start, end)
                for e in nd.enums:
                    if e.rejects(STR, s):
                        return (f"expected {e.label}, got {self._got(STR, s, True)}", start, end)
            return None
        v = _parse_number(raw)
        exact = abs(v) <= _EXACT
        for nd in nodes:
            if nd.int_only and isinstance(v, float) and not v.is_integer():
                return (f"expected integer, got {self._got(NUM, v, True)}", start, end)
            if exact:
                if nd.minimum is not None and v < nd.minimum:
                    return (f"{self._got(NUM, v, True)} is less than the minimum {nd.minimum}", start, end)
                if nd.maximum is not None and v > nd.maximum:
                    return (f"{self._got(NUM, v, True)} is greater than the maximum {nd.maximum}", start, end)
                if nd.xminimum is not None and v <= nd.xminimum:
                    return (f"{self._got(NUM, v, True)} must be greater than {nd.xminimum} "
                            "(exclusiveMinimum)", start, end)
                if nd.xmaximum is not None and v >= nd.xmaximum:
                    return (f"{self._got(NUM, v, True)} must be less than {nd.xmaximum} (exclusiveMaximum)",
                            start, end)
            for e in nd.enums:
                if e.rejects(NUM, v):
                    return (f"expected {e.label}, got {self._got(NUM, v, True)}", start, end)
        return None

    def close(self, kind: int, at: int, keys: set[str] | None, count: int) -> Verdict | None:
        nodes = self._stack.pop()[0]
        for nd in nodes:
            if kind == OBJ:
                missing = [r for r in nd.required if keys is None or r not in keys]
                if missing:
                    names = ", ".join(preview(m, 40) for m in missing[:3])
                    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
                    word = "property" if len(missing) == 1 else "properties"
                    return (f"missing required {word} {names}{more}", at, at + 1)
            elif nd.min_items is not None and count < nd.min_items:
                return (f"too few items: {count}, at least {nd.min_items} required (minItems)", at, at + 1)
        return None


def _admit(nodes: list[Node], kind: int) -> tuple[list[Node], str | None]:
    """The nodes that apply to a value starting with ``kind``: parts expanded, alternatives
    narrowed to the only branch that admits the kind. Returns (nodes, why-not) ."""
    if len(nodes) == 1:
        nd = nodes[0]
        if not nd.parts and not nd.alts:
            if nd.kinds is not None and kind not in nd.kinds:
                return nodes, nd.label
            return (nodes if nd.listed else []), None
    out: list[Node] = []
    todo = list(nodes)
    seen: set[int] = set()
    while todo:
        nd = todo.pop()
        if id(nd) in seen:
            continue
        seen.add(id(nd))
        if nd.kinds is not None and kind not in nd.kinds:
            return out, nd.label
        if nd.listed:
            out.append(nd)
        todo.extend(nd.parts)
        for group in nd.alts:
            cands = [b for b in group if kind in b.reach]
            if not cands:
                u: frozenset[int] = frozenset()
                for b in group:
                    u = u | b.reach
                return out, kinds_label(u)
            if len(cands) == 1:
                todo.append(cands[0])
    return out, None
