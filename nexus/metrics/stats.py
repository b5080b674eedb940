"""``GET /v1/stats``: the collector's numbers as JSON for people and dashboards.

Computed from the same series as ``/metrics``, so the two never disagree. Names
here are raw (unsanitized); requests for models the gateway does not know are
summed under ``unknown``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import attrs
import cattrs

if TYPE_CHECKING:
    from nexus.metrics.collector import MetricsCollector

_converter = cattrs.Converter()
#: ``status`` labels counted as success.
_SUCCESS = frozenset(str(code) for code in range(200, 300))


@attrs.frozen
class RequestTotals:
    """All recorded requests: ``success`` answered 2xx, ``errors`` = total - success."""

    total: int
    success: int
    errors: int


@attrs.frozen
class BackendStats:
    """One backend: requests it served, their mean duration (ms), in flight now.

    Also what ``/health``'s ``fleet`` says of it: ``status``, ``type``,
    ``source`` and ``models`` (the ids it lists, sorted: its last successful
    discovery plus the configured floor, whatever its status now).
    """

    id: str
    requests: int
    average_latency_ms: float
    pending: int
    status: str
    type: str
    source: str
    models: tuple[str, ...]


@attrs.frozen
class ModelStats:
    """One requested model: requests and their mean duration (ms)."""

    name: str
    requests: int
    average_duration_ms: float


@attrs.frozen
class Stats:
    """The whole ``/v1/stats`` document (schema: ``stats.schema.json``)."""

    uptime_seconds: int
    requests: RequestTotals
    backends: tuple[BackendStats, ...]
    models: tuple[ModelStats, ...]

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready data."""
        data: dict[str, object] = _converter.unstructure(self)
        return data

    def to_json(self) -> bytes:
        """UTF-8 JSON bytes."""
        return json.dumps(self.to_dict(), separators=(",", ":")).encode("utf-8")


class _Sum:
    """Requests and their summed duration, while aggregating."""

    __slots__ = ("requests", "seconds")

    def __init__(self) -> None:
        self.requests = 0
        self.seconds = 0.0

    def mean_ms(self) -> float:
        """Mean duration in ms, 1 decimal; 0.0 without samples."""
        if not self.requests:
            return 0.0
        return round(self.seconds * 1000.0 / self.requests, 1)


_NOTHING = _Sum()


def build_stats(collector: MetricsCollector) -> Stats:
    """Aggregate the collector's request series into :class:`Stats`."""
    total = success = 0
    by_backend: dict[str, _Sum] = {}
    by_model: dict[str, _Sum] = {}
    for series in collector.iter_pairs():
        requests = series.requests
        if not requests:
            continue
        total += requests
        statuses = series.statuses
        for status in statuses:  # a handful of distinct codes per pair
            if status in _SUCCESS:
                success += statuses[status]
        for key, table in ((series.backend, by_backend), (series.model, by_model)):
            acc = table.get(key)
            if acc is None:
                acc = table[key] = _Sum()
            acc.requests += requests
            acc.seconds += series.duration_sum
    # The current fleet only: a removed backend's requests stay in the totals
    # (and in /metrics) but it has no row.
    backends = []
    for backend in collector.registry.backends:
        acc = by_backend.get(backend.name, _NOTHING)
        backends.append(
            BackendStats(
                backend.name,
                acc.requests,
                acc.mean_ms(),
                backend.gateway_pending,
                backend.status,
                backend.type,
                backend.source,
                tuple(sorted(backend.models)),
            )
        )
    models = []
    for name in by_model.keys() | set(collector.registry.available_model_names()):
        acc = by_model.get(name, _NOTHING)
        models.append(ModelStats(name, acc.requests, acc.mean_ms()))
    models.sort(key=lambda m: (-m.requests, m.name))
    return Stats(
        uptime_seconds=collector.uptime(),
        requests=RequestTotals(total=total, success=success, errors=total - success),
        backends=tuple(backends),
        models=tuple(models),
    )
