"""Cost of schema validation, in microseconds per KB of JSON, for a realistic nested schema
(orders with customers, addresses, items and prices: tests/data/schema_cases/orders.schema.json).

Run: ``.venv/bin/python -m tests.bench.bench_schema`` (not collected by pytest).

Rows: orjson parse alone; jsonschema-rs validation alone (of the parsed object); the
incremental checker (JsonStream + SchemaChecker) fed in 5-character pieces; the whole
``schema`` detector (start, feed 5-char pieces, finish: streaming checks + orjson +
jsonschema-rs + cache lookup by hash); the same for a 2 KB answer, per answer.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson

from detectors.base import TEXT, RequestContext, StreamEnd
from detectors.json_stream import JsonStream
from detectors.schema import SchemaConfig
from detectors.schema_check import SchemaChecker, SchemaTree

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "data" / "schema_cases" / "orders.schema.json"


def make_order(rng: random.Random, i: int) -> dict[str, Any]:
    def address() -> dict[str, Any]:
        return {"name": rng.choice(["Ada Lovelace", "Grace Hopper", "Alan Turing"]),
                "street": f"{rng.randint(1, 200)} {rng.choice(['High St', 'Rue de Rivoli', 'Hauptstraße'])}",
                "city": rng.choice(["London", "Paris", "Berlin", "Zürich"]),
                "postcode": rng.choice(["SW1A 1AA", "75001", "10115", "8001"]),
                "country": rng.choice(["GB", "FR", "DE", "CH"])}
    items = [{"sku": f"{rng.choice(['ABC', 'XYZ', 'QRS'])}-{rng.randint(1000, 9999)}",
              "title": rng.choice(["USB-C cable 2 m", "Mechanical keyboard (ISO)", "27\" monitor", "Desk lamp"]),
              "quantity": rng.randint(1, 5), "price": round(rng.uniform(3, 400), 2),
              "discount": rng.choice([None, round(rng.uniform(0, 20), 2)]),
              "tags": rng.sample(["office", "gift", "urgent", "b2b"], rng.randint(0, 2))}
             for _ in range(rng.randint(1, 4))]
    return {"id": f"ORD-{2024000 + i}", "placed_at": "2024-05-17T09:31:00Z",
            "status": rng.choice(["pending", "paid", "shipped"]),
            "customer": {"email": f"buyer{i}@example.com", "vip": rng.random() < 0.2},
            "shipping": address(), "billing": rng.choice([None, address()]), "items": items,
            "total": round(sum(x["price"] * x["quantity"] for x in items), 2)}


def make_document(n_orders: int, seed: int = 1, indent: bool = False) -> str:
    rng = random.Random(seed)
    doc = {"orders": [make_order(rng, i) for i in range(n_orders)], "currency": "EUR",
           "confidence": 0.93, "notes": None}
    return json.dumps(doc, indent=2 if indent else None, ensure_ascii=False)


def _time(fn: Callable[[], object], min_seconds: float = 0.3) -> float:
    """Best-of-5 seconds per call."""
    fn()
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt >= min_seconds / 5:
            break
        n *= 2
    best = dt / n
    for _ in range(4):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def main() -> None:
    schema = orjson.loads(SCHEMA_PATH.read_bytes())
    validator = jsonschema_rs.validator_for(schema, validate_formats=False)
    tree = SchemaTree(schema)
    det = SchemaConfig().build()
    ctx = RequestContext(response_format={"type": "json_schema",
                                          "json_schema": {"name": "orders", "schema": schema, "strict": True}})

    def incremental(pieces: list[str]) -> None:
        p = JsonStream(SchemaChecker([tree.root]))
        base = 0
        for s in pieces:
            p.feed(s, 0, base)
            base += len(s)
        p.finish(False, base)
        assert p.done and p.problem is None, p.problem

    def tokenizer(pieces: list[str]) -> None:
        p = JsonStream()
        base = 0
        for s in pieces:
            p.feed(s, 0, base)
            base += len(s)
        assert p.done

    def detector(pieces: list[str]) -> None:
        state = det.start(ctx)
        for s in pieces:
            assert not state.feed(TEXT, s)
        assert not state.finish(TEXT, StreamEnd("stop"))
        state.finish_response()

    print(f"schema: {SCHEMA_PATH.name}; times are best of 5, microseconds")
    for label, text in (("compact, 20 KB", make_document(28)), ("indented, 20 KB", make_document(16, indent=True))):
        kb = len(text.encode()) / 1024
        obj = orjson.loads(text)
        assert validator.is_valid(obj)
        pieces = _pieces(text, 5)
        rows: list[tuple[str, Callable[[], object]]] = [
            ("orjson.loads alone", lambda t=text: orjson.loads(t)),
            ("jsonschema-rs validate alone", lambda o=obj: validator.is_valid(o)),
            ("tokenizer only, 5-char pieces", lambda p=pieces: tokenizer(p)),
            ("incremental checker, 5-char pieces", lambda p=pieces: incremental(p)),
            ("whole detector, 5-char pieces", lambda p=pieces: detector(p)),
            ("incremental checker, whole text", lambda t=text: incremental([t])),
        ]
        print(f"\n{label} document ({kb:.1f} KB):")
        for name, fn in rows:
            print(f"  {name:38s} {_time(fn) * 1e6 / kb:9.1f} us/KB")
    answer = make_document(1, seed=7)
    while len(answer) < 2048:
        answer = make_document(len(answer) // 700 + 2, seed=7)
    pieces = _pieces(answer, 5)
    t = _time(lambda: detector(pieces))
    print(f"\n2 KB streamed answer ({len(answer)} chars, {len(pieces)} deltas): whole detector "
          f"{t * 1e6:.0f} us per answer")


if __name__ == "__main__":
    main()
