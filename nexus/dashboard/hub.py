"""Server-Sent Events to open dashboards: one hub, a bounded queue per subscriber.

Each subscriber is the push producer of its own response: the connection's
transport pauses it when its send buffer is full (the browser does not read
fast enough) and resumes it when the buffer has drained. While it is paused,
events wait in its queue; a queue that would grow past ``MAX_QUEUED_BYTES``
means the browser is gone or hopelessly slow, and that subscriber is dropped
(its connection aborted; EventSource reconnects by itself if it is still
there). So an open dashboard costs the gateway at most the transport's buffer
plus ``MAX_QUEUED_BYTES``, whatever the browser does.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

log = Logger()

#: Events a paused subscriber may have waiting, in bytes, before it is dropped.
MAX_QUEUED_BYTES = 256 * 1024
#: Open event streams at once; more are refused with 503.
MAX_SUBSCRIBERS = 100


def frame(event: str, data: object) -> bytes:
    """One SSE event: ``event: <name>`` and one ``data:`` line of compact JSON.

    JSON text has no raw line breaks (``\\n``, ``\\r``, U+2028 are escaped), so
    whatever a client or a backend put in a name or a message, the event stays
    one event.
    """
    payload = json.dumps(data, separators=(",", ":"))
    return b"event: %b\ndata: %b\n\n" % (event.encode("ascii"), payload.encode("ascii"))


@implementer(IPushProducer)
class Subscriber:
    """One open ``/v1/events`` response: writes events as the connection allows."""

    def __init__(self, hub: EventHub, request: Request, limit: int) -> None:
        self.hub = hub
        self.request = request
        self.limit = limit
        self.queue: deque[bytes] = deque()
        #: Bytes in ``queue``.
        self.queued = 0
        self.paused = False
        self.closed = False
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._ended)

    def send(self, data: bytes) -> bool:
        """Write ``data`` now, or queue it while paused; False when the queue is full."""
        if self.closed:
            return True
        if self.paused or self.queue:
            if self.queued + len(data) > self.limit:
                return False
            self.queue.append(data)
            self.queued += len(data)
            return True
        self.request.write(data)
        return True

    # -- IPushProducer: called by the connection -----------------------------------------

    def pauseProducing(self) -> None:
        """The send buffer is full: queue from now on."""
        self.paused = True

    def resumeProducing(self) -> None:
        """The send buffer drained: write what waited, as long as it keeps draining."""
        self.paused = False
        queue = self.queue
        while queue and not self.paused and not self.closed:
            data = queue.popleft()
            self.queued -= len(data)
            self.request.write(data)

    def stopProducing(self) -> None:
        """The connection is going away."""
        self.hub.remove(self)

    # -- ending --------------------------------------------------------------------------

    def _ended(self, result: object) -> None:
        """The response finished or the connection was lost (a Failure, consumed here)."""
        self.hub.remove(self)

    def _release(self) -> None:
        self.closed = True
        self.queue.clear()
        self.queued = 0
        if self.request.channel is not None:  # gone already when the connection was lost
            self.request.unregisterProducer()

    def finish(self) -> None:
        """End the response normally (the gateway stops; EventSource will reconnect)."""
        self._release()
        if self.request.channel is not None and not self.request.finished:
            self.request.finish()

    def abort(self) -> None:
        """Cut the connection without writing what is left (a subscriber that fell behind)."""
        self._release()
        channel = self.request.channel
        transport = channel.transport if channel is not None else None
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]


class EventHub:
    """The open event streams; ``broadcast`` writes one event to each.

    ``on_idle`` is called when the last subscriber leaves (the live view then
    stops its timers).
    """

    def __init__(
        self,
        max_subscribers: int = MAX_SUBSCRIBERS,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.max_subscribers = max_subscribers
        self.max_queued_bytes = max_queued_bytes
        self.on_idle = on_idle
        self.subscribers: dict[Subscriber, None] = {}  # ordered, O(1) removal
        #: Subscribers dropped because their queue was full, since start.
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.subscribers)

    def subscribe(self, request: Request) -> Subscriber | None:
        """Make ``request`` a subscriber; None when ``max_subscribers`` are open already."""
        if len(self.subscribers) >= self.max_subscribers:
            return None
        subscriber = Subscriber(self, request, self.max_queued_bytes)
        if not subscriber.closed:  # the connection may have been lost already
            self.subscribers[subscriber] = None
        return subscriber

    def broadcast(self, data: bytes) -> None:
        """Send ``data`` (whole SSE events) to every subscriber; drop those that fell behind."""
        for subscriber in list(self.subscribers):
            try:
                if subscriber.send(data):
                    continue
                log.info(
                    "dashboard: dropped an event stream that fell {limit} KiB behind ({client})",
                    limit=self.max_queued_bytes // 1024,
                    client=_client(subscriber.request),
                )
            except Exception:  # a broken connection must not stop the others
                log.failure("dashboard: writing to an event stream failed")
            self.dropped += 1
            self.remove(subscriber)
            subscriber.abort()

    def remove(self, subscriber: Subscriber) -> None:
        """Forget ``subscriber`` (its response ended or it was dropped)."""
        subscriber.closed = True
        if self.subscribers.pop(subscriber, False) is None and not self.subscribers:
            if self.on_idle is not None:
                self.on_idle()

    def close(self) -> None:
        """End every stream (the gateway stops)."""
        for subscriber in list(self.subscribers):
            self.subscribers.pop(subscriber, None)
            subscriber.finish()
        if self.on_idle is not None:
            self.on_idle()


def _client(request: Any) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", "?"))
