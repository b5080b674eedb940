"""The dashboard's charts: the last 15 minutes of requests in 10-second buckets, in memory.

A :class:`TimeSeries` is a recorder of the server layer: every finished request adds one
to its bucket's outcome count and to one bin of its bucket's duration histogram, a few
integer operations whatever the load (O(1): the bin is found by bisection over a fixed
list of bounds). Memory is fixed too: ``BUCKETS`` buckets in a ring, each a few counts and
``len(BOUNDS) + 1`` bins, reused as time moves on.

Percentiles are read from the histogram: the bounds grow by ``RATIO`` from 1 ms to 10
minutes, and a percentile is placed inside its bin (geometrically, by rank), so it is
within one bin, 15 %, of the exact value (about 7 % for a single sample), which a chart
cannot show anyway. A finished bucket never changes again, so its point is computed once.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from nexus.tracking import CLIENT_CLOSED, RequestRecord

#: Seconds per bucket.
BUCKET_SECONDS = 10
#: Buckets kept: 15 minutes.
BUCKETS = 90
#: Upper bounds of the duration bins (seconds): 1 ms x RATIO^k up to 10 minutes.
RATIO = 1.15
BOUNDS: tuple[float, ...] = tuple(
    0.001 * RATIO**k for k in range(math.ceil(math.log(600_000) / math.log(RATIO)) + 1)
)

#: Outcomes, as the request log names them (``status`` of a history entry).
SUCCESS, ERROR, CLIENT_DISCONNECT = "success", "error", "client_disconnect"
OUTCOMES = (SUCCESS, ERROR, CLIENT_DISCONNECT)


def outcome(record: RequestRecord) -> str:
    """``success`` (2xx), ``client_disconnect`` (the client left first) or ``error``."""
    status = record.status
    if 200 <= status < 300:
        return SUCCESS
    if status == CLIENT_CLOSED and record.client_gone:
        return CLIENT_DISCONNECT
    return ERROR


def percentile(bins: list[int], count: int, q: float) -> float:
    """The ``q`` quantile (0..1) of ``count`` durations binned by ``BOUNDS``, in seconds.

    Interpolated geometrically inside the bin that holds it (a bin's samples are taken
    as spread evenly over it); 0.0 with no samples.
    """
    if count <= 0:
        return 0.0
    rank = max(1, math.ceil(q * count))
    seen = 0
    for index, n in enumerate(bins):
        if not n:
            continue
        if seen + n >= rank:
            if index >= len(BOUNDS):
                return BOUNDS[-1]  # past the last bound: the chart tops out there
            upper = BOUNDS[index]
            lower = BOUNDS[index - 1] if index else upper / RATIO
            return float(lower * (upper / lower) ** ((rank - seen - 0.5) / n))
        seen += n
    return BOUNDS[-1]


class Bucket:
    """One 10-second bucket: requests by outcome and a histogram of their durations."""

    __slots__ = ("bins", "count", "error", "gone", "slot", "success")

    def __init__(self, slot: int) -> None:
        #: The bucket's start time divided by BUCKET_SECONDS.
        self.slot = slot
        self.success = 0
        self.error = 0
        self.gone = 0
        self.count = 0
        self.bins = [0] * (len(BOUNDS) + 1)

    def point(self, seconds: float) -> list[Any]:
        """``[start, success/s, error/s, client_disconnect/s, p50 ms, p95 ms]`` over ``seconds``."""
        count = self.count
        return [
            self.slot * BUCKET_SECONDS,
            round(self.success / seconds, 3),
            round(self.error / seconds, 3),
            round(self.gone / seconds, 3),
            round(percentile(self.bins, count, 0.50) * 1000.0, 2) if count else None,
            round(percentile(self.bins, count, 0.95) * 1000.0, 2) if count else None,
        ]


class TimeSeries:
    """The last ``BUCKETS`` buckets of finished requests; ``record`` is the recorder.

    ``clock`` is wall-clock time (seconds since the epoch): the chart's time axis.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._ring: list[Bucket | None] = [None] * BUCKETS
        self._current = Bucket(-1)
        #: Points of finished buckets, by slot (they never change).
        self._points: dict[int, list[Any]] = {}

    def record(self, record: RequestRecord) -> None:
        """Count one finished request in the bucket of now."""
        self.add(self.clock(), outcome(record), record.duration)

    def add(self, now: float, kind: str, duration: float) -> None:
        """Count one request of outcome ``kind`` that took ``duration`` seconds, at ``now``."""
        bucket = self._current
        slot = int(now // BUCKET_SECONDS)
        if slot != bucket.slot:
            if slot < bucket.slot:
                return  # the wall clock stepped back: not worth a wrong chart
            bucket = self._advance(slot)
        if kind == SUCCESS:
            bucket.success += 1
        elif kind == ERROR:
            bucket.error += 1
        else:
            bucket.gone += 1
        bucket.count += 1
        if not 0.0 <= duration < math.inf:
            duration = 0.0
        bucket.bins[bisect_left(BOUNDS, duration)] += 1

    def _advance(self, slot: int) -> Bucket:
        bucket = self._current = Bucket(slot)
        self._ring[slot % BUCKETS] = bucket
        return bucket

    def points(self, now: float | None = None) -> list[list[Any]]:
        """One point per bucket of the last 15 minutes, oldest first (see :meth:`Bucket.point`).

        Buckets without requests are points with zero rates and no percentiles; the
        current bucket's rates are over the seconds it has lasted so far.
        """
        now = self.clock() if now is None else now
        last = int(now // BUCKET_SECONDS)
        first = last - BUCKETS + 1
        cache = self._points
        for old in [slot for slot in cache if slot < first]:
            del cache[old]
        out: list[list[Any]] = []
        for slot in range(first, last + 1):
            bucket = self._ring[slot % BUCKETS]
            if bucket is None or bucket.slot != slot:
                out.append([slot * BUCKET_SECONDS, 0.0, 0.0, 0.0, None, None])
            elif slot == last:
                elapsed = max(1.0, now - slot * BUCKET_SECONDS)
                out.append(bucket.point(elapsed))
            else:
                point = cache.get(slot)
                if point is None:
                    point = cache[slot] = bucket.point(BUCKET_SECONDS)
                out.append(point)
        return out
