"""The popular OpenAI clients work through gapwatch in front of the simulator: instructor
(tools and JSON modes), langchain-openai (invoke, stream, structured output by function
calling and by JSON schema) and the litellm SDK. A schema block reaches instructor as the
OpenAI error with the JSON path and reason.

The clients live in their own venv (.venv/clients, built by ``make test`` from
clients_requirements.txt) because instructor's pins would hold the project's openai SDK back;
tests/integration/clients_drive.py runs there and reports each case as JSON.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import proxy_config

ROOT = Path(__file__).resolve().parents[2]
CLIENTS_PY = ROOT / ".venv" / "clients" / "bin" / "python"
DRIVER = Path(__file__).with_name("clients_drive.py")
PEN = {"product": "pen", "price": 1.5, "in_stock": True}
INSTALL = "python3 -m venv .venv/clients && .venv/clients/bin/pip install -r tests/integration/clients_requirements.txt"


@pytest.fixture(scope="module")
def report(sim):
    """Every case's outcome, from one run of the driver against a proxy that validates JSON
    (tool arguments against the request's own tool schema) and redacts secrets."""
    if not CLIENTS_PY.exists():
        pytest.fail(f"the client libraries' venv is missing; make test builds it, or: {INSTALL}")
    from proxy.app import create_app
    from proxy.config import load_dict
    from proxy.metrics import Metrics
    from tests.servers import ThreadServer

    cfg = proxy_config(sim.url, policies={"default": {"detectors": {"schema": {"action": "block"},
                                                                    "secrets": {"action": "redact"}}}})
    srv = ThreadServer(create_app(load_dict(cfg), Metrics())).start()
    try:
        res = subprocess.run([str(CLIENTS_PY), str(DRIVER), f"{srv.url}/v1"], capture_output=True, text=True,
                             timeout=180, check=False, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp",
                                                            "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    finally:
        srv.stop()
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def ok(report: dict, case: str):
    assert "ok" in report[case], f"{case}: {report[case].get('error')}"
    return report[case]["ok"]


@pytest.mark.parametrize("case", ["instructor_tools", "instructor_json", "langchain_structured_function_calling",
                                  "langchain_structured_json_schema"])
def test_structured_output_extracts_the_model(report, case):
    assert ok(report, case) == PEN


def test_langchain_invoke_and_stream(report):
    assert ok(report, "langchain_invoke") == "hello from langchain"
    assert ok(report, "langchain_stream") == "streamed through gapwatch"


def test_litellm_completion_stream_and_forced_tool_call(report):
    assert json.loads(ok(report, "litellm_completion")) == {"say": "hi"}
    assert json.loads(ok(report, "litellm_stream")) == {"say": "streamed"}
    assert ok(report, "litellm_tool_call") == [["Product", PEN]]


def test_a_schema_block_reaches_instructor_with_path_and_reason(report):
    err = report["instructor_tools_blocked"].get("error", "")
    assert "output_blocked" in err and "$.price: expected number" in err, report["instructor_tools_blocked"]
    assert "'path': '$.price'" in err and "twelve" not in err  # the offending value never goes back
