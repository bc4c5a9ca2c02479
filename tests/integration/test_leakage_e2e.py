"""PII and secrets through the proxy, streamed with random chunk sizes: redacted before any
byte of a value leaves the proxy; the user's own data echoed back is not a leak."""

from __future__ import annotations

import openai
import pytest

from proxy.simulate import PII_VALUES, SCENARIO_OUTPUTS, SECRET_VALUES
from tests.conftest import b64, proxy_config


def stream(client, model, headers=None, messages=None):
    parts = []
    for chunk in client.chat.completions.create(model=model, stream=True, extra_headers=headers or {},
                                                messages=messages or [{"role": "user", "content": "details?"}]):
        parts.extend(c.delta.content or "" for c in chunk.choices)
    return "".join(parts)


def values(obj):
    return list(obj.values()) if isinstance(obj, dict) else list(obj)


@pytest.mark.parametrize("chunk", ["1", "3", "7", "40"])
def test_pii_redacted_in_streams(start_proxy, sim, chunk):
    cfg = proxy_config(sim.url, policies={"default": {"detectors": {"pii": {"action": "redact"}}}})
    p = start_proxy(cfg)
    text = stream(p.client(), "sim-pii", {"x-sim-chunk-chars": chunk})
    for v in values(PII_VALUES):
        assert v not in text
    assert "[REDACTED:email]" in text and "[REDACTED:card]" in text and "[REDACTED:iban]" in text


def test_default_policy_redacts_secrets(start_proxy, sim):
    cfg = proxy_config(sim.url)
    cfg.pop("policies")
    p = start_proxy(cfg)
    text = stream(p.client(), "sim-secret", {"x-sim-chunk-chars": "5"})
    for v in values(SECRET_VALUES):
        assert v not in text, v
    assert text != SCENARIO_OUTPUTS["sim-secret"]


def test_users_own_email_is_not_a_leak(start_proxy, sim):
    cfg = proxy_config(sim.url, policies={"default": {"detectors": {"pii": {"action": "block"}}}})
    p = start_proxy(cfg)
    mine = "my address is jane.roe@example.org, please confirm it"
    r = p.client().chat.completions.create(model="sim-echo", messages=[{"role": "user", "content": mine}])
    assert r.choices[0].message.content == mine
    with pytest.raises(openai.BadRequestError):
        p.client().chat.completions.create(
            model="sim-echo", messages=[{"role": "user", "content": "who?"}],
            extra_headers={"x-sim-output": b64("write to john.smith@contoso.com")})


def test_near_misses_pass(start_proxy, sim):
    cfg = proxy_config(sim.url, policies={"default": {"detectors": {"pii": {"action": "block"},
                                                                    "secrets": {"action": "block"}}}})
    p = start_proxy(cfg)
    benign = ("Order 4111111111111112 shipped (tracking 1Z999AA10123456784). Version 2.13.0, commit "
              "3f9a2c1d4e5b6a7980f1e2d3c4b5a69788796a5b, id 123e4567-e89b-12d3-a456-426614174000, "
              "ISBN 978-3-16-148410-0.")
    r = p.client().chat.completions.create(model="sim-echo", messages=[{"role": "user", "content": "?"}],
                                           extra_headers={"x-sim-output": b64(benign)})
    assert r.choices[0].message.content == benign
