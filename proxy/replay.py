"""``gapwatch replay``: run a policy's detectors over recorded exchanges, with no upstream.

The same ``Policy`` and ``ResponsePipeline`` objects that judge live traffic judge the rows,
so a figure from replay means what the live metric means. Input rows (JSONL, one per line):

- capture rows (``proxy.capture``; also what ``gapwatch eval`` writes): request body, output
  text per channel, tool names, finish reasons, and the findings the live proxy recorded;
- plain OpenAI pairs ``{"request": {...}, "response": {...}}``: the response is a whole
  non-streaming body (chat completion, text completion or Responses object) or a list of
  stream chunks / events. Optional ``id``, ``route``, ``model``, ``tenant``, ``policy``.

Either kind may carry labels ``expected: {KEY: bool}``. A KEY is ``detector``,
``detector:category``, either with ``>=severity`` (``injection:exfiltration>=high``); it is
predicted true when the replayed findings include one that matches. Labelled rows give
precision, recall and F1 per key and a list of disagreements.

Which policy judges a row: ``--policy NAME``; else the policy the capture row names when the
config has it; else the config's routing for the row's model (and tenant); else ``default``.
Without ``--config`` the zero-config default policy is used.

When a row carries the live findings (capture rows), replay compares them finding by finding
(detector, category, severity, channel, span, evidence, action): a ``full`` capture replayed
with the same config and detector versions reproduces them exactly, and a difference shows
that a detector changed. Rows without output text (``content: none``, upstream errors) are
skipped and counted.

    gapwatch replay FILE.jsonl [--config FILE] [--policy NAME] [--json OUT] [--html OUT]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from detectors.base import Channel, Severity, StreamEnd
from detectors.canary import MemoryCanaryRegistry
from detectors.cross_tenant import MemoryFingerprintIndex
from proxy import deltas
from proxy.capture import finding_dicts, jsonable
from proxy.config import ConfigError, LoadedConfig, load, load_dict, zero_config
from proxy.errors import ProxyError
from proxy.exchange import Exchange, request_context
from proxy.pipeline import Flow, Policy, ResponsePipeline
from proxy.routing import Router

ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses"}
_SEVERITIES = {s.name: s for s in Severity}


# --------------------------------------------------------------------------------------------
# rows -> cases


@dataclass
class Case:
    """One recorded exchange, normalised from either input format."""

    id: str
    index: int
    source: str  # capture | pair
    endpoint: str
    body: dict[str, Any]
    model: str
    route: str | None = None
    tenant: str | None = None
    policy: str | None = None
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    canaries: tuple[str, ...] = ()
    pieces: list[tuple[Channel, str]] = field(default_factory=list)
    logprobs: list[tuple[Channel, list[tuple[str, float]]]] = field(default_factory=list)
    finished: list[tuple[int, str]] = field(default_factory=list)
    truncated: bool = False
    attempts: int = 1
    recorded: list[dict[str, Any]] | None = None
    expected: dict[str, bool] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    latency_ms: float | None = None
    content: str = "full"
    skip: str | None = None  # why the row cannot be replayed

    @property
    def path(self) -> str:
        return ENDPOINT_PATHS.get(self.endpoint, "/v1/chat/completions")


def channel_from_key(key: str, tool_names: Mapping[str, str]) -> Channel:
    """``0:text`` / ``0:tool:2`` (``Channel.key``) back to a Channel."""
    parts = key.split(":")
    choice = int(parts[0]) if parts[0].isdigit() else 0
    if len(parts) >= 3 and parts[1] == "tool":
        idx = int(parts[2]) if parts[2].isdigit() else 0
        return Channel(choice=choice, kind="tool_call", tool_index=idx, tool_name=tool_names.get(key))
    return Channel(choice=choice)


def endpoint_of(request: Mapping[str, Any], response: Any = None) -> str:
    if "messages" in request:
        return "chat"
    if "input" in request or "instructions" in request:
        return "responses"
    if "prompt" in request:
        return "completions"
    obj = response if isinstance(response, dict) else (response[0] if isinstance(response, list) and response
                                                       and isinstance(response[0], dict) else {})
    kind = str(obj.get("object") or obj.get("type") or "")
    if kind.startswith("response"):
        return "responses"
    if kind.startswith("text_completion"):
        return "completions"
    return "chat"


def _expected(row: Mapping[str, Any]) -> dict[str, bool]:
    exp = row.get("expected")
    if not isinstance(exp, dict):
        return {}
    return {str(k): bool(v) for k, v in exp.items()}


def _finish_per_choice(reasons: Sequence[str], choices: Iterable[int]) -> list[tuple[int, str]]:
    ids = sorted(set(choices)) or [0]
    if len(reasons) == len(ids):
        return list(zip(ids, reasons, strict=True))
    if reasons:
        return [(i, reasons[0]) for i in ids]
    return []


def case_from_capture(row: Mapping[str, Any], index: int) -> Case:
    body = row.get("request") if isinstance(row.get("request"), dict) else {}
    tool_names = row.get("tool_names") or {}
    outputs = row.get("output") or {}
    pieces = [(channel_from_key(k, tool_names), v) for k, v in outputs.items() if isinstance(v, str)]
    case = Case(
        id=str(row.get("request_id") or row.get("id") or f"row{index}"), index=index, source="capture",
        endpoint=str(row.get("endpoint") or endpoint_of(body)), body=body,
        model=str(row.get("model") or body.get("model") or ""), route=row.get("route"), tenant=row.get("tenant"),
        policy=row.get("policy"), stream=bool(row.get("stream")), headers=dict(row.get("headers") or {}),
        canaries=tuple(row.get("canaries") or ()), pieces=pieces,
        finished=_finish_per_choice(list(row.get("finish_reasons") or ()), (c.choice for c, _ in pieces)),
        truncated=bool(row.get("truncated")), attempts=int(row.get("attempts") or 1),
        recorded=list(row.get("findings") or []), expected=_expected(row), usage=row.get("usage"),
        latency_ms=(row.get("latency") or {}).get("total_ms"), content=str(row.get("content") or "full"),
    )
    status = int(row.get("status") or 200)
    if row.get("content") == "none":
        case.skip = "no content (captured with content: none)"
    elif status >= 400 and not pieces:
        case.skip = f"upstream error (status {status})"
    elif not pieces:
        case.skip = "no output recorded"
    return case


def case_from_pair(row: Mapping[str, Any], index: int) -> Case:
    request = row.get("request") if isinstance(row.get("request"), dict) else {}
    response = row.get("response")
    endpoint = str(row.get("endpoint") or endpoint_of(request, response))
    ex = deltas.Extract()
    if isinstance(response, dict):
        if endpoint == "responses":
            ex = deltas.responses_body(response)
        elif endpoint == "completions":
            ex = deltas.completion_chunk(response)
        else:
            ex = deltas.chat_body(response)
    elif isinstance(response, list):  # stream chunks (chat/completions) or Responses events
        tools = deltas.ToolNames()
        for chunk in response:
            if not isinstance(chunk, dict):
                continue
            part = (deltas.responses_event(chunk, tools) if endpoint == "responses"
                    else deltas.completion_chunk(chunk) if endpoint == "completions"
                    else deltas.chat_chunk(chunk, tools))
            ex.pieces += part.pieces
            ex.logprobs += part.logprobs
            ex.finished += part.finished
            ex.usage = part.usage or ex.usage
    case = Case(
        id=str(row.get("id") or f"row{index}"), index=index, source="pair", endpoint=endpoint, body=request,
        model=str(row.get("model") or request.get("model") or ""), route=row.get("route"),
        tenant=row.get("tenant"), policy=row.get("policy"), stream=isinstance(response, list),
        headers=dict(row.get("headers") or {}), pieces=list(ex.pieces), logprobs=list(ex.logprobs),
        finished=list(ex.finished), expected=_expected(row), usage=ex.usage,
    )
    if not ex.pieces:
        case.skip = "response has no output text or tool calls"
    return case


def case_from_row(row: Any, index: int) -> Case:
    if not isinstance(row, dict):
        return Case(id=f"row{index}", index=index, source="invalid", endpoint="chat", body={}, model="",
                    skip="not a JSON object")
    if "response" in row and "output" not in row:
        return case_from_pair(row, index)
    if "output" in row or row.get("kind") == "exchange":
        return case_from_capture(row, index)
    return Case(id=str(row.get("id") or f"row{index}"), index=index, source="invalid", endpoint="chat", body={},
                model="", skip="neither a capture row nor a request/response pair")


def read_cases(paths: Sequence[str | Path], limit: int | None = None) -> Iterator[Case]:
    """Cases from JSONL files in order; a line that is not JSON becomes a skipped case."""
    index = 0
    for path in paths:
        with open(path, "rb") as fh:
            for line in fh:
                if not line.strip():
                    continue
                if limit is not None and index >= limit:
                    return
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    yield Case(id=f"row{index}", index=index, source="invalid", endpoint="chat", body={}, model="",
                               skip="line is not valid JSON")
                else:
                    yield case_from_row(row, index)
                index += 1


# --------------------------------------------------------------------------------------------
# running


@dataclass
class Result:
    case: Case
    policy: str
    route: str
    findings: list[dict[str, Any]]
    signals: dict[str, Any]
    blocked: bool


def finding_key(f: Mapping[str, Any]) -> tuple[Any, ...]:
    """What must be equal for a replayed finding to be the live one."""
    span = f.get("span")
    return (f.get("detector"), f.get("category"), f.get("severity"), f.get("channel"),
            tuple(span) if span else None, f.get("evidence"), f.get("action"))


class Replayer:
    """Resolves each case's policy and runs the pipeline over its recorded output."""

    def __init__(self, loaded: LoadedConfig, policy: str | None = None) -> None:
        cfg = loaded.config
        self.loaded = loaded
        self.policies = {name: Policy.build(name, cfg.policies[name], loaded.detectors.get(name, ()))
                         for name in cfg.policies}
        if policy is not None and policy not in self.policies:
            raise ConfigError([f"--policy: unknown policy '{policy}' (configured: {', '.join(sorted(self.policies))})"])
        self.forced = policy
        self.router = Router(cfg)
        self.tenant_policy = {t.name: t.policy for t in cfg.tenants if t.policy}
        self.canaries = MemoryCanaryRegistry()
        self.fingerprints = MemoryFingerprintIndex()

    def resolve(self, case: Case) -> tuple[Policy, str]:
        route_name = case.route
        policy_name = self.forced
        if policy_name is None and case.policy in self.policies:
            policy_name = case.policy
        if policy_name is None or route_name is None:
            try:
                idx, route = self.router.select(case.model, case.path, case.tenant)
                route_name = route_name or self.router.route_name(idx)
                if policy_name is None:
                    policy_name = self.tenant_policy.get(case.tenant or "") or route.policy
            except ProxyError:
                route_name = route_name or "none"
        policy = self.policies.get(policy_name or "default") or self.policies["default"]
        return policy, route_name or "none"

    def run(self, case: Case) -> Result:
        policy, route = self.resolve(case)
        ex = Exchange(request_id=case.id, method="POST", path=case.path, endpoint=case.endpoint, body=case.body,
                      model=case.model, route=route, tenant=case.tenant, stream=case.stream)
        names = {e.name for e in policy.entries}
        shared: dict[str, Any] = {}
        canaries: tuple[str, ...] = ()
        if "canary" in names:
            for token in case.canaries:
                self.canaries.register(token)
            canaries = case.canaries
            shared["canary"] = self.canaries
        if "cross_tenant" in names:
            shared["cross_tenant"] = self.fingerprints
        ctx = request_context(ex, case.headers, canaries, shared)
        if case.tenant and "cross_tenant" in names:
            for entry, det in zip(policy.entries, policy.detectors, strict=True):
                if entry.name == "cross_tenant":
                    self.fingerprints.add(case.tenant, det.fingerprints_for_request(ctx))  # type: ignore[attr-defined]
        max_attempts = policy.max_attempts
        attempt = max(0, case.attempts - 1)
        buffered = policy.config.buffer == "full" and policy.enforcing
        can_retry = (not case.stream or buffered) and attempt + 1 < max_attempts
        pl = ResponsePipeline(policy, ctx, attempt=attempt, can_retry=can_retry)
        for ch, text in case.pieces:
            pl.feed(ch, text)
        for ch, items in case.logprobs:
            pl.feed_logprobs(ch, items)
        if case.truncated:
            pl.finish(truncated=True)
        else:
            for idx, reason in case.finished:
                pl.finish_choice(idx, StreamEnd(finish_reason=reason))
            pl.finish(finish_reason=case.finished[0][1] if case.finished else None)
        return Result(case=case, policy=policy.name, route=route, findings=finding_dicts(pl.outcome.applied),
                      signals=jsonable(pl.outcome.signals), blocked=pl.flow is Flow.BLOCK)


# --------------------------------------------------------------------------------------------
# labels

_KEY = re.compile(r"^(?P<det>[A-Za-z0-9_\-]+)(?::(?P<cat>[^>]+?))?(?:>=(?P<sev>low|medium|high|critical))?$")


@dataclass(frozen=True)
class LabelKey:
    detector: str
    category: str | None
    min_severity: Severity | None

    @classmethod
    def parse(cls, key: str) -> LabelKey:
        m = _KEY.match(key.strip())
        if m is None:
            raise ValueError(f"label key {key!r}: use detector, detector:category, optionally >=severity")
        sev = m.group("sev")
        return cls(m.group("det"), m.group("cat"), _SEVERITIES[sev] if sev else None)

    def matches(self, f: Mapping[str, Any]) -> bool:
        if f.get("detector") != self.detector:
            return False
        if self.category is not None and f.get("category") != self.category:
            return False
        if self.min_severity is not None:
            sev = _SEVERITIES.get(str(f.get("severity")))
            if sev is None or sev < self.min_severity:
                return False
        return True


def predicted(key: str, findings: Sequence[Mapping[str, Any]]) -> bool:
    k = LabelKey.parse(key)
    return any(k.matches(f) for f in findings)


@dataclass
class Confusion:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def add(self, want: bool, got: bool) -> None:
        if got and want:
            self.tp += 1
        elif got:
            self.fp += 1
        elif want:
            self.fn += 1
        else:
            self.tn += 1

    def as_dict(self) -> dict[str, Any]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn, "precision": round(self.precision, 4),
                "recall": round(self.recall, 4), "f1": round(self.f1, 4), "positives": self.tp + self.fn,
                "n": self.tp + self.fp + self.fn + self.tn}


# --------------------------------------------------------------------------------------------
# the summary


def _brief(f: Mapping[str, Any]) -> dict[str, Any]:
    return {k: f.get(k) for k in ("detector", "category", "severity", "channel", "span", "evidence", "action")}


class Summary:
    """Aggregates results: per detector, category, route and model; labels; live agreement."""

    def __init__(self, max_listed: int = 200) -> None:
        self.max_listed = max_listed
        self.rows = 0
        self.replayed = 0
        self.skipped: Counter[str] = Counter()
        self.flagged_rows = 0
        self.blocked_rows = 0
        self.checked: Counter[str] = Counter()  # detector -> rows whose policy has it
        self.det_rows: Counter[str] = Counter()  # detector -> rows with >= 1 finding
        self.det_findings: Counter[str] = Counter()
        self.det_actions: dict[str, Counter[str]] = defaultdict(Counter)
        self.det_severity: dict[str, Counter[str]] = defaultdict(Counter)
        self.categories: Counter[tuple[str, str]] = Counter()
        self.category_rows: Counter[tuple[str, str]] = Counter()
        self.groups: dict[str, dict[str, dict[str, Any]]] = {"route": {}, "model": {}}
        self.policies: Counter[str] = Counter()
        self.grounding_scores: dict[str, list[float]] = defaultdict(list)
        self.classes: dict[str, Counter[str]] = defaultdict(Counter)
        self.labels: dict[str, Confusion] = {}
        self.disagreements: list[dict[str, Any]] = []
        self.disagreement_count = 0
        self.live = {"rows": 0, "identical_rows": 0, "matched": 0, "only_live": 0, "only_replay": 0}
        self.live_by_detector: dict[str, Counter[str]] = defaultdict(Counter)
        self.live_mismatches: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []

    def _group(self, kind: str, name: str) -> dict[str, Any]:
        g = self.groups[kind].get(name)
        if g is None:
            g = self.groups[kind][name] = {"rows": 0, "flagged": 0, "detectors": Counter(), "checked": Counter()}
        return g

    def add_skip(self, case: Case) -> None:
        self.rows += 1
        self.skipped[case.skip or "unknown"] += 1

    def add(self, res: Result, policy_detectors: Iterable[str], keep_rows: bool = True) -> None:
        case = res.case
        self.rows += 1
        self.replayed += 1
        self.policies[res.policy] += 1
        names = list(policy_detectors)
        for n in names:
            self.checked[n] += 1
        fired = {f["detector"] for f in res.findings}
        if fired:
            self.flagged_rows += 1
        if res.blocked:
            self.blocked_rows += 1
        cats_seen: set[tuple[str, str]] = set()
        for f in res.findings:
            det, cat = f["detector"], f["category"]
            self.det_findings[det] += 1
            self.det_actions[det][f["action"]] += 1
            self.det_severity[det][f["severity"]] += 1
            self.categories[(det, cat)] += 1
            cats_seen.add((det, cat))
        for dc in cats_seen:
            self.category_rows[dc] += 1
        for det in fired:
            self.det_rows[det] += 1
        for kind, name in (("route", res.route), ("model", case.model or "unknown")):
            g = self._group(kind, name)
            g["rows"] += 1
            g["flagged"] += 1 if fired else 0
            for n in names:
                g["checked"][n] += 1
            for det in fired:
                g["detectors"][det] += 1
        score = res.signals.get("grounding.response_score")
        if isinstance(score, int | float):
            self.grounding_scores[case.model or "unknown"].append(float(score))
        cls = res.signals.get("transparency.classification")
        if isinstance(cls, str):
            self.classes[case.model or "unknown"][cls] += 1
        disagreements: list[str] = []
        for key, want in case.expected.items():
            got = predicted(key, res.findings)
            self.labels.setdefault(key, Confusion()).add(want, got)
            if got != want:
                disagreements.append(key)
        if disagreements:
            self.disagreement_count += 1
            if len(self.disagreements) < self.max_listed:
                self.disagreements.append({
                    "id": case.id, "keys": {k: {"expected": case.expected[k], "got": not case.expected[k]}
                                            for k in disagreements},
                    "findings": [_brief(f) for f in res.findings]})
        live_diff = None
        if case.recorded is not None:
            live_diff = self._compare_live(case, res)
        if keep_rows:
            row: dict[str, Any] = {"id": case.id, "route": res.route, "model": case.model, "policy": res.policy,
                                   "findings": [_brief(f) for f in res.findings]}
            if case.expected:
                row["expected"] = case.expected
            if live_diff is not None:
                row["live_identical"] = live_diff
            self.results.append(row)

    def _compare_live(self, case: Case, res: Result) -> bool:
        assert case.recorded is not None
        live = Counter(finding_key(f) for f in case.recorded)
        replay = Counter(finding_key(f) for f in res.findings)
        matched = live & replay
        only_live = live - replay
        only_replay = replay - live
        s = self.live
        s["rows"] += 1
        s["matched"] += sum(matched.values())
        s["only_live"] += sum(only_live.values())
        s["only_replay"] += sum(only_replay.values())
        for k, n in matched.items():
            self.live_by_detector[str(k[0])]["matched"] += n
        for k, n in only_live.items():
            self.live_by_detector[str(k[0])]["only_live"] += n
        for k, n in only_replay.items():
            self.live_by_detector[str(k[0])]["only_replay"] += n
        identical = not only_live and not only_replay
        if identical:
            s["identical_rows"] += 1
        elif len(self.live_mismatches) < self.max_listed:
            names = ("detector", "category", "severity", "channel", "span", "evidence", "action")
            self.live_mismatches.append({
                "id": case.id, "content": case.content,
                "only_live": [dict(zip(names, k, strict=True)) for k in only_live.elements()],
                "only_replay": [dict(zip(names, k, strict=True)) for k in only_replay.elements()]})
        return identical

    # -- output -------------------------------------------------------------------------------

    def detectors(self) -> list[str]:
        return sorted(set(self.checked) | set(self.det_findings))

    def as_dict(self, include_rows: bool = True) -> dict[str, Any]:
        dets = {}
        for d in self.detectors():
            checked = self.checked.get(d, 0)
            dets[d] = {"rows_checked": checked, "rows_flagged": self.det_rows.get(d, 0),
                       "rate": round(self.det_rows.get(d, 0) / checked, 6) if checked else None,
                       "findings": self.det_findings.get(d, 0), "actions": dict(self.det_actions.get(d, {})),
                       "severities": dict(self.det_severity.get(d, {}))}
        groups: dict[str, Any] = {}
        for kind, items in self.groups.items():
            groups[kind] = {name: {"rows": g["rows"], "flagged": g["flagged"],
                                   "detectors": {d: {"rows_flagged": g["detectors"].get(d, 0),
                                                     "rate": round(g["detectors"].get(d, 0) / g["checked"][d], 6)
                                                     if g["checked"].get(d) else None}
                                                 for d in sorted(set(g["checked"]) | set(g["detectors"]))}}
                            for name, g in sorted(items.items())}
        out: dict[str, Any] = {
            "kind": "gapwatch.replay", "rows": self.rows, "replayed": self.replayed,
            "skipped": dict(self.skipped), "flagged_rows": self.flagged_rows, "blocked_rows": self.blocked_rows,
            "policies": dict(self.policies), "detectors": dets,
            "categories": [{"detector": d, "category": c, "findings": n, "rows": self.category_rows[(d, c)]}
                           for (d, c), n in sorted(self.categories.items())],
            "routes": groups["route"], "models": groups["model"],
            "grounding_scores": {m: [round(v, 4) for v in vs] for m, vs in sorted(self.grounding_scores.items())},
            "classifications": {m: dict(c) for m, c in sorted(self.classes.items())},
        }
        if self.labels:
            out["labels"] = {k: c.as_dict() for k, c in sorted(self.labels.items())}
            out["disagreements"] = {"count": self.disagreement_count, "listed": self.disagreements}
        if self.live["rows"]:
            out["live"] = {**self.live, "by_detector": {d: dict(c) for d, c in sorted(self.live_by_detector.items())},
                           "mismatches": self.live_mismatches}
        if include_rows:
            out["results"] = self.results
        return out


def replay(cases: Iterable[Case], replayer: Replayer, keep_rows: bool = True, max_listed: int = 200) -> Summary:
    summary = Summary(max_listed=max_listed)
    for case in cases:
        if case.skip:
            summary.add_skip(case)
            continue
        res = replayer.run(case)
        policy = replayer.policies.get(res.policy)
        summary.add(res, [e.name for e in policy.entries] if policy else [], keep_rows=keep_rows)
    return summary


# --------------------------------------------------------------------------------------------
# text output


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:5.1f}%"


def render_text(rep: Mapping[str, Any], disagreements: int = 20) -> str:
    lines = [f"replayed {rep['replayed']} of {rep['rows']} rows; {rep['flagged_rows']} flagged, "
             f"{rep['blocked_rows']} blocked; policies: "
             + ", ".join(f"{k} ({v})" for k, v in rep["policies"].items())]
    for reason, n in rep["skipped"].items():
        lines.append(f"  skipped {n}: {reason}")
    lines += ["", f"{'detector':24} {'checked':>8} {'flagged':>8} {'rate':>7} {'findings':>9}  actions"]
    for d, s in rep["detectors"].items():
        acts = ", ".join(f"{a} {n}" for a, n in sorted(s["actions"].items()))
        lines.append(f"{d:24} {s['rows_checked']:>8} {s['rows_flagged']:>8} {_pct(s['rate']):>7} "
                     f"{s['findings']:>9}  {acts}")
    if rep["categories"]:
        lines += ["", f"{'detector:category':40} {'rows':>6} {'findings':>9}"]
        for c in rep["categories"]:
            lines.append(f"{c['detector'] + ':' + c['category']:40} {c['rows']:>6} {c['findings']:>9}")
    for kind in ("routes", "models"):
        groups = rep[kind]
        if not groups:
            continue
        dets = sorted({d for g in groups.values() for d in g["detectors"]})
        lines += ["", f"{kind[:-1]:24} {'rows':>6} {'flagged':>8} " + " ".join(f"{d[:12]:>12}" for d in dets)]
        for name, g in groups.items():
            cells = " ".join(f"{_pct(g['detectors'].get(d, {}).get('rate')):>12}" for d in dets)
            lines.append(f"{name[:24]:24} {g['rows']:>6} {g['flagged']:>8} {cells}")
    labels = rep.get("labels")
    if labels:
        lines += ["", f"{'label':40} {'pos':>5} {'tp':>5} {'fp':>5} {'fn':>5} {'prec':>6} {'recall':>6} {'F1':>6}"]
        for k, c in labels.items():
            lines.append(f"{k:40} {c['positives']:>5} {c['tp']:>5} {c['fp']:>5} {c['fn']:>5} "
                         f"{c['precision']:6.3f} {c['recall']:6.3f} {c['f1']:6.3f}")
        dis = rep["disagreements"]
        if dis["count"]:
            lines += ["", f"disagreements: {dis['count']} rows (first {min(disagreements, len(dis['listed']))}):"]
            for d in dis["listed"][:disagreements]:
                keys = ", ".join(f"{k} expected {v['expected']}" for k, v in d["keys"].items())
                fired = ", ".join(sorted({f"{f['detector']}:{f['category']}" for f in d["findings"]})) or "nothing"
                lines.append(f"  {d['id']}: {keys}; fired: {fired}")
    live = rep.get("live")
    if live:
        lines += ["", f"live vs replay: {live['identical_rows']} of {live['rows']} rows identical; findings "
                      f"matched {live['matched']}, only live {live['only_live']}, only replay {live['only_replay']}"]
        for m in live["mismatches"][:10]:
            lines.append(f"  {m['id']} ({m['content']} capture): only live "
                         f"{[f['detector'] + ':' + f['category'] for f in m['only_live']]}, only replay "
                         f"{[f['detector'] + ':' + f['category'] for f in m['only_replay']]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# HTML


def render_html(rep: Mapping[str, Any], title: str = "gapwatch replay") -> str:
    from proxy import report_html as h

    parts: list[str] = []
    dets = list(rep["detectors"])
    models = list(rep["models"])
    cards = [("rows", str(rep["rows"])), ("replayed", str(rep["replayed"])), ("flagged", str(rep["flagged_rows"])),
             ("blocked", str(rep["blocked_rows"]))]
    if rep.get("live"):
        live = rep["live"]
        cards.append(("identical to live", f"{live['identical_rows']}/{live['rows']}"))
    parts.append(h.cards(cards))
    if dets:
        series = {m: [rep["models"][m]["detectors"].get(d, {}).get("rate") for d in dets] for m in models} \
            if 1 < len(models) <= 8 else {"all rows": [rep["detectors"][d]["rate"] for d in dets]}
        parts.append(h.section("Findings rate per detector", h.bar_chart(
            "detector-rates", "Share of rows with at least one finding", dets, series, unit="%")))
    if rep["categories"]:
        labels = [f"{c['detector']}:{c['category']}" for c in rep["categories"]]
        parts.append(h.section("Findings per category", h.bar_chart(
            "category-counts", "Findings per detector category", labels,
            {"findings": [float(c["findings"]) for c in rep["categories"]]}, unit="")))
    if rep.get("labels"):
        keys = list(rep["labels"])
        lab = rep["labels"]
        parts.append(h.section("Precision, recall and F1 against the labels", h.bar_chart(
            "label-scores", "Per label key", keys,
            {"precision": [lab[k]["precision"] for k in keys], "recall": [lab[k]["recall"] for k in keys],
             "F1": [lab[k]["f1"] for k in keys]}, unit="%"),
            h.table(["label", "positives", "tp", "fp", "fn", "tn", "precision", "recall", "F1"],
                    [[k, c["positives"], c["tp"], c["fp"], c["fn"], c["tn"], f"{c['precision']:.3f}",
                      f"{c['recall']:.3f}", f"{c['f1']:.3f}"] for k, c in lab.items()])))
        dis = rep["disagreements"]["listed"][:50]
        if dis:
            parts.append(h.section(f"Disagreements ({rep['disagreements']['count']} rows)", h.table(
                ["row", "label", "expected", "fired"],
                [[d["id"], ", ".join(d["keys"]), ", ".join(str(v["expected"]) for v in d["keys"].values()),
                  ", ".join(sorted({f"{f['detector']}:{f['category']}" for f in d["findings"]})) or "nothing"]
                 for d in dis])))
    if rep["grounding_scores"]:
        parts.append(h.section("Grounding score distribution", h.histogram(
            "grounding-scores", "Response grounding score (1 = fully supported)", rep["grounding_scores"],
            lo=0.0, hi=1.0, bins=10)))
    if rep["classifications"]:
        classes = sorted({c for m in rep["classifications"].values() for c in m})
        parts.append(h.section("Answered, abstained, refused", h.bar_chart(
            "classifications", "Share of responses per transparency class", classes,
            {m: [c.get(k, 0) / max(1, sum(c.values())) for k in classes] for m, c in rep["classifications"].items()},
            unit="%")))
    for kind in ("routes", "models"):
        groups = rep[kind]
        if groups:
            gd = sorted({d for g in groups.values() for d in g["detectors"]})
            parts.append(h.section(f"Per {kind[:-1]}", h.table(
                [kind[:-1], "rows", "flagged", *gd],
                [[n, g["rows"], g["flagged"], *[_pct(g["detectors"].get(d, {}).get("rate")).strip() for d in gd]]
                 for n, g in groups.items()])))
    if rep.get("live"):
        live = rep["live"]
        bd = live["by_detector"]
        names = list(bd)
        parts.append(h.section("Live findings reproduced by replay", h.bar_chart(
            "live-agreement", "Findings per detector: matched, only live, only replay", names,
            {"matched": [float(bd[d].get("matched", 0)) for d in names],
             "only live": [float(bd[d].get("only_live", 0)) for d in names],
             "only replay": [float(bd[d].get("only_replay", 0)) for d in names]}, unit="")))
    return h.page(title, f"{rep['replayed']} exchanges replayed", parts)


# --------------------------------------------------------------------------------------------
# CLI


def load_config(path: str | None) -> LoadedConfig:
    """The config to judge with; without a file, the zero-config default policy."""
    if path:
        return load(path)
    return load_dict(zero_config("http://127.0.0.1:9/v1"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE.jsonl", help="capture rows or request/response pairs")
    p.add_argument("--config", help="gapwatch YAML config whose policies judge the rows (default: zero-config)")
    p.add_argument("--policy", help="judge every row with this policy instead of routing")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the JSON report here")
    p.add_argument("--html", dest="html_out", metavar="OUT", help="write the HTML report here")
    p.add_argument("--limit", type=int, help="replay only the first N rows")
    p.add_argument("--disagreements", type=int, default=20, help="disagreements to print (default 20)")
    p.add_argument("--check-live", action="store_true",
                   help="exit 1 when a row's replayed findings differ from the live findings it recorded")


def run(args: argparse.Namespace) -> int:
    try:
        loaded = load_config(args.config)
        replayer = Replayer(loaded, args.policy)
    except ConfigError as exc:
        print("gapwatch replay: configuration error\n" + "\n".join(f"  {p}" for p in exc.problems), file=sys.stderr)
        return 2
    try:
        summary = replay(read_cases(args.files, args.limit), replayer)
    except OSError as exc:
        print(f"gapwatch replay: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"gapwatch replay: {exc}", file=sys.stderr)
        return 1
    rep = summary.as_dict()
    print(render_text(rep, args.disagreements))
    if args.json_out:
        Path(args.json_out).write_bytes(orjson.dumps(rep, option=orjson.OPT_INDENT_2))
    if args.html_out:
        Path(args.html_out).write_text(render_html(rep), encoding="utf-8")
    live = rep.get("live")
    if args.check_live and live and live["identical_rows"] != live["rows"]:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gapwatch replay", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
