"""HTTP clients with a deadline: a test whose answer never comes fails, it does not hang.

Every client the suite opens goes through :func:`deadline`, directly or through a
:class:`DeadlineAgent` (which bounds the wait for the response *and*, separately, the wait for
its whole body: treq's own ``timeout=`` covers the headers only).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, ITransport
from twisted.internet.protocol import Protocol
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

#: Seconds a test client waits for an answer, and again for the whole body. Generous, so a
#: slow CI machine never trips it, yet a hang fails the test in 30 s instead of stalling the run.
CLIENT_DEADLINE = 30.0

_T = TypeVar("_T")


class DeadlineExceeded(AssertionError):
    """A test client got no answer, or no complete body, within its deadline."""


def deadline(
    work: Deferred[_T] | Coroutine[Any, Any, _T],
    seconds: float = CLIENT_DEADLINE,
    what: str = "the client",
) -> Deferred[_T]:
    """``work`` bounded by ``seconds``: then it is cancelled and fails with DeadlineExceeded.

    A Deferred gets the timeout in place (and is returned); a coroutine is wrapped first, and
    cancelling it cancels whatever it awaits at that moment (a request, a body read).
    """
    d: Deferred[_T] = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)

    def timed_out(result: Any, timeout: float) -> Any:
        if isinstance(result, Failure):
            raise DeadlineExceeded(
                f"{what}: nothing within {timeout:g} s ({result.getErrorMessage()})"
            )
        return result

    return d.addTimeout(seconds, reactor, onTimeoutCancel=timed_out)


class _BodyWithDeadline(Protocol):
    """Hands a body to ``inner``; past the deadline, closes the connection and fails ``inner``."""

    def __init__(self, inner: Any, seconds: float, what: str) -> None:
        self.inner = inner
        self.seconds = seconds
        self.what = what
        self.expired = False
        self.timer: IDelayedCall | None = None

    def makeConnection(self, transport: ITransport) -> None:
        self.transport = transport
        self.timer = reactor.callLater(self.seconds, self._expire)
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if not self.expired:
            self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if not self.expired:
            self.inner.connectionLost(reason)

    def _expire(self) -> None:
        self.expired = True
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]  # closes the connection
        error = DeadlineExceeded(f"{self.what}: body not complete within {self.seconds:g} s")
        self.inner.connectionLost(Failure(error))


class _ResponseWithDeadline(proxyForInterface(IResponse)):  # type: ignore[misc]
    """A response whose body must arrive within the deadline (counted from ``deliverBody``)."""

    def __init__(self, original: IResponse, seconds: float, what: str) -> None:
        super().__init__(original)
        self._seconds = seconds
        self._what = what

    def deliverBody(self, protocol: Any) -> None:
        self.original.deliverBody(_BodyWithDeadline(protocol, self._seconds, self._what))


@implementer(IAgent)
class DeadlineAgent:
    """An agent whose every response, and then every response body, has a deadline."""

    def __init__(self, agent: IAgent, seconds: float = CLIENT_DEADLINE) -> None:
        self.agent = agent
        self.seconds = seconds

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        what = f"{method.decode()} {uri.decode()}"
        d = deadline(self.agent.request(method, uri, headers, bodyProducer), self.seconds, what)
        return d.addCallback(_ResponseWithDeadline, self.seconds, what)


def http_client(
    pool: HTTPConnectionPool | None = None, seconds: float = CLIENT_DEADLINE
) -> HTTPClient:
    """A treq client with deadlines; without ``pool``, no connection outlives its request."""
    return HTTPClient(DeadlineAgent(Agent(reactor, pool=pool), seconds))


def served_by(response: Any) -> str:
    """The ``x-nexus-backend`` header of a gateway's answer."""
    return str(response.headers.getRawHeaders("x-nexus-backend")[0])
