"""Drives gapwatch with the popular OpenAI clients (instructor, langchain-openai, litellm) the
way their users do. Run by tests/integration/test_clients.py with .venv/clients/bin/python (the
clients' own venv, see clients_requirements.txt): ``clients_drive.py BASE_URL`` prints one
JSON object, case name -> {"ok": value} or {"error": "Type: message"}.

The simulator's ``sim-echo`` answers with the last user message, so each case sends the JSON
it expects back; ``sim-json-wrong-type`` answers with a price that is a string, which the
proxy's schema policy blocks.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import

import instructor
import litellm
import openai
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

KEY = "sk-clients-test"
PEN = {"product": "pen", "price": 1.5, "in_stock": True}


class Product(BaseModel):
    product: str
    price: float
    in_stock: bool


def ask(doc: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": json.dumps(doc)}]


def instructor_case(base: str, mode: Any, model: str = "sim-echo") -> Callable[[], Any]:
    def run() -> Any:
        client = instructor.from_openai(openai.OpenAI(base_url=base, api_key=KEY, max_retries=0), mode=mode)
        got = client.chat.completions.create(model=model, response_model=Product, messages=ask(PEN),
                                             max_retries=1)
        return got.model_dump()
    return run


def langchain_cases(base: str) -> dict[str, Callable[[], Any]]:
    llm = ChatOpenAI(model="sim-echo", base_url=base, api_key=KEY, max_retries=0)
    return {
        "langchain_invoke": lambda: llm.invoke("hello from langchain").content,
        "langchain_stream": lambda: "".join(str(c.content) for c in llm.stream("streamed through gapwatch")),
        "langchain_structured_function_calling": lambda: llm.with_structured_output(
            Product, method="function_calling").invoke(json.dumps(PEN)).model_dump(),
        "langchain_structured_json_schema": lambda: llm.with_structured_output(
            Product, method="json_schema").invoke(json.dumps(PEN)).model_dump(),
    }


def litellm_cases(base: str) -> dict[str, Callable[[], Any]]:
    common = {"model": "openai/sim-echo", "api_base": base, "api_key": KEY}

    def stream() -> str:
        chunks = litellm.completion(messages=ask({"say": "streamed"}), stream=True, **common)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def tool_call() -> Any:
        tools = [{"type": "function", "function": {"name": "Product", "parameters": Product.model_json_schema()}}]
        r = litellm.completion(messages=ask(PEN), tools=tools,
                               tool_choice={"type": "function", "function": {"name": "Product"}}, **common)
        calls = r.choices[0].message.tool_calls or []
        return [(c.function.name, json.loads(c.function.arguments)) for c in calls]

    return {
        "litellm_completion": lambda: litellm.completion(messages=ask({"say": "hi"}), **common)
        .choices[0].message.content,
        "litellm_stream": stream,
        "litellm_tool_call": tool_call,
    }


def main(base: str) -> None:
    cases: dict[str, Callable[[], Any]] = {
        "instructor_tools": instructor_case(base, instructor.Mode.TOOLS),
        "instructor_json": instructor_case(base, instructor.Mode.JSON),
        "instructor_tools_blocked": instructor_case(base, instructor.Mode.TOOLS, "sim-json-wrong-type"),
        **langchain_cases(base),
        **litellm_cases(base),
    }
    out: dict[str, Any] = {}
    for name, run in cases.items():
        try:
            out[name] = {"ok": run()}
        except Exception as exc:  # noqa: BLE001 -- every failure goes to the test, which names it
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
