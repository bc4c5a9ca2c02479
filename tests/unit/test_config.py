"""Config loading: env interpolation, defaults, and errors that name the YAML path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_dict, load_file

BASE = {"upstreams": {"openai": {"base_url": "https://api.openai.com/v1"}},
        "routes": [{"match": {"model": "*"}, "upstream": "openai"}]}


def problems(raw, env=None) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load_dict(raw, env or {})
    return ei.value.problems


def test_minimal_config_gets_default_policy():
    loaded = load_dict(BASE, {})
    assert "default" in loaded.config.policies
    assert loaded.config.server.port == 8080


def test_unknown_upstream_names_the_path():
    raw = {**BASE, "routes": [{"upstream": "openai"}, {"upstream": "openai"}, {"upstream": "opneai"}]}
    assert "routes[2].upstream: unknown upstream 'opneai' (configured: openai)" in problems(raw)


def test_env_interpolation_and_missing_var():
    raw = {**BASE, "server": {"admin_token": "${TOKEN}"}}
    cfg = load_dict(raw, {"TOKEN": "s3cret"}).config
    assert cfg.server.admin_token.get_secret_value() == "s3cret"
    assert any(p.startswith("server.admin_token: environment variable TOKEN is not set") for p in problems(raw))
    assert load_dict({**BASE, "server": {"host": "${H:-127.0.0.1}"}}, {}).config.server.host == "127.0.0.1"


def test_unknown_key_and_bad_types():
    ps = problems({**BASE, "server": {"prot": 80, "max_body_bytes": "lots"}})
    assert any(p.startswith("server.prot: unknown key") for p in ps)
    assert any(p.startswith("server.max_body_bytes:") for p in ps)


def test_bad_detector_config_rejected_with_path():
    raw = {**BASE, "policies": {"p": {"detectors": {"regx": {"action": "block"}}},
                                "q": {"detectors": {"regex": {"action": "block", "patterns": {"x": "([a-"}}}},
                                "r": {"holdback_chars": -5},
                                "s": {"detectors": {"regex": {"action": "explode", "patterns": {"x": "a"}}}}}}
    ps = problems(raw)
    assert any(p.startswith("policies.p.detectors.regx: unknown detector 'regx' (valid: ") for p in ps)
    assert any(p.startswith("policies.q.detectors.regex.patterns: pattern 'x' is not a valid RE2") for p in ps)
    assert any(p.startswith("policies.r.holdback_chars:") for p in ps)
    assert any(p.startswith("policies.s.detectors.regex.action:") for p in ps)


def test_upstream_url_must_be_http():
    assert any(p.startswith("upstreams.openai.base_url:") for p in
               problems({**BASE, "upstreams": {"openai": {"base_url": "file:///etc/passwd"}}}))


def test_tenant_keys():
    ps = problems({**BASE, "tenants": [{"name": "a", "key_sha256": "nothex"}]})
    assert any(p.startswith("tenants[0].key_sha256:") for p in ps)
    ps = problems({**BASE, "tenants": [{"name": "a", "key_sha256": "a" * 64}, {"name": "b"}]})
    assert any(p.startswith("tenants[1]: set key_sha256") for p in ps)


def test_example_config_is_valid(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY_FOR_GAPWATCH_EXAMPLE", "sk-x")
    loaded = load_file(Path(__file__).parents[2] / "proxy/examples/gapwatch.yaml")
    assert loaded.detectors["strict"][0].name == "regex"


def test_check_config_cli(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: {a: {base_url: 'http://x/v1'}}\nroutes:\n  - {upstream: b}\n")
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and "routes[0].upstream: unknown upstream 'b'" in r.stderr
    good = tmp_path / "good.yaml"
    good.write_text("upstreams: {a: {base_url: 'http://x/v1'}}\nroutes:\n  - {upstream: a}\n")
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("routes: [\n")
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(broken)], capture_output=True, text=True)
    assert r.returncode == 1 and "not valid YAML" in r.stderr


def test_upstream_key_without_tenants_needs_explicit_anonymous():
    raw = {**BASE, "upstreams": {"openai": {"base_url": "https://api.openai.com/v1", "api_key_env": "K"}}}
    ps = problems(raw, {"K": "sk-x"})
    assert any(p.startswith("upstreams.openai.api_key_env: with no tenants, any client") for p in ps)
    import os
    os.environ["K_FOR_TEST"] = "sk-x"
    raw["upstreams"]["openai"]["api_key_env"] = "K_FOR_TEST"
    load_dict({**raw, "server": {"allow_anonymous": True}}, {})


def test_credentials_in_base_url_are_refused_with_the_path():
    raw = {**BASE, "upstreams": {"openai": {"base_url": "https://user:sk-secret@api.openai.com/v1"}}}
    found = [p for p in problems(raw) if p.startswith("upstreams.openai.base_url:")]
    assert found and "api_key_env" in found[0] and "sk-secret" not in found[0]
