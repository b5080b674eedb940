"""Admission: how many inference requests are in flight, the concurrency limit, the drain."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from nexus.errors import Overloaded
from nexus.server import Exchange


class Admission:
    """Admits inference exchanges, counts them until they close, and drains on shutdown.

    ``max_concurrent`` of 0 means no limit. Once ``draining`` is set every new
    exchange is refused with 503 while those in flight finish.
    """

    def __init__(self, max_concurrent: int = 0) -> None:
        self.max_concurrent = max_concurrent
        self.draining = False
        #: Exchanges admitted and not yet closed.
        self.active: set[Exchange] = set()
        self._idle_waiters: list[Deferred[None]] = []

    def admit(self, exchange: Exchange) -> None:
        """Count ``exchange`` in until it closes; raise Overloaded if it cannot be taken now."""
        if self.draining:
            raise Overloaded("The gateway is shutting down.")
        if self.max_concurrent and len(self.active) >= self.max_concurrent:
            raise Overloaded(f"Too many requests in flight ({self.max_concurrent}); retry shortly.")
        self.active.add(exchange)
        exchange.on_close.append(self._release)

    def _release(self, exchange: Exchange) -> None:
        self.active.discard(exchange)
        if not self.active:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def wait_idle(self) -> Deferred[None]:
        """Fires once no admitted exchange is in flight."""
        if not self.active:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def cut_active(self) -> int:
        """Close the connections of exchanges still in flight; returns how many."""
        return sum(exchange.abort() for exchange in list(self.active))
