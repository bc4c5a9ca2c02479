"""Configuration: one YAML file -> validated, frozen pydantic models, at start-up.

Every error names the YAML path and what to do (``routes[2].upstream: unknown upstream
'opneai' (configured: local, openai)``). ``${VAR}`` and ``${VAR:-default}`` in string values
are read from the environment after parsing, so a variable can never inject YAML structure.
Detector settings are validated by each detector's own config class (``detectors.registry``).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from detectors import registry
from detectors.base import DetectorConfig, Severity

ACTIONS = ("observe", "annotate", "redact", "block", "retry")
Action = Literal["observe", "annotate", "redact", "block", "retry"]

# keys of a policy's detector entry that belong to the policy layer; the rest is the
# detector's own settings
POLICY_KEYS = frozenset({"action", "then", "max_attempts", "min_severity", "below_min_severity", "on_error",
                         "enabled", "retry_guidance"})


class ConfigError(Exception):
    """All problems found in a config file, one line each (``path: problem``)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    admin_token: SecretStr | None = None
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_concurrency: int = Field(default=1024, ge=1)
    max_sse_line_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    workers: int = Field(default=1, ge=1, le=64)
    allow_anonymous: bool = False

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token(cls, v: Any) -> Any:
        return None if v == "" else v  # an unset ${GAPWATCH_ADMIN_TOKEN:-} disables admin routes


class UpstreamConfig(_Strict):
    base_url: str
    api_key_env: str | None = None
    auth_header: str = "authorization"
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, str] = Field(default_factory=dict)
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    first_byte_timeout_seconds: float = Field(default=120.0, gt=0)
    idle_timeout_seconds: float = Field(default=60.0, gt=0)
    max_stream_duration_seconds: float = Field(default=900.0, gt=0)
    max_connections: int = Field(default=256, ge=1)
    connect_retries: int = Field(default=0, ge=0, le=5)
    keepalive_expiry_seconds: float = Field(default=30.0, gt=0)
    tls_ca_file: str | None = None

    @field_validator("tls_ca_file")
    @classmethod
    def _ca_file(cls, v: str | None) -> str | None:
        if v is not None and not os.path.isfile(v):
            raise ValueError(f"tls_ca_file {v!r} is not a readable file; give the path of a PEM CA bundle")
        return v

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"base_url must be an http(s) URL, got {v!r}")
        if "@" in urlsplit(v).netloc:
            raise ValueError("base_url must not carry credentials (user:password@): put the key in an env var "
                             "named by api_key_env, or a header under headers")
        return v.rstrip("/")

    @field_validator("auth_header")
    @classmethod
    def _auth(cls, v: str) -> str:
        return v.lower()

    @field_validator("headers")
    @classmethod
    def _lower_headers(cls, v: dict[str, str]) -> dict[str, str]:
        # header names are case-insensitive: one spelling, so a configured header replaces the
        # client's instead of going out next to it
        return {k.lower(): val for k, val in v.items()}


class RouteMatch(_Strict):
    model: str = "*"
    path: str | None = None
    tenant: str | None = None


class RouteConfig(_Strict):
    match: RouteMatch = Field(default_factory=RouteMatch)
    upstream: str
    policy: str = "default"
    name: str | None = None


class TenantConfig(_Strict):
    name: str
    key_sha256: str | None = None
    key_env: str | None = None
    policy: str | None = None

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("key_sha256 must be 64 hex characters (sha256 of the key)")
        return v.lower() if v else v


class DetectorEntry(_Strict):
    """A detector as a policy uses it: the action plus the detector's own validated settings."""

    name: str
    action: Action = "observe"
    then: Literal["observe", "annotate", "redact", "block"] = "block"
    max_attempts: int = Field(default=2, ge=1, le=5)
    min_severity: Literal["low", "medium", "high", "critical"] = "low"
    below_min_severity: Literal["observe", "annotate"] = "observe"
    on_error: Literal["open", "closed"] = "open"
    retry_guidance: bool = False
    settings: DetectorConfig

    @property
    def min_severity_value(self) -> Severity:
        return Severity[self.min_severity]


class ConsistencyConfig(_Strict):
    enabled: bool = False
    sample_rate: float = Field(default=0.05, ge=0, le=1)
    max_in_flight: int = Field(default=8, ge=1)


class PolicyConfig(_Strict):
    shadow: bool = False
    holdback_chars: int | Literal["auto"] = "auto"
    buffer: Literal["none", "full"] = "none"
    hold_tool_calls: Literal["auto", "until_valid", "stream"] = "auto"
    block_status: int = Field(default=400, ge=400, le=599)
    incidents_for_observe: bool = False
    detector_budget_ms: float = Field(default=250.0, gt=0)
    request_logprobs: bool = False
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)
    detectors: dict[str, Any] = Field(default_factory=dict)

    @field_validator("holdback_chars")
    @classmethod
    def _hb(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("holdback_chars must be 'auto' or a number >= 0")
        return v


class StateConfig(_Strict):
    backend: Literal["memory", "redis"] = "memory"
    url: str | None = None
    key_prefix: str = "gapwatch:"
    sync_interval_seconds: float = Field(default=1.0, gt=0)
    operation_timeout_seconds: float = Field(default=0.5, gt=0)
    replica_id: str | None = None


class MetricsConfig(_Strict):
    enabled: bool = True
    model_allowlist: list[str] = Field(default_factory=list)
    max_model_labels: int = Field(default=50, ge=1, le=1000)


class TracingConfig(_Strict):
    enabled: bool = True
    otlp_endpoint: str | None = None
    capture_content: bool = False
    service_name: str = "gapwatch"


ContentMode = Literal["redacted", "full", "none"]


class CaptureConfig(BaseModel):
    """``telemetry.capture`` in the YAML file. Off by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="Write sampled exchanges to `path` as JSONL for `gapwatch replay`.")
    path: str = Field("gapwatch-capture.jsonl",
                      description="Capture file; `{pid}` in the name is replaced by the process id "
                                  "(use it with several workers).")
    sample_rate: float = Field(0.01, ge=0.0, le=1.0,
                               description="Fraction of exchanges captured (1.0 = every exchange).")
    routes: list[str] = Field(default_factory=list,
                              description="Route names to sample (empty: every route).")
    content: ContentMode = Field("redacted",
                                 description="`redacted`: text with PII/secrets spans replaced by placeholders; "
                                             "`full`: raw text (exact replay; protect the file); `none`: no "
                                             "conversation or output text.")
    redact_detectors: list[str] = Field(default_factory=lambda: ["pii", "secrets"],
                                        description="Detectors (default settings) whose spans are replaced "
                                                    "in `redacted` mode.")
    max_bytes: int = Field(100 * 1024 * 1024, ge=1024,
                           description="Rotate the file past this size (`FILE.1`, `FILE.2`, ...).")
    keep_files: int = Field(5, ge=1, le=100, description="Rotated files kept besides the current one.")
    queue_size: int = Field(1000, ge=1, description="Exchanges waiting to be written; beyond it rows are "
                                                    "dropped and counted.")


class TelemetryConfig(_Strict):
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)


class AlertSinkConfig(_Strict):
    type: Literal["alertmanager", "webhook", "slack", "pagerduty", "log"]
    url: str | None = None
    secret_env: str | None = None
    routing_key_env: str | None = None
    timeout_seconds: float = Field(default=5.0, gt=0)
    max_retries: int = Field(default=5, ge=0, le=20)
    backoff_seconds: float = Field(default=0.5, gt=0)
    send_resolved: bool = True
    headers: dict[str, str] = Field(default_factory=dict)
    signature_header: str = "x-gapwatch-signature"
    timestamp_header: str = "x-gapwatch-timestamp"


class AlertRuleConfig(_Strict):
    name: str
    signal: str
    threshold: float | None = None
    window: str = "5m"
    min_samples: int = 50
    severity: Literal["info", "warning", "critical"] = "warning"
    adaptive: bool = False
    sigmas: float = 4.0
    direction: Literal["above", "below", "both", "auto"] = "auto"
    warmup_windows: int = Field(default=12, ge=1)
    alpha: float = Field(default=0.1, gt=0, le=1)
    relative_floor: float = Field(default=0.05, ge=0)
    resolve_threshold: float | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class ModelChangeConfig(_Strict):
    """The ``model_changed`` alert: the upstream reports another model name or
    ``system_fingerprint`` for a route and requested model than it did before."""

    enabled: bool = True
    confirm_responses: int = Field(default=3, ge=1, le=1000)
    severity: Literal["info", "warning", "critical"] = "warning"
    hold_seconds: float = Field(default=3600.0, gt=0)
    labels: dict[str, str] = Field(default_factory=dict)


class AlertsConfig(_Strict):
    sinks: list[AlertSinkConfig] = Field(default_factory=list)
    rules: list[AlertRuleConfig] = Field(default_factory=list)
    model_change: ModelChangeConfig = Field(default_factory=ModelChangeConfig)
    default_rules: bool = True
    renotify_interval_seconds: float = Field(default=14400.0, gt=0)
    cooldown_seconds: float = Field(default=900.0, ge=0)
    resend_interval_seconds: float = Field(default=60.0, gt=0)
    evaluation_interval_seconds: float | None = Field(default=None, gt=0)
    history_size: int = Field(default=200, ge=1)
    queue_size: int = Field(default=1000, ge=1)


class IncidentSinkConfig(_Strict):
    type: Literal["log", "jsonl"]
    path: str | None = None
    max_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)


class IncidentsConfig(_Strict):
    sinks: list[IncidentSinkConfig] = Field(default_factory=lambda: [IncidentSinkConfig(type="log")])
    queue_size: int = Field(default=10000, ge=10)
    keep_recent: int = Field(default=500, ge=0)
    capture_evidence: bool = True


class DashboardConfig(_Strict):
    enabled: bool = False
    refresh_seconds: float = Field(default=2.0, ge=0.5, le=60.0)
    history_points: int = Field(default=150, ge=10, le=2000)
    recent_incidents: int = Field(default=20, ge=1, le=200)


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    upstreams: dict[str, UpstreamConfig]
    routes: list[RouteConfig]
    tenants: list[TenantConfig] = Field(default_factory=list)
    policies: dict[str, PolicyConfig] = Field(default_factory=dict)
    state: StateConfig = Field(default_factory=StateConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    incidents: IncidentsConfig = Field(default_factory=IncidentsConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)


@dataclass(frozen=True)
class LoadedConfig:
    """The validated config plus each policy's detector entries, built once."""

    config: Config
    detectors: Mapping[str, tuple[DetectorEntry, ...]]  # policy name -> entries


# --- defaults -------------------------------------------------------------------------------

# The zero-config policy: measure everything, change little. Secrets are redacted (a leaked
# key is never wanted), exfiltration links blocked; everything else is observed.
DEFAULT_POLICY_DETECTORS: dict[str, dict[str, Any]] = {
    "secrets": {"action": "redact"},
    "pii": {"action": "observe"},
    "injection": {"action": "block", "min_severity": "critical"},
    "system_prompt_leak": {"action": "observe"},
    "schema": {"action": "observe"},
    "grounding": {"action": "observe"},
    "transparency": {"action": "observe"},
}


def default_policy() -> dict[str, Any]:
    known = registry.configs()
    return {"detectors": {k: dict(v) for k, v in DEFAULT_POLICY_DETECTORS.items() if k in known}}


def zero_config(upstream_url: str) -> dict[str, Any]:
    return {
        "upstreams": {"default": {"base_url": upstream_url}},
        "routes": [{"match": {"model": "*"}, "upstream": "default", "policy": "default"}],
    }


# --- loading --------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _path(loc: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _interpolate(node: Any, loc: tuple[Any, ...], env: Mapping[str, str], problems: list[str]) -> Any:
    if isinstance(node, str):
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"{_path(loc)}: environment variable {name} is not set "
                            f"(export it, or write ${{{name}:-default}})")
            return ""
        return _VAR.sub(sub, node)
    if isinstance(node, dict):
        return {k: _interpolate(v, (*loc, k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, (*loc, i), env, problems) for i, v in enumerate(node)]
    return node


def _pydantic_problems(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> list[str]:
    out = []
    for err in exc.errors():
        loc = (*prefix, *err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the configuration reference)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        out.append(f"{_path(loc)}: {msg}")
    return out


def build_detector_entry(policy: str, name: str, raw: Any, problems: list[str],
                         config_dir: str | None = None) -> DetectorEntry | None:
    loc = ("policies", policy, "detectors", name)
    known = registry.configs()
    if name not in known:
        problems.append(f"{_path(loc)}: unknown detector '{name}' (valid: {', '.join(sorted(known))})")
        return None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{_path(loc)}: must be a mapping of settings, e.g. {{action: observe}}")
        return None
    common = {k: v for k, v in raw.items() if k in POLICY_KEYS}
    settings_raw = {k: v for k, v in raw.items() if k not in POLICY_KEYS}
    try:
        settings = known[name].model_validate(settings_raw, context={"config_dir": config_dir or os.getcwd()})
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, loc))
        return None
    try:
        return DetectorEntry(name=name, settings=settings, **common)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, loc))
        return None


def _check_references(cfg: Config, problems: list[str]) -> None:
    upstreams = sorted(cfg.upstreams)
    policies = set(cfg.policies) | {"default"}
    for i, route in enumerate(cfg.routes):
        if route.upstream not in cfg.upstreams:
            problems.append(f"routes[{i}].upstream: unknown upstream '{route.upstream}' "
                            f"(configured: {', '.join(upstreams) or 'none'})")
        if route.policy not in policies:
            problems.append(f"routes[{i}].policy: unknown policy '{route.policy}' "
                            f"(configured: {', '.join(sorted(policies))})")
    if not cfg.routes:
        problems.append("routes: at least one route is required, e.g. - {match: {model: '*'}, upstream: NAME}")
    names = set()
    for i, t in enumerate(cfg.tenants):
        if t.name in names:
            problems.append(f"tenants[{i}].name: duplicate tenant '{t.name}'")
        names.add(t.name)
        if not t.key_sha256 and not t.key_env:
            problems.append(f"tenants[{i}]: set key_sha256 (sha256 hex of the key) or key_env")
        if t.key_env and t.key_env not in os.environ:
            problems.append(f"tenants[{i}].key_env: environment variable {t.key_env} is not set")
        if t.policy and t.policy not in policies:
            problems.append(f"tenants[{i}].policy: unknown policy '{t.policy}'")
    for name, up in cfg.upstreams.items():
        if up.api_key_env and not cfg.tenants and not cfg.server.allow_anonymous:
            problems.append(f"upstreams.{name}.api_key_env: with no tenants, any client that reaches the proxy "
                            "would spend this key: configure tenants (proxy API keys), or set "
                            "server.allow_anonymous: true if only trusted clients can reach it")
        if up.api_key_env and up.api_key_env not in os.environ:
            problems.append(f"upstreams.{name}.api_key_env: environment variable {up.api_key_env} is not set")
    for i, sink in enumerate(cfg.incidents.sinks):
        if sink.type == "jsonl" and not sink.path:
            problems.append(f"incidents.sinks[{i}].path: a jsonl sink needs a path")
    if cfg.dashboard.enabled and cfg.server.admin_token is None:
        problems.append("dashboard.enabled: the dashboard shows what the admin endpoints show and needs "
                        "server.admin_token (e.g. admin_token: ${GAPWATCH_ADMIN_TOKEN})")
    if cfg.state.backend == "redis" and not cfg.state.url:
        problems.append("state.url: the redis backend needs a url, e.g. redis://127.0.0.1:6379/0")
    for i, sink in enumerate(cfg.alerts.sinks):
        if sink.type not in ("log", "pagerduty") and not sink.url:
            problems.append(f"alerts.sinks[{i}].url: a {sink.type} sink needs a url")
    from proxy.alerts import config_problems  # alerts imports config: import at use

    problems.extend(config_problems(cfg))


def load_dict(raw: Any, env: Mapping[str, str] | None = None, config_dir: str | None = None) -> LoadedConfig:
    """Validate an already-parsed YAML document; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): the config must be a YAML mapping"])
    raw = _interpolate(raw, (), env, problems)
    policies_raw = raw.get("policies") or {}
    if not isinstance(policies_raw, dict):
        raise ConfigError([*problems, "policies: must be a mapping of policy name -> policy"])
    if "default" not in policies_raw:
        policies_raw = {**policies_raw, "default": default_policy()}
    raw = {**raw, "policies": policies_raw}
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        problems += _pydantic_problems(exc)
        for pname, praw in policies_raw.items():  # report detector problems in the same run
            dets = praw.get("detectors") if isinstance(praw, dict) else None
            if isinstance(dets, dict):
                for dname, draw in dets.items():
                    build_detector_entry(str(pname), str(dname), draw, problems, config_dir)
        raise ConfigError(problems) from None
    _check_references(cfg, problems)
    entries: dict[str, tuple[DetectorEntry, ...]] = {}
    for pname, policy in cfg.policies.items():
        built = []
        for dname, draw in policy.detectors.items():
            entry = build_detector_entry(pname, dname, draw, problems, config_dir)
            if entry is not None and (not isinstance(draw, dict) or draw.get("enabled", True)):
                built.append(entry)
        entries[pname] = tuple(built)
    if problems:
        raise ConfigError(problems)
    return LoadedConfig(config=cfg, detectors=entries)


def load_file(path: str | Path, env: Mapping[str, str] | None = None) -> LoadedConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read the config file ({exc.strerror})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    return load_dict(raw, env, config_dir=str(p.resolve().parent))


def load(path: str | Path | None, upstream: str | None = None) -> LoadedConfig:
    """The CLI's entry: a file, or ``--upstream URL`` alone for a zero-config start."""
    if path:
        loaded = load_file(path)
        if upstream:
            problems = ["--upstream: give either --config or --upstream, not both"]
            raise ConfigError(problems)
        return loaded
    if upstream:
        return load_dict(zero_config(upstream))
    env_cfg = os.environ.get("GAPWATCH_CONFIG")
    if env_cfg:
        return load_file(env_cfg)
    raise ConfigError(["give --config FILE (or GAPWATCH_CONFIG) or --upstream URL"])


def glob_match(pattern: str, value: str) -> bool:
    return fnmatch.fnmatchcase(value, pattern)
