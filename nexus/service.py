"""``twistd nexus``: options and the service tree of a running gateway."""

from __future__ import annotations

import gc
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from nexus.access import AccessPolicy
from nexus.admission import Admission
from nexus.api import GatewayResource, NexusAPI
from nexus.config import (
    BackendConfig,
    Config,
    ConfigError,
    listen_warnings,
    load_config,
    workers_setting,
)
from nexus.dashboard import Dashboard
from nexus.discovery import DiscoveryService, checker
from nexus.health import HealthPoller, HealthService
from nexus.logs import GatewayLog, observer_for
from nexus.logs import install as install_observer
from nexus.metrics import MetricsCollector
from nexus.proxy import InferenceProxy
from nexus.registry import HEALTHY, BackendRegistry
from nexus.reload import Reload
from nexus.requestlog import RequestLog
from nexus.routing import Router, unserved_targets
from nexus.server import LINGER_SECONDS, NexusSite
from nexus.testing import MockBackend, MockSettings, listen_mock
from nexus.upstream import UpstreamClient
from nexus.workers.supervisor import WorkerPool, listen_problem, worker_count

log = Logger()

#: Models the embedded demo backend serves.
DEMO_MODELS = ("demo", "demo-large")


class DemoBackendService(Service):
    """The embedded demo backend: opens its port when the gateway starts, joins the fleet.

    The backend is added to the registry once it listens (its URL has a port
    only then), before the health poller's first round.
    """

    name = "demo-backend"

    def __init__(self, registry: BackendRegistry, reactor: Any, checked: bool = True) -> None:
        self.registry = registry
        self.reactor = reactor
        #: Whether the health poller checks backends (else they are trusted as healthy).
        self.checked = checked
        self.backend: MockBackend | None = None

    def startService(self) -> None:
        super().startService()
        settings = MockSettings(name="demo", models=list(DEMO_MODELS), stream_delay_ms=50)
        self.backend = backend = listen_mock(self.reactor, settings)
        added = self.registry.add(
            BackendConfig(name="demo", url=backend.url, type="openai", models=DEMO_MODELS)
        )
        if not self.checked:
            added.status = HEALTHY
        log.info(
            "demo backend at {url} serving {models}", url=backend.url, models=", ".join(DEMO_MODELS)
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.backend is None:
            return None
        return self.backend.stop()


@attrs.define
class Gateway:
    """The parts of one running gateway, for wiring and for tests."""

    config: Config
    registry: BackendRegistry
    router: Router
    upstream: UpstreamClient
    collector: MetricsCollector
    poller: HealthPoller
    admission: Admission
    api: NexusAPI
    site: NexusSite
    request_log: RequestLog
    #: The dashboard (contract section 9), None when ``[server] dashboard = false``.
    dashboard: Dashboard | None = None


def build_gateway(
    config: Config, reactor: Any, environ: Mapping[str, str] | None = None
) -> Gateway:
    """Wire the gateway's parts for ``config`` (no listening, no timers yet).

    Raises ConfigError when a file the configuration names cannot be read.
    """
    environ = os.environ if environ is None else environ
    now = time.monotonic
    registry = BackendRegistry.from_config(config)
    router = Router(registry, config.routing)
    upstream = UpstreamClient(reactor)
    collector = MetricsCollector(registry, clock=now)
    poller = HealthPoller(
        registry,
        config.health_check,
        upstream.http,
        reactor,
        collector.record_health_check,
        environ=environ,
    )
    proxy = InferenceProxy(
        router,
        upstream,
        reactor,
        request_timeout=config.server.request_timeout_seconds,
        max_body_bytes=config.server.max_body_bytes,
        max_retries=config.routing.max_retries,
        now=now,
        environ=environ,
        content_preview=config.logging.content_preview,
    )
    admission = Admission(config.server.max_concurrent_requests)
    request_log = RequestLog(log_requests=config.logging.requests)
    api = NexusAPI(
        registry,
        router,
        proxy,
        collector,
        admission,
        request_log,
        now=now,
        wall_clock=time.time,
        access=AccessPolicy.from_config(config.server),
    )
    site = NexusSite(
        GatewayResource(api),
        config.server,
        # The metrics and the request log see the same record at the same moment.
        recorders=(collector.record_request, request_log.record),
        inference=api.inference,
        now=now,
        reactor=reactor,
        debug_access=config.logging.level == "debug",
    )
    dashboard = None
    if config.server.dashboard:  # the page and its events: one more recorder, a gauge
        dashboard = Dashboard(registry, collector, reactor)
        api.dashboard = dashboard
        site.recorders += (dashboard.record,)
        collector.dashboard_subscribers = dashboard.subscribers
    # A read of the numbers first writes the records still waiting (NexusSite.finished).
    api.synced = site.synced
    if dashboard is not None:
        dashboard.live.synced = site.synced
    return Gateway(
        config, registry, router, upstream, collector, poller, admission, api, site, request_log,
        dashboard,
    )


#: Listen queue length: Twisted's default of 50 drops connections in any burst of clients.
LISTEN_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """``description`` with ``backlog=LISTEN_BACKLOG`` unless it sets its own."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl", "unix") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


def _freeze_startup_objects() -> None:
    """Move everything alive at start-up out of the garbage collector's sight.

    The ~60,000 objects of the imported modules never die; without this every
    full collection walks them all, a pause of tens of milliseconds.
    """
    gc.collect()
    gc.freeze()


class GatewayService(MultiService):
    """The running gateway: its parts as child services, started in order.

    Children: the demo backend (when there is one), the connection pool, the
    health poller, discovery (when on), then the listener. Stopping is ordered so that no request
    is lost or counted twice: stop accepting, let requests in flight finish
    for the grace period, cut what is left (recorded as 499), then stop the
    other children in reverse order.
    """

    _previous_sighup: Any = None

    def __init__(
        self,
        gateway: Gateway,
        reactor: Any,
        demo: bool = False,
        listener: Service | None = None,
        fleet: bool = True,
    ) -> None:
        """``listener`` replaces the site's own listening port (worker mode: the supervisor's
        workers, or a worker's adopted socket); ``fleet`` False leaves the fleet (health
        checks, discovery, the demo backend) to another process: a worker's supervisor.
        """
        super().__init__()
        self.gateway = gateway
        self.reactor = reactor
        self.fleet = fleet
        checked = gateway.config.health_check.enabled
        if demo and fleet:
            DemoBackendService(gateway.registry, reactor, checked).setServiceParent(self)
        gateway.upstream.setServiceParent(self)
        if fleet and checked:
            HealthService(gateway.poller, reactor).setServiceParent(self)
        elif fleet:
            # Without polling nothing would ever become healthy: trust the config.
            for backend in gateway.registry.backends:
                backend.status = HEALTHY
        if fleet and gateway.config.discovery.enabled:  # mDNS: advertised servers join
            check = checker(gateway.poller, lambda: gateway.config.health_check.enabled)
            DiscoveryService(gateway.config.discovery, gateway.registry, reactor, check
                             ).setServiceParent(self)
        self.listen = gateway.config.server.listen
        if listener is None:
            listener = strports.service(with_backlog(self.listen), gateway.site, reactor=reactor)
            listener.setName("http")
        self.listener = listener
        self.listener.setServiceParent(self)
        if gateway.dashboard is not None:  # ends its event streams when the gateway stops
            gateway.dashboard.service.setServiceParent(self)
        #: The log twistd should use (``[logging]``), set by ``makeService``.
        self.log_setup: GatewayLog | None = None
        #: Re-reads the configuration file on SIGHUP (``nexus reload``).
        self.reload = Reload(
            gateway, path=None, restart_health=self._restart_health, fleet=fleet
        )

    def setServiceParent(self, parent: Any) -> None:
        # twistd makes the application, adds this service, then starts logging with the
        # application's ILogObserver component when it has one (Twisted's documented way
        # to choose twistd's log observer).
        if self.log_setup is not None and hasattr(parent, "setComponent"):
            install_observer(parent, self.log_setup.observer)
        super().setServiceParent(parent)

    def _on_sighup(self, signum: int, frame: Any) -> None:
        # A signal handler runs between two bytecodes of whatever the reactor was doing:
        # the reload itself runs on the reactor, between two events.
        self.reactor.callFromThread(self.reload)

    def _restart_health(self, interval: float) -> None:
        """Run the health checks every ``interval`` seconds from now (a reload)."""
        health = self.getServiceNamed("health")

        def restart(_: object) -> None:
            health.step = interval
            if self.running:
                health.startService()

        maybeDeferred(health.stopService).addCallback(restart)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            why = e.socketError.strerror if isinstance(e.socketError, OSError) else e.socketError
            raise SystemExit(f"nexus: cannot listen on {self.listen}: {why}") from None

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(_freeze_startup_objects)
        if not self.fleet:
            return  # a worker: its supervisor reloads it, checks the fleet and warns
        if hasattr(signal, "SIGHUP"):
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
        if self.gateway.config.health_check.enabled:
            # The fleet's models are known once the first round of checks is over.
            self.gateway.poller.first_round.addCallback(lambda _: self._warn_unserved())
        else:
            self._warn_unserved()

    def _warn_unserved(self) -> None:
        for problem in unserved_targets(self.gateway.registry):
            log.warn("routing: {problem}", problem=problem)

    async def _stop(self) -> None:
        admission = self.gateway.admission
        admission.draining = True
        await maybeDeferred(self.listener.stopService)
        grace = self.gateway.config.server.shutdown_grace_seconds
        if admission.active:
            log.info(
                "waiting up to {grace}s for {requests} in flight",
                grace=grace,
                requests=_requests(len(admission.active)),
            )
            idle = admission.wait_idle()
            timer = self.reactor.callLater(grace, idle.cancel)
            try:
                await idle
            except CancelledError:
                log.warn(
                    "cutting {requests} still in flight",
                    requests=_requests(admission.cut_active()),
                )
            else:
                timer.cancel()
        # What the last answers wrote must reach their clients before the reactor stops.
        closed = self.gateway.site.close_connections()
        timer = self.reactor.callLater(LINGER_SECONDS, closed.cancel)
        try:
            await closed
        except CancelledError:
            pass  # a client that reads nothing more must not hold the stop up
        else:
            timer.cancel()
        self.gateway.site.write_records()  # the last requests' records and log lines
        for child in reversed(list(self)):
            if child.running:
                await maybeDeferred(child.stopService)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if hasattr(signal, "SIGHUP") and self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
        return Deferred.fromCoroutine(self._stop())


def _requests(n: int) -> str:
    """``"1 request"``, ``"2 requests"``: log lines read naturally."""
    return f"{n} request" if n == 1 else f"{n} requests"


def makeService(options: Mapping[str, Any], reactor: Any = None) -> GatewayService:
    """Build the gateway's service tree from ``twistd nexus`` options (nothing listens yet)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        config, warnings = load_config(options.get("config"))
    except ConfigError as e:
        raise SystemExit(f"nexus: configuration error: {e}") from None
    if options.get("listen"):
        config = attrs.evolve(config, server=attrs.evolve(config.server, listen=options["listen"]))
    if options.get("no-discovery"):
        config = attrs.evolve(config, discovery=attrs.evolve(config.discovery, enabled=False))
    if options.get("workers"):
        try:
            workers = workers_setting(options["workers"])
        except ValueError as e:
            raise SystemExit(f"nexus: --workers: {e}") from None
        config = attrs.evolve(config, server=attrs.evolve(config.server, workers=workers))
    workers = worker_count(config.server.workers)
    if workers > 1 and (why := listen_problem(config.server.listen)):
        raise SystemExit(f"nexus: {why}")
    try:
        serverFromString(reactor, with_backlog(config.server.listen))
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(
            f"nexus: bad listen description {config.server.listen!r}: {e}"
        ) from None
    # Logged, not printed: they reach the log in its format once twistd starts logging.
    for warning in [*warnings, *listen_warnings(config.server)]:
        log.warn("{warning}", warning=warning)
    if config.logging.content_preview:
        log.warn(
            "logging.content_preview is on: request events carry the first 100 characters "
            "of each prompt"
        )
    try:
        gateway = build_gateway(config, reactor)
    except ConfigError as e:
        raise SystemExit(f"nexus: configuration error: {e}") from None
    demo = bool(options.get("demo") or not options.get("config"))
    pool = None
    if workers > 1:  # this process supervises; the workers serve (nexus.workers)
        pool = WorkerPool(
            gateway, reactor, workers, options.get("config"),
            log_destination=lambda: service.log_setup.destination if service.log_setup else None,
        )
    service = GatewayService(gateway, reactor, demo=demo, listener=pool)
    if pool is not None:
        service.reload.after = pool.reload_workers
    service.reload.path = options.get("config")
    service.reload.listen = options.get("listen")
    service.reload.no_discovery = bool(options.get("no-discovery"))
    twistd_options = getattr(options, "parent", None)
    if twistd_options is not None:  # under twistd: our observer replaces twistd's own
        setup = observer_for(twistd_options, config.logging)
        if setup is not None:
            service.log_setup = service.reload.log_setup = setup
            gateway.collector.log_drops = lambda: setup.destination.dropped
    return service
