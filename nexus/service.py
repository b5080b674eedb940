"""``twistd nexus``: options and the service tree of a running gateway."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python import usage

from nexus.access import AccessPolicy
from nexus.api import GatewayResource, NexusAPI, NexusSite
from nexus.config import BackendConfig, Config, ConfigError, load_config
from nexus.health import HealthPoller, HealthService
from nexus.metrics import MetricsCollector
from nexus.mock import MockBackend, MockSettings, listen_mock
from nexus.proxy import ChatCompletions
from nexus.registry import HEALTHY, BackendRegistry
from nexus.routing import Router
from nexus.upstream import UpstreamClient

log = Logger()

#: Models the embedded demo backend serves.
DEMO_MODELS = ("demo", "demo-large")


class Options(usage.Options):
    """Command line of ``twistd nexus``."""

    synopsis = "[--config nexus.toml] [--listen tcp:8000] [--demo]"
    optParameters = [
        ["config", "c", None, "TOML configuration file (without one, demo mode)."],
        ["listen", "l", None, "Where to listen, a strports description (overrides the file)."],
    ]
    optFlags = [["demo", None, "Also start an embedded mock backend on 127.0.0.1."]]
    longdesc = "Nexus: one OpenAI-compatible endpoint in front of a fleet of inference servers."


class _DemoBackendService(Service):
    """Stops the (already listening) embedded demo backend when the gateway stops."""

    name = "demo-backend"

    def __init__(self, backend: MockBackend) -> None:
        self.backend = backend

    def stopService(self) -> Deferred[None]:
        super().stopService()
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
    api: NexusAPI
    site: NexusSite


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
    chat = ChatCompletions(
        router,
        upstream,
        reactor,
        request_timeout=config.server.request_timeout_seconds,
        max_body_bytes=config.server.max_body_bytes,
        max_retries=config.routing.max_retries,
        now=now,
        environ=environ,
    )
    api = NexusAPI(
        registry,
        router,
        chat,
        collector,
        now=now,
        wall_clock=time.time,
        access=AccessPolicy.from_config(config.server),
        max_concurrent=config.server.max_concurrent_requests,
    )
    site = NexusSite(GatewayResource(api), config.server, collector, now, reactor=reactor)
    return Gateway(config, registry, router, upstream, collector, poller, api, site)


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
    """The running gateway: listener, health poller, connection pool (and a demo backend).

    Children start together; stopping is ordered so that no request is lost or
    counted twice: stop accepting, let requests in flight finish for the grace
    period, cut what is left (recorded as 499), then stop polling, close the
    pool and stop the demo backend.
    """

    def __init__(self, gateway: Gateway, reactor: Any) -> None:
        super().__init__()
        self.gateway = gateway
        self.reactor = reactor
        self.listener = strports.service(
            with_backlog(gateway.config.server.listen), gateway.site, reactor=reactor
        )
        self.listener.setName("http")
        self.health: HealthService | None = None
        if gateway.config.health_check.enabled:
            self.health = HealthService(gateway.poller, reactor)
        else:
            # Without polling nothing would ever become healthy: trust the config.
            for backend in gateway.registry.backends:
                backend.status = HEALTHY
        self.demo: _DemoBackendService | None = None

    def startService(self) -> None:
        Service.startService(self)
        self.reactor.callWhenRunning(_freeze_startup_objects)
        self.gateway.upstream.startService()
        if self.health is not None:
            self.health.startService()
        self.listener.startService()

    async def _stop(self) -> None:
        api = self.gateway.api
        api.draining = True
        await maybeDeferred(self.listener.stopService)
        grace = self.gateway.config.server.shutdown_grace_seconds
        if api.active:
            log.info(
                "waiting up to {grace}s for {n} requests in flight", grace=grace, n=len(api.active)
            )
            idle = api.wait_idle()
            timer = self.reactor.callLater(grace, idle.cancel)
            try:
                await idle
            except CancelledError:
                log.warn("cutting {n} requests still in flight", n=api.cut_active())
            else:
                timer.cancel()
        if self.health is not None:
            await maybeDeferred(self.health.stopService)
        await self.gateway.upstream.stopService()
        if self.demo is not None:
            await self.demo.stopService()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())


def start_demo_backend(reactor: Any) -> tuple[BackendConfig, MockBackend]:
    """Listen with an embedded mock backend on 127.0.0.1 (any free port)."""
    settings = MockSettings(name="demo", models=list(DEMO_MODELS), stream_delay_ms=50)
    backend = listen_mock(reactor, settings)
    config = BackendConfig(name="demo", url=backend.url, type="openai", models=DEMO_MODELS)
    return config, backend


def makeService(options: Mapping[str, Any], reactor: Any = None) -> GatewayService:
    """Build the gateway's service tree from ``twistd nexus`` options."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        config, warnings = load_config(options.get("config"))
    except ConfigError as e:
        raise SystemExit(f"nexus: configuration error: {e}") from None
    for warning in warnings:
        print(f"nexus: warning: {warning}")
    if options.get("listen"):
        config = attrs.evolve(config, server=attrs.evolve(config.server, listen=options["listen"]))
    demo_backend = None
    if options.get("demo") or not options.get("config"):
        demo, demo_backend = start_demo_backend(reactor)
        config = attrs.evolve(config, backends=(*config.backends, demo))
        print(f"nexus: demo backend at {demo.url} serving {', '.join(DEMO_MODELS)}")
    try:
        gateway = build_gateway(config, reactor)
    except ConfigError as e:
        raise SystemExit(f"nexus: configuration error: {e}") from None
    service = GatewayService(gateway, reactor)
    if demo_backend is not None:
        service.demo = _DemoBackendService(demo_backend)
    return service
