"""The dashboard's live view: what the page shows, and the events that keep it current.

:class:`LiveView` is a recorder of the server layer and an observer of the backend
registry. Recording a request is O(1) and cheap whether or not a dashboard is open:
a count in the time series and an entry in a small ring (the record itself; its
history entry is built only if someone looks). With subscribers, finished requests
are sent in one batch every ``FLUSH_SECONDS`` (at most ``MAX_PER_FLUSH`` of them, the
newest: the page shows the last 50), a backend's change at once, and the stats
every ``STATS_SECONDS``; with none, no timer runs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from nexus import __version__
from nexus.api import fleet_entry
from nexus.dashboard.hub import EventHub, Subscriber, frame
from nexus.dashboard.timeseries import BUCKET_SECONDS, BUCKETS, TimeSeries, outcome
from nexus.metrics import MetricsCollector
from nexus.registry import HEALTHY, Backend, BackendRegistry, format_timestamp
from nexus.requestlog import request_event
from nexus.tracking import RequestRecord

log = Logger()

#: Finished requests the page lists (and replays to a new subscriber).
RECENT = 50
#: How often finished requests go out to subscribers, at most (seconds).
FLUSH_SECONDS = 0.5
#: Requests sent per flush, at most: the newest (the page lists RECENT).
MAX_PER_FLUSH = RECENT
#: The period of ``event: stats`` (seconds).
STATS_SECONDS = 2.0
#: EventSource's wait before it reconnects (ms), sent as the stream's ``retry:``.
RETRY_MS = 2000

_SUCCESS = frozenset(str(code) for code in range(200, 300))


def request_entry(finished: float, record: RequestRecord) -> dict[str, Any]:
    """A request as ``event: request`` carries it: its history entry plus ``finished_at``."""
    entry = request_event(record)
    entry["finished_at"] = format_timestamp(finished)
    return entry


class LiveView:
    """The state behind the page and ``/v1/events``.

    ``clock`` is wall-clock time (seconds since the epoch). ``reactor`` runs the
    flush and stats timers.
    """

    def __init__(
        self,
        registry: BackendRegistry,
        collector: MetricsCollector,
        reactor: IReactorTime,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.collector = collector
        self.reactor = reactor
        self.clock = clock
        self.series = TimeSeries(clock)
        self.recent: deque[tuple[float, RequestRecord]] = deque(maxlen=RECENT)
        self.hub = EventHub(on_idle=self._idle)
        #: Fires once the numbers include every request finished before now (worker mode:
        #: a round trip to the other workers; see ``NexusAPI.synced``).
        self.synced: Callable[[], Deferred[None]] = lambda: succeed(None)
        # Requests finished / sent to subscribers, since start (the difference is pending).
        self._finished = 0
        self._sent = 0
        self._flush: IDelayedCall | None = None
        self._ticker: LoopingCall | None = None
        registry.observers.append(self.backend_changed)

    # -- recording (the hot path) --------------------------------------------------------

    def record(self, record: RequestRecord) -> None:
        """A recorder: count ``record`` in the charts, keep it for the page, send it soon."""
        now = self.clock()
        self.series.add(now, outcome(record), record.duration)
        self.recent.append((now, record))
        self._finished += 1
        if self._flush is None and self.hub.subscribers:
            self._flush = self.reactor.callLater(FLUSH_SECONDS, self._send_requests)

    def _send_requests(self) -> None:
        self._flush = None
        pending = self._finished - self._sent
        self._sent = self._finished
        if not (pending and self.hub.subscribers):
            return
        count = min(pending, MAX_PER_FLUSH, len(self.recent))
        newest = list(islice(reversed(self.recent), count))
        try:
            data = b"".join(frame("request", request_entry(*item)) for item in reversed(newest))
        except Exception:
            log.failure("dashboard: building the request events failed")
            return
        self.hub.broadcast(data)

    def backend_changed(self, backend: Backend, removed: bool) -> None:
        """A registry observer: send the backend's fleet entry (``removed`` when it left)."""
        if not self.hub.subscribers:
            return
        entry = fleet_entry(backend)
        if removed:
            entry["removed"] = True
        self.hub.broadcast(frame("backend", entry))

    # -- what the page shows ---------------------------------------------------------------

    def requests(self) -> list[dict[str, Any]]:
        """The last finished requests (``RECENT`` at most), newest first."""
        return [request_entry(*item) for item in reversed(self.recent)]

    def snapshot(self) -> dict[str, Any]:
        """Totals, the fleet, the model matrix and the charts: ``event: stats``, and the page."""
        stats = self.collector.stats()
        errors: dict[str, int] = {}
        prompt = completion = 0
        for series in self.collector.iter_pairs():
            prompt += series.prompt_sum
            completion += series.completion_sum
            if series.requests:
                ok = sum(n for status, n in series.statuses.items() if status in _SUCCESS)
                errors[series.backend] = errors.get(series.backend, 0) + series.requests - ok
        by_id = {b.id: b for b in stats.backends}
        backends = []
        models: set[str] = set()
        for backend in self.registry.backends:
            row = by_id.get(backend.name)
            models |= backend.models
            backends.append({
                **fleet_entry(backend),
                "models": sorted(backend.models),
                "pending": backend.gateway_pending,
                "requests": row.requests if row else 0,
                "errors": errors.get(backend.name, 0),
                # The mean over every request it served, as /v1/stats says.
                "average_latency_ms": row.average_latency_ms if row else 0.0,
            })
        totals = stats.requests
        now = self.clock()
        return {
            "version": __version__,
            "now": round(now, 3),
            "uptime_seconds": stats.uptime_seconds,
            "requests": {"total": totals.total, "success": totals.success,
                         "errors": totals.errors},
            "error_rate": round(totals.errors / totals.total, 4) if totals.total else 0.0,
            "tokens": {"prompt": prompt, "completion": completion,
                       "total": prompt + completion},
            "fleet": {"total": len(backends),
                      "healthy": sum(1 for b in self.registry.backends if b.status == HEALTHY)},
            "backends": backends,
            "matrix": self._matrix(sorted(models)),
            "aliases": dict(sorted(self.registry.available_aliases().items())),
            "series": {"bucket_seconds": BUCKET_SECONDS, "buckets": BUCKETS,
                       "points": self.series.points(now)},
        }

    def _matrix(self, models: Iterable[str]) -> list[dict[str, Any]]:
        """One row per model: for each backend listing it, its status and capabilities."""
        rows = []
        for model in models:
            cells: dict[str, Any] = {}
            for backend in self.registry.by_model.get(model, ()):
                caps = backend.config.model_capabilities.get(model)
                cells[backend.name] = {
                    "status": backend.status,
                    "capabilities": None if caps is None else sorted(caps),
                }
            rows.append({"model": model, "backends": cells})
        return rows

    # -- subscribers -------------------------------------------------------------------------

    def subscribe(self, request: Request) -> Subscriber | None:
        """Open an event stream on ``request``: the state now, then every change.

        The stream starts with ``retry:``, ``event: stats``, an ``event: backend`` per
        backend and the requests already sent to others (oldest first); requests not
        sent yet follow with the next flush, to everyone. None when the hub is full.
        """
        subscriber = self.hub.subscribe(request)
        if subscriber is None or subscriber.closed:
            return subscriber
        if len(self.hub) == 1:
            self._sent = self._finished  # nobody was listening: nothing is pending
        parts = [b"retry: %d\n\n" % RETRY_MS, frame("stats", self.snapshot())]
        parts += [frame("backend", fleet_entry(b)) for b in self.registry.backends]
        unsent = min(self._finished - self._sent, len(self.recent))
        sent = list(islice(self.recent, 0, len(self.recent) - unsent))
        parts += [frame("request", request_entry(*item)) for item in sent]
        subscriber.send(b"".join(parts))
        if self._ticker is None:
            self._ticker = LoopingCall(self._tick)
            self._ticker.clock = self.reactor
            self._ticker.start(STATS_SECONDS, now=False).addErrback(
                lambda f: log.failure("dashboard stats ticker stopped", f)
            )
        return subscriber

    def _tick(self) -> Deferred[None]:
        # In worker mode the numbers first take in every worker's (``synced``).
        return self.synced().addCallbacks(self._send_stats, self._sync_failed)

    def _send_stats(self, _: object) -> None:
        try:
            self.hub.broadcast(frame("stats", self.snapshot()))
        except Exception:
            log.failure("dashboard: building the stats event failed")

    def _sync_failed(self, failure: Failure) -> None:
        log.failure("dashboard: syncing with the other workers failed", failure)
        self._send_stats(None)

    def _idle(self) -> None:
        """The last subscriber left: no timers while nobody looks."""
        if self._ticker is not None:
            if self._ticker.running:
                self._ticker.stop()
            self._ticker = None
        if self._flush is not None:
            if self._flush.active():
                self._flush.cancel()
            self._flush = None
        self._sent = self._finished

    def close(self) -> None:
        """End every event stream and stop the timers (the gateway stops)."""
        self.hub.close()
        self._idle()
