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
"""

from __future__ import annotations

from typing import Any

from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import _nameEncoder


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

    def pending_path(self) -> bytes:
        """The path (no query) of the request being received, before its body is complete.

        Empty when no request line has been parsed (or it was unparsable).
        """
        path = getattr(self, "_path", None)
        return path.split(b"?", 1)[0] if isinstance(path, bytes) else b""
