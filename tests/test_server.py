"""The server layer and the exchange in memory: a real NexusSite on a StringTransport, a Clock."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from nexus.config import ServerConfig
from nexus.errors import Unauthorized
from nexus.server import (
    RECORD_DELAY,
    Exchange,
    Handler,
    NexusSite,
    Reply,
    Stream,
    http_date,
)
from nexus.tracking import RequestRecord

PATH = b"/v1/chat/completions"


class _Root(Resource):
    """Every request but an inference POST (those go to their handler)."""

    isLeaf = True

    def render(self, request: Any) -> object:
        return b"other"


class _TCPTransport(StringTransport):
    """A StringTransport that can half-close, like a TCP transport."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Served:
    """One connection to a site serving ``handler``; what was recorded."""

    def __init__(self, handler: Handler, **server: Any) -> None:
        self.clock = Clock()
        self.written: list[RequestRecord] = []
        config = ServerConfig(**server)
        self.site = NexusSite(
            _Root(), config, [self.written.append], {PATH: handler},
            now=self.clock.seconds, reactor=self.clock,
        )
        self.channel = self.site.buildProtocol(None)
        self.transport = _TCPTransport()
        self.channel.makeConnection(self.transport)

    @property
    def records(self) -> list[RequestRecord]:
        """The records as a read of the numbers sees them (it writes those still waiting)."""
        self.site.write_records()
        return self.written

    def record_timers(self) -> list[Any]:
        """The timers that would write waiting records."""
        write = self.site.write_records
        return [call for call in self.clock.getDelayedCalls() if call.func == write]

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def post(self, body: bytes = b"{}", path: bytes = PATH, extra: bytes = b"") -> None:
        self.send(
            b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path, len(body), extra, body)
        )

    def response(self) -> tuple[bytes, dict[bytes, bytes], bytes]:
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        pairs = (line.split(b": ", 1) for line in lines)
        headers = {name.lower(): value for name, value in pairs}
        return status, headers, body

    def leave(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


def test_a_reply_is_written_and_recorded_once() -> None:
    seen: list[Exchange] = []

    async def handler(exchange: Exchange) -> Reply:
        seen.append(exchange)
        exchange.record.model = json.loads(exchange.body)["model"]
        return Reply(201, b'{"ok": true}', [(b"x-nexus-backend", [b"a"])])

    served = Served(handler)
    served.clock.advance(0.25)
    served.post(b'{"model": "m"}', extra=b"Authorization: Bearer k\r\n")
    status, headers, body = served.response()
    assert status == b"HTTP/1.1 201 Created"
    assert headers[b"x-nexus-backend"] == b"a" and headers[b"content-length"] == b"12"
    assert b"server" not in headers  # no "Server: TwistedWeb/<version>"
    sent = parsedate_to_datetime(headers[b"date"].decode()).timestamp()
    assert abs(sent - time.time()) < 5  # an HTTP date: now
    assert body == b'{"ok": true}'
    assert seen[0].authorization == [b"Bearer k"]
    [record] = served.records
    assert (record.model, record.status, record.error_type) == ("m", 201, None)
    served.leave()  # the connection closing later changes nothing
    assert len(served.records) == 1


def test_the_date_is_formatted_as_twisted_does_once_a_second(monkeypatch: Any) -> None:
    now = [1_700_000_000.25]
    monkeypatch.setattr(time, "time", lambda: now[0])
    first = http_date()
    assert first == datetimeToString(1_700_000_000) == b"Tue, 14 Nov 2023 22:13:20 GMT"
    now[0] += 0.5
    assert http_date() is first  # the same second: not formatted again
    now[0] += 0.5
    assert http_date() == b"Tue, 14 Nov 2023 22:13:21 GMT"


def test_a_reply_goes_out_in_one_write_with_twisted_s_header_names() -> None:
    async def handler(exchange: Exchange) -> Reply:
        return Reply(200, b"{}", [
            (b"content-type", [b"application/json"]),
            (b"x-backend-thing", [b"one", b"two"]),
            (b"date", [b"from the backend"]),  # replaces Twisted's own
        ])

    served = Served(handler)
    writes: list[bytes] = []
    write = served.transport.write
    served.transport.write = lambda data: (writes.append(data), write(data))  # type: ignore[method-assign]
    served.post(extra=b"X-Request-Id: abc\r\n")
    assert len(writes) == 1  # status line, headers and body together
    head, _, body = writes[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK" and body == b"{}"
    assert b"X-Request-Id: abc" in lines and b"Content-Type: application/json" in lines
    assert b"X-Backend-Thing: one" in lines and b"X-Backend-Thing: two" in lines
    assert [line for line in lines if line.startswith(b"Date:")] == [b"Date: from the backend"]
    assert b"Content-Length: 2" in lines and not any(b"Connection" in x for x in lines)
    assert served.records[0].status == 200


def test_a_reply_to_an_http_1_0_client_closes_and_a_204_has_no_body() -> None:
    async def handler(exchange: Exchange) -> Reply:
        return Reply(204, b"ignored")

    served = Served(handler)
    served.send(b"POST %s HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}" % PATH)
    data = served.transport.value()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 204 No Content") and body == b""
    assert b"Content-Length" not in head
    assert served.transport.disconnecting  # HTTP/1.0: not kept alive


def test_errors_become_the_contract_s_json_errors() -> None:
    async def refuse(exchange: Exchange) -> Reply:
        raise Unauthorized("no key")

    served = Served(refuse)
    served.post()
    status, headers, body = served.response()
    assert status.startswith(b"HTTP/1.1 401")
    assert headers[b"www-authenticate"] == b"Bearer"
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert served.records[0].error_type == "invalid_request"

    async def broken(exchange: Exchange) -> Reply:
        raise RuntimeError("a bug")

    served = Served(broken)
    served.post()
    status, _, body = served.response()
    assert status.startswith(b"HTTP/1.1 500")
    assert json.loads(body)["error"]["message"] == "Internal gateway error."
    assert (served.records[0].status, served.records[0].error_type) == (500, "other")


class _Body:
    def __init__(self) -> None:
        self.consumer: IConsumer | None = None
        self.done: Deferred[None] = Deferred()
        self.stopped = False

    def write_to(self, consumer: IConsumer) -> Deferred[None]:
        self.consumer = consumer
        consumer.write(b"data: 1\n\n")
        return self.done

    def stop(self) -> None:
        self.stopped = True


def test_a_stream_is_written_as_it_comes_and_recorded_when_it_ends() -> None:
    body = _Body()

    async def handler(exchange: Exchange) -> Stream:
        return Stream(200, [(b"content-type", [b"text/event-stream"])], body)

    served = Served(handler)
    served.post()
    assert b"data: 1" in served.transport.value()
    assert b"\r\nDate: " in served.transport.value() and b"Server" not in served.transport.value()
    assert served.records == []  # not over yet
    assert body.consumer is not None
    body.consumer.write(b"data: 2\n\n")
    body.done.callback(None)
    assert served.transport.value().endswith(b"0\r\n\r\n")  # chunked body ended
    assert served.records[0].status == 200


def test_a_client_leaving_cancels_the_handler_and_is_recorded_as_499() -> None:
    waiting: Deferred[Reply] = Deferred()
    cancelled: list[bool] = []

    async def handler(exchange: Exchange) -> Reply:
        try:
            return await waiting
        except CancelledError:
            cancelled.append(True)
            raise

    served = Served(handler)
    served.post()
    served.clock.advance(1.5)
    served.leave()
    assert cancelled == [True]
    [record] = served.records
    assert (record.status, record.error_type, record.duration) == (499, "client_disconnect", 1.5)


def test_a_client_leaving_mid_stream_cancels_the_stream() -> None:
    body = _Body()
    served = Served(lambda exchange: succeed(Stream(200, [], body)))  # type: ignore[arg-type,return-value]
    served.post()
    served.leave()
    assert body.done.called  # cancelled
    body.done.addErrback(lambda f: f.trap(CancelledError))
    assert [r.status for r in served.records] == [499]


def test_a_record_is_written_while_the_next_request_waits_or_soon_after() -> None:
    # The bookkeeping of an answer (metrics, log line, history) stays out of the next
    # client's wait: it runs once the next request was sent on and waits for its backend.
    answers: list[Deferred[Reply]] = []
    written_when_waiting: list[int] = []

    def handler(exchange: Exchange) -> Deferred[Reply]:
        answers.append(Deferred())
        return answers[-1]

    served = Served(handler)
    served.site.recorders += (lambda record: written_when_waiting.append(len(answers)),)
    served.post()
    answers[0].callback(Reply(200, b"{}"))
    assert served.transport.value().startswith(b"HTTP/1.1 200 OK")  # the client has it
    assert served.written == []  # the record waits
    served.post()  # the next request: the first's record is written once this one waits
    assert written_when_waiting == [2]
    assert [r.status for r in served.written] == [200]
    assert not served.record_timers()  # none left behind
    # Nothing comes next: RECORD_DELAY later the record is written anyway.
    answers[1].callback(Reply(201, b"{}"))
    served.clock.advance(RECORD_DELAY * 0.99)
    assert len(served.written) == 1
    served.clock.advance(RECORD_DELAY * 0.02)
    assert [r.status for r in served.written] == [200, 201]


def test_a_read_of_the_numbers_writes_the_waiting_records_in_order() -> None:
    served = Served(lambda exchange: succeed(Reply(200, b"{}")))  # type: ignore[arg-type,return-value]
    served.site.finished(RequestRecord(started=0.0, request_id="a", client=None))
    served.site.finished(RequestRecord(started=0.0, request_id="b", client=None))
    assert served.written == []
    synced = served.site.synced()
    assert synced.called  # one process: nothing to wait for
    assert [r.request_id for r in served.written] == ["a", "b"]
    assert not served.record_timers()


def _never(exchange: Exchange) -> Deferred[Reply]:
    raise AssertionError("a refused request never reaches its handler")


def test_a_body_over_the_limit_is_refused_before_it_is_read_and_counted() -> None:
    served = Served(_never, max_body_bytes=10)
    served.send(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n" % PATH)
    status, headers, body = served.response()
    assert status == b"HTTP/1.1 413 Payload Too Large" and headers[b"connection"] == b"close"
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert [(r.status, r.error_type) for r in served.records] == [(413, "invalid_request")]
    served.send(b"x" * 100)  # the rest is read and dropped
    assert served.transport.value().count(b"HTTP/1.1") == 1

    other = Served(_never, max_body_bytes=10)
    other.send(b"POST /elsewhere HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    assert other.response()[0].startswith(b"HTTP/1.1 413")
    assert other.records == []  # not an inference path: not counted


def test_a_slow_client_gets_408_and_a_malformed_request_400() -> None:
    served = Served(_never, request_timeout_seconds=3)
    served.send(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab" % PATH)
    served.clock.advance(3)
    assert served.response()[0] == b"HTTP/1.1 408 Request Timeout"
    assert [(r.status, r.error_type) for r in served.records] == [(408, "invalid_request")]
    assert served.transport.write_closed and not served.transport.disconnecting
    served.clock.advance(2)  # the linger is over: the connection is cut
    assert served.transport.disconnecting

    served = Served(_never)
    served.send(b"NONSENSE\r\n\r\n")
    status, _, body = served.response()
    assert status == b"HTTP/1.1 400 Bad Request"
    assert json.loads(body)["error"]["type"] == "invalid_request_error"




# -- whole requests: taken in one step, or left to Twisted's parser --------------------------------

_WHOLE = (
    b"POST %s HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
    b"X-Request-Id: same-id\r\nAuthorization: Bearer k\r\nContent-Length: 14\r\n\r\n"
    b'{"model": "m"}' % PATH
)


def _echo_handler(seen: list[Exchange]) -> Handler:
    async def handler(exchange: Exchange) -> Reply:
        seen.append(exchange)
        return Reply(200, exchange.body, [(b"content-type", [b"application/json"])])

    return handler


def _counting_lines(served: Served) -> list[bytes]:
    """The lines Twisted's own parser reads on ``served``'s channel."""
    lines: list[bytes] = []
    channel = served.channel
    original = channel.lineReceived

    def counted(line: bytes) -> None:
        lines.append(line)
        original(line)

    channel.lineReceived = counted  # type: ignore[method-assign]
    return lines


def _without_date(data: bytes) -> bytes:
    return b"\r\n".join(x for x in data.split(b"\r\n") if not x.startswith(b"Date: "))


class _Events:
    """A stream body that writes ``events`` at once and ends."""

    def __init__(self, events: list[bytes]) -> None:
        self.events = events

    def write_to(self, consumer: IConsumer) -> Deferred[None]:
        for event in self.events:
            consumer.write(event)
        return succeed(None)

    def stop(self) -> None:
        pass


_STREAM_HEADERS = [(b"content-type", [b"text/event-stream"]), (b"cache-control", [b"no-cache"])]


class _TwistedStream(Resource):
    """The same stream written by twisted.web's own Request, header by header."""

    isLeaf = True

    def __init__(self, events: list[bytes]) -> None:
        super().__init__()
        self.events = events

    def render(self, request: Any) -> object:
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"x-request-id", [b"same-id"])
        for name, values in _STREAM_HEADERS:
            request.responseHeaders.setRawHeaders(name, values)
        for event in self.events:
            request.write(event)
        request.finish()
        return NOT_DONE_YET


def _answer_lines(data: bytes) -> tuple[bytes, list[bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    kept = sorted(x for x in lines if not x.startswith((b"Date: ", b"Server: ")))
    return status, kept, body


@pytest.mark.parametrize("events", [[b"data: 1\n\n", b"data: 2\n\n"], []], ids=["events", "empty"])
@pytest.mark.parametrize(
    "request_bytes",
    [_WHOLE, _WHOLE.replace(b"Host: gateway", b"Connection: close"),
     _WHOLE.replace(b"HTTP/1.1", b"HTTP/1.0")],
    ids=["keep-alive", "close", "http-1.0"],
)
def test_a_stream_s_head_leaves_with_its_first_event_as_twisted_would_write_them(
    request_bytes: bytes, events: list[bytes]
) -> None:
    served = Served(lambda exchange: succeed(Stream(200, _STREAM_HEADERS, _Events(events))))  # type: ignore[arg-type,return-value]
    writes: list[bytes] = []
    write = served.transport.write
    served.transport.write = lambda data: (writes.append(data), write(data))  # type: ignore[method-assign]
    served.send(request_bytes)
    reference = Site(_TwistedStream(events)).buildProtocol(None)
    transport = StringTransport()
    reference.makeConnection(transport)
    reference.dataReceived(request_bytes)
    assert _answer_lines(served.transport.value()) == _answer_lines(transport.value())
    assert served.transport.disconnecting == transport.disconnecting
    if events:  # the head and the first event in one write (one packet)
        assert writes[0].startswith(request_bytes.split(b"\r\n")[0][-8:] + b" 200 OK\r\n")
        assert writes[0].endswith(events[0] + (b"\r\n" if b"1.1" in request_bytes else b""))
    assert served.records[0].status == 200


def _whole_then_byte_by_byte(data: bytes) -> Iterator[tuple[Served, list[Exchange]]]:
    """``data`` served from one read (``whole_request``), then from one byte per read (Twisted)."""
    for pieces in ([data], [bytes([b]) for b in data]):
        seen: list[Exchange] = []
        served = Served(_echo_handler(seen))
        lines = _counting_lines(served)
        for piece in pieces:
            served.send(piece)
        assert (len(lines) == 0) == (len(pieces) == 1)  # whole: no line went through Twisted
        yield served, seen


def test_a_whole_request_skips_the_line_parser_and_is_served_like_one_read_line_by_line() -> None:
    answers = []
    for served, seen in _whole_then_byte_by_byte(_WHOLE):
        [exchange] = seen
        request = exchange.request
        assert served.response()[2] == b'{"model": "m"}'  # the body the handler read, echoed
        assert exchange.authorization == [b"Bearer k"]
        assert request.method == b"POST" and request.path == PATH and request.args == {}
        assert request.requestHeaders.getRawHeaders(b"host") == [b"gateway"]
        assert served.records[0].request_id == "same-id" and served.records[0].status == 200
        answers.append(_without_date(served.transport.value()))
        served.transport.clear()
        served.send(_WHOLE)  # the connection is kept alive and serves the next one
        assert b" 200 OK" in served.transport.value() and len(seen) == 2
    assert answers[0] == answers[1]


@pytest.mark.parametrize("connection", [b"close", b"keep-alive", b"Close", b"x-thing, close"])
def test_a_whole_request_with_a_connection_header_means_what_it_means_to_twisted(
    connection: bytes,
) -> None:
    # One-shot clients (curl, a benchmark's streams) send "Connection: close".
    data = _WHOLE.replace(b"Host: gateway", b"Connection: " + connection)
    answers = []
    for served, seen in _whole_then_byte_by_byte(data):
        assert served.response()[2] == b'{"model": "m"}' and len(seen) == 1
        answers.append((_without_date(served.transport.value()), served.transport.disconnecting))
    assert answers[0] == answers[1]
    closes = b"close" in connection.lower().split(b" ")  # Twisted splits on spaces only
    assert answers[0][1] == closes and (b"Connection: close" in answers[0][0]) == closes


@pytest.mark.parametrize(
    "data",
    [
        _WHOLE[:-3],  # not all there yet
        _WHOLE + _WHOLE,  # a second request behind it
        _WHOLE.replace(b"Content-Length: 14", b"Transfer-Encoding: chunked").replace(
            b'{"model": "m"}', b'e\r\n{"model": "m"}\r\n0\r\n\r\n'
        ),
        _WHOLE.replace(b"Host: gateway", b"Expect: 100-continue"),
        _WHOLE.replace(b"Host: gateway", b"Cookie: a=b"),
        _WHOLE.replace(b"HTTP/1.1", b"HTTP/1.0"),
        _WHOLE.replace(b"\r\nHost", b"\nHost"),  # a bare LF
        _WHOLE.replace(b"Host: gateway", b"Content-Length: 14"),  # twice
        _WHOLE.replace(b"POST /v1/chat/completions", b"POST /v1/chat/completions?x=1"),
        _WHOLE.replace(b"Host: gateway", b"Bad Name: x"),
    ],
    ids=[
        "partial", "pipelined", "chunked", "expect", "cookie", "http-1.0",
        "bare-lf", "two-lengths", "query", "bad-name",
    ],
)
def test_anything_but_a_plain_whole_request_is_left_to_twisted(data: bytes) -> None:
    seen: list[Exchange] = []
    served = Served(_echo_handler(seen))
    lines = _counting_lines(served)
    served.send(data)
    assert lines  # Twisted's parser read it
    if data == _WHOLE + _WHOLE:
        assert len(seen) == 2 and served.transport.value().count(b" 200 OK") == 2


def test_left_to_twisted_requests_keep_their_meaning() -> None:
    seen: list[Exchange] = []
    served = Served(_echo_handler(seen))
    served.send(_WHOLE.replace(b"Host: gateway", b"Expect: 100-continue"))
    assert served.transport.value().startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    served = Served(_echo_handler(seen))
    served.send(_WHOLE.replace(b"Host: gateway", b"Content-Length: 14"))
    assert served.response()[0] == b"HTTP/1.1 400 Bad Request"  # Twisted refuses two lengths


def test_a_whole_request_over_the_body_limit_is_refused_as_before() -> None:
    served = Served(_never, max_body_bytes=10)
    served.send(_WHOLE)
    assert served.response()[0] == b"HTTP/1.1 413 Payload Too Large"
    assert [(r.status, r.error_type) for r in served.records] == [(413, "invalid_request")]


def test_a_connection_s_addresses_are_asked_for_once_and_every_request_has_them() -> None:
    seen: list[Exchange] = []
    served = Served(_echo_handler(seen))
    asked: list[str] = []
    transport = served.transport
    get_host, get_peer = transport.getHost, transport.getPeer

    def host() -> Any:
        asked.append("host")  # a getsockname() call on a real socket
        return get_host()

    def peer() -> Any:
        asked.append("peer")
        return get_peer()

    transport.getHost, transport.getPeer = host, peer  # type: ignore[method-assign]
    for _ in range(3):
        served.send(_WHOLE)
    assert len(seen) == 3
    assert sorted(asked) == ["host", "peer"]
    for exchange in seen:
        assert exchange.request.getClientAddress() == get_peer()
        assert exchange.request.getHost() == get_host()
    assert [r.client for r in served.records] == [get_peer().host] * 3
