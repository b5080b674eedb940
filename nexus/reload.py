"""Configuration reload (contract section 11): re-read the file, apply what changed.

A reload reads and checks the whole new file first (the same loader and the
same one-line errors as at start-up) and builds everything that can fail;
only then does it apply the changes, in one go on the reactor thread, so a
request sees either the old configuration or the new one, never a mix. A bad
file changes nothing. Requests in flight keep what they started with (the
backend object they hold, their deadline).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger

from nexus.access import AccessPolicy
from nexus.config import Config, ConfigError, load_config
from nexus.registry import HEALTHY, Backend
from nexus.routing import Router
from nexus.tls import needs_tls, tls_loaded

if TYPE_CHECKING:
    from nexus.logs import GatewayLog
    from nexus.service import Gateway

log = Logger()

#: Settings a running gateway cannot change: they are logged as needing a restart.
RESTART_ONLY = ("server.listen", "server.workers", "server.dashboard")


@attrs.define
class Reload:
    """Re-reads ``path`` into a running ``gateway``.

    ``listen`` is the ``--listen`` given on the command line (it wins over the
    file, as at start-up, like ``no_discovery``); ``restart_health`` restarts the health poller's
    timer when its interval changes; ``log`` is the gateway's log observer.
    """

    gateway: Gateway
    path: str | None
    listen: str | None = None
    #: ``--no-discovery`` was given: it wins over the file, as at start-up.
    no_discovery: bool = False
    restart_health: Callable[[float], None] | None = None
    log_setup: GatewayLog | None = None
    #: False in a worker: the fleet (backends, health checks) is its supervisor's.
    fleet: bool = True
    #: Worker processes sharing the gateway's limits (1: a single process).
    workers: int = 1
    #: Called after a reload was applied (the supervisor then reloads its workers).
    after: Callable[[], None] | None = None

    def __call__(self) -> bool:
        """Reload now; True when the new configuration was applied."""
        if self.path is None:
            log.warn("reload: started without --config, there is no file to re-read")
            return False
        try:
            new, warnings = load_config(self.path)
            if self.listen:
                new = attrs.evolve(new, server=attrs.evolve(new.server, listen=self.listen))
            if self.no_discovery:
                new = attrs.evolve(new, discovery=attrs.evolve(new.discovery, enabled=False))
            access = AccessPolicy.from_config(new.server)
            router = Router(self.gateway.registry, new.routing)
        except ConfigError as e:
            log.error("reload: {error}; nothing changed", error=str(e))
            return False
        if not tls_loaded() and needs_tls(new.server.listen, [b.url for b in new.backends]):
            log.error(
                "reload: {path}: an https:// backend needs TLS, which this gateway left out at "
                "start (no TLS in its configuration then); restart it; nothing changed",
                path=self.path,
            )
            return False
        for warning in warnings:
            log.warn("{warning}", warning=warning)
        changes = self._apply(new, access, router)
        if self.after is not None:
            self.after()
        log.info(
            "reload: {path}: {changes}",
            path=self.path,
            changes="; ".join(changes) if changes else "no change",
        )
        return True

    def _apply(self, new: Config, access: AccessPolicy, router: Router) -> list[str]:
        """Apply ``new`` (already checked) at once; return what changed, for the log."""
        gateway = self.gateway
        old = gateway.config
        changes: list[str] = []
        for name in _changed_sections(old, new):
            if name not in ("server", "routing", "health_check", "logging", "backends"):
                log.warn("reload: changes to [{section}] take effect after a restart",
                         section=name)
        for key in RESTART_ONLY:
            section, field = key.split(".")
            before = getattr(getattr(old, section), field, None)
            after = getattr(getattr(new, section), field, None)
            if before != after:
                log.warn("reload: {key} changed ({before!r} -> {after!r}): takes effect after "
                         "a restart", key=key, before=before, after=after)
        if self.fleet:
            changes += self._apply_backends(old, new)
        registry = gateway.registry
        if new.routing != old.routing:
            registry.set_routing(new.routing.aliases, new.routing.fallbacks)
            changes.append("routing")
        gateway.router = router
        gateway.api.router = router
        proxy = gateway.api.proxy
        proxy.router = router
        proxy.max_retries = new.routing.max_retries
        proxy.request_timeout = new.server.request_timeout_seconds
        proxy.max_body_bytes = new.server.max_body_bytes
        proxy.content_preview = new.logging.content_preview
        proxy.forget_targets()  # urls and backend keys may have changed
        site = gateway.site
        site.max_body_bytes = new.server.max_body_bytes
        site.request_timeout = new.server.request_timeout_seconds
        site.max_headers = new.server.max_headers
        site.max_header_bytes = new.server.max_header_bytes
        site.debug_access = new.logging.level == "debug"
        limit = new.server.max_concurrent_requests  # the gateway's: each worker takes its share
        gateway.admission.max_concurrent = math.ceil(limit / self.workers) if limit else 0
        if access.api_keys != gateway.api.access.api_keys or (
            access.metrics_token != gateway.api.access.metrics_token
        ):
            changes.append("access keys")
        gateway.api.access = access
        gateway.poller.config = new.health_check
        if new.health_check != old.health_check and self.fleet:
            changes.append("health checks")
            if (
                self.restart_health is not None
                and new.health_check.interval_seconds != old.health_check.interval_seconds
            ):
                self.restart_health(new.health_check.interval_seconds)
        gateway.request_log.log_requests = new.logging.requests
        if new.logging != old.logging:
            changes.append("logging")
            if self.log_setup is not None:
                self.log_setup.reconfigure(new.logging)
        if new.server != old.server:
            changes.append("server limits")
        gateway.config = new
        return changes

    def _apply_backends(self, old: Config, new: Config) -> list[str]:
        """Add, remove and change the backends the file names (others stay: mDNS, demo)."""
        gateway = self.gateway
        registry = gateway.registry
        before = {b.name: b for b in old.backends}
        after = {b.name: b for b in new.backends}
        changes: list[str] = []
        for name in sorted(before.keys() - after.keys()):
            if name in registry:
                registry.remove(name)
                changes.append(f"backend {name} removed")
        for name in sorted(after.keys() - before.keys()):
            try:
                backend = registry.add(after[name])
            except ValueError as e:
                log.error("reload: backend {name} not added: {why}", name=name, why=str(e))
                continue
            changes.append(f"backend {name} added")
            self._check(backend)
        for name in sorted(before.keys() & after.keys()):
            if before[name] == after[name] or name not in registry:
                continue
            backend = registry.get(name)
            moved = before[name].url != after[name].url
            registry.reconfigure(backend, after[name])
            registry.changed(backend)  # the dashboard shows the new settings at once
            changes.append(f"backend {name} changed")
            if moved:
                self._check(backend)
        return changes

    def _check(self, backend: Backend) -> None:
        """A new or moved backend: check it now (or trust it when checks are off)."""
        gateway = self.gateway
        if not gateway.config.health_check.enabled:
            backend.status = HEALTHY
            return
        ensureDeferred(gateway.poller.check(backend)).addErrback(
            lambda failure: log.failure("checking {name} failed", failure, name=backend.name)
        )


def _changed_sections(old: Config, new: Config) -> list[str]:
    return [
        field.name
        for field in attrs.fields(Config)
        if getattr(old, field.name) != getattr(new, field.name)
    ]
