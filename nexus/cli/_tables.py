"""Aligned text tables for people (``--json`` is for programs)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any


def table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()
) -> str:
    """``rows`` under ``headers`` in columns two spaces apart; columns in ``right`` (numbers)
    are right-aligned. No trailing spaces; ends with a newline."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def text(value: Any) -> str:
    """A JSON value as a cell: ``-`` for null, as-is otherwise."""
    return "-" if value is None else str(value)


def fleet_table(fleet: Sequence[dict[str, Any]]) -> str:
    """``/health``'s ``fleet`` as a table."""
    rows = [
        [
            text(b.get("id")),
            text(b.get("type")),
            text(b.get("status")),
            text(b.get("source")),
            text(b.get("models")),
            _latency(b.get("average_latency_ms")),
            text(b.get("last_check")),
            _one_line(b.get("last_error")),
        ]
        for b in fleet
    ]
    headers = ["ID", "TYPE", "STATUS", "SOURCE", "MODELS", "LATENCY", "LAST CHECK", "LAST ERROR"]
    return table(headers, rows, right={4, 5})


def models_table(models: Sequence[dict[str, Any]]) -> str:
    """``/v1/models``' ``data`` as a table."""
    rows = [
        [
            text(m.get("id")),
            ", ".join(str(b) for b in m.get("backends") or []) or "-",
            text(m.get("alias_of")),
        ]
        for m in models
    ]
    return table(["MODEL", "BACKENDS", "ALIAS OF"], rows)


def duration(seconds: int) -> str:
    """``3d 4h``, ``2h 5m``, ``4m 10s``, ``12s``: an uptime at a glance."""
    days, rest = divmod(max(seconds, 0), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _latency(value: Any) -> str:
    if isinstance(value, int | float):
        return f"{value:g} ms"
    return text(value)


def _one_line(value: Any) -> str:
    return "-" if value is None else " ".join(str(value).split())
