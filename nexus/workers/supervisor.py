"""The supervisor's side: the listening sockets, the worker processes, their channels.

:class:`WorkerPool` is the listener of a supervising gateway. It opens one
listening socket per worker, all bound to the gateway's address with
``SO_REUSEPORT`` (the kernel spreads new connections evenly over them; a shared
socket let whichever worker woke first take a whole burst of connections), and
never accepts on them itself; it starts ``count`` workers, each accepting on its
own socket, keeps one AMP channel per worker (a socketpair), replaces a worker
that dies (the new one takes over the same socket: connections that arrived
meanwhile wait in its queue, none is refused), and stops them all with the same
drain as one process.

Through the channels it forwards every worker's finished records to the others
(and keeps them in its own gateway's collector, the copy a new worker starts
from), sends the fleet's backend states as its health poller and discovery
change them, answers a worker's ``Sync``, and reloads every worker on SIGHUP.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from nexus.config.listen import tcp_address
from nexus.logs import STANDARD_OUTPUT
from nexus.registry import Backend
from nexus.workers.channel import (
    BackendChanged,
    BackendRemoved,
    HealthCheck,
    RecordChannel,
    Records,
    Reload,
    Report,
    Snapshot,
    Start,
    Sync,
    backend_state,
    dumps,
    loads,
    pieces,
    replica_recorders,
)
from nexus.workers.worker import CHANNEL_FD, LISTEN_FD

if TYPE_CHECKING:
    from nexus.logs import LogDestination
    from nexus.service import Gateway

log = Logger(namespace="nexus.workers")

#: A worker that dies before it served is restarted after this delay, not at once (a worker
#: that cannot start must not turn into a busy loop of processes).
RESTART_DELAY = 1.0
#: The longest wait for a worker's report during a sync (a stuck worker must not stop scrapes).
REPORT_TIMEOUT = 2.0
#: After the shutdown grace, workers still running get this long before SIGKILL.
KILL_MARGIN = 5.0


def worker_count(workers: int | str) -> int:
    """``[server] workers`` as a number of processes (``auto``: one per CPU)."""
    if workers == "auto":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
    return int(workers)


class Worker(ProcessProtocol):
    """One worker process: its number, its log lines copied to the gateway's log (--logfile)."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.pid: int | None = None
        #: It got the gateway's state and serves (a death before that delays its replacement).
        self.serving = False
        self.ended: Deferred[None] = Deferred()
        self._partial = b""

    def makeConnection(self, process: Any) -> None:
        self.pid = process.pid  # kept: the transport forgets it when the process ends
        super().makeConnection(process)

    def outReceived(self, data: bytes) -> None:
        # Whole lines only: the workers' lines never mix in the gateway's log.
        data = self._partial + data
        end = data.rfind(b"\n") + 1
        self._partial = data[end:]
        if end:
            self.pool.write_log(data[:end])

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self.pool.write_log(self._partial + b"\n")
            self._partial = b""
        self.pool.ended(self, reason)
        self.ended.callback(None)

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)  # type: ignore[union-attr]
        except Exception:
            pass  # already gone


class WorkerChannel(RecordChannel):
    """The supervisor's end of one worker's channel.

    Its recorders are those of the supervisor's own copy of the gateway's numbers.
    """

    def __init__(self, pool: WorkerPool, worker: Worker) -> None:
        super().__init__(pool.reactor, replica_recorders(pool.gateway))
        self.pool = pool
        self.worker = worker

    @Records.responder
    def records(self, data: bytes) -> dict[str, Any]:
        self.pool.forward_records(self, data)
        return {}

    @Sync.responder
    def sync(self) -> Deferred[dict[str, Any]]:
        return self.pool.gather(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.pool.channel_lost(self)


class WorkerPool(Service):
    """The listener of a supervising gateway: ``count`` workers on one socket.

    ``gateway`` is the supervisor's own: its registry is the fleet (health poller,
    discovery), its collector, request log and dashboard are the copy of the gateway's
    numbers a new worker starts from.
    """

    name = "http"

    def __init__(
        self,
        gateway: Gateway,
        reactor: Any,
        count: int,
        config_path: str | None,
        log_destination: Callable[[], LogDestination | None] = lambda: None,
    ) -> None:
        self.gateway = gateway
        self.reactor = reactor
        self.count = count
        self.config_path = config_path
        self.log_destination = log_destination
        self.listen = gateway.config.server.listen
        #: The listening sockets, one per worker (worker N accepts on ``sockets[N - 1]``).
        self.sockets: list[socket.socket] = []
        self.workers: dict[int, Worker] = {}
        self.channels: list[WorkerChannel] = []
        self.stopping = False
        self.started_wall = time.time()
        #: Log lines dropped by workers that have died (the counter never goes down).
        self.retired_drops = 0
        self._last_drops: dict[int, int] = {}
        gateway.registry.observers.append(self._backend_changed)
        poller = gateway.poller
        record = poller.record_latency

        def record_health(name: str, seconds: float) -> None:
            if record is not None:
                record(name, seconds)
            self.broadcast(HealthCheck, backend=name, seconds=seconds)

        poller.record_latency = record_health

    # -- the socket -------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            self.sockets = listening_sockets(self.listen, self.count)
        except OSError as e:
            raise SystemExit(f"nexus: cannot listen on {self.listen}: {e.strerror}") from None

    def startService(self) -> None:
        super().startService()
        self.started_wall = time.time()
        for index in range(1, self.count + 1):
            self.spawn(index)

    # -- workers ------------------------------------------------------------------------------

    def spawn(self, index: int) -> Worker:
        """Start worker ``index`` (again, when it died)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker = Worker(self, index)
        args = [
            sys.executable, "-m", "nexus.workers.worker",
            "--index", str(index),
            "--workers", str(self.count),
            "--family", str(int(self.sockets[index - 1].family)),
        ]
        if self.config_path:
            args += ["--config", self.config_path]
        try:
            self.reactor.spawnProcess(
                worker, sys.executable, args, env=os.environ.copy(),
                childFDs={0: "w", 1: 1 if self._log_to_stdout() else "r", 2: 2,
                          LISTEN_FD: self.sockets[index - 1].fileno(),
                          CHANNEL_FD: theirs.fileno()},
            )
        finally:
            theirs.close()
        self.workers[index] = worker
        channel = WorkerChannel(self, worker)
        self.reactor.adoptStreamConnection(
            ours.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: channel)
        )
        ours.close()  # the reactor has its own copy
        self.channels.append(channel)
        self._welcome(channel)
        return worker

    def _welcome(self, channel: WorkerChannel) -> None:
        """Send a new worker the fleet and the gateway's numbers, then let it serve."""
        gateway = self.gateway
        for backend in gateway.registry.backends:
            channel.callRemote(BackendChanged, data=dumps(backend_state(backend)))
        charts = None
        if gateway.dashboard is not None:
            live = gateway.dashboard.live
            charts = (live.series, list(live.recent))
        state = dumps({
            "series": gateway.collector.export(),
            "history": list(gateway.request_log.history),
            "charts": charts,
        })
        for piece in pieces(state):
            channel.callRemote(Snapshot, data=piece)
        worker = channel.worker

        def serving(_: object) -> None:
            worker.serving = True

        # A worker that dies before it starts is reported by ended().
        channel.callRemote(Start, started=self.started_wall).addCallbacks(serving, lambda f: None)

    def ended(self, worker: Worker, reason: Failure) -> None:
        """A worker process ended: replaced unless the gateway is stopping."""
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        self.retired_drops += self._last_drops.pop(worker.pid or 0, 0)
        if self.stopping:
            return
        value = reason.value
        if isinstance(value, ProcessTerminated) and value.signal is not None:
            how = f"killed by signal {value.signal}"
        elif isinstance(value, ProcessTerminated | ProcessDone):
            how = f"exited with status {value.exitCode}"
        else:
            how = str(value)
        delay = 0.0 if worker.serving else RESTART_DELAY
        log.error(
            "worker {index} (pid {pid}) {how}; starting a new one{when}",
            index=worker.index, pid=worker.pid, how=how,
            when=f" in {delay:.0f} s" if delay else "",
        )
        self.reactor.callLater(delay, self._replace, worker.index)

    def _replace(self, index: int) -> None:
        if self.running and not self.stopping and index not in self.workers:
            self.spawn(index)

    def channel_lost(self, channel: WorkerChannel) -> None:
        if channel in self.channels:
            self.channels.remove(channel)

    def _log_to_stdout(self) -> bool:
        """Whether the gateway logs to standard output: the workers then write to it too.

        Otherwise (``--logfile``) their lines come through a pipe and this process writes
        them into the file it rotates. Each line is one write either way: lines never mix.
        """
        destination = self.log_destination()
        # Compared by name: twistd has replaced sys.stdout by then (print() is logged).
        return destination is None or destination.name == STANDARD_OUTPUT

    def write_log(self, data: bytes) -> None:
        """Lines a worker logged (already formatted) into the gateway's log file."""
        destination = self.log_destination()
        if destination is not None:  # else the workers write to standard output themselves
            destination.write(data.decode("utf-8", "replace"))

    # -- state between the processes ----------------------------------------------------------

    def broadcast(self, command: type[amp.Command], **kwargs: Any) -> None:
        """Send a command that needs no answer to every worker."""
        for channel in self.channels:
            channel.callRemote(command, **kwargs)

    def _backend_changed(self, backend: Backend, removed: bool) -> None:
        if removed:
            self.broadcast(BackendRemoved, name=backend.name)
        else:
            self.broadcast(BackendChanged, data=dumps(backend_state(backend)))

    def forward_records(self, origin: WorkerChannel, data: bytes) -> None:
        """A worker's finished records: into this process's copy, and to every other worker."""
        batch = origin.apply_records(data)
        for channel in self.channels:
            if channel is not origin:
                outgoing = channel.outgoing
                for fields in batch:
                    outgoing.add(fields)

    def gather(self, asker: WorkerChannel) -> Deferred[dict[str, Any]]:
        """Every other worker's report, once their records are forwarded to ``asker``.

        Each worker sends its records before its report, and this process forwards them
        to ``asker`` as they arrive, before answering: once ``asker`` has the answer it has
        every record finished anywhere before it asked.
        """
        others = [c for c in self.channels if c is not asker]
        asked = []
        for channel in others:
            d = channel.callRemote(Report)
            d.addTimeout(REPORT_TIMEOUT, self.reactor)
            asked.append(d)

        def answer(results: list[tuple[bool, Any]]) -> dict[str, Any]:
            reports = []
            for channel, (ok, result) in zip(others, results, strict=True):
                if ok:
                    report = loads(result["data"])
                    if channel.worker.pid is not None:
                        self._last_drops[channel.worker.pid] = report["drops"]
                    reports.append(report)
            asker.outgoing.flush()  # every record before the answer: the stream keeps order
            return {"data": dumps({"reports": reports, "retired_drops": self.retired_drops})}

        return DeferredList(asked, consumeErrors=True).addCallback(answer)

    def reload_workers(self) -> None:
        """The supervisor reloaded its configuration: every worker does the same."""
        for channel in list(self.channels):
            index = channel.worker.index
            channel.callRemote(Reload).addErrback(
                lambda f, i=index: log.error("worker {index} did not reload: {why}", index=i,
                                             why=f.getErrorMessage())
            )

    # -- stopping ------------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """Drain every worker (SIGTERM: each stops accepting and finishes what it has)."""
        super().stopService()
        self.stopping = True
        workers = list(self.workers.values())
        for worker in workers:
            worker.signal("TERM")
        for sock in self.sockets:  # closed for good once the workers close their copies
            sock.close()
        self.sockets = []
        if not workers:
            return succeed(None)
        grace = self.gateway.config.server.shutdown_grace_seconds + KILL_MARGIN
        timer = self.reactor.callLater(grace, self._kill, workers)
        done = gatherResults([w.ended for w in workers])

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()

        return done.addCallback(finished)

    def _kill(self, workers: list[Worker]) -> None:
        for worker in workers:
            if not worker.ended.called:
                log.warn("worker {index} (pid {pid}) did not stop: killed", index=worker.index,
                         pid=worker.pid)
                worker.signal("KILL")


def listening_sockets(listen: str, count: int) -> list[socket.socket]:
    """``count`` non-blocking sockets listening on ``listen``'s address with ``SO_REUSEPORT``.

    A port of 0 is chosen by the kernel for the first and taken by the others. A port
    that another program (or another gateway: ``SO_REUSEPORT`` would let one of the
    same user join this group) already listens on is refused: OSError, EADDRINUSE.
    """
    kind, interface, port, backlog = tcp_address(listen)
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((interface, port))  # without SO_REUSEPORT: fails if anyone listens
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((interface, port))
            port = sock.getsockname()[1]
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def listen_problem(listen: str) -> str | None:
    """Why workers cannot listen as ``listen`` says (None: they can)."""
    try:
        tcp_address(listen)
    except ValueError:
        kind = listen.split(":", 1)[0]
        return (
            f"workers listen on tcp: or tcp6: (one SO_REUSEPORT socket each), not {kind}: "
            f"{listen!r} (terminate TLS or serve a unix socket in front of the gateway, or run "
            "one process: workers = 1)"
        )
    if not hasattr(socket, "SO_REUSEPORT"):
        return "workers need SO_REUSEPORT, which this system lacks: run one process (workers = 1)"
    return None
