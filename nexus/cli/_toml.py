"""Adding and removing ``[[backends]]`` tables with tomlkit, every other byte kept.

tomlkit keeps a file's comments and layout, but it files the comment lines just above a
table header under the *previous* table (they come after its last key). A reader means the
opposite: ``# the GPU box`` right above ``[[backends]]`` is about that backend. So an edit
here moves comments to where a reader expects them:

- removing a table removes the comment lines directly above its header (no blank line
  between) and keeps the ones directly above the header that follows it;
- appending a table keeps the comment lines that were directly above the header after the
  array right there, below the new table.

What this relies on in tomlkit (``tests/test_cli_toml.py`` pins each): ``Container.body`` is
the live list of ``(key, item)`` pairs (comments and blank lines are ``(None, Comment)`` and
``(None, Whitespace)``); replacing an entry with ``(None, Null())`` deletes it without
moving the others (what tomlkit's own ``remove`` does); a table header is rendered after
``table.trivia.indent``. Every edit is checked afterwards: the data must be the old data
with exactly that change (``EditError`` otherwise), so a tomlkit surprise cannot reach the
file.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

import tomlkit
from tomlkit.container import Container
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Comment, Null, Table, Whitespace
from tomlkit.toml_document import TOMLDocument

#: The top-level key of the backend tables.
KEY = "backends"

_Body = list[tuple[Any, Any]]


class EditError(Exception):
    """The file cannot be edited this way without changing more than the one table."""


def backend_tables(text: str) -> list[dict[str, Any]]:
    """The ``[[backends]]`` tables of ``text`` as plain data (``[]`` when there are none)."""
    found = tomllib.loads(text).get(KEY, [])
    return found if isinstance(found, list) else []


def append_backend(text: str, fields: Mapping[str, object]) -> str:
    """``text`` with a ``[[backends]]`` table of ``fields`` after the last one (or at the end)."""
    newline = "\r\n" if "\r\n" in text else "\n"
    if text.strip() and not text.endswith(newline):
        text += newline  # the last line ends before the new table starts
    doc = _parse(text)
    table = tomlkit.table()
    table.trivia.trail = newline
    for key, value in fields.items():
        entry = tomlkit.item(value)
        entry.trivia.trail = newline
        table.add(key, entry)
    array = _array(doc)
    if array is None:
        table.trivia.indent = _separator(text, newline)
        new = tomlkit.aot()
        new.append(table)
        doc.append(KEY, new)
    else:
        last = _leaf(array[-1])
        following = _header_after(doc, array, len(array) - 1)
        if following is not None:
            # Comments right above what follows the array stay right above it.
            _move_above(following, _take_comments(last.body, len(last.body)))
        if following is None:
            table.trivia.indent = _separator(text, newline)
        elif _ends_blank(last.body):
            # Tables set apart by blank lines, as this one from what follows: the new one too.
            table.add(Whitespace(newline))
        array.append(table)
    expected = tomllib.loads(text)
    expected[KEY] = [*backend_tables(text), dict(fields)]
    return _checked(doc, expected)


def remove_backend(text: str, index: int) -> str:
    """``text`` without its ``index``-th ``[[backends]]`` table and the comments above it."""
    doc = _parse(text)
    array = _array(doc)
    if array is None or not 0 <= index < len(array):
        raise EditError(f"there is no [[{KEY}]] table number {index + 1}")
    above, end = _before(doc, array, index)
    leaf = _leaf(array[index])
    following = _header_after(doc, array, index)
    _drop_comments(above.body, end)
    own = _take_comments(leaf.body, len(leaf.body))
    if following is not None:
        _move_above(following, own)
    elif own and _ends_blank(leaf.body):  # (the comments taken are Null now, skipped)
        # Comments at the end of the file, apart from the table: the file's tail, kept.
        newline = "\r\n" if "\r\n" in text else "\n"
        _append(above, [] if _ends_blank(above.body, end) else [Whitespace(newline)])
        _append(above, own)
    if len(array) == 1:
        del doc[KEY]
    else:
        del array[index]
    if following is None:
        _trim_blank_end(above.body)
    expected = tomllib.loads(text)
    remaining = [t for i, t in enumerate(backend_tables(text)) if i != index]
    if remaining:
        expected[KEY] = remaining
    else:
        expected.pop(KEY, None)
    return _checked(doc, expected)


# ---- parsing and checking


def _parse(text: str) -> TOMLDocument:
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as e:
        raise EditError(f"invalid TOML: {e}") from None
    if doc.as_string() != text:
        # tomlkit would rewrite parts of this file (it does so for some unusual layouts).
        raise EditError("tomlkit cannot keep this file's layout; edit it by hand")
    return doc


def _array(doc: TOMLDocument) -> AoT | None:
    if KEY not in doc:
        return None
    found: object = doc.item(KEY)
    if not isinstance(found, AoT):
        raise EditError(f"'{KEY}' is not written as [[{KEY}]] tables; edit it by hand")
    return found


def _checked(doc: TOMLDocument, expected: Mapping[str, Any]) -> str:
    """The rendered ``doc``, provided it holds exactly ``expected``."""
    text = doc.as_string()
    try:
        got = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        got = None
    if got != expected:
        raise EditError("the edit would change more than the one table; edit it by hand")
    return text


# ---- where comments and tables are


def _leaf(table: Table) -> Container:
    """The container rendered last within ``table`` (its last sub-table's, if it has some)."""
    container = table.value
    while True:
        entries = [(k, v) for k, v in container.body if not isinstance(v, Null)]
        if not entries:
            return container
        key, last = entries[-1]
        if isinstance(last, AoT) and len(last):
            container = last[-1].value
        elif isinstance(last, Table) and key is not None and not key.is_dotted():
            container = last.value
        else:
            return container


def _before(doc: TOMLDocument, array: AoT, index: int) -> tuple[Container, int]:
    """The container rendered right before table ``index``'s header, and where in its body."""
    if index > 0:
        leaf = _leaf(array[index - 1])
        return leaf, len(leaf.body)
    body = doc.body
    position = next(i for i, (_, item) in enumerate(body) if item is array)
    for key, item in reversed(body[:position]):
        if isinstance(item, Null):
            continue
        if key is not None and not key.is_dotted() and isinstance(item, Table | AoT):
            leaf = _leaf(item if isinstance(item, Table) else item[-1])
            return leaf, len(leaf.body)
        break
    return doc, position


def _header_after(doc: TOMLDocument, array: AoT, index: int) -> Table | None:
    """The table whose header comes next after table ``index``'s content, if any."""
    if index + 1 < len(array):
        return array[index + 1]
    body = doc.body
    position = next(i for i, (_, item) in enumerate(body) if item is array)
    for _, item in body[position + 1 :]:
        if isinstance(item, Table | AoT):
            return _first_header(item)
    return None


def _first_header(item: Table | AoT) -> Table | None:
    if isinstance(item, AoT):
        return item[0] if len(item) else None
    if not item.is_super_table():
        return item
    for _, child in item.value.body:
        if isinstance(child, Table | AoT):
            return _first_header(child)
    return None


# ---- moving comments


def _comment_run(body: _Body, end: int) -> range:
    """Indexes of the comment lines directly before ``body[end]`` (no blank line between)."""
    start = end
    while start > 0 and isinstance(body[start - 1][1], Comment | Null):
        start -= 1
    while start < end and isinstance(body[start][1], Null):
        start += 1
    return range(start, end)


def _take_comments(body: _Body, end: int) -> list[Comment]:
    """Remove the comment lines directly before ``body[end]``; return them."""
    taken = [body[i][1] for i in _comment_run(body, end) if isinstance(body[i][1], Comment)]
    _drop_comments(body, end)
    return taken


def _drop_comments(body: _Body, end: int) -> None:
    for i in _comment_run(body, end):
        body[i] = (None, Null())


def _move_above(table: Table, comments: list[Comment]) -> None:
    """Put ``comments`` right above ``table``'s header."""
    if comments:
        table.trivia.indent = "".join(c.as_string() for c in comments) + table.trivia.indent


def _append(container: Container, items: list[Any]) -> None:
    container.body.extend((None, item) for item in items)


def _blank_before(body: _Body, end: int) -> bool:
    """Whether a blank line comes right before ``body[end]``."""
    for _, item in reversed(body[:end]):
        if not isinstance(item, Null):
            return isinstance(item, Whitespace) and "\n" in item.as_string()
    return False


def _ends_blank(body: _Body, end: int | None = None) -> bool:
    return _blank_before(body, len(body) if end is None else end)


def _trim_blank_end(body: _Body) -> None:
    """Drop the blank lines at the very end of ``body`` (the file's end)."""
    for i in range(len(body) - 1, -1, -1):
        item = body[i][1]
        if isinstance(item, Null):
            continue
        if not isinstance(item, Whitespace):
            return
        body[i] = (None, Null())


def _separator(text: str, newline: str) -> str:
    """What goes before a table appended to ``text`` (which ends with ``newline``): a blank
    line, unless there is one already."""
    return "" if not text.strip() or text.endswith(newline * 2) else newline
