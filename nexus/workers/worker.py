"""A worker process: serves requests on the supervisor's socket, routes on its fleet.

Started by the supervisor as ``python -m nexus.workers.worker`` with the
listening socket as descriptor 3 and its end of the channel (a socketpair) as
descriptor 4. It builds the same gateway as a single process, minus the fleet
(no health poller, no discovery, no demo backend: backend states arrive from
the supervisor), and serves once the supervisor has sent the gateway's state.
Its log lines go to its standard output, a pipe the supervisor copies into the
gateway's log.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from nexus.tracking import RequestRecord
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
    apply_backend_state,
    dumps,
    loads,
    record_fields,
    replica_recorders,
)

if TYPE_CHECKING:
    from nexus.service import Gateway, GatewayService

log = Logger(namespace="nexus.workers")

#: The descriptors a worker finds its listening socket and its channel on.
LISTEN_FD = 3
CHANNEL_FD = 4


class AdoptedPort(Service):
    """The listener of a worker: accepts on the supervisor's socket (descriptor ``fd``)."""

    name = "http"

    def __init__(self, reactor: Any, fd: int, family: int, factory: Any) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.factory = factory
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)
        os.close(self.fd)  # the reactor has its own copy; ours would keep the socket open

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        return port.stopListening()


class WorkerLink(RecordChannel):
    """The worker's end of its channel to the supervisor.

    Ships this worker's finished records (a recorder, batched: ``SEND_DELAY``),
    applies everyone else's, applies backend states, and syncs before a read of
    the gateway's numbers so that it shows every request finished anywhere.
    """

    def __init__(self, gateway: Gateway, reactor: Any, on_start: Callable[[float], None]) -> None:
        super().__init__(reactor, replica_recorders(gateway))
        self.gateway = gateway
        self.reactor = reactor
        self.on_start = on_start
        self._snapshot: list[bytes] = []
        #: This process's own log drops and dashboard streams (the gateway's are summed).
        self.local_drops = gateway.collector.log_drops
        self.local_subscribers = gateway.collector.dashboard_subscribers
        self.drops_elsewhere = 0
        self.subscribers_elsewhere = 0
        gateway.collector.log_drops = lambda: self.local_drops() + self.drops_elsewhere
        gateway.collector.dashboard_subscribers = (
            lambda: self.local_subscribers() + self.subscribers_elsewhere
        )
        #: Fires when the channel is lost (the supervisor is gone).
        self.lost: Deferred[None] = Deferred()

    # -- this worker's records ------------------------------------------------------------

    def record(self, record: RequestRecord) -> None:
        """A recorder: send ``record`` to the supervisor (in a batch, within ``SEND_DELAY``)."""
        self.outgoing.add(record_fields(record))

    def flush(self) -> None:
        """Send the records not sent yet (the site's waiting ones included)."""
        self.gateway.site.write_records()
        self.outgoing.flush()

    # -- a read of the gateway's numbers ---------------------------------------------------

    def sync(self) -> Deferred[None]:
        """Fires once every request finished anywhere before now is in this worker's numbers."""
        # Its own records first: after any read, the supervisor holds everything this worker
        # finished (so a worker killed after a read loses none of what the read showed).
        self.flush()
        d: Deferred[Any] = self.callRemote(Sync)
        d.addCallback(lambda answer: self._apply_reports(loads(answer["data"])))
        d.addErrback(self._unsynced)
        return d

    def _unsynced(self, failure: Failure) -> None:
        # The supervisor is gone (this worker is stopping): answer with what it has.
        log.warn("cannot sync with the supervisor: {why}; answering with this worker's numbers",
                 why=failure.getErrorMessage())

    def _apply_reports(self, answer: dict[str, Any]) -> None:
        reports: list[dict[str, Any]] = answer["reports"]
        for backend in self.gateway.registry.backends:
            name = backend.name
            backend.pending_elsewhere = sum(r["pending"].get(name, 0) for r in reports)
            backend.latency_elsewhere = tuple(
                r["latency"][name] for r in reports if name in r["latency"]
            )
        self.drops_elsewhere = answer["retired_drops"] + sum(r["drops"] for r in reports)
        self.subscribers_elsewhere = sum(r["subscribers"] for r in reports)

    # -- the supervisor's commands ---------------------------------------------------------

    @Records.responder
    def records(self, data: bytes) -> dict[str, Any]:
        self.apply_records(data)
        return {}

    @HealthCheck.responder
    def health_check(self, backend: str, seconds: float) -> dict[str, Any]:
        self.gateway.collector.record_health_check(backend, seconds)
        return {}

    @BackendChanged.responder
    def backend_changed(self, data: bytes) -> dict[str, Any]:
        apply_backend_state(self.gateway.registry, loads(data))
        return {}

    @BackendRemoved.responder
    def backend_removed(self, name: str) -> dict[str, Any]:
        if name in self.gateway.registry:
            self.gateway.registry.remove(name)
        return {}

    @Snapshot.responder
    def snapshot(self, data: bytes) -> dict[str, Any]:
        self._snapshot.append(data)
        return {}

    @Start.responder
    def start(self, started: float) -> dict[str, Any]:
        state = loads(b"".join(self._snapshot))
        self._snapshot = []
        gateway = self.gateway
        gateway.collector.absorb(state["series"])
        gateway.request_log.history.extend(state["history"])
        if gateway.dashboard is not None and state["charts"] is not None:
            live = gateway.dashboard.live
            charts, recent = state["charts"]
            charts.clock = live.clock
            live.series = charts
            live.recent.extend(recent)
        self.on_start(started)
        return {}

    @Report.responder
    def report(self) -> dict[str, Any]:
        self.flush()  # this worker's records go out before its answer: the stream keeps order
        backends = self.gateway.registry.backends
        return {"data": dumps({
            "pending": {b.name: b.pending for b in backends if b.pending > 0},
            "latency": {b.name: b.avg_latency_ms for b in backends if b.avg_latency_ms is not None},
            "drops": self.local_drops(),
            "subscribers": self.local_subscribers(),
        })}

    @Reload.responder
    def reload(self) -> dict[str, Any]:
        reload = self.gateway_service.reload if self.gateway_service is not None else None
        return {"applied": bool(reload and reload())}

    gateway_service: GatewayService | None = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if not self.lost.called:
            self.lost.callback(None)


def _arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nexus-worker", description=__doc__)
    parser.add_argument("--config", default=None)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--family", type=int, required=True, help="the socket's address family")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run one worker until the supervisor stops it (SIGTERM: drain) or goes away."""
    args = _arguments(sys.argv[1:] if argv is None else argv)
    # The supervisor reloads the workers itself; a terminal's hangup must not end them.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from twisted.internet import reactor as default_reactor

    reactor: Any = default_reactor
    from twisted.logger import globalLogBeginner

    from nexus.config import ConfigError, load_config
    from nexus.logs import GatewayLog, LogDestination
    from nexus.service import GatewayService, build_gateway

    try:
        config, _ = load_config(args.config)
        gateway = build_gateway(config, reactor)
    except ConfigError as e:
        raise SystemExit(f"nexus: worker {args.index}: configuration error: {e}") from None
    setup = GatewayLog(LogDestination(sys.stdout, "standard output"), config.logging)
    globalLogBeginner.beginLoggingTo([setup.observer], redirectStandardIO=False)
    gateway.collector.log_drops = lambda: setup.destination.dropped
    gateway.site.worker = args.index
    limit = config.server.max_concurrent_requests
    if limit:  # the limit is the gateway's: each worker takes its share
        gateway.admission.max_concurrent = math.ceil(limit / args.workers)
    registry = gateway.registry
    for backend in list(registry.backends):  # the fleet is the supervisor's: it sends it
        registry.remove(backend.name)

    listener = AdoptedPort(reactor, LISTEN_FD, args.family, gateway.site)
    service = GatewayService(gateway, reactor, listener=listener, fleet=False)
    service.reload.path = args.config
    service.reload.log_setup = setup
    service.reload.workers = args.workers
    started = time.monotonic()

    def on_start(started_wall: float) -> None:
        age = max(0.0, time.time() - started_wall)
        gateway.collector.started = gateway.api.started = time.monotonic() - age
        service.startService()
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        log.info(
            "worker {index} (pid {pid}) serving, ready in {ms:.0f} ms",
            index=args.index, pid=_pid(), ms=(time.monotonic() - started) * 1000.0,
        )

    link = WorkerLink(gateway, reactor, on_start)
    link.gateway_service = service
    gateway.site.recorders += (link.record,)
    gateway.api.synced = link.sync
    if gateway.dashboard is not None:
        gateway.dashboard.live.synced = link.sync
    link.lost.addCallback(lambda _: reactor.stop() if reactor.running else None)
    factory = Factory.forProtocol(lambda: link)
    reactor.adoptStreamConnection(CHANNEL_FD, socket.AF_UNIX, factory)
    os.close(CHANNEL_FD)
    reactor.run()


def _pid() -> int:
    return os.getpid()


if __name__ == "__main__":
    main()
