"""The gateway's HTTP client side: the hot path's connections, and treq for the rest.

Inference requests go through ``nexus.http_client`` (a request head built
once per backend endpoint, one write per request, our own response parser):
Twisted's ``Agent`` under them cost about a quarter of the gateway's CPU per
request. treq, on Twisted's pool, stays the client of the health poller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from typing import Protocol as Protocol_

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IProtocol,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    ResponseDone,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from nexus._twisted import QuietPool
from nexus.config import BackendConfig
from nexus.http_client import BackendConnections, RequestHead

#: Largest non-streaming response body the gateway holds in memory.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024

#: Hop-by-hop headers (RFC 9110 section 7.6.1), never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """One endpoint per backend address, built once.

    Twisted's Agent builds a new ``HostnameEndpoint`` (IDNA-encoding the host)
    for every request, even when a pooled connection will serve it; the
    backends are few and fixed, so the gateway keeps one per address.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()
        self._cache: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            tcp = HostnameEndpoint(
                self._reactor, uri.host.decode("ascii"), uri.port, timeout=self._timeout
            )
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), tcp)
            elif uri.scheme == b"http":
                endpoint = tcp
            else:
                raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
            self._cache[key] = endpoint
        return endpoint


def backend_authorization(config: BackendConfig, environ: Mapping[str, str]) -> bytes | None:
    """The ``Authorization`` value for a backend with its own key (``api_key_env``), or None.

    The one place a backend's bearer header is built: the proxy sends it instead of
    the client's key, the health poller with every probe.
    """
    env = config.api_key_env
    key = environ.get(env) if env else None
    return b"Bearer " + key.encode("latin-1") if key else None


class UpstreamClient(Service):
    """Owns the connections to the backends and the clients built on them.

    ``connections`` serves the proxy hot path (requests built by
    ``request_head``), ``http`` (a treq ``HTTPClient`` on Twisted's pool) the
    health poller. Stopping the service closes every idle connection.
    """

    name = "upstream"

    def __init__(self, reactor: Any, connect_timeout: float = 10.0) -> None:
        self.reactor = reactor
        self.endpoints = CachedEndpoints(reactor, connect_timeout)
        self.connections = BackendConnections(reactor)
        self.pool = QuietPool(reactor, persistent=True)
        self.pool.retryAutomatically = False
        self.http = HTTPClient(Agent.usingEndpointFactory(reactor, self.endpoints, pool=self.pool))

    def request_head(
        self, url: bytes, headers: Sequence[tuple[bytes, bytes]]
    ) -> RequestHead:
        """The fixed part of every ``POST`` to ``url`` (an http or https URL) with ``headers``."""
        parsed = URI.fromBytes(url)
        host = b"[" + parsed.host + b"]" if b":" in parsed.host else parsed.host
        if (parsed.scheme, parsed.port) not in ((b"http", 80), (b"https", 443)):
            host += b":%d" % parsed.port
        origin = self.connections.origin(
            (parsed.scheme, parsed.host, parsed.port),
            host.decode("ascii"),
            host,
            self.endpoints.endpointForURI(parsed),
        )
        return RequestHead(origin, parsed.originForm, headers)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.connections.close()
        return self.pool.closeCachedConnections()


class BodyTooLarge(Exception):
    """A backend's response body exceeded MAX_RESPONSE_BYTES."""


class _BodyCollector(Protocol):
    def __init__(self, finished: Deferred[bytes], limit: int) -> None:
        self.finished = finished
        self.limit = limit
        self.size = 0
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.chunks = []
            if not self.finished.called:
                self.finished.errback(BodyTooLarge(f"response body over {self.limit} bytes"))
            assert self.transport is not None
            self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(reason)


class HasBody(Protocol_):
    """A response whose body can be delivered: ours (``http_client.Response``) or Twisted's."""

    @property
    def length(self) -> int | object: ...

    def deliverBody(self, protocol: IProtocol) -> None: ...


def read_body(response: HasBody, limit: int = MAX_RESPONSE_BYTES) -> Deferred[bytes]:
    """Read a whole response body, at most ``limit`` bytes; cancelling aborts it."""
    length = response.length
    if isinstance(length, int) and length > limit:
        response.deliverBody(_Discard())
        return fail(BodyTooLarge(f"response declares {response.length} bytes"))
    protocol: _BodyCollector

    def cancel(d: Deferred[bytes]) -> None:
        if protocol.transport is not None:
            protocol.transport.stopProducing()  # type: ignore[attr-defined]

    finished: Deferred[bytes] = Deferred(cancel)
    protocol = _BodyCollector(finished, limit)
    response.deliverBody(protocol)
    return finished


class _Discard(Protocol):
    """Drops a body the gateway will not use, closing the connection at once."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]


def discard_body(response: HasBody) -> None:
    """Throw away an unwanted response body, closing its connection."""
    protocol: IProtocol = _Discard()
    response.deliverBody(protocol)


class UpstreamTimeout(Exception):
    """An upstream operation did not finish in its time."""


class Deadline:
    """One timer for all the steps of an upstream attempt (headers, then body).

    ``watch(d)`` makes ``d`` the step the deadline cancels when it expires; the
    step then fails with UpstreamTimeout whatever failure the cancelled
    operation reports (the Agent wraps CancelledError in ResponseNeverReceived).
    """

    def __init__(self, clock: IReactorTime, seconds: float) -> None:
        self.expired = False
        self._current: Deferred[Any] | None = None
        self._call = clock.callLater(max(seconds, 0.0), self._expire)

    def _expire(self) -> None:
        self.expired = True
        if self._current is not None:
            self._current.cancel()

    def _settle(self, result: Any) -> Any:
        self._current = None
        if self.expired and isinstance(result, Failure):
            raise UpstreamTimeout()
        return result

    def watch(self, d: Deferred[Any]) -> Deferred[Any]:
        """Bound ``d`` by this deadline."""
        if self.expired:
            d.cancel()
        else:
            self._current = d
        return d.addBoth(self._settle)

    def cancel(self) -> None:
        """The attempt is over: stop the timer."""
        if self._call.active():
            self._call.cancel()
