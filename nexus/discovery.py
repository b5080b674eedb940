"""Discovery by mDNS / DNS-SD (contract section 10): servers that advertise themselves join.

Threads. python-zeroconf runs its own asyncio loop in a thread of its own (sockets, record
cache, queries), and its ``ServiceBrowser`` calls the listener from a second thread. Neither
ever touches the gateway: the listener hands each event to the reactor with
``callFromThread`` and returns at once, so the browser never waits on the gateway. Resolving a
service (address, port, TXT record) is a coroutine run on zeroconf's own loop
(``AsyncServiceInfo.async_request`` submitted with ``run_coroutine_threadsafe``): no thread
blocks while the answers come, any number of services resolve at once, and the answer, copied
into an immutable :class:`Advert` inside that loop, reaches the reactor by ``callFromThread``
too. Everything that changes the gateway (the registry, the grace timers, the first health
check of a new backend) happens in the reactor thread, in :class:`Discovery`, which the tests
drive with fake events and a ``Clock``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import re
import warnings
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from nexus.config import BackendConfig, DiscoveryConfig
from nexus.health import HealthPoller
from nexus.registry import (
    HEALTHY,
    SOURCE_CONFIG,
    SOURCE_MDNS,
    UNKNOWN,
    Backend,
    BackendRegistry,
)

log = Logger()

#: Backend type by TXT ``type`` value (lower case); any other value is ``generic``.
TXT_TYPES: Mapping[str, str] = {
    "ollama": "ollama",
    "vllm": "vllm",
    "llamacpp": "llamacpp",
    "llama.cpp": "llamacpp",
    "lmstudio": "lmstudio",
    "exo": "exo",
    "openai": "openai",
}
#: Backend type of a service without a TXT ``type``, by service type (lower case).
DEFAULT_TYPES: Mapping[str, str] = {"_ollama._tcp.local.": "ollama"}
#: Longest backend id taken from an instance name (a DNS label is at most 63 bytes anyway).
MAX_ID_LENGTH = 63
#: How long one resolution (SRV, TXT and address records) may take.
RESOLVE_TIMEOUT_MS = 3000
#: What a TXT ``api_path`` may hold: a URL path, nothing to escape, not too long.
_API_PATH = re.compile(r"/?[A-Za-z0-9._~!$&'()*+,;=:@%/-]{0,200}")


class Unusable(Exception):
    """A resolved service that cannot become a backend; the message says why."""


@attrs.frozen
class Advert:
    """What a resolved service says about itself: a copy made in zeroconf's thread."""

    service_type: str  # "_llm._tcp.local."
    name: str  # "gpu-box._llm._tcp.local."
    #: IPv4 addresses first, then IPv6, the most recently announced first within each.
    addresses: tuple[str, ...]
    port: int | None
    #: The TXT record's keys and values as received (a key without ``=`` has None).
    properties: Mapping[bytes, bytes | None] = attrs.field(factory=dict)

    @classmethod
    def from_info(cls, info: Any) -> Advert:
        """Copy a resolved ``zeroconf.ServiceInfo``."""
        return cls(
            service_type=info.type,
            name=info.name,
            addresses=tuple(info.parsed_addresses()),
            port=info.port,
            properties=dict(info.properties),
        )


@attrs.frozen
class Plan:
    """The backend an advert describes: its id before de-duplication, url and type."""

    label: str
    url: str
    type: str


# ---- from an advert to a backend (pure functions)


def instance_label(service_type: str, name: str) -> str:
    """The instance name of ``name`` (``gpu-box`` of ``gpu-box._llm._tcp.local.``) as an id.

    A run of characters that cannot be shown on one line (controls, line breaks) becomes one
    ``-``; at most ``MAX_ID_LENGTH`` characters; never empty.
    """
    suffix = "." + service_type
    label = name[: -len(suffix)] if name.lower().endswith(suffix.lower()) else name.split(".")[0]
    clean = "".join(c if c.isprintable() else "\0" for c in label)
    clean = re.sub("\0+", "-", clean).strip(" -")
    return clean[:MAX_ID_LENGTH].strip() or "mdns"


def _txt(properties: Mapping[bytes, bytes | None], key: bytes) -> str | None:
    """TXT value of ``key`` (keys are case-insensitive), as text; None when absent or empty.

    Raises UnicodeDecodeError for a value that is not UTF-8.
    """
    for k, v in properties.items():
        if k.lower() == key:
            text = v.decode("utf-8").strip() if v is not None else ""
            return text or None
    return None


def backend_type(service_type: str, properties: Mapping[bytes, bytes | None]) -> str:
    """Type from TXT ``type`` (``llama.cpp`` is ``llamacpp``; unknown is ``generic``).

    Without one: ``ollama`` for ``_ollama._tcp``, else ``generic``.
    """
    try:
        value = _txt(properties, b"type")
    except UnicodeDecodeError:
        return "generic"
    if value is None:
        return DEFAULT_TYPES.get(service_type.lower(), "generic")
    return TXT_TYPES.get(value.lower(), "generic")


def _address(addresses: Iterable[str]) -> str:
    """The address to reach the service at: IPv4 first, IPv6 in brackets, never link-local v6."""
    v4, v6 = [], []
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address.is_unspecified or address.is_multicast:
            continue
        if address.version == 4:
            v4.append(address.compressed)
        elif not address.is_link_local:  # needs a zone (%eth0) that a URL cannot carry
            v6.append(f"[{address.compressed}]")
    if not (v4 or v6):
        raise Unusable("no usable address (IPv4, or IPv6 that is not link-local)")
    return (v4 or v6)[0]


def _api_path(properties: Mapping[bytes, bytes | None]) -> str:
    """TXT ``api_path`` as a path to append to ``http://host:port`` (``""`` for the root)."""
    try:
        value = _txt(properties, b"api_path")
    except UnicodeDecodeError:
        raise Unusable("TXT api_path is not UTF-8") from None
    if value is None:
        return ""
    if _API_PATH.fullmatch(value) is None:
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise Unusable(f"TXT api_path {shown!r} is not a URL path")
    path = "/" + value.strip("/")
    if path.endswith("/v1"):  # the root is asked for, but the OpenAI base is a common answer
        path = path[: -len("/v1")]
    return path.rstrip("/")


def plan(advert: Advert) -> Plan:
    """The backend ``advert`` describes; Unusable when it cannot be one."""
    port = advert.port
    if not isinstance(port, int) or not 0 < port < 65536:
        raise Unusable(f"no usable port ({port!r})")
    url = f"http://{_address(advert.addresses)}:{port}{_api_path(advert.properties)}"
    label = instance_label(advert.service_type, advert.name)
    return Plan(label, url, backend_type(advert.service_type, advert.properties))


def unique_id(label: str, taken: Container[str]) -> str:
    """``label``, or ``label-2``, ``label-3``... whichever is not taken first."""
    name, n = label, 1
    while name in taken:
        n += 1
        name = f"{label}-{n}"
    return name


def same_server(a: str, b: str) -> bool:
    """Whether two backend urls name the same server root (scheme, host, port, path)."""
    return _url_key(a) == _url_key(b)


def _url_key(url: str) -> tuple[str, str, int | None, str]:
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        return (url, "", None, "")
    host = (parts.hostname or "").lower()
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        pass
    return scheme, host, port, parts.path.rstrip("/")


# ---- the reactor side


@attrs.define(eq=False)
class _Service:
    """One advertised service (type and name, lower case) and the backend it became."""

    key: tuple[str, str]
    name: str
    backend: Backend | None = None
    #: The removal at the end of the grace period, while it is withdrawn.
    removal: IDelayedCall | None = None
    #: Counts its disappearances: a resolution started before one is out of date.
    generation: int = 0
    #: Why it is ignored, when it is (logged once per reason).
    problem: str | None = None


class Discovery:
    """Turns browser events into registry changes; runs in the reactor thread only.

    ``resolve(service_type, name)`` fires with the service's :class:`Advert`, or None when it
    did not answer in time. ``on_new`` is called with each backend that joins (or returns):
    it checks it at once, or trusts it when health checks are off.
    """

    def __init__(
        self,
        registry: BackendRegistry,
        clock: IReactorTime,
        grace_period: float,
        resolve: Callable[[str, str], Deferred[Advert | None]],
        on_new: Callable[[Backend], None],
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.grace_period = grace_period
        self.resolve = resolve
        self.on_new = on_new
        self.services: dict[tuple[str, str], _Service] = {}
        self.stopped = False

    # -- events from the browser

    def service_added(self, service_type: str, name: str) -> None:
        """A service appeared: resolve it, then add (or bring back) its backend."""
        if self.stopped:
            return
        key = (service_type.lower(), name.lower())
        service = self.services.get(key)
        if service is None:
            service = self.services[key] = _Service(key, name)
        generation = service.generation
        try:
            d = self.resolve(service_type, name)
        except Exception:
            log.failure("cannot resolve {service}", service=name)
            return
        d.addCallback(self._resolved, service, generation)
        d.addErrback(self._unresolved, service)

    #: A service's records changed (TXT, address, port): the same as an appearance.
    service_updated = service_added

    def service_removed(self, service_type: str, name: str) -> None:
        """A service is no longer advertised: its backend is unknown now, removed later."""
        if self.stopped:
            return
        service = self.services.get((service_type.lower(), name.lower()))
        if service is None:
            return
        service.generation += 1
        if service.backend is None:
            del self.services[service.key]
        else:
            self._withdraw(service, "is no longer advertised")

    def stop(self) -> None:
        """Ignore events from now on; cancel pending removals (the backends stay)."""
        self.stopped = True
        for service in self.services.values():
            if service.removal is not None and service.removal.active():
                service.removal.cancel()
            service.removal = None

    # -- resolutions

    def _resolved(self, advert: Advert | None, service: _Service, generation: int) -> None:
        if self.stopped or service.generation != generation:
            return  # gone since the resolution started
        if self.services.get(service.key) is not service:
            return
        if advert is None:
            self._ignore(service, "did not resolve (no address, port or TXT record in time)")
            return
        try:
            wanted = plan(advert)
        except Unusable as e:
            self._ignore(service, str(e))
            return
        configured = self._configured_at(wanted.url)
        if configured is not None:
            self._ignore(service, f"configured backend {configured} has its url {wanted.url}")
            return
        service.problem = None
        backend = service.backend
        if backend is not None and (backend.config.url, backend.type) == (wanted.url, wanted.type):
            if backend.withdrawn:
                self._restore(service, backend)
            return
        if backend is not None:  # moved or changed type: another server under the same id
            name = backend.name
            self._drop(service)
        else:
            name = unique_id(wanted.label, self.registry)
        config = BackendConfig(name=name, url=wanted.url, type=wanted.type)
        try:
            service.backend = self.registry.add(config, source=SOURCE_MDNS)
        except ValueError as e:  # the id was taken meanwhile (a reload): next time
            log.warn("cannot add discovered backend {name}: {error}", name=name, error=str(e))
            return
        log.info(
            "discovered backend {name} at {url} (type {type}, service {service})",
            name=name,
            url=wanted.url,
            type=wanted.type,
            service=service.name,
        )
        self._announce(service.backend)

    def _unresolved(self, failure: Failure, service: _Service) -> None:
        if not self.stopped:
            log.failure("resolving {service} failed", failure, service=service.name)

    def _configured_at(self, url: str) -> str | None:
        """The id of a configured backend whose url is ``url``, if one is."""
        for backend in self.registry.backends:
            if backend.source == SOURCE_CONFIG and same_server(backend.config.url, url):
                return backend.name
        return None

    # -- state changes

    def _ignore(self, service: _Service, why: str) -> None:
        """The service cannot be (or stay) a backend: say so once; withdraw what it was."""
        if service.problem != why:
            service.problem = why
            log.info("ignoring service {service}: {why}", service=service.name, why=why)
        if service.backend is not None:
            self._withdraw(service, f"is ignored now ({why})")

    def _withdraw(self, service: _Service, why: str) -> None:
        backend = service.backend
        if backend is None or backend.withdrawn:
            return
        backend.withdrawn = True
        backend.status = UNKNOWN
        backend.consecutive_failures = backend.consecutive_successes = 0
        self.registry.changed(backend)  # the dashboard sees it go unknown now
        service.removal = self.clock.callLater(self.grace_period, self._expire, service)
        log.info(
            "backend {name} {why}: unknown now, removed in {grace}s unless it returns",
            name=backend.name,
            why=why,
            grace=f"{self.grace_period:g}",
        )

    def _restore(self, service: _Service, backend: Backend) -> None:
        if service.removal is not None and service.removal.active():
            service.removal.cancel()
        service.removal = None
        backend.withdrawn = False
        self.registry.changed(backend)
        log.info("backend {name} is advertised again", name=backend.name)
        self._announce(backend)

    def _expire(self, service: _Service) -> None:
        service.removal = None
        backend = service.backend
        if self.services.get(service.key) is service:
            del self.services[service.key]
        if backend is not None:
            self._drop(service)
            log.info(
                "backend {name} removed: not back within {grace}s",
                name=backend.name,
                grace=f"{self.grace_period:g}",
            )

    def _drop(self, service: _Service) -> None:
        """Unregister the service's backend (requests in flight to it finish)."""
        backend, service.backend = service.backend, None
        if service.removal is not None and service.removal.active():
            service.removal.cancel()
        service.removal = None
        if backend is not None and backend.name in self.registry:
            if self.registry.get(backend.name) is backend:
                self.registry.remove(backend.name)

    def _announce(self, backend: Backend) -> None:
        try:
            self.on_new(backend)
        except Exception:
            log.failure("checking discovered backend {name} failed", name=backend.name)


def checker(poller: HealthPoller, enabled: Callable[[], bool]) -> Callable[[Backend], None]:
    """What to do with a backend that joins or returns: check it now, or trust it.

    ``enabled`` says whether health checks are on (read each time: a reload may change it).
    """

    def check(backend: Backend) -> None:
        if not enabled():
            backend.status = HEALTHY  # as configured backends are when nothing checks them
            return
        ensureDeferred(poller.check(backend)).addErrback(
            lambda failure: log.failure("checking {name} failed", failure, name=backend.name)
        )

    return check


# ---- the zeroconf side (its threads)


class _Listener:
    """A zeroconf ``ServiceListener``: called in the browser's thread, hands over to the reactor."""

    def __init__(self, reactor: Any, discovery: Discovery) -> None:
        self.reactor = reactor
        self.discovery = discovery

    def add_service(self, zc: Any, type_: str, name: str) -> None:
        self.reactor.callFromThread(self.discovery.service_added, type_, name)

    def update_service(self, zc: Any, type_: str, name: str) -> None:
        self.reactor.callFromThread(self.discovery.service_updated, type_, name)

    def remove_service(self, zc: Any, type_: str, name: str) -> None:
        self.reactor.callFromThread(self.discovery.service_removed, type_, name)


async def _resolve(zc: Any, service_type: str, name: str) -> Advert | None:
    """Runs in zeroconf's loop: the service's records (from the cache, else asked for)."""
    from zeroconf.asyncio import AsyncServiceInfo

    info = AsyncServiceInfo(service_type, name)
    if not await info.async_request(zc, RESOLVE_TIMEOUT_MS):
        return None
    return Advert.from_info(info)


class ZeroconfBrowser:
    """One ``Zeroconf`` and one ``ServiceBrowser`` for the configured types and interfaces.

    ``start`` raises whatever zeroconf raises when it cannot open its multicast sockets.
    """

    def __init__(self, reactor: Any, config: DiscoveryConfig) -> None:
        self.reactor = reactor
        self.config = config
        self.zc: Any = None
        self.browser: Any = None
        self._pending: set[concurrent.futures.Future[Advert | None]] = set()

    def start(self, discovery: Discovery) -> None:
        """Open the sockets, start zeroconf's threads and browse (in the reactor thread)."""
        from zeroconf import InterfaceChoice, ServiceBrowser, Zeroconf

        missing = [a for a in self.config.interfaces if _bare(a) not in _local_addresses()]
        if missing:  # zeroconf would say "No such device"
            raise OSError(f"no network interface has the address {', '.join(missing)}")
        interfaces: Any = list(self.config.interfaces) or InterfaceChoice.All
        error: Exception | None = None
        with warnings.catch_warnings():
            # When it cannot start, zeroconf leaves the socket it opened to the collector.
            warnings.simplefilter("ignore", ResourceWarning)
            try:
                # Its own loop in its own thread, even under an asyncio reactor.
                self.zc = Zeroconf(interfaces=interfaces, use_asyncio=False)
            except Exception as e:
                error = e.with_traceback(None)  # its frames (and that socket) go now
        if error is not None:
            raise error
        types = list(dict.fromkeys(self.config.service_types))
        # Duck-typed: zeroconf (imported only when discovery starts) calls its three methods.
        listener: Any = _Listener(self.reactor, discovery)
        try:
            self.browser = ServiceBrowser(self.zc, types, listener)
        except BaseException:
            self.zc.close()
            self.zc = None
            raise

    def resolve(self, service_type: str, name: str) -> Deferred[Advert | None]:
        """Resolve a service on zeroconf's loop; fires in the reactor thread."""
        zc = self.zc
        if zc is None or zc.loop is None or zc.loop.is_closed():
            return succeed(None)
        d: Deferred[Advert | None] = Deferred()
        future = asyncio.run_coroutine_threadsafe(_resolve(zc, service_type, name), zc.loop)
        self._pending.add(future)
        future.add_done_callback(lambda f: self.reactor.callFromThread(self._done, f, d))
        return d

    def _done(self, future: concurrent.futures.Future[Advert | None], d: Deferred[Any]) -> None:
        self._pending.discard(future)
        if future.cancelled():
            d.callback(None)
        elif (error := future.exception()) is not None:
            d.errback(Failure(error))
        else:
            d.callback(future.result())

    def stop(self) -> None:
        """Stop browsing and close zeroconf; its threads are joined (a few milliseconds)."""
        for future in list(self._pending):
            future.cancel()  # else closing waits for resolutions to time out
        if self.browser is not None:
            self.browser.cancel()
            self.browser = None
        if self.zc is not None:
            self.zc.close()
            self.zc = None


def _bare(address: str) -> str:
    """An IP address without its zone (``fe80::1%2``), normalised."""
    return ipaddress.ip_address(address.split("%", 1)[0]).compressed


def _local_addresses() -> set[str]:
    """The IP addresses of this machine's network interfaces."""
    import ifaddr

    out = set()
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            out.add(_bare(ip.ip if isinstance(ip.ip, str) else ip.ip[0]))
    return out


class _ZeroconfLog(logging.Handler):
    """zeroconf's own warnings (``logging``) into the gateway's log, in the reactor thread."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(logging.WARNING)
        self.reactor = reactor

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        level = LogLevel.error if record.levelno >= logging.ERROR else LogLevel.warn
        self.reactor.callFromThread(log.emit, level, "zeroconf: {message}", message=message)


class DiscoveryService(Service):
    """Browses while the gateway runs; discovered services join ``registry``.

    ``check`` is called with every backend that joins or returns (check it now, or trust it
    when health checks are off). Without multicast (zeroconf cannot start) one warning is
    logged and the gateway carries on with its configured backends.
    """

    name = "discovery"

    def __init__(
        self,
        config: DiscoveryConfig,
        registry: BackendRegistry,
        reactor: Any,
        check: Callable[[Backend], None],
    ) -> None:
        self.config = config
        self.registry = registry
        self.reactor = reactor
        self.check = check
        self.discovery: Discovery | None = None
        self.browser: ZeroconfBrowser | None = None
        self._log_bridge: _ZeroconfLog | None = None

    @property
    def where(self) -> str:
        """The interfaces browsed, for the log."""
        return ", ".join(self.config.interfaces) or "every interface"

    def startService(self) -> None:
        super().startService()
        browser = ZeroconfBrowser(self.reactor, self.config)
        self.discovery = Discovery(
            self.registry, self.reactor, self.config.grace_period_seconds, browser.resolve,
            self.check,
        )  # fmt: skip
        self._log_bridge = _ZeroconfLog(self.reactor)
        logging.getLogger("zeroconf").addHandler(self._log_bridge)
        try:
            browser.start(self.discovery)
        except Exception as e:
            log.warn(
                "discovery: mDNS is not available on {where} ({error}); running with the "
                "configured backends only",
                where=self.where,
                error=f"{type(e).__name__}: {e}" if str(e) else type(e).__name__,
            )
            self._unhook_log()
            return
        self.browser = browser
        log.info(
            "discovery: browsing {types} on {where}",
            types=", ".join(self.config.service_types),
            where=self.where,
        )

    def stopService(self) -> None:
        super().stopService()
        if self.discovery is not None:
            self.discovery.stop()
        if self.browser is not None:
            self.browser.stop()
            self.browser = None
        self._unhook_log()

    def _unhook_log(self) -> None:
        if self._log_bridge is not None:
            logging.getLogger("zeroconf").removeHandler(self._log_bridge)
            self._log_bridge = None
