"""A blocked output tells the developer why: detector, category and, for schema, the JSON path
and the reason, in ``error.message`` and as ``error.findings`` data, the same for a body and a
stream's error event on every wire format (chat, completions, Responses). Never the offending
text: not the value a schema failure is about, not a secret, not even its masked evidence."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from proxy.simulate import SCENARIO_OUTPUTS, SECRET_VALUES
from tests.conftest import proxy_config

PRODUCT = {"type": "object", "properties": {"product": {"type": "string"}, "price": {"type": "number"},
                                            "in_stock": {"type": "boolean"}},
           "required": ["product", "price", "in_stock"]}
WRONG_VALUE = "twelve euros"  # what sim-json-wrong-type puts where the schema wants a number
ENDPOINTS = ("chat", "completions", "responses")


@pytest.fixture
def proxy(start_proxy, sim):
    """Routes: sim-json-* outputs are validated against PRODUCT; everything is checked for secrets."""
    schema = {"schema": {"action": "block", "schemas": {"product": PRODUCT}, "default_schema": "product"}}
    return start_proxy(proxy_config(
        sim.url,
        routes=[{"match": {"model": "sim-json-*"}, "upstream": "sim", "policy": "json"},
                {"match": {"model": "*"}, "upstream": "sim", "policy": "default"}],
        policies={"json": {"detectors": schema}, "default": {"detectors": {"secrets": {"action": "block"}}}}))


def call(client: openai.OpenAI, endpoint: str, model: str, stream: bool) -> None:
    """One request; a stream is read to its end (where a block raises)."""
    if endpoint == "chat":
        r: Any = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "q"}], stream=stream)
    elif endpoint == "completions":
        r = client.completions.create(model=model, prompt="q", stream=stream)
    else:
        r = client.responses.create(model=model, input="q", stream=stream)
    if stream:
        for _ in r:
            pass


def blocked_error(client: openai.OpenAI, endpoint: str, model: str, stream: bool) -> dict[str, Any]:
    """The error object the SDK raised with (a 400 body, or the stream's error event)."""
    with pytest.raises(openai.APIError) as ei:
        call(client, endpoint, model, stream)
    if not stream:
        assert isinstance(ei.value, openai.BadRequestError)
    body = ei.value.body
    assert isinstance(body, dict), body
    err = body.get("error", body) if "findings" not in body else body
    assert isinstance(err, dict) and err.get("code") == "output_blocked", body
    return err


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_schema_block_names_path_and_reason(proxy, endpoint, stream):
    err = blocked_error(proxy.client(), endpoint, "sim-json-wrong-type", stream)
    assert err["findings"] == [{"detector": "schema", "category": "schema", "path": "$.price",
                                "reason": "expected number, got a string"}]
    assert "schema:schema at $.price: expected number, got a string" in err["message"]
    assert err["detectors"] == ["schema"] and err["type"] == "content_filter"
    assert WRONG_VALUE not in str(err) and "twelve" not in str(err)


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_secret_block_names_category_without_evidence(proxy, endpoint, stream):
    err = blocked_error(proxy.client(), endpoint, "sim-secret", stream)
    cats = {(f["detector"], f["category"]) for f in err["findings"]}
    assert ("secrets", "aws_access_key") in cats
    assert all(set(f) == {"detector", "category", "reason"} and f["reason"] for f in err["findings"])
    assert "secrets:aws_access_key: " in err["message"]
    text = str(err)
    for value in SECRET_VALUES.values():
        assert value not in text and value[:4] not in text and value[-4:] not in text  # not even masked
    assert "twelve" not in SCENARIO_OUTPUTS["sim-secret"]  # (the schema test's value is its own)
