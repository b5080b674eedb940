"""Every place where Nexus relies on a private part of Twisted, in one module.

Each adaptation names what it depends on; ``tests/test_twisted_adaptations.py``
pins every one of them, so a Twisted upgrade that changes one fails a test
here instead of misbehaving in production.

- ``QuietPool``: ``HTTPConnectionPool._factory`` and ``_putConnection`` (no
  log line per connection; never pool a connection that is closing), and
  ``_HTTP11ClientFactory._quiescentCallback`` (to build our client protocol).
- ``ClientProtocol``: ``HTTP11ClientProtocol._parser.connHeaders`` (the
  backend's ``Connection`` header, which Twisted keeps out of
  ``response.headers``).
- ``BadRequestChannel``: ``HTTPChannel._respondToBadRequestAndDisconnect``
  (the hook Twisted calls for a malformed request) and ``HTTPChannel._path``
  (the path of a request whose body has not arrived yet).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IResponse


def connection_header_names(response: IResponse) -> frozenset[bytes]:
    """The header names a backend listed in its ``Connection`` header (lower case).

    They are hop-by-hop for this one connection (RFC 9110 section 7.6.1) and
    must not be relayed. Empty for a response that did not come through
    ``ClientProtocol``.
    """
    return getattr(response, "nexus_connection_names", frozenset())


def _names(values: Sequence[bytes]) -> frozenset[bytes]:
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )


class ClientProtocol(HTTP11ClientProtocol):
    """Twisted's HTTP/1.1 client protocol, keeping the backend's ``Connection`` header.

    Twisted parses ``Connection`` into the parser's ``connHeaders`` and never
    shows it on the response; the names it lists are kept on the response as
    ``nexus_connection_names`` (read with ``connection_header_names``).
    """

    def request(self, request: Any) -> Deferred[Any]:
        d: Deferred[Any] = super().request(request)
        return d.addCallback(self._keep_connection_names)

    def _keep_connection_names(self, response: Any) -> Any:
        parser = self._parser
        if parser is not None:
            values = parser.connHeaders.getRawHeaders(b"connection")
            if values:
                response.nexus_connection_names = _names(values)
        return response


class _ClientFactory(_HTTP11ClientFactory):
    """Twisted's per-connection client factory: our protocol, no log line per connection."""

    noisy = False

    def buildProtocol(self, addr: Any) -> ClientProtocol:
        return ClientProtocol(self._quiescentCallback)


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

    def pending_path(self) -> bytes:
        """The path (no query) of the request being received, before its body is complete.

        Empty when no request line has been parsed (or it was unparsable).
        """
        path = getattr(self, "_path", None)
        return path.split(b"?", 1)[0] if isinstance(path, bytes) else b""
