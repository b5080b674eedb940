"""The HTTP server layer: site, channel, request limits, and the exchange of each inference request.

Every inference request is one :class:`Exchange`: the server layer creates it
when the request has arrived, hands it to a handler, writes the outcome the
handler returns (a :class:`Reply`, or a :class:`Stream` to relay), and closes
its :class:`~nexus.tracking.RequestRecord` exactly once: when the last byte
was written, or as 499 when the client left first. Handlers never write to
the request themselves, so data flows one way: server -> API -> router ->
proxy -> outcome -> server -> metrics.

Requests refused before they were read (body too large, too slow, malformed)
are answered here with the contract's JSON errors and, when they were for an
inference path, recorded too.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

from nexus._twisted import BadRequestChannel, header_name, read_now, send_now
from nexus.config import ServerConfig
from nexus.errors import GatewayError, InvalidRequest, PayloadTooLarge, RequestTimeout
from nexus.tracking import CLIENT_CLOSED, RequestRecord

log = Logger()
#: Requests other than inference requests (debug level only).
access_log = Logger(namespace="nexus.access")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: Raw response headers: (name, values) pairs, applied in order (a later name replaces).
RawHeaders = Sequence[tuple[bytes, Sequence[bytes]]]

_JSON_TYPE: tuple[bytes, Sequence[bytes]] = (b"content-type", [b"application/json"])


@attrs.frozen
class Reply:
    """A whole response: status, headers and body, written at once."""

    status: int
    body: bytes
    headers: RawHeaders = ()
    #: The ``nexus_errors_total`` type this answer counts as (None: not an error).
    error_type: str | None = None
    #: What went wrong, for the request log (None: not an error).
    error_message: str | None = None

    @classmethod
    def error(cls, error: GatewayError, headers: RawHeaders = ()) -> Reply:
        """The contract's JSON error body for ``error``."""
        own = [(name, [value]) for name, value in error.headers]
        return cls(
            error.status,
            error.to_json(),
            [_JSON_TYPE, *own, *headers],
            error.error_type,
            error.message,
        )


class StreamBody(Protocol):
    """A body written as it arrives (an upstream SSE relay)."""

    def write_to(self, consumer: IConsumer) -> Deferred[None]:
        """Write everything to ``consumer``; fires when the body is complete.

        Cancelling the Deferred (the client left) stops the source at once.
        """

    def stop(self) -> None:
        """Drop the body without writing it (the client left before it started)."""


@attrs.frozen
class Stream:
    """A response whose body is relayed as it comes: status and headers first."""

    status: int
    headers: RawHeaders
    body: StreamBody


#: What an inference handler returns.
Outcome = Reply | Stream

#: An inference handler: the exchange in, its outcome out (GatewayError for a failure).
Handler = Callable[["Exchange"], Awaitable[Outcome]]

#: Receives every finished request's record, once.
Recorder = Callable[[RequestRecord], None]

#: The longest ``x-request-id`` a client may choose.
MAX_REQUEST_ID = 128


def request_id_from(values: Sequence[bytes] | None) -> str:
    """The client's ``x-request-id`` when it is 1-128 visible ASCII characters, else a new id.

    A new id is 32 hex digits. An invalid client value is replaced, never echoed
    or logged: it could carry anything (control characters, a megabyte).
    """
    if values is not None and len(values) == 1:
        value = values[0]
        if 0 < len(value) <= MAX_REQUEST_ID and value.isascii():
            text = value.decode("ascii")
            if text.isprintable() and " " not in text:
                return text
    return os.urandom(16).hex()


def record_to(recorders: Sequence[Recorder], record: RequestRecord) -> None:
    """Hand a finished record to every recorder; a failing one is logged, never raised."""
    for recorder in recorders:
        try:
            recorder(record)
        except Exception:
            log.failure("recording a request failed")


class Exchange:
    """One inference request, from its arrival to its record.

    Holds the request, its record and the handler's task; writes the
    handler's outcome; closes the record once (``close``) and then calls the
    ``on_close`` callbacks (admission uses them to count requests in flight).
    """

    __slots__ = ("_task", "gone", "on_close", "record", "request", "site")

    def __init__(self, request: NexusRequest, site: NexusSite) -> None:
        self.request = request
        self.site = site
        self.record = RequestRecord(
            started=site.now(),
            request_id=request_id_from(request.requestHeaders.getRawHeaders(b"x-request-id")),
            client=_host(request),
            worker=site.worker,
        )
        #: The client went away before the response was finished.
        self.gone = False
        self.on_close: list[Callable[[Exchange], None]] = []
        self._task: Deferred[None] | None = None

    @property
    def body(self) -> bytes:
        """The request body (read whole by the server layer, within the size limit)."""
        content = self.request.content
        if content is None:
            return b""
        content.seek(0)
        return content.read()

    def header(self, name: bytes) -> list[bytes] | None:
        """The raw values of request header ``name``, or None."""
        return self.request.requestHeaders.getRawHeaders(name)  # type: ignore[return-value]

    @property
    def authorization(self) -> list[bytes] | None:
        """The raw ``Authorization`` header values."""
        return self.header(b"authorization")

    def serve(self, handler: Handler) -> None:
        """Run ``handler`` and write its outcome; cancelled when the client leaves.

        Once the handler waits (for a backend), the records earlier answers
        left are written: see ``NexusSite.finished``.
        """
        task = Deferred.fromCoroutine(self._serve(handler))
        if not task.called:
            self._task = task
            task.addBoth(self._done)
        self.site.write_records()

    def _done(self, result: object) -> None:
        self._task = None  # the task's frame referred to this exchange: no cycle left
        if isinstance(result, Failure) and not result.check(CancelledError):
            log.failure("serving an exchange failed", result)

    async def _serve(self, handler: Handler) -> None:
        try:
            outcome = await handler(self)
        except CancelledError:
            return  # the client left: nothing to answer, the record says 499
        except GatewayError as error:
            outcome = Reply.error(error)
        except Exception:
            # A bug must still answer like the contract says and be counted.
            log.failure("unexpected error serving {path}", path=self.request.path)
            outcome = Reply.error(GatewayError("Internal gateway error."))
        if self.gone:
            if isinstance(outcome, Stream):
                outcome.body.stop()
            return
        request = self.request
        request_id = (b"x-request-id", [self.record.request_id.encode()])
        if isinstance(outcome, Reply):
            if outcome.error_type is not None:
                self.record.error_type = outcome.error_type
                self.record.error_message = outcome.error_message
            request.send_whole(outcome.status, [request_id, *outcome.headers], outcome.body)
            return
        request.start_stream(outcome.status, [request_id, *outcome.headers])
        try:
            await outcome.body.write_to(request)
        except CancelledError:
            return
        except Exception:
            log.failure("relaying a stream failed")
        if not self.gone:
            request.finish()

    def close(self, status: int) -> None:
        """The response is over: close the record once (the site writes it), run ``on_close``."""
        if not self.record.finish(status, self.site.now()):
            return
        # Break the request <-> exchange cycle now, so that reference counting frees
        # both (the cycle collector would otherwise, later and at a cost per request).
        self.request.exchange = None
        self.site.finished(self.record)
        for callback in self.on_close:
            callback(self)

    def lost(self) -> None:
        """The client went away before the last byte: recorded as 499, handler cancelled."""
        self.gone = True
        record = self.record
        if not record.finished:
            record.client_gone = True
            record.error_type = "client_disconnect"
            record.error_message = "The client closed the connection before the response ended."
            self.close(CLIENT_CLOSED)
        task = self._task
        if task is not None and not task.called:
            task.cancel()

    def abort(self) -> bool:
        """Cut the client's connection (shutdown after the grace period); False if gone."""
        channel = self.request.channel
        transport = channel.transport if channel is not None else None
        if transport is None:
            return False
        transport.abortConnection()  # type: ignore[attr-defined]
        return True


#: The second ``http_date`` last formatted, and its text.
_date: tuple[int, bytes] = (-1, b"")


def http_date() -> bytes:
    """Now as a ``Date`` header's value (Twisted's format), formatted once a second."""
    global _date
    second = int(time.time())
    if _date[0] != second:
        _date = (second, datetimeToString(second))
    return _date[1]


def head_parts(
    status_line: bytes, fields: Iterable[tuple[bytes, Sequence[bytes]]]
) -> list[bytes]:
    """A response head as pieces to join: the status line, a line per value, the blank line."""
    parts = [status_line, b"\r\n"]
    for name, values in fields:
        for value in values:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return parts


def _host(request: Request) -> str | None:
    address = request.getClientAddress()
    return getattr(address, "host", None)


def error_response(request: Request, error: GatewayError) -> bytes:
    """Set ``error``'s status and headers on ``request``; return its JSON body."""
    body = error.to_json()
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    for name, value in error.headers:
        request.setHeader(name, value)
    return body


class NexusRequest(Request):
    """A request with the gateway's limits, and the exchange it carries when it is an inference.

    As soon as the declared length (or, for a chunked body, the bytes received
    so far) exceeds ``site.max_body_bytes``, the gateway answers 413 and closes
    the connection instead of buffering the rest. A request whose headers and
    body have not all arrived within ``site.request_timeout`` (a slow-loris
    client) gets 408 and is closed.
    """

    channel: NexusChannel
    _rejected = False
    _received = 0
    #: Set by ``begin_exchange`` for an inference request.
    exchange: Exchange | None = None
    #: Armed only for a request still incomplete after a read (``watch_read``).
    _read_deadline: IDelayedCall | None = None
    #: Headers and body are in (the read deadline no longer applies).
    _read_done = False
    #: A stream's head, waiting for the first piece of its body (``start_stream``).
    _held_head: bytes | None = None

    def __init__(self, channel: NexusChannel, *args: Any, **kwargs: Any) -> None:
        # The gateway never reads form posts: skip Twisted's Content-Type parsing of every POST.
        super().__init__(channel, *args, parsePOSTFormSubmission=False, **kwargs)
        self.nexus_site = site = channel.site
        self._read_started = site.reactor.seconds()

    def watch_read(self) -> None:
        """Start the read deadline of a request a read left incomplete (once).

        Most requests arrive whole in one read: a timer for each would be set
        and cancelled in the same turn of the reactor, for nothing.
        """
        if self._read_done or self._rejected or self._read_deadline is not None:
            return
        site = self.nexus_site
        left = self._read_started + site.request_timeout - site.reactor.seconds()
        self._read_deadline = site.reactor.callLater(max(left, 0.0), self._too_slow)

    def send_whole(self, status: int, headers: RawHeaders, body: bytes) -> None:
        """Write a whole answer in one piece (status line, headers, body), then finish.

        What ``setResponseCode``, ``setRawHeaders``, ``write`` and ``finish``
        would send, without a header object per name and a write of thirty
        small pieces: an answer already in memory is most of the gateway's
        traffic. ``headers`` come after the ones Twisted set (``Date``, and
        ``Connection: close`` when the connection ends), a name replacing
        an earlier one. Their values must not hold CR or LF: the gateway's
        own are built so, a backend's are cleaned by ``nexus.http_client``.
        """
        channel = self.channel
        if channel is None or self.startedWriting or self.finished:
            return  # the client is gone (the record says 499), or this is a bug: never twice
        bodiless = status in NO_BODY_CODES or self.method == b"HEAD"
        lines = self._head_lines(status, headers, bool(body) and not bodiless)
        if status != 204:  # RFC 9110 section 8.6: never on a 204
            lines[b"Content-Length"] = [b"%d" % len(body)]
        parts = self._head(status, lines)
        if not bodiless:
            parts.append(body)
            self.sentLength = len(body)
        self.startedWriting = 1
        channel.write(b"".join(parts))
        self.finish()

    def start_stream(self, status: int, headers: RawHeaders) -> None:
        """Begin an answer whose body is written in pieces (a relayed stream).

        The head is what ``setResponseCode``, ``setRawHeaders`` and the first
        ``write`` would send (chunked to an HTTP/1.1 client, as Twisted
        does), built at once like ``send_whole``'s; it is held until the
        first piece of the body, so that both leave in one packet (or until
        ``finish``, for a body that ends empty).
        """
        if self.channel is None or self.startedWriting or self.finished:
            return  # the client is gone (the record says 499)
        # A relayed stream always has a body: a POST's answer, never a 204 or 304.
        lines = self._head_lines(status, headers, typed=True)
        if self.clientproto == b"HTTP/1.1":
            lines[b"Transfer-Encoding"] = [b"chunked"]
            self.chunked = 1
        self.startedWriting = 1
        self._held_head = b"".join(self._head(status, lines))

    def _head_lines(
        self, status: int, headers: RawHeaders, typed: bool
    ) -> dict[bytes, Sequence[bytes]]:
        """The head's fields: Twisted's (``Date``, ``Connection: close``), then ``headers``.

        A later name replaces an earlier one; with ``typed``, a ``Content-Type``
        is added when none was given (twisted.web's default).
        """
        self.setResponseCode(status)
        lines: dict[bytes, Sequence[bytes]] = dict(self.responseHeaders.getAllRawHeaders())
        for name, values in headers:
            lines[header_name(name)] = values
        default_type = self.defaultContentType
        if typed and b"Content-Type" not in lines and default_type is not None:
            lines[b"Content-Type"] = [default_type]
        return lines

    def _head(self, status: int, lines: dict[bytes, Sequence[bytes]]) -> list[bytes]:
        status_line = b"%s %d %s" % (self.clientproto, status, self.code_message)
        return head_parts(status_line, lines.items())

    def write(self, data: bytes) -> None:
        head = self._held_head
        if head is None:
            super().write(data)
            return
        # The first piece of a stream: it leaves with the head (start_stream).
        if self.finished:
            raise RuntimeError("Request.write called on a request after Request.finish was called.")
        if self._disconnected:
            return
        self._held_head = None
        self.sentLength += len(data)
        if data and self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.channel.write(head + data)

    def begin_exchange(self) -> Exchange:
        """Start the exchange of this inference request (its record starts now)."""
        exchange = self.exchange = Exchange(self, self.nexus_site)
        return exchange

    def process(self) -> None:
        """An inference ``POST`` goes straight to its handler; anything else as Twisted would.

        For a path that names its handler, Twisted's ``process`` would set a
        ``Server`` header (only to have ``render`` remove it), format the date
        anew, unquote the path and walk the resource tree.
        """
        site = self.nexus_site
        handler = site.inference.get(self.path) if self.method == b"POST" else None
        if handler is None:
            super().process()
            return
        self.site = site
        self.responseHeaders.setRawHeaders(b"date", [http_date()])
        try:
            self.begin_exchange().serve(handler)
        except BaseException:
            self.processingFailed(Failure())

    def render(self, resrc: Any) -> None:
        # No "Server: TwistedWeb/<version>" (set by Request.process): it only helps attackers.
        self.responseHeaders.removeHeader(b"server")
        super().render(resrc)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.nexus_site.max_body_bytes:
            self._reject_too_large()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self.nexus_site.max_body_bytes:
            self._reject_too_large()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._read_done = True
        self._cancel_read_deadline()
        if self._rejected:
            return
        super().requestReceived(command, path, version)

    def finish(self) -> None:
        if self._held_head is not None and not self._disconnected:
            self.write(b"")  # a stream that ended before a byte of its body: its head
        super().finish()
        exchange = self.exchange
        if exchange is not None:
            exchange.close(self.code)

    def connectionLost(self, reason: Any) -> None:
        self._cancel_read_deadline()
        super().connectionLost(reason)
        exchange = self.exchange
        if exchange is not None:
            exchange.lost()

    def _cancel_read_deadline(self) -> None:
        deadline = self._read_deadline
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _reject_too_large(self) -> None:
        limit = self.nexus_site.max_body_bytes
        self._reject(413, b"Payload Too Large",
                     PayloadTooLarge(f"The request body exceeds {limit} bytes."))

    def _too_slow(self) -> None:
        self._reject(408, b"Request Timeout",
                     RequestTimeout("The request was not received in time."))

    def _reject(self, status: int, phrase: bytes, error: GatewayError) -> None:
        """Answer before the request was read, close the connection, count it."""
        if self._rejected:
            return
        self._rejected = True
        self._cancel_read_deadline()
        request_id = request_id_from(self.requestHeaders.getRawHeaders(b"x-request-id"))
        self.channel.refuse(status, phrase, error, request_id)


#: The longest a finished request's record waits to be written (``NexusSite.finished``).
RECORD_DELAY = 0.001

#: How long a refused client may go on sending before its connection is cut.
LINGER_SECONDS = 2.0


class NexusChannel(BadRequestChannel):
    """HTTP/1.1 channel whose early refusals are OpenAI-style errors, counted when due."""

    site: NexusSite  # set by Site.buildProtocol
    _refusing = False
    _linger: IDelayedCall | None = None
    _host: Any = None
    _peer: Any = None

    def bad_request(self) -> None:
        self.refuse(400, b"Bad Request", InvalidRequest(
            "Malformed request, or request line and headers over the size or count limit."
        ), request_id_from(None))

    def refuse(self, status: int, phrase: bytes, error: GatewayError, request_id: str) -> None:
        """Answer a request the gateway will not read, count it, close the connection.

        What the client is still sending is read and dropped until it closes or
        LINGER_SECONDS pass: closing a socket with unread bytes makes the kernel
        send a reset, which can destroy the answer before the client reads it.
        """
        transport = self.transport
        if transport is None or self._refusing:
            return
        self._refusing = True
        body = error.to_json()
        transport.write(
            b"HTTP/1.1 %d %s\r\n"
            b"Content-Type: application/json\r\n"
            b"X-Request-Id: %s\r\n"
            b"Connection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (status, phrase, request_id.encode(), len(body), body)
        )
        self.setTimeout(None)
        transport.loseWriteConnection()  # type: ignore[attr-defined]
        self._linger = self.site.reactor.callLater(
            LINGER_SECONDS, transport.abortConnection  # type: ignore[attr-defined]
        )
        peer = getattr(transport.getPeer(), "host", None)
        self.site.record_refused(self.pending_path(), status, error, request_id, peer)

    # Once refused, whatever the client still sends (more lines in the same read
    # included) is read and dropped.

    def dataReceived(self, data: bytes) -> None:
        if not self._refusing:
            site = self.site
            if self.whole_request(data, site.inference, site.max_body_bytes):
                return
            super().dataReceived(data)
            requests = self.requests
            if requests:  # the request being read, when this read did not complete it
                requests[-1].watch_read()

    def lineReceived(self, line: bytes) -> None:
        if not self._refusing:
            super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refusing:
            super().rawDataReceived(data)

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)
        # Twisted's HTTPChannel.connectionMade has set TCP_NODELAY (send_now relies on it).
        read_now(self.transport)  # the request is usually there already

    # Every request asks for both addresses (twisted.web's Request.__init__); a
    # connection's never change: one getsockname() call and one address object each.

    def getHost(self) -> Any:
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def getPeer(self) -> Any:
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()
        return peer

    # What requests write to the client is sent at once, not at the reactor's next turn.

    def writeHeaders(
        self, version: bytes, code: bytes, reason: bytes, headers: Headers
    ) -> None:
        # Twisted's own head (a stream's), but through send_now.
        status_line = b"%s %s %s" % (version, code, reason)
        send_now(self.transport, b"".join(head_parts(status_line, headers.getAllRawHeaders())))

    def write(self, data: bytes) -> None:
        send_now(self.transport, data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        send_now(self.transport, b"".join(iovec))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        super().connectionLost(reason)
        self.site.channel_closed(self)


class NexusSite(Site):
    """The gateway's site: request limits, the recorder of inference requests, no access log."""

    requestFactory = NexusRequest
    # A plain HTTP/1.1 channel: the gateway speaks no TLS, so no HTTP/2 negotiation wrapper.
    protocol = NexusChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Any,
        server: ServerConfig,
        recorders: Sequence[Recorder],
        inference: Mapping[bytes, Handler],
        now: Callable[[], float],
        reactor: Any,
        debug_access: bool = False,
    ) -> None:
        super().__init__(resource, reactor=reactor, timeout=server.idle_timeout_seconds)
        self.max_body_bytes = server.max_body_bytes
        self.request_timeout = server.request_timeout_seconds
        self.max_headers = server.max_headers
        self.max_header_bytes = server.max_header_bytes
        #: Every finished inference request's record goes to each (metrics, request log).
        self.recorders = tuple(recorders)
        #: The handler of each inference path (``NexusRequest.process``).
        self.inference = inference
        #: Log every other request at debug (``[logging] level = "debug"``).
        self.debug_access = debug_access
        self.now = now
        self.noisy = False
        #: The worker number in worker mode (contract section 12), else None.
        self.worker: int | None = None
        #: Open client connections.
        self.channels: set[NexusChannel] = set()
        self._all_closed: list[Deferred[None]] = []
        #: Finished records not yet handed to the recorders (``finished``).
        self._unrecorded: list[RequestRecord] = []
        self._record_timer: IDelayedCall | None = None

    def finished(self, record: RequestRecord) -> None:
        """Take a finished request's record: written while the gateway next waits.

        The record is complete (its status, end time and outcome are fixed);
        what is left is bookkeeping: metrics, the history, the log line, the
        dashboard. Done at once, it would sit in the next request's path
        whenever that request comes within the time it takes (a client
        sending requests one after another: ~20 % of the gateway's work
        per request). So records wait for the moment the gateway has sent a
        request upstream and waits for the answer (``Exchange.serve``), or
        ``RECORD_DELAY`` at most, and every read of the numbers writes them
        first (``write_records``, via ``NexusAPI.synced``): a scrape after
        M finished requests still shows exactly M.
        """
        waiting = self._unrecorded
        if not waiting:
            timer = self._record_timer
            if timer is None or not timer.active():
                self._record_timer = self.reactor.callLater(RECORD_DELAY, self.write_records)
        waiting.append(record)

    def write_records(self) -> None:
        """Hand every record not written yet to the recorders, in the order they finished."""
        waiting = self._unrecorded
        if not waiting:
            return
        self._unrecorded = []
        timer = self._record_timer
        if timer is not None and timer.active():
            timer.cancel()
        self._record_timer = None
        recorders = self.recorders
        for record in waiting:
            record_to(recorders, record)

    def synced(self) -> Deferred[None]:
        """Fires when the numbers include every request finished before now (one process)."""
        self.write_records()
        return succeed(None)

    def channel_closed(self, channel: NexusChannel) -> None:
        """A client connection is gone."""
        self.channels.discard(channel)
        if not self.channels:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                if not d.called:  # not cancelled
                    d.callback(None)

    def close_connections(self) -> Deferred[None]:
        """Close every client connection once what was written to it is sent.

        The gateway stops after its requests are over; without this, the
        reactor's shutdown would drop the last bytes still in a socket's
        buffer (the end of the last streams). Fires when all are closed.
        """
        if not self.channels:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._all_closed.append(d)
        for channel in list(self.channels):
            if channel.transport is not None:
                channel.transport.loseConnection()
        return d

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.maxHeaders = self.max_headers
        channel.totalHeadersSize = self.max_header_bytes
        channel.MAX_LENGTH = self.max_header_bytes
        return channel

    def record_refused(
        self, path: bytes, status: int, error: GatewayError, request_id: str, client: str | None
    ) -> None:
        """Record an inference request answered before it reached a handler."""
        if path not in self.inference:
            return
        record = RequestRecord(
            started=self.now(),
            request_id=request_id,
            client=client,
            worker=self.worker,
            error_type=error.error_type,
            error_message=error.message,
        )
        record.finish(status, self.now())
        self.finished(record)

    def log(self, request: Any) -> None:
        """Other requests (scrapes, health checks, models) at debug level only.

        Inference requests have their own event in the request log; a scrape every
        15 s must not flood the log at ``info``.
        """
        if self.debug_access and request.path not in self.inference:
            access_log.debug(
                "{method} {path} {code}",
                method=request.method.decode("ascii", "replace"),
                path=_CONTROL.sub(" ", request.path.decode("utf-8", "replace")),
                code=request.code,
            )
