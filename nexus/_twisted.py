"""Every place where Nexus relies on a private part of Twisted, in one module.

Each adaptation names what it depends on; ``tests/test_twisted_adaptations.py``
pins every one of them, so a Twisted upgrade that changes one fails a test
here instead of misbehaving in production.

- ``QuietPool`` (the health poller's pool): ``HTTPConnectionPool._factory``
  and ``_putConnection`` (no log line per connection; never pool a connection
  that is closing).
- ``header_name``: ``twisted.web.http_headers._nameEncoder`` (Twisted's
  Header-Case for a name, with its bounded cache), so an answer written in one
  piece (``NexusRequest.send_whole``) names headers as Twisted would.
- ``BadRequestChannel``: ``HTTPChannel._respondToBadRequestAndDisconnect``
  (the hook Twisted calls for a malformed request) and ``HTTPChannel._path``
  (the path of a request whose body has not arrived yet).
- ``BadRequestChannel.whole_request``: the state ``HTTPChannel`` keeps
  between requests (``__first_line``, ``__header``, ``length``,
  ``_transferDecoder``, ``_handlingRequest``, ``_savedTimeOut``, ``persistent``)
  and ``LineReceiver``'s (``_buffer``, ``_busyReceiving``, ``paused``,
  ``line_mode``), to take a plain request that came whole in one read the way
  ``HTTPChannel`` would, without its line-by-line parsing.
- ``read_now``: only public API (``IReadDescriptor.doRead``, what the
  reactor itself calls on a readable connection), listed here because it
  calls it outside the reactor's loop.
- ``send_now``: a TCP transport's write buffer (``dataBuffer``,
  ``_tempDataLen``, ``_writeDisconnected``) and ``writeSomeData``, to send
  at once what nothing is queued before (``no_delay``, its companion, uses
  only public API).
"""

from __future__ import annotations

import re
from collections.abc import Container
from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import _nameEncoder
from twisted.web.iweb import INonQueuedRequestFactory

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9a-z]+"
#: Lower-case header names (RFC 9110 tokens), one per line.
_NAMES = re.compile(_TOKEN + rb"(?:\n" + _TOKEN + rb")*")
#: Headers that make ``whole_request`` leave a request to Twisted's own parsing.
_LEFT_TO_TWISTED = frozenset({b"transfer-encoding", b"expect", b"cookie"})


_log = Logger()

#: The transports ``send_now`` can write to directly: plain TCP, both sides.
_SOCKETS = (tcp.Server, tcp.Client)


def send_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but what the socket takes is sent before this returns.

    Twisted's ``write`` only queues: the bytes leave on the reactor's next
    turn, after everything the current one still has to do (for a finished
    answer: its record, metrics, log line; for a request sent upstream: the
    rest of the handler). On a plain TCP connection with nothing queued, the
    bytes are sent at once, which takes that work out of the client's wait
    and saves the reactor two ``epoll_ctl`` calls; whatever the socket does
    not take, and anything on another transport (TLS, a test's), is queued by
    ``write`` as always, so the order of bytes never changes. A connection
    that is closing or lost is left to ``write`` too.
    """
    if (
        type(transport) in _SOCKETS
        and not transport.dataBuffer
        and not transport._tempDataLen
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
        # Else the connection is lost: write() queues, and the reactor's next
        # write finds the loss and ends the connection the usual way.
    transport.write(data)


def read_now(transport: Any) -> None:
    """Read what a new TCP connection already holds, not at the reactor's next turn.

    Nearly every HTTP client sends its request as soon as it has connected,
    so a connection the gateway accepts usually has its request waiting:
    read at once, it skips a round of the reactor (an ``epoll_wait`` and the
    dispatch to the connection; ~0.1 ms on a small VM). Nothing there yet: one
    ``recv`` that would block, and the reactor reads when data comes. A
    connection already over (end of file, a reset) is left for the reactor to
    find on its next turn, as it would have. A bug in the protocol is logged
    and its connection cut, as the reactor does.
    """
    if type(transport) is not tcp.Server or not transport.connected or transport.disconnecting:
        return
    try:
        transport.doRead()
    except Exception:
        _log.failure("reading a new connection failed")
        transport.abortConnection()


def no_delay(transport: Any) -> None:
    """Turn Nagle's algorithm off where the transport has the switch (TCP; public API).

    It goes with ``send_now``: with small writes sent at once, one (a stream's
    event, a head before its first event) must not wait for the peer's ACK of
    the last.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


def header_name(name: bytes) -> bytes:
    """``name`` as Twisted writes it in a response: ``content-type`` -> ``Content-Type``.

    Raises ``InvalidHeaderName`` for a name that is not an HTTP token.
    """
    return _nameEncoder.encode(name)


class _ClientFactory(_HTTP11ClientFactory):
    """Twisted's per-connection client factory, without a log line per connection."""

    noisy = False


class QuietPool(HTTPConnectionPool):
    """A connection pool that never keeps a connection that is already being closed."""

    _factory = _ClientFactory

    def _putConnection(self, key: Any, connection: Any) -> None:
        transport = connection.transport
        if transport is None or transport.disconnecting:
            # A body protocol stopped it (stopProducing) while the response finished in
            # the same read: reusing it would fail the next request.
            return
        super()._putConnection(key, connection)


class BadRequestChannel(HTTPChannel):
    """An HTTP channel that lets a subclass answer malformed requests itself.

    Twisted answers a malformed request line, too many or too large headers
    with a bare ``400`` from ``_respondToBadRequestAndDisconnect``;
    ``bad_request`` replaces that answer. ``LineReceiver`` drops an
    over-long line without a word: that is a bad request too.
    """

    def bad_request(self) -> None:
        """Answer a request Twisted could not parse; the default is Twisted's own."""
        HTTPChannel._respondToBadRequestAndDisconnect(self)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.bad_request()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.bad_request()

    def whole_request(self, data: bytes, paths: Container[bytes], max_body: int) -> bool:
        """Take ``data`` as one whole ``POST`` to one of ``paths``, if it is a plain one.

        Twisted's channel parses a request line by line (a method call per
        header, the request line checked character by character): about a
        quarter of the gateway's own CPU per request. Most inference requests
        come whole in one read from a well-behaved client: a request line, a
        few headers, a ``Content-Length`` body. Such a request is handed to
        the request object exactly as ``HTTPChannel`` would hand it (with
        ``Connection: close`` too: one-shot clients send it); anything else (a
        partial read, chunked bodies, ``Expect``, cookies, a second request
        behind it, a malformed line, a limit reached) returns False,
        untouched, for Twisted to read as always.
        """
        if (
            self._busyReceiving
            or self.paused
            or not self.line_mode
            or self._buffer
            or self.requests
            or not self.persistent
            or self._handlingRequest
            or self._transferDecoder is not None
            or self._HTTPChannel__first_line != 1  # type: ignore[attr-defined]
            or self._HTTPChannel__header  # type: ignore[attr-defined]
            or not data.startswith(b"POST ")
        ):
            return False
        end = data.find(b"\r\n\r\n")
        if end < 0 or end > self.totalHeadersSize:
            return False
        head = data[:end]
        crlf = head.count(b"\r\n")
        if head.count(b"\n") != crlf or head.count(b"\r") != crlf or b"\x00" in head:
            return False  # bare LF or CR, NUL: Twisted's parser decides
        lines = head.split(b"\r\n")
        request_line = lines[0].split(b" ")
        if len(request_line) != 3 or request_line[2] != b"HTTP/1.1":
            return False
        path = request_line[1]
        if path not in paths or len(lines) - 1 > self.maxHeaders:
            return False
        names = []
        values = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                return False
            names.append(name)
            values.append(value.strip(b" \t"))
        lowered = b"\n".join(names).lower()
        if _NAMES.fullmatch(lowered) is None:
            return False
        lowered_names = lowered.split(b"\n")
        if _LEFT_TO_TWISTED.intersection(lowered_names):
            return False  # a header Twisted must see: chunked, Expect, cookies
        try:
            length = values[lowered_names.index(b"content-length")]
        except ValueError:
            return False
        body = data[end + 4 :]
        if (
            lowered_names.count(b"content-length") != 1
            or not length.isdigit()
            or int(length) != len(body)
            or len(body) > max_body
        ):
            return False
        # What HTTPChannel.dataReceived, lineReceived, allHeadersReceived and
        # allContentReceived do for this request.
        self.resetTimeout()
        factory = self.requestFactory
        if INonQueuedRequestFactory.providedBy(factory):
            request = factory(self)
        else:
            request = factory(self, len(self.requests))
        self.requests.append(request)
        add = request.requestHeaders.addRawHeader
        for name, value in zip(names, values, strict=True):
            add(name, value)
        if b"connection" in lowered_names:  # "close": answered, then the connection ends
            self.persistent = self.checkPersistence(request, b"HTTP/1.1")
        request.gotLength(len(body))
        if body:
            request.handleContentChunk(body)
        if self.timeOut:
            self._savedTimeOut = self.setTimeout(None)
        self._handlingRequest = True
        self.setRawMode()
        request.requestReceived(b"POST", path, b"HTTP/1.1")
        return True

    def pending_path(self) -> bytes:
        """The path (no query) of the request being received, before its body is complete.

        Empty when no request line has been parsed (or it was unparsable).
        """
        path = getattr(self, "_path", None)
        return path.split(b"?", 1)[0] if isinstance(path, bytes) else b""
