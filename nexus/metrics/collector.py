"""The metrics collector: one per running gateway, fed by the request path.

Everything runs on the reactor thread, so recording is a dict lookup of a cached
series object plus a few integer and float increments; there are no locks.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left, insort
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from nexus.metrics.exposition import Renderer
from nexus.metrics.families import (
    DURATION_BUCKETS,
    ERROR_TYPES,
    ERRORS,
    FALLBACKS,
    TOKEN_BUCKETS,
    TTFT_BUCKETS,
    Family,
)
from nexus.metrics.labels import NO_BACKEND, UNKNOWN_MODEL, sanitize_label
from nexus.metrics.series import CountSeries, Group, HealthSeries, PairSeries, Series
from nexus.metrics.stats import Stats, build_stats
from nexus.registry import BackendRegistry

if TYPE_CHECKING:
    from nexus.tracking import RequestRecord

_INF = math.inf
_STATUS_LABELS: dict[object, str] = {code: str(code) for code in range(100, 600)}

S = TypeVar("S", bound=Series)


def _seconds(value: object) -> float:
    """A duration as a finite, non-negative float (0.0 for anything odd)."""
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return seconds if 0.0 <= seconds < _INF else 0.0


def _status_label(status: object) -> str:
    """The ``status`` label of an unusual status value (``"0"`` if not an HTTP code)."""
    if isinstance(status, str) and status.isdigit():
        return _STATUS_LABELS.get(int(status), "0")
    return "0"


def _tokens(value: object) -> int | None:
    """A token count, or None when ``value`` is not a non-negative int."""
    if type(value) is int and value >= 0:
        return value
    return None


class MetricsCollector:
    """Records what the gateway did and exposes it as ``/metrics`` and ``/v1/stats``.

    The series (``pairs``, ``errors``, ``fallbacks``, ``health``) are the one
    source of truth; the ``/metrics`` body comes from :class:`Renderer`, the
    ``/v1/stats`` document from :func:`build_stats`.
    """

    def __init__(
        self, registry: BackendRegistry, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.started = clock()
        #: Truth: one series per (resolved model, backend) pair.
        self.pairs: dict[tuple[str, str], PairSeries] = {}
        #: Truth: one series per (error_type, resolved model).
        self.errors: dict[tuple[str, str], CountSeries] = {}
        #: Truth: one series per (from_model, to_model), both resolved.
        self.fallbacks: dict[tuple[str, str], CountSeries] = {}
        #: Truth: one series per backend that had a health check.
        self.health: dict[str, HealthSeries] = {}
        #: Exposed label sets, sorted by their sanitized label values.
        self.pair_groups: list[Group[PairSeries]] = []
        self.error_groups: list[Group[CountSeries]] = []
        self.fallback_groups: list[Group[CountSeries]] = []
        self.health_groups: list[Group[HealthSeries]] = []
        self._pair_index: dict[tuple[str, ...], Group[PairSeries]] = {}
        self._error_index: dict[tuple[str, ...], Group[CountSeries]] = {}
        self._fallback_index: dict[tuple[str, ...], Group[CountSeries]] = {}
        self._health_index: dict[tuple[str, ...], Group[HealthSeries]] = {}
        #: Series recorded to since the last render.
        self.dirty: list[Series] = []
        # Raw (model, backend) arguments -> series, for known models only, so that
        # random names sent by clients cannot grow it. Cleared when the set of
        # known models changes, since that can move a name to or from `unknown`.
        self._lookup: dict[tuple[object, object], PairSeries] = {}
        self._known = registry.known_models
        #: Reads how many log lines the log destination dropped (exposed as a counter).
        self.log_drops: Callable[[], int] = lambda: 0
        #: Reads how many dashboard event streams are open (exposed as a gauge).
        self.dashboard_subscribers: Callable[[], int] = lambda: 0
        self.renderer = Renderer(self)

    # -- recording -------------------------------------------------------------

    def record_request(self, record: RequestRecord) -> None:
        """Record one finished client request (the caller calls this exactly once).

        ``record.model`` is the name the client asked for (None: no usable model);
        names the gateway does not know are recorded as ``unknown``.
        ``record.backend`` None means no backend was chosen (``none``).
        ``duration`` and ``time_to_first_token`` are seconds. Odd values never
        raise: bad durations count as 0, bad token counts are ignored, unknown
        error types count as ``other``.
        """
        model = record.model
        backend = record.backend
        status = record.status
        duration = record.duration
        known = self.registry.known_models
        if known is not self._known:
            self._known = known
            self._lookup.clear()
        try:
            series = self._lookup[(model, backend)]
        except (KeyError, TypeError):
            series = self._pair_for(model, backend, record.actual_model is not None)
        try:
            label = _STATUS_LABELS[status]
        except (KeyError, TypeError):
            label = _status_label(status)
        series.requests += 1
        statuses = series.statuses
        statuses[label] = statuses.get(label, 0) + 1
        if duration.__class__ is not float or not 0.0 <= duration < _INF:
            duration = _seconds(duration)
        series.duration[bisect_left(DURATION_BUCKETS, duration)] += 1
        series.duration_sum += duration
        ttft = record.time_to_first_token
        if ttft is not None:
            self._observe_ttft(series, ttft)
        prompt = record.prompt_tokens
        if prompt is not None and (n := _tokens(prompt)) is not None:
            if series.prompt is None:
                series.prompt = [0] * (len(TOKEN_BUCKETS) + 1)
            series.prompt[bisect_left(TOKEN_BUCKETS, n)] += 1
            series.prompt_sum += n
        completion = record.completion_tokens
        if completion is not None and (n := _tokens(completion)) is not None:
            if series.completion is None:
                series.completion = [0] * (len(TOKEN_BUCKETS) + 1)
            series.completion[bisect_left(TOKEN_BUCKETS, n)] += 1
            series.completion_sum += n
        if not series.dirty:
            series.dirty = True
            self.dirty.append(series)
        error_type = record.error_type
        if error_type is not None:
            self._record_error(error_type, series.model)
        fallback_to = record.fallback_to
        if fallback_to is not None:
            fallback_from = record.fallback_from
            self._record_fallback(model if fallback_from is None else fallback_from, fallback_to)

    def record_health_check(self, backend: str, seconds: float) -> None:
        """Record the round trip of one health check that got an HTTP response."""
        series = self._health_series(backend if isinstance(backend, str) else NO_BACKEND)
        seconds = _seconds(seconds)
        series.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        series.sum += seconds
        self._mark(series)

    def _health_series(self, name: str) -> HealthSeries:
        series = self.health.get(name)
        if series is None:
            series = self.health[name] = HealthSeries(name)
            self._attach(series, (sanitize_label(name),), self._health_index, self.health_groups)
        return series

    def _mark(self, series: Series) -> None:
        if not series.dirty:
            series.dirty = True
            self.dirty.append(series)

    def _model_name(self, model: object, routed: bool = False) -> str:
        """The raw model name recorded for ``model``: itself if known, else ``unknown``.

        ``routed``: the router resolved it, so it was known then (its backends may have
        left the fleet since, while the request ran).
        """
        if isinstance(model, str) and (routed or self.registry.is_known_model(model)):
            return model
        return UNKNOWN_MODEL

    def _pair_for(self, model: object, backend: object, routed: bool = False) -> PairSeries:
        """Find or create the series for a cache miss; cache it when the model is known."""
        name = self._model_name(model, routed)
        backend_name = backend if isinstance(backend, str) else NO_BACKEND
        key = (name, backend_name)
        series = self.pairs.get(key)
        if series is None:
            series = self.pairs[key] = PairSeries(name, backend_name)
            labels = (sanitize_label(name), sanitize_label(backend_name))
            self._attach(series, labels, self._pair_index, self.pair_groups)
        if name is model:
            self._lookup[(model, backend)] = series
        return series

    def _attach(
        self,
        series: S,
        labels: tuple[str, ...],
        index: dict[tuple[str, ...], Group[S]],
        groups: list[Group[S]],
    ) -> None:
        """Put a new series into the group of its sanitized label values."""
        group = index.get(labels)
        if group is None:
            group = index[labels] = Group(labels, series)
            insort(groups, group, key=lambda g: g.key)
        else:
            group.members.append(series)
        series.group = group

    def _observe_ttft(self, series: PairSeries, value: object) -> None:
        if type(value) is not float and type(value) is not int:
            return  # not a number of seconds (bools included): nothing to observe
        seconds = _seconds(value)
        if series.ttft is None:
            series.ttft = [0] * (len(TTFT_BUCKETS) + 1)
        series.ttft[bisect_left(TTFT_BUCKETS, seconds)] += 1
        series.ttft_sum += seconds

    def _record_error(self, error_type: object, model: str) -> None:
        kind = error_type if isinstance(error_type, str) and error_type in ERROR_TYPES else "other"
        self._count(ERRORS, self.errors, self._error_index, self.error_groups, (kind, model))

    def _record_fallback(self, from_model: object, to_model: object) -> None:
        names = (self._model_name(from_model), self._model_name(to_model))
        self._count(FALLBACKS, self.fallbacks, self._fallback_index, self.fallback_groups, names)

    def _count(
        self,
        family: Family,
        store: dict[tuple[str, str], CountSeries],
        index: dict[tuple[str, ...], Group[CountSeries]],
        groups: list[Group[CountSeries]],
        names: tuple[str, str],
    ) -> None:
        series = self._count_series(family, store, index, groups, names)
        series.count += 1
        self._mark(series)

    def _count_series(
        self,
        family: Family,
        store: dict[tuple[str, str], CountSeries],
        index: dict[tuple[str, ...], Group[CountSeries]],
        groups: list[Group[CountSeries]],
        names: tuple[str, str],
    ) -> CountSeries:
        """The series of ``names`` in ``store``, made (and attached to its group) on first use."""
        series = store.get(names)
        if series is None:
            series = store[names] = CountSeries(family, names)
            labels = (sanitize_label(names[0]), sanitize_label(names[1]))
            self._attach(series, labels, index, groups)
        return series

    # -- copies (worker mode: a new worker starts from the gateway's counts) ---------------

    def export(self) -> list[Series]:
        """Copies of every series (no groups, no caches): what :meth:`absorb` takes."""
        every: list[Series] = [
            *self.pairs.values(), *self.errors.values(), *self.fallbacks.values(),
            *self.health.values(),
        ]
        out: list[Series] = []
        for series in every:
            copy = series.empty_like()
            copy.merge(series)
            out.append(copy)
        return out

    def absorb(self, copies: list[Series]) -> None:
        """Add exported series' numbers to this collector's (a worker's start)."""
        for copy in copies:
            series: Series
            if isinstance(copy, PairSeries):
                series = self._pair_for(copy.model, copy.backend, routed=True)
            elif isinstance(copy, CountSeries):
                # A copied family is equal, not the same object: compare names.
                family, store, index, groups = (
                    (ERRORS, self.errors, self._error_index, self.error_groups)
                    if copy.family.name == ERRORS.name
                    else (FALLBACKS, self.fallbacks, self._fallback_index, self.fallback_groups)
                )
                series = self._count_series(family, store, index, groups, copy.names)
            elif isinstance(copy, HealthSeries):
                series = self._health_series(copy.backend)
            else:
                continue
            series.merge(copy)  # type: ignore[arg-type]  # the same class, checked above
            self._mark(series)

    # -- reading ---------------------------------------------------------------

    def uptime(self) -> int:
        """Whole seconds since the collector was created."""
        return max(0, int(self.clock() - self.started))

    def iter_pairs(self) -> Iterator[PairSeries]:
        """Every request series (raw names), in creation order."""
        return iter(self.pairs.values())

    def render(self, openmetrics: bool = False, gzip: bool = False) -> bytes:
        """The ``/metrics`` body: Prometheus text (or OpenMetrics), optionally gzipped."""
        return self.renderer.render(openmetrics=openmetrics, gzip=gzip)

    def stats(self) -> Stats:
        """The ``/v1/stats`` numbers."""
        return build_stats(self)

    def stats_json(self) -> bytes:
        """The ``/v1/stats`` body (UTF-8 JSON)."""
        return self.stats().to_json()

