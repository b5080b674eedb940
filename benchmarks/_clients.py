"""Small HTTP/1.1 clients on plain sockets for what wrk cannot measure.

- :func:`run_streams`: SSE streams with a timestamp on every event (first-event
  latency, gaps between events).
- :func:`hold_streams`: many streams opened and kept open (memory per stream).
- :func:`probe_lag`: a tiny request every 10 ms to see how long the gateway's
  event loop makes it wait, optionally while another connection scrapes ``/metrics``.

One ``selectors`` loop, one thread, ``time.perf_counter`` for every timestamp;
everything runs until it is done or its deadline passes, whichever is first.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

import attrs

now = time.perf_counter

#: The Accept / Accept-Encoding a Prometheus server sends when it scrapes.
PROMETHEUS_ACCEPT = (
    b"application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    b"q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def post_request(host: str, port: int, path: str, body: bytes, close: bool = True) -> bytes:
    """The bytes of one JSON POST (``Connection: close`` unless ``close`` is false)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode("ascii") + body


def get_request(host: str, port: int, path: str, extra: bytes = b"") -> bytes:
    """The bytes of one keep-alive GET (``extra``: more header lines, CRLF-terminated)."""
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode("ascii") + extra + b"\r\n"


class Response:
    """Incremental parser of one HTTP/1.1 response (Content-Length, chunked or until close).

    ``on_body(data, t)`` gets each piece of the decoded body with the time its
    bytes arrived; ``done`` turns true at the end of the body.
    """

    def __init__(self, on_body: Callable[[bytes, float], None] | None = None) -> None:
        self.on_body = on_body
        self.buf = bytearray()
        self.status: int | None = None
        self.headers: dict[bytes, bytes] = {}
        self.mode = ""
        self.remaining = 0
        self.chunk_left: int | None = None
        self.body_bytes = 0
        self.done = False

    def _deliver(self, data: bytes, t: float) -> None:
        self.body_bytes += len(data)
        if self.on_body is not None and data:
            self.on_body(data, t)

    def feed(self, data: bytes, t: float) -> None:
        """Parse ``data`` received at time ``t``."""
        self.buf += data
        buf = self.buf
        while not self.done:
            if self.status is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(buf[:end]).split(b"\r\n")
                del buf[: end + 4]
                self.status = int(lines[0].split()[1])
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    self.headers[name.strip().lower()] = value.strip()
                if self.headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                    self.mode = "chunked"
                elif b"content-length" in self.headers:
                    self.mode = "length"
                    self.remaining = int(self.headers[b"content-length"])
                    self.done = self.remaining == 0
                else:
                    self.mode = "close"
            elif self.mode == "length":
                piece = bytes(buf[: self.remaining])
                del buf[: len(piece)]
                self.remaining -= len(piece)
                self._deliver(piece, t)
                self.done = self.remaining == 0
                return
            elif self.mode == "chunked":
                if self.chunk_left is None:
                    end = buf.find(b"\r\n")
                    if end < 0:
                        return
                    size = int(bytes(buf[:end]).split(b";")[0], 16)
                    del buf[: end + 2]
                    if size == 0:
                        # No trailers from Twisted: the final CRLF follows.
                        del buf[:2]
                        self.done = True
                        return
                    self.chunk_left = size
                elif self.chunk_left > 0:
                    if not buf:
                        return
                    piece = bytes(buf[: self.chunk_left])
                    del buf[: len(piece)]
                    self.chunk_left -= len(piece)
                    self._deliver(piece, t)
                else:
                    if len(buf) < 2:
                        return
                    del buf[:2]
                    self.chunk_left = None
            else:
                piece = bytes(buf)
                buf.clear()
                self._deliver(piece, t)
                return

    def closed(self) -> None:
        """The connection ended: a body delimited by close is now complete."""
        if self.mode == "close":
            self.done = True


class Conn:
    """One blocking-connected, then non-blocking, TCP connection in a :class:`Loop`."""

    def __init__(
        self,
        loop: Loop,
        host: str,
        port: int,
        on_data: Callable[[bytes, float], None],
        on_close: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.on_data = on_data
        self.on_close = on_close
        self.open = True
        self.sock.setblocking(False)
        loop.selector.register(self.sock, selectors.EVENT_READ, self)

    def send(self, data: bytes) -> None:
        """Write a (small) request at once."""
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    def readable(self) -> None:
        """Read what arrived, timestamped; notice the end of the connection."""
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self.on_data(data, now())
        else:
            self.close()
            self.on_close()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self.open:
            self.open = False
            self.loop.selector.unregister(self.sock)
            self.sock.close()


class Loop:
    """A selector plus timers; :meth:`run` until a condition or a deadline."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at ``when`` (perf_counter seconds)."""
        heapq.heappush(self.timers, (when, next(self._seq), fn))

    def run(self, until: Callable[[], bool], deadline: float) -> bool:
        """Serve sockets and timers until ``until()`` or ``deadline``; True if ``until()``."""
        while not until():
            t = now()
            if t >= deadline:
                return False
            while self.timers and self.timers[0][0] <= t:
                heapq.heappop(self.timers)[2]()
            if until():
                return True
            wait = deadline - t
            if self.timers:
                wait = min(wait, self.timers[0][0] - t)
            for key, _ in self.selector.select(max(0.0, min(wait, 0.05))):
                key.data.readable()
        return True

    def close(self) -> None:
        """Close every registered socket and the selector."""
        for key in list(self.selector.get_map().values()):
            key.data.close()
        self.selector.close()


# -- streams ----------------------------------------------------------------------------------


@attrs.define(eq=False)
class StreamTrace:
    """One SSE stream: when it was sent, its status, when each event arrived."""

    sent: float
    status: int | None = None
    events: list[float] = attrs.Factory(list)
    done: bool = False
    error: str | None = None

    @property
    def first_event_ms(self) -> float | None:
        """Milliseconds from sending the request to the first whole event."""
        return (self.events[0] - self.sent) * 1000.0 if self.events else None

    def gaps_ms(self) -> list[float]:
        """Milliseconds between consecutive events."""
        return [(b - a) * 1000.0 for a, b in itertools.pairwise(self.events)]


class _Stream:
    """Drives one streaming POST on its own connection into a StreamTrace."""

    def __init__(
        self, loop: Loop, host: str, port: int, request: bytes, finished: Callable[[_Stream], None]
    ) -> None:
        self.trace = StreamTrace(sent=0.0)
        self.finished = finished
        self.pending = bytearray()
        self.response = Response(self._body)
        self.conn = Conn(loop, host, port, self._data, self._closed)
        self.trace.sent = now()
        self.conn.send(request)

    def _body(self, data: bytes, t: float) -> None:
        self.pending += data
        while True:
            end = self.pending.find(b"\n\n")
            if end < 0:
                return
            del self.pending[: end + 2]
            self.trace.events.append(t)

    def _data(self, data: bytes, t: float) -> None:
        self.response.feed(data, t)
        if self.trace.status is None and self.response.status is not None:
            self.trace.status = self.response.status
        if self.response.done:
            self._end()

    def _closed(self) -> None:
        self.response.closed()
        if not self.response.done:
            self.trace.error = "connection closed before the end of the stream"
        self._end()

    def _end(self) -> None:
        if not self.trace.done:
            self.trace.done = True
            self.conn.close()
            self.finished(self)


def run_streams(
    host: str,
    port: int,
    body: bytes,
    count: int,
    concurrency: int,
    stagger_s: float,
    deadline_s: float,
) -> list[StreamTrace]:
    """Run ``count`` streams, ``concurrency`` at a time, the first ones ``stagger_s`` apart.

    Staggering spreads the paced events of concurrent streams evenly in time,
    so one stream's events rarely wait behind another's.
    """
    loop = Loop()
    request = post_request(host, port, "/v1/chat/completions", body)
    traces: list[StreamTrace] = []
    started = 0
    active = 0

    def start() -> None:
        nonlocal started, active
        if started >= count:
            return
        started += 1
        active += 1
        traces.append(_Stream(loop, host, port, request, finished).trace)

    def finished(stream: _Stream) -> None:
        nonlocal active
        active -= 1
        start()

    t0 = now()
    for i in range(min(concurrency, count)):
        loop.call_at(t0 + i * stagger_s, start)
    try:
        loop.run(lambda: started >= count and active == 0, t0 + deadline_s)
    finally:
        loop.close()
    return traces


class HeldStreams:
    """Streams opened and kept open; :meth:`pump` keeps reading them, :meth:`close` ends them."""

    def __init__(self) -> None:
        self.loop = Loop()
        self.streams: list[_Stream] = []

    def open(
        self, host: str, port: int, body: bytes, count: int, batch: int, deadline_s: float
    ) -> int:
        """Open ``count`` streams, ``batch`` at a time, each batch waiting for first events.

        Returns how many streams got their first event before the deadline.
        """
        request = post_request(host, port, "/v1/chat/completions", body)
        deadline = now() + deadline_s
        while len(self.streams) < count and now() < deadline:
            new = [
                _Stream(self.loop, host, port, request, lambda s: None)
                for _ in range(min(batch, count - len(self.streams)))
            ]
            self.streams.extend(new)

            def batch_started(new: list[_Stream] = new) -> bool:
                return all(s.trace.events or s.trace.done for s in new)

            self.loop.run(batch_started, deadline)
        return self.live()

    def live(self) -> int:
        """Streams that have started and not ended."""
        return sum(1 for s in self.streams if s.trace.events and not s.trace.done)

    def pump(self, seconds: float) -> None:
        """Keep reading every stream for ``seconds``."""
        self.loop.run(lambda: False, now() + seconds)

    def close(self) -> None:
        """Close every client connection (the gateway must cancel the upstreams)."""
        self.loop.close()


# -- event-loop lag ---------------------------------------------------------------------------


@attrs.define
class LagResult:
    """Latencies of the probe requests, and of the scrapes if any."""

    probe_ms: list[float]
    skipped: int
    scrape_ms: list[float]
    scrape_bytes: int
    errors: int


class _Repeater:
    """Sends one GET on a keep-alive connection every ``interval``; never two at once."""

    def __init__(
        self,
        loop: Loop,
        host: str,
        port: int,
        request: bytes,
        interval: float,
        start: float,
        stop: float,
    ) -> None:
        self.loop = loop
        self.request = request
        self.interval = interval
        self.stop = stop
        self.latencies: list[float] = []
        self.skipped = 0
        self.errors = 0
        self.last_bytes = 0
        self.sent_at: float | None = None
        self.response: Response | None = None
        self.conn = Conn(loop, host, port, self._data, self._closed)
        self.ticks = itertools.count()
        self.start = start
        loop.call_at(start, self._tick)

    def _tick(self) -> None:
        t = now()
        if t >= self.stop or not self.conn.open:
            return
        if self.sent_at is None:
            self.response = Response()
            self.sent_at = now()
            self.conn.send(self.request)
        else:
            self.skipped += 1
        # Fixed schedule: a stall does not shift later ticks.
        k = next(self.ticks) + 1
        self.loop.call_at(self.start + k * self.interval, self._tick)

    def _data(self, data: bytes, t: float) -> None:
        if self.response is None or self.sent_at is None:
            self.errors += 1
            return
        self.response.feed(data, t)
        if self.response.done:
            if self.response.status != 200:
                self.errors += 1
            self.latencies.append((t - self.sent_at) * 1000.0)
            self.last_bytes = self.response.body_bytes
            self.sent_at = None
            self.response = None

    def _closed(self) -> None:
        self.errors += 1
        self.conn.close()


def probe_lag(
    host: str,
    port: int,
    seconds: float,
    probe_interval: float = 0.010,
    scrape_interval: float | None = None,
    scrape_headers: bytes = b"",
) -> LagResult:
    """GET /health every ``probe_interval`` for ``seconds``; optionally scrape /metrics too."""
    loop = Loop()
    t0 = now()
    stop = t0 + seconds
    try:
        probe = _Repeater(
            loop, host, port, get_request(host, port, "/health"), probe_interval, t0, stop
        )
        scrape: Any = None
        if scrape_interval is not None:
            scrape = _Repeater(
                loop,
                host,
                port,
                get_request(host, port, "/metrics", scrape_headers),
                scrape_interval,
                t0 + scrape_interval / 2,
                stop,
            )
        # Let the last requests finish (bounded).
        loop.run(
            lambda: (
                now() >= stop
                and probe.sent_at is None
                and (scrape is None or scrape.sent_at is None)
            ),
            stop + 5.0,
        )
    finally:
        loop.close()
    return LagResult(
        probe_ms=probe.latencies,
        skipped=probe.skipped,
        scrape_ms=scrape.latencies if scrape is not None else [],
        scrape_bytes=scrape.last_bytes if scrape is not None else 0,
        errors=probe.errors + (scrape.errors if scrape is not None else 0),
    )
