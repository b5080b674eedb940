"""Pins every private part of Twisted that ``nexus._twisted`` relies on.

When a Twisted upgrade renames or changes one of them, a test here fails and
names it, instead of the gateway quietly misbehaving.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest_twisted
from twisted.internet import reactor, tcp
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import HTTPChannel

from nexus import _twisted
from nexus._twisted import BadRequestChannel, QuietPool, read_now, send_now
from nexus.upstream import read_body
from tests.support import Cleanup, StreamedBody, deadline, start_mock, wait_for


def test_the_private_names_still_exist() -> None:
    assert callable(HTTPChannel._respondToBadRequestAndDisconnect)
    assert callable(HTTPConnectionPool._putConnection)
    assert HTTPConnectionPool._factory is _HTTP11ClientFactory
    factory = _HTTP11ClientFactory(lambda protocol: None, "key")
    assert callable(factory._quiescentCallback)
    for side in (tcp.Server, tcp.Client):  # send_now
        assert callable(side.writeSomeData)
        for name in ("dataBuffer", "offset", "_writeDisconnected"):  # _tempDataLen: per instance
            assert hasattr(side, name), (side, name)


@pytest_twisted.ensureDeferred
async def test_pool_is_quiet_and_reuses_connections(cleanup: Cleanup) -> None:
    mock = start_mock("quiet")
    cleanup.append(mock)
    pool = QuietPool(reactor, persistent=True)
    agent = Agent(reactor, pool=pool)
    response = await deadline(agent.request(b"GET", (mock.url + "/v1/models").encode()))
    assert await deadline(read_body(response), what="the body")
    [connections] = pool._connections.values()  # _putConnection kept it
    assert len(connections) == 1
    assert issubclass(pool._factory, _HTTP11ClientFactory) and pool._factory.noisy is False
    await pool.closeCachedConnections()


def test_pool_never_keeps_a_connection_that_is_closing() -> None:
    pool = QuietPool(reactor, persistent=True)

    class Closing:
        transport = StringTransport()

    Closing.transport.disconnecting = True
    pool._putConnection(("http", b"h", 1), Closing())
    assert pool._connections == {}


def test_channel_hooks_reach_bad_request() -> None:
    called: list[str] = []

    class Channel(BadRequestChannel):
        def bad_request(self) -> None:
            called.append("bad")
            self.transport.loseConnection()  # type: ignore[union-attr]

    channel = Channel()
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"NONSENSE\r\n\r\n")  # an unparsable request line
    assert called == ["bad"]

    channel = Channel()
    channel.MAX_LENGTH = 100
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET /" + b"a" * 200)  # a line too long
    assert called == ["bad", "bad"]


def test_pending_path_is_known_before_the_body_arrives() -> None:
    channel = BadRequestChannel()
    channel.makeConnection(StringTransport())
    assert channel.pending_path() == b""
    channel.dataReceived(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nab")
    assert channel.pending_path() == b"/v1/chat/completions"



def test_whole_request_leaves_the_channel_as_twisted_s_parser_would() -> None:
    """HTTPChannel's state between requests: the same after one taken whole or read by lines."""
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    class Hold(Resource):
        isLeaf = True

        def render(self, request: object) -> object:
            return NOT_DONE_YET  # the request stays in progress, as an inference request does

    class Channel(BadRequestChannel):
        pass

    data = (
        b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    names = (
        "_HTTPChannel__first_line", "_HTTPChannel__header", "length", "persistent",
        "_transferDecoder", "_handlingRequest", "_savedTimeOut", "line_mode", "_buffer",
        "_busyReceiving", "paused", "_receivedHeaderCount", "_receivedHeaderSize",
    )
    states = []
    for whole in (True, False):
        site = Site(Hold())
        channel = Channel()
        channel.site = site
        channel.requestFactory = site.requestFactory
        channel.timeOut = 60
        channel.callLater = lambda *a, **k: _Timer()  # type: ignore[method-assign]
        channel.makeConnection(StringTransport())
        if whole:
            assert channel.whole_request(data, {b"/p"}, 1000)
        else:
            channel.dataReceived(data)
        [request] = channel.requests
        assert request.content.read() == b"{}" and request.path == b"/p"
        states.append({name: getattr(channel, name) for name in names})
    assert states[0] == states[1]


class _Timer:
    """A stand-in for the channel's idle-timeout DelayedCall."""

    def cancel(self) -> None:
        pass

    def reset(self, seconds: float) -> None:
        pass

    def active(self) -> bool:
        return True


# -- send_now: a TCP transport's write buffer ------------------------------------------------


class _Stop:
    def __init__(self, stop: Any) -> None:
        self.stop = stop


async def _connected_pair(cleanup: Cleanup) -> tuple[Any, StreamedBody]:
    """A real TCP connection on 127.0.0.1: our transport (a tcp.Client) and the peer's protocol."""
    peer = StreamedBody()
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: peer), interface="127.0.0.1")
    cleanup.append(_Stop(port.stopListening))
    ours = await deadline(
        ClientCreator(reactor, Protocol).connectTCP("127.0.0.1", port.getHost().port)
    )
    await wait_for(lambda: peer.transport is not None, what="the peer's side")
    cleanup.append(_Stop(ours.transport.abortConnection))
    return ours.transport, peer


def _queued(transport: Any) -> int:
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest_twisted.ensureDeferred
async def test_send_now_sends_before_returning_on_both_sides(cleanup: Cleanup) -> None:
    client, peer = await _connected_pair(cleanup)
    assert isinstance(client, tcp.Client) and isinstance(peer.transport, tcp.Server)
    send_now(client, b"to the server")
    assert _queued(client) == 0 and client not in reactor.getWriters()  # nothing left to do
    await wait_for(lambda: peer.data == b"to the server", what="the bytes")
    back = StreamedBody()
    client.protocol.dataReceived = back.dataReceived
    send_now(peer.transport, b"to the client")
    assert _queued(peer.transport) == 0
    await wait_for(lambda: back.data == b"to the client", what="the bytes back")


@pytest_twisted.ensureDeferred
async def test_send_now_never_overtakes_queued_bytes(cleanup: Cleanup) -> None:
    client, peer = await _connected_pair(cleanup)
    client.write(b"first ")  # queued until the reactor's next turn
    send_now(client, b"second")
    assert _queued(client) == len(b"first second")
    await wait_for(lambda: peer.data == b"first second", what="both, in order")


@pytest_twisted.ensureDeferred
async def test_send_now_queues_what_the_socket_does_not_take(cleanup: Cleanup) -> None:
    client, peer = await _connected_pair(cleanup)
    data = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than the socket buffers hold
    send_now(client, data)
    assert 0 < _queued(client) < len(data)
    send_now(client, b"end")  # behind the queued rest
    await wait_for(lambda: len(peer.data) == len(data) + 3, what="all of it", timeout=20)
    assert peer.data == data + b"end"


@pytest_twisted.ensureDeferred
async def test_send_now_leaves_a_closing_connection_to_write(cleanup: Cleanup) -> None:
    client, peer = await _connected_pair(cleanup)
    client.loseConnection()
    send_now(client, b"last words")  # what Twisted's write does: sent, then closed
    assert _queued(client) == len(b"last words")
    await deadline(peer.ended, what="the close")
    assert peer.data == b"last words"


def test_send_now_writes_to_other_transports() -> None:
    transport = StringTransport()
    send_now(transport, b"queued as always")
    assert transport.value() == b"queued as always"


# -- read_now: a new connection read as it is made ------------------------------------------------


class _ReadsAtOnce(StreamedBody):
    """A server side that reads its connection as soon as it is made (NexusChannel does)."""

    def __init__(self) -> None:
        super().__init__()
        self.at_made: bytes | None = None
        self.reason: Any = None

    def connectionMade(self) -> None:
        read_now(self.transport)
        self.at_made = self.data

    def connectionLost(self, reason: Any) -> None:
        self.reason = reason
        super().connectionLost(reason)


async def _accepted(cleanup: Cleanup, send: Any) -> _ReadsAtOnce:
    """A blocking client connects and ``send(sock)`` acts before the reactor accepts."""
    server = _ReadsAtOnce()
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface="127.0.0.1")
    cleanup.append(_Stop(port.stopListening))
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    cleanup.append(_Stop(client.close))
    send(client)  # the kernel completed the handshake: the reactor has not run yet
    await wait_for(lambda: server.at_made is not None, what="the accept")
    return server


@pytest_twisted.ensureDeferred
async def test_read_now_reads_a_request_that_came_with_the_connection(cleanup: Cleanup) -> None:
    server = await _accepted(cleanup, lambda client: client.sendall(b"POST / HTTP/1.1\r\n"))
    assert server.at_made == b"POST / HTTP/1.1\r\n"  # read in the turn that accepted it


@pytest_twisted.ensureDeferred
async def test_read_now_leaves_a_quiet_connection_to_the_reactor(cleanup: Cleanup) -> None:
    sent: list[Any] = []
    server = await _accepted(cleanup, sent.append)
    assert server.at_made == b"" and server.reason is None
    sent[0].sendall(b"later")
    await wait_for(lambda: server.data == b"later", what="the later bytes")


@pytest_twisted.ensureDeferred
async def test_read_now_leaves_the_end_of_a_connection_to_the_reactor(cleanup: Cleanup) -> None:
    def send_and_close(client: socket.socket) -> None:
        client.sendall(b"all")
        client.shutdown(socket.SHUT_WR)

    server = await _accepted(cleanup, send_and_close)
    assert server.at_made == b"all"
    await deadline(server.ended, what="the end")  # found by the reactor's own read

    def reset(client: socket.socket) -> None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset

    server = await _accepted(cleanup, reset)
    await deadline(server.ended, what="the end after a reset")
    assert server.data == b""


@pytest_twisted.ensureDeferred
async def test_read_now_cuts_a_connection_whose_protocol_fails(
    cleanup: Cleanup, monkeypatch: Any
) -> None:
    # What the reactor does with a protocol that raises: log it, end the connection.
    class Broken(_ReadsAtOnce):
        def dataReceived(self, data: bytes) -> None:
            raise RuntimeError("a bug")

    events: list[dict[str, Any]] = []
    monkeypatch.setattr(_twisted, "_log", Logger(observer=events.append))
    server = Broken()
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface="127.0.0.1")
    cleanup.append(_Stop(port.stopListening))
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    cleanup.append(_Stop(client.close))
    client.sendall(b"anything")
    await deadline(server.ended, what="the connection cut")
    [event] = events
    assert event["log_failure"].check(RuntimeError)
