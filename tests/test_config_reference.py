"""Tests for nexus.config.reference: every setting, the generated docs, the commented file."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest

from nexus.config import (
    ENV_NOT_SETTINGS,
    Config,
    ConfigError,
    parse_config,
    render_toml,
    sections,
    settings,
)
from nexus.config.__main__ import main
from nexus.config.reference import REQUIRED, environment_markdown, toml_value, update_docs

DOCS = Path(__file__).resolve().parent.parent / "docs"
CONFIGURATION = DOCS / "configuration.md"


def _field_paths(cls: type, prefix: str) -> set[str]:
    """Dotted names of every leaf field under ``cls`` (tables of scalars count as leaves)."""
    out = set()
    for field in attrs.fields(attrs.resolve_types(cls)):
        tp: Any = field.type
        item = getattr(tp, "__args__", (None,))[0] if getattr(tp, "__origin__", None) else None
        if attrs.has(tp):
            out |= _field_paths(tp, f"{prefix}{field.name}.")
        elif item is not None and attrs.has(item):
            out |= _field_paths(item, f"{prefix}{field.name}.")
        else:
            out.add(f"{prefix}{field.name}")
    return out


def test_settings_cover_every_field_once() -> None:
    names = [s.name for s in settings()]
    assert len(names) == len(set(names))
    assert set(names) == _field_paths(Config, "")


def test_every_setting_and_section_has_help() -> None:
    for section in sections():
        assert section.help.endswith("."), section.name
    for s in settings():
        assert s.help.endswith("."), s.name


def test_settings_show_what_the_loader_does() -> None:
    by_name = {s.name: s for s in settings()}
    listen = by_name["server.listen"]
    assert (listen.default, listen.env, listen.type) == (
        "tcp:8000:interface=127.0.0.1",
        "NEXUS_SERVER_LISTEN",
        "string",
    )
    assert by_name["server.max_header_bytes"].type == "integer ≥ 256"
    assert by_name["server.request_timeout_seconds"].type == "number > 0"
    assert by_name["routing.strategy"].type == (
        "string, one of smart, round_robin, priority_only, random"
    )
    assert by_name["server.api_keys"].env_note == "comma-separated, added to the file's"
    assert by_name["server.api_keys_file"].default is None
    assert by_name["backends.name"].default is REQUIRED
    assert by_name["routing.weights.priority"].env is None
    assert by_name["routing.aliases"].table
    level = by_name["logging.level"]
    assert (level.default, level.env, level.type) == (
        "info",
        "NEXUS_LOGGING_LEVEL",
        "string, one of debug, info, warn, error, critical",
    )
    assert by_name["logging.requests"].type == "boolean"


def test_the_loader_reads_every_variable_the_reference_names() -> None:
    for s in settings():
        if s.env is None:
            continue
        try:
            config, warnings = parse_config({}, "nexus.toml", {s.env: "not-a-default"})
        except ConfigError as e:  # read, and refused: the message names the variable
            assert str(e).startswith(f"environment: {s.env}: "), s.env
        else:
            assert warnings == [], s.env
            assert getattr(getattr(config, s.section), s.key) in (
                "not-a-default",
                ("not-a-default",),
            ), s.env


@pytest.mark.parametrize(
    ("value", "toml", "loaded"),
    [
        (True, "true", True),
        (3, "3", 3),
        (300.0, "300", 300),
        (0.5, "0.5", 0.5),
        ('a "quoted" \\ one', '"a \\"quoted\\" \\\\ one"', 'a "quoted" \\ one'),
        ((), "[]", []),
        (("a", "b"), '["a", "b"]', ["a", "b"]),
        (frozenset({"tools", "json_mode"}), '["json_mode", "tools"]', ["json_mode", "tools"]),
        ({}, "{}", {}),
        ({"llama3:70b": "x", "gpt-4": "y"}, '{ "llama3:70b" = "x", gpt-4 = "y" }', None),
    ],
)
def test_toml_values(value: object, toml: str, loaded: object) -> None:
    assert toml_value(value) == toml
    assert tomllib.loads(f"v = {toml}")["v"] == (value if loaded is None else loaded)


# ---- the commented nexus.toml (nexus config init)


def test_rendered_toml_loads_back_to_the_defaults() -> None:
    assert parse_config(tomllib.loads(render_toml()), "nexus.toml", {}) == (Config(), [])


def test_rendered_toml_shows_every_setting_with_a_comment() -> None:
    text = render_toml()
    for s in settings():
        line = re.search(rf"^(# )*{s.key} = .*$|^(# )*\[{re.escape(s.name)}\]$", text, re.M)
        assert line is not None, s.name
        assert text[: line.start()].rstrip().split("\n")[-1].startswith("#"), s.name
        if s.env is not None:
            assert f"env {s.env}" in text


def test_rendered_backend_example_loads_once_uncommented() -> None:
    lines = render_toml().splitlines()
    example = lines[lines.index("# [[backends]]") :]
    # As the file says: remove one "# " (or the "#" of an empty line).
    text = "\n".join(line[2:] if line.startswith("# ") else line[1:] for line in example)
    config, warnings = parse_config(tomllib.loads(text), "nexus.toml", {})
    assert warnings == []
    (backend,) = config.backends
    assert (backend.name, backend.url, backend.type) == (
        "ollama-local",
        "http://127.0.0.1:11434",
        "ollama",
    )
    assert backend.model_capabilities == {"llava:13b": frozenset({"vision"})}


def test_command_prints_the_toml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--toml"]) == 0
    assert capsys.readouterr().out == render_toml()


# ---- docs/configuration.md


def test_configuration_docs_match_the_classes() -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    assert update_docs(text) == text, (
        "docs/configuration.md no longer matches the settings in nexus/config/values.py; "
        "regenerate its tables with: python -m nexus.config docs/configuration.md"
    )


def test_docs_drift_is_caught_and_regenerated(tmp_path: Path) -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    drifted = text.replace(
        "| `max_headers` | integer ≥ 1 | `100`", "| `max_headers` | integer ≥ 1 | `50`"
    )
    assert drifted != text
    assert update_docs(drifted) == text
    path = tmp_path / "configuration.md"
    path.write_text(drifted, encoding="utf-8")
    assert main([str(path)]) == 0
    assert path.read_text(encoding="utf-8") == text


def test_docs_without_generated_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match="no generated block environment, settings"):
        update_docs("# Configuration\n")


def test_docs_list_every_environment_variable_and_the_ignored_ones() -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    assert environment_markdown() in text
    for name in ENV_NOT_SETTINGS:
        shown = f"`{name}*`" if name.endswith("_") else f"`{name}`"
        assert shown in text, name
