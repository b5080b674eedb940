"""Client-side faults: a client that never reads, and hundreds of clients leaving mid-stream."""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from nexus.testing import MockBackend
from tests.faults.harness import (
    Backend,
    GatewayProcess,
    Seen,
    Tally,
    assert_metrics_match,
    chat,
    chat_body,
    gateway_config,
)
from tests.support import CLIENT_DEADLINE, deadline, start_mock, wait_for

#: Clients that leave mid-stream at the same moment (NEXUS_TEST_LEAVING_CLIENTS=2000 for more).
LEAVING_CLIENTS = int(os.environ.get("NEXUS_TEST_LEAVING_CLIENTS", "500"))

#: How much the gateway's RSS may grow while a client does not read a fast stream.
RSS_GROWTH_LIMIT_KB = 50 * 1024

#: One write of the firehose: 64 KiB of SSE events.
_EVENT = b'data: {"choices": [{"index": 0, "delta": {"content": "' + b"x" * 200 + b'"}}]}\n\n'
_CHUNK = _EVENT * (65536 // len(_EVENT))


class _Hose:
    """Pushes SSE events into one response as fast as the connection takes them.

    A push producer: it writes until its consumer pauses it, and it records when that happened,
    so a test can see that the gateway stopped reading from it.
    """

    def __init__(self, request: server.Request) -> None:
        self.request = request
        self.written = 0
        self.paused_at: float | None = None
        self.ended = False
        self._call: Any = None

    def start(self) -> None:
        self.request.setHeader(b"content-type", b"text/event-stream")
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addBoth(self._end)
        self._pump()

    def _pump(self) -> None:
        self._call = None
        # At most 1 MiB per reactor turn, so a consumer that never pauses cannot wedge us.
        for _ in range(16):
            if self.paused_at is not None or self.ended:
                return
            self.request.write(_CHUNK)
            self.written += len(_CHUNK)
        self._call = reactor.callLater(0, self._pump)

    def held_back_for(self) -> float:
        """Seconds since the consumer paused this producer (0 while it flows)."""
        return 0.0 if self.paused_at is None else time.monotonic() - self.paused_at

    def pauseProducing(self) -> None:
        if self.paused_at is None:
            self.paused_at = time.monotonic()

    def resumeProducing(self) -> None:
        self.paused_at = None
        if self._call is None and not self.ended:
            self._call = reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self._end(None)

    def _end(self, _: object) -> None:
        self.ended = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class Firehose(Resource):
    """An OpenAI-compatible backend whose streams never end and go as fast as TCP allows."""

    isLeaf = True

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model
        self.hoses: list[_Hose] = []

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        data = [{"id": self.model, "object": "model", "created": 0, "owned_by": "firehose"}]
        return json.dumps({"object": "list", "data": data}).encode()

    def render_POST(self, request: server.Request) -> Any:
        hose = _Hose(request)
        self.hoses.append(hose)
        reactor.callLater(0, hose.start)
        return server.NOT_DONE_YET


@attrs.define
class Fleet:
    gateway: GatewayProcess
    good: MockBackend
    streamer: MockBackend
    firehose: Firehose


@pytest_twisted.async_yield_fixture(scope="module")
async def fleet(tmp_path_factory: Any) -> AsyncIterator[Fleet]:
    # Hundreds of streams hold two sockets each in this process and two in the gateway.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * LEAVING_CLIENTS + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    good = start_mock("good", ["good"])
    # An endless stream, one event every 250 ms, until the client leaves.
    streamer = start_mock("b_stream", ["m_stream"], fail="endless", stream_delay_ms=250)
    firehose = Firehose("m_firehose")
    site = server.Site(firehose)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    gateway: GatewayProcess | None = None
    try:
        backends = [
            Backend.of(good),
            Backend.of(streamer),
            Backend("b_firehose", f"http://127.0.0.1:{port.getHost().port}", ("m_firehose",)),
        ]
        gateway = await GatewayProcess.start(
            tmp_path_factory.mktemp("clients"),
            gateway_config(backends, request_timeout=2.0),
            healthy=3,
        )
        yield Fleet(gateway, good, streamer, firehose)
        await gateway.stop(whole_log=False)
    finally:
        if gateway is not None:
            gateway.kill()
        await good.stop()
        await streamer.stop()
        await port.stopListening()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def good_request(gateway: GatewayProcess, tally: Tally, stream: bool = False) -> Seen:
    seen = await chat(gateway, "good", stream=stream)
    assert seen.status == 200 and seen.backend == "good", seen
    assert b"Hello from good" in seen.body or b'"content": " good"' in seen.body, seen.body
    tally.add("good", seen)
    return seen


def _recv_some(sock: socket.socket, limit: int) -> bytes:
    """Whatever the socket has ready, up to ``limit`` bytes, without blocking."""
    chunks = []
    got = 0
    while got < limit and select.select([sock], [], [], 0)[0]:
        data = sock.recv(min(65536, limit - got))
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_client_that_never_reads_does_not_grow_the_gateway(fleet: Fleet) -> None:
    """Backpressure: a stalled reader pauses the backend instead of filling the gateway's memory.

    The firehose backend writes as fast as TCP lets it (hundreds of MB/s on loopback). If the
    gateway kept reading from it while its client does not read, the gateway would buffer all
    of it; instead the backend must be held back, and the gateway's RSS must stay flat.
    """
    gateway, firehose = fleet.gateway, fleet.firehose
    log_mark = gateway.log_size()
    tally = Tally()
    for _ in range(20):  # warm up allocator and pools before the baseline
        await good_request(gateway, tally)
        await good_request(gateway, tally, stream=True)
    before = await gateway.metrics()
    tally = Tally()
    rss_before = gateway.rss_kb()

    body = chat_body("m_firehose", stream=True)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(CLIENT_DEADLINE)  # connect and send: a blocking call must not hang
    sock.connect(("127.0.0.1", gateway.port))
    try:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: nexus\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await wait_for(lambda: len(firehose.hoses) == 1, what="the stream reached the backend")
        hose = firehose.hoses[0]
        # The client reads nothing: the gateway must stop reading from the backend, which
        # the backend notices as its connection pausing it for good.
        await wait_for(
            lambda: hose.held_back_for() > 0.5, timeout=20, what="the backend held back"
        )
        rss_held = gateway.rss_kb()
        written_held = hose.written
        print(
            f"\nbackpressure: backend wrote {written_held / 2**20:.1f} MiB before it was held "
            f"back; gateway RSS {rss_before} kB -> {rss_held} kB"
        )
        assert rss_held - rss_before < RSS_GROWTH_LIMIT_KB, (rss_before, rss_held)
        # Meanwhile the gateway serves others as usual.
        await good_request(gateway, tally)
        await good_request(gateway, tally, stream=True)
        # The client reads again: the stream flows again, from where it was.
        received = b""

        def flowing() -> bool:
            nonlocal received
            received += _recv_some(sock, 1 << 20)
            return hose.written > written_held and len(received) > 1 << 20

        await wait_for(flowing, timeout=20, what="the stream flowing again")
        head, _, rest = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"x-nexus-backend: b_firehose" in head.lower(), head
        assert rest.count(b'data: {"choices"') > 100
    finally:
        sock.close()  # the client leaves
    seen = Seen(200, _headers({"x-nexus-backend": "b_firehose"}), b"", left=True)
    tally.add("m_firehose", seen)
    await wait_for(lambda: hose.ended, what="the gateway closed the backend stream")
    await gateway.assert_no_pending()
    await assert_metrics_match(gateway, before, tally)
    assert gateway.rss_kb() - rss_before < RSS_GROWTH_LIMIT_KB
    gateway.assert_alive()
    gateway.assert_log_clean(since=log_mark)


def _headers(values: dict[str, str]) -> Any:
    from twisted.web.http_headers import Headers

    return Headers({k.encode(): [v.encode()] for k, v in values.items()})


class _LeavingClient(Protocol):
    """A raw HTTP client: sends a streaming request, waits for the first event, then leaves."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.first_event: Deferred[bytes] = Deferred()
        self.gone: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.first_event.called:
            return
        head, sep, body = self.received.partition(b"\r\n\r\n")
        if sep and b"data: {" in body and b"\n\n" in body[body.index(b"data: {"):]:
            self.first_event.callback(head)

    def connectionLost(self, reason: Failure) -> None:
        if not self.first_event.called:
            self.first_event.errback(reason)
        self.gone.callback(None)


@pytest_twisted.ensureDeferred
async def test_hundreds_of_clients_leave_mid_stream(fleet: Fleet) -> None:
    """Hundreds of streams open at once; every client leaves after the first event, all at once."""
    gateway, streamer = fleet.gateway, fleet.streamer
    log_mark = gateway.log_size()
    before = await gateway.metrics()
    disconnects_before = streamer.stats()["disconnects"]
    tally = Tally()
    body = chat_body("m_stream", stream=True)
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: nexus\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.port)
    # Open the streams 50 at a time (listen backlogs are 50); each keeps its slot until its
    # first event arrived, and then stays open until all of them are there.
    opening = DeferredSemaphore(50)
    clients: list[_LeavingClient] = []

    async def open_one() -> None:
        client = _LeavingClient(request)
        clients.append(client)
        await deadline(connectProtocol(endpoint, client), what="connecting")
        head = await deadline(client.first_event, what="the first event")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"x-nexus-backend: b_stream" in head.lower(), head

    await gatherResults(
        [opening.run(lambda: ensureDeferred(open_one())) for _ in range(LEAVING_CLIENTS)],
        consumeErrors=True,
    )
    assert streamer.stats()["in_flight"] == LEAVING_CLIENTS
    pending = (await gateway.metrics()).pending()
    assert pending["b_stream"] == LEAVING_CLIENTS, pending
    # While all of them are open, the gateway serves others as usual.
    await good_request(gateway, tally)
    await good_request(gateway, tally, stream=True)
    # Everyone leaves at once: half with a reset, half with a FIN.
    for i, client in enumerate(clients):
        assert client.transport is not None
        if i % 2:
            client.transport.abortConnection()  # type: ignore[attr-defined]
        else:
            client.transport.loseConnection()
    await deadline(gatherResults([c.gone for c in clients]), what="every client's close")
    left = Seen(200, _headers({"x-nexus-backend": "b_stream"}), b"", left=True)
    for _ in clients:
        tally.add("m_stream", left)
    # Every upstream request was cancelled, none is left open.
    await wait_for(
        lambda: streamer.stats()["disconnects"] - disconnects_before == LEAVING_CLIENTS
        and streamer.stats()["in_flight"] == 0,
        timeout=20,
        what="every upstream stream cancelled",
    )
    await gateway.assert_no_pending()
    await good_request(gateway, tally)
    await assert_metrics_match(gateway, before, tally)
    gateway.assert_alive()
    gateway.assert_log_clean(since=log_mark)
