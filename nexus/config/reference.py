"""Every setting, for people: docs/configuration.md's tables and a commented ``nexus.toml``.

Both come from the value classes (help texts in their fields' metadata) and the loader (types,
rules, environment variables), so they cannot drift from what the gateway reads. After a change
to a value class, regenerate the docs with ``python -m nexus.config docs/configuration.md``.
"""

from __future__ import annotations

import functools
import json
import re
import textwrap
from collections.abc import Iterator, Mapping
from types import UnionType
from typing import Any, Final, Union, get_args, get_origin

import attrs

from nexus.config.loader import (
    _RULES,
    _AtLeast,
    _env_fields,
    _fields,
    _GreaterThan,
    _num,
    _Rule,
    _table_class,
    env_name,
    toml_key,
)
from nexus.config.values import Config

#: The default of a setting that must be given (a backend's ``name`` and ``url``).
REQUIRED: Final = attrs.NOTHING

_WORDS: dict[type, tuple[str, str]] = {
    bool: ("boolean", "booleans"),
    int: ("integer", "integers"),
    float: ("number", "numbers"),
    str: ("string", "strings"),
}
_WIDTH = 98  # of a comment line in the TOML file, after "# "


@attrs.frozen
class Setting:
    """One setting: where it lives, what it takes, its default, its variable and its help."""

    section: str  # the TOML table: "server", "routing.weights", "backends"
    key: str
    type: str  # for people: "integer ≥ 1", "string, one of smart, ..."
    default: object  # the value when not given; None when unset, REQUIRED when it must be given
    env: str | None  # the NEXUS_* variable that sets it, if one does
    help: str
    example: object = None  # a value to show when the default shows nothing
    env_note: str = ""  # how the variable's text is read, when it is not one plain value
    table: bool = False  # written as its own TOML table (``[routing.aliases]``)

    @property
    def name(self) -> str:
        """Dotted name, as messages and docs write it: ``server.listen``."""
        return f"{self.section}.{self.key}"


@attrs.frozen
class Section:
    """One TOML table of settings (``array``: one table per item, like ``[[backends]]``)."""

    name: str
    help: str
    array: bool
    settings: tuple[Setting, ...]


@functools.cache
def sections() -> tuple[Section, ...]:
    """Every section, in the order the file shows them, each with its settings."""
    out: list[Section] = []

    def walk(cls: type, name: str, help: str, array: bool) -> None:
        own: list[Setting] = []
        nested: list[tuple[type, str, str, bool]] = []
        for field in _fields(cls):
            item = _table_class(field.type)
            if item is None:
                own.append(_setting(cls, name, field))
            else:
                path = f"{name}.{field.name}" if name else field.name
                nested.append((item, path, _help(cls, field), item is not field.type))
        if name:
            out.append(Section(name, help, array, tuple(own)))
        for args in nested:
            walk(*args)

    walk(Config, "", "", False)
    return tuple(out)


def settings() -> Iterator[Setting]:
    """Every setting: section, key, type, default, environment variable and help."""
    for section in sections():
        yield from section.settings


def _setting(cls: type, section: str, field: attrs.Attribute[Any]) -> Setting:
    default: Any = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]  # typed as a function
        default = default.factory()
    var = field.metadata.get("env") or env_name(*section.split("."), field.name)
    env = _env_fields().get(var)
    note = ""
    if env is not None and env.type == tuple[str, ...]:
        note = "comma-separated" + (", added to the file's" if env.adds else "")
    return Setting(
        section=section,
        key=field.name,
        type=_type_text(field.type, _RULES.get((cls, field.name))),
        default=default,
        env=var if env is not None else None,
        help=_help(cls, field),
        example=field.metadata.get("example"),
        env_note=note,
        table=get_origin(field.type) is Mapping,
    )


def _help(cls: type, field: attrs.Attribute[Any]) -> str:
    text = field.metadata.get("help")
    if not text:
        raise ValueError(f"{cls.__name__}.{field.name} has no help text (metadata=doc(...))")
    return str(text)


def _type_text(tp: Any, rule: _Rule | None) -> str:
    """A field's type as the docs name it, with what its rule asks."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (UnionType, Union):
        choices = [a for a in args if a is not type(None)]
        if len(choices) > 1 and rule is not None:  # ``int | str``: the rule says it all
            return str(rule)
        (tp,) = choices
        return _type_text(tp, rule)
    each = ""
    if origin in (tuple, frozenset):
        base, each = f"array of {_WORDS[args[0]][1]}", "each "
    elif origin is Mapping:
        value = args[1]
        inner = _WORDS[get_args(value)[0]][0] + " arrays" if get_args(value) else _WORDS[value][1]
        base, each = f"table of {inner}", "each "
    else:
        base = _WORDS[tp][0]
    if rule is None:
        return base
    if isinstance(rule, _AtLeast | _GreaterThan):
        return f"{base} {rule}"
    return f"{base}, {each}{rule}"


def toml_value(value: object) -> str:
    """``value`` written as TOML: ``"text"``, ``30``, ``true``, ``["a", "b"]``, ``{}``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, Mapping):
        items = ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return f"{{ {items} }}" if items else "{}"
    if isinstance(value, frozenset | set):
        value = sorted(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


# ---- docs/configuration.md


def settings_markdown() -> str:
    """The settings tables of docs/configuration.md, one per section."""
    lines: list[str] = []
    for section in sections():
        header = f"[[{section.name}]]" if section.array else f"[{section.name}]"
        with_env = any(s.env for s in section.settings)
        columns = ["key", "type", "default", *(["environment"] * with_env), "meaning"]
        lines += [
            f"## `{header}`",
            "",
            section.help,
            "",
            _row(columns),
            _row(["---"] * len(columns)),
        ]
        for s in section.settings:
            env = "—"
            if s.env is not None:
                env = f"`{s.env}`" + (f" ({s.env_note})" if s.env_note else "")
            cells = [f"`{s.key}`", s.type, _markdown_default(s), *([env] * with_env), s.help]
            lines.append(_row(cells))
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def environment_markdown() -> str:
    """The table of every ``NEXUS_*`` variable that sets something."""
    lines = [_row(["variable", "sets", "value"]), _row(["---"] * 3)]
    for s in settings():
        if s.env is not None:
            value = s.type + (f" ({s.env_note})" if s.env_note else "")
            lines.append(_row([f"`{s.env}`", f"`{s.name}`", value]))
    return "\n".join(lines)


def _markdown_default(s: Setting) -> str:
    if s.default is REQUIRED:
        return "required"
    if s.default is None:
        return "unset"
    return f"`{toml_value(s.default)}`"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


#: A generated block: ``<!-- NAME:start ... -->`` up to ``<!-- NAME:end -->``.
_BLOCK = re.compile(r"(<!-- (?P<name>[a-z]+):start\b[^>]*-->\n).*?(<!-- (?P=name):end -->)", re.S)


def update_docs(text: str) -> str:
    """``text`` (docs/configuration.md) with its generated blocks rewritten from the classes."""
    blocks = {"settings": settings_markdown(), "environment": environment_markdown()}
    found: set[str] = set()

    def rewrite(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in blocks:
            return match[0]
        found.add(name)
        return f"{match[1]}\n{blocks[name]}\n\n{match[3]}"

    out = _BLOCK.sub(rewrite, text)
    missing = sorted(blocks.keys() - found)
    if missing:
        raise ValueError(f"no generated block {', '.join(missing)} (<!-- NAME:start --> ...)")
    return out


# ---- nexus.toml


def render_toml() -> str:
    """A ``nexus.toml`` with every setting at its default and a comment saying what it does.

    Settings without a default, and array tables such as ``[[backends]]``, are shown as
    commented-out examples. ``nexus config init`` writes this file.
    """
    lines = [
        "# nexus.toml: every setting of the Nexus gateway, at its default.",
        "#",
        "# Every section and key is optional: delete what you do not change. Precedence: command",
        "# line > NEXUS_* environment variables > this file > defaults. docs/configuration.md",
        "# explains each setting.",
    ]
    for section in sections():
        lines += ["", *_comment(section.help)]
        if section.array:
            lines.append('# Remove one "# " from the lines below to add one; copy them for more.')
            body = [f"[[{section.name}]]", *_table_lines(section, in_example=True)]
            # Commented once more, so the help comments stay comments once uncommented.
            lines += [f"# {line}" if line else "#" for line in body]
        else:
            lines += [f"[{section.name}]", *_table_lines(section, in_example=False)]
    return "\n".join(lines) + "\n"


def _table_lines(section: Section, in_example: bool) -> list[str]:
    """A section's keys, then its settings that are tables (TOML wants them last)."""
    lines: list[str] = []
    width = _WIDTH - 2 if in_example else _WIDTH
    for s in section.settings:
        if s.table:
            continue
        if lines:
            lines.append("")
        lines += _comment(s.help, width) + _comment(_type_line(s), width)
        if s.default is REQUIRED:
            lines.append(f"{s.key} = {toml_value(s.example)}")
        elif s.default is None:
            lines.append(f"# {s.key} = {toml_value(s.example)}")
        else:
            shown = s.example if in_example and s.example is not None else s.default
            lines.append(f"{s.key} = {toml_value(shown)}")
    for s in section.settings:
        if not s.table:
            continue
        lines += ["", *_comment(s.help, width), *_comment(_type_line(s), width), f"[{s.name}]"]
        example: Any = s.example or {}
        entries = [f"{toml_key(k)} = {toml_value(v)}" for k, v in example.items()]
        lines += entries if in_example else [f"# {entry}" for entry in entries]
    return lines


def _type_line(s: Setting) -> str:
    line = s.type + ("; required" if s.default is REQUIRED else "")
    if s.env is not None:
        line += f"; env {s.env}" + (f" ({s.env_note})" if s.env_note else "")
    return line


def _comment(text: str, width: int = _WIDTH) -> list[str]:
    return [f"# {line}" for line in textwrap.wrap(text, width, break_on_hyphens=False)]
