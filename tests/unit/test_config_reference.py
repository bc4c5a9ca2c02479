"""The generated configuration reference: fresh, complete, and saying what every key means."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from proxy import config as cfg
from proxy import config_reference as ref


def test_committed_reference_is_fresh(capsys):
    """Fails when proxy/config.py or a detector config changed without regenerating the file."""
    code = ref.main(["--check"])
    err = capsys.readouterr().err
    assert code == 0, f"{err}\n(regenerate: .venv/bin/python -m proxy.config_reference)"


def test_check_flags_a_stale_file(tmp_path: Path, capsys):
    out = tmp_path / "ref.md"
    assert ref.main(["--check", "--output", str(out)]) == 1  # missing counts as stale
    assert ref.main(["--output", str(out)]) == 0
    assert ref.main(["--check", "--output", str(out)]) == 0
    out.write_text(out.read_text().replace("| `server.port` |", "| `server.prt` |"))
    assert ref.main(["--check", "--output", str(out)]) == 1
    assert "is stale" in capsys.readouterr().err


def _models_with_paths() -> list[tuple[type[BaseModel], str]]:
    """Every model reachable from Config with the path prefix its keys get in the reference."""
    out: list[tuple[type[BaseModel], str]] = []

    def visit(model: type[BaseModel], prefix: str) -> None:
        out.append((model, prefix))
        for name, info in model.model_fields.items():
            ann = ref._unwrap_optional(info.annotation)
            origin, args = typing.get_origin(ann), typing.get_args(ann)
            if ref._is_model(ann):
                visit(ann, f"{prefix}{name}.")
            elif origin is dict and args and ref._is_model(args[1]):
                visit(args[1], f"{prefix}{name}.<name>.")
            elif origin in (list, tuple) and args and ref._is_model(args[0]):
                visit(args[0], f"{prefix}{name}[].")

    visit(cfg.Config, "")
    return out


def test_every_key_of_every_model_is_listed():
    paths = {r.path for r in ref.walk(cfg.Config)}
    for model, prefix in _models_with_paths():
        for name, info in model.model_fields.items():
            if ref._is_model(ref._unwrap_optional(info.annotation)):
                continue  # a section: its keys are the rows
            assert f"{prefix}{name}" in paths, f"{model.__name__}.{name} missing from the reference"
    entry = "policies.<name>.detectors.<detector>."
    for key in cfg.POLICY_KEYS:
        assert entry + key in paths


def test_every_detector_and_setting_is_listed():
    from detectors import registry

    text = ref.render()
    for name, model in registry.configs().items():
        assert f"### `{name}`" in text
        for field in model.model_fields:
            assert f"| `{field}` |" in text


def test_every_key_has_a_meaning():
    """A key without a description fails here: add a Field(description=...) (or an attribute
    docstring / comment in a detector config), or an entry in proxy/config_reference.py."""
    assert ref.missing() == []


@pytest.mark.parametrize(("path", "default"), [
    ("server.port", "`8080`"),
    ("server.shutdown_grace_seconds", "`30.0`"),
    ("routes[].match.model", "`'*'`"),
    ("upstreams.<name>.base_url", "required"),
    ("state.backend", "`memory`"),
    ("incidents.sinks", "`[{type: log}]`"),
    ("policies.<name>.holdback_chars", "`auto`"),
])
def test_defaults_come_from_the_models(path: str, default: str):
    rows = {r.path: r for r in ref.walk(cfg.Config)}
    assert rows[path].default == default


def test_types_and_constraints_are_readable():
    rows = {r.path: r for r in ref.walk(cfg.Config)}
    assert rows["server.port"].type == "int (0–65535)"
    assert rows["state.backend"].type == '"memory" or "redis"'
    assert rows["server.metrics_port"].type.startswith("int or null")
    assert rows["policies.<name>.holdback_chars"].type == 'int or "auto"'


def test_markdown_cells_stay_one_cell():
    assert ref._markdown("a | b <tag> `x|<y>`") == "a \\| b &lt;tag&gt; `x\\|<y>`"
    text = ref.render()
    header = "| Key | Type | Default | Meaning |"
    body = text.split(header, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]
    for line in body:  # four cells: five unescaped pipes
        assert line.replace("\\|", "").count("|") == 5, line
