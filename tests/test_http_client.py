"""The hot path's HTTP/1.1 client (nexus.http_client), mostly in memory.

A ``BackendConnection`` on a ``StringTransport`` in a ``BackendConnections(Clock())`` pool:
the bytes a request writes, the answers it parses (fed whole and byte by byte, since TCP
may split them anywhere), what it refuses, when a connection goes back to the pool and when
it never does. A few tests talk to a real mock backend on 127.0.0.1 through ``UpstreamClient``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from nexus.http_client import (
    IDLE_SECONDS,
    MAX_CHUNK_LINE,
    MAX_HEAD_BYTES,
    MAX_IDLE_PER_ORIGIN,
    BackendConnection,
    BackendConnections,
    MalformedResponse,
    Origin,
    RequestHead,
    Response,
)
from nexus.upstream import BodyTooLarge, UpstreamClient, read_body
from tests.support import Cleanup, deadline, start_mock, wait_for

#: What a test sends: the client never looks at it again, any bytes do.
REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: backend\r\nContent-Length: 0\r\n\r\n"

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# -- answers ------------------------------------------------------------------------------------


def answer(
    status: bytes, *headers: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1"
) -> bytes:
    """A raw answer: status line, header lines, the blank line, then ``body`` as given."""
    lines = [b"%s %s" % (version, status), *headers]
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


def sized(body: bytes, *headers: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    """A 200 whose body is framed by its Content-Length."""
    return answer(
        b"200 OK", b"Content-Length: %d" % len(body), *headers, body=body, version=version
    )


def chunked(body: bytes, *headers: bytes) -> bytes:
    """A 200 with a chunked ``body`` (already framed)."""
    return answer(b"200 OK", b"Transfer-Encoding: chunked", *headers, body=body)


# -- feeding --------------------------------------------------------------------------------------

Feed = Callable[[BackendConnection, bytes], None]


def whole(connection: BackendConnection, data: bytes) -> None:
    connection.dataReceived(data)


def byte_by_byte(connection: BackendConnection, data: bytes) -> None:
    for i in range(len(data)):
        connection.dataReceived(data[i : i + 1])


def in_pieces(size: int) -> Feed:
    def feed(connection: BackendConnection, data: bytes) -> None:
        for i in range(0, len(data), size):
            connection.dataReceived(data[i : i + size])

    return feed


#: Every answer parsed both ways: the backend's TCP segments may split it anywhere.
FEEDS = pytest.mark.parametrize("feed", [whole, byte_by_byte], ids=["whole", "byte-by-byte"])


# -- connections ----------------------------------------------------------------------------------


class Body(Protocol):
    """Keeps what a response body delivers, and how it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        self.reason = reason

    @property
    def producer(self) -> Any:
        """The transport the body got: it pauses, resumes and stops the backend connection."""
        return self.transport

    @property
    def ended(self) -> type[Exception] | None:
        """The exception type the body ended with (None: not ended)."""
        return None if self.reason is None else self.reason.type  # type: ignore[return-value]


def origin_of(pool: BackendConnections, endpoint: Any = None) -> Origin:
    return pool.origin("backend", "backend", b"backend:8000", endpoint)


def connected(pool: BackendConnections | None = None) -> tuple[BackendConnection, StringTransport]:
    """A connection of ``pool`` (a fresh one on a Clock) on a StringTransport."""
    pool = pool if pool is not None else BackendConnections(Clock())
    connection = BackendConnection(pool, origin_of(pool))
    transport = StringTransport()
    connection.makeConnection(transport)
    return connection, transport


def outcome(d: Deferred[Any]) -> Any:
    """What ``d`` fired with (a Failure when it failed); the test fails if it has not fired."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not fired"
    return results[0]


def failure_of(d: Deferred[Any]) -> Failure:
    result = outcome(d)
    assert isinstance(result, Failure), result
    return result


class Exchange:
    """One request on a connection; its body goes to ``body`` as soon as the head is in."""

    def __init__(
        self, pool: BackendConnections | None = None, body: Body | None = None, deliver: bool = True
    ) -> None:
        self.connection, self.transport = connected(pool)
        self.pool = self.connection.pool
        self.body = body if body is not None else Body()
        self.outcomes: list[Any] = []
        self.result: Deferred[Response] = self.connection.request(REQUEST)
        if deliver:
            self.result.addCallback(self._deliver)
        self.result.addBoth(self.outcomes.append)

    def _deliver(self, response: Response) -> Response:
        response.deliverBody(self.body)
        return response

    @property
    def outcome(self) -> Response | Failure:
        assert self.outcomes, "no answer yet"
        result: Response | Failure = self.outcomes[0]
        return result

    @property
    def response(self) -> Response:
        result = self.outcome
        assert isinstance(result, Response), result
        return result

    @property
    def failure(self) -> Failure:
        result = self.outcome
        assert isinstance(result, Failure), result
        return result

    @property
    def pooled(self) -> bool:
        return self.connection in self.connection.origin.idle

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)  # abortConnection; loseConnection leaves it


def exchange(
    data: bytes,
    feed: Feed = whole,
    pool: BackendConnections | None = None,
    body: Body | None = None,
    deliver: bool = True,
) -> Exchange:
    """A request answered with ``data`` (its body delivered to ``body``, unless not ``deliver``)."""
    ex = Exchange(pool, body, deliver)
    feed(ex.connection, data)
    return ex


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects at once, each new connection on its own StringTransport."""

    def __init__(self) -> None:
        self.connections: list[BackendConnection] = []
        self.transports: list[StringTransport] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8000))
        assert isinstance(protocol, BackendConnection)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append(protocol)
        self.transports.append(transport)
        return succeed(protocol)


class OneWriteTransport(StringTransport):
    """Counts writes: a request must be exactly one."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


# -- the request ----------------------------------------------------------------------------------


def test_a_request_is_one_write_with_the_backends_own_key() -> None:
    pool = BackendConnections(Clock())
    head = RequestHead(
        origin_of(pool),
        b"/v1/chat/completions",
        [(b"Content-Type", b"application/json"), (b"Authorization", b"Bearer sk-backend")],
    )
    connection = BackendConnection(pool, head.origin)
    transport = OneWriteTransport()
    connection.makeConnection(transport)
    connection.request(head.build(b'{"a": 1}', b"req-1", [b"Bearer sk-client"]))
    assert transport.writes == [
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"Host: backend:8000\r\n"
        b"Content-Type: application/json\r\n"
        b"Authorization: Bearer sk-backend\r\n"  # the client's key never reaches this backend
        b"X-Request-Id: req-1\r\n"
        b"Content-Length: 8\r\n"
        b"\r\n"
        b'{"a": 1}'
    ]


def test_the_clients_key_goes_to_a_backend_without_one() -> None:
    head = RequestHead(origin_of(BackendConnections(Clock())), b"/v1/embeddings", [])
    assert head.build(b"", b"req-2", [b"Bearer sk-client"]) == (
        b"POST /v1/embeddings HTTP/1.1\r\n"
        b"Host: backend:8000\r\n"
        b"X-Request-Id: req-2\r\n"
        b"Authorization: Bearer sk-client\r\n"
        b"Content-Length: 0\r\n"
        b"\r\n"
    )
    assert b"Authorization" not in head.build(b"", b"req-3", None)


def test_cr_and_lf_in_values_cannot_inject_headers() -> None:
    head = RequestHead(
        origin_of(BackendConnections(Clock())),
        b"/v1/chat/completions",
        [(b"Authorization", b"Bearer k\r\nX-Injected: 1")],
    )
    data = head.build(b"{}", b"id\r\nX-Injected: 2\n", None)
    lines = data.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert not any(line.startswith(b"X-Injected") for line in lines)
    assert b"Authorization: Bearer k  X-Injected: 1" in lines
    assert b"X-Request-Id: id  X-Injected: 2 " in lines
    no_key = RequestHead(origin_of(BackendConnections(Clock())), b"/v1/chat/completions", [])
    lines = no_key.build(b"{}", b"id", [b"Bearer c\rX-Injected: 3"]).split(b"\r\n")
    assert b"Authorization: Bearer c X-Injected: 3" in lines


# -- answers and their bodies ---------------------------------------------------------------------


@FEEDS
def test_a_content_length_body(feed: Feed) -> None:
    ex = exchange(sized(b"hello", b"Content-Type: application/json"), feed)
    response = ex.response
    assert (response.code, response.phrase, response.length) == (200, b"OK", 5)
    assert response.header(b"content-type") == b"application/json"
    assert (ex.body.data, ex.body.ended) == (b"hello", ResponseDone)
    assert ex.pooled


@FEEDS
def test_a_chunked_body_with_extensions_trailers_and_uppercase_hex(feed: Feed) -> None:
    body = (
        b"5;name=value\r\nhello\r\n"
        b"A\r\n, world! 1\r\n"  # uppercase hex: 10 bytes
        b"1 ; ext\r\n!\r\n"
        b"0\r\n"
        b"X-Trailer: dropped\r\n"
        b"\r\n"
    )
    ex = exchange(chunked(body), feed)
    assert ex.response.length is UNKNOWN_LENGTH
    assert (ex.body.data, ex.body.ended) == (b"hello, world! 1!", ResponseDone)
    assert b"transfer-encoding" in ex.response.headers
    assert ex.pooled


@FEEDS
def test_a_close_delimited_body_ends_with_potential_data_loss(feed: Feed) -> None:
    ex = exchange(answer(b"200 OK", b"Content-Type: text/event-stream", body=b"data: 1\n\n"), feed)
    assert ex.response.length is UNKNOWN_LENGTH
    assert ex.body.ended is None  # only the close ends it
    ex.connection.connectionLost(Failure(ConnectionDone()))
    assert (ex.body.data, ex.body.ended) == (b"data: 1\n\n", PotentialDataLoss)
    assert not ex.pooled


@FEEDS
@pytest.mark.parametrize(
    "data",
    [
        answer(b"204 No Content"),
        answer(b"304 Not Modified", b"ETag: x"),
        answer(b"200 OK", b"Content-Length: 0"),
    ],
    ids=["204", "304", "length-0"],
)
def test_answers_without_a_body(data: bytes, feed: Feed) -> None:
    ex = exchange(data, feed)
    assert ex.response.length == 0
    assert (ex.body.data, ex.body.ended) == (b"", ResponseDone)
    assert ex.pooled


@FEEDS
def test_interim_answers_are_skipped(feed: Feed) -> None:
    data = (
        answer(b"100 Continue")
        + answer(b"103 Early Hints", b"Link: </style.css>; rel=preload")
        + sized(b"ok")
    )
    ex = exchange(data, feed)
    assert ex.response.code == 200
    assert b"link" not in ex.response.headers
    assert (ex.body.data, ex.body.ended) == (b"ok", ResponseDone)
    assert ex.pooled


@FEEDS
@pytest.mark.parametrize(
    "data",
    [sized(b"bye", b"Connection: close"), sized(b"old", version=b"HTTP/1.0")],
    ids=["connection-close", "http-1.0"],
)
def test_answers_that_close_are_not_reused(data: bytes, feed: Feed) -> None:
    ex = exchange(data, feed)
    assert ex.body.ended is ResponseDone
    assert not ex.pooled
    assert ex.transport.disconnecting and not ex.aborted  # closed cleanly, the body was whole


def test_keep_alive_connections_are_reused_most_recent_first() -> None:
    endpoint = MemoryEndpoint()
    pool = BackendConnections(Clock())
    origin = origin_of(pool, endpoint)
    first, second = pool.request(origin, REQUEST), pool.request(origin, REQUEST)
    one, two = endpoint.connections
    to_one, to_two = endpoint.transports
    one.dataReceived(sized(b"1"))
    two.dataReceived(sized(b"2"))
    assert outcome(first).code == outcome(second).code == 200
    assert pool.idle_count() == 2
    pool.request(origin, REQUEST)  # not answered: what matters is where it went
    assert len(endpoint.connections) == 2  # no new connection
    assert to_two.value() == REQUEST * 2
    assert to_one.value() == REQUEST
    assert origin.idle == [one]


def test_a_request_sent_as_the_body_ends_reuses_the_connection() -> None:
    # The natural client code, ``body = await read_body(r); await pool.request(...)``, runs
    # its next request inside the body's end: the connection must be back in the pool by then.
    endpoint = MemoryEndpoint()
    pool = BackendConnections(Clock())
    origin = origin_of(pool, endpoint)
    follow_up: list[Deferred[Response]] = []

    class SendNext(Body):
        def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
            follow_up.append(pool.request(origin, REQUEST))

    first = pool.request(origin, REQUEST)
    first.addCallback(lambda response: response.deliverBody(SendNext()))
    endpoint.connections[0].dataReceived(sized(b"1"))
    assert len(follow_up) == 1
    assert len(endpoint.connections) == 1, "the next request opened a second connection"


@FEEDS
@pytest.mark.parametrize(
    "data",
    [sized(b"one") + b"HTTP/1.1 200 OK\r\n", chunked(b"3\r\none\r\n0\r\n\r\nXX")],
    ids=["length", "chunked"],
)
def test_bytes_after_the_body_mean_the_connection_is_not_reused(data: bytes, feed: Feed) -> None:
    ex = exchange(data, feed)
    assert (ex.body.data, ex.body.ended) == (b"one", ResponseDone)
    assert not ex.pooled
    assert ex.transport.disconnecting


def test_connection_header_names_are_listed_not_kept_as_headers() -> None:
    ex = exchange(sized(b"x", b"Connection: keep-alive, X-Trace", b"X-Trace: 7"))
    assert ex.response.connection_names == frozenset({b"x-trace"})
    assert b"connection" not in ex.response.headers
    assert ex.response.header(b"x-trace") == b"7"  # removing it is the proxy's job


def test_a_lone_cr_in_a_value_becomes_a_space() -> None:
    # Relayed as it came, "one\rInjected: yes" could end the header line early downstream.
    ex = exchange(answer(b"200 OK", b"X-A: one\rInjected: yes", b"Content-Length: 0"))
    assert ex.response.headers[b"x-a"] == [b"one Injected: yes"]
    assert b"injected" not in ex.response.headers


def test_repeated_headers_keep_every_value_in_order() -> None:
    ex = exchange(sized(b"x", b"Set-Cookie: a=1", b"X-Other: z", b"set-cookie: b=2"))
    assert ex.response.headers[b"set-cookie"] == [b"a=1", b"b=2"]
    assert ex.response.header(b"set-cookie") == b"a=1"


# -- what the client refuses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        answer(b"200 OK", version=b"HTTP/2"),
        answer(b"20 OK"),
        answer(b"abc OK"),
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",  # not an HTTP server at all
        answer(b"101 Switching Protocols", b"Upgrade: websocket"),
        answer(b"200 OK", b"X-A: one", b" folded", b"Content-Length: 0"),  # obs-fold
        answer(b"200 OK", b"X-A one", b"Content-Length: 0"),
        answer(b"200 OK", b"X-A : one", b"Content-Length: 0"),
        answer(b"200 OK", b"X-A\rInjected: one", b"Content-Length: 0"),  # a lone CR in a name
        answer(b"200 OK", b"X(A): one", b"Content-Length: 0"),
        answer(b"200 OK", b"Content-Length: 5", b"Content-Length: 6", body=b"hello!"),
        answer(b"200 OK", b"Content-Length: 5, 6", body=b"hello!"),
        answer(b"200 OK", b"Content-Length: five"),
        answer(b"200 OK", b"Content-Length: -1"),
        answer(b"200 OK", b"Content-Length: +5", body=b"hello"),
        answer(b"200 OK", b"Content-Length: " + b"9" * 5000),  # past int()'s 4300 digits
        answer(b"200 OK", b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
    ],
    ids=[
        "http-2",
        "short-code",
        "letters-code",
        "not-http",
        "protocol-switch",
        "obs-fold",
        "no-colon",
        "space-before-colon",
        "cr-in-name",
        "not-a-token",
        "two-lengths",
        "listed-lengths",
        "length-word",
        "length-negative",
        "length-plus",
        "length-5000-digits",
        "gzip-coding",
    ],
)
def test_a_malformed_head_fails_the_request_and_aborts_the_connection(data: bytes) -> None:
    ex = exchange(data)
    assert ex.failure.check(MalformedResponse)
    assert ex.aborted and not ex.pooled


@pytest.mark.parametrize(
    "data",
    [
        answer(b"200 OK", b"X-Big: " + b"a" * MAX_HEAD_BYTES, b"Content-Length: 0"),
        b"HTTP/1.1 200 OK\r\nX-Endless: " + b"a" * MAX_HEAD_BYTES,  # a head that never ends
    ],
    ids=["complete", "endless"],
)
def test_a_head_over_the_limit_fails_the_request(data: bytes) -> None:
    ex = exchange(data, in_pieces(1024))
    assert ex.failure.check(MalformedResponse)
    assert ex.aborted


def test_a_head_at_the_limit_passes_however_it_is_split() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Big: "
    head += b"a" * (MAX_HEAD_BYTES - len(head))  # exactly MAX_HEAD_BYTES before the blank line
    data = head + b"\r\n\r\n"
    assert isinstance(exchange(data).outcome, Response)  # in one read it passes
    ex = exchange(data[:-1])  # the same bytes, the final LF in a segment of its own
    ex.connection.dataReceived(data[-1:])
    assert isinstance(ex.outcome, Response)


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",  # a hex prefix is not HEXDIG (RFC 9112 section 7.1)
        b"5\r\nhelloX\r\n0\r\n\r\n",  # data longer than its size
        b"1" * (MAX_CHUNK_LINE + 1),
    ],
    ids=["letters", "negative", "empty", "0x-prefix", "overlong-data", "endless-size-line"],
)
def test_a_bad_chunk_fails_the_body_and_aborts_the_connection(body: bytes) -> None:
    ex = exchange(chunked(body))
    assert ex.body.ended is ResponseFailed
    assert ex.aborted and not ex.pooled


@pytest.mark.parametrize(
    "received", [b"", b"HTTP/1.1 200 OK\r\nContent-Le"], ids=["nothing", "half-a-head"]
)
def test_a_connection_lost_before_the_answer_fails_the_request(received: bytes) -> None:
    ex = exchange(received)
    ex.connection.connectionLost(Failure(ConnectionDone()))
    assert ex.failure.check(ResponseNeverReceived)


@pytest.mark.parametrize(
    "data",
    [
        sized(b"hello, world")[:-3],
        chunked(b"5\r\nhello\r\n7\r\n, wo"),
        chunked(b"5\r\nhello\r\n"),  # between chunks: still not the end
    ],
    ids=["length", "inside-chunk", "between-chunks"],
)
def test_a_body_cut_by_the_backend_fails(data: bytes) -> None:
    ex = exchange(data)
    ex.connection.connectionLost(Failure(ConnectionDone()))  # even a clean close is a cut here
    assert ex.body.ended is ResponseFailed
    assert not ex.pooled


def test_a_close_delimited_body_cut_by_a_reset_fails() -> None:
    ex = exchange(answer(b"200 OK", body=b"data: 1\n\n"))
    ex.connection.connectionLost(Failure(ConnectionLost()))
    assert ex.body.ended is ResponseFailed


def test_cancelling_the_request_aborts_the_connection() -> None:
    ex = exchange(b"HTTP/1.1 200 OK\r\n")
    ex.result.cancel()
    assert ex.failure.check(CancelledError)
    assert ex.aborted
    ex.connection.dataReceived(b"Content-Length: 0\r\n\r\n")  # the late rest changes nothing
    assert not ex.pooled


# -- flow control from the body protocol ----------------------------------------------------------


class StopAtFirstData(Body):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.producer.stopProducing()


@pytest.mark.parametrize(
    ("data", "rest"),
    [
        (sized(b"helloworld")[:-5], b"world"),
        (chunked(b"5\r\nhello\r\n")[:-2], b"\r\n0\r\n\r\n"),
    ],
    ids=["length-mid-body", "chunked-mid-body"],
)
def test_stop_producing_aborts_and_the_connection_is_never_pooled(data: bytes, rest: bytes) -> None:
    ex = exchange(data, body=StopAtFirstData())
    ex.connection.dataReceived(rest)
    assert ex.aborted
    assert not ex.pooled and ex.pool.idle_count() == 0


@pytest.mark.parametrize(
    "data", [sized(b"helloworld"), chunked(b"5\r\nhello\r\n0\r\n\r\n")], ids=["length", "chunked"]
)
def test_stopping_a_body_that_came_whole_with_its_head_changes_nothing(data: bytes) -> None:
    # The whole answer was read before anyone saw it: the connection is already back in the
    # pool, and a stop from the body protocol comes after the end (Twisted ignores it too).
    ex = exchange(data, body=StopAtFirstData())
    assert ex.body.data and ex.body.reason is not None and ex.body.reason.check(ResponseDone)
    assert not ex.aborted and ex.pooled


def test_a_whole_answer_is_taken_without_a_body_protocol() -> None:
    ex = exchange(sized(b"hello"), deliver=False)
    response = ex.response
    assert response.complete_body() == b"hello"
    assert ex.pooled
    assert response.complete_body() is None  # taken once


def test_a_body_still_coming_is_not_complete() -> None:
    ex = exchange(sized(b"helloworld")[:-5], deliver=False)
    assert ex.response.complete_body() is None


class PauseAtFirstData(Body):
    def dataReceived(self, data: bytes) -> None:
        if not self.data:
            self.producer.pauseProducing()
        super().dataReceived(data)


def test_pause_and_resume_reach_the_backend_connection() -> None:
    ex = exchange(sized(b"hello, world")[:-5])
    ex.body.producer.pauseProducing()
    assert ex.transport.producerState == "paused"
    ex.body.producer.resumeProducing()
    assert ex.transport.producerState == "producing"


@FEEDS
def test_a_paused_connection_is_resumed_before_it_is_reused(feed: Feed) -> None:
    ex = exchange(sized(b"hello"), feed, body=PauseAtFirstData())
    assert ex.body.ended is ResponseDone and ex.pooled
    assert ex.transport.producerState == "producing"


# -- the pool -------------------------------------------------------------------------------------


def test_idle_connections_are_closed_after_the_idle_time() -> None:
    clock = Clock()
    pool = BackendConnections(clock)
    early = exchange(sized(b"1"), pool=pool)
    clock.advance(IDLE_SECONDS / 2)
    late = exchange(sized(b"2"), pool=pool)
    clock.advance(IDLE_SECONDS / 2 - 1)
    assert pool.idle_count() == 2
    clock.advance(1)
    assert early.aborted and not early.pooled
    assert late.pooled and not late.aborted
    clock.advance(IDLE_SECONDS / 2)
    assert late.aborted and pool.idle_count() == 0
    assert clock.getDelayedCalls() == []  # nothing idle, no timer


def test_at_most_max_idle_per_origin_are_kept() -> None:
    pool = BackendConnections(Clock())
    kept = [exchange(sized(b"x"), pool=pool) for _ in range(MAX_IDLE_PER_ORIGIN)]
    extra = exchange(sized(b"x"), pool=pool)
    assert pool.idle_count() == MAX_IDLE_PER_ORIGIN
    assert extra.aborted and not extra.pooled
    assert not any(ex.aborted for ex in kept)


def test_an_idle_connection_the_backend_closes_leaves_the_pool() -> None:
    ex = exchange(sized(b"x"))
    ex.connection.connectionLost(Failure(ConnectionDone()))
    assert ex.pool.idle_count() == 0


def test_an_idle_connection_that_gets_unasked_bytes_is_dropped() -> None:
    ex = exchange(sized(b"x"))
    ex.connection.dataReceived(b"HTTP/1.1 200 OK\r\n")
    assert ex.aborted and ex.pool.idle_count() == 0


# -- a kept connection the backend closes as it is reused -----------------------------------------


def kept_connection() -> tuple[BackendConnections, Origin, MemoryEndpoint]:
    """A pool with one idle connection to its origin, its first answer over."""
    endpoint = MemoryEndpoint()
    pool = BackendConnections(Clock())
    origin = origin_of(pool, endpoint)
    first = pool.request(origin, REQUEST)
    endpoint.connections[0].dataReceived(sized(b"1"))
    assert outcome(first).code == 200 and origin.idle == endpoint.connections
    return pool, origin, endpoint


@pytest.mark.parametrize(
    "reason", [ConnectionDone(), ConnectionLost()], ids=["closed", "reset"]
)
def test_a_kept_connection_closed_before_an_answer_sends_the_request_again(
    reason: Exception,
) -> None:
    # The backend's idle close crossed the request on the wire: it never read it.
    pool, origin, endpoint = kept_connection()
    second = pool.request(origin, REQUEST)
    endpoint.connections[0].connectionLost(Failure(reason))
    assert len(endpoint.connections) == 2
    assert endpoint.transports[1].value() == REQUEST  # the same request, on a new connection
    endpoint.connections[1].dataReceived(sized(b"2"))
    assert outcome(second).code == 200
    assert origin.idle == [endpoint.connections[1]]


def test_a_kept_connection_closed_inside_an_answer_is_not_sent_again() -> None:
    pool, origin, endpoint = kept_connection()
    second = pool.request(origin, REQUEST)
    endpoint.connections[0].dataReceived(b"HTTP/1.1 200 OK\r\n")  # the backend had started
    endpoint.connections[0].connectionLost(Failure(ConnectionDone()))
    assert failure_of(second).check(ResponseNeverReceived)
    assert len(endpoint.connections) == 1


def test_a_new_connection_closed_before_an_answer_is_not_sent_again() -> None:
    endpoint = MemoryEndpoint()
    pool = BackendConnections(Clock())
    d = pool.request(origin_of(pool, endpoint), REQUEST)
    endpoint.connections[0].connectionLost(Failure(ConnectionDone()))
    assert failure_of(d).check(ResponseNeverReceived)
    assert len(endpoint.connections) == 1


def test_a_request_is_sent_again_once_at_most() -> None:
    pool, origin, endpoint = kept_connection()
    second = pool.request(origin, REQUEST)
    endpoint.connections[0].connectionLost(Failure(ConnectionDone()))
    endpoint.connections[1].connectionLost(Failure(ConnectionDone()))
    assert failure_of(second).check(ResponseNeverReceived)
    assert len(endpoint.connections) == 2


def test_cancelling_a_request_sent_again_aborts_its_new_connection() -> None:
    pool, origin, endpoint = kept_connection()
    second = pool.request(origin, REQUEST)
    endpoint.connections[0].connectionLost(Failure(ConnectionDone()))
    second.cancel()
    assert failure_of(second).check(CancelledError)
    assert endpoint.transports[1].disconnected
    endpoint.connections[1].dataReceived(sized(b"late"))  # changes nothing
    assert pool.idle_count() == 0


def test_a_closed_pool_sends_nothing_again() -> None:
    pool, origin, endpoint = kept_connection()
    second = pool.request(origin, REQUEST)
    outcome(pool.close())  # stopping: the busy connection ends with its request
    endpoint.connections[0].connectionLost(Failure(ConnectionDone()))
    assert failure_of(second).check(ResponseNeverReceived)
    assert len(endpoint.connections) == 1


def test_close_aborts_every_idle_connection() -> None:
    clock = Clock()
    pool = BackendConnections(clock)
    idle = [exchange(sized(b"x"), pool=pool) for _ in range(2)]
    outcome(pool.close())
    assert all(ex.aborted for ex in idle)
    assert pool.idle_count() == 0
    assert clock.getDelayedCalls() == []


# -- read_body ------------------------------------------------------------------------------------


def answered(data: bytes) -> tuple[Response, BackendConnection, StringTransport]:
    """A response whose body nobody has asked for yet."""
    connection, transport = connected()
    d = connection.request(REQUEST)
    connection.dataReceived(data)
    response = outcome(d)
    assert isinstance(response, Response)
    return response, connection, transport


@pytest.mark.parametrize(
    "data", [sized(b'{"ok": true}'), chunked(b"C\r\n" b'{"ok": true}' b"\r\n0\r\n\r\n")],
    ids=["length", "chunked"],
)
def test_read_body_gives_the_whole_body(data: bytes) -> None:
    response, connection, _ = answered(data)
    assert outcome(read_body(response)) == b'{"ok": true}'
    assert connection in connection.origin.idle


def test_read_body_refuses_a_declared_length_over_the_limit() -> None:
    response, connection, transport = answered(sized(b"0123456789")[:-10])
    assert failure_of(read_body(response, limit=4)).check(BodyTooLarge)
    assert transport.disconnected
    connection.dataReceived(b"0123456789")
    assert connection.pool.idle_count() == 0


# -- a real backend -------------------------------------------------------------------------------


async def post(upstream: UpstreamClient, url: str, body: dict[str, Any]) -> Response:
    head = upstream.request_head(
        url.encode("ascii") + b"/v1/chat/completions", [(b"Content-Type", b"application/json")]
    )
    data = head.build(json.dumps(body).encode(), b"req-http-client", None)
    return await deadline(upstream.connections.request(head.origin, data))


@pytest_twisted.ensureDeferred
async def test_a_chat_completion_from_a_real_backend_then_the_connection_is_reused(
    cleanup: Cleanup,
) -> None:
    mock = start_mock("real")
    cleanup.append(mock)
    upstream = UpstreamClient(reactor)
    try:
        response = await post(upstream, mock.url, CHAT)
        assert response.code == 200
        data: bytes = await deadline(read_body(response))
        answer = json.loads(data)
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"] == "Hello from real"
        assert mock.stats()["last_request"]["headers"]["x-request-id"] == "req-http-client"
        assert upstream.connections.idle_count() == 1  # pooled before the body's end is told
        again = await post(upstream, mock.url, CHAT)
        await deadline(read_body(again))
        assert mock.stats()["connections"] == 1
    finally:
        await upstream.stopService()


@pytest.mark.parametrize(("framing", "pooled"), [("chunked", True), ("close", False)])
@pytest_twisted.ensureDeferred
async def test_a_streamed_chat_completion_from_a_real_backend_ends_with_done(
    cleanup: Cleanup, framing: str, pooled: bool
) -> None:
    mock = start_mock("real", stream_framing=framing)
    cleanup.append(mock)
    upstream = UpstreamClient(reactor)
    try:
        response = await post(upstream, mock.url, {**CHAT, "stream": True})
        assert response.code == 200
        assert response.header(b"content-type") == b"text/event-stream"
        body = await deadline(read_body(response))
        assert body.startswith(b"data: {") and body.endswith(b"data: [DONE]\n\n")
        if pooled:
            assert upstream.connections.idle_count() == 1
        else:  # the backend's close ended the body: nothing to pool
            await wait_for(lambda: mock.stats()["open_connections"] == 0, what="the close")
            assert upstream.connections.idle_count() == 0
    finally:
        await upstream.stopService()


# -- over TLS -----------------------------------------------------------------------------------


def _certificate_for_localhost() -> tuple[Any, Any]:
    """A self-signed certificate for 127.0.0.1: (key, certificate), cryptography's objects."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@pytest_twisted.ensureDeferred
async def test_an_https_backend_answers_through_the_client_and_keeps_its_connection() -> None:
    from twisted.internet import ssl
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Chat(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"seen": json.loads(request.content.read())}).encode()

    from cryptography.hazmat.primitives.serialization import Encoding

    key, cert = _certificate_for_localhost()
    server_options = ssl.CertificateOptions(privateKey=key, certificate=cert)
    site = Site(Chat())
    site.noisy = False
    port = reactor.listenSSL(0, site, server_options, interface="127.0.0.1")  # type: ignore[attr-defined]
    pool = BackendConnections(reactor)
    try:
        number = port.getHost().port
        client_options = ssl.optionsForClientTLS(
            "127.0.0.1", trustRoot=ssl.Certificate.loadPEM(cert.public_bytes(Encoding.PEM))
        )
        endpoint = wrapClientTLS(client_options, HostnameEndpoint(reactor, "127.0.0.1", number))
        host = b"127.0.0.1:%d" % number
        origin = pool.origin(("https", host), "tls", host, endpoint)
        head = RequestHead(
            origin, b"/v1/chat/completions", [(b"Content-Type", b"application/json")]
        )
        for _ in range(2):
            response = await deadline(pool.request(origin, head.build(b'{"n": 1}', b"id-1", None)))
            assert response.code == 200
            body = await deadline(read_body(response))
            assert json.loads(body) == {"seen": {"n": 1}}
        assert pool.idle_count() == 1  # the second request went over the same TLS connection
    finally:
        await pool.close()
        await port.stopListening()
