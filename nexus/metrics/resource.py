"""``GET /metrics`` and ``GET /v1/stats`` as plain twisted.web resources.

Both answer GET and HEAD; any other method gets a 405 OpenAI-style error. A
rendering failure is logged and answered with a 500 error body: a broken scrape
must never take the gateway down.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from nexus.errors import GatewayError, MethodNotAllowed
from nexus.metrics.collector import MetricsCollector
from nexus.metrics.exposition import (
    CONTENT_TYPE_OPENMETRICS,
    CONTENT_TYPE_TEXT,
    gzip_accepted,
    wants_openmetrics,
)

_JSON = b"application/json"
_ALLOWED = (b"GET", b"HEAD")


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


class _ReadOnlyResource(Resource):
    """A leaf answering GET and HEAD with a body from :meth:`body`."""

    isLeaf = True
    _log = Logger()

    def __init__(self, collector: MetricsCollector) -> None:
        super().__init__()
        self.collector = collector

    def body(self, request: Request) -> bytes:
        """The response body; set any headers it needs on ``request``."""
        raise NotImplementedError

    def render(self, request: Request) -> bytes:
        """Dispatch on the method; never let a rendering error escape."""
        method = request.method
        if method not in _ALLOWED:
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", _JSON)
            path = request.path.decode("latin-1")
            verb = method.decode("latin-1")
            return MethodNotAllowed(f"Method {verb} is not allowed on {path}; use GET.").to_json()
        try:
            body = self.body(request)
        except Exception:
            self._log.failure("Rendering {path} failed", path=request.path.decode("latin-1"))
            request.setResponseCode(500)
            request.responseHeaders.removeHeader(b"content-encoding")
            request.setHeader(b"content-type", _JSON)
            return GatewayError("Internal error while rendering metrics.").to_json()
        if method == b"HEAD":
            # Twisted sends no body for HEAD; the length is the GET body's.
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        return body


class MetricsResource(_ReadOnlyResource):
    """``/metrics``: Prometheus text, or OpenMetrics when asked; gzip when accepted."""

    def body(self, request: Request) -> bytes:
        """Negotiate the format and encoding, then render."""
        openmetrics = wants_openmetrics(_header(request, b"accept"))
        gzip = gzip_accepted(_header(request, b"accept-encoding"))
        body = self.collector.render(openmetrics=openmetrics, gzip=gzip)
        request.setHeader(
            b"content-type", CONTENT_TYPE_OPENMETRICS if openmetrics else CONTENT_TYPE_TEXT
        )
        request.setHeader(b"vary", b"Accept, Accept-Encoding")
        if gzip:
            request.setHeader(b"content-encoding", b"gzip")
        return body


class StatsResource(_ReadOnlyResource):
    """``/v1/stats``: the same numbers as JSON."""

    def body(self, request: Request) -> bytes:
        """Render the stats document."""
        body = self.collector.stats_json()
        request.setHeader(b"content-type", _JSON)
        return body
