"""What the supervisor and its workers say to each other, over AMP on a socketpair.

One stream per worker, so everything arrives in the order it was sent; the
exact view of the gateway rests on that (see :mod:`nexus.workers`).

Values are pickled: both ends are the same program, started together, and
the socketpair reaches no one else. AMP caps one value at 64 KiB, so big
values go in pieces (:func:`pieces`).
"""

from __future__ import annotations

import copyreg
import pickle
from collections.abc import Callable, Iterator, Sequence
from operator import attrgetter
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure

from nexus.registry import Backend, BackendRegistry
from nexus.server import Recorder, record_to
from nexus.tracking import RequestRecord

if TYPE_CHECKING:
    from nexus.service import Gateway

#: Bytes per piece of a value that may be larger than AMP allows (65,535).
PIECE_BYTES = 60_000
#: Records per ``Records`` message (well under AMP's limit whatever the names).
RECORDS_PER_MESSAGE = 100
#: The longest a finished record waits to be sent on (seconds): records travel in batches,
#: since each message costs its receiver a wake-up (tens of µs) whatever it carries. A read
#: of the gateway's numbers sends what waits first, so it never misses one.
SEND_DELAY = 0.010

#: The record fields a worker ships, in order: all but ``prompt_preview`` (the last field;
#: only ever logged, by the worker that served the request).
RECORD_FIELDS = tuple(f.name for f in attrs.fields(RequestRecord))[:-1]
assert attrs.fields(RequestRecord)[-1].name == "prompt_preview"
record_fields = attrgetter(*RECORD_FIELDS)


def read_only(table: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    """A read-only mapping again (the configuration's tables), on the receiving end."""
    return MappingProxyType(table)


# The configuration's tables are read-only mappings: sent as the dicts they wrap.
copyreg.pickle(MappingProxyType, lambda m: (read_only, (dict(m),)))


def dumps(value: object) -> bytes:
    """``value`` as bytes for the other end."""
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    """A value the other end sent."""
    return pickle.loads(data)  # our own process, over our own socketpair


def pieces(data: bytes, size: int = PIECE_BYTES) -> Iterator[bytes]:
    """``data`` in slices AMP can carry (at least one, even when empty)."""
    yield data[:size]
    for start in range(size, len(data), size):
        yield data[start : start + size]


class RecordBatch:
    """Finished records waiting to go to one process: sent ``SEND_DELAY`` after the first
    (or at once when ``RECORDS_PER_MESSAGE`` wait, or on :meth:`flush`), as ``Records``
    boxes written with ``write``.
    """

    def __init__(self, clock: IReactorTime, write: Callable[[bytes], None]) -> None:
        self.clock = clock
        self.write = write
        self.waiting: list[tuple[Any, ...]] = []
        self._timer: IDelayedCall | None = None

    def add(self, fields: tuple[Any, ...]) -> None:
        """Send ``fields`` (one record's) soon."""
        waiting = self.waiting
        waiting.append(fields)
        if len(waiting) >= RECORDS_PER_MESSAGE:
            self.flush()
        elif self._timer is None:
            self._timer = self.clock.callLater(SEND_DELAY, self.flush)

    def flush(self) -> None:
        """Send every waiting record now."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        waiting, self.waiting = self.waiting, []
        for start in range(0, len(waiting), RECORDS_PER_MESSAGE):
            self.write(records_box(dumps(waiting[start : start + RECORDS_PER_MESSAGE])))

    def cancel(self) -> None:
        """Forget what waits (the process at the other end is gone)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.waiting = []


class RecordChannel(amp.AMP):
    """One end of a worker's channel: records go out batched, others' come in.

    ``recorders`` take the records another worker served (the metrics, the history, the
    dashboard: its log line was written where it was served).
    """

    def __init__(self, clock: IReactorTime, recorders: Sequence[Recorder]) -> None:
        super().__init__()
        self.recorders = tuple(recorders)
        #: Records on their way to the other end.
        self.outgoing = RecordBatch(clock, self._write)

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def apply_records(self, data: bytes) -> list[tuple[Any, ...]]:
        """Record the records ``data`` carries; return their fields."""
        batch: list[tuple[Any, ...]] = loads(data)
        recorders = self.recorders
        for fields in batch:
            record_to(recorders, record_from(fields))
        return batch

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.outgoing.cancel()


def replica_recorders(gateway: Gateway) -> tuple[Recorder, ...]:
    """What records another worker's request in ``gateway`` (all but the log line)."""
    recorders: tuple[Recorder, ...] = (
        gateway.collector.record_request,
        gateway.request_log.remember,
    )
    if gateway.dashboard is not None:
        recorders += (gateway.dashboard.record,)
    return recorders


def record_from(fields: tuple[Any, ...]) -> RequestRecord:
    """A finished record rebuilt from what :data:`record_fields` took from it."""
    return RequestRecord(*fields)


_RECORDS_HEAD = b"\x00\x08_command\x00\x07Records\x00\x04data"


def records_box(data: bytes) -> bytes:
    """The AMP box of a ``Records`` command carrying ``data``, serialized.

    What ``callRemote(Records, data=data)`` writes (no answer is asked, so the box has
    no ``_ask`` key), built directly: one request's share of AMP's generic path would cost
    more than everything else a worker does to share its record (tested equal).
    """
    return b"%b%b%b\x00\x00" % (_RECORDS_HEAD, len(data).to_bytes(2, "big"), data)


# -- the fleet: backend states, from the supervisor's registry to every worker's ----------


def backend_state(backend: Backend) -> tuple[Any, ...]:
    """What a worker needs to route to ``backend`` as the supervisor sees it now."""
    return (
        backend.config,
        backend.source,
        backend.status,
        backend.models,
        backend.last_check,
        backend.last_error,
        backend.consecutive_failures,
        backend.consecutive_successes,
        backend.withdrawn,
        backend.model_discoveries,
    )


def apply_backend_state(registry: BackendRegistry, state: tuple[Any, ...]) -> Backend:
    """Make ``registry``'s backend what ``state`` says (added when new); tell its observers."""
    (config, source, status, models, last_check, last_error, failures, successes, withdrawn,
     discoveries) = state
    if config.name in registry:
        backend = registry.get(config.name)
        if backend.config != config:
            registry.reconfigure(backend, config)
    else:
        backend = registry.add(config, source)
    backend.status = status
    backend.last_check = last_check
    backend.last_error = last_error
    backend.consecutive_failures = failures
    backend.consecutive_successes = successes
    backend.withdrawn = withdrawn
    if discoveries != backend.model_discoveries:  # a new discovery: every endpoint again
        backend.model_discoveries = discoveries
        backend.missing_endpoints.clear()
    if backend.models != models:
        backend.models = models
        registry.reindex()
    registry.changed(backend)
    return backend


# -- the commands -----------------------------------------------------------------------


class Records(amp.Command):
    """Finished requests (pickled field tuples): worker -> supervisor -> the other workers."""

    arguments = [(b"data", amp.String())]
    requiresAnswer = False


class HealthCheck(amp.Command):
    """One health check's round trip (``nexus_backend_latency_seconds``): to the workers."""

    arguments = [(b"backend", amp.Unicode()), (b"seconds", amp.Float())]
    requiresAnswer = False


class BackendChanged(amp.Command):
    """A backend's state (:func:`backend_state`), or its removal: to the workers."""

    arguments = [(b"data", amp.String())]
    requiresAnswer = False


class BackendRemoved(amp.Command):
    """A backend left the fleet: to the workers."""

    arguments = [(b"name", amp.Unicode())]
    requiresAnswer = False


class Snapshot(amp.Command):
    """One piece of the gateway's counts and history, for a new worker."""

    arguments = [(b"data", amp.String())]
    requiresAnswer = False


class Start(amp.Command):
    """The state has been sent: start serving (answered once listening)."""

    arguments = [(b"started", amp.Float())]  # the gateway's start, wall clock


class Report(amp.Command):
    """Supervisor -> worker: send what is pending, then say what is in flight now."""

    response = [(b"data", amp.String())]


class Sync(amp.Command):
    """Worker -> supervisor: every other worker's records and in-flight counts, then answer."""

    response = [(b"data", amp.String())]


class Reload(amp.Command):
    """Re-read the configuration file (SIGHUP to the supervisor)."""

    response = [(b"applied", amp.Boolean())]
