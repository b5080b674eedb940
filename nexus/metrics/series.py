"""What the collector records: plain Python series, and their exposition groups.

A *series* holds the numbers recorded under one combination of raw names (the
model the client asked for, or ``unknown``; the backend id, or ``none``). It is the
single source of truth for ``/metrics`` and ``/v1/stats``.

A *group* is one set of exposed label values. Names are sanitized for Prometheus,
so two raw names can collide (``llama3:70b`` and ``llama3.70b`` both become
``llama3_70b``); a group then has several member series and is exposed as their
sum, never as duplicate series. Groups also carry the renderer's cache.

Histogram counts are stored per bucket (not cumulative), the last slot being the
``+Inf`` overflow; cumulative counts are computed at render time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, Self, TypeVar

from nexus.metrics.families import DURATION_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS, Family


def _empty(bounds: Sequence[float]) -> list[int]:
    return [0] * (len(bounds) + 1)


def _add(into: list[int], counts: list[int]) -> None:
    for i, c in enumerate(counts):
        into[i] += c


class Series:
    """Base of the recorded series: a dirty flag and the group it is exposed in."""

    __slots__ = ("dirty", "group")

    def __init__(self) -> None:
        self.dirty = False
        self.group: Group[Self] | None = None

    def empty_like(self) -> Self:
        """A series with the same names and no observations."""
        raise NotImplementedError

    def merge(self, other: Self) -> None:
        """Add ``other``'s numbers to this one (used for colliding label values)."""
        raise NotImplementedError


class PairSeries(Series):
    """Requests recorded for one (model, backend) pair of raw names.

    ``ttft``, ``prompt`` and ``completion`` stay ``None`` until first observed, so
    pairs that never stream or report usage expose no empty histograms.
    """

    __slots__ = (
        "backend",
        "completion",
        "completion_sum",
        "duration",
        "duration_sum",
        "model",
        "prompt",
        "prompt_sum",
        "requests",
        "statuses",
        "ttft",
        "ttft_sum",
    )

    def __init__(self, model: str, backend: str) -> None:
        super().__init__()
        self.model = model
        self.backend = backend
        #: Requests recorded (each also has exactly one duration observation).
        self.requests = 0
        self.statuses: dict[str, int] = {}
        self.duration = _empty(DURATION_BUCKETS)
        self.duration_sum = 0.0
        self.ttft: list[int] | None = None
        self.ttft_sum = 0.0
        self.prompt: list[int] | None = None
        self.prompt_sum = 0
        self.completion: list[int] | None = None
        self.completion_sum = 0

    def empty_like(self) -> PairSeries:
        """A series with the same names and no observations."""
        return PairSeries(self.model, self.backend)

    def merge(self, other: PairSeries) -> None:
        """Add ``other``'s numbers to this one (used for colliding label values)."""
        self.requests += other.requests
        for status, n in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + n
        _add(self.duration, other.duration)
        self.duration_sum += other.duration_sum
        if other.ttft is not None:
            if self.ttft is None:
                self.ttft = _empty(TTFT_BUCKETS)
            _add(self.ttft, other.ttft)
            self.ttft_sum += other.ttft_sum
        if other.prompt is not None:
            if self.prompt is None:
                self.prompt = _empty(TOKEN_BUCKETS)
            _add(self.prompt, other.prompt)
            self.prompt_sum += other.prompt_sum
        if other.completion is not None:
            if self.completion is None:
                self.completion = _empty(TOKEN_BUCKETS)
            _add(self.completion, other.completion)
            self.completion_sum += other.completion_sum


class CountSeries(Series):
    """A plain counter of ``family`` under raw label values (errors, fallbacks)."""

    __slots__ = ("count", "family", "names")

    def __init__(self, family: Family, names: tuple[str, str]) -> None:
        super().__init__()
        self.family = family
        self.names = names
        self.count = 0

    def empty_like(self) -> CountSeries:
        """A series with the same names and no observations."""
        return CountSeries(self.family, self.names)

    def merge(self, other: CountSeries) -> None:
        """Add ``other``'s count to this one."""
        self.count += other.count


class HealthSeries(Series):
    """Health-check round trips of one backend."""

    __slots__ = ("backend", "counts", "sum")

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.counts = _empty(DURATION_BUCKETS)
        self.sum = 0.0

    def empty_like(self) -> HealthSeries:
        """A series with the same names and no observations."""
        return HealthSeries(self.backend)

    def merge(self, other: HealthSeries) -> None:
        """Add ``other``'s observations to this one."""
        _add(self.counts, other.counts)
        self.sum += other.sum


S = TypeVar("S", bound=Series)


class Group(Generic[S]):
    """One exposed label set (sanitized values) and the series that map to it.

    ``cache`` belongs to the renderer (rendered lines and their templates);
    ``stale`` is set while the renderer has yet to re-render the group.
    """

    __slots__ = ("cache", "key", "members", "stale")

    def __init__(self, key: tuple[str, ...], first: S) -> None:
        self.key = key
        self.members: list[S] = [first]
        self.stale = True
        self.cache: object = None

    def merged(self) -> S:
        """The members' numbers summed (the member itself when there is only one)."""
        members = self.members
        if len(members) == 1:
            return members[0]
        total = members[0].empty_like()
        for member in members:
            total.merge(member)
        return total
