"""The HTTP API (contract section 1): Klein routes over the gateway's parts.

Klein is the routing layer only; the work happens in ``nexus.proxy``,
``nexus.metrics`` and the registry.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound

from nexus.access import AccessPolicy
from nexus.config import ServerConfig
from nexus.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
)
from nexus.metrics import MetricsCollector, MetricsResource, StatsResource
from nexus.proxy import ChatCompletions
from nexus.registry import HEALTHY, BackendRegistry
from nexus.routing import Router
from nexus.tracking import CLIENT_CLOSED, RequestRecord, track

log = Logger()

CHAT_PATH = b"/v1/chat/completions"

#: Paths whose requests are inference requests, counted in the metrics.
INFERENCE_PATHS = frozenset({CHAT_PATH})


def _json(request: Any, status: int, payload: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(payload).encode("utf-8")


def write_error(request: Any, error: GatewayError) -> bytes:
    """Answer ``error`` as the contract's JSON error body."""
    body = error.to_json()
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


class NexusAPI:
    """The routes of the gateway. ``now`` is a monotonic clock in seconds."""

    app = Klein()

    def __init__(
        self,
        registry: BackendRegistry,
        router: Router,
        chat: ChatCompletions,
        collector: MetricsCollector,
        now: Callable[[], float],
        wall_clock: Callable[[], float],
        access: AccessPolicy | None = None,
        max_concurrent: int = 0,
    ) -> None:
        self.access = access or AccessPolicy()
        self.max_concurrent = max_concurrent
        #: Inference requests in flight (the concurrency limit and the shutdown drain).
        self.active: set[Any] = set()
        self.draining = False
        self._idle_waiters: list[Deferred[None]] = []
        self.registry = registry
        self.router = router
        self.chat = chat
        self.collector = collector
        self.now = now
        self.wall_clock = wall_clock
        self.started = now()
        self.created = int(wall_clock())
        self.metrics_resource = MetricsResource(collector)
        self.stats_resource = StatsResource(collector)

    def render_chat(self, request: Any) -> object:
        """Serve ``POST /v1/chat/completions`` (outside Klein: it is the hot path).

        The handler's Deferred is cancelled when the client goes away (see
        ``NexusRequest.connectionLost``); its result is written when it fires.
        """
        handler = Deferred.fromCoroutine(self.chat_completions(request))
        request.nexus_handler = handler
        handler.addCallbacks(
            _respond, _handler_failed, callbackArgs=(request,), errbackArgs=(request,)
        )
        return NOT_DONE_YET

    async def chat_completions(self, request: Any) -> bytes | None:
        """Proxy one chat completion, recorded exactly once whatever happens."""
        record: RequestRecord = track(request, self.now)
        try:
            self._admit(request)
            self.active.add(request)
            try:
                return await self.chat.handle(request, record)
            finally:
                self._done(request)
        except GatewayError as error:
            record.error_type = error.error_type
            if isinstance(error, Overloaded):
                request.setHeader(b"retry-after", b"1")
            return write_error(request, error)
        except CancelledError:
            raise  # the client left: nothing to answer
        except Exception:
            # A bug must still answer like the contract says and be counted.
            log.failure("unexpected error serving a chat completion")
            record.error_type = "other"
            return write_error(request, GatewayError("Internal gateway error."))

    def _admit(self, request: Any) -> None:
        """Refuse a request that lacks a key, or that the gateway cannot take now."""
        if not self.access.allows_api(request.requestHeaders.getRawHeaders(b"authorization")):
            request.setHeader(b"www-authenticate", b"Bearer")
            raise Unauthorized(
                "Missing or invalid API key; send it as 'Authorization: Bearer <key>'."
            )
        if self.draining:
            raise Overloaded("The gateway is shutting down.")
        if self.max_concurrent and len(self.active) >= self.max_concurrent:
            raise Overloaded(
                f"Too many requests in flight ({self.max_concurrent}); retry shortly."
            )

    def _done(self, request: Any) -> None:
        self.active.discard(request)
        if not self.active:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def wait_idle(self) -> Deferred[None]:
        """Fires once no inference request is in flight."""
        if not self.active:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def cut_active(self) -> int:
        """Close the connections of requests still in flight; returns how many."""
        cut = 0
        for request in list(self.active):
            transport = request.channel.transport if request.channel is not None else None
            if transport is not None:
                transport.abortConnection()
                cut += 1
        return cut

    @app.route("/v1/models", methods=["GET"])
    def models(self, request: Any) -> bytes:
        """Models servable now, plus aliases whose target is servable."""
        if not self.access.allows_api(request.requestHeaders.getRawHeaders(b"authorization")):
            request.setHeader(b"www-authenticate", b"Bearer")
            return write_error(request, Unauthorized("Missing or invalid API key."))
        available = self.registry.available_models()
        entries = {
            model: {
                "id": model,
                "object": "model",
                "created": self.created,
                "owned_by": "nexus",
                "backends": backends,
            }
            for model, backends in available.items()
        }
        for alias in self.registry.aliases:
            if alias in entries:
                continue
            try:
                target = self.router.resolve_alias(alias)
            except Exception:
                continue
            if target in available:
                entries[alias] = {**entries[target], "id": alias, "alias_of": target}
        data = [entries[k] for k in sorted(entries)]
        return _json(request, 200, {"object": "list", "data": data})

    @app.route("/health", methods=["GET"])
    def health(self, request: Any) -> bytes:
        """Gateway and fleet health summary; always 200."""
        counts = self.registry.counts()
        total, healthy = counts["total"], counts[HEALTHY]
        if total and healthy == total:
            status = "healthy"
        elif healthy:
            status = "degraded"
        else:
            status = "unhealthy"
        return _json(
            request,
            200,
            {
                "status": status,
                "uptime_seconds": int(self.now() - self.started),
                "backends": counts,
                "models": len(self.registry.available_models()),
            },
        )

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request: Any) -> Any:
        """Prometheus exposition."""
        return self._metrics_guard(request) or self.metrics_resource

    @app.route("/v1/stats", methods=["GET", "HEAD"])
    def stats(self, request: Any) -> Any:
        """The same numbers as JSON."""
        return self._metrics_guard(request) or self.stats_resource

    def _metrics_guard(self, request: Any) -> bytes | None:
        if self.access.allows_metrics(request.requestHeaders.getRawHeaders(b"authorization")):
            return None
        request.setHeader(b"www-authenticate", b"Bearer")
        return write_error(request, Unauthorized("Missing or invalid metrics token."))

    @app.handle_errors(WerkzeugNotFound)
    def not_found(self, request: Any, failure: Any) -> bytes:
        path = request.path.decode("utf-8", "replace")
        return write_error(request, NotFound(f"Unknown path: {path}"))

    @app.handle_errors(WerkzeugMethodNotAllowed)
    def method_not_allowed(self, request: Any, failure: Any) -> bytes:
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        return write_error(request, MethodNotAllowed(f"{method} is not allowed on {path}"))


def _respond(body: bytes | None, request: Any) -> None:
    if request.nexus_gone:
        return
    if body:
        request.write(body)
    request.finish()


def _handler_failed(failure: Failure, request: Any) -> None:
    if not failure.check(CancelledError):
        log.failure("chat completion handler failed", failure)
        if not request.nexus_gone and not request.finished:
            request.write(write_error(request, GatewayError("Internal gateway error.")))
            request.finish()


class GatewayResource(Resource):
    """The site's root: the chat completion route directly, everything else through Klein.

    Klein costs about a quarter of the gateway's CPU per proxied request
    (werkzeug matching, and reference cycles that leave each request's objects
    to the cycle collector), so the hot path skips it; Klein routes the rest.
    """

    isLeaf = True

    def __init__(self, api: NexusAPI) -> None:
        super().__init__()
        self.api = api
        self.klein = api.app.resource()

    def render(self, request: Any) -> object:
        if request.path == CHAT_PATH:
            if request.method == b"POST":
                return self.api.render_chat(request)
            request.setHeader(b"allow", b"POST")
            method = request.method.decode("ascii", "replace")
            return write_error(
                request, MethodNotAllowed(f"{method} is not allowed on /v1/chat/completions")
            )
        return self.klein.render(request)


class NexusRequest(Request):
    """A request that is refused early when its body is too large or too slow.

    As soon as the declared length (or, for a chunked body, the bytes received
    so far) exceeds ``site.max_body_bytes``, the gateway answers 413 and closes
    the connection instead of buffering the rest. A request whose headers and
    body have not all arrived within ``site.request_timeout`` (a slow-loris
    client) gets 408 and is closed.
    """

    _rejected = False
    _received = 0
    #: Set by ``track`` for inference requests: written once, at finish or connection loss.
    nexus_record: RequestRecord | None = None
    #: The inference handler's Deferred, cancelled when the client goes away.
    nexus_handler: Deferred[Any] | None = None
    nexus_gone = False

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        # The gateway never reads form posts: skip Twisted's Content-Type parsing of every POST.
        super().__init__(channel, *args, parsePOSTFormSubmission=False, **kwargs)
        site = self.nexus_site
        self._read_deadline = site.reactor.callLater(site.request_timeout, self._too_slow)

    @property
    def nexus_site(self) -> NexusSite:
        """The site this request arrived on (set on the channel by ``Site.buildProtocol``)."""
        return self.channel.site  # type: ignore[attr-defined]

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
        self._cancel_read_deadline()
        if self._rejected:
            return
        super().requestReceived(command, path, version)

    def finish(self) -> None:
        site = self.nexus_site  # finishing detaches the request from its channel
        super().finish()
        record = self.nexus_record
        if record is not None:
            self.nexus_record = None
            record.write(site.collector, self.code, site.now())

    def connectionLost(self, reason: Any) -> None:
        self._cancel_read_deadline()
        self.nexus_gone = True
        site = self.nexus_site
        super().connectionLost(reason)
        record = self.nexus_record
        if record is not None:
            # The client left before the last byte: counted once, as 499.
            self.nexus_record = None
            record.client_gone = True
            record.error_type = "client_disconnect"
            record.write(site.collector, CLIENT_CLOSED, site.now())
        handler = self.nexus_handler
        if handler is not None and not handler.called:
            handler.cancel()

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline.active():
            self._read_deadline.cancel()

    def _reject_too_large(self) -> None:
        limit = self.nexus_site.max_body_bytes
        self._reject(413, b"Payload Too Large", PayloadTooLarge(
            f"The request body exceeds {limit} bytes."
        ))

    def _too_slow(self) -> None:
        self._reject(408, b"Request Timeout", RequestTimeout(
            "The request was not received in time."
        ))

    def _reject(self, status: int, phrase: bytes, error: GatewayError) -> None:
        """Answer before the request was read, close the connection, count it."""
        if self._rejected:
            return
        self._rejected = True
        self._cancel_read_deadline()
        channel = self.channel
        site = self.nexus_site
        body = error.to_json()
        path = (getattr(channel, "_path", None) or b"").split(b"?", 1)[0]
        answer_and_close(channel, status, phrase, body)
        record_refused(site, path, status, error.error_type)


class NexusChannel(HTTPChannel):
    """HTTP/1.1 channel whose malformed-request answer is an OpenAI-style error."""

    site: NexusSite  # set by Site.buildProtocol

    def _respondToBadRequestAndDisconnect(self) -> None:
        body = InvalidRequest(
            "Malformed request, or request line and headers over the size or count limit."
        ).to_json()
        answer_and_close(self, 400, b"Bad Request", body)
        # _path may be missing (unparsable request line) or stale from the previous request.
        path = (getattr(self, "_path", None) or b"").split(b"?", 1)[0]
        record_refused(self.site, path, 400, "invalid_request")

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver would drop the connection without a word.
        self._respondToBadRequestAndDisconnect()


def record_refused(site: Any, path: bytes, status: int, error_type: str) -> None:
    """Count an inference request answered before it reached a handler."""
    if path in INFERENCE_PATHS:
        record = RequestRecord(started=site.now())
        record.error_type = error_type
        record.write(site.collector, status, site.now())


#: How long a refused client may go on sending before its connection is cut.
LINGER_SECONDS = 2.0


def answer_and_close(channel: Any, status: int, phrase: bytes, body: bytes) -> None:
    """Answer a request the gateway will not read, then close its connection.

    What the client is still sending is read and dropped until it closes or
    LINGER_SECONDS pass: closing a socket with unread bytes makes the kernel
    send a reset, which can destroy the answer before the client reads it.
    """
    transport = channel.transport
    if transport is None or getattr(channel, "_nexus_closing", False):
        return
    channel._nexus_closing = True
    transport.write(
        b"HTTP/1.1 %d %s\r\n"
        b"Content-Type: application/json\r\n"
        b"Connection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (status, phrase, len(body), body)
    )

    def drop(*_: object) -> None:
        pass

    channel.dataReceived = channel.lineReceived = channel.rawDataReceived = drop
    channel.setTimeout(None)
    transport.loseWriteConnection()
    reactor = channel.site.reactor
    cut = reactor.callLater(LINGER_SECONDS, transport.abortConnection)
    lost = channel.connectionLost

    def connection_lost(reason: Any) -> None:
        if cut.active():
            cut.cancel()
        lost(reason)

    channel.connectionLost = connection_lost


class NexusSite(Site):
    """The gateway's site: request limits, and no access log at the default level."""

    requestFactory = NexusRequest
    # A plain HTTP/1.1 channel: the gateway speaks no TLS, so no HTTP/2 negotiation wrapper.
    protocol = NexusChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Any,
        server: ServerConfig,
        collector: MetricsCollector,
        now: Callable[[], float],
        reactor: Any,
    ) -> None:
        super().__init__(resource, reactor=reactor, timeout=server.idle_timeout_seconds)
        self.max_body_bytes = server.max_body_bytes
        self.request_timeout = server.request_timeout_seconds
        self.max_headers = server.max_headers
        self.max_header_bytes = server.max_header_bytes
        self.collector = collector
        self.now = now
        self.noisy = False

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.maxHeaders = self.max_headers
        channel.totalHeadersSize = self.max_header_bytes
        channel.MAX_LENGTH = self.max_header_bytes
        return channel

    def log(self, request: Any) -> None:
        """No per-request access log: metrics count requests, logs stay quiet."""
