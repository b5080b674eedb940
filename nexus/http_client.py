"""The hot path's HTTP/1.1 client: one write per request, one parser, a keep-alive pool.

Twisted's ``Agent`` costs about a quarter of the gateway's CPU per proxied
request (docs/performance.md): it parses the URL, builds ``Headers`` objects,
writes the body through a producer and a chain of Deferreds, and keeps a timer
per pooled connection. The gateway sends one kind of request to a few fixed
backends, so it builds each request head once per backend (``RequestHead``),
sends head and body in one ``write`` and parses the answer itself
(``BackendConnection``): status line, headers, a ``Content-Length``, chunked
or close-delimited body (RFC 9112 section 6).

The answer is a ``Response`` with the part of Twisted's ``IResponse`` the
proxy uses (``code``, ``length``, ``deliverBody``): its body protocol gets
``dataReceived`` and then ``connectionLost`` with ``ResponseDone`` (the body
ended as framed), ``PotentialDataLoss`` (a close-delimited body ended by the
close) or ``ResponseFailed`` (broken off); its transport pauses, resumes and
stops (aborts) the connection, so a slow client can pause a backend.

A failed attempt is the proxy's to retry on another backend, with one
exception: a kept connection that ends before a single byte of its answer.
A backend closes an idle connection when its own keep-alive time is up
(uvicorn, under vLLM: 5 s), and a request written at that moment meets the
close on the wire: the backend never read it. It is sent once more on a new
connection to the same backend (as Go's ``net/http`` does), instead of
failing a request the backend would have answered. The health poller keeps
treq and Twisted's pool.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from nexus._twisted import no_delay, send_now

log = Logger()

#: The most bytes of status line and headers a backend may send.
MAX_HEAD_BYTES = 64 * 1024

#: The longest chunk-size or trailer line of a chunked body.
MAX_CHUNK_LINE = 4096

#: Idle keep-alive connections kept per backend; more are closed when they come back.
MAX_IDLE_PER_ORIGIN = 256

#: A pooled connection unused this long is closed (a backend may never close it).
IDLE_SECONDS = 120.0

#: A chunk size: hex digits only (no sign, no 0x; RFC 9112 section 7.1), at most 2**64 - 1.
_HEX_SIZE = re.compile(rb"[0-9a-fA-F]{1,16}")

#: A CR that does not end a line (made a space before a head is split into lines).
_LONE_CR = re.compile(rb"\r(?!\n)")

#: Header names (RFC 9110 section 5.1: no spaces, no control characters), one per line.
_TOKENS = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*")

_DONE = Failure(ResponseDone("Response body fully received"))
_DATA_LOSS = Failure(PotentialDataLoss())


class MalformedResponse(Exception):
    """A backend's answer is not valid HTTP/1.1 (status line, headers or framing)."""


class RequestHead:
    """The fixed part of every request to one backend endpoint, built once.

    ``build`` adds the per-request headers and the body, and returns the bytes
    to write: ``POST <path> HTTP/1.1``, ``Host``, ``Content-Type``, the
    backend's own ``Authorization`` when it has one, then ``X-Request-Id``,
    the client's ``Authorization`` (when the backend has no key of its own)
    and ``Content-Length``.
    """

    __slots__ = ("origin", "own_key", "prefix")

    def __init__(
        self, origin: Origin, path: bytes, headers: Sequence[tuple[bytes, bytes]]
    ) -> None:
        self.origin = origin
        names = {name.lower() for name, _ in headers}
        self.own_key = b"authorization" in names
        lines = [b"POST %s HTTP/1.1\r\nHost: %s\r\n" % (path, origin.host_header)]
        lines += [b"%s: %s\r\n" % (name, header_value(value)) for name, value in headers]
        self.prefix = b"".join(lines)

    def build(
        self, body: bytes, request_id: bytes, authorization: Sequence[bytes] | None
    ) -> bytes:
        """The whole request: head and body, ready for one write."""
        parts = [self.prefix, b"X-Request-Id: ", header_value(request_id), b"\r\n"]
        if authorization and not self.own_key:
            for value in authorization:
                parts += (b"Authorization: ", header_value(value), b"\r\n")
        parts += (b"Content-Length: %d\r\n\r\n" % len(body), body)
        return b"".join(parts)


def header_value(value: bytes) -> bytes:
    """``value`` safe to write in a header line: CR and LF become spaces."""
    if b"\r" in value or b"\n" in value:
        return value.replace(b"\r", b" ").replace(b"\n", b" ")
    return value


class Origin:
    """Where one backend listens: its endpoint, its ``Host`` header, its idle connections."""

    __slots__ = ("endpoint", "host_header", "idle", "name")

    def __init__(self, name: str, host_header: bytes, endpoint: IStreamClientEndpoint) -> None:
        self.name = name
        self.host_header = host_header
        self.endpoint = endpoint
        #: Idle connections, the most recently used last.
        self.idle: list[BackendConnection] = []


class Response:
    """A backend's answer: status, headers, and its body delivered to a protocol.

    ``headers`` maps lower-case names to their values in order; the names the
    backend listed in ``Connection`` are in ``connection_names`` (hop-by-hop
    for this connection, never relayed).
    """

    __slots__ = (
        "_body",
        "_ended",
        "_protocol",
        "code",
        "connection",
        "connection_names",
        "headers",
        "length",
        "phrase",
    )

    def __init__(
        self,
        connection: BackendConnection,
        code: int,
        phrase: bytes,
        headers: dict[bytes, list[bytes]],
        length: int | object,
        connection_names: frozenset[bytes],
    ) -> None:
        self.connection = connection
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self.connection_names = connection_names
        self._protocol: IProtocol | None = None
        self._body: list[bytes] = []
        self._ended: Failure | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), or None."""
        values = self.headers.get(name)
        return values[0] if values else None

    def complete_body(self) -> bytes | None:
        """The whole body if it has already arrived, ended as framed, and is not taken; else None.

        Most answers arrive in one read with their head: taking the body here
        costs no protocol and no Deferred.
        """
        ended = self._ended
        if self._protocol is not None or ended is None or ended is not _DONE:
            return None
        self._protocol = _TAKEN
        body, self._body = self._body, []
        return body[0] if len(body) == 1 else b"".join(body)

    def deliverBody(self, protocol: IProtocol) -> None:
        """Give the body to ``protocol``: what arrived so far, the rest as it comes, the end."""
        if self._protocol is not None:
            raise RuntimeError("the body of a response is delivered once")
        self._protocol = protocol
        protocol.makeConnection(_BodyTransport(self))  # type: ignore[arg-type]
        body, self._body = self._body, []
        for data in body:
            protocol.dataReceived(data)
        if self._ended is not None:
            protocol.connectionLost(self._ended)

    def body_received(self, data: bytes) -> None:
        if self._protocol is None:
            self._body.append(data)
        else:
            self._protocol.dataReceived(data)

    def body_ended(self, reason: Failure) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        if self._protocol is not None:
            self._protocol.connectionLost(reason)


class _Taken(Protocol):
    """Stands for the body's protocol once ``complete_body`` took the body."""


_TAKEN = _Taken()


class _BodyTransport:
    """The transport a body protocol sees: pause, resume, or stop (abort) the connection.

    Once the body is over these do nothing: the connection may be serving
    another request by then.
    """

    __slots__ = ("_response",)

    def __init__(self, response: Response) -> None:
        self._response = response

    def _connection(self) -> BackendConnection | None:
        response = self._response
        if response._ended is not None:
            return None
        return response.connection

    def pauseProducing(self) -> None:
        connection = self._connection()
        if connection is not None:
            connection.pause()

    def resumeProducing(self) -> None:
        connection = self._connection()
        if connection is not None:
            connection.resume()

    def stopProducing(self) -> None:
        connection = self._connection()
        if connection is not None:
            connection.abort()


# States of a BackendConnection.
_IDLE, _WAITING, _BODY, _CLOSED = range(4)

# Body framings.
_LENGTH, _CHUNKED, _UNTIL_CLOSE, _NONE = range(4)

# Chunked body parser states.
_CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER = range(4)


class BackendConnection(Protocol):
    """One keep-alive connection to a backend, one request at a time.

    ``request(data)`` writes a whole request and returns a Deferred that fires
    with the ``Response`` once its head has arrived (its body follows through
    ``deliverBody``), or fails: ``ResponseNeverReceived`` when the connection
    ended first, ``MalformedResponse`` for an answer that is not HTTP, and
    ``CancelledError`` when cancelled (the connection is then aborted). When
    the body has ended as framed and both sides allow it, the connection goes
    back to its origin's idle list.
    """

    def __init__(self, pool: BackendConnections, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.state = _IDLE
        self.idle_since = 0.0
        self._waiting: Deferred[Response] | None = None
        self._buffer = b""
        self._response: Response | None = None
        self._framing = _NONE
        self._remaining = 0
        self._chunk_state = _CHUNK_SIZE
        self._keep_alive = False
        self._paused = False
        #: A byte of the answer to the current request has arrived.
        self.answer_started = False

    def connectionMade(self) -> None:
        no_delay(self.transport)

    # -- the request -----------------------------------------------------------------------

    def request(self, data: bytes) -> Deferred[Response]:
        """Send one whole request; fires with the response head (see the class)."""
        assert self.state == _IDLE and self.transport is not None
        self.state = _WAITING
        self._buffer = b""
        self.answer_started = False
        self._waiting = d = Deferred[Response](self._cancel)
        send_now(self.transport, data)
        return d

    def _cancel(self, d: Deferred[Response]) -> None:
        self._waiting = None
        self.abort()

    # -- the answer ------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == _BODY:
            self._body_data(data)
        elif state == _WAITING:
            self._head_data(data)
        elif state == _IDLE:
            # Bytes nobody asked for: this connection cannot be trusted for a next request.
            self.abort()

    def _head_data(self, data: bytes) -> None:
        self.answer_started = True
        buffer = self._buffer + data if self._buffer else data
        while True:
            head, buffer = _split_head(buffer)
            if head is None:
                if len(buffer) > MAX_HEAD_BYTES + 3:  # + the end of a head at the limit
                    self._fail_head(MalformedResponse("response head too large"))
                else:
                    self._buffer = buffer
                return
            if len(head) > MAX_HEAD_BYTES:
                self._fail_head(MalformedResponse("response head too large"))
                return
            try:
                response = self._parse_head(head)
            except MalformedResponse as e:
                self._fail_head(e)
                return
            if response is not None:
                break
            # An interim 1xx answer: the real one follows.
        self._buffer = b""
        self._response = response
        self.state = _BODY
        # The body bytes of this read first: an answer that came whole is whole when the
        # caller sees it (``Response.complete_body``), and its connection is back in the pool.
        if self._framing == _NONE:
            self._body_done(buffer)
        elif buffer:
            self._body_data(buffer)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(response)

    def _parse_head(self, head: bytes) -> Response | None:
        crs = head.count(b"\r")
        if crs and crs != head.count(b"\n"):
            # A CR that does not end a line: a space (RFC 9112 section 2.2), so that no
            # value the gateway relays can end a header line early.
            head = _LONE_CR.sub(b" ", head)
        lines = head.split(b"\n")
        status = lines[0].rstrip(b"\r").split(b" ", 2)
        if len(status) < 2 or not status[0].startswith(b"HTTP/1.") or len(status[1]) != 3:
            raise MalformedResponse("bad status line")
        try:
            code = int(status[1])
        except ValueError:
            raise MalformedResponse("bad status code") from None
        if code < 100:
            raise MalformedResponse("bad status code")
        if 100 <= code < 200:
            if code == 101:
                raise MalformedResponse("unexpected protocol switch")
            return None
        headers = _header_fields(lines)
        connection = _tokens(headers.pop(b"connection", None))
        keep_alive = status[0] == b"HTTP/1.1" and b"close" not in connection
        length: int | object = UNKNOWN_LENGTH
        if code in (204, 304):
            framing = _NONE
            length = 0
        elif b"transfer-encoding" in headers:
            codings = _tokens(headers[b"transfer-encoding"], ordered=True)
            if codings and codings[-1] == b"chunked":
                framing = _CHUNKED
                self._chunk_state = _CHUNK_SIZE
                # Any other coding would have to be undone by the client: not ours to relay.
                if len(codings) > 1:
                    raise MalformedResponse("unsupported transfer coding")
            else:
                framing = _UNTIL_CLOSE
            headers.pop(b"content-length", None)
        elif b"content-length" in headers:
            length = self._remaining = _content_length(headers[b"content-length"])
            framing = _LENGTH if length else _NONE
        else:
            framing = _UNTIL_CLOSE
        if framing == _UNTIL_CLOSE:
            keep_alive = False
        self._framing = framing
        self._keep_alive = keep_alive
        names = frozenset(connection) - {b"close", b"keep-alive"}
        return Response(self, code, status[2] if len(status) > 2 else b"", headers, length, names)

    def _fail_head(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, None
        self.abort()
        if waiting is not None:
            waiting.errback(error)

    def _body_data(self, data: bytes) -> None:
        framing = self._framing
        response = self._response
        assert response is not None
        if framing == _LENGTH:
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                response.body_received(data)
                return
            self._remaining = 0
            response.body_received(data[:remaining] if len(data) > remaining else data)
            self._body_done(data[remaining:])
        elif framing == _CHUNKED:
            self._chunked_data(data)
        elif framing == _UNTIL_CLOSE:
            response.body_received(data)

    def _chunked_data(self, data: bytes) -> None:
        """Read chunks from ``data`` (after what an earlier read left), by index: no re-slicing."""
        response = self._response
        assert response is not None
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        size = len(buffer)
        pos = 0
        while pos < size and self.state == _BODY:
            state = self._chunk_state
            if state == _CHUNK_DATA:
                remaining = self._remaining
                if size - pos <= remaining:
                    self._remaining = remaining - (size - pos)
                    if self._remaining == 0:
                        self._chunk_state = _CHUNK_END
                    response.body_received(buffer[pos:] if pos else buffer)
                    return
                self._remaining = 0
                self._chunk_state = _CHUNK_END
                response.body_received(buffer[pos : pos + remaining])
                pos += remaining
                if buffer[pos : pos + 2] == b"\r\n":  # the usual end of a chunk, at once
                    pos += 2
                    self._chunk_state = _CHUNK_SIZE
                continue
            end = buffer.find(b"\n", pos)
            if end < 0:
                if size - pos > MAX_CHUNK_LINE:
                    self._fail_body(MalformedResponse("chunk line too long"))
                else:
                    self._buffer = buffer[pos:]
                return
            line = buffer[pos:end].rstrip(b"\r")
            pos = end + 1
            if state == _CHUNK_SIZE:
                digits = line.split(b";", 1)[0].strip(b" \t")
                if _HEX_SIZE.fullmatch(digits) is None:
                    self._fail_body(MalformedResponse("bad chunk size"))
                    return
                self._remaining = int(digits, 16)
                self._chunk_state = _CHUNK_DATA if self._remaining else _TRAILER
            elif state == _CHUNK_END:
                if line:
                    self._fail_body(MalformedResponse("chunk not followed by CRLF"))
                    return
                self._chunk_state = _CHUNK_SIZE
            elif not line:  # _TRAILER: an empty line ends the body; trailers are dropped
                self._body_done(buffer[pos:])
                return

    def _body_done(self, rest: bytes) -> None:
        """The body ended as framed; ``rest`` is what the backend sent after it."""
        response = self._response
        if self.state != _BODY or response is None:
            return  # the body protocol stopped the connection meanwhile
        self._response = None
        self._buffer = b""
        if self._keep_alive and not rest:
            # Pooled first: a request sent when the body ends reuses this connection.
            self.state = _IDLE
            self.resume()
            self.pool.put(self)
            response.body_ended(_DONE)
            return
        self.state = _CLOSED
        response.body_ended(_DONE)
        if self.transport is not None:
            self.transport.loseConnection()

    def _fail_body(self, error: Exception) -> None:
        response, self._response = self._response, None
        self.abort()
        if response is not None:
            response.body_ended(Failure(ResponseFailed([Failure(error)])))

    # -- the connection --------------------------------------------------------------------

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def abort(self) -> None:
        """Drop the connection now (never reused)."""
        if self.state == _CLOSED:
            return
        if self.state == _IDLE:
            self.pool.forget(self)
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        state, self.state = self.state, _CLOSED
        if state == _IDLE:
            self.pool.forget(self)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(ResponseNeverReceived([reason]))
        response, self._response = self._response, None
        if response is not None:
            if self._framing == _UNTIL_CLOSE and reason.check(ConnectionDone):
                response.body_ended(_DATA_LOSS)
            else:
                response.body_ended(Failure(ResponseFailed([reason])))


def _header_fields(lines: list[bytes]) -> dict[bytes, list[bytes]]:
    """The header fields of a head's ``lines`` (the status line first): lower-case names.

    Whole-head operations where they can be (one match checks every name, one
    ``lower`` for all): per line, Python's own work is what a request pays for.
    """
    names: list[bytes] = []
    values: list[bytes] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise MalformedResponse("bad header line")
        names.append(name)
        values.append(value.strip(b" \t\r"))
    joined = b"\n".join(names)
    if names and _TOKENS.fullmatch(joined) is None:
        raise MalformedResponse("bad header name")
    lowered = joined.lower().split(b"\n") if names else []
    headers = {name: [value] for name, value in zip(lowered, values, strict=True)}
    if len(headers) < len(lowered):  # a repeated name: every value, in order
        headers = {}
        for name, value in zip(lowered, values, strict=True):
            headers.setdefault(name, []).append(value)
    return headers


def _split_head(buffer: bytes) -> tuple[bytes | None, bytes]:
    """(head, rest) when ``buffer`` holds a whole head (CRLF or LF lines), else (None, buffer)."""
    crlf = buffer.find(b"\r\n\r\n")
    lf = buffer.find(b"\n\n")
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return buffer[:lf], buffer[lf + 2 :]
    if crlf >= 0:
        return buffer[:crlf], buffer[crlf + 4 :]
    return None, buffer


def _tokens(values: Sequence[bytes] | None, ordered: bool = False) -> Any:
    """The comma-separated tokens of header values, lower case."""
    if not values:
        return [] if ordered else frozenset()
    tokens = [t.strip(b" \t").lower() for v in values for t in v.split(b",") if t.strip(b" \t")]
    return tokens if ordered else frozenset(tokens)


def _content_length(values: list[bytes]) -> int:
    """One ``Content-Length`` (RFC 9110 section 8.6: equal repeated values allowed)."""
    found = {t.strip(b" \t") for v in values for t in v.split(b",")}
    if len(found) != 1:
        raise MalformedResponse("conflicting content lengths")
    (value,) = found
    if not value.isdigit() or len(value) > 18:
        raise MalformedResponse("bad content length")
    return int(value)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: BackendConnections, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin

    def buildProtocol(self, addr: Any) -> BackendConnection:
        return BackendConnection(self.pool, self.origin)


class BackendConnections:
    """Keep-alive connections to every backend, taken most recently used first.

    ``request(origin, data)`` sends on an idle connection or a new one. Idle
    connections are closed after IDLE_SECONDS unused (one timer for all of
    them, not one per connection) and by ``close``.
    """

    def __init__(self, clock: IReactorTime, idle_seconds: float = IDLE_SECONDS) -> None:
        self.clock = clock
        self.idle_seconds = idle_seconds
        self._origins: dict[Any, Origin] = {}
        self._sweep: Any = None
        self._closed = False

    def origin(self, key: Any, name: str, host_header: bytes, endpoint: Any) -> Origin:
        """The origin for ``key`` (made once; the same object while the key is the same)."""
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = Origin(name, host_header, endpoint)
        return origin

    def request(self, origin: Origin, data: bytes) -> Deferred[Response]:
        """Send ``data`` (a whole request) to ``origin``; fires with the response head."""
        idle = origin.idle
        while idle:
            connection = idle.pop()
            if connection.state == _IDLE and connection.transport is not None:
                return connection.request(data).addErrback(self._send_again, connection, data)
        return self._connect_and_send(origin, data)

    def _connect_and_send(self, origin: Origin, data: bytes) -> Deferred[Response]:
        connecting: Deferred[Any] = origin.endpoint.connect(_ConnectionFactory(self, origin))
        return connecting.addCallback(_send, data)

    def _send_again(
        self, failure: Failure, connection: BackendConnection, data: bytes
    ) -> Deferred[Response]:
        """A kept connection ended before a byte of its answer: once more on a new connection.

        Anything else (part of an answer, a malformed one, a cancel, a new
        connection failing the same way) fails as it came.
        """
        if connection.answer_started or self._closed or not failure.check(ResponseNeverReceived):
            return fail(failure)
        origin = connection.origin
        log.debug(
            "backend {backend}: a kept connection closed before an answer;"
            " sending the request again on a new one",
            backend=origin.name,
        )
        return self._connect_and_send(origin, data)

    def put(self, connection: BackendConnection) -> None:
        """A connection whose answer is over: keep it for the next request, or close it."""
        idle = connection.origin.idle
        if self._closed or len(idle) >= MAX_IDLE_PER_ORIGIN:
            connection.abort()
            return
        connection.idle_since = self.clock.seconds()
        idle.append(connection)
        if self._sweep is None:
            self._sweep = self.clock.callLater(self.idle_seconds, self._close_unused)

    def forget(self, connection: BackendConnection) -> None:
        """An idle connection closed: out of its idle list."""
        try:
            connection.origin.idle.remove(connection)
        except ValueError:
            pass

    def _close_unused(self) -> None:
        self._sweep = None
        cutoff = self.clock.seconds() - self.idle_seconds
        waiting = False
        for origin in self._origins.values():
            for connection in [c for c in origin.idle if c.idle_since <= cutoff]:
                connection.abort()
            waiting = waiting or bool(origin.idle)
        if waiting:
            self._sweep = self.clock.callLater(self.idle_seconds / 2, self._close_unused)

    def idle_count(self) -> int:
        """How many idle connections are kept (for tests)."""
        return sum(len(o.idle) for o in self._origins.values())

    def close(self) -> Deferred[None]:
        """Close every idle connection, and each busy one when its answer is over (stop)."""
        self._closed = True
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        for origin in self._origins.values():
            for connection in list(origin.idle):
                connection.abort()
        return succeed(None)


def _send(connection: BackendConnection, data: bytes) -> Deferred[Response]:
    return connection.request(data)
