"""Editing ``[[backends]]`` tables with tomlkit (nexus.cli._toml): where every comment ends up.

The tables below are the layouts a person writes; the property test builds many more. The
last tests pin what ``_toml`` relies on in tomlkit, so a tomlkit release that changes it
fails here first.
"""

from __future__ import annotations

import tomllib

import pytest
import tomlkit
from hypothesis import given
from hypothesis import strategies as st
from tomlkit.items import AoT, Comment, Null, Whitespace

from nexus.cli._toml import EditError, append_backend, backend_tables, remove_backend
from nexus.config import render_toml

NEW = {"name": "new", "url": "http://n:1", "type": "openai"}
NEW_TABLE = '[[backends]]\nname = "new"\nurl = "http://n:1"\ntype = "openai"\n'

# (file, index to remove, the file after)
REMOVALS: list[tuple[str, int, str]] = [
    # the comment right above a table is its own; the one above the next table stays
    (
        "# fleet\n\n# a\n[[backends]]\nname = 'a'\nurl = 'http://a:1'\n\n"
        "# b\n[[backends]]\nname = 'b'\nurl = 'http://b:1'\n",
        0,
        "# fleet\n\n# b\n[[backends]]\nname = 'b'\nurl = 'http://b:1'\n",
    ),
    (
        "# a\n[[backends]]\nname = 'a'\nurl = 'http://a:1'\n\n"
        "# b\n[[backends]]\nname = 'b'\nurl = 'http://b:1'\n",
        0,
        "# b\n[[backends]]\nname = 'b'\nurl = 'http://b:1'\n",
    ),
    # the last table: no blank line left at the end of the file
    (
        "# a\n[[backends]]\nname = 'a'\nurl = 'http://a:1'\n\n"
        "# b\n[[backends]]\nname = 'b'\nurl = 'http://b:1'\n# priority = 3\n",
        1,
        "# a\n[[backends]]\nname = 'a'\nurl = 'http://a:1'\n",
    ),
    # comments at the end of the file, apart from the table, are the file's
    (
        "[[backends]]\nname = 'a'\nurl = 'http://a:1'\n\n# [[backends]]\n# name = 'old'\n",
        0,
        "\n# [[backends]]\n# name = 'old'\n",
    ),
    (
        "[server]\nlisten = 'tcp:1'\n\n[[backends]]\nname = 'a'\nurl = 'http://a:1'\n\n"
        "# [[backends]]\n# name = 'old'\n",
        0,
        "[server]\nlisten = 'tcp:1'\n\n# [[backends]]\n# name = 'old'\n",
    ),
    # a table after the array, with its comment; a sub-table of the removed backend
    (
        "[[backends]]\nname = 'a'\nurl = 'http://a:1'\n[backends.model_capabilities]\n"
        "llava = ['vision']\n\n# aliases\n[routing.aliases]\nx = 'y'\n",
        0,
        "# aliases\n[routing.aliases]\nx = 'y'\n",
    ),
    (
        "[server]\nlisten = 'tcp:1'\n\n# a\n[[backends]]\nname = 'a'\nurl = 'http://a:1'\n\n"
        "# routing\n[routing]\nstrategy = 'smart'\n",
        0,
        "[server]\nlisten = 'tcp:1'\n\n# routing\n[routing]\nstrategy = 'smart'\n",
    ),
    # Windows line ends
    (
        "[[backends]]\r\nname = 'a'\r\nurl = 'http://a:1'\r\n\r\n"
        "[[backends]]\r\nname = 'b'\r\nurl = 'http://b:1'\r\n",
        1,
        "[[backends]]\r\nname = 'a'\r\nurl = 'http://a:1'\r\n",
    ),
]


@pytest.mark.parametrize(("before", "index", "after"), REMOVALS)
def test_remove(before: str, index: int, after: str) -> None:
    assert remove_backend(before, index) == after


# (file, the file after appending NEW)
APPENDS: list[tuple[str, str]] = [
    ("", NEW_TABLE),
    ("# only a comment\n", "# only a comment\n\n" + NEW_TABLE),
    ("[server]\nlisten = 'tcp:1'", "[server]\nlisten = 'tcp:1'\n\n" + NEW_TABLE),
    (
        "[[backends]]\nname = 'a'\nurl = 'http://a:1'\n# priority = 3\n",
        "[[backends]]\nname = 'a'\nurl = 'http://a:1'\n# priority = 3\n\n" + NEW_TABLE,
    ),
    # the comment above the table after the array stays above it
    (
        "[[backends]]\nname = 'a'\nurl = 'http://a:1'\n\n# routing\n[routing]\nstrategy = 'x'\n",
        "[[backends]]\nname = 'a'\nurl = 'http://a:1'\n\n" + NEW_TABLE
        + "\n# routing\n[routing]\nstrategy = 'x'\n",
    ),
    (
        "[server]\r\nlisten = 'tcp:1'\r\n",
        "[server]\r\nlisten = 'tcp:1'\r\n\r\n" + NEW_TABLE.replace("\n", "\r\n"),
    ),
    (render_toml(), render_toml() + "\n" + NEW_TABLE),
]


@pytest.mark.parametrize(("before", "after"), APPENDS)
def test_append(before: str, after: str) -> None:
    assert append_backend(before, NEW) == after
    # and removing it again gives the file back (a missing final newline aside)
    index = len(backend_tables(after)) - 1
    restored = remove_backend(after, index)
    assert restored == before or restored == before + "\n"


def test_values_are_quoted_as_toml_wants() -> None:
    fields = {"name": 'we"ird \\ name', "url": "http://[::1]:8000", "type": "generic"}
    assert backend_tables(append_backend("", fields)) == [fields]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server\n", "invalid TOML"),
        ("backends = [{name = 'a', url = 'http://a:1'}]\n", "is not written as [[backends]]"),
        (
            "[[backends]]\nname = 'a'\nurl = 'http://a:1'\n[routing]\nx = 1\n"
            "[[backends]]\nname = 'b'\nurl = 'http://b:1'\n",
            "cannot keep this file's layout",
        ),
    ],
)
def test_refused(text: str, message: str) -> None:
    with pytest.raises(EditError, match=message.replace("[", r"\[")):
        append_backend(text, NEW)
    with pytest.raises(EditError):
        remove_backend(text, 0)


def test_remove_out_of_range() -> None:
    with pytest.raises(EditError, match="no \\[\\[backends\\]\\] table number 2"):
        remove_backend("[[backends]]\nname = 'a'\nurl = 'http://a:1'\n", 1)


# ---- the property: an append, then a remove of what was appended, is no change at all

_comment = st.from_regex(r"# [a-z =\[\]']{0,12}\n", fullmatch=True)
_blank = st.just("\n")
_between = st.lists(st.one_of(_comment, _blank), max_size=3).map("".join)


@st.composite
def _files(draw: st.DrawFn) -> str:
    parts = [draw(_between)]
    if draw(st.booleans()):
        parts += ["[server]\nlisten = 'tcp:1'\n", draw(_between)]
    for i in range(draw(st.integers(0, 3))):
        parts += [f"[[backends]]\nname = 'b{i}'\nurl = 'http://b{i}:1'\n", draw(_between)]
    if draw(st.booleans()):
        parts += ["[routing]\nstrategy = 'smart'\n", draw(_between)]
    return "".join(parts)


@given(_files())
def test_append_then_remove_is_no_change(text: str) -> None:
    added = append_backend(text, NEW)
    tables = backend_tables(added)
    assert tables[-1] == NEW
    restored = remove_backend(added, len(tables) - 1)
    # Blank lines at the very end aside (a removal leaves none), every byte is back.
    assert restored.rstrip("\n") == text.rstrip("\n")
    assert tomllib.loads(restored) == tomllib.loads(text)


@given(_files(), st.data())
def test_remove_changes_only_that_table(text: str, data: st.DataObject) -> None:
    tables = backend_tables(text)
    if not tables:
        return
    index = data.draw(st.integers(0, len(tables) - 1))
    after = remove_backend(text, index)
    expected = tomllib.loads(text)
    expected["backends"] = [t for i, t in enumerate(tables) if i != index]
    if not expected["backends"]:
        del expected["backends"]
    assert tomllib.loads(after) == expected
    # Comments are never invented; only the removed table's own can go.
    for line in after.splitlines():
        assert line in text.splitlines()


# ---- what nexus.cli._toml relies on in tomlkit


def test_tomlkit_files_comments_above_a_header_under_the_previous_table() -> None:
    doc = tomlkit.parse("[[backends]]\nname = 'a'\n\n# b\n[[backends]]\nname = 'b'\n")
    array = doc.item("backends")
    assert isinstance(array, AoT)
    kinds = [type(item) for _, item in array[0].value.body]
    assert kinds[-2:] == [Whitespace, Comment]


def test_tomlkit_body_is_live_and_null_renders_nothing() -> None:
    doc = tomlkit.parse("a = 1\n# gone\nb = 2\n")
    body = doc.body
    index = next(i for i, (_, item) in enumerate(body) if isinstance(item, Comment))
    body[index] = (None, Null())
    assert doc.as_string() == "a = 1\nb = 2\n"
    assert doc["b"] == 2  # keys after it are still found


def test_tomlkit_renders_a_header_after_its_indent() -> None:
    doc = tomlkit.parse("[[backends]]\nname = 'a'\n")
    array = doc.item("backends")
    assert isinstance(array, AoT)
    array[0].trivia.indent = "# moved\n"
    assert doc.as_string() == "# moved\n[[backends]]\nname = 'a'\n"
